""":func:`segment_stack`: a 3D stack, slice by slice along one axis, with one intensity window."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..callbacks import CancelCallback, ProgressCallback, check_cancel
from ..errors import InvalidArgumentError, InvalidImageError
from ..exemplars import Exemplar, TemplateBank, check_exemplars
from ..postprocess import single_object_flags, single_object_prompts
from ..preprocess import check_image, check_values, letterbox, robust_range, to_float_rgb
from .exemplar_prompts import (
    check_exemplar_mode,
    exemplar_info,
    plan_prompts,
    prompt_keys,
    text_prompt_list,
)
from .model_loading import model_dtype, resolve_model
from .options import (
    auto_tile_size,
    check_batch_size,
    check_min_area,
    check_mirror,
    check_modality,
    check_threshold,
)
from .out_of_memory import Plan, check_result_fits, free_memory, is_oom, next_plan, plan_steps
from .result import SegmentationResult
from .runner import (
    Runner,
    Steps,
    cluster_labels,
    inference_state,
    model_mirrors,
    probabilities,
    responsibilities,
    similarity,
)
from .single_image import run_2d, summarise


def _stack_view(
    volume: np.ndarray, axis: int, channel_axis: Optional[int]
) -> tuple[np.ndarray, int]:
    """``(Z, H, W[, C])`` view of ``volume`` and the position of the stack axis among the
    spatial axes of the input (for putting results back in the input's axis order)."""
    if isinstance(volume, np.ndarray):
        vol = volume
    elif hasattr(volume, "__array__"):
        vol = np.asarray(volume)
    else:
        raise InvalidImageError(f"expected a numpy array (Z, H, W), got {type(volume).__name__}")
    if vol.ndim == 3:
        if channel_axis is not None:
            raise InvalidImageError(
                f"a 3D array {vol.shape} with channel_axis={channel_axis} is one 2D image; use emclip.segment"
            )
        c = None
    elif vol.ndim == 4:
        if channel_axis is not None and (
            isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer))
        ):
            raise InvalidArgumentError(
                f"channel_axis must be an axis number such as -1 (or None to guess), got {channel_axis!r}"
            )
        if channel_axis is None:
            if vol.shape[-1] not in (1, 3, 4):
                raise InvalidImageError(
                    f"cannot tell the channel axis of a 4D array of shape {vol.shape}; pass channel_axis=..."
                )
            channel_axis = -1
        c = channel_axis % 4 if -4 <= channel_axis < 4 else None
        if c is None:
            raise InvalidArgumentError(
                f"channel_axis={channel_axis} is out of range for shape {vol.shape}"
            )
    else:
        hint = "; for a 2D image use emclip.segment" if vol.ndim == 2 else ""
        raise InvalidImageError(
            f"expected a stack (Z, H, W) or (Z, H, W, C), got shape {vol.shape}{hint}"
        )
    if (
        isinstance(axis, bool)
        or not isinstance(axis, (int, np.integer))
        or not -vol.ndim <= axis < vol.ndim
    ):
        raise InvalidArgumentError(
            f"axis={axis!r} is out of range for a stack of shape {vol.shape}"
        )
    a = int(axis) % vol.ndim
    if c is not None and a == c:
        raise InvalidArgumentError(
            f"axis={axis} is the channel axis; pick the axis along which to take slices"
        )
    if c is None:
        view = np.moveaxis(vol, a, 0)
        pos = a
    else:
        view = np.moveaxis(vol, [a, c], [0, 3])
        pos = a if a < c else a - 1
    return view, pos


