"""Named MRI sequences as input: ``segment(..., channels=[...])`` and ``segment_stack(..., channels=[...])``.

``channels`` names the sequences along ``channel_axis`` (e.g. ``["flair", "t1ce"]``; spellings
such as "T1c", "T1Gd", "T2-FLAIR" are accepted, see :mod:`emclip.sequences`).

- A model with modality fusion (``model.sequences`` not None): every channel is normalised on
  its own (0.5 / 99.5 percentiles of its foreground, over the whole image or the whole volume,
  :func:`emclip.sequences.foreground_window`), placed at its sequence's input channel, absent
  sequences left all zero, and the fusion module weighs the present ones. Any subset works,
  one sequence included; a name the model does not know raises ``InvalidArgumentError``.
  Sequences the model never saw in training are left out with an ``UnseenSequenceWarning``
  (``fusion.unseen="ignore"``, the default; listed in ``info["ignored_channels"]``).
- A model without fusion (RGB/grey): one named channel is segmented as a grey image (the
  normal path, channel name not checked); several raise ``InvalidArgumentError`` saying to
  pick one sequence (e.g. FLAIR for the tumour) or to use a fusion model.

Slices are letterboxed whole (no tiling: ``tile_size`` must be None or 0) and run
``batch_size`` at a time; there is no out-of-memory fallback on this path (MRI slices are small).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..callbacks import CancelCallback, ProgressCallback, check_cancel
from ..errors import InvalidArgumentError, InvalidImageError
from ..postprocess import single_object_flags, single_object_prompts
from ..preprocess import MIN_SIDE, check_values, letterbox
from ..sequences import canonical_sequences, foreground_window, normalise_sequence, to_layout
from .model_loading import resolve_model
from .options import check_batch_size, check_min_area, check_modality, check_threshold
from .out_of_memory import check_result_fits
from .result import SegmentationResult
from .runner import (
    Steps,
    cluster_labels,
    inference_state,
    model_mirrors,
    probabilities,
    responsibilities,
    run_mirrored,
    similarity,
)


class UnseenSequenceWarning(UserWarning):
    """A named sequence was left out: the fusion model never saw it in training."""


def ignored_sequences(net: Any, names: Sequence[str]) -> list[str]:
    """Which of ``names`` the model's fusion leaves out at inference (never seen in training)."""
    fusion = getattr(net, "fusion", None)
    if fusion is None:
        return []
    present = torch.tensor([[s in names for s in fusion.sequences]], device=fusion.seen.device)
    was = fusion.training
    fusion.eval()
    try:
        drop = fusion.unseen_of(present)[0].cpu().tolist()
    finally:
        fusion.train(was)
    return [s for s, d in zip(fusion.sequences, drop) if d]


def check_channel_names(channels: Any) -> list[str]:
    """``channels`` as a non-empty list of strings, else :class:`InvalidArgumentError`."""
    if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
        raise InvalidArgumentError(
            f"channels must be a list of sequence names along channel_axis, e.g. ['flair', 't1ce'], got {channels!r}"
        )
    if not all(isinstance(c, str) for c in channels):
        raise InvalidArgumentError(f"channels must be sequence names (text), got {list(channels)!r}")
    return list(channels)


def _channel_last(arr: np.ndarray, n: int, channel_axis: int | None, spatial: int, what: str) -> np.ndarray:
    """``arr`` with its channel axis last (added for one channel without one)."""
    if arr.ndim == spatial and n == 1 and channel_axis is None:
        return arr[..., None]
    if arr.ndim != spatial + 1:
        raise InvalidImageError(
            f"{what} with {n} named channel(s) must have {spatial + 1} dimensions "
            f"({spatial} spatial + 1 channel axis), got shape {arr.shape}"
        )
    if channel_axis is None:
        hits = [a for a in range(arr.ndim) if arr.shape[a] == n]
        if not hits:
            raise InvalidImageError(f"no axis of length {n} (one per name in channels) in shape {arr.shape}")
        channel_axis = arr.ndim - 1 if arr.ndim - 1 in hits else hits[0]
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)) or not -arr.ndim <= channel_axis < arr.ndim:
        raise InvalidArgumentError(f"channel_axis={channel_axis!r} is out of range for shape {arr.shape}")
    if arr.shape[channel_axis] != n:
        raise InvalidArgumentError(
            f"channels names {n} sequence(s) but axis {channel_axis} of shape {arr.shape} has {arr.shape[channel_axis]}"
        )
    return np.moveaxis(arr, int(channel_axis), -1)


