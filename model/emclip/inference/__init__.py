"""Segmentation with a model: :func:`load_model`, :func:`segment`, :func:`segment_stack`.

The napari widget, the CLI and the evaluation code all call these. Images go through exactly the
preprocessing used in training (:mod:`emclip.preprocess`: robust intensity window -> float RGB ->
letterbox -> ``(x - pixel_mean) / pixel_std``); all prompts run in one forward pass.

Modules: :mod:`.model_loading` (load_model and its cache), :mod:`.single_image` (segment),
:mod:`.stacks` (segment_stack), :mod:`.result` (SegmentationResult), :mod:`.options` (argument
checks, tiling rule), :mod:`.runner` (network passes, outputs back on the image grid),
:mod:`.out_of_memory` (retry plans).

Large images (tiling rule)
    An image is cut into overlapping tiles (:mod:`emclip.tiling`) when ``tile_size`` is given,
    or automatically when letterboxing would shrink it more than :data:`AUTO_TILE_FACTOR` (8x,
    i.e. its long side exceeds ``8 * model.image_size``: structures a few pixels wide would
    vanish) or when it has more than :data:`AUTO_TILE_PIXELS` (64 Mpx: keeps memory bounded).
    Automatic tiles are ``TILE_FACTOR * model.image_size`` (4x) pixels wide and overlap by an
    eighth. The intensity window is computed once on a subsample of the whole image, tiles are
    converted one batch at a time (no full-size float copy), their probabilities blended with
    smooth weights, and the EM cluster map comes from one low-resolution pass over the whole
    image. ``tile_size=0`` disables tiling.

Out of memory
    If the device runs out of memory, the call retries tiled, then with one tile (or slice) per
    batch, then (from a GPU) on the CPU, each time with an :class:`OutOfMemoryFallbackWarning`;
    it only fails if nothing lighter is left on the CPU.
"""

from __future__ import annotations

from .model_loading import (
    DEFAULT_MODEL_DIR,
    MODEL_CACHE_SIZE,
    UntrainedModelWarning,
    clear_model_cache,
    load_model,
)
from .options import (
    AUTO_TILE_FACTOR,
    AUTO_TILE_PIXELS,
    MIN_AREA_FRACTION,
    MIN_AREA_PIXELS,
    MIN_TILE,
    TILE_FACTOR,
    auto_tile_size,
)
from .out_of_memory import OutOfMemoryFallbackWarning
from .result import SegmentationResult
from .single_image import segment
from .stacks import segment_stack

__all__ = [
    "AUTO_TILE_FACTOR",
    "AUTO_TILE_PIXELS",
    "DEFAULT_MODEL_DIR",
    "MIN_AREA_FRACTION",
    "MIN_AREA_PIXELS",
    "MIN_TILE",
    "MODEL_CACHE_SIZE",
    "TILE_FACTOR",
    "OutOfMemoryFallbackWarning",
    "SegmentationResult",
    "UntrainedModelWarning",
    "auto_tile_size",
    "clear_model_cache",
    "load_model",
    "segment",
    "segment_stack",
]
