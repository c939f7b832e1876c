"""SegmentationModel: the base class every network implements, and its input checks.

``predict_logits(images, prompts, modality=None)`` is the single entry point of inference and
training. Images must be float tensors ``[B, 3, H, W]`` (already intensity-normalised and
standardised with ``pixel_mean``/``pixel_std``) whose sides are multiples of ``size_divisor``.
Odd sizes are *refused* with a message saying how to fix them rather than padded internally:
inference resizes to ``image_size`` (emclip.preprocess), so silent padding would only hide
mistakes and shift borders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, InvalidImageError, InvalidPromptError
from ..prompts import MAX_PROMPT_CHARS, clean_prompt

PAD_LOGIT = -1e4
"""Logit written for padded prompt slots (``prompt_mask`` False): sigmoid gives exactly 0."""


@dataclass
class ModelOutput:
    """What every model returns.

    ``logits [B, P, H, W]``: per-prompt sigmoid logits at input resolution (padded slots hold
    ``PAD_LOGIT``). ``prompt_mask [B, P] bool``: True for real prompts.
    ``responsibilities [B, K, h, w]``: EM soft assignments (sum to 1 over K) or None.
    ``cluster_text_similarity [B, K, P]``: cosine of each EM basis with each prompt, or None.
    ``aux``: extra tensors, e.g. ``deep_logits [B, P, h, w]`` and ``bases [B, C, K]`` (EMCLIP).
    """

    logits: torch.Tensor
    prompt_mask: torch.Tensor
    responsibilities: torch.Tensor | None = None
    cluster_text_similarity: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptBatch:
    """Prompts for a batch: ``names[b]`` (padded with ""), ``unique`` texts, ``index [B, P]``
    into ``unique`` and ``mask [B, P]``. ``shared`` is True when one list serves the batch."""

    names: list[list[str]]
    unique: list[str]
    index: torch.Tensor
    mask: torch.Tensor
    shared: bool


def validate_images(images: Any, *, size_divisor: int = 1, check_finite: bool = True, channels: int = 3) -> None:
    """Raise :class:`InvalidImageError` (saying how to fix it) unless ``images`` is a float
    ``[B, channels, H, W]`` tensor (default 3; a fusion model takes one channel per sequence)
    with finite values and H, W multiples of ``size_divisor``."""
    if not isinstance(images, torch.Tensor):
        raise InvalidImageError(
            f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}; "
            "use emclip.segment() for numpy arrays, or torch.as_tensor(...)"
        )
    if images.ndim != 4:
        hint = {
            2: "a single grey image: use images[None, None].expand(-1, 3, -1, -1)",
            3: "one image: add the batch axis with images[None] (channels first: [3, H, W])",
        }.get(images.ndim, "reshape it to [batch, 3, height, width]")
        raise InvalidImageError(f"images must have 4 dimensions [B, 3, H, W], got shape {tuple(images.shape)}; {hint}")
    b, c, h, w = images.shape
    if b == 0:
        raise InvalidImageError("the batch is empty: pass at least one image")
    if c != channels and channels != 3:
        raise InvalidImageError(
            f"this model fuses {channels} MRI sequences: images must be [B, {channels}, H, W] (one channel per "
            f"sequence, absent ones all zero), got shape {tuple(images.shape)}; use emclip.segment(..., channels=[...])"
        )
    if c != 3 and channels == 3:
        hint = (
            "it looks channels-last: use images.permute(0, 3, 1, 2)" if images.shape[-1] == 3
            else "repeat a grey channel with images.expand(-1, 3, -1, -1)" if c == 1
            else "convert to RGB first (emclip.preprocess)"
        )
        raise InvalidImageError(f"images must have 3 channels (RGB) on axis 1, got {c} (shape {tuple(images.shape)}); {hint}")
    if not images.is_floating_point():
        raise InvalidImageError(
            f"images must be floating point (normalised), got {images.dtype}; "
            "scale to [0, 1] and standardise with the model's pixel_mean/pixel_std (emclip.preprocess)"
        )
    if size_divisor > 1 and (h % size_divisor or w % size_divisor):
        nh = max(size_divisor, round(h / size_divisor) * size_divisor)
        nw = max(size_divisor, round(w / size_divisor) * size_divisor)
        raise InvalidImageError(
            f"image size {h}x{w} is not a multiple of {size_divisor}; resize or pad it to e.g. {nh}x{nw} "
            "(emclip.segment and emclip.preprocess do this for you)"
        )
    # One reduction decides in the usual case: a NaN or infinity anywhere makes the sum non-finite.
    # Only a non-finite sum (which huge finite values can also give) needs the element-wise test.
    wide = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else None
    if check_finite and not bool(torch.isfinite(images.sum(dtype=wide))) and not bool(torch.isfinite(images).all()):
        raise InvalidImageError("images contain NaN or infinite values; replace them (e.g. torch.nan_to_num) before segmenting")


def build_prompt_batch(prompts: Any, batch_size: int) -> PromptBatch:
    """Check ``prompts`` (one list for all images, or one list per image) and index them."""
    if isinstance(prompts, str):
        raise InvalidPromptError(
            "prompts must be a list of strings, e.g. ['optic disc', 'optic cup']; "
            "use emclip.parse_prompts('optic disc, optic cup') to split a string"
        )
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InvalidPromptError("prompts must be a non-empty list of strings (or one such list per image)")
    per_sample = all(isinstance(p, (list, tuple)) for p in prompts)
    if per_sample:
        if len(prompts) != batch_size:
            raise InvalidPromptError(
                f"{len(prompts)} prompt lists given for {batch_size} images; give one list per image or one shared list"
            )
        lists = [list(p) for p in prompts]
    elif any(isinstance(p, (list, tuple)) for p in prompts):
        raise InvalidPromptError("mixing strings and lists in prompts: give one list of strings, or one list per image")
    else:
        lists = [list(prompts)]
    cleaned: list[list[str]] = []
    for i, items in enumerate(lists):
        if not items:
            raise InvalidPromptError(f"image {i} has no prompt; give at least one structure name per image")
        row = []
        for item in items:
            text = clean_prompt(item)
            if not text:
                raise InvalidPromptError("a prompt is empty; remove it or type a structure name such as 'optic cup'")
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidPromptError(f"prompt of {len(text)} characters is too long (at most {MAX_PROMPT_CHARS})")
            row.append(text)
        cleaned.append(row)
    unique = list(dict.fromkeys(t for row in cleaned for t in row))
    where = {t: i for i, t in enumerate(unique)}
    width = max(len(row) for row in cleaned)
    rows = cleaned if per_sample else cleaned * batch_size
    index = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        index[b, : len(row)] = torch.tensor([where[t] for t in row])
        mask[b, : len(row)] = True
    names = [row + [""] * (width - len(row)) for row in rows]
    return PromptBatch(names=names, unique=unique, index=index, mask=mask, shared=not per_sample)


class SegmentationModel(nn.Module):
    """Base of all networks: holds the :class:`ModelConfig`, checks inputs, maps prompts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def image_size(self) -> int:
        """Square network input side (pixels)."""
        return self.config.image_size

    @property
    def pixel_mean(self) -> tuple[float, float, float]:
        return tuple(self.config.pixel_mean)

    @property
    def pixel_std(self) -> tuple[float, float, float]:
        return tuple(self.config.pixel_std)

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (the coarsest feature stride)."""
        return 32

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def check_image_size(self) -> None:
        """Raise ConfigError unless ``image_size`` is a multiple of ``size_divisor``."""
        if self.image_size % self.size_divisor:
            fixed = max(self.size_divisor, round(self.image_size / self.size_divisor) * self.size_divisor)
            raise ConfigError(
                f"image_size={self.image_size} is not a multiple of {self.size_divisor} (the coarsest feature stride "
                f"of this encoder); use e.g. image_size={fixed}"
            )

    def validate_images(self, images: torch.Tensor) -> None:
        validate_images(images, size_divisor=self.size_divisor)

    def predict_logits(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | Sequence[Sequence[str]],
        modality: str | None | Sequence[str | None] = None,
    ) -> ModelOutput:
        """Per-prompt logits for ``images [B, 3, H, W]``.

        ``prompts``: one list shared by the batch, or one list per image (padded; see
        ``ModelOutput.prompt_mask``). ``modality``: free text ("fundus"), None, or one per image;
        it selects the prompt templates.
        """
        self.validate_images(images)
        batch = build_prompt_batch(prompts, images.shape[0])
        if modality is not None and not isinstance(modality, str):
            modality = list(modality)
            if len(modality) != images.shape[0]:
                raise InvalidPromptError(f"{len(modality)} modalities given for {images.shape[0]} images")
        return self._predict(images, batch, modality)

    def _predict(self, images: torch.Tensor, batch: PromptBatch, modality: Any) -> ModelOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement _predict")
