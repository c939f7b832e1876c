"""Random intensity remapping (GIN/IPA-style training augmentation)."""

from __future__ import annotations

import numpy as np
import pytest

from emclip.data.augment import AugmentConfig
from emclip.data.intensity_remap import random_intensity_remap
from emclip.errors import ConfigError


def _two_regions(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    image = np.where(inside[..., None], np.array([0.8, 0.6, 0.4]), np.array([0.1, 0.2, 0.1])).astype(np.float32)
    return image, inside


def _interior(mask: np.ndarray, margin: int) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    core = binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=margin)
    core[:margin] = core[-margin:] = False
    core[:, :margin] = core[:, -margin:] = False
    return core


def test_seeded_range_and_changed():
    image, _ = _two_regions()
    a = random_intensity_remap(image, np.random.default_rng(3))
    b = random_intensity_remap(image, np.random.default_rng(3))
    c = random_intensity_remap(image, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == image.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.allclose(a, image, atol=0.05)


def test_global_remap_is_spatially_invariant_and_local():
    """Without IPA the mapping is one convolutional function: constant regions stay constant
    beyond the receptive field (4 layers of at most 3x3 -> 4 px)."""
    image, inside = _two_regions()
    for seed in range(8):
        out = random_intensity_remap(image, np.random.default_rng(seed), ipa_p=0.0)
        for region in (inside, ~inside):
            core = _interior(region, 5)
            assert out[core].std(axis=0).max() < 1e-4, seed


def test_ipa_varies_the_mapping_across_the_image():
    image, inside = _two_regions()
    core = _interior(~inside, 5)
    spreads = [random_intensity_remap(image, np.random.default_rng(s), ipa_p=1.0)[core].std(axis=0).max()
               for s in range(8)]
    assert max(spreads) > 0.02


def test_borders_draw_no_false_edge():
    """A flat image stays flat up to its borders (replicate padding, not zeros)."""
    flat = np.full((16, 16, 3), 0.5, np.float32)
    for seed in range(4):
        out = random_intensity_remap(flat, np.random.default_rng(seed), ipa_p=0.0)
        assert out.reshape(-1, 3).std(axis=0).max() < 1e-4, seed


def test_bad_shape_and_probability_refused():
    with pytest.raises(ValueError, match="H, W, C"):
        random_intensity_remap(np.zeros((8, 8), np.float32), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="remap_p"):
        AugmentConfig(remap_p=1.5)
