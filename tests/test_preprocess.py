"""Preprocessing shared by training and inference (emclip.preprocess)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from emclip.errors import InvalidImageError
from emclip.preprocess import (
    MIN_SIDE,
    channels_last,
    check_image,
    intensity_range,
    letterbox,
    letterbox_geometry,
    percentiles_by_counting,
    robust_range,
    subsample,
    to_float_rgb,
    unletterbox,
)


def _ramp(h=40, w=60):
    return np.add.outer(np.arange(h), np.arange(w)).astype(np.float64)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64, bool])
def test_to_float_rgb_accepts_common_dtypes(dtype):
    base = _ramp()
    if dtype is bool:
        img = base > base.mean()
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        img = (info.min + base / base.max() * (int(info.max) - int(info.min))).astype(dtype)
    else:
        img = (base * 1e-3 - 0.02).astype(dtype)
    out = to_float_rgb(img)
    assert out.dtype == np.float32 and out.shape == (40, 60, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() > 0.9 and out.min() < 0.1, "the robust window must stretch to ~[0, 1]"
    np.testing.assert_array_equal(out[..., 0], out[..., 1])  # grey -> three equal channels
    # order is kept: a brighter input pixel is never darker after normalisation
    flat_in, flat_out = np.asarray(img, np.float64).ravel(), out[..., 0].ravel()
    order = np.argsort(flat_in, kind="stable")
    assert (np.diff(flat_out[order]) >= -1e-6).all()


def test_layouts_channel_first_last_rgba_and_explicit_axis():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    ref = to_float_rgb(rgb)
    np.testing.assert_allclose(to_float_rgb(np.moveaxis(rgb, -1, 0)), ref)  # guessed channel-first
    rgba = np.concatenate([rgb, rng.integers(0, 255, (32, 48, 1), dtype=np.uint8)], axis=-1)
    np.testing.assert_allclose(to_float_rgb(rgba), ref)  # alpha is dropped, not mixed in
    # explicit channel axis for an ambiguous array (3 rows would look like channels)
    odd = np.moveaxis(rgb, -1, 1)  # (32, 3, 48)
    np.testing.assert_allclose(to_float_rgb(odd, channel_axis=1), ref)
    one = rgb[..., :1]
    out = to_float_rgb(one)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert channels_last(np.zeros((3, 20, 20))).shape == (20, 20, 3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(50), "2D image"),
        (np.zeros((4, 20, 20, 3)), "segment_stack"),
        (np.zeros((MIN_SIDE - 1, 50)), "at least"),
        (np.zeros((20, 20, 2)), "channel"),
        (np.zeros((5, 20, 20)), "channel_axis"),
        (np.array([[1 + 1j] * 10] * 10), "dtype"),
        (np.zeros((0, 10)), "empty"),
    ],
)
def test_invalid_images_raise_helpful_errors(bad, match):
    with pytest.raises(InvalidImageError, match=match):
        to_float_rgb(bad)


def test_non_finite_and_non_array_inputs():
    img = _ramp().astype(np.float32)
    img[3, 4] = np.nan
    img[5, 6] = np.inf
    with pytest.raises(InvalidImageError, match="2 NaN or infinite"):
        to_float_rgb(img)
    with pytest.raises(InvalidImageError, match="numpy array"):
        to_float_rgb("image.png")


def test_robust_window_ignores_outliers_and_constant_images():
    img = _ramp(50, 50)
    img[0, 0] = 1e9  # one hot pixel must not squash everything else to ~0
    out = to_float_rgb(img)
    assert np.median(out) > 0.3
    np.testing.assert_array_equal(to_float_rgb(np.full((20, 20), 7, np.uint16)), 0.0)


def test_intensity_range_is_the_window_to_float_rgb_uses():
    rng = np.random.default_rng(1)
    img = rng.normal(100, 20, (64, 64, 4)).astype(np.float32)
    img[..., 3] = 1e6  # alpha must not enter the window
    window = intensity_range(img)
    assert window[1] < 1e3
    np.testing.assert_allclose(to_float_rgb(img, intensity_range=window), to_float_rgb(img))
    # a crop normalised with the whole image's window equals the crop of the whole
    crop = (slice(10, 40), slice(5, 50))
    np.testing.assert_allclose(
        to_float_rgb(img[crop], intensity_range=window), to_float_rgb(img)[crop], atol=1e-6
    )


def test_robust_range_is_memory_bounded_on_big_non_contiguous_arrays():
    big = np.zeros((3, 3000, 3000), np.uint16)  # 54 MB, channel-first
    big[:, 1500:, :] = 1000
    view = np.moveaxis(big, 0, -1)  # non-contiguous channel-last view
    tracemalloc.start()
    lo, hi = robust_range(view)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (lo, hi) == (0.0, 1000.0)
    assert peak < 20 * 2**20, f"robust_range allocated {peak / 2**20:.0f} MB for a 54 MB array"
    sample = subsample(view, 10_000)
    assert sample.size <= 10_000 and np.shares_memory(sample, big)
    assert subsample(np.zeros((10, 10))).shape == (10, 10)


def test_check_image_returns_a_view_and_validates():
    img = np.zeros((3, 30, 40), np.uint8)
    view = check_image(img)
    assert view.shape == (30, 40, 3) and np.shares_memory(view, img)
    with pytest.raises(InvalidImageError):
        check_image(np.zeros((30, 40, 5)))


@pytest.mark.parametrize("hw", [(100, 50), (50, 100), (64, 64), (1000, 9)])
def test_letterbox_geometry_and_padding(hw):
    size = 64
    img = np.ones(hw + (3,), np.float32)
    boxed, geo = letterbox(img, size)
    assert boxed.shape == (size, size, 3)
    assert max(geo.new_hw) == size
    assert geo == letterbox_geometry(hw, size)
    nh, nw = geo.new_hw
    inside = boxed[geo.top : geo.top + nh, geo.left : geo.left + nw]
    np.testing.assert_allclose(inside, 1.0, atol=1e-5)
    assert boxed.sum() == pytest.approx(inside.sum())  # padding is exactly 0
    # centred: padding split evenly (up to one pixel)
    assert abs(geo.top - (size - nh - geo.top)) <= 1 and abs(geo.left - (size - nw - geo.left)) <= 1


def test_letterbox_masks_keep_labels():
    mask = np.zeros((90, 60), np.uint8)
    mask[20:50, 10:40] = 2
    mask[60:80, 5:15] = 7
    boxed, _ = letterbox(mask, 32, is_mask=True)
    assert set(np.unique(boxed)) <= {0, 2, 7}
    boxed_bool, _ = letterbox(mask > 0, 32, is_mask=True)
    assert set(np.unique(boxed_bool)) <= {0, 1}


def test_unletterbox_maps_back_to_the_image_grid():
    h, w = 90, 150
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (np.sin(yy / 15.0) + np.cos(xx / 20.0)).astype(np.float32)
    boxed, geo = letterbox(smooth, 96)
    back = unletterbox(torch.from_numpy(boxed)[None, None], geo)[0, 0].numpy()
    assert back.shape == (h, w)
    assert np.abs(back - smooth).mean() < 0.05
    # several maps at once keep their leading axes
    many = unletterbox(torch.zeros(2, 3, 96, 96), geo)
    assert tuple(many.shape) == (2, 3, h, w)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.bool_])
def test_counted_percentiles_equal_numpy_to_the_last_bit(dtype):
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 1001, 50_000):
        if dtype is np.bool_:
            arrays = [rng.random(n) > 0.7]
        else:
            info = np.iinfo(dtype)
            arrays = [rng.integers(info.min, info.max, n, endpoint=True).astype(dtype),
                      np.clip(rng.exponential(20, n) + info.min, info.min, info.max).astype(dtype),
                      np.full(n, 5, dtype)]
        for a in arrays:
            for ps in ((0.5, 99.5), (0, 100), (50, 50), (33.3, 66.7)):
                expected = [float(v) for v in np.percentile(a.astype(np.float64), ps)]
                assert percentiles_by_counting(a, ps) == expected, (dtype, n, ps)


def test_counting_is_only_for_small_integer_types_and_robust_range_agrees_either_way():
    img = np.random.default_rng(4).integers(0, 256, (64, 48, 3)).astype(np.uint8)
    assert percentiles_by_counting(img.astype(np.float32), (1, 99)) is None
    assert percentiles_by_counting(img.astype(np.int32), (1, 99)) is None
    assert robust_range(img) == robust_range(img.astype(np.float32))  # counted vs sorted
