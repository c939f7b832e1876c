"""Checks of :func:`segment`'s keyword options, the default ``min_area`` and the tiling rule."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import InvalidArgumentError

AUTO_TILE_FACTOR = 8
"""Tile automatically when the long side exceeds this many network input sides."""

AUTO_TILE_PIXELS = 64 * 2**20
"""Tile automatically above this many pixels (memory bound)."""

TILE_FACTOR = 4
"""Automatic tile side = ``TILE_FACTOR * model.image_size``."""

MIN_TILE = 32
"""Smallest accepted ``tile_size``."""

MIN_AREA_FRACTION = 1e-4
MIN_AREA_PIXELS = 4
"""Default ``min_area``: ``max(MIN_AREA_PIXELS, ceil(MIN_AREA_FRACTION * H * W))`` pixels."""


def check_modality(modality: Optional[str]) -> Optional[str]:
    """``modality`` unchanged if it is None or text, else :class:`InvalidArgumentError`."""
    if modality is None or isinstance(modality, str):
        return modality
    raise InvalidArgumentError(
        f"modality must be text such as 'fundus' or 'cardiac MRI' (or None), got {type(modality).__name__}"
    )


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float strictly between 0 and 1, else :class:`InvalidArgumentError`."""
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"threshold must be a number in (0, 1), got {threshold!r}"
        ) from exc
    if not 0.0 < t < 1.0:
        raise InvalidArgumentError(
            f"threshold must be between 0 and 1 (exclusive), got {threshold!r}; 0.5 is usual"
        )
    return t


def check_min_area(min_area: Optional[int], hw: tuple[int, int]) -> int:
    """``min_area`` in pixels; None gives the default for an image of ``hw`` pixels."""
    if min_area is None:
        return max(MIN_AREA_PIXELS, math.ceil(MIN_AREA_FRACTION * hw[0] * hw[1]))
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise InvalidArgumentError(
            f"min_area must be a whole number of pixels >= 0 (or None for auto), got {min_area!r}"
        )
    return int(min_area)


def check_mirror(mirror: Optional[bool]) -> Optional[bool]:
    """``mirror`` as given if it is None (the model's default) or a bool, else :class:`InvalidArgumentError`."""
    if mirror is None:
        return None
    if isinstance(mirror, (bool, np.bool_)):
        return bool(mirror)
    raise InvalidArgumentError(
        f"mirror must be True, False or None (the model's default), got {mirror!r}"
    )


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int >= 1, else :class:`InvalidArgumentError`."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise InvalidArgumentError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    return int(batch_size)


def auto_tile_size(
    hw: tuple[int, int], image_size: int, tile_size: Optional[int] = None
) -> Optional[int]:
    """The tile side :func:`segment` uses for an image of ``hw`` pixels, or None for no tiling.

    ``tile_size`` None applies the automatic rule (see :mod:`emclip.inference`); 0 means never
    tile; any other value (>= :data:`MIN_TILE`) is used as given.
    """
    if tile_size is not None:
        if (
            isinstance(tile_size, bool)
            or not isinstance(tile_size, (int, np.integer))
            or tile_size < 0
        ):
            raise InvalidArgumentError(
                f"tile_size must be a whole number of pixels (0 = no tiling), got {tile_size!r}"
            )
        if tile_size == 0:
            return None
        if tile_size < MIN_TILE:
            raise InvalidArgumentError(
                f"tile_size must be at least {MIN_TILE} pixels, got {tile_size}"
            )
        return int(tile_size)
    h, w = hw
    if max(h, w) > AUTO_TILE_FACTOR * image_size or h * w > AUTO_TILE_PIXELS:
        return TILE_FACTOR * image_size
    return None
