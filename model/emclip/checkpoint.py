"""Checkpoints: a folder with safetensors weights and a JSON config, never pickle by default.

::

    my-model/
      config.json        ModelConfig fields + format_version, emclip_version, weights_dtype
      model.safetensors  every weight (including the frozen text tower and the EM bases)
      text_tokenizer/    HF config + tokenizer files of an HF text tower
      modality_head.*    optional modality recogniser (emclip.modality), not in model.safetensors
      checksums.json     sha256 of every file above

``save_checkpoint`` writes into a temporary sibling folder and swaps it in with ``os.replace``,
so a crash never leaves a half-written checkpoint. ``load_checkpoint`` verifies the checksums,
rebuilds the network from config.json alone (no seed package, no network) and loads the weights
strictly. Pickle files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) can run arbitrary code when
loaded and are refused unless ``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, EMClipError, UntrustedCheckpointError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"
TEXT_DIR = "text_tokenizer"
#: Hidden sibling a replaced checkpoint is moved to while the new one is moved in.
OLD_PREFIX = ".{name}.old-"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


def _is_checkpoint_folder(path: Path) -> bool:
    try:
        return "format_version" in json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def save_checkpoint(model: Any, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Save ``model`` (a SegmentationModel) to ``folder`` atomically; returns the folder.

    Floating-point weights are stored as ``dtype`` (float32 default, float16 halves the size).
    An existing emclip checkpoint at ``folder`` is replaced; any other non-empty folder is
    refused (CheckpointError) so nothing unrelated is ever deleted.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser().absolute()
    dtype_name = _dtype_name(dtype)
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"{folder} exists and is a file; choose a folder name for the checkpoint")
        if any(folder.iterdir()) and not _is_checkpoint_folder(folder):
            raise CheckpointError(f"{folder} is a non-empty folder that is not an emclip checkpoint; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        state = {}
        for key, value in model.state_dict().items():
            value = value.detach()
            target = dtype if value.is_floating_point() else value.dtype
            state[key] = value.to(device="cpu", dtype=target, copy=True).contiguous()
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format_version": str(FORMAT_VERSION), "emclip_version": __version__})
        config = {**model.config.to_dict(), "format_version": FORMAT_VERSION, "emclip_version": __version__, "weights_dtype": dtype_name}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
        text_encoder = getattr(model, "text_encoder", None)
        if text_encoder is not None and getattr(text_encoder, "is_hf", False):
            text_encoder.save_text_files(tmp / TEXT_DIR)
        head = getattr(model, "modality_head", None)
        if head is not None:  # emclip.modality: kept out of model.safetensors
            from .modality import head_files

            for name, data in head_files(head).items():
                (tmp / name).write_bytes(data)
        sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / CHECKSUMS_NAME).write_text(json.dumps({"algorithm": "sha256", "files": sums}, indent=2), encoding="utf-8")
        _apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, folder)
    return folder


save_model = save_checkpoint


def _old_name(folder: Path) -> Path:
    """A fresh hidden sibling name for the checkpoint being replaced (found again by
    :func:`recover_interrupted_save`)."""
    return folder.parent / f"{OLD_PREFIX.format(name=folder.name)}{os.getpid()}-{secrets.token_hex(4)}"


def _swap_in(tmp: Path, folder: Path) -> None:
    """Move the complete checkpoint ``tmp`` to ``folder``, replacing a checkpoint there.

    Two renames: the old folder to a hidden sibling ``.<name>.old-*``, then ``tmp`` to
    ``folder``. An exception or Ctrl-C between them moves the old folder back; a crash that
    leaves no chance to (SIGKILL, power loss) leaves the old checkpoint complete in the sibling,
    where :func:`load_checkpoint` finds and restores it. So at every instant the path holds the
    old or the new complete checkpoint, or the old one is recoverable.
    """
    if not folder.exists():
        try:
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    old = _old_name(folder)
    try:
        os.replace(folder, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, folder)
    except BaseException:
        with contextlib.suppress(OSError):
            if not folder.exists():
                os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def recover_interrupted_save(folder: str | Path) -> bool:
    """Restore the checkpoint a killed :func:`save_checkpoint` left in ``.<name>.old-*``.

    For a ``folder`` that does not exist (:func:`load_checkpoint` calls it then; so should any
    loader that checks the path first). Candidates are tried newest first; one is restored only
    when it is complete (its checksums verify), with a warning. Returns True when ``folder``
    exists afterwards.
    """
    folder = Path(folder).expanduser()
    if folder.exists():
        return True
    prefix = OLD_PREFIX.format(name=folder.name)
    try:
        candidates = [p for p in folder.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return False
    candidates.sort(key=_mtime, reverse=True)
    for candidate in candidates:
        if (candidate / "ckpt").is_dir():  # the layout of emclip 0.1.0 saves: .<name>.old-*/ckpt
            candidate = candidate / "ckpt"
        if not (candidate / CHECKSUMS_NAME).is_file() or not (candidate / WEIGHTS_NAME).is_file():
            continue
        try:
            verify_checksums(candidate)
            os.replace(candidate, folder)
        except (CheckpointError, OSError):
            continue
        warnings.warn(
            f"{folder} was missing after an interrupted save; the previous checkpoint was restored "
            f"from {candidate.name}",
            stacklevel=3,
        )
        return True
    return folder.exists()


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes the umask allows (mkdtemp makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _refuse_pickle(path: Path) -> None:
    raise UntrustedCheckpointError(
        f"{path} is a pickle file ({path.suffix}); unpickling can execute arbitrary code hidden in the file, so it is "
        "not loaded by default. Use a safetensors checkpoint folder (emclip.save_model). If you trust where this file "
        "comes from, pass trust_pickle=True (CLI: --trust-pickle) once and re-save it with emclip.save_model."
    )


def verify_checksums(folder: Path) -> None:
    """Compare files with ``checksums.json`` (if present); a mismatch raises CheckpointError."""
    path = folder / CHECKSUMS_NAME
    if not path.is_file():
        return
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid checksum file") from exc
    root = folder.resolve()
    for name, expected in listed.items():
        target = folder / name
        if not target.resolve().is_relative_to(root):
            raise CheckpointError(
                f"{path} lists {name!r}, which is outside the checkpoint folder; the checkpoint was tampered with"
            )
        if not target.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is listed in {CHECKSUMS_NAME} but missing")
        if sha256_file(target) != expected:
            raise CheckpointError(
                f"checksum mismatch for {target}: the file is corrupted or was modified after saving; "
                "copy the checkpoint again"
            )


def _read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this emclip reads up to {FORMAT_VERSION}: upgrade emclip")
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{path} does not describe a model this emclip can build: {exc}") from exc


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state``; missing/unexpected/shape-mismatched keys raise one CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]))
        raise CheckpointError(f"the weights in {source} do not match its config: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, device: Any = "cpu", *, trust_pickle: bool = False):
    """Load a checkpoint folder (or its ``model.safetensors`` / ``config.json``) in eval mode.

    Checksums are verified; truncated or corrupt weights, an unknown architecture and weights that
    do not fit the config raise :class:`CheckpointError`. Pickle files, or folders holding only
    pickles, raise :class:`UntrustedCheckpointError` unless ``trust_pickle=True``.
    """
    from .device import resolve_device

    path = Path(path).expanduser()
    if not path.exists():
        recover_interrupted_save(path.parent if path.name in (WEIGHTS_NAME, CONFIG_NAME) else path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: pass a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            return _load_pickle(path, trust_pickle, device)
        if path.suffix == ".safetensors" or path.name == CONFIG_NAME:
            path = path.parent
        else:
            raise CheckpointError(f"{path} is not a checkpoint: pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not (path / WEIGHTS_NAME).is_file():
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            return _load_pickle(pickles[0], trust_pickle, device)
        raise CheckpointError(f"{path} is not an emclip checkpoint: {WEIGHTS_NAME} is missing")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is not an emclip checkpoint: {CONFIG_NAME} is missing")
    verify_checksums(path)
    config = _read_config(path)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / WEIGHTS_NAME), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{path / WEIGHTS_NAME} is truncated or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "copy or save the checkpoint again"
        ) from exc
    model = _build(config, path)
    load_weights_into(model, state, str(path / WEIGHTS_NAME))
    from .modality import attach_modality_head, load_modality_head

    attach_modality_head(model, load_modality_head(path))
    return model.to(resolve_device(device)).eval()


def _build(config: ModelConfig, folder: Path | None):
    from .factory import build_model

    text_dir = folder / TEXT_DIR if folder is not None and (folder / TEXT_DIR).is_dir() else None
    try:
        return build_model(config, pretrained=False, text_source_dir=text_dir)
    except ConfigError as exc:
        raise CheckpointError(f"the config of {folder} does not describe a model this emclip can build: {exc}") from exc
    except (RuntimeError, MemoryError, OverflowError, TypeError, KeyError) as exc:
        if isinstance(exc, EMClipError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"the config of {folder} describes a network that cannot be built ({type(exc).__name__}: {first[:200]}); "
            "its sizes may have been edited or corrupted: copy or save the checkpoint again"
        ) from exc


def _load_pickle(path: Path, trust_pickle: bool, device: Any):
    if not trust_pickle:
        _refuse_pickle(path)
    from .device import resolve_device
    from .nn.base import SegmentationModel

    try:  # a plain state dict loads with the restricted unpickler; only whole models need more
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)  # trust_pickle=True only
    if isinstance(obj, SegmentationModel):
        return obj.to(resolve_device(device)).eval()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")
    cfg_data = obj.get("config")
    if cfg_data is None and (path.parent / CONFIG_NAME).is_file():
        config = _read_config(path.parent)
    elif isinstance(cfg_data, ModelConfig):
        config = cfg_data
    elif isinstance(cfg_data, dict):
        try:
            config = ModelConfig.from_dict(cfg_data)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    else:
        raise CheckpointError(f"{path} has no model config: put a {CONFIG_NAME} next to it or store a 'config' entry")
    state = obj.get("state_dict", obj.get("model", obj))
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    model = _build(config, path.parent)
    load_weights_into(model, state, str(path))
    return model.to(resolve_device(device)).eval()
