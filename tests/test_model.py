"""EMCLIP and U-Net through the SegmentationModel contract."""

from __future__ import annotations

import socket

import emclip
import pytest
import torch
from emclip.errors import InvalidImageError, InvalidPromptError, UnknownPromptError
from emclip.factory import create_model
from emclip.nn import EMCLIP, PAD_LOGIT, ModelOutput, SegmentationModel, UNet, validate_images


def images(b=2, h=64, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompts", [["optic disc"], ["optic disc", "optic cup", "rim"], [f"s{i}" for i in range(7)]])
def test_predict_logits_shapes_for_1_to_n_prompts(tiny_model, prompts):
    with torch.no_grad():
        out = tiny_model.predict_logits(images(), prompts, modality="fundus")
    p = len(prompts)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, p, 64, 64) and out.logits.dtype == torch.float32
    assert out.prompt_mask.shape == (2, p) and out.prompt_mask.all()
    k = tiny_model.config.em.num_bases
    assert out.responsibilities.shape == (2, k, 4, 4)
    assert torch.allclose(out.responsibilities.sum(1), torch.ones(2, 4, 4), atol=1e-5)
    assert out.cluster_text_similarity.shape == (2, k, p)
    assert out.aux["deep_logits"].shape == (2, p, 4, 4)


def test_non_square_and_other_sizes_keep_input_resolution(tiny_model):
    with torch.no_grad():
        out = tiny_model.predict_logits(images(1, 80, 48), ["optic cup"])
    assert out.logits.shape == (1, 1, 80, 48)


def test_predict_logits_equals_forward_with_encoded_prompts(tiny_model):
    x = images()
    with torch.no_grad():
        out = tiny_model.predict_logits(x, ["optic disc", "optic cup"], modality="fundus")
        emb = tiny_model.encode_prompts(["optic disc", "optic cup"], "fundus")
        ref = tiny_model(x, emb)
        batched = tiny_model(x, emb[None].expand(2, -1, -1))
    assert emb.shape == (2, tiny_model.text_encoder.embed_dim)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert torch.allclose(batched.logits, ref.logits, atol=1e-6)


def test_per_sample_prompt_lists_are_padded_and_match_single_runs(tiny_model):
    x = images(2)
    with torch.no_grad():
        out = tiny_model.predict_logits(x, [["optic disc"], ["optic cup", "optic disc", "rim"]])
        first = tiny_model.predict_logits(x[:1], ["optic disc"])
        second = tiny_model.predict_logits(x[1:], ["optic cup", "optic disc", "rim"])
    assert out.logits.shape == (2, 3, 64, 64)
    assert out.prompt_mask.tolist() == [[True, False, False], [True, True, True]]
    assert (out.logits[0, 1:] == PAD_LOGIT).all()
    assert torch.allclose(out.logits[0, :1], first.logits[0], atol=1e-5)
    assert torch.allclose(out.logits[1], second.logits[0], atol=1e-5)
    assert (out.cluster_text_similarity[0, :, 1:] == 0).all()


def test_per_image_modality(tiny_model):
    x = images(2)
    with torch.no_grad():
        mixed = tiny_model.predict_logits(x, ["optic disc"], modality=["fundus", "cardiac MRI"])
        fundus = tiny_model.predict_logits(x[:1], ["optic disc"], modality="fundus")
        cardiac = tiny_model.predict_logits(x[1:], ["optic disc"], modality="cardiac MRI")
    assert torch.allclose(mixed.logits[0], fundus.logits[0], atol=1e-5)
    assert torch.allclose(mixed.logits[1], cardiac.logits[0], atol=1e-5)
    with pytest.raises(InvalidPromptError, match="modalities"):
        tiny_model.predict_logits(x, ["optic disc"], modality=["fundus"])


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.randn(3, 64, 64), ["4 dimensions", "images[None]"]),
        (torch.randn(1, 64, 64, 3), ["3 channels", "permute"]),
        (torch.randn(1, 1, 64, 64), ["3 channels", "expand"]),
        (torch.randn(1, 3, 60, 64), ["multiple of 16", "64x64"]),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), ["floating point", "pixel_mean"]),
        (torch.full((1, 3, 64, 64), float("nan")), ["NaN"]),
        ([[1.0]], ["torch.Tensor"]),
    ],
)
def test_invalid_images_say_how_to_fix(tiny_model, bad, words):
    with pytest.raises(InvalidImageError) as info:
        tiny_model.predict_logits(bad, ["optic cup"])
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "prompts, words",
    [
        ("optic cup", ["list of strings", "parse_prompts"]),
        ([], ["non-empty"]),
        (["optic cup", "  "], ["empty"]),
        ([["a"], ["b"], ["c"]], ["3 prompt lists", "2 images"]),
        ([["a"], []], ["image 1 has no prompt"]),
        (["a", ["b"]], ["mixing"]),
    ],
)
def test_invalid_prompts_say_how_to_fix(tiny_model, prompts, words):
    with pytest.raises(InvalidPromptError) as info:
        tiny_model.predict_logits(images(2), prompts)
    for word in words:
        assert word in str(info.value)


