"""Trainer state without pickle: tensors in ``trainer_state.safetensors``, the rest in JSON.

Holds the optimiser (AdamW moments per parameter index + param groups), the AMP grad scaler,
every RNG (torch CPU/CUDA, numpy, python ``random``), epoch, global step and the best
validation score. Both files are written atomically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT_VERSION = 1


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside ``obj`` by {"__tensor__": key}, collecting them in ``tensors``."""
    if torch.is_tensor(obj):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return {"__seq__": type(obj).__name__, "items": [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, np.ndarray):
        return _split_tensors(torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj), prefix, tensors)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__seq__", "items"}:
            items = [_join_tensors(v, tensors) for v in obj["items"]]
            return tuple(items) if obj["__seq__"] == "tuple" else items
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    return obj


def rng_state() -> dict[str, Any]:
    """Every global RNG state (torch CPU + CUDA, numpy, python)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np.asarray(np_state[1], dtype=np.int64), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    key = n["key"].numpy() if torch.is_tensor(n["key"]) else np.asarray(n["key"])
    np.random.set_state(("MT19937", key.astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    py = state["python"]
    random.setstate((py[0], tuple(int(v) for v in py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])


def save_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts/lists of JSON values and tensors) into ``folder``."""
    from safetensors.torch import save_file

    from ..io import atomic_path, atomic_write_text

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    meta = _split_tensors(state, "s", tensors)
    with atomic_path(folder / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(folder / STATE_JSON, json.dumps({"format_version": FORMAT_VERSION, "state": meta}, indent=1))


def load_state(folder: str | Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; raises CheckpointError when missing or corrupt."""
    from safetensors.torch import load_file

    folder = Path(folder)
    jp, tp = folder / STATE_JSON, folder / STATE_TENSORS
    if not jp.is_file() or not tp.is_file():
        raise CheckpointError(f"{folder}: no trainer state ({STATE_JSON} + {STATE_TENSORS}); cannot resume from it")
    try:
        meta = json.loads(jp.read_text(encoding="utf-8"))
        tensors = load_file(str(tp))
    except Exception as exc:
        raise CheckpointError(f"{folder}: trainer state is unreadable ({exc}); resume from an earlier checkpoint") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{jp}: unsupported trainer-state format {meta.get('format_version')}")
    return _join_tensors(meta["state"], tensors)
