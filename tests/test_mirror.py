"""Mirror test-time augmentation: one batch of [x, flip(x)], logits averaged (emclip.inference.runner)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from emclip.errors import InvalidArgumentError
from emclip.inference.runner import model_mirrors, run_mirrored
from emclip.nn.base import ModelOutput


def _lopsided(x: torch.Tensor) -> ModelOutput:
    """A 'network' that is not left-right symmetric: logits grow towards the right edge."""
    ramp = torch.linspace(0.0, 3.0, x.shape[-1])
    logits = x[:, :1] * ramp + x[:, 1:2]
    b = x.shape[0]
    return ModelOutput(
        logits=logits,
        prompt_mask=torch.ones(b, 1, dtype=torch.bool),
        responsibilities=x[:, :2].softmax(1),
        cluster_text_similarity=torch.arange(b, dtype=torch.float32).view(b, 1, 1),
        aux={"deep_logits": logits[..., ::2, ::2], "note": "kept"},
    )


def test_run_mirrored_averages_the_flipped_back_pass_and_keeps_the_plain_extras():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 5, 7)
    calls = []

    def call(images):
        calls.append(images.shape[0])
        return _lopsided(images)

    out = run_mirrored(call, x, mirror=True)
    assert calls == [6]  # one forward of the doubled batch
    plain, mirrored = _lopsided(x), _lopsided(x.flip(-1))
    torch.testing.assert_close(out.logits, 0.5 * (plain.logits + mirrored.logits.flip(-1)))
    assert not torch.allclose(out.logits, plain.logits)  # the network is lopsided, so mirroring changes it
    torch.testing.assert_close(out.responsibilities, plain.responsibilities)
    torch.testing.assert_close(out.cluster_text_similarity, plain.cluster_text_similarity)
    assert out.prompt_mask.shape == (3, 1)
    assert out.aux["deep_logits"].shape[0] == 3 and out.aux["note"] == "kept"

    off = run_mirrored(call, x, mirror=False)
    assert calls[-1] == 3
    torch.testing.assert_close(off.logits, plain.logits)


def test_mirrored_model_is_left_right_equivariant(tiny_model):
    """Mirroring the input mirrors the output exactly when the pass is averaged with its mirror
    (a square image: no letterbox padding), and not without it (random weights are lopsided)."""
    import emclip

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    prompts = ["optic disc", "optic cup"]
    opts = {"modality": "fundus", "coarse_to_fine": False}
    a = emclip.segment(img, prompts, tiny_model, mirror=True, **opts)
    b = emclip.segment(img[:, ::-1], prompts, tiny_model, mirror=True, **opts)
    np.testing.assert_allclose(a.probabilities, b.probabilities[:, :, ::-1], atol=1e-5)
    c = emclip.segment(img, prompts, tiny_model, mirror=False, **opts)
    d = emclip.segment(img[:, ::-1], prompts, tiny_model, mirror=False, **opts)
    assert np.abs(c.probabilities - d.probabilities[:, :, ::-1]).max() > 1e-3
    assert a.info["mirror"] is True and c.info["mirror"] is False


def test_default_follows_the_model_config():
    import emclip
    from emclip.config import load_config
    from emclip.factory import create_model

    img = np.random.default_rng(1).integers(0, 255, (48, 64), dtype=np.uint8)
    torch.manual_seed(0)
    net = create_model("tiny").eval()
    assert net.config.test_time_mirror is None and not model_mirrors(net)  # untrained: off
    plain = emclip.segment(img, "left ventricle", net, modality="cardiac MRI", mirror=False)
    got = emclip.segment(img, "left ventricle", net, modality="cardiac MRI")
    assert got.info["mirror"] is False
    np.testing.assert_array_equal(got.probabilities, plain.probabilities)
    net.config.test_time_mirror = True
    mirrored = emclip.segment(img, "left ventricle", net, modality="cardiac MRI", mirror=True)
    got = emclip.segment(img, "left ventricle", net, modality="cardiac MRI")
    assert got.info["mirror"] is True
    np.testing.assert_array_equal(got.probabilities, mirrored.probabilities)
    stack = emclip.segment_stack(np.stack([img, img]), "left ventricle", net, modality="cardiac MRI")
    assert stack.info["mirror"] is True
    np.testing.assert_allclose(stack.probabilities[:, 1], mirrored.probabilities, atol=1e-5)
    assert load_config("tiny").test_time_mirror is None


def test_bundled_model_mirrors_by_default():
    from emclip.inference import load_model

    assert model_mirrors(load_model())


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_bad_mirror_is_refused_before_the_model_loads(bad, tmp_path):
    import emclip

    img = np.zeros((32, 32), np.uint8)
    missing = tmp_path / "no-such-model"
    with pytest.raises(InvalidArgumentError, match="mirror must be True, False or None"):
        emclip.segment(img, "optic disc", str(missing), mirror=bad)
    with pytest.raises(InvalidArgumentError, match="mirror must be True, False or None"):
        emclip.segment_stack(np.zeros((2, 32, 32), np.uint8), "optic disc", str(missing), mirror=bad)


def test_cli_flag_parses_to_none_true_false():
    import argparse

    from emclip.cli.common import add_mirror_flag

    p = argparse.ArgumentParser()
    add_mirror_flag(p)
    assert p.parse_args([]).mirror is None
    assert p.parse_args(["--mirror"]).mirror is True
    assert p.parse_args(["--no-mirror"]).mirror is False


def test_every_path_passes_mirror_on():
    """The fundus coarse-to-fine path, named MRI sequences (fusion) and stacks of sequences all run
    the mirror pass the caller asked for, and say so in ``info``."""
    import emclip
    from emclip.config import load_config
    from emclip.factory import create_model
    from emclip.fundus import segment_fundus

    rng = np.random.default_rng(2)
    torch.manual_seed(0)
    net = create_model("tiny").eval()
    photo = rng.integers(0, 255, (160, 800, 3), dtype=np.uint8)
    for mirror in (True, False):
        r = segment_fundus(photo, ["optic disc"], net, mirror=mirror)
        assert r.info["mirror"] is mirror and "coarse_to_fine" in r.info
    on = segment_fundus(photo, ["optic disc"], net, mirror=True, whole_photograph=False)
    off = segment_fundus(photo, ["optic disc"], net, mirror=False, whole_photograph=False)
    assert np.abs(on.probabilities - off.probabilities).max() > 1e-4  # the flag reached the network

    torch.manual_seed(0)
    fusion = create_model(load_config("tiny", {"fusion.enabled": True})).eval()
    seqs = rng.random((2, 48, 48)).astype(np.float32)
    for mirror in (True, False):
        r = emclip.segment(seqs, "whole tumour", fusion, channels=["flair", "t1ce"], channel_axis=0, mirror=mirror)
        assert r.info["mirror"] is mirror
        vol = np.stack([seqs, seqs], axis=1)  # (2 sequences, 2 slices, 48, 48)
        s = emclip.segment_stack(vol, "whole tumour", fusion, channels=["flair", "t1ce"], channel_axis=0,
                                 mirror=mirror)
        assert s.info["mirror"] is mirror
