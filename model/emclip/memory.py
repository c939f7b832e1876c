"""How much memory this machine has free, to refuse work that cannot fit before starting it.

Torch-free. :func:`available_memory` asks psutil when installed, else ``/proc/meminfo``, else
gives None (unknown: callers then skip their check).
"""

from __future__ import annotations

import os
from typing import Optional


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation without swapping, or None if unknown."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - unsupported platform or sandbox: try the next way
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable text, e.g. ``'3.2 GB'``."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover
