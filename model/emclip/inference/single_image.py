""":func:`segment`: one 2D image, in one letterboxed pass or in overlapping tiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..callbacks import CancelCallback, ProgressCallback, check_cancel
from ..errors import InvalidArgumentError
from ..exemplars import Exemplar, TemplateBank, check_exemplars
from ..postprocess import keep_single_object, single_object_flags, single_object_prompts
from ..preprocess import MIN_SIDE, check_image, check_values, letterbox, to_float_rgb
from ..preprocess import intensity_range as image_intensity_range
from ..tiling import TileGrid, batched, tile_grid
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


def _whole_image(
    arr: np.ndarray,
    window: tuple[float, float],
    runner: Runner,
    steps: Steps,
    cancel: CancelCallback | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One letterboxed pass over the whole image."""
    hw = arr.shape[:2]
    boxed, geo = letterbox(to_float_rgb(arr, intensity_range=window), runner.size)
    steps.advance()
    check_cancel(cancel)
    out = runner.forward([boxed])
    del boxed
    steps.advance()
    check_cancel(cancel)
    probs = probabilities(out.logits[0, : len(runner.prompts)], geo)
    clusters = cluster_labels(responsibilities(out, 0), geo, hw)
    return probs, clusters, similarity(out, 0, len(runner.prompts))


