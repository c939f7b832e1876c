"""Modality fusion: any subset of MRI sequences -> the 3-channel input of the image tower.

The fusion sits *before* the pretrained image encoder, so the tower, its pretrained weights and
everything after it stay unchanged (a model without fusion is exactly the old model).

Input ``x [B, S, H, W]``: one channel per sequence of ``fusion.sequences`` (config order), each
normalised to [0, 1] (:func:`emclip.sequences.normalise_sequence`), absent sequences all zero
(or marked in ``present [B, S]``). For each present sequence ``s``:

- a stem (conv3x3 1->C, GELU, conv3x3 C->C) gives features ``f_s [B, C, H, W]``, plus a learned
  per-sequence embedding ``e_s [C]`` (zero at start). ``shared_stems`` lets a sequence use
  another's stem (default ``t1ce -> t1``: both T1-weighted), so a sequence never seen in training
  (T1 for a FLAIR+T1ce model) still goes through a *trained* stem; its own embedding stays zero;
- a gate (1x1 conv C->C, GELU, 1x1 conv C->1, shared by all sequences) scores every pixel
  (``gate="pixel"``) or the image mean (``gate="image"``); a softmax over the *present*
  sequences (absent ones get weight exactly 0) gives weights ``w_s`` that sum to 1.

Output ``(y [B, 3, H, W], w [B, S, H, W])`` with
``y = (sum_s w_s x_s - pixel_mean) / pixel_std + P(sum_s w_s f_s)``: a gated grey image, standardised
like the tower expects, plus a learned 1x1 projection to 3 channels, initialised to zero, so an
untrained fusion feeds the pretrained tower a plain grey image. One sequence is the special case
``w = 1``. In training, each present sequence is dropped with probability ``sequence_dropout``
(at least one is kept), so the model learns to work with any subset.

The buffer ``seen [S]`` (saved with the weights) records which sequences appeared in training.
With ``unseen="ignore"`` (default) inference leaves out present sequences that were never seen
(unless that would leave nothing, or the model was never trained): on the brain benchmark an
unseen T1 through the shared stem cost 0.08 Dice against FLAIR alone. ``unseen="use"`` keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FusionConfig
from ..errors import InvalidArgumentError, InvalidImageError
from ..sequences import canonical_sequences


class SequenceStem(nn.Module):
    """conv3x3 1->C, GELU, conv3x3 C->C (no normalisation: inputs are already in [0, 1])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ModalityFusion(nn.Module):
    """Fuse any subset of ``cfg.sequences`` into ``[B, 3, H, W]`` (see the module docstring)."""

    def __init__(
        self, cfg: FusionConfig, pixel_mean: Sequence[float], pixel_std: Sequence[float]
    ) -> None:
        super().__init__()
        self.sequences = list(cfg.sequences)
        self.gate_mode = cfg.gate
        self.sequence_dropout = float(cfg.sequence_dropout)
        self.unseen = cfg.unseen
        c = int(cfg.stem_channels)
        self.stem_of = {s: cfg.shared_stems.get(s, s) for s in self.sequences}
        self.stems = nn.ModuleDict({name: SequenceStem(c) for name in dict.fromkeys(self.stem_of.values())})
        self.embedding = nn.Parameter(torch.zeros(len(self.sequences), c))
        self.gate = nn.Sequential(nn.Conv2d(c, c, 1), nn.GELU(), nn.Conv2d(c, 1, 1))
        self.proj = nn.Conv2d(c, 3, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("seen", torch.zeros(len(self.sequences), dtype=torch.bool))
        self.register_buffer("mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(pixel_std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    def present_from(self, names: Sequence[str]) -> torch.Tensor:
        """``present [S] bool`` for the named sequences (unknown name: InvalidArgumentError)."""
        got = canonical_sequences(names, self.sequences)
        return torch.tensor([s in got for s in self.sequences], dtype=torch.bool)

    def _check(self, x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_sequences:
            raise InvalidImageError(
                f"a fusion model takes [B, {self.num_sequences}, H, W]: one channel per sequence "
                f"{self.sequences} (absent ones all zero), got shape {tuple(x.shape)}; "
                "use emclip.segment(..., channels=[...]) to build it from named channels"
            )
        if present is None:
            present = x.detach().flatten(2).abs().amax(-1) > 0  # an all-zero channel is absent
        else:
            present = torch.as_tensor(present, dtype=torch.bool, device=x.device)
            if present.ndim == 1:
                present = present.unsqueeze(0).expand(x.shape[0], -1)
            if tuple(present.shape) != (x.shape[0], self.num_sequences):
                raise InvalidArgumentError(
                    f"present must be [{x.shape[0]}, {self.num_sequences}] (or [{self.num_sequences}]), "
                    f"got {tuple(present.shape)}"
                )
        return present.to(x.device)

    def unseen_of(self, present: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` bool: present sequences inference leaves out (``unseen="ignore"``, see module doc)."""
        if self.training or self.unseen == "use" or not bool(self.seen.any()):
            return torch.zeros_like(present)
        drop = present & ~self.seen.to(present.device)[None]
        keeps_some = (present & ~drop).any(dim=1, keepdim=True)
        return drop & keeps_some

    def _drop(self, present: torch.Tensor) -> torch.Tensor:
        """Training: drop each present sequence with probability ``sequence_dropout``, keep >= 1."""
        if not self.training or self.sequence_dropout <= 0:
            return present
        drop = (torch.rand(present.shape, device=present.device) < self.sequence_dropout) & present
        kept = present & ~drop
        lost = ~kept.any(dim=1)
        if bool(lost.any()):  # keep one random present sequence in rows that lost all
            score = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
            one = F.one_hot(score.argmax(dim=1), present.shape[1]).bool()
            kept = torch.where(lost[:, None], one, kept)
        return kept

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, H, W]`` (+ optional ``present [B, S]``) -> ``(y [B, 3, H, W], weights [B, S, H, W])``."""
        present = self._check(x, present)
        if self.training:
            self.seen |= present.any(dim=0)
        present = self._drop(present & ~self.unseen_of(present))
        empty = ~present.any(dim=1)
        if bool(empty.any()):  # nothing present (a blank slice): treat all as present (all zero anyway)
            present = present | empty[:, None]
        b, s, h, w = x.shape
        active = [i for i in range(s) if bool(present[:, i].any())]  # only sequences some image has
        feats = torch.stack(
            [self.stems[self.stem_of[self.sequences[i]]](x[:, i : i + 1]) + self.embedding[i].view(1, -1, 1, 1)
             for i in active],
            dim=1,
        )  # [B, A, C, H, W]
        a = len(active)
        score = self.gate(feats.flatten(0, 1)).view(b, a, h, w)
        if self.gate_mode == "image":
            score = score.mean(dim=(2, 3), keepdim=True).expand(-1, -1, h, w)
        mask = present[:, active]
        score = score.float().masked_fill(~mask[:, :, None, None], float("-inf"))
        weights_a = torch.softmax(score, dim=1).to(x.dtype)  # absent: exactly 0
        fused = (weights_a.unsqueeze(2) * feats).sum(dim=1)
        grey = (weights_a * x[:, active]).sum(dim=1, keepdim=True)
        y = (grey - self.mean) / self.std + self.proj(fused)
        weights = x.new_zeros(b, s, h, w)
        weights[:, active] = weights_a
        return y, weights
