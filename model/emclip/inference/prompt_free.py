"""Prompt-free segmentation: ``segment(image)`` / ``segment_stack(volume, None)`` without prompts.

The modality is the one given (``modality=...``) or recognised from the image by the model's
modality head (:mod:`emclip.modality`; for a stack, from a few central slices). Every structure
the model was trained on for that modality (``config.known_structures``) is segmented, and
only the structures *found* (at least ``min_area`` pixels above the threshold) are returned.
``result.info`` records ``modality`` (its key), ``modality_source`` ("given"/"recognised"),
``modality_confidence`` and ``modality_probabilities`` (recognised only), ``structures_tried``
and ``structures_not_found``.

Refusals (all :class:`emclip.InvalidArgumentError`, a ValueError, raised before segmenting):
the model records no known structures; no modality given and the model has no modality head;
the recognition confidence is below the head's ``min_confidence``; or the modality (given or
recognised) is one the model knows no structures for (e.g. a brain MRI for the default model).
An error, not an empty result, so a wrong call is never mistaken for "nothing there".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..callbacks import check_cancel
from ..errors import InvalidArgumentError
from ..modality import (
    display_name,
    known_structures,
    modality_key,
    recognise_modality,
    structures_for,
)
from ..preprocess import check_image
from .model_loading import resolve_model
from .options import check_batch_size, check_min_area, check_modality, check_threshold
from .result import SegmentationResult
from .runner import inference_state

STACK_RECOGNITION_SLICES = 5
"""Slices (evenly spaced over the central 60 % of the stack) used to recognise its modality."""


def _known_text(known: dict[str, list[str]]) -> str:
    return "; ".join(f"{display_name(k)}: {', '.join(v)}" for k, v in known.items())


def choose_structures(
    net: Any,
    images: list[np.ndarray],
    modality: str | None,
    channel_axis: int | None,
) -> tuple[list[str], str, dict[str, Any]]:
    """The structures to try, the modality text to segment with and the info entries.

    ``images``: the image, or a few slices of a stack (channel-last views). Raises
    :class:`InvalidArgumentError` (see the module docstring) when it cannot decide.
    """
    known = known_structures(net)
    if not known:
        raise InvalidArgumentError(
            "this model records no known structures (config 'known_structures' is empty: it was trained before "
            "prompt-free mode existed, or on data without a modality), so it cannot segment without prompts; "
            "name the structures, e.g. prompts='optic disc, optic cup'"
        )
    info: dict[str, Any] = {"prompt_free": True}
    if modality is not None:
        key = modality_key(modality)
        info.update(modality_source="given", modality_confidence=None, modality_probabilities=None)
        text = modality
    else:
        if getattr(net, "modality_head", None) is None:
            raise InvalidArgumentError(
                "this model cannot recognise the modality (it has no modality head): pass modality=... "
                f"(one of: {', '.join(display_name(k) for k in known)}) or name the prompts"
            )
        rec = recognise_modality(images, net, channel_axis=channel_axis)
        if rec.modality is None:
            raise InvalidArgumentError(
                f"the modality of this image could not be recognised: the best guess, {display_name(rec.best)}, "
                f"has confidence {rec.confidence:.2f} < {rec.min_confidence:.2f}; pass modality=... "
                f"(one of: {', '.join(display_name(k) for k in known)}) or name the prompts"
            )
        key = text = rec.modality
        info.update(modality_source="recognised", modality_confidence=rec.confidence,
                    modality_probabilities=rec.probabilities)
    structures = structures_for(net, key)
    if not structures:
        how = "was given" if modality is not None else f"was recognised (confidence {info['modality_confidence']:.2f})"
        raise InvalidArgumentError(
            f"the modality {display_name(key)} {how}, but this model knows no structures for {display_name(key)}; "
            f"it knows {_known_text(known)}. Name the prompts to try anyway, pass another modality=, "
            "or use a model trained on this modality"
        )
    info.update(modality=key, structures_tried=structures)
    return structures, text, info


def keep_found(result: SegmentationResult, info: dict[str, Any]) -> SegmentationResult:
    """``result`` restricted to the prompts that were found, with ``info`` merged into its info."""
    idx = np.flatnonzero(result.found)
    names = [result.prompts[i] for i in idx]
    return dataclasses.replace(
        result,
        prompts=names,
        masks=result.masks[idx],
        probabilities=result.probabilities[idx],
        found=result.found[idx],
        scores=result.scores[idx],
        max_probability=result.max_probability[idx],
        areas=result.areas[idx],
        cluster_similarity=result.cluster_similarity[:, idx],
        slice_found=None if result.slice_found is None else result.slice_found[:, idx],
        info={**result.info, **info,
              "structures_not_found": [p for p, f in zip(result.prompts, result.found) if not f]},
    )


def segment_everything(image: np.ndarray, model: Any = None, *, modality: str | None = None,
                       threshold: float = 0.5, channel_axis: int | None = None, device: Any = None,
                       tile_size: int | None = None, min_area: int | None = None, batch_size: int = 4,
                       progress: Any = None, cancel: Any = None,
                       coarse_to_fine: bool | None = None, mirror: bool | None = None) -> SegmentationResult:
    """:func:`emclip.segment` with ``prompts=None`` (see the module docstring)."""
    from .single_image import segment

    check_threshold(threshold)
    check_batch_size(batch_size)
    modality = check_modality(modality)
    arr = check_image(image, channel_axis)
    check_min_area(min_area, (int(arr.shape[0]), int(arr.shape[1])))
    net, dev = resolve_model(model, device)
    check_cancel(cancel)
    with inference_state(net, dev):
        structures, text, info = choose_structures(net, [arr], modality, None)
    result = segment(image, structures, net, modality=text, threshold=threshold, channel_axis=channel_axis,
                     device=dev, tile_size=tile_size, min_area=min_area, batch_size=batch_size,
                     progress=progress, cancel=cancel, coarse_to_fine=coarse_to_fine, mirror=mirror)
    return keep_found(result, info)


def recognition_slices(view: np.ndarray, count: int = STACK_RECOGNITION_SLICES) -> list[int]:
    """Indices of up to ``count`` slices evenly spaced over the central 60 % of ``view`` (Z first),
    skipping constant slices (empty space outside the body) when others exist."""
    z = int(view.shape[0])
    lo, hi = int(0.2 * z), max(int(0.2 * z) + 1, int(np.ceil(0.8 * z)))
    candidates = sorted(set(np.linspace(lo, min(hi, z) - 1, num=min(count, z)).round().astype(int).tolist()))
    varied = [i for i in candidates if np.ptp(np.asarray(view[i])) > 0]
    return varied or candidates


def segment_stack_everything(volume: np.ndarray, model: Any = None, *, axis: int = 0,
                             modality: str | None = None, threshold: float = 0.5,
                             channel_axis: int | None = None, device: Any = None,
                             tile_size: int | None = None, min_area: int | None = None,
                             batch_size: int = 4, progress: Any = None, cancel: Any = None,
                             mirror: bool | None = None) -> SegmentationResult:
    """:func:`emclip.segment_stack` with ``prompts=None``; the modality is recognised from
    :data:`STACK_RECOGNITION_SLICES` central slices (class probabilities averaged)."""
    from .stacks import _stack_view, segment_stack

    check_threshold(threshold)
    check_batch_size(batch_size)
    modality = check_modality(modality)
    view, _ = _stack_view(volume, axis, channel_axis)
    cax = -1 if view.ndim == 4 else None
    if view.shape[0] == 0:
        from ..errors import InvalidImageError

        raise InvalidImageError("the stack has no slices")
    first = check_image(view[0], cax, values=False)
    check_min_area(min_area, (int(first.shape[0]), int(first.shape[1])))
    net, dev = resolve_model(model, device)
    check_cancel(cancel)
    picked = recognition_slices(view) if modality is None else []
    slices = [check_image(view[i], cax) for i in picked]
    with inference_state(net, dev):
        structures, text, info = choose_structures(net, slices, modality, None)
    info["recognition_slices"] = picked or None
    result = segment_stack(volume, structures, net, axis=axis, modality=text, threshold=threshold,
                           channel_axis=channel_axis, device=dev, tile_size=tile_size, min_area=min_area,
                           batch_size=batch_size, progress=progress, cancel=cancel, mirror=mirror)
    return keep_found(result, info)
