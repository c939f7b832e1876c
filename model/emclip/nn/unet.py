"""U-Net baseline: the fair comparison without text (same data, budget and augmentation).

The network predicts one sigmoid channel per entry of ``config.class_names``. Prompts are mapped
to channels by name or synonym (emclip.prompts.canonical_name plus ``config.synonyms``), case
insensitively; a prompt it does not know raises :class:`UnknownPromptError` listing the names it
does. The encoder is a plain conv encoder (``unet.encoder="plain"``) or the config's open_clip
image tower (``"image_encoder"``, e.g. the same tf_efficientnet_lite0 as cpu-default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import UnknownPromptError
from ..prompts import canonical_name, clean_prompt
from .base import PAD_LOGIT, ModelOutput, PromptBatch, SegmentationModel, validate_images
from .decoder import conv_norm_act
from .image_encoder import ImageEncoder


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_norm_act(cin, cout, 3), conv_norm_act(cout, cout, 3))


class PlainEncoder(nn.Module):
    """Conv encoder with ``depth`` 2x down-samplings: channels base * 2**i, strides 1..2**depth."""

    def __init__(self, base: int, depth: int) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.stages = nn.ModuleList([double_conv(3, chans[0])])
        self.stages.extend(nn.Sequential(nn.MaxPool2d(2), double_conv(chans[i - 1], chans[i])) for i in range(1, depth + 1))
        self.out_channels = chans
        self.strides = [2**i for i in range(depth + 1)]

    @property
    def size_divisor(self) -> int:
        return self.strides[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Top-down path: upsample, concatenate the skip, double conv; ends at the finest level."""

    def __init__(self, in_channels: list[int], width: int) -> None:
        super().__init__()
        self.top = conv_norm_act(in_channels[-1], width, 1)
        self.blocks = nn.ModuleList(double_conv(width + c, width) for c in in_channels[:-1])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.top(feats[-1])
        for i in reversed(range(len(feats) - 1)):
            skip = feats[i]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.blocks[i](torch.cat([x, skip], dim=1))
        return x


class UNet(SegmentationModel):
    """Closed-vocabulary U-Net; ``forward(images) -> [B, num_classes, H, W]`` logits."""

    def __init__(self, config: ModelConfig, encoder: ImageEncoder | None = None) -> None:
        super().__init__(config)
        u = config.unet
        if u.encoder == "plain":
            self.encoder: nn.Module = PlainEncoder(u.base_channels, u.depth)
        else:
            if encoder is None:
                raise ValueError("unet.encoder='image_encoder' needs an ImageEncoder")
            self.encoder = encoder
        self.decoder = UNetDecoder(list(self.encoder.out_channels), u.decoder_channels)
        self.head = nn.Conv2d(u.decoder_channels, len(config.class_names), 1)
        self.class_names = list(config.class_names)
        self._lookup = self._build_lookup()
        self.check_image_size()

    def _build_lookup(self) -> dict[str, int]:
        table: dict[str, int] = {}
        extra = {k: tuple(v) for k, v in self.config.synonyms.items()}
        for i, name in enumerate(self.class_names):
            table[name.casefold()] = i
            for syn in extra.get(name, ()):
                table[clean_prompt(syn).casefold()] = i
        return table

    @property
    def size_divisor(self) -> int:
        return self.encoder.size_divisor

    def known_prompts(self) -> list[str]:
        """Class names this model predicts (synonyms of them work too)."""
        return list(self.class_names)

    def class_index(self, prompt: str) -> int:
        """Output channel of ``prompt`` (name or synonym); UnknownPromptError if none."""
        key = clean_prompt(prompt).casefold()
        if key in self._lookup:
            return self._lookup[key]
        canon = canonical_name(prompt, {k: tuple(v) for k, v in self.config.synonyms.items()})
        if canon is not None and canon.casefold() in self._lookup:
            return self._lookup[canon.casefold()]
        raise UnknownPromptError(
            f"the U-Net baseline does not know {prompt!r}; it segments only: {', '.join(self.class_names)} "
            "(or their synonyms, e.g. 'OD', 'LV'). Use an EM-CLIP model for free-text prompts"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        validate_images(images, size_divisor=self.size_divisor)
        feats = self.encoder(images)
        x = self.head(self.decoder(feats)).contiguous()  # channels-last encoders: back to NCHW (few channels)
        if x.shape[-2:] != images.shape[-2:]:
            x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return x

    def _predict(self, images: torch.Tensor, batch: PromptBatch, modality: Any) -> ModelOutput:
        channels = torch.tensor([self.class_index(p) for p in batch.unique], dtype=torch.long)
        index = channels[batch.index].to(images.device)  # [B, P]
        mask = batch.mask.to(images.device)
        logits = self.forward(images)
        picked = torch.gather(logits, 1, index[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))
        picked = picked.masked_fill(~mask[:, :, None, None], PAD_LOGIT)
        return ModelOutput(logits=picked, prompt_mask=mask)
