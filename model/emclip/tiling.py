"""Overlapping tiles for images too large to segment in one network pass.

A big image is cut into a regular grid of ``tile_size`` squares that overlap by at least
``overlap`` pixels (starts are spread evenly, so no tile hangs over the border and the last one is
not squeezed against the edge). Each tile is segmented on its own and the per-tile probabilities
are blended with smooth weights: inside an overlap the weight of one tile falls as a raised cosine
while its neighbour's rises, and the weights of all tiles sum to exactly 1 at every pixel (a
partition of unity), so blending is a plain weighted sum with no normalising pass over the image.

The weights are separable (``w(y, x) = wy(y) * wx(x)``) and normalised per axis, which is what
makes the 2D sum equal to 1 without a full-size weight accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``y0:y1`` and columns ``x0:x1`` of the image; ``row``/``col`` in the grid."""

    y0: int
    y1: int
    x0: int
    x1: int
    row: int
    col: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices to cut this tile out of an ``(H, W, ...)`` array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with >= ``overlap`` overlap.

    Uses the fewest tiles that keep the overlap, spread evenly so the first starts at 0 and the
    last ends at ``length``. When ``length <= tile`` there is one tile, ``[0]`` (it is clipped to
    ``length``). Raises ``ValueError`` unless ``0 <= overlap < tile``.
    """
    if tile < 1:
        raise ValueError(f"tile size must be at least 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile size) = [0, {tile}), got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    span = length - tile
    return [round(i * span / (n - 1)) for i in range(n)]


def _ramp(n: int) -> np.ndarray:
    """Raised-cosine ramp of ``n`` values rising from ~0 to ~1; ``r[i] + r[n-1-i] == 1``."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return 0.5 - 0.5 * np.cos(np.pi * t)


def axis_weights(length: int, starts: Sequence[int], tile: int) -> list[np.ndarray]:
    """Blending weights along one axis: one 1D array per tile, summing to 1 at every position.

    Each tile's weight is 1 in its middle and ramps (raised cosine) across the stretch it shares
    with the previous and the next tile; at the image border there is no ramp. The result is
    normalised by the per-position sum, so it is a partition of unity even when more than two
    tiles overlap.
    """
    ends = [min(s + tile, length) for s in starts]
    weights: list[np.ndarray] = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        w = np.ones(e - s, dtype=np.float64)
        if i > 0:
            shared = max(0, ends[i - 1] - s)
            if shared:
                w[:shared] *= _ramp(shared)
        if i < len(starts) - 1:
            shared = max(0, e - starts[i + 1])
            if shared:
                w[e - s - shared :] *= _ramp(shared)[::-1]
        weights.append(w)
    total = np.zeros(length, dtype=np.float64)
    for s, e, w in zip(starts, ends, weights):
        total[s:e] += w
    return [(w / total[s:e]).astype(np.float32) for s, e, w in zip(starts, ends, weights)]


@dataclass(frozen=True)
class TileGrid:
    """A grid of overlapping tiles over an ``(H, W)`` image, with its blending weights."""

    shape: tuple[int, int]
    tile_size: int
    overlap: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    row_weights: tuple[np.ndarray, ...]
    col_weights: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[Tile]:
        h, w = self.shape
        for r, y0 in enumerate(self.row_starts):
            for c, x0 in enumerate(self.col_starts):
                yield Tile(y0, min(y0 + self.tile_size, h), x0, min(x0 + self.tile_size, w), r, c)

    def weights(self, tile: Tile) -> np.ndarray:
        """``(h, w)`` float32 blending weights of ``tile``; over all tiles they sum to 1."""
        return np.outer(self.row_weights[tile.row], self.col_weights[tile.col])


def tile_grid(shape: tuple[int, int], tile_size: int, overlap: int | None = None) -> TileGrid:
    """Cover an image of ``shape`` ``(H, W)`` with ``tile_size`` squares.

    ``overlap`` defaults to ``tile_size // 8`` (at least 1 pixel when the tile is larger than 1).
    """
    if overlap is None:
        overlap = max(1, tile_size // 8) if tile_size > 1 else 0
    h, w = int(shape[0]), int(shape[1])
    rows = tile_starts(h, tile_size, overlap)
    cols = tile_starts(w, tile_size, overlap)
    return TileGrid(
        shape=(h, w),
        tile_size=int(tile_size),
        overlap=int(overlap),
        row_starts=tuple(rows),
        col_starts=tuple(cols),
        row_weights=tuple(axis_weights(h, rows, tile_size)),
        col_weights=tuple(axis_weights(w, cols, tile_size)),
    )


def batched(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive chunks of ``items`` of at most ``size`` elements."""
    size = max(1, int(size))
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i : i + size]