def _as_array(image: Any, what: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__"):
        return np.asarray(image)
    raise InvalidImageError(f"expected a numpy array for the {what}, got {type(image).__name__}")


def fusion_sequences(net: Any) -> list[str] | None:
    """The sequences a fusion model takes (None for a model without fusion)."""
    seqs = getattr(net, "sequences", None)
    return list(seqs) if seqs else None


def no_fusion_error(net: Any, names: Sequence[str]) -> InvalidArgumentError:
    name = getattr(getattr(net, "config", None), "name", type(net).__name__)
    return InvalidArgumentError(
        f"model {name!r} has no modality fusion: it takes one grey (or RGB) image, not {len(names)} sequences "
        f"{list(names)}; pick one, e.g. channels=['{names[0]}'] with only that channel (FLAIR shows the whole "
        "tumour and edema best, T1ce the enhancing tumour), or use a model trained with fusion.enabled"
    )


def select_single(arr: np.ndarray, n: int, channel_axis: int | None, spatial: int, what: str) -> np.ndarray:
    """The only channel of ``arr`` as a grey image/volume (for models without fusion)."""
    return _channel_last(arr, n, channel_axis, spatial, what)[..., 0]


def _prepare(arr: np.ndarray, names: list[str], layout: list[str]) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """Per-sequence normalised ``float32 [..., len(layout)]`` and the window of each named sequence."""
    check_values(arr)
    windows, planes = {}, []
    for i, name in enumerate(names):
        w = foreground_window(arr[..., i])
        windows[name] = w
        planes.append(normalise_sequence(arr[..., i], w))
    return to_layout(np.stack(planes, axis=-1), names, layout), windows


def _forward(net: Any, dev: torch.device, slices: list[np.ndarray], prompts: list[str], modality: str | None,
             mirror: bool):
    boxed, geos = [], []
    for s in slices:
        b, g = letterbox(s, int(net.image_size))
        boxed.append(b)
        geos.append(g)
    x = torch.from_numpy(np.stack(boxed)).to(dev).permute(0, 3, 1, 2).contiguous()
    return run_mirrored(lambda images: net.predict_logits(images, prompts, modality=modality), x, mirror), geos


def segment_channels(
    image: Any,
    prompts: list[str],
    model: Any,
    channels: Sequence[str],
    *,
    stack: bool,
    axis: int = 0,
    modality: str | None = None,
    threshold: float = 0.5,
    channel_axis: int | None = None,
    device: Any = None,
    tile_size: int | None = None,
    min_area: int | None = None,
    batch_size: int = 4,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    mirror: bool | None = None,
) -> SegmentationResult | tuple[np.ndarray, int | None]:
    """The ``channels`` path of :func:`segment` (``stack=False``) and :func:`segment_stack`.

    For a model without fusion and one channel it returns ``(grey array, None)`` so the caller
    runs its normal path on it; otherwise a :class:`SegmentationResult` (see the module docstring).
    """
    names_in = check_channel_names(channels)
    t = check_threshold(threshold)
    batch = check_batch_size(batch_size)
    modality = check_modality(modality)
    if tile_size not in (None, 0):
        raise InvalidArgumentError("tile_size is not supported with channels (named MRI sequences); leave it None")
    spatial = 3 if stack else 2
    what = "volume" if stack else "image"
    arr = _as_array(image, what)
    n = len(names_in)
    net, dev = resolve_model(model, device)
    layout = fusion_sequences(net)
    if layout is None:
        if n > 1:
            raise no_fusion_error(net, names_in)
        return select_single(arr, n, channel_axis, spatial, what), None
    names = canonical_sequences(names_in, layout)
    ignored = ignored_sequences(net, names)
    if ignored:
        kept = [n for n in names if n not in ignored]
        warnings.warn(
            f"the model never saw {ignored} in training, so it leaves them out and uses {kept}; "
            "set fusion.unseen='use' in its config to feed them anyway", UnseenSequenceWarning, stacklevel=3,
        )
    view = _channel_last(arr, n, channel_axis, spatial, what)
    if stack:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -spatial <= axis < spatial:
            raise InvalidArgumentError(f"axis={axis!r} is out of range for a volume with spatial shape {view.shape[:3]}")
        stack_pos = int(axis) % spatial
        view = np.moveaxis(view, stack_pos, 0)
    else:
        stack_pos = None
        view = view[None]
    z, hw = int(view.shape[0]), (int(view.shape[1]), int(view.shape[2]))
    if z == 0 or min(hw) < MIN_SIDE:
        raise InvalidImageError(f"each slice must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {hw} ({z} slices)")
    area = check_min_area(min_area, hw)
    check_result_fits(len(prompts), (z,) + hw if stack else hw)
    check_cancel(cancel)
    data, windows = _prepare(view, names, layout)
    from .single_image import summarise
    from .stacks import _summarise_stack

    steps = Steps(progress, z)
    use_mirror = model_mirrors(net, mirror)
    probs = np.zeros((len(prompts), z) + hw, dtype=np.float32)
    clusters = np.zeros((z,) + hw, dtype=np.int32)
    sims: list[np.ndarray] = []
    with inference_state(net, dev):
        for k in range(0, z, batch):
            check_cancel(cancel)
            idx = list(range(k, min(z, k + batch)))
            out, geos = _forward(net, dev, [data[i] for i in idx], prompts, modality, use_mirror)
            for j, (i, geo) in enumerate(zip(idx, geos)):
                probs[:, i] = probabilities(out.logits[j, : len(prompts)], geo)
                clusters[i] = cluster_labels(responsibilities(out, j), geo, hw)
                sims.append(similarity(out, j, len(prompts)))
            del out
            steps.advance(len(idx))
    check_cancel(cancel)
    single = single_object_flags(net, prompts)
    info = {"tile_size": None, "modality": modality, "channels": names, "ignored_channels": ignored,
            "single_object": single_object_prompts(prompts, single),
            "intensity_windows": windows,
            "fusion_sequences": layout, "mirror": use_mirror}
    sim = np.mean(np.stack(sims), axis=0).astype(np.float32) if sims and sims[0].size else np.zeros((0, len(prompts)), np.float32)
    common = {"prompts": prompts, "cluster_similarity": sim, "threshold": t, "min_area": area, "tiled": False, "device": str(dev), "info": info}
    if not stack:
        summary = summarise(probs[:, 0], t, area, single)
        steps.finish()
        return SegmentationResult(probabilities=probs[:, 0], cluster_map=clusters[0], **common, **summary)
    summary = _summarise_stack(probs, t, area, single)
    summary["masks"] = np.moveaxis(summary["masks"], 1, 1 + stack_pos)
    steps.finish()
    return SegmentationResult(
        probabilities=np.moveaxis(probs, 1, 1 + stack_pos),
        cluster_map=np.moveaxis(clusters, 0, stack_pos),
        stack_axis=stack_pos,
        **common,
        **summary,
    )
