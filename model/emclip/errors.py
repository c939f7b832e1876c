"""Exceptions raised by emclip.

Every error caused by what a user passed in is a ``ValueError`` or ``TypeError`` subclass whose
message says what to do about it, so callers (the CLI, the napari widget) can show it as one
line instead of a traceback.
"""

from __future__ import annotations


class EMClipError(Exception):
    """Base class of all emclip errors."""


class InvalidImageError(EMClipError, ValueError):
    """The image cannot be segmented as given (shape, dtype, values)."""


class InsufficientMemoryError(InvalidImageError, MemoryError):
    """The image (or its results) is too large for the free memory; refused before starting.

    Also a ``MemoryError``, so code that falls back to a lighter way on memory errors (tiles)
    does so, and a ``ValueError`` whose message says to crop the image or ask fewer prompts.
    """


class InvalidPromptError(EMClipError, ValueError):
    """The prompts are empty, malformed or too many."""


class UnknownPromptError(InvalidPromptError):
    """A closed-vocabulary model (the U-Net baseline) was asked for a structure it does not know."""


class ConfigError(EMClipError, ValueError):
    """An architecture or training config is missing, malformed or names something unknown."""


class CheckpointError(EMClipError, ValueError):
    """A checkpoint is missing, truncated, corrupted or does not match its config."""


class UntrustedCheckpointError(CheckpointError):
    """A pickle-based checkpoint was refused because unpickling can run arbitrary code."""


class PretrainedWeightsUnavailable(EMClipError, ValueError):
    """Pretrained weights could not be found locally or downloaded."""


class DatasetError(EMClipError, ValueError):
    """A dataset folder does not follow the dataset format (images/, masks/, dataset.yaml)."""


class Cancelled(EMClipError):
    """Raised inside a long-running call when its ``cancel`` callback returned True."""


class InvalidArgumentError(EMClipError, ValueError):
    """A parameter is outside the values it accepts (threshold, tile size, axis, ...)."""


class InvalidExemplarError(EMClipError, ValueError):
    """A reference exemplar (image + mask + name) or a template bank folder is unusable."""