def test_forward_checks_embeddings_and_mask(tiny_model):
    x = images(2)
    with pytest.raises(InvalidPromptError, match="text_embeddings"):
        tiny_model(x, torch.randn(2, 7))
    with pytest.raises(InvalidPromptError, match="at least one real prompt"):
        tiny_model(x, torch.randn(2, 32), torch.tensor([[True, False], [False, False]]))


def test_training_mode_draws_random_templates_and_all_trainable_weights_learn():
    torch.manual_seed(0)
    model = create_model("tiny").train()
    modes = []
    original = model.text_encoder.encode_prompts
    model.text_encoder.encode_prompts = lambda *a, **k: modes.append(k.get("mode")) or original(*a, **k)
    out = model.predict_logits(images(2), ["optic disc", "optic cup"], modality="fundus")
    assert modes == ["random"]
    (out.logits.mean() + out.aux["deep_logits"].mean()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("text_encoder.") for n in trainable)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        model.predict_logits(images(1), ["optic disc"])
    assert modes[-1] == "ensemble"


def test_ablation_flags():
    model = create_model("tiny", pretrained=False)
    no_em = create_model(emclip.load_config("tiny", overrides={"em.enabled": False})).eval()
    no_text = create_model(emclip.load_config("tiny", overrides={"decoder.text_guidance": False})).eval()
    with torch.no_grad():
        out = no_em.predict_logits(images(1), ["optic cup"])
    assert out.responsibilities is None and out.cluster_text_similarity is None
    assert out.logits.shape == (1, 1, 64, 64)
    assert len(no_text.decoder.blocks) == 0 and len(model.decoder.blocks) == 1
    assert no_text.num_parameters() < model.num_parameters()


def test_tiny_builds_and_runs_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tiny model must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = create_model("tiny").eval()
    with torch.no_grad():
        out = model.predict_logits(images(1), ["optic disc", "optic cup"])
    assert isinstance(model, EMCLIP) and isinstance(model, SegmentationModel)
    assert model.image_size == 64 and model.size_divisor == 16
    assert model.pixel_mean == tuple(model.config.pixel_mean) and len(model.pixel_std) == 3
    assert torch.isfinite(out.logits).all()


def test_image_size_must_fit_the_encoder():
    with pytest.raises(emclip.ConfigError, match="image_size=72 is not a multiple of 16"):
        create_model(emclip.load_config("tiny", overrides={"image_size": 72}))


def test_create_model_device_and_dict():
    model = create_model(emclip.load_config("tiny").to_dict(), device="cpu")
    assert model.device.type == "cpu" and model.config.name == "tiny"


def test_cpu_default_with_seeds_runs_at_256(cpu_default_model):
    model = cpu_default_model
    assert model.image_size == 256 and model.size_divisor == 32
    x = images(1, 256, 256)
    with torch.no_grad():
        out = model.predict_logits(x, ["optic disc", "optic cup"], modality="fundus")
    assert out.logits.shape == (1, 2, 256, 256)
    assert out.responsibilities.shape == (1, model.config.em.num_bases, 8, 8)
    assert torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------------------------
# U-Net baseline


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return create_model("unet-tiny").eval()


def test_unet_maps_prompts_and_synonyms_to_channels(unet):
    assert isinstance(unet, UNet) and unet.size_divisor == 8
    x = images(2)
    with torch.no_grad():
        full = unet(x)
        out = unet.predict_logits(x, ["OD", "Optic Cup", "LV", "myocardium"])
    assert full.shape == (2, 6, 64, 64)
    assert torch.equal(out.logits, full[:, [0, 1, 3, 4]])
    assert out.responsibilities is None and out.cluster_text_similarity is None


def test_unet_per_sample_lists(unet):
    x = images(2)
    with torch.no_grad():
        full = unet(x)
        out = unet.predict_logits(x, [["right ventricle"], ["rim", "optic disc"]])
    assert out.prompt_mask.tolist() == [[True, False], [True, True]]
    assert torch.equal(out.logits[0, 0], full[0, 5]) and (out.logits[0, 1] == PAD_LOGIT).all()
    assert torch.equal(out.logits[1], full[1, [2, 0]])


def test_unet_unknown_prompt_lists_known_names(unet):
    with pytest.raises(UnknownPromptError) as info:
        unet.predict_logits(images(1), ["liver"])
    msg = str(info.value)
    assert "liver" in msg and "optic disc" in msg and "right ventricle" in msg


def test_unet_config_synonyms_and_image_encoder_variant():
    cfg = emclip.load_config("unet-tiny", overrides={"synonyms": {"optic cup": ["excavation"]}})
    model = create_model(cfg).eval()
    assert model.class_index("Excavation") == 1
    base = create_model("unet-baseline").eval()
    assert base.size_divisor == 32 and base.image_size == 256
    with torch.no_grad():
        out = base.predict_logits(images(1, 64, 96), ["optic disc"])
    assert out.logits.shape == (1, 1, 64, 96)


def test_validate_images_accepts_good_input():
    validate_images(torch.zeros(2, 3, 32, 48), size_divisor=16)
    validate_images(torch.zeros(1, 3, 33, 47, dtype=torch.float16))
