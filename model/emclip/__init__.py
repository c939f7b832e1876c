"""EM-CLIP: text-prompted, domain-generalising medical image segmentation (Qt-free core).

The public API is imported lazily so that ``import emclip`` stays cheap (no torch import)::

    import emclip
    model = emclip.load_model()                 # bundled default model
    result = emclip.segment(image, "optic disc, optic cup", model=model)
    result.masks, result.probabilities, result.cluster_map
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import (
    Cancelled,
    CheckpointError,
    ConfigError,
    DatasetError,
    EMClipError,
    InsufficientMemoryError,
    InvalidExemplarError,
    InvalidImageError,
    InvalidPromptError,
    PretrainedWeightsUnavailable,
    UnknownPromptError,
    UntrustedCheckpointError,
)

_LAZY: dict[str, str] = {
    "load_model": "emclip.inference",
    "segment": "emclip.inference",
    "segment_stack": "emclip.inference",
    "SegmentationResult": "emclip.inference",
    "create_model": "emclip.factory",
    "list_models": "emclip.factory",
    "save_model": "emclip.checkpoint",
    "load_checkpoint": "emclip.checkpoint",
    "ModelConfig": "emclip.config",
    "load_config": "emclip.config",
    "parse_prompts": "emclip.prompts",
    "resolve_device": "emclip.device",
    "Exemplar": "emclip.exemplars",
    "TemplateBank": "emclip.exemplars",
    "segment_volume": "emclip.volume_segmentation",
    "read_volume": "emclip.volume_io",
    "write_volume": "emclip.volume_io",
    "read_sequences": "emclip.volume_io",
}

__all__ = [
    "__version__",
    "Cancelled",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EMClipError",
    "InsufficientMemoryError",
    "InvalidExemplarError",
    "InvalidImageError",
    "InvalidPromptError",
    "PretrainedWeightsUnavailable",
    "UnknownPromptError",
    "UntrustedCheckpointError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
