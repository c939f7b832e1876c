"""Semi-supervised training: an EMA teacher gives filtered pseudo-labels on unlabelled images.

Mean-teacher / FixMatch-style consistency, following the semi-supervised stage of VESSA:

- the teacher is an exponential moving average of the student, updated after every optimiser
  step: ``teacher = d * teacher + (1 - d) * student`` for every trainable parameter and every
  floating-point buffer (integer buffers are copied); with ``ema_warmup`` the decay is
  ``d = min(ema_decay, (1 + step) / (10 + step))`` so the teacher leaves the random decoder
  initialisation quickly;
- each unlabelled image comes as a weak view (teacher) and a strong view (student) with the same
  geometry (:class:`emclip.data.unlabelled.UnlabelledDataset`);
- pseudo-labels are the teacher's per-prompt sigmoid probabilities thresholded at 0.5; only
  pixels where the teacher is confident (``p >= confidence`` or ``p <= 1 - confidence``)
  contribute to the student's BCE + soft Dice (:func:`pseudo_label_loss`);
- the pseudo-label loss weight ramps up as ``weight * exp(-5 (1 - t)^2)``, ``t`` = step /
  (``rampup_fraction`` * total steps).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .losses import LossConfig, prompt_weights, segmentation_loss

SELECT = ("teacher", "student", "better")


@dataclass
class SemiSupervisedConfig:
    """The ``semi_supervised:`` section of a training config.

    ``enabled`` (False): train on unlabelled images too (images without masks, entries with
    ``unlabelled: true`` and the patients left out by ``labelled_fraction``); when False those
    images are not used at all. ``ema_decay`` (0.99) and ``ema_warmup`` (True) of the teacher.
    ``confidence`` (0.9): a pixel gives a pseudo-label when the teacher's probability is
    >= confidence or <= 1 - confidence. ``weight`` (1.0): final weight of the pseudo-label loss,
    reached after ``rampup_fraction`` (0.3) of the steps. ``unlabelled_batch_size`` (None: the
    labelled ``batch_size``): unlabelled images per step (global). Strong view: ``noise_std``
    (0.08), ``cutout_p`` (0.5). ``select`` (teacher): the model validated for ``best/`` —
    ``teacher``, ``student`` or ``better`` (the one with the higher validation Dice each epoch).
    """

    enabled: bool = False
    ema_decay: float = 0.99
    ema_warmup: bool = True
    confidence: float = 0.9
    weight: float = 1.0
    rampup_fraction: float = 0.3
    unlabelled_batch_size: int | None = None
    noise_std: float = 0.08
    cutout_p: float = 0.5
    select: str = "teacher"

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"semi_supervised.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"semi_supervised.confidence must be in [0.5, 1), got {self.confidence}")
        if self.weight < 0 or not 0 <= self.rampup_fraction <= 1:
            raise ConfigError("semi_supervised: weight must be >= 0 and rampup_fraction in [0, 1]")
        if self.unlabelled_batch_size is not None and self.unlabelled_batch_size < 1:
            raise ConfigError("semi_supervised.unlabelled_batch_size must be >= 1 (or null for batch_size)")
        if not 0 <= self.cutout_p <= 1 or self.noise_std < 0:
            raise ConfigError("semi_supervised: cutout_p must be in [0, 1] and noise_std >= 0")
        if self.select not in SELECT:
            raise ConfigError(f"semi_supervised.select must be one of {SELECT}, got {self.select!r}")


def rampup_weight(step: int, total_steps: int, cfg: SemiSupervisedConfig) -> float:
    """``weight * exp(-5 (1 - t)^2)`` with ``t = min(1, step / (rampup_fraction * total_steps))``."""
    span = cfg.rampup_fraction * total_steps
    if span <= 0:
        return float(cfg.weight)
    t = min(1.0, step / span)
    return float(cfg.weight * math.exp(-5.0 * (1.0 - t) ** 2))


class EMATeacher:
    """A frozen copy of the student whose weights follow the student's by EMA.

    Tracks the student's trainable parameters and persistent buffers (BatchNorm statistics, EM
    bases, text centre; floating-point ones averaged, integer ones copied); frozen parameters and
    non-persistent buffers stay as copied from the student at construction. ``state_dict()`` /
    ``load_state_dict()`` hold exactly the tracked tensors (saved in the trainer state).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.module = copy.deepcopy(student)
        self.module.eval()
        self.module.requires_grad_(False)
        self.param_names = [n for n, p in student.named_parameters() if p.requires_grad]
        persistent = set(student.state_dict())
        self.buffer_names = [n for n, _ in student.named_buffers() if n in persistent]

    def decay_at(self, step: int) -> float:
        """Decay used for the update after optimiser step ``step`` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """``teacher = d * teacher + (1 - d) * student``; returns ``d``."""
        d = self.decay_at(step)
        sp, tp = dict(student.named_parameters()), dict(self.module.named_parameters())
        for n in self.param_names:
            tp[n].lerp_(sp[n].detach().to(tp[n].dtype), 1.0 - d)
        sb, tb = dict(student.named_buffers()), dict(self.module.named_buffers())
        for n in self.buffer_names:
            if tb[n].is_floating_point():
                tb[n].lerp_(sb[n].detach().to(tb[n].dtype), 1.0 - d)
            else:
                tb[n].copy_(sb[n])
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.module.state_dict()
        return {n: sd[n].detach().cpu().clone() for n in self.param_names + self.buffer_names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = set(self.param_names + self.buffer_names)
        if set(state) != names:
            missing, extra = sorted(names - set(state))[:3], sorted(set(state) - names)[:3]
            raise ConfigError(f"the saved teacher does not match the model (missing {missing}, unexpected {extra})")
        own = self.module.state_dict()
        with torch.no_grad():
            for n, t in state.items():
                own[n].copy_(t.to(own[n].device, own[n].dtype))


def confident_mask(teacher_probs: torch.Tensor, confidence: float) -> torch.Tensor:
    """Pixels where the teacher is sure: ``p >= confidence`` or ``p <= 1 - confidence`` (bool)."""
    return (teacher_probs >= confidence) | (teacher_probs <= 1.0 - confidence)


def pseudo_label_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    confidence: float = 0.9,
    cfg: LossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE + soft Dice of the student against the teacher's hard pseudo-labels on confident
    pixels only. Inputs ``[B, P, H, W]`` (student logits, teacher probabilities), ``prompt_mask``
    ``[B, P]`` bool. BCE is summed over confident pixels and divided by all pixels (FixMatch), the
    Dice uses confident pixels only; prompts with no confident pixel contribute nothing. Averaged
    over the real prompts of each sample, then over samples. Returns the loss and detached
    ``{"unsup", "confident"}`` (the fraction of confident pixels of real prompts)."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)} differ")
    q = teacher_probs.detach().float()
    m = confident_mask(q, confidence).float()
    target = (q >= 0.5).float()
    logits = student_logits.float()
    real = prompt_weights(prompt_mask, logits)
    valid = real * (m.flatten(2).sum(-1) > 0).float()
    loss, _ = segmentation_loss(logits, target, valid, cfg, pixel_weight=m)
    frac = (m.flatten(2).mean(-1) * real).sum() / real.sum().clamp_min(1.0)
    return loss, {"unsup": loss.detach(), "confident": frac.detach()}


def merge_batches(labelled: dict, unlabelled: dict) -> dict:
    """One batch for a single student forward: the labelled samples then the unlabelled strong
    views; per-sample prompt lists are kept, ``prompt_mask`` is padded to the wider batch."""
    pl, pu = labelled["prompt_mask"].shape[1], unlabelled["prompt_mask"].shape[1]
    width = max(pl, pu)
    mask = torch.zeros(labelled["prompt_mask"].shape[0] + unlabelled["prompt_mask"].shape[0], width, dtype=torch.bool)
    mask[: labelled["prompt_mask"].shape[0], :pl] = labelled["prompt_mask"]
    mask[labelled["prompt_mask"].shape[0]:, :pu] = unlabelled["prompt_mask"]
    out = {key: list(labelled[key]) + list(unlabelled[key]) for key in ("prompts", "texts", "names", "modality")}
    out["prompt_mask"] = mask
    return out


__all__ = ["EMATeacher", "SemiSupervisedConfig", "confident_mask", "merge_batches", "pseudo_label_loss",
           "rampup_weight"]
