"""Single-object post-processing (emclip.postprocess) and its wiring into segment/segment_stack."""

from __future__ import annotations

import numpy as np
import pytest

from emclip.config import ModelConfig
from emclip.inference.single_image import summarise
from emclip.postprocess import keep_single_object, single_object_flags


def _two_blobs() -> np.ndarray:
    probs = np.zeros((40, 40), np.float32)
    probs[5:15, 5:15] = 0.9  # 100 px, mass 90
    probs[25:37, 25:37] = 0.6  # 144 px, mass 86.4: bigger but less sure
    return probs


def test_keeps_component_with_largest_probability_mass():
    probs = _two_blobs()
    kept = keep_single_object(probs > 0.5, probs)
    assert kept[5:15, 5:15].all() and not kept[25:37, 25:37].any()


def test_diagonal_touch_is_one_object_and_3d_works():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True  # 8-connected
    assert np.array_equal(keep_single_object(mask, mask.astype(float)), mask)
    vol = np.zeros((4, 8, 8), bool)
    vol[0, :2, :2] = True
    vol[3, 5:, 5:] = True
    vol[2, 5:, 5:] = True
    kept = keep_single_object(vol, vol.astype(float))
    assert kept[2:, 5:, 5:].all() and not kept[0].any()


def test_flags_follow_config_and_synonyms():
    class Net:
        config = ModelConfig(arch="unet", class_names=["x"], single_object=["optic disc", "left ventricle"])

    assert single_object_flags(Net(), ["OD", "optic cup", "Left Ventricle", "tumour"]) == [True, False, True, False]
    assert single_object_flags(object(), ["optic disc"]) == [False]
    cfg = ModelConfig(arch="unet", class_names=["x"], single_object=["optic cup"])
    assert ModelConfig.from_dict(cfg.to_dict()).single_object == ["optic cup"]


def test_summarise_applies_flags_per_prompt():
    probs = np.stack([_two_blobs(), _two_blobs()])
    s = summarise(probs, 0.5, 4, [True, False])
    assert s["masks"][0].sum() == 100 and s["masks"][1].sum() == 244
    assert s["areas"].tolist() == [100, 244]
    assert s["scores"][0] == pytest.approx(0.9)


def _blobby_model():
    import torch

    from emclip.factory import create_model

    torch.manual_seed(0)
    return create_model("tiny").eval()


def test_segment_and_stack_use_the_models_list():
    import emclip

    rng = np.random.default_rng(0)
    image = (rng.random((96, 96)) * 255).astype(np.uint8)
    net = _blobby_model()
    t = 0.03  # the random model's probabilities are low: this threshold gives dozens of blobs
    plain = emclip.segment(image, ["optic disc"], net, threshold=t, min_area=0)
    n_plain = _components(plain.masks[0])
    assert n_plain > 5
    assert np.array_equal(plain.masks[0], plain.probabilities[0] > t)
    assert plain.info["single_object"] == []
    net.config.single_object = ["optic disc"]
    single = emclip.segment(image, ["optic disc"], net, threshold=t, min_area=0)
    assert np.array_equal(single.probabilities, plain.probabilities)
    assert _components(single.masks[0]) == 1
    assert single.info["single_object"] == ["optic disc"]
    assert not (single.masks[0] & ~plain.masks[0]).any()
    stack = emclip.segment_stack(np.stack([image, image[::-1]]), ["optic disc"], net, threshold=t, min_area=0)
    assert [_components(stack.masks[0, k]) for k in range(2)] == [1, 1]
    assert stack.info["single_object"] == ["optic disc"]


def _components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask, structure=np.ones((3, 3), bool))[1])
