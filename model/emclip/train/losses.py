"""Per-prompt segmentation loss: binary cross-entropy + soft Dice on sigmoid logits.

Each prompt is its own binary problem (nested structures such as cup-inside-disc need
independent sigmoids, not a softmax). Padded prompts (``prompt_mask`` False) contribute nothing.
The loss is averaged first over the real prompts of each sample, then over samples, so the
mean over a global batch equals the mean of equal-sized per-rank means (DDP gives the same
gradient as one process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    """``bce_weight`` (default 1.0), ``dice_weight`` (1.0), ``smooth`` (1.0, added to the Dice
    numerator and denominator so an empty target with an empty prediction scores 1),
    ``deep_weight`` (0.4: the same loss on the decoder's deepest-level logits, upsampled, when the
    model returns ``aux["deep_logits"]``; 0 disables)."""

    bce_weight: float = 1.0
    dice_weight: float = 1.0
    smooth: float = 1.0
    deep_weight: float = 0.4


def soft_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - soft Dice`` per (sample, prompt): inputs ``[B, P, H, W]``, returns ``[B, P]``.
    ``pixel_weight`` (``[B, P, H, W]``, default None = all 1) multiplies probabilities and targets."""
    probs = torch.sigmoid(logits.float())
    t = targets.float()
    if pixel_weight is not None:
        probs = probs * pixel_weight
        t = t * pixel_weight
    inter = (probs * t).flatten(2).sum(-1)
    denom = probs.flatten(2).sum(-1) + t.flatten(2).sum(-1)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def prompt_weights(prompt_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """``prompt_mask`` ``[B, P]`` as float on the device of ``logits`` ``[B, P, ...]`` (None = all 1)."""
    if prompt_mask is None:
        return torch.ones(logits.shape[:2], device=logits.device)
    return prompt_mask.to(logits.device).float()


def segmentation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    cfg: LossConfig | None = None,
    pixel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted BCE + soft Dice. ``logits``/``targets``: ``[B, P, H, W]``; ``prompt_mask``: ``[B, P]``
    bool (None = all real); ``pixel_weight``: ``[B, P, H, W]`` (None = all 1) multiplies the
    per-pixel BCE (still divided by all pixels) and the Dice inputs. Returns the scalar loss and
    its detached parts ``{"bce", "dice"}``."""
    cfg = cfg or LossConfig()
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    m = prompt_weights(prompt_mask, logits)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if pixel_weight is not None:
        bce = bce * pixel_weight
    bce = bce.flatten(2).mean(-1)
    dsc = soft_dice_loss(logits, targets, cfg.smooth, pixel_weight)
    per_prompt = cfg.bce_weight * bce + cfg.dice_weight * dsc
    n = m.sum(1).clamp_min(1.0)
    per_sample = (per_prompt * m).sum(1) / n
    loss = per_sample.mean()
    parts = {
        "bce": ((bce * m).sum(1) / n).mean().detach(),
        "dice": ((dsc * m).sum(1) / n).mean().detach(),
    }
    return loss, parts
