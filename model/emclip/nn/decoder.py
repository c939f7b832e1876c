"""Text-guided pixel decoder.

Input: encoder levels (finest first) and prompt embeddings ``[B, P, D]`` with a mask.

1. The deepest level goes through EM aggregation (or a 1x1 projection when EM is off).
2. Pixel tokens cross-attend to the prompt embeddings (keys/values, padded prompts masked),
   then an FFN, pre-norm residual blocks (``num_layers``; none when ``text_guidance`` is off).
3. FPN-like top-down path: upsample, add a lateral 1x1 projection of the shallower level,
   3x3 conv, down to the finest encoder stride (4 for the bundled towers).
4. Mask logits per prompt = exp(scale) * cosine(pixel embedding, text embedding) + bias, so any
   number of prompts works and each is an independent sigmoid (nested structures overlap).

A trainable text adapter (MLP or linear) maps the frozen text embeddings to the decoder width.
A *deep* head compares the clustered deepest features with the prompts the same way
(``deep_logits``, for a pixel-text score-map loss); applying its (bias-free, linear) pixel map to
the EM bases gives ``cluster_text_similarity [B, K, P]``: each basis is a responsibility-weighted
mean of its pixels, so this is the score its pixels get on average, up to norm.

Decoder-space prompts (:class:`DecoderPrompts`): a prompt enters the decoder as a *token* (width
``channels``; keys/values of the cross-attention) and two *score vectors* (width ``embed_dim``;
compared with the pixel and deep pixel embeddings). :meth:`TextGuidedPixelDecoder.encode_text`
builds them from text embeddings; ``forward`` also accepts them directly, which is how visual
prompts from exemplars (``EMCLIP.encode_exemplars``) are scored. Given score vectors are used as
they are (unit vectors give scaled cosines; a shorter vector gives softer logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, EMConfig
from .em_aggregation import EMAggregation, _groups


def conv_norm_act(cin: int, cout: int, kernel: int = 3, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(_groups(cout), cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: pixels attend to prompts (keys/values), then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, pixels: torch.Tensor, text: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """``pixels [B, N, C]``, ``text [B, P, C]``, ``padding [B, P]`` True where a slot is padding."""
        kv = self.norm_kv(text)
        attended, _ = self.attn(self.norm_q(pixels), kv, kv, key_padding_mask=padding, need_weights=False)
        pixels = pixels + attended
        return pixels + self.ffn(self.norm_ffn(pixels))


@dataclass
class DecoderPrompts:
    """Prompts in decoder space, ``[P, ...]`` (shared by the batch) or ``[B, P, ...]``.

    ``tokens [.., C]``: cross-attention keys/values (C = ``decoder.channels``).
    ``keys [.., E]``: score vectors for the pixel embeddings (E = ``decoder.embed_dim``).
    ``deep_keys [.., E]``: score vectors for the deep pixel embeddings (``deep_logits``, EM bases).
    ``bias [..]``: a logit offset per prompt added to both logit maps (None = 0; text prompts
    have none, visual prompts a calibrated one).
    """

    tokens: torch.Tensor
    keys: torch.Tensor
    deep_keys: torch.Tensor
    bias: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[-2])

    def offsets(self) -> torch.Tensor:
        """``bias`` or zeros ``[..]`` (the shape of the prompt axes)."""
        if self.bias is not None:
            return self.bias
        return torch.zeros(self.tokens.shape[:-1], dtype=torch.float32, device=self.tokens.device)

    def select(self, index: torch.Tensor) -> DecoderPrompts:
        """Prompts ``index`` (any integer tensor) along the prompt axis of ``[P, ...]`` prompts."""
        bias = None if self.bias is None else self.bias[index]
        return DecoderPrompts(self.tokens[index], self.keys[index], self.deep_keys[index], bias)

    def to(self, *args, **kwargs) -> DecoderPrompts:
        bias = None if self.bias is None else self.bias.to(*args, **kwargs)
        return DecoderPrompts(self.tokens.to(*args, **kwargs), self.keys.to(*args, **kwargs), self.deep_keys.to(*args, **kwargs), bias)

    @staticmethod
    def cat(parts: list[DecoderPrompts]) -> DecoderPrompts:
        """Concatenate along the prompt axis."""
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.offsets().float() for p in parts], -1)
        return DecoderPrompts(
            torch.cat([p.tokens for p in parts], -2),
            torch.cat([p.keys for p in parts], -2),
            torch.cat([p.deep_keys for p in parts], -2),
            bias,
        )


@dataclass
class DecoderOutput:
    """``logits [B, P, h0, w0]`` at the finest stride, ``deep_logits [B, P, hd, wd]``, and the
    EM results (None when EM is off). With ``return_embeddings=True``: ``pixel_embeddings
    [B, E, h0, w0]`` and ``deep_embeddings [B, E, hd, wd]`` (before normalisation)."""

    logits: torch.Tensor
    deep_logits: torch.Tensor
    responsibilities: torch.Tensor | None
    bases: torch.Tensor | None
    cluster_text_similarity: torch.Tensor | None
    pixel_embeddings: torch.Tensor | None = None
    deep_embeddings: torch.Tensor | None = None


class TextGuidedPixelDecoder(nn.Module):
    """See module docstring. ``in_channels``/``strides`` describe the encoder levels."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        text_dim: int,
        cfg: DecoderConfig,
        em: EMConfig,
    ) -> None:
        super().__init__()
        c, e = cfg.channels, cfg.embed_dim
        self.strides = list(strides)
        deep_in = in_channels[-1]
        if em.enabled:
            self.em = EMAggregation(deep_in, em.channels, em.num_bases, em.iterations, em.lam, em.momentum, em.grad_mode)
            self.deep_in = nn.Identity() if em.channels == c else conv_norm_act(em.channels, c, 1, act=False)
            clustered = em.channels
        else:
            self.em = None
            self.deep_in = conv_norm_act(deep_in, c, 1, act=False)
            clustered = c
        self.text_centering = bool(cfg.text_centering)
        if self.text_centering:
            self.register_buffer("text_center", torch.zeros(text_dim))
        if cfg.text_adapter == "mlp":
            self.text_adapter = nn.Sequential(nn.Linear(text_dim, c), nn.GELU(), nn.Linear(c, c))
        else:
            self.text_adapter = nn.Linear(text_dim, c)
        n_blocks = cfg.num_layers if cfg.text_guidance else 0
        self.blocks = nn.ModuleList(CrossAttentionBlock(c, cfg.num_heads, cfg.ffn_ratio, cfg.dropout) for _ in range(n_blocks))
        self.laterals = nn.ModuleList(conv_norm_act(ch, c, 1, act=False) for ch in in_channels[:-1])
        self.fuse = nn.ModuleList(conv_norm_act(c, c, 3) for _ in in_channels[:-1])
        self.pixel_head = nn.Sequential(conv_norm_act(c, c, 3), nn.Conv2d(c, e, 1))
        self.text_head = nn.Linear(c, e)
        self.deep_pixel_head = nn.Conv2d(clustered, e, 1, bias=False)
        self.deep_text_head = nn.Linear(c, e)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        self.deep_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.deep_logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))

    @torch.no_grad()
    def set_text_center(self, embeddings: torch.Tensor) -> None:
        """Store the mean of ``embeddings [N, D]`` (the run's prompt vocabulary) as the centre."""
        if not self.text_centering:
            raise ValueError("set_text_center needs decoder.text_centering: true in the model config")
        self.text_center.copy_(embeddings.float().mean(0).to(self.text_center.dtype))

    @property
    def output_stride(self) -> int:
        return self.strides[0]

    @staticmethod
    def _scores(
        pixels: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor, normalize_text: bool = True
    ) -> torch.Tensor:
        pixels = F.normalize(pixels, dim=1)
        if normalize_text:
            text = F.normalize(text, dim=-1)
        scores = log_scale.exp().clamp(max=100.0) * torch.einsum("bchw,bpc->bphw", pixels, text) + bias
        return scores.contiguous()  # channels-last pixels would give prompt-innermost strides

    def _tokens(self, text: torch.Tensor) -> torch.Tensor:
        weight = self.text_head.weight
        text = text.to(weight.dtype)
        if self.text_centering:
            text = F.normalize(text - self.text_center.to(weight.dtype), dim=-1)
        return self.text_adapter(text)

    def encode_text(self, text: torch.Tensor) -> DecoderPrompts:
        """Text embeddings ``[..., D]`` -> :class:`DecoderPrompts` (unit score vectors). Feeding
        them to ``forward`` gives exactly the logits of feeding ``text``."""
        t = self._tokens(text)
        return DecoderPrompts(t, F.normalize(self.text_head(t), dim=-1), F.normalize(self.deep_text_head(t), dim=-1))

    def forward(
        self,
        feats: list[torch.Tensor],
        text: torch.Tensor | DecoderPrompts,
        prompt_mask: torch.Tensor,
        *,
        return_embeddings: bool = False,
    ) -> DecoderOutput:
        """``feats`` finest first; ``text [B, P, D]`` text embeddings or :class:`DecoderPrompts`
        ``[B, P, ...]``; ``prompt_mask [B, P]`` True for real prompts."""
        offset = None
        if isinstance(text, DecoderPrompts):
            dtype = self.text_head.weight.dtype
            t = text.tokens.to(dtype)
            keys, deep_text, given = text.keys.to(dtype), text.deep_keys.to(dtype), True
            if text.bias is not None:
                offset = text.bias.to(dtype)[..., None, None]
        else:
            t = self._tokens(text)
            keys, deep_text, given = None, None, False
        deep = feats[-1]
        if self.em is not None:
            em_out = self.em(deep)
            x = self.deep_in(em_out.features)
            clustered = em_out.projected
        else:
            em_out = None
            x = self.deep_in(deep)
            clustered = x
        if len(self.blocks):
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            padding = ~prompt_mask
            for block in self.blocks:
                tokens = block(tokens, t, padding)
            # back on the grid as a channels-last view with canonical strides (transpose + reshape
            # gives a batch of one strides torch does not take for channels-last): the top-down
            # path below then stays channels-last (NCHW bilinear upsampling is ~15x slower on the CPU)
            x = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
        for i in reversed(range(len(feats) - 1)):
            lateral = self.laterals[i](feats[i])
            x = F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral
            x = self.fuse[i](x)
        pixel_emb = self.pixel_head(x)
        if not given:
            keys, deep_text = self.text_head(t), self.deep_text_head(t)
        logits = self._scores(pixel_emb, keys, self.logit_scale, self.logit_bias, normalize_text=not given)
        deep_emb = self.deep_pixel_head(clustered)
        deep_logits = self._scores(deep_emb, deep_text, self.deep_logit_scale, self.deep_logit_bias, normalize_text=not given)
        if offset is not None:
            logits, deep_logits = logits + offset, deep_logits + offset
        similarity = None
        if em_out is not None:
            w_deep = self.deep_pixel_head.weight[:, :, 0, 0].float()  # [E, C_em]
            basis_emb = F.normalize(torch.einsum("ec,bck->bke", w_deep, em_out.bases.float()), dim=-1)
            similarity = torch.einsum("bke,bpe->bkp", basis_emb, F.normalize(deep_text.float(), dim=-1))
        return DecoderOutput(
            logits=logits,
            deep_logits=deep_logits,
            responsibilities=em_out.responsibilities if em_out is not None else None,
            bases=em_out.bases if em_out is not None else None,
            cluster_text_similarity=similarity,
            pixel_embeddings=pixel_emb if return_embeddings else None,
            deep_embeddings=deep_emb if return_embeddings else None,
        )
