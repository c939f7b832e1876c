"""Device selection: ``"auto"`` picks cuda, then mps, then cpu."""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a usable :class:`torch.device` for ``device`` (default ``"auto"``).

    ``"auto"`` (or None) picks CUDA if present, then Apple MPS, then the CPU. Asking for a device
    that is not present raises :class:`~emclip.errors.InvalidArgumentError` (a ``ValueError``)
    naming the devices that are.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is not None and not isinstance(device, str):
        raise InvalidArgumentError(f"device must be one of {DEVICES} (or a torch.device), got {type(device).__name__}")
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} requested but CUDA is not available; use one of {available_devices()}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidArgumentError(f"device {device!r} requested but MPS is not available; use one of {available_devices()}")
    if kind not in ("cuda", "mps", "cpu"):
        raise InvalidArgumentError(f"unknown device {device!r}; use one of {DEVICES}")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:  # e.g. "cpu:x"
        raise InvalidArgumentError(f"invalid device {device!r} ({exc}); use one of {DEVICES}") from exc


def available_devices() -> list[str]:
    """Names of the devices present on this machine, best first, always ending with "cpu"."""
    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out
