"""Random per-structure contrast (SynthSeg-style training augmentation)."""

from __future__ import annotations

import numpy as np
import pytest
from emclip.data.augment import AugmentConfig
from emclip.data.folder import FolderDataset
from emclip.data.label_contrast import random_label_contrast
from emclip.data.training import PromptedDataset, Source
from emclip.errors import ConfigError
from emclip.train.config import from_mapping
from test_data import CARDIAC_YAML, make_dataset


def _flat_with_two_labels(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A flat grey image: the two labelled discs cannot be seen in it at all."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint8)
    labels[(yy - 14) ** 2 + (xx - 14) ** 2 < 64] = 1
    labels[(yy - 34) ** 2 + (xx - 34) ** 2 < 64] = 3
    return np.full((size, size, 3), 0.5, np.float32), labels


def _core(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=4)


def test_each_label_gets_its_own_contrast():
    image, labels = _flat_with_two_labels()
    means = []
    for seed in range(6):
        out = random_label_contrast(image, labels, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        cores = [_core(labels == v) for v in (0, 1, 3)]
        for core in cores:  # flat inside a structure, away from the blurred boundary
            assert out[core].std() < 1e-3, seed
        means.append([float(out[c].mean()) for c in cores])
    # structures that looked the same now differ, and which one is brighter changes between draws
    assert min(max(m) - min(m) for m in means) > 0.02
    assert {m[1] > m[2] for m in means} == {True, False}


def test_seeded_and_channels_moved_together():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3)).astype(np.float32)
    labels = (rng.random((32, 32)) > 0.7).astype(np.uint8)
    a = random_label_contrast(image, labels, np.random.default_rng(5))
    b = random_label_contrast(image, labels, np.random.default_rng(5))
    c = random_label_contrast(image, labels, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    grey = np.repeat(image[..., :1], 3, axis=2)
    out = random_label_contrast(grey, labels, np.random.default_rng(5))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_shape_mismatch_refused():
    with pytest.raises(ValueError, match="label map"):
        random_label_contrast(np.zeros((8, 8, 3), np.float32), np.zeros((8, 9), np.uint8), np.random.default_rng(0))


def test_config_validation_and_yaml_list():
    with pytest.raises(ConfigError, match="label_contrast_p"):
        AugmentConfig(label_contrast_p=2.0)
    with pytest.raises(ConfigError, match="cardiac_mri"):
        AugmentConfig(label_contrast_p=0.5, label_contrast_modalities=("heart",))
    cfg = from_mapping(AugmentConfig, {"label_contrast_p": 0.5, "label_contrast_modalities": ["cardiac_mri", "fundus"]})
    assert cfg.label_contrast_modalities == ("cardiac_mri", "fundus")
    assert cfg.label_contrast_applies("fundus") and not cfg.label_contrast_applies("brain_mri")
    assert AugmentConfig(label_contrast_p=0.5).label_contrast_applies(None)  # None = every modality
    assert not AugmentConfig().label_contrast_applies("cardiac_mri")  # off by default


def test_wired_into_training_samples_of_the_named_modality_only(tmp_path):
    fundus = FolderDataset(make_dataset(tmp_path / "f", hw=(40, 60)))
    cardiac = FolderDataset(make_dataset(tmp_path / "c", CARDIAC_YAML, rgb=False, hw=(48, 32)))
    sources = [Source(fundus, [0, 1, 2], name="f"), Source(cardiac, [0, 1], name="c")]

    def images(p: float, modalities=("cardiac_mri",), train: bool = True) -> list[np.ndarray]:
        cfg = AugmentConfig(strength="none", style_mix_p=0.0, label_contrast_p=p, label_contrast_modalities=modalities)
        ds = PromptedDataset(sources, 64, (0.5,) * 3, (0.25,) * 3, seed=3, train=train, augment_cfg=cfg)
        return [ds[i]["image"].numpy() for i in (1, 3)]  # one fundus, one cardiac sample

    (f_off, c_off), (f_on, c_on) = images(0.0), images(1.0)
    assert np.array_equal(f_off, f_on)  # fundus is not in the list: untouched
    assert not np.allclose(c_off, c_on, atol=1e-3)  # cardiac: changed
    assert np.array_equal(c_on, images(1.0)[1])  # seeded per (seed, epoch, index)
    assert not np.allclose(f_off, images(1.0, modalities=None)[0], atol=1e-3)  # None: every modality
    assert all(np.array_equal(a, b) for a, b in zip(images(1.0, train=False), images(0.0, train=False)))
