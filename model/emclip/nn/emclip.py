"""EMCLIP: open_clip image tower -> EM aggregation -> text-guided pixel decoder, prompted by a
frozen open_clip text tower.

``predict_logits(images, prompts, modality=None)`` encodes the prompts (template ensemble in
eval, one random template per prompt in training; cached) and calls
``forward(images, text_embeddings, prompt_mask)``, which trainers may call directly with their
own embeddings. Ablations are config flags: ``em.enabled`` (EM aggregation) and
``decoder.text_guidance`` (pixel-to-text cross-attention).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import InvalidPromptError
from .base import PAD_LOGIT, ModelOutput, PromptBatch, SegmentationModel, validate_images
from .decoder import TextGuidedPixelDecoder
from .image_encoder import ImageEncoder
from .text_encoder import TextEncoder


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
        self.check_image_size()

    @property
    def size_divisor(self) -> int:
        return self.image_encoder.size_divisor

    @property
    def text_dim(self) -> int:
        return self.text_encoder.embed_dim

    def encode_prompts(
        self, prompts: Sequence[str], modality: str | None = None, mode: str = "ensemble"
    ) -> torch.Tensor:
        """Unit-norm prompt embeddings ``[P, D]`` (frozen text tower + templates, cached)."""
        return self.text_encoder.encode_prompts(list(prompts), modality, mode=mode, rng=self.rng)

    def forward(
        self,
        images: torch.Tensor,
        text_embeddings: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Segment ``images [B, 3, H, W]`` for ``text_embeddings [P, D]`` (shared) or ``[B, P, D]``.

        ``prompt_mask [B, P]`` (True = real prompt) marks padding of per-sample prompt lists.
        """
        validate_images(images, size_divisor=self.size_divisor)
        b, _, h, w = images.shape
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
        feats = self.image_encoder(images)
        out = self.decoder(feats, text, prompt_mask)
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
            aux={"deep_logits": out.deep_logits, "bases": out.bases},
        )

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