def segment_stack(
    volume: np.ndarray,
    prompts: "str | Sequence[str] | None" = None,
    model: Any = None,
    *,
    axis: int = 0,
    modality: Optional[str] = None,
    threshold: float = 0.5,
    channel_axis: Optional[int] = None,
    device: "str | torch.device | None" = None,
    tile_size: Optional[int] = None,
    min_area: Optional[int] = None,
    batch_size: int = 4,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    exemplars: "Sequence[Exemplar] | TemplateBank | None" = None,
    exemplar_mode: str = "combine",
    channels: Optional[Sequence[str]] = None,
    mirror: Optional[bool] = None,
) -> SegmentationResult:
    """Segment a 3D stack slice by slice along ``axis`` (default 0).

    ``volume``: ``(Z, H, W)`` in any axis order, or with a channel axis (``channel_axis``, or a
    last axis of 1/3/4). One intensity window is computed for the whole volume, so every slice
    is normalised the same way. ``batch_size`` slices (default 4) share a forward pass; slices
    needing tiles (see :func:`segment`) are tiled. Result arrays keep the volume's spatial axes
    in their order (``masks [P, *spatial]``, ``cluster_map [*spatial]``); ``found`` is per
    prompt over the volume, ``slice_found [Z, P]`` per slice (``min_area`` applies per slice,
    default 0.01 % of a slice). ``progress(done, total)`` counts slices; ``cancel`` is polled
    between batches and raises :class:`emclip.Cancelled`. Other arguments as in :func:`segment`
    (``exemplars``/``exemplar_mode``: visual prompts from reference 2D images, encoded once).
    ``prompts=None``: prompt-free, the modality recognised from a few central slices (see
    :mod:`.prompt_free`).
    ``channels``: names of the MRI sequences along ``channel_axis`` of a ``(Z, H, W, C)``-like
    volume (e.g. ["flair", "t1ce"]): each sequence is normalised with its own window over the
    whole volume and fed to the model's modality fusion; a model without fusion takes exactly
    one (see :mod:`.channels`). ``axis`` then counts spatial axes only. Not combined with
    exemplars or prompt-free mode. ``mirror``: as in :func:`segment` (None = the model's default).
    """
    mirror = check_mirror(mirror)
    if channels is not None:  # named MRI sequences (inference/channels.py)
        from ..prompts import parse_prompts as _parse
        from .channels import segment_channels

        if prompts is None or exemplars is not None:
            raise InvalidArgumentError("channels cannot be combined with exemplars or prompt-free mode; pass prompts")
        got = segment_channels(volume, _parse(prompts), model, channels, stack=True, axis=axis,
                               modality=modality, threshold=threshold, channel_axis=channel_axis, device=device,
                               tile_size=tile_size, min_area=min_area, batch_size=batch_size, progress=progress,
                               cancel=cancel, mirror=mirror)
        if isinstance(got, SegmentationResult):
            return got
        volume, channel_axis = got  # one channel for a model without fusion: the grey path below
    exemplar_list = check_exemplars(exemplars) if exemplars is not None else []
    if prompts is None and not exemplar_list:  # prompt-free mode (inference/prompt_free.py)
        from .prompt_free import segment_stack_everything

        return segment_stack_everything(
            volume, model, axis=axis, modality=modality, threshold=threshold,
            channel_axis=channel_axis, device=device, tile_size=tile_size, min_area=min_area,
            batch_size=batch_size, progress=progress, cancel=cancel, mirror=mirror,
        )
    mode = check_exemplar_mode(exemplar_mode)
    text_list = text_prompt_list(prompts, exemplar_list)
    prompt_list = plan_prompts(text_list, exemplar_list)
    t = check_threshold(threshold)
    batch = check_batch_size(batch_size)
    modality = check_modality(modality)
    view, stack_pos = _stack_view(volume, axis, channel_axis)
    z = int(view.shape[0])
    if z == 0:
        raise InvalidImageError("the stack has no slices")
    # shape/channel/dtype checks on one slice (each slice is checked again when it runs); the
    # view is channel-last, never re-guessed (a (3, W, C) slice is not channel-first)
    cax = -1 if view.ndim == 4 else None
    first = check_image(view[0], cax, values=False)
    hw = (int(first.shape[0]), int(first.shape[1]))
    area = check_min_area(min_area, hw)
    check_result_fits(len(prompt_list), (z,) + hw)
    values = view[..., :3] if view.ndim == 4 and view.shape[-1] == 4 else view
    check_values(values)
    net, dev = resolve_model(model, device)
    plan = Plan(
        tile=auto_tile_size(hw, int(net.image_size), tile_size), batch_size=batch, stack=True
    )
    steps = Steps(progress, z)
    check_cancel(cancel)
    window = robust_range(values)
    n = len(prompt_list)
    probs = np.zeros((n, z) + hw, dtype=np.float32)
    clusters = np.zeros((z,) + hw, dtype=np.int32)
    sims: list[np.ndarray] = []
    with inference_state(net, dev):
        keys = None
        if exemplar_list:
            keys = prompt_keys(net, text_list, prompt_list, exemplar_list, modality, mode, dev, model_dtype(net))
        use_mirror = model_mirrors(net, mirror)
        runner = Runner(net, dev, prompt_list, modality, prompt_keys=keys, mirror=use_mirror)
        k = 0
        while k < z:
            check_cancel(cancel)
            if plan.tile is not None:  # big slices: one at a time, tiled
                quiet = Steps(None, plan_steps(plan, hw))
                arr = check_image(view[k], cax)
                p, c, s, plan = run_2d(arr, window, runner, plan, quiet, cancel)
                probs[:, k], clusters[k] = p, c
                sims.append(s)
                k += 1
                steps.advance()
                continue
            idx = list(range(k, min(z, k + plan.batch_size)))
            failure: Optional[BaseException] = None
            try:
                for i, (p, c, s) in zip(idx, _slice_batch(view, idx, window, runner)):
                    probs[:, i], clusters[i] = p, c
                    sims.append(s)
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc):
                    raise
                failure = exc
            if failure is None:
                k += len(idx)
                steps.advance(len(idx))
                continue
            free_memory(runner.device)
            plan = next_plan(plan, runner, failure)
            failure = None
        ran_on = str(runner.device)
    check_cancel(cancel)
    single = single_object_flags(net, prompt_list)
    summary = _summarise_stack(probs, t, area, single)
    mean_similarity = (
        np.mean(np.stack(sims), axis=0).astype(np.float32)
        if sims and sims[0].size
        else (np.zeros((0, n), dtype=np.float32))
    )
    steps.finish()
    info = {"tile_size": plan.tile, "intensity_range": window, "modality": modality,
            "single_object": single_object_prompts(prompt_list, single), "mirror": use_mirror}
    if exemplar_list:
        info["exemplars"] = exemplar_info(exemplar_list, mode)
    return SegmentationResult(
        prompts=prompt_list,
        probabilities=np.moveaxis(probs, 1, 1 + stack_pos),
        cluster_map=np.moveaxis(clusters, 0, stack_pos),
        cluster_similarity=mean_similarity,
        threshold=t,
        min_area=area,
        tiled=plan.tile is not None,
        device=ran_on,
        stack_axis=stack_pos,
        info=info,
        **{
            k: (np.moveaxis(v, 1, 1 + stack_pos) if k == "masks" else v) for k, v in summary.items()
        },
    )


