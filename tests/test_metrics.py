"""Dice / HD95 / ASD against hand-computed cases and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from emclip.metrics import asd, compute_metrics, dice, hd95, summarise, surface, surface_distances


def square(shape=(40, 40), top=10, left=10, side=10) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


def test_identical_masks():
    a = square()
    assert dice(a, a) == 1.0
    assert hd95(a, a) == 0.0
    assert asd(a, a) == 0.0


def test_disjoint_masks_dice_zero_and_distance_is_gap():
    a = square(left=0, side=5)            # columns 0..4
    b = square(left=15, side=5)           # columns 15..19, same rows
    assert dice(a, b) == 0.0
    # every directed 95th percentile is reached by the facing edges: nearest surfaces 11 columns apart
    d_ab, _ = surface_distances(a, b)
    assert d_ab.min() == pytest.approx(11.0)
    assert hd95(a, b) >= 11.0


def test_empty_conventions():
    empty = np.zeros((20, 20), bool)
    a = square((20, 20), 2, 2, 5)
    assert compute_metrics(empty, empty) == {"dice": 1.0, "hd95": 0.0, "asd": 0.0}
    one = compute_metrics(a, empty)
    assert one["dice"] == 0.0 and math.isnan(one["hd95"]) and math.isnan(one["asd"])
    other = compute_metrics(empty, a)
    assert other["dice"] == 0.0 and math.isnan(other["hd95"])


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shifted_square_hd95_equals_shift(k):
    # Square of side 10 shifted by k columns: every point of the trailing edge is exactly k away
    # from the other square's surface and no point is farther, and that edge holds > 5 % of the
    # surface points, so both directed 95th percentiles are k.
    a = square(side=10)
    b = square(side=10, left=10 + k)
    assert hd95(a, b) == pytest.approx(float(k))
    assert dice(a, b) == pytest.approx(2 * 10 * (10 - k) / 200)


def test_one_pixel_shift_asd_is_one_half():
    # Hand count for side s: of the 4s-4 surface pixels, s (leading edge) + s-2 (trailing edge
    # without corners) are at distance 1, the rest at 0 -> (2s-2)/(4s-4) = 0.5 in each direction.
    for s in (5, 10, 17):
        a = square(side=s)
        b = square(side=s, left=11)
        assert asd(a, b) == pytest.approx(0.5)


def test_spacing_scales_distances():
    a = square(side=10)
    b = square(side=10, left=13)  # shift 3 columns
    assert hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)
    assert hd95(a, b, spacing=2.0) == pytest.approx(6.0)
    b_rows = square(side=10, top=13)  # shift 3 rows
    assert hd95(a, b_rows, spacing=(0.5, 1.0)) == pytest.approx(1.5)


def test_surface_of_thin_object_is_all_of_it():
    m = np.zeros((9, 9), bool)
    m[4, 1:8] = True
    assert np.array_equal(surface(m), m)
    filled = square((9, 9), 1, 1, 7)
    s = surface(filled)
    assert s.sum() == 4 * 7 - 4 and not s[4, 4]


def _brute_force(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    pa = np.argwhere(surface(a)).astype(float)
    pb = np.argwhere(surface(b)).astype(float)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    dab, dba = d.min(1), d.min(0)
    return max(np.percentile(dab, 95), np.percentile(dba, 95)), (dab.sum() + dba.sum()) / (dab.size + dba.size)


def test_matches_brute_force_on_random_blobs():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(5):
        a = ndimage.binary_opening(rng.random((48, 48)) > 0.45, iterations=2)
        b = ndimage.binary_opening(rng.random((48, 48)) > 0.45, iterations=2)
        if not a.any() or not b.any():
            continue
        ref_hd, ref_asd = _brute_force(a, b)
        got = compute_metrics(a, b)
        assert got["hd95"] == pytest.approx(ref_hd)
        assert got["asd"] == pytest.approx(ref_asd)


def test_3d_masks():
    a = np.zeros((10, 20, 20), bool)
    a[3:7, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)


def test_shape_mismatch_and_bad_spacing_raise():
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(square(), square(left=12), spacing=(1.0,))


def test_summarise_excludes_nan_and_counts_it():
    rows = [
        {"dice": 1.0, "hd95": 2.0, "asd": 1.0},
        {"dice": 0.5, "hd95": 4.0, "asd": 3.0},
        {"dice": 0.0, "hd95": math.nan, "asd": math.nan},
    ]
    s = summarise(rows)
    assert s["dice"] == pytest.approx(0.5)
    assert s["dice_std"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    assert s["hd95"] == pytest.approx(3.0) and s["hd95_std"] == pytest.approx(1.0)
    assert s["asd"] == pytest.approx(2.0)
    assert s["n_images"] == 3 and s["n_undefined"] == 1
