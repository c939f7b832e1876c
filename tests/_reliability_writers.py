"""Every writer of the emclip core, and a way to make one crash half way (for
tests/test_reliability_files.py, in the test process and in subprocesses that get SIGKILLed).

Kept free of a top-level torch import so a subprocess that only writes a TIFF starts fast.
"""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np


def mask_tiff(path: Path, value: int) -> None:
    from emclip.io import write_mask_tiff

    write_mask_tiff(path, _masks(value), ["a", "b"], metadata={"version": value})


def _masks(value: int) -> np.ndarray:
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, :value] = 1
    return masks


def check_mask_tiff(path: Path, value: int) -> None:
    from emclip.io import read_mask_tiff

    got = read_mask_tiff(path)
    assert got.prompts == ["a", "b"] and got.metadata["version"] == value
    np.testing.assert_array_equal(got.masks, _masks(value))


def overlay(path: Path, value: int) -> None:
    from emclip.io import write_overlay_png

    image = np.full((16, 16), 40 * value, np.uint8)
    image[0, 0] = 0
    write_overlay_png(
        path, image, np.ones((1, 16, 16), bool), prompt_names=["a"], alpha=0.1 * value
    )


def check_overlay(path: Path, value: int) -> None:
    from PIL import Image

    with Image.open(path) as png:
        png.load()
        assert png.size == (16, 16) and png.mode == "RGB"


def text(path: Path, value: int) -> None:
    from emclip.io import atomic_write_text

    atomic_write_text(path, f"version {value}\n" * 1000)


def check_text(path: Path, value: int) -> None:
    assert path.read_text() == f"version {value}\n" * 1000


def raw(path: Path, value: int) -> None:
    from emclip.io import atomic_write_bytes

    atomic_write_bytes(path, bytes([value]) * 10_000)


def check_raw(path: Path, value: int) -> None:
    assert path.read_bytes() == bytes([value]) * 10_000


def stream(path: Path, value: int) -> None:
    from emclip.io import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as fh:
        for i in range(1000):
            fh.write(f"{value} {i}\n")


def check_stream(path: Path, value: int) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 and lines[-1] == f"{value} 999"


def state(folder: Path, value: int) -> None:
    import torch
    from emclip.train.state import save_state

    folder.mkdir(exist_ok=True)
    save_state(folder, {"epoch": value, "moments": torch.full((100,), float(value))})


def check_state(folder: Path, value: int) -> None:
    import torch
    from emclip.train.state import load_state

    got = load_state(folder)
    assert got["epoch"] == value and torch.equal(got["moments"], torch.full((100,), float(value)))


def checkpoint(folder: Path, value: int) -> None:
    import emclip
    import torch

    model = emclip.create_model("tiny")
    with torch.no_grad():
        model.decoder.logit_bias.fill_(float(value))
    emclip.save_model(model, folder)


def check_checkpoint(folder: Path, value: int) -> None:
    from emclip.checkpoint import load_checkpoint

    model = load_checkpoint(folder)
    assert float(model.decoder.logit_bias.flatten()[0]) == float(value)


WRITERS: dict[str, tuple[Callable, Callable, str, str]] = {
    # name: (write(path, value), check(path, value), function to crash inside, "file" | "folder")
    "io.write_mask_tiff": (mask_tiff, check_mask_tiff, "tifffile.imwrite", "file"),
    "io.write_overlay_png": (overlay, check_overlay, "PIL.Image.Image.save", "file"),
    "io.atomic_write_text": (text, check_text, "os.fsync", "file"),
    "io.atomic_write_bytes": (raw, check_raw, "os.fsync", "file"),
    "io.atomic_open": (stream, check_stream, "os.fsync", "file"),
    "train.state.save_state": (state, check_state, "safetensors.torch.save_file", "folder"),
    "checkpoint.save_checkpoint": (
        checkpoint,
        check_checkpoint,
        "safetensors.torch.save_file",
        "folder",
    ),
}


def target_path(folder: Path, name: str) -> Path:
    """Where writer ``name`` writes in the tests."""
    kind = WRITERS[name][3]
    suffix = {"io.write_mask_tiff": ".tif", "io.write_overlay_png": ".png"}.get(name, ".txt")
    return folder / ("target_dir" if kind == "folder" else f"target{suffix}")


def crash(mode: str) -> None:
    """Die like ``mode`` says: ``"sigkill"`` (the process, at once), ``"ctrl-c"``, or a full disk."""
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "ctrl-c":
        raise KeyboardInterrupt
    raise OSError(28, "No space left on device")


def broken(target: str, mode: str) -> tuple[Any, str, Callable]:
    """``(owner, attribute, replacement)``: a stand-in for ``target`` (dotted name of a function
    or method) that writes garbage into the path it was given, then crashes per ``mode``."""
    module_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ImportError:  # a method: PIL.Image.Image.save
        parent, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(parent), cls)

    def replacement(*args: Any, **kwargs: Any) -> None:
        for arg in args[:2]:  # the path-like argument gets half-written garbage
            if isinstance(arg, (str, os.PathLike)) and Path(arg).suffix:
                Path(arg).write_bytes(b"II*\x00 half written")
                break
        crash(mode)

    return owner, attr, replacement


def snapshot(path: Path) -> dict[str, bytes]:
    """Bytes of ``path`` (a file) or of every file under it (a folder), by relative name; hidden
    names (the temporary files a killed writer may leave) are not part of it."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    }
