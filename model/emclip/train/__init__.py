"""Training backend: configs, losses, the training loop (resumable, DDP) and trainer state.

``from emclip.train import train, load_train_config`` — heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train": "emclip.train.trainer",
    "TrainResult": "emclip.train.trainer",
    "finetune": "emclip.train.finetune",
    "TrainConfig": "emclip.train.config",
    "load_train_config": "emclip.train.config",
    "list_presets": "emclip.train.config",
    "segmentation_loss": "emclip.train.losses",
    "LossConfig": "emclip.train.losses",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emclip.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
