"""Loading models for inference: :func:`load_model`, its cache, and :func:`clear_model_cache`."""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import recover_interrupted_save
from ..device import resolve_device
from ..errors import CheckpointError, InvalidArgumentError

CHECKSUMS_NAME = "checksums.json"
"""Checksum file of a checkpoint folder (see :mod:`emclip.checkpoint`); required for the bundled model."""

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights" / "default"
"""Where the bundled default model (a checkpoint folder) is installed."""

MODEL_CACHE_SIZE = 3
"""How many loaded models :func:`load_model` keeps (least recently used dropped first)."""


class UntrainedModelWarning(UserWarning):
    """A model was built from a config with random weights: its masks mean nothing."""


_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _stamp(path: Path) -> tuple:
    """Cheap fingerprint of a file or folder (names, sizes, mtimes) to notice a changed file."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _config_names() -> list[str]:
    from ..config import list_configs

    return list_configs()


def clear_model_cache() -> None:
    """Forget the models :func:`load_model` cached (and release cached GPU memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _no_default_model() -> CheckpointError:
    return CheckpointError(
        f"no bundled default model is installed (expected a checkpoint folder at {DEFAULT_MODEL_DIR}); "
        "pass a trained checkpoint folder instead: emclip.load_model('path/to/checkpoint') in Python, "
        "or --model path/to/checkpoint on the command line"
    )


def load_model(
    source: "str | os.PathLike | torch.nn.Module | None" = None,
    device: "str | torch.device" = "auto",
    *,
    trust_pickle: bool = False,
    cache: bool = True,
) -> torch.nn.Module:
    """Load a segmentation model, in eval mode, on ``device`` (default ``"auto"``).

    ``source``:

    - None (default): the bundled default model in ``emclip/weights/default/`` (its
      ``checksums.json`` is required and every file is verified against it);
    - a checkpoint folder (``config.json`` + ``model.safetensors``) or weights file: see
      :func:`emclip.checkpoint.load_checkpoint` (pickle files need ``trust_pickle=True``);
    - a bundled config name (``"tiny"``, ``"cpu-default"``, ...): a new model with random
      weights, for testing only (an :class:`UntrainedModelWarning` says so);
    - a model instance: moved to ``device`` and returned.

    Loaded models are cached by (resolved path, file fingerprint, device), so calling again is
    free; the cached object is shared, so copy it before training it (``cache=False`` skips the
    cache). :func:`clear_model_cache` empties it.
    """
    dev = resolve_device(device)
    if isinstance(source, torch.nn.Module):
        return _check_instance(source).to(dev).eval()
    loader: Callable[[], torch.nn.Module]
    if source is None:
        folder = DEFAULT_MODEL_DIR
        if not (folder / "config.json").is_file():
            raise _no_default_model()
        if not (folder / CHECKSUMS_NAME).is_file():
            raise CheckpointError(
                f"the bundled model at {folder} has no {CHECKSUMS_NAME}, so its integrity cannot be "
                "verified; reinstall napari-emclip, or pass a checkpoint folder with --model / load_model(path)"
            )
        key = ("path", str(folder), _stamp(folder), str(dev), trust_pickle)
        loader = lambda: _load_checkpoint(folder, dev, trust_pickle)  # noqa: E731
    else:
        if not isinstance(source, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"model must be a checkpoint folder path, a bundled config name or a model instance, "
                f"got {type(source).__name__}"
            )
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        path = Path(text).expanduser()
        names = _config_names()
        try:
            # a save killed between its renames left the checkpoint in a hidden sibling folder
            exists = path.exists() or (path.parent.is_dir() and recover_interrupted_save(path))
        except (OSError, ValueError) as exc:  # name too long, embedded NUL byte, ...
            raise CheckpointError(
                f"cannot use {text[:200]!r} as a model path ({exc}); check the path"
            ) from exc
        if exists and not (path.is_file() or path.is_dir()):
            raise CheckpointError(
                f"{text} is not a regular file or folder; pass a checkpoint folder"
            )
        if exists:  # a path wins over a config name (never silently random weights)
            path = path.resolve()
            key = ("path", str(path), _stamp(path), str(dev), trust_pickle)
            loader = lambda: _load_checkpoint(path, dev, trust_pickle)  # noqa: E731
        elif text in names:
            key = ("config", text, str(dev))
            loader = lambda: _untrained(text, dev)  # noqa: E731
        else:
            raise CheckpointError(
                f"model {text!r} not found: it is neither an existing checkpoint folder/file nor a "
                f"bundled config name ({', '.join(names)}); check the path"
            )
    if key[0] == "config":
        warnings.warn(
            f"model {key[1]!r} is built from its config with random weights: it is untrained and its "
            "masks are meaningless; pass a trained checkpoint folder for real use",
            UntrainedModelWarning,
            stacklevel=2,
        )
    if cache:
        with _CACHE_LOCK:
            model = _CACHE.get(key)
            if model is not None:
                _CACHE.move_to_end(key)
                return model.to(dev).eval()
    model = loader().to(dev).eval()
    if cache:
        with _CACHE_LOCK:
            _CACHE[key] = model
            while len(_CACHE) > MODEL_CACHE_SIZE:
                _CACHE.popitem(last=False)
    return model


def _check_instance(model: torch.nn.Module) -> torch.nn.Module:
    if not hasattr(model, "predict_logits") or not hasattr(model, "image_size"):
        raise InvalidArgumentError(
            f"{type(model).__name__} is not an emclip segmentation model (it has no predict_logits/"
            "image_size); build one with emclip.create_model or load a checkpoint folder"
        )
    return model


def _load_checkpoint(path: Path, dev: torch.device, trust_pickle: bool) -> torch.nn.Module:
    from ..checkpoint import load_checkpoint

    return load_checkpoint(path, dev, trust_pickle=trust_pickle)


def _untrained(name: str, dev: torch.device) -> torch.nn.Module:
    """A model from a bundled config with seeded random weights (the same for every call)."""
    from ..factory import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); the CPU for a model without any."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """Floating-point dtype of the model's weights (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_model(model: Any, device: Any) -> tuple[torch.nn.Module, torch.device]:
    """The model to run and the device to run it on (``model``: instance or :func:`load_model` source)."""
    if isinstance(model, torch.nn.Module):
        _check_instance(model)
        return model, (resolve_device(device) if device is not None else model_device(model))
    net = load_model(model, device if device is not None else "auto")
    return net, model_device(net)