def _slice_batch(
    view: np.ndarray, idx: Sequence[int], window: tuple[float, float], runner: Runner
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Probabilities, cluster map and similarity of the slices ``idx``, in one forward pass."""
    boxed, geos = [], []
    cax = -1 if view.ndim == 4 else None
    for i in idx:
        b, g = letterbox(to_float_rgb(view[i], cax, intensity_range=window), runner.size)
        boxed.append(b)
        geos.append(g)
    out = runner.forward(boxed)
    del boxed
    n = len(runner.prompts)
    hw = geos[0].orig_hw
    return [
        (
            probabilities(out.logits[j, :n], geo),
            cluster_labels(responsibilities(out, j), geo, hw),
            similarity(out, j, n),
        )
        for j, geo in enumerate(geos)
    ]


def _summarise_stack(
    probs: np.ndarray, threshold: float, min_area: int, single_object: Sequence[bool] | None = None
) -> dict[str, np.ndarray]:
    """Per-slice thresholding of ``probs [P, Z, H, W]`` (``min_area`` and ``single_object``
    per slice, see :func:`summarise`) + totals."""
    n, z = probs.shape[:2]
    masks = np.zeros(probs.shape, dtype=bool)
    slice_found = np.zeros((z, n), dtype=bool)
    for k in range(z):
        s = summarise(probs[:, k], threshold, min_area, single_object)
        masks[:, k] = s["masks"]
        slice_found[k] = s["found"]
    found = slice_found.any(axis=0)
    areas = masks.reshape(n, -1).sum(axis=1).astype(np.int64)
    scores = np.zeros(n, dtype=np.float32)
    maxp = probs.reshape(n, -1).max(axis=1).astype(np.float32)
    for i in range(n):
        if found[i]:
            scores[i] = float(probs[i][masks[i]].mean(dtype=np.float64))
    return {
        "masks": masks,
        "found": found,
        "scores": scores,
        "areas": areas,
        "max_probability": maxp,
        "slice_found": slice_found,
    }
