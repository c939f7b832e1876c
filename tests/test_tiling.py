"""Tile grids and blending weights (emclip.tiling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emclip.tiling import axis_weights, batched, tile_grid, tile_starts


@pytest.mark.parametrize(
    "length, tile, overlap",
    [(100, 40, 10), (100, 60, 30), (1000, 256, 32), (257, 256, 32), (512, 128, 0), (50, 50, 5)],
)
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + tile == length
    assert starts == sorted(starts)
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap, "neighbouring tiles must overlap by at least `overlap`"
        assert b > a
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    # the fewest tiles: one tile less could not cover the length with that overlap
    n = len(starts)
    if n > 1:
        assert (n - 2) * (tile - overlap) + tile < length


def test_tile_starts_short_axis_and_errors():
    assert tile_starts(30, 64, 8) == [0]
    assert tile_starts(64, 64, 8) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, -1)
    with pytest.raises(ValueError, match="tile size"):
        tile_starts(100, 0, 0)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 700), tile=st.integers(2, 200), frac=st.floats(0, 0.9))
def test_axis_weights_are_a_partition_of_unity(length, tile, frac):
    overlap = min(tile - 1, int(frac * tile))
    starts = tile_starts(length, tile, overlap)
    weights = axis_weights(length, starts, tile)
    total = np.zeros(length)
    for s, w in zip(starts, weights):
        assert w.dtype == np.float32
        assert w.shape == (min(s + tile, length) - s,)
        assert (w > 0).all() and (w <= 1 + 1e-6).all()
        total[s : s + len(w)] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_axis_weights_are_smooth_and_one_in_the_middle():
    length, tile, overlap = 300, 100, 40
    starts = tile_starts(length, tile, overlap)
    weights = axis_weights(length, starts, tile)
    first = weights[0]
    # no ramp at the image border, full weight until the overlap begins
    assert first[0] == pytest.approx(1.0)
    shared = starts[0] + tile - starts[1]
    np.testing.assert_allclose(first[: tile - shared], 1.0)
    # raised cosine: no jumps larger than the slope of a linear ramp would give (times pi/2)
    assert np.abs(np.diff(first)).max() <= (np.pi / 2) / shared + 1e-6
    assert first[-1] < 0.05


def test_grid_blending_reconstructs_the_image_exactly():
    rng = np.random.default_rng(0)
    image = rng.random((203, 150)).astype(np.float32)
    grid = tile_grid(image.shape, 64, 16)
    out = np.zeros_like(image)
    weight_sum = np.zeros_like(image)
    tiles = list(grid)
    assert len(tiles) == len(grid) == len(grid.row_starts) * len(grid.col_starts)
    for tile in tiles:
        w = grid.weights(tile)
        assert w.shape == tile.shape == image[tile.slices].shape
        assert tile.shape[0] <= 64 and tile.shape[1] <= 64
        out[tile.slices] += image[tile.slices] * w
        weight_sum[tile.slices] += w
    np.testing.assert_allclose(weight_sum, 1.0, atol=1e-5)
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_grid_default_overlap_and_small_image():
    grid = tile_grid((40, 30), 64)
    assert grid.overlap == 8
    tiles = list(grid)
    assert len(tiles) == 1
    assert tiles[0].shape == (40, 30)
    np.testing.assert_allclose(grid.weights(tiles[0]), 1.0)


def test_batched():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    assert list(batched([1, 2], 0)) == [[1], [2]]