def _overview(
    arr: np.ndarray, window: tuple[float, float], runner: Runner
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster map and similarity from one low-resolution pass over a (big) image."""
    hw = arr.shape[:2]
    step = max(1, max(hw) // (2 * runner.size))
    # the same stride on both axes, except that a thin side never drops below MIN_SIDE pixels
    sy, sx = (max(1, min(step, n // MIN_SIDE)) for n in hw)
    boxed, geo = letterbox(to_float_rgb(arr[::sy, ::sx], intensity_range=window), runner.size)
    out = runner.forward([boxed])
    return cluster_labels(responsibilities(out, 0), geo, hw), similarity(
        out, 0, len(runner.prompts)
    )


def _tiled(
    arr: np.ndarray,
    window: tuple[float, float],
    runner: Runner,
    grid: TileGrid,
    batch_size: int,
    steps: Steps,
    cancel: CancelCallback | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend tile probabilities into a full-size map; clusters from the overview pass."""
    hw = arr.shape[:2]
    clusters, sims = _overview(arr, window, runner)
    steps.advance()
    probs = np.zeros((len(runner.prompts),) + tuple(hw), dtype=np.float32)
    for chunk in batched(list(grid), batch_size):
        check_cancel(cancel)
        boxed, geos = [], []
        for tile in chunk:
            b, g = letterbox(to_float_rgb(arr[tile.slices], intensity_range=window), runner.size)
            boxed.append(b)
            geos.append(g)
        out = runner.forward(boxed)
        del boxed
        for i, (tile, geo) in enumerate(zip(chunk, geos)):
            p = probabilities(out.logits[i, : len(runner.prompts)], geo)
            probs[:, tile.y0 : tile.y1, tile.x0 : tile.x1] += p * grid.weights(tile)[None]
        del out
        steps.advance()
    check_cancel(cancel)
    np.clip(probs, 0.0, 1.0, out=probs)  # blending is convex; clip float rounding only
    return probs, clusters, sims


def run_2d(
    arr: np.ndarray,
    window: tuple[float, float],
    runner: Runner,
    plan: Plan,
    steps: Steps,
    cancel: CancelCallback | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Plan]:
    """Probabilities, cluster map, similarity of one checked 2D image, and the plan that worked
    (lighter than ``plan`` if the device ran out of memory)."""
    hw = arr.shape[:2]
    while True:
        failure: BaseException | None = None
        try:
            if plan.tile is None:
                return (*_whole_image(arr, window, runner, steps, cancel), plan)
            grid = tile_grid(hw, plan.tile)
            return (*_tiled(arr, window, runner, grid, plan.batch_size, steps, cancel), plan)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            failure = exc
        # outside the except block, so the failed attempt's tensors can be freed
        free_memory(runner.device)
        plan = next_plan(plan, runner, failure)
        failure = None
        steps.extend(plan_steps(plan, hw))


def summarise(
    probs: np.ndarray, threshold: float, min_area: int, single_object: Sequence[bool] | None = None
) -> dict[str, np.ndarray]:
    """Threshold ``probs [P, ...]`` into masks; prompts flagged in ``single_object`` keep only
    their main connected component (:mod:`emclip.postprocess`); prompts below ``min_area``
    get empty masks."""
    masks = probs > threshold
    n = probs.shape[0]
    for i, single in enumerate(single_object or ()):
        if single:
            masks[i] = keep_single_object(masks[i], probs[i])
    found = np.zeros(n, dtype=bool)
    scores = np.zeros(n, dtype=np.float32)
    areas = np.zeros(n, dtype=np.int64)
    maxp = np.zeros(n, dtype=np.float32)
    for i in range(n):
        maxp[i] = float(probs[i].max()) if probs[i].size else 0.0
        area = int(np.count_nonzero(masks[i]))
        if area >= max(1, min_area):
            found[i], areas[i] = True, area
            scores[i] = float(probs[i][masks[i]].mean(dtype=np.float64))
        else:
            masks[i] = False
    return {
        "masks": masks,
        "found": found,
        "scores": scores,
        "areas": areas,
        "max_probability": maxp,
    }


def segment(
    image: np.ndarray,
    prompts: str | Sequence[str] | None = None,
    model: Any = None,
    *,
    modality: str | None = None,
    threshold: float = 0.5,
    channel_axis: int | None = None,
    device: str | torch.device | None = None,
    tile_size: int | None = None,
    min_area: int | None = None,
    batch_size: int = 4,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    coarse_to_fine: bool | None = None,
    exemplars: Sequence[Exemplar] | TemplateBank | None = None,
    exemplar_mode: str = "combine",
    channels: Sequence[str] | None = None,
    mirror: bool | None = None,
) -> SegmentationResult:
    """Segment the structures named by ``prompts`` in a 2D ``image``.

    ``image``: ``(H, W)`` grey, or RGB/RGBA channel-last or channel-first (``channel_axis`` to
    be explicit), any integer, float or bool dtype. ``prompts``: "optic disc, optic cup" or a
    list; None = prompt-free: every structure the model knows for the image's modality (given by
    ``modality`` or recognised), only the found ones returned (see :mod:`.prompt_free`).
    ``model``: a model instance or anything :func:`load_model` takes (default: the bundled
    model). ``modality`` picks the prompt templates ("fundus", "cardiac MRI", ...).
    ``threshold`` (default 0.5) on the probability gives the masks; a prompt whose mask has
    fewer than ``min_area`` pixels (default: 0.01 % of the image, at least 4) is *not found*:
    its mask stays empty. ``device``: where to run (default: the model's device, or "auto").
    ``tile_size``: see :mod:`emclip.inference` (None = automatic, 0 = never). ``batch_size``:
    tiles per forward pass. ``progress(done, total)`` is called after each step and ``cancel()``
    polled between steps; it raises :class:`emclip.Cancelled` and returns nothing partial.
    ``coarse_to_fine`` (whole fundus photographs, :mod:`emclip.fundus`): None (auto) = for
    optic disc/cup/rim prompts with modality None or fundus on images of at least
    ``fundus.AUTO_MIN_LONG_SIDE`` (768) x ``fundus.AUTO_MIN_SIDE`` (128) pixels, locate the disc,
    segment a crop around it at full resolution and paste back (ROI crops get the plain
    result); True = always crop around the disc; False = never.
    ``exemplars`` (reference images with masks, :class:`emclip.Exemplar` or a
    :class:`emclip.TemplateBank`) add visual prompts (:mod:`.exemplar_prompts`): an exemplar whose
    name matches a prompt combines with its text (``exemplar_mode="combine"``, default) or
    replaces it (``"only"``); other exemplar names become extra prompts after ``prompts`` in the
    result. With exemplars, ``prompts`` may be None or empty. Coarse-to-fine is not used with
    exemplars (auto skips it; True is refused).
    ``channels``: names of the MRI sequences along ``channel_axis`` (e.g. ["flair", "t1ce"]):
    each is normalised separately and fed to the model's modality fusion; a model without fusion
    takes exactly one (see :mod:`.channels`). Not combined with exemplars or prompt-free mode.
    ``mirror``: run every pass on the image and its left-right mirror in one batch and average
    the logits (test-time augmentation; cluster maps come from the plain pass). None (default) =
    the model's ``test_time_mirror``: on for the bundled model, which was trained with flips
    (+0.6 Dice points on ACDC validation, +4.3 on unseen LGE, for ~1.5x the network time; see
    BENCHMARKS.md); False = one plain pass.

    Every problem with the arguments raises an :class:`emclip.EMClipError` that is a
    ``ValueError`` (image, prompts, options, model path) before any model is loaded, including
    results too large for the free memory (:class:`emclip.InvalidImageError`).
    """
    mirror = check_mirror(mirror)
    if channels is not None:  # named MRI sequences (inference/channels.py)
        from ..prompts import parse_prompts
        from .channels import segment_channels

        if prompts is None or exemplars is not None:
            raise InvalidArgumentError("channels cannot be combined with exemplars or prompt-free mode; pass prompts")
        got = segment_channels(image, parse_prompts(prompts), model, channels, stack=False, modality=modality,
                               threshold=threshold, channel_axis=channel_axis, device=device, tile_size=tile_size,
                               min_area=min_area, batch_size=batch_size, progress=progress, cancel=cancel,
                               mirror=mirror)
        if isinstance(got, SegmentationResult):
            return got
        image, channel_axis = got  # one channel for a model without fusion: the grey path below
    exemplar_list = check_exemplars(exemplars) if exemplars is not None else []
    if prompts is None and not exemplar_list:  # prompt-free mode (inference/prompt_free.py)
        from .prompt_free import segment_everything

        return segment_everything(
            image, model, modality=modality, threshold=threshold, channel_axis=channel_axis,
            device=device, tile_size=tile_size, min_area=min_area, batch_size=batch_size,
            progress=progress, cancel=cancel, coarse_to_fine=coarse_to_fine, mirror=mirror,
        )
    mode = check_exemplar_mode(exemplar_mode)
    prompt_list = text_prompt_list(prompts, exemplar_list)
    names = plan_prompts(prompt_list, exemplar_list)
    t = check_threshold(threshold)
    batch = check_batch_size(batch_size)
    modality = check_modality(modality)
    arr = check_image(image, channel_axis, values=False)
    hw = (int(arr.shape[0]), int(arr.shape[1]))
    area = check_min_area(min_area, hw)
    check_result_fits(len(names), hw)
    check_values(arr)
    if exemplar_list and coarse_to_fine:
        raise InvalidArgumentError("coarse_to_fine=True cannot be combined with exemplars; leave it None or False")
    from .. import fundus  # lazy: fundus imports emclip.inference lazily too, so no cycle

    # auto mode only for images the size of whole photographs (ROI crops and thumbnails skip it)
    big_enough = min(hw) >= fundus.AUTO_MIN_SIDE and max(hw) >= fundus.AUTO_MIN_LONG_SIDE
    if not exemplar_list and (coarse_to_fine or big_enough) and fundus.should_use_coarse_to_fine(modality, prompt_list, coarse_to_fine):
        return fundus.segment_fundus(
            image, prompt_list, model, modality=modality, threshold=threshold,
            channel_axis=channel_axis, device=device, tile_size=tile_size, min_area=min_area,
            batch_size=batch_size, whole_photograph=True if coarse_to_fine else None,
            progress=progress, cancel=cancel, mirror=mirror,
        )
    net, dev = resolve_model(model, device)
    plan = Plan(tile=auto_tile_size(hw, int(net.image_size), tile_size), batch_size=batch)
    steps = Steps(progress, 2 + plan_steps(plan, hw))
    check_cancel(cancel)
    window = image_intensity_range(arr)
    steps.advance()
    with inference_state(net, dev):
        keys = None
        if exemplar_list:
            keys = prompt_keys(net, prompt_list, names, exemplar_list, modality, mode, dev, model_dtype(net))
        use_mirror = model_mirrors(net, mirror)
        runner = Runner(net, dev, names, modality, prompt_keys=keys, mirror=use_mirror)
        check_cancel(cancel)
        probs, clusters, sims, used = run_2d(arr, window, runner, plan, steps, cancel)
        ran_on = str(runner.device)
    single = single_object_flags(net, names)
    summary = summarise(probs, t, area, single)
    steps.finish()
    info = {"tile_size": used.tile, "intensity_range": window, "modality": modality,
            "single_object": single_object_prompts(names, single), "mirror": use_mirror}
    if exemplar_list:
        info["exemplars"] = exemplar_info(exemplar_list, mode)
    return SegmentationResult(
        prompts=names,
        probabilities=probs,
        cluster_map=clusters,
        cluster_similarity=sims,
        threshold=t,
        min_area=area,
        tiled=used.tile is not None,
        device=ran_on,
        info=info,
        **summary,
    )
