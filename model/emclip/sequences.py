"""MRI sequence names and per-sequence intensity normalisation (numpy only, no torch).

Used by models with modality fusion (:mod:`emclip.nn.fusion`), by the multi-sequence volume
datasets (training) and by ``segment(..., channels=[...])`` (inference), so that training and
inference normalise every sequence the same way:

- :func:`canonical_sequence` maps a user's name ("FLAIR", "T1c", "T1Gd", "t1-ce") to the
  config's name ("flair", "t1ce");
- :func:`foreground_window` is the robust window of one sequence: the 0.5 / 99.5 percentiles of
  its *foreground* (voxels above the sequence's minimum, i.e. not the constant background of a
  skull-stripped scan), over the whole volume (or 2D image);
- :func:`normalise_sequence` maps that window to [0, 1] (clipped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgumentError

KNOWN_SEQUENCES = ("flair", "t1", "t1ce", "t2")
"""The four BraTS sequences (the default of ``fusion.sequences``)."""

ALIASES: dict[str, str] = {
    "t2flair": "flair", "t2-flair": "flair", "t2_flair": "flair", "fl": "flair",
    "t1w": "t1", "t1-weighted": "t1", "t1pre": "t1", "t1native": "t1",
    "t1c": "t1ce", "t1gd": "t1ce", "t1-ce": "t1ce", "t1_ce": "t1ce", "t1post": "t1ce", "t1+c": "t1ce",
    "t1-gd": "t1ce", "t1contrast": "t1ce",
    "t2w": "t2", "t2-weighted": "t2",
    "t2f": "flair", "t1n": "t1",  # BraTS 2023 file suffixes
}
"""Other spellings of the sequence names (matched case-insensitively, spaces removed; also with
``-``/``_`` removed). The one table: :mod:`emclip.volume_io` reads file-name suffixes with it."""

PERCENTILES = (0.5, 99.5)
MIN_FOREGROUND = 0.01
"""If fewer than this share of voxels is above the minimum, the window uses all voxels."""


def sequence_alias(name: str) -> str | None:
    """The name in :data:`KNOWN_SEQUENCES` that ``name`` spells ("T1c" -> "t1ce", "t2_flair" ->
    "flair"), else None. Case-insensitive, spaces ignored; tried as given, then without ``-``/``_``."""
    key = "".join(str(name).split()).lower()
    for k in (key, key.replace("-", "").replace("_", "")):
        if k in KNOWN_SEQUENCES:
            return k
        if k in ALIASES:
            return ALIASES[k]
    return None


def canonical_sequence(name: str, known: Sequence[str] = KNOWN_SEQUENCES) -> str:
    """``name`` as one of ``known`` (case-insensitive, aliases such as "T1c" -> "t1ce").

    Raises :class:`InvalidArgumentError` naming the known sequences for anything else.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"a sequence name must be text such as 'flair', got {name!r}")
    key = "".join(name.split()).lower()
    table = {k.lower(): k for k in known}
    if key in table:
        return table[key]
    alias = sequence_alias(key)
    if alias is not None and alias in table:
        return table[alias]
    raise InvalidArgumentError(
        f"unknown MRI sequence {name!r}; this model knows {', '.join(known)} "
        f"(also spelled e.g. 'T1c'/'T1Gd' for t1ce, 'T2-FLAIR' for flair)"
    )


def canonical_sequences(names: Sequence[str], known: Sequence[str] = KNOWN_SEQUENCES) -> list[str]:
    """:func:`canonical_sequence` of each name; a sequence named twice raises InvalidArgumentError."""
    if isinstance(names, str):
        raise InvalidArgumentError(f"channels must be a list of sequence names, e.g. ['flair', 't1ce'], got {names!r}")
    out = [canonical_sequence(n, known) for n in names]
    if not out:
        raise InvalidArgumentError("channels is empty: name at least one sequence, e.g. channels=['flair']")
    dup = sorted({s for s in out if out.count(s) > 1})
    if dup:
        raise InvalidArgumentError(f"sequence(s) {dup} named twice in channels {list(names)}; name each channel once")
    return out


def foreground_window(values: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """``(lo, hi)`` percentiles of the voxels above the minimum of ``values`` (any shape).

    Large arrays are subsampled on a regular grid (at most ~2e6 values). A constant array gives
    ``(v, v + 1)`` (normalises to zeros).
    """
    arr = np.asarray(values)
    flat = arr.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = np.asarray(flat[::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low = float(sample.min())
    fg = sample[sample > low]
    if fg.size < MIN_FOREGROUND * sample.size:
        fg = sample
    lo, hi = (float(v) for v in np.percentile(fg, percentiles))
    if hi <= lo:
        lo, hi = float(fg.min()), float(fg.max())
    if hi <= lo:
        return lo, lo + 1.0
    return lo, hi


def normalise_sequence(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``values`` mapped from ``window`` to [0, 1] (clipped), float32, same shape."""
    lo, hi = float(window[0]), float(window[1])
    out = (np.asarray(values, dtype=np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-12))
    return np.clip(out, 0.0, 1.0, out=out)


def to_layout(image: np.ndarray, names: Sequence[str], layout: Sequence[str]) -> np.ndarray:
    """Place channel-last ``image [..., len(names)]`` into the model's sequence order
    ``[..., len(layout)]``; sequences not in ``names`` are all-zero channels (absent)."""
    out = np.zeros(image.shape[:-1] + (len(layout),), dtype=np.float32)
    for i, name in enumerate(names):
        out[..., list(layout).index(name)] = image[..., i]
    return out


__all__ = [
    "ALIASES",
    "KNOWN_SEQUENCES",
    "canonical_sequence",
    "canonical_sequences",
    "foreground_window",
    "normalise_sequence",
    "sequence_alias",
    "to_layout",
]
