"""Text-guided pixel decoder: shapes, padding, ablation switches, cluster-text similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from emclip.config import DecoderConfig, EMConfig
from emclip.nn.decoder import TextGuidedPixelDecoder

IN_CH = [8, 16, 32]
STRIDES = [4, 8, 16]


def make(text_guidance=True, em_enabled=True, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = DecoderConfig(channels=32, embed_dim=16, num_layers=layers, num_heads=4, text_guidance=text_guidance)
    em = EMConfig(enabled=em_enabled, channels=24, num_bases=5, iterations=3)
    return TextGuidedPixelDecoder(IN_CH, STRIDES, text_dim=20, cfg=cfg, em=em).eval()


def feats(b=2, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size // s, size // s, generator=g) for c, s in zip(IN_CH, STRIDES)]


@pytest.mark.parametrize("p", [1, 2, 5])
def test_shapes_for_any_number_of_prompts(p):
    dec = make()
    text = torch.randn(2, p, 20)
    with torch.no_grad():
        out = dec(feats(), text, torch.ones(2, p, dtype=torch.bool))
    assert out.logits.shape == (2, p, 16, 16)  # finest stride 4 of 64 px
    assert out.deep_logits.shape == (2, p, 4, 4)
    assert out.responsibilities.shape == (2, 5, 4, 4)
    assert out.bases.shape == (2, 24, 5)
    assert out.cluster_text_similarity.shape == (2, 5, p)
    assert dec.output_stride == 4


def test_padded_prompts_do_not_change_real_ones():
    dec = make()
    f = feats()
    text = torch.randn(2, 2, 20)
    padded = torch.cat([text, torch.randn(2, 3, 20) * 10], dim=1)
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    with torch.no_grad():
        ref = dec(f, text, torch.ones(2, 2, dtype=torch.bool))
        out = dec(f, padded, mask)
    assert torch.allclose(out.logits[:, :2], ref.logits, atol=1e-5)
    assert torch.allclose(out.cluster_text_similarity[:, :, :2], ref.cluster_text_similarity, atol=1e-5)


def test_text_guidance_mixes_prompts_into_pixels_and_can_be_switched_off():
    f = feats()
    a, b = torch.randn(1, 1, 20).expand(2, 1, 20), torch.randn(2, 1, 20)
    both = torch.cat([a, b], dim=1)
    ones = torch.ones(2, 2, dtype=torch.bool)
    guided = make(text_guidance=True)
    with torch.no_grad():
        alone = guided(f, a, ones[:, :1]).logits
        with_b = guided(f, both, ones).logits[:, :1]
    assert not torch.allclose(alone, with_b, atol=1e-4)  # pixels attended to prompt b
    plain = make(text_guidance=False)
    assert len(plain.blocks) == 0
    assert not any("attn" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        alone = plain(f, a, ones[:, :1]).logits
        with_b = plain(f, both, ones).logits[:, :1]
        other = plain(f, b, ones[:, :1]).logits
    assert torch.allclose(alone, with_b, atol=1e-5)  # prompts are independent without fusion
    assert not torch.allclose(alone, other, atol=1e-4)  # but the text still decides the mask


def test_em_can_be_disabled():
    dec = make(em_enabled=False)
    assert dec.em is None
    with torch.no_grad():
        out = dec(feats(), torch.randn(2, 3, 20), torch.ones(2, 3, dtype=torch.bool))
    assert out.responsibilities is None and out.bases is None and out.cluster_text_similarity is None
    assert out.logits.shape == (2, 3, 16, 16)


def test_cluster_text_similarity_is_cosine_of_mapped_bases_and_prompts():
    dec = make()
    text = torch.randn(2, 3, 20)
    with torch.no_grad():
        out = dec(feats(), text, torch.ones(2, 3, dtype=torch.bool))
        w = dec.deep_pixel_head.weight[:, :, 0, 0]
        basis = F.normalize(torch.einsum("ec,bck->bke", w, out.bases), dim=-1)
        prompt = F.normalize(dec.deep_text_head(dec.text_adapter(text)), dim=-1)
        expected = basis @ prompt.transpose(1, 2)
    assert torch.allclose(out.cluster_text_similarity, expected, atol=1e-5)
    assert out.cluster_text_similarity.abs().max() <= 1.0 + 1e-5


def test_logits_are_scaled_cosines_plus_bias():
    dec = make()
    with torch.no_grad():
        dec.logit_scale.fill_(0.0)  # scale 1
        dec.logit_bias.fill_(0.25)
        out = dec(feats(), torch.randn(2, 2, 20), torch.ones(2, 2, dtype=torch.bool))
    assert out.logits.min() >= -1 + 0.25 - 1e-5 and out.logits.max() <= 1 + 0.25 + 1e-5


def test_all_decoder_parameters_learn():
    dec = make().train()
    out = dec(feats(), torch.randn(2, 3, 20), torch.ones(2, 3, dtype=torch.bool))
    (out.logits.mean() + out.deep_logits.mean()).backward()
    assert [n for n, p in dec.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("b", [1, 2])
def test_top_down_path_stays_channels_last(b):
    """The image tower hands over channels-last maps; after the text-guided blocks the top-down
    path must keep that layout (NCHW bilinear upsampling is ~15x slower on the CPU), and the
    result must not depend on the layout. Non-square maps make a height/width mix-up in putting the
    tokens back on the grid fail on the shapes."""
    dec = make()
    g = torch.Generator().manual_seed(3)
    nchw = [torch.randn(b, c, 64 // s, 96 // s, generator=g) for c, s in zip(IN_CH, STRIDES)]
    cl = [f.contiguous(memory_format=torch.channels_last) for f in nchw]
    text, mask = torch.randn(b, 2, 20), torch.ones(b, 2, dtype=torch.bool)
    with torch.no_grad():
        out_cl = dec(cl, text, mask, return_embeddings=True)
        out_nchw = dec(nchw, text, mask, return_embeddings=True)
    assert out_cl.pixel_embeddings.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl.logits, out_nchw.logits, rtol=1e-5, atol=1e-5)
