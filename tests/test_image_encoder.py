"""open_clip vision towers as multi-level feature extractors."""

from __future__ import annotations

import pytest
import torch
from emclip.config import ImageEncoderConfig, load_config
from emclip.errors import ConfigError, PretrainedWeightsUnavailable
from emclip.nn.image_encoder import (
    OpenCLIPViTEncoder,
    TimmEncoder,
    build_image_encoder,
    default_vit_indices,
    resize_token_pos_embed,
)

TINY_VIT = ImageEncoderConfig(
    vision_cfg={"layers": 3, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    embed_dim=16,
    feature_indices=[0, 2],
)


def tiny_vit(image_size=64, seed=0):
    torch.manual_seed(seed)
    return build_image_encoder(TINY_VIT, image_size).eval()


def test_tiny_vit_levels_strides_and_channels():
    enc = tiny_vit()
    assert isinstance(enc, OpenCLIPViTEncoder)
    assert enc.strides == [2, 4, 8, 16] and enc.out_channels == [8, 16, 32, 32]
    assert enc.size_divisor == 16
    assert len(enc.visual.transformer.resblocks) == 3  # last tapped block is 2
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(enc.out_channels, enc.strides)]


def test_vit_tokens_match_open_clip_forward_intermediates():
    enc = tiny_vit()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = enc.forward_maps(x)
        ref = enc.visual.forward_intermediates(x, indices=enc.indices, intermediates_only=True)["image_intermediates"]
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_vit_other_input_size_interpolates_positional_embedding():
    enc64 = tiny_vit(64)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = enc64(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(48, 64), (24, 32), (12, 16), (6, 8)]
    # a tower built for 96x96 receiving the 64-px weights resizes them once on load; at 96 px
    # it must agree with the on-the-fly interpolation of the 64-px tower
    enc96 = tiny_vit(96, seed=1)
    assert enc96.visual.positional_embedding.shape == (1 + 12 * 12, 32)
    enc96.load_tower_state_dict(enc64.visual.state_dict(), "the 64-px tower")
    enc96.pyramid.load_state_dict(enc64.pyramid.state_dict())
    sq = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(enc64(sq), enc96(sq)):
            assert torch.allclose(a, b, atol=1e-5)


def test_resize_token_pos_embed_keeps_class_token_and_identity():
    pos = torch.randn(1 + 16, 8)
    assert torch.equal(resize_token_pos_embed(pos, (4, 4)), pos)
    out = resize_token_pos_embed(pos, (6, 2))
    assert out.shape == (1 + 12, 8) and torch.equal(out[0], pos[0])
    batched = resize_token_pos_embed(pos[None], (2, 2))
    assert batched.shape == (1, 5, 8)


def test_tower_weights_that_do_not_fit_are_listed():
    enc = tiny_vit()
    sd = enc.visual.state_dict()
    sd.pop("conv1.weight")
    sd["ln_pre.weight"] = torch.ones(7)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        enc.load_tower_state_dict(sd, "bad.safetensors")
    msg = str(info.value)
    assert "bad.safetensors" in msg and "conv1.weight" in msg and "ln_pre.weight" in msg


