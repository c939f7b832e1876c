"""Device selection: ``"auto"`` picks cuda, then mps, then cpu."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a usable :class:`torch.device` for ``device`` (default ``"auto"``).

    ``"auto"`` (or None) picks CUDA if present, then Apple MPS, then the CPU. Asking for a device
    that is not present raises ``ValueError`` naming the devices that are.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use one of {available_devices()}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available; use one of {available_devices()}")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {device!r}; use one of {DEVICES}")
    return torch.device(name)


def available_devices() -> list[str]:
    """Names of the devices present on this machine, best first, always ending with "cpu"."""
    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out
