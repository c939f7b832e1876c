"""Out-of-memory handling: what a run is planned as (:class:`Plan`) and the lighter plan to
retry with when the device runs out of memory (:func:`next_plan`)."""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from .. import memory
from ..errors import InsufficientMemoryError
from ..tiling import tile_grid
from .options import MIN_TILE
from .runner import Runner


class OutOfMemoryFallbackWarning(UserWarning):
    """Inference ran out of memory and is retried in a lighter way (tiled, smaller batch, CPU)."""


@dataclass(frozen=True)
class Plan:
    """How to run: tile side (None = whole image), tiles or slices per batch, 3D or not."""

    tile: Optional[int]
    batch_size: int
    stack: bool = False


def result_bytes(n_prompts: int, spatial: tuple[int, ...]) -> int:
    """Bytes the arrays of a :class:`SegmentationResult` take: float32 probabilities and bool
    masks per prompt, an int32 cluster map, plus one float32 plane of working space."""
    n = int(np.prod(spatial, dtype=np.float64))
    return int(n * (5 * n_prompts + 8))


def check_result_fits(n_prompts: int, spatial: tuple[int, ...]) -> None:
    """Refuse (:class:`~emclip.errors.InsufficientMemoryError`) a run whose results cannot fit in the free memory.

    Tiles bound the memory of the network passes, but the full-size results cannot shrink, so
    this is checked before anything runs instead of failing (or being killed) half way. Skipped
    when the free memory is unknown.
    """
    free = memory.available_memory()
    need = result_bytes(n_prompts, spatial)
    if free is not None and need > free:
        shape = "x".join(str(int(s)) for s in spatial)
        raise InsufficientMemoryError(
            f"segmenting {n_prompts} prompt(s) in an image of {shape} pixels needs about "
            f"{memory.format_bytes(need)} of memory for the results, but only "
            f"{memory.format_bytes(free)} is free; "
            "segment a crop of the image, or fewer prompts at a time"
        )


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device (or the host) ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        torch.cuda, "OutOfMemoryError", None
    )
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text
    )


def free_memory(device: torch.device) -> None:
    """Release what a failed attempt held. On the CPU, reference counting already freed it (a
    full ``gc.collect()`` costs ~0.5 s with torch loaded); accelerators also drop their caches."""
    if device.type == "cpu":
        return
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def plan_steps(plan: Plan, hw: tuple[int, int]) -> int:
    """Progress steps of one 2D image run with ``plan``."""
    if plan.tile is None:
        return 2
    n = len(tile_grid(hw, plan.tile))
    return 1 + math.ceil(n / plan.batch_size)


def next_plan(plan: Plan, runner: Runner, exc: BaseException) -> Plan:
    """The lighter plan to retry with after running out of memory, or raise ``exc``.

    Order: a whole 2D image goes tiled; then batches shrink to one tile/slice; then untiled
    slices go tiled; then a GPU gives way to the CPU. On the CPU with nothing lighter left,
    ``exc`` is raised.
    """
    where = f"out of memory on {runner.device} ({_short(exc)}); "
    if plan.tile is None and not plan.stack:
        tile = max(MIN_TILE, 2 * runner.size)
        warnings.warn(
            where + f"retrying with {tile}-pixel tiles", OutOfMemoryFallbackWarning, stacklevel=4
        )
        return replace(plan, tile=tile)
    if plan.batch_size > 1:
        warnings.warn(
            where + "retrying one tile/slice at a time", OutOfMemoryFallbackWarning, stacklevel=4
        )
        return replace(plan, batch_size=1)
    if plan.tile is None:
        tile = max(MIN_TILE, 2 * runner.size)
        warnings.warn(
            where + f"retrying with {tile}-pixel tiles", OutOfMemoryFallbackWarning, stacklevel=4
        )
        return replace(plan, tile=tile)
    if runner.device.type != "cpu":
        warnings.warn(
            where + "retrying on the CPU (slower)", OutOfMemoryFallbackWarning, stacklevel=4
        )
        runner.set_device(torch.device("cpu"))
        return plan
    raise exc


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
