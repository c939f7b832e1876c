"""EM aggregation of visual features into K semantic bases (EMANet semantics).

With projected features x ``[B, C, N]`` (N = h*w pixels) and bases mu ``[B, C, K]``:

- E-step: ``z = softmax_K(lam * x^T mu)``  ``[B, N, K]``, soft assignment of pixels to bases;
- M-step: ``mu = x @ (z / sum_n z)``, then L2-normalise every basis over C.

T iterations start from the stored bases (a buffer, initialised N(0, sqrt(2/K)) and normalised).
The reconstruction ``mu z^T`` goes through ReLU, a 1x1 conv and GroupNorm and is added to x.
In training the buffer follows the batch mean of the final bases with ``momentum`` (0.9 kept),
all-reduced across processes when torch.distributed is initialised; in eval every image starts
from the buffer, so the bases are re-estimated per image (a built-in test-time adaptation).

Each iteration can only increase F(mu) = sum_n log sum_k exp(lam * x_n . mu_k): by Jensen F is
bounded below by sum_nk z_nk lam x_n . mu_k + H(z) with equality at the current mu, and the
M-step maximises that bound over unit-norm bases (normalising z over pixels only rescales
sum_n z_nk x_n). Tests check this.

Gradient flow (``grad_mode``):

- ``"none"``: EMANet. All iterations run without gradient, so the EM path gives no gradient to
  the input projection (it only learns through the residual).
- ``"last"`` (default): T-1 iterations without gradient, then one E/M step with gradient from
  the detached bases. The projection learns features that cluster well and the
  responsibilities/bases can carry losses (e.g. the pixel-text map), at the memory of one
  iteration and without back-propagating through a long unrolled fixed-point loop, which is
  unstable (soft-max saturation, exploding products) and costly. This is the one-step gradient
  commonly used for fixed-point layers.
- ``"full"``: all T iterations unrolled with gradient (for ablations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

GRAD_MODES = ("none", "last", "full")


def e_step(x: torch.Tensor, mu: torch.Tensor, lam: float) -> torch.Tensor:
    """Responsibilities ``[B, N, K]`` = softmax over K of ``lam * x^T mu`` (x ``[B,C,N]``, mu ``[B,C,K]``)."""
    return torch.softmax(lam * torch.bmm(x.transpose(1, 2), mu), dim=2)


def m_step(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Bases ``[B, C, K]``: responsibility-weighted pixel means, L2-normalised over C."""
    z_norm = z / (eps + z.sum(dim=1, keepdim=True))
    return F.normalize(torch.bmm(x, z_norm), dim=1)


def em_objective(x: torch.Tensor, mu: torch.Tensor, lam: float) -> torch.Tensor:
    """``F(mu) = sum_n log sum_k exp(lam x_n . mu_k)`` per image ``[B]`` (non-decreasing under EM)."""
    return torch.logsumexp(lam * torch.bmm(x.transpose(1, 2), mu), dim=2).sum(dim=1)


@dataclass
class EMOutput:
    """``features [B, C, h, w]`` (input projection + reconstruction), ``responsibilities
    [B, K, h, w]``, ``bases [B, C, K]`` and the clustered ``projected`` input ``[B, C, h, w]``."""

    features: torch.Tensor
    responsibilities: torch.Tensor
    bases: torch.Tensor
    projected: torch.Tensor


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class EMAggregation(nn.Module):
    """EM attention block: ``in_channels`` -> ``channels`` with ``num_bases`` bases, ``iterations``
    EM steps, inverse temperature ``lam``, buffer ``momentum`` and ``grad_mode`` (see module doc)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_bases: int = 64,
        iterations: int = 3,
        lam: float = 1.0,
        momentum: float = 0.9,
        grad_mode: str = "last",
    ) -> None:
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if iterations < 1 or num_bases < 1:
            raise ValueError("iterations and num_bases must be >= 1")
        self.channels, self.num_bases, self.iterations = channels, num_bases, iterations
        self.lam, self.momentum, self.grad_mode = float(lam), float(momentum), grad_mode
        self.proj_in = nn.Conv2d(in_channels, channels, 1)
        bases = torch.randn(1, channels, num_bases) * math.sqrt(2.0 / num_bases)
        self.register_buffer("bases", F.normalize(bases, dim=1))
        self.proj_out = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
        )

    def run_em(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EM on flattened features ``x [B, C, N]`` from the stored bases -> ``(z [B,N,K], mu [B,C,K])``."""
        mu = self.bases.to(x.dtype).expand(x.shape[0], -1, -1).clone()  # the buffer changes in place later
        free = {"none": self.iterations, "last": self.iterations - 1, "full": 0}[self.grad_mode]
        z = None
        with torch.no_grad():
            xd = x.detach()
            for _ in range(free):
                z = e_step(xd, mu, self.lam)
                mu = m_step(xd, z)
        mu = mu.detach()
        for _ in range(self.iterations - free):
            z = e_step(x, mu, self.lam)
            mu = m_step(x, z)
        return z, mu

    @torch.no_grad()
    def update_bases(self, mu: torch.Tensor) -> None:
        """Momentum update of the stored bases with the batch mean of ``mu [B, C, K]``."""
        mean = mu.detach().float().mean(dim=0, keepdim=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        new = self.momentum * self.bases.float() + (1.0 - self.momentum) * mean
        self.bases.copy_(F.normalize(new, dim=1).to(self.bases.dtype))

    def forward(self, x: torch.Tensor) -> EMOutput:
        b, _, h, w = x.shape
        projected = self.proj_in(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # EM in float32
            flat = projected.flatten(2).float()
            z, mu = self.run_em(flat)
            recon = torch.bmm(mu, z.transpose(1, 2)).view(b, self.channels, h, w)
        if self.training:
            self.update_bases(mu)
        recon = recon.to(projected.dtype)
        features = projected + self.proj_out(F.relu(recon))
        responsibilities = z.transpose(1, 2).reshape(b, self.num_bases, h, w)
        return EMOutput(features=features, responsibilities=responsibilities, bases=mu, projected=projected)