def test_every_parameter_gets_a_gradient():
    """No pruned/unused parameters are left (DDP without find_unused_parameters)."""
    enc = build_image_encoder(TINY_VIT, 64).train()
    sum(f.float().mean() for f in enc(torch.randn(2, 3, 64, 64))).backward()
    unused = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_efficientnet_lite0_timm_tower():
    cfg = load_config("cpu-default").image_encoder
    enc = build_image_encoder(cfg, 256).eval()
    assert isinstance(enc, TimmEncoder) and not enc.is_vit
    assert enc.strides == [4, 8, 16, 32] and enc.out_channels == [24, 40, 112, 320]
    assert not hasattr(enc.visual.trunk, "classifier") or isinstance(enc.visual.trunk.classifier, torch.nn.Identity)
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 96, 160))
    assert [tuple(f.shape) for f in feats] == [(1, c, 96 // s, 160 // s) for c, s in zip(enc.out_channels, enc.strides)]
    enc.train()
    sum(f.mean() for f in enc(torch.randn(2, 3, 64, 64))).backward()
    # cpu-default freezes the stem and the first 2 stages: no gradient there, one everywhere else
    frozen = [n for n, p in enc.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("visual.trunk.conv_stem", "visual.trunk.bn1", "visual.trunk.blocks.0.",
                                        "visual.trunk.blocks.1.")) for n in frozen)
    assert [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for n, p in enc.named_parameters() if not p.requires_grad)


def test_frozen_stages_keep_their_norms_in_eval_mode():
    cfg = load_config("cpu-default").image_encoder
    enc = build_image_encoder(cfg, 64).train()
    stem_bn = enc.visual.trunk.bn1
    before = stem_bn.running_mean.clone()
    enc(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert not stem_bn.training and torch.equal(stem_bn.running_mean, before)
    assert enc.visual.trunk.blocks[2].training
    bad = ImageEncoderConfig(**{**cfg.__dict__, "frozen_stages": 99})
    with pytest.raises(ConfigError, match="frozen_stages"):
        build_image_encoder(bad, 64)


def test_timm_vit_tower_takes_other_sizes():
    cfg = ImageEncoderConfig(vision_cfg={"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear"})
    enc = build_image_encoder(cfg, 64).eval()
    assert enc.is_vit and enc.strides == [4, 8, 16, 32] and enc.out_channels == [48, 96, 192, 192]
    assert enc.visual.trunk.pos_embed.shape[1] == 1 + 4 * 4  # resized once to 64 px
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 16), (12, 8), (6, 4), (3, 2)]


def test_freeze_stops_gradients_and_keeps_tower_in_eval():
    cfg = ImageEncoderConfig(**{**TINY_VIT.__dict__, "freeze": True})
    enc = build_image_encoder(cfg, 64).train()
    assert not any(p.requires_grad for p in enc.visual.parameters())
    assert any(p.requires_grad for p in enc.pyramid.parameters())
    assert not enc.visual.training and enc.pyramid.stages[0].training


def test_vit_b_16_builds_with_random_weights():
    enc = build_image_encoder(load_config("vit-b-16").image_encoder, 224)
    assert enc.out_channels == [192, 384, 768, 768] and enc.strides == [4, 8, 16, 32]
    assert enc.visual.positional_embedding.shape == (1 + 14 * 14, 768)
    with torch.no_grad():
        feats = enc.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_default_vit_indices():
    assert default_vit_indices(12) == [2, 5, 8, 11]
    assert default_vit_indices(2) == [0, 1]
    assert default_vit_indices(1) == [0]


def test_bad_feature_indices_and_vision_cfg_raise_config_error():
    with pytest.raises(ConfigError, match="feature_indices"):
        build_image_encoder(ImageEncoderConfig(vision_cfg=TINY_VIT.vision_cfg, feature_indices=[0, 5]), 64)
    with pytest.raises(ConfigError, match="vision_cfg"):
        build_image_encoder(ImageEncoderConfig(vision_cfg={"layerz": 2}), 64)
    with pytest.raises(ConfigError, match="open_clip_model"):
        build_image_encoder(ImageEncoderConfig(open_clip_model="ViT-Q-99"), 64)


def test_tower_weights_that_do_not_fit_name_the_keys_and_the_section():
    """Both encoders load tower weights through emclip.nn.towers: extra keys are ignored, a
    missing or reshaped tower weight is one PretrainedWeightsUnavailable naming what."""
    from emclip.nn.text_encoder import build_text_encoder

    enc = tiny_vit()
    good = {k: v.clone() + 1 for k, v in enc.visual.state_dict().items()}
    enc.load_tower_state_dict({**good, "head.extra": torch.zeros(1)}, "good.safetensors")
    key = next(iter(good))
    assert torch.equal(enc.visual.state_dict()[key], good[key])
    missing = dict(good)
    del missing[key]
    with pytest.raises(PretrainedWeightsUnavailable, match=r"image tower weights from a\.bin do not fit this "
                       r"image_encoder config \(missing 1: .*; check open_clip_model"):
        enc.load_tower_state_dict(missing, "a.bin")
    text = build_text_encoder(load_config("tiny").text_encoder)
    own = text.tower.state_dict()
    name = next(k for k, v in own.items() if v.ndim == 2)
    reshaped = {**own, name: torch.zeros(3, 3)}
    with pytest.raises(PretrainedWeightsUnavailable, match=r"text tower weights from b do not fit this "
                       r"text_encoder config \(shape mismatch: .*\(3, 3\)"):
        text.load_tower_state_dict(reshaped, "b")
