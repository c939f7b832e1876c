""":class:`SegmentationResult`: what :func:`emclip.segment` and :func:`emclip.segment_stack` return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import InvalidArgumentError


@dataclass
class SegmentationResult:
    """What :func:`segment` (2D) and :func:`segment_stack` (3D) return.

    Shapes use ``P`` prompts, ``K`` EM bases and the image's spatial shape ``(H, W)`` (or the
    stack's, e.g. ``(Z, H, W)``, in the order of the input's axes).
    """

    prompts: list[str]
    masks: np.ndarray
    """``bool [P, *spatial]``; all False for prompts that were not found."""
    probabilities: np.ndarray
    """``float32 [P, *spatial]`` in [0, 1] (kept even for prompts that were not found)."""
    found: np.ndarray
    """``bool [P]``: the mask is at least ``min_area`` pixels (in at least one slice)."""
    scores: np.ndarray
    """``float32 [P]``: mean probability inside the mask (0 when not found)."""
    max_probability: np.ndarray
    """``float32 [P]``: highest probability anywhere (why a prompt was or was not found)."""
    areas: np.ndarray
    """``int64 [P]``: pixels (voxels) in each mask."""
    cluster_map: np.ndarray
    """``int32 [*spatial]``: EM cluster id 1..K of each pixel; 0 = undefined (no EM model)."""
    cluster_similarity: np.ndarray
    """``float32 [K, P]``: cosine of each EM basis with each prompt (mean over slices)."""
    threshold: float = 0.5
    min_area: int = 0
    tiled: bool = False
    device: str = "cpu"
    stack_axis: Optional[int] = None
    """For :func:`segment_stack`: the spatial axis along which slices were taken."""
    slice_found: Optional[np.ndarray] = None
    """For :func:`segment_stack`: ``bool [Z, P]``, found in each slice."""
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        parts = [
            f"{p!r}: " + (f"found, {a} px, score {s:.2f}" if f else f"not found (max p {m:.2f})")
            for p, f, a, s, m in zip(
                self.prompts, self.found, self.areas, self.scores, self.max_probability
            )
        ]
        return f"SegmentationResult(shape={tuple(self.masks.shape[1:])}, " + "; ".join(parts) + ")"

    def mask(self, prompt: str) -> np.ndarray:
        """The mask of one prompt, by its text (case-insensitive)."""
        key = prompt.strip().casefold()
        for name, m in zip(self.prompts, self.masks):
            if name.casefold() == key:
                return m
        raise KeyError(f"no prompt {prompt!r} in this result; prompts are {self.prompts}")

    def label_image(self, overlap: str = "probability") -> np.ndarray:
        """All masks in one label map: 0 background, ``i + 1`` for ``prompts[i]``.

        Where masks overlap, ``overlap="probability"`` (default) gives the pixel to the prompt
        with the highest probability there (ties: higher score, then earlier prompt);
        ``overlap="area"`` paints smaller masks over larger ones (nested structures such as the
        optic cup inside the disc stay visible). ``uint8`` for < 256 prompts, else ``uint16``.
        """
        if overlap not in ("probability", "area"):
            raise InvalidArgumentError(f"overlap must be 'probability' or 'area', got {overlap!r}")
        n = len(self.prompts)
        dtype = np.uint8 if n < 256 else np.uint16
        labels = np.zeros(self.masks.shape[1:], dtype=dtype)
        if overlap == "area":
            for i in sorted(range(n), key=lambda i: (-int(self.areas[i]), -i)):
                labels[self.masks[i]] = i + 1
            return labels
        order = np.argsort(-np.asarray(self.scores, dtype=np.float64), kind="stable")
        rows = max(1, 4_000_000 // max(1, int(np.prod(self.masks.shape[2:], dtype=np.int64)) * n))
        for start in range(0, labels.shape[0], rows):  # blocks bound the temporary memory
            sl = slice(start, start + rows)
            m = self.masks[:, sl][order]  # reordered block by block: no copy of the whole arrays
            key = np.where(m, self.probabilities[:, sl][order], -1.0)
            best = order[np.argmax(key, axis=0)] + 1
            labels[sl] = np.where(m.any(axis=0), best, 0).astype(dtype)
            del m, key, best  # before the next block's temporaries exist
        return labels
