"""EMCLIP: open_clip image tower -> EM aggregation -> text-guided pixel decoder, prompted by a
frozen open_clip text tower.

``predict_logits(images, prompts, modality=None)`` encodes the prompts (template ensemble in
eval, one random template per prompt in training; cached) and calls
``forward(images, text_embeddings, prompt_mask)``, which trainers may call directly with their
own embeddings. Ablations are config flags: ``em.enabled`` (EM aggregation) and
``decoder.text_guidance`` (pixel-to-text cross-attention).

Visual prompts (training-free): ``encode_exemplars(images, masks, names)`` runs each exemplar
image through the network prompted by its structure name and averages the unit-normalised decoder
pixel embeddings under its mask (and likewise the deep embeddings): that mean, normalised, is a
score vector in the space where the decoder scores pixels against prompts. A logit offset is
calibrated on the exemplar itself (the threshold that best reproduces its own mask), since the
decoder's bias was trained for text. Used alone, a visual prompt needs no name: the exemplar is
encoded (and the target segmented) with a generic prompt as the cross-attention token; with its
name, text and visual logits are averaged.
``text_prompts(prompts)`` gives text prompts in the same decoder space, :func:`combine_prompts`
merges a text prompt with a visual one, and ``forward`` accepts :class:`DecoderPrompts`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import InvalidExemplarError, InvalidPromptError
from ..prompts import clean_prompt
from .base import (
    PAD_LOGIT,
    ModelOutput,
    PromptBatch,
    SegmentationModel,
    build_prompt_batch,
    validate_images,
)
from .decoder import DecoderPrompts, TextGuidedPixelDecoder
from .fusion import ModalityFusion
from .image_encoder import ImageEncoder
from .text_encoder import TextEncoder


@dataclass
class ExemplarPrompts:
    """What ``EMCLIP.encode_exemplar_prompts`` returns: ``visual`` (the exemplar alone) and
    ``combined`` (the exemplar's name as text + the exemplar), both ``[N, ...]``."""

    visual: DecoderPrompts
    combined: DecoderPrompts


CONTRASTS = (0.0, 0.5, 1.0)
"""Background-contrast weights tried per exemplar by ``encode_exemplar_prompts``."""

GENERIC_PROMPT = "structure"
"""Text prompt the pixels attend to when a visual prompt is used alone (no name needed)."""

COMBINE_MODES = ("mean-key", "mean-logit")
"""How :func:`combine_prompts` merges a text and a visual score vector (see there)."""


def combine_prompts(text: DecoderPrompts, visual: DecoderPrompts, mode: str = "mean-logit") -> DecoderPrompts:
    """One prompt per row from text prompts and visual prompts of the same shape ``[P, ...]``.

    The cross-attention token is the text token (text decides what the pixels attend to).
    Score vectors (unit vectors in, both heads): ``"mean-logit"`` (default) uses their mean, so
    the logit is the average of the two prompts' logits (``scale * (cos_t + cos_v) / 2 + bias``
    plus the mean of their offsets); ``"mean-key"`` renormalises the mean score vector (the same
    direction, a sharper logit; offsets averaged too).
    """
    if mode not in COMBINE_MODES:
        raise InvalidPromptError(f"combine mode must be one of {COMBINE_MODES}, got {mode!r}")

    def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = (F.normalize(a.float(), dim=-1) + F.normalize(b.float(), dim=-1)) / 2
        return (F.normalize(m, dim=-1) if mode == "mean-key" else m).to(a.dtype)

    bias = None
    if text.bias is not None or visual.bias is not None:
        bias = (text.offsets().float() + visual.offsets().float()) / 2
    return DecoderPrompts(text.tokens, merge(text.keys, visual.keys), merge(text.deep_keys, visual.deep_keys), bias)


class EMCLIP(SegmentationModel):
    """EM-CLIP segmentation network (see module docstring)."""

    def __init__(self, config: ModelConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__(config)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.decoder = TextGuidedPixelDecoder(
            image_encoder.out_channels, image_encoder.strides, text_encoder.embed_dim, config.decoder, config.em
        )
        self.rng = random.Random()  # template sampling in training; seed it for reproducibility
        self.fusion = (
            ModalityFusion(config.fusion, config.pixel_mean, config.pixel_std) if config.fusion.enabled else None
        )
        self.check_image_size()

    @property
    def size_divisor(self) -> int:
        return self.image_encoder.size_divisor

    @property
    def input_channels(self) -> int:
        """Channels of the network input: 3 (RGB), or one per sequence with modality fusion."""
        return self.fusion.num_sequences if self.fusion is not None else 3

    @property
    def sequences(self) -> list[str] | None:
        """The MRI sequences a fusion model takes, in input-channel order (None without fusion)."""
        return list(self.fusion.sequences) if self.fusion is not None else None

    def validate_images(self, images: torch.Tensor) -> None:
        validate_images(images, size_divisor=self.size_divisor, channels=self.input_channels)

    @property
    def text_dim(self) -> int:
        return self.text_encoder.embed_dim

    def encode_prompts(
        self, prompts: Sequence[str], modality: str | None = None, mode: str = "ensemble"
    ) -> torch.Tensor:
        """Unit-norm prompt embeddings ``[P, D]`` (frozen text tower + templates, cached)."""
        return self.text_encoder.encode_prompts(list(prompts), modality, mode=mode, rng=self.rng)

    def text_prompts(self, prompts: Sequence[str], modality: str | None = None) -> DecoderPrompts:
        """Text prompts in decoder space ``[P, ...]`` (template ensemble); ``forward`` with them
        gives the same logits as with ``encode_prompts(prompts, modality)``."""
        emb = self.encode_prompts(prompts, modality, mode="ensemble").to(self.device)
        return self.decoder.encode_text(emb)

    def forward(
        self,
        images: torch.Tensor,
        text_embeddings: torch.Tensor | DecoderPrompts,
        prompt_mask: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Segment ``images [B, 3, H, W]`` for ``text_embeddings [P, D]`` (shared) or ``[B, P, D]``,
        or for decoder-space prompts (:class:`DecoderPrompts` ``[P, ...]`` or ``[B, P, ...]``:
        text, visual or combined).

        ``prompt_mask [B, P]`` (True = real prompt) marks padding of per-sample prompt lists.
        With modality fusion, ``images`` is ``[B, S, H, W]`` (one channel per sequence of
        ``self.sequences``, absent ones all zero or marked False in ``present [B, S]``) and
        ``aux["fusion_weights"]`` holds the gate weights ``[B, S, H, W]``.
        """
        return self._run(images, text_embeddings, prompt_mask, present=present)[0]

    def _run(
        self,
        images: torch.Tensor,
        text_embeddings: torch.Tensor | DecoderPrompts,
        prompt_mask: torch.Tensor | None,
        return_embeddings: bool = False,
        present: torch.Tensor | None = None,
    ) -> tuple[ModelOutput, Any]:
        self.validate_images(images)
        b, _, h, w = images.shape
        if isinstance(text_embeddings, DecoderPrompts):
            text: Any = self._check_decoder_prompts(text_embeddings, b)
            p = text.tokens.shape[1]
        else:
            text = text_embeddings
            if text.ndim == 2:
                text = text.unsqueeze(0).expand(b, -1, -1)
            if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != self.text_dim or text.shape[1] == 0:
                raise InvalidPromptError(
                    f"text_embeddings must be [P, {self.text_dim}] or [{b}, P, {self.text_dim}] with P >= 1, "
                    f"got {tuple(text_embeddings.shape)}; use model.encode_prompts(prompts)"
                )
            p = text.shape[1]
        if prompt_mask is None:
            prompt_mask = torch.ones(b, p, dtype=torch.bool, device=images.device)
        else:
            prompt_mask = prompt_mask.to(device=images.device, dtype=torch.bool)
            if tuple(prompt_mask.shape) != (b, p):
                raise InvalidPromptError(f"prompt_mask must be [{b}, {p}], got {tuple(prompt_mask.shape)}")
            if not bool(prompt_mask.any(dim=1).all()):
                raise InvalidPromptError("every image needs at least one real prompt (a prompt_mask row is all False)")
        text = text.to(images.device)
        fusion_weights = None
        if self.fusion is not None:
            images, fusion_weights = self.fusion(images, present)
        feats = self.image_encoder(images)
        out = self.decoder(feats, text, prompt_mask, return_embeddings=return_embeddings)
        logits = F.interpolate(out.logits, size=(h, w), mode="bilinear", align_corners=False)
        pad = ~prompt_mask
        if bool(pad.any()):
            logits = logits.masked_fill(pad[:, :, None, None], PAD_LOGIT)
        similarity = out.cluster_text_similarity
        if similarity is not None and bool(pad.any()):
            similarity = similarity.masked_fill(pad[:, None, :], 0.0)
        return ModelOutput(
            logits=logits,
            prompt_mask=prompt_mask,
            responsibilities=out.responsibilities,
            cluster_text_similarity=similarity,
            aux={"deep_logits": out.deep_logits, "bases": out.bases, "fusion_weights": fusion_weights},
        ), out

    def _check_decoder_prompts(self, prompts: DecoderPrompts, b: int) -> DecoderPrompts:
        c, e = self.decoder.text_head.in_features, self.decoder.text_head.out_features
        shapes = (tuple(prompts.tokens.shape), tuple(prompts.keys.shape), tuple(prompts.deep_keys.shape))
        if prompts.tokens.ndim == 2:
            bias = None if prompts.bias is None else prompts.bias.reshape(1, -1).expand(b, -1)
            prompts = DecoderPrompts(*(t.unsqueeze(0).expand(b, -1, -1) for t in (prompts.tokens, prompts.keys, prompts.deep_keys)), bias)
        t, k, d = prompts.tokens, prompts.keys, prompts.deep_keys
        ok = (
            t.ndim == k.ndim == d.ndim == 3 and t.shape[:2] == k.shape[:2] == d.shape[:2]
            and t.shape[0] == b and t.shape[1] > 0 and t.shape[2] == c and k.shape[2] == e and d.shape[2] == e
            and (prompts.bias is None or tuple(prompts.bias.shape) == tuple(t.shape[:2]))
        )
        if not ok:
            raise InvalidPromptError(
                f"DecoderPrompts must have tokens [P, {c}], keys [P, {e}], deep_keys [P, {e}] (or with a batch "
                f"axis of {b}) and P >= 1, got {shapes}; build them with model.text_prompts / model.encode_exemplars"
            )
        return prompts

    def encode_exemplars(self, *args: Any, **kwargs: Any) -> DecoderPrompts:
        """Visual prompts ``[N, ...]``: ``encode_exemplar_prompts(...).visual`` (same arguments)."""
        return self.encode_exemplar_prompts(*args, **kwargs).visual

    def encode_exemplar_prompts(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        names: Sequence[str],
        modality: str | None | Sequence[str | None] = None,
        *,
        image_index: Sequence[int] | None = None,
        context: Sequence[Sequence[str]] | None = None,
        valid: torch.Tensor | None = None,
        contrast: float | Sequence[float] = CONTRASTS,
        calibrate: bool = True,
        generic_prompt: str = GENERIC_PROMPT,
    ) -> ExemplarPrompts:
        """Visual and combined prompts ``[N, ...]`` from N exemplars (training-free; see the
        module docstring).

        ``images [M, 3, H, W]``: preprocessed like ``predict_logits`` input. ``masks [N, H, W]``:
        weights in [0, 1] on the same grid (1 = the structure; letterbox padding 0), exemplar
        ``i`` on image ``image_index[i]`` (default: ``i``, then M == N). ``names [N]``: the
        structures. Each image runs once, prompted by ``context[m]`` (default: the names of its
        exemplars), so its pixel embeddings are those of a multi-prompt run; ``modality``
        (one, or one per image) picks the templates. Run in eval mode for deterministic prompts.

        Score vector = unit ``mean(inside) - contrast * mean(outside)`` of the unit pixel
        embeddings (``contrast`` 0: the plain masked mean; 1: the direction separating the
        structure from its surroundings; several values (default :data:`CONTRASTS`): per exemplar
        the one whose calibrated logits best reproduce its own mask), outside = ``valid [N, H, W]``
        (default all pixels; pass 0 on letterbox padding) minus the mask. ``calibrate`` (default True): the
        prompt's logit offset ``bias`` is the one whose threshold best reproduces the exemplar's own
        mask (Dice on the embedding grid), since the decoder's logit bias was trained for text.
        Two passes per image: one prompted by ``generic_prompt`` (default
        :data:`GENERIC_PROMPT`) gives ``visual`` (the exemplar alone: the generic prompt's token
        for the cross-attention, the masked-mean score vectors, the calibrated offset), one
        prompted by the names gives ``combined`` (the name's text token; score vectors = mean of
        the unit text and visual ones, so logits are the mean of both prompts' logits; its own
        calibrated offset).
        """
        validate_images(images, size_divisor=self.size_divisor)
        m, n = images.shape[0], len(names)
        index = list(range(m)) if image_index is None else [int(i) for i in image_index]
        if len(index) != n or any(not 0 <= i < m for i in index):
            raise InvalidExemplarError(f"image_index must give one image in 0..{m - 1} for each of the {n} exemplars")
        if masks.ndim != 3 or masks.shape[0] != n or masks.shape[-2:] != images.shape[-2:]:
            raise InvalidExemplarError(f"masks must be [{n}, {images.shape[-2]}, {images.shape[-1]}], got {tuple(masks.shape)}")
        cleaned = [clean_prompt(nm) for nm in names]
        if context is None:
            lists = [list(dict.fromkeys(nm for nm, i in zip(cleaned, index) if i == j)) or ["structure"] for j in range(m)]
        else:
            lists = [list(c) for c in context]
        if len(lists) != m:
            raise InvalidExemplarError(f"{len(lists)} context lists given for {m} exemplar images")
        batch = build_prompt_batch(lists, m)
        slot = []
        for i, (nm, j) in enumerate(zip(cleaned, index)):
            if nm not in batch.names[j]:
                raise InvalidExemplarError(f"context[{j}] {lists[j]} does not contain the name {names[i]!r} of exemplar {i}")
            slot.append(batch.names[j].index(nm))
        mode = modality if modality is None or isinstance(modality, str) else list(modality)
        text = self._batch_text(batch, mode, images.device)
        _, dec = self._run(images, text, batch.mask.to(images.device), return_embeddings=True)
        rows = torch.tensor(index, device=images.device)
        masks = masks.to(images.device).float()
        valid = torch.ones_like(masks) if valid is None else valid.to(images.device).float()
        candidates = [float(contrast)] if isinstance(contrast, (int, float)) else [float(c) for c in contrast]
        if not candidates or (len(candidates) > 1 and not calibrate):
            raise InvalidExemplarError("contrast must be one number, or several together with calibrate=True")
        # with the name: pixels attended to the name's text; logits = mean of text and visual logits
        text_tokens = self.decoder._tokens(text[rows, torch.tensor(slot, device=images.device)])
        text_keys = F.normalize(self.decoder.text_head(text_tokens).float(), dim=-1)
        text_deep = F.normalize(self.decoder.deep_text_head(text_tokens).float(), dim=-1)
        combined = self._visual_prompts(
            dec, rows, masks, valid, candidates, calibrate, text_tokens, (text_keys, text_deep)
        )
        # alone: pixels attend to a generic prompt, so no name is needed
        generic = self._batch_text(build_prompt_batch([generic_prompt], m), mode, images.device)  # [M, 1, D]
        _, dec_g = self._run(images, generic, None, return_embeddings=True)
        visual = self._visual_prompts(dec_g, rows, masks, valid, candidates, calibrate, self.decoder._tokens(generic[rows, 0]))
        return ExemplarPrompts(visual=visual, combined=combined)

    def _visual_prompts(
        self,
        dec: Any,
        rows: torch.Tensor,
        masks: torch.Tensor,
        valid: torch.Tensor,
        candidates: list[float],
        calibrate: bool,
        tokens: torch.Tensor,
        text_keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> DecoderPrompts:
        """Prompts from one exemplar pass: per exemplar the contrast (of ``candidates``) whose
        calibrated logits best reproduce its own mask; with ``text_keys`` the score vectors are
        the mean of the text and visual ones."""
        emb = F.normalize(dec.pixel_embeddings[rows].float(), dim=1)
        deep = F.normalize(dec.deep_embeddings[rows].float(), dim=1)
        scale = self.decoder.logit_scale.exp().clamp(max=100.0).float()
        shift = self.decoder.logit_bias.float()
        best = None
        for c in candidates:
            keys = _contrast_direction(emb, masks, valid, c)
            deep_keys = _contrast_direction(deep, masks, valid, c)
            if text_keys is not None:
                keys, deep_keys = (keys + text_keys[0]) / 2, (deep_keys + text_keys[1]) / 2
            if not calibrate:
                return DecoderPrompts(tokens, keys, deep_keys, None)
            bias, quality = _calibrated_offset(scale * torch.einsum("nchw,nc->nhw", emb, keys) + shift, masks, valid)
            if best is None:
                best = [keys, deep_keys, bias, quality]
                continue
            better = quality > best[3] + 1e-6  # ties keep the earlier (smaller) contrast
            for j, new in enumerate((keys, deep_keys, bias, quality)):
                shape = (-1,) + (1,) * (new.ndim - 1)
                best[j] = torch.where(better.view(shape), new, best[j])
        return DecoderPrompts(tokens, best[0], best[1], best[2])

    def _batch_text(self, batch: PromptBatch, modality: Any, device: torch.device) -> torch.Tensor:
        """Text embeddings ``[B, P, D]`` for a prompt batch (per-image modality allowed)."""
        mode = "random" if self.training else "ensemble"
        if isinstance(modality, list):
            table = {m: self.encode_prompts(batch.unique, m, mode).to(device) for m in dict.fromkeys(modality)}
            index = batch.index.to(device)
            return torch.stack([table[m][index[i]] for i, m in enumerate(modality)])
        emb = self.encode_prompts(batch.unique, modality, mode).to(device)
        return emb[batch.index.to(device)]

    def _predict(self, images: torch.Tensor, batch: PromptBatch, modality: Any) -> ModelOutput:
        mode = "random" if self.training else "ensemble"
        device = images.device
        if isinstance(modality, list):
            # per-image modality: encode the prompts once per distinct modality
            table = {m: self.encode_prompts(batch.unique, m, mode).to(device) for m in dict.fromkeys(modality)}
            index = batch.index.to(device)
            text = torch.stack([table[m][index[i]] for i, m in enumerate(modality)])
        else:
            emb = self.encode_prompts(batch.unique, modality, mode).to(device)
            if batch.shared:
                text = emb[batch.index[0].to(device)]
            else:
                text = emb[batch.index.to(device)]
        mask = batch.mask.to(device)
        return self.forward(images, text, mask if not batch.shared else None)



def _weights(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(masks[:, None], size=size, mode="area")[:, 0]


def _contrast_direction(emb: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, contrast: float) -> torch.Tensor:
    """Unit ``mean(inside) - contrast * mean(outside)`` ``[N, E]`` of unit embeddings ``[N, E, h, w]``;
    ``masks``/``valid`` ``[N, H, W]`` are area-resampled to ``h x w``."""
    inside = _weights(masks, emb.shape[-2:])
    outside = (_weights(valid, emb.shape[-2:]) - inside).clamp(min=0)
    n_in, n_out = inside.sum(dim=(1, 2)), outside.sum(dim=(1, 2))
    if bool((n_in <= 0).any()):
        raise InvalidExemplarError("an exemplar mask is empty at the network's resolution; mark a larger region")
    mean_in = torch.einsum("nchw,nhw->nc", emb, inside) / n_in[:, None]
    mean_out = torch.einsum("nchw,nhw->nc", emb, outside) / n_out.clamp(min=1e-6)[:, None]
    use = (n_out > 0).float()[:, None] * float(contrast)
    return F.normalize(mean_in - use * mean_out, dim=-1)


def _calibrated_offset(
    logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, steps: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per exemplar, the logit offset ``[N]`` whose zero crossing best reproduces its mask
    (Dice over the valid pixels of the ``logits [N, h, w]`` grid; candidates: quantiles), and
    that Dice ``[N]``."""
    target = _weights(masks, logits.shape[-2:]) >= 0.5
    ok = _weights(valid, logits.shape[-2:]) >= 0.5
    out = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    quality = torch.zeros_like(out)
    q = torch.linspace(0.0, 1.0, steps, device=logits.device)
    for i in range(logits.shape[0]):
        vals, tgt = logits[i][ok[i]], target[i][ok[i]]
        if vals.numel() == 0 or not bool(tgt.any()):
            continue
        thresholds = torch.quantile(vals, q)
        pred = vals[None] > thresholds[:, None]
        inter = (pred & tgt[None]).sum(1).float()
        dice = 2 * inter / (pred.sum(1) + tgt.sum()).float().clamp(min=1)
        best = int(torch.argmax(dice))
        out[i], quality[i] = -thresholds[best], dice[best]
    return out, quality

