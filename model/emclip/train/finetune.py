"""Fine-tune a trained checkpoint on a small user dataset (corrected masks): :func:`finetune`.

A thin layer over :func:`emclip.train.trainer.train`: it builds a :class:`TrainConfig` that
starts from the checkpoint (the bundled default model unless told otherwise), trains on the
folder with a small learning rate for a few steps (text tower frozen, as always; the decoder's
prompt centre kept from the checkpoint), then writes a complete checkpoint (safetensors,
config.json, tokenizer files, checksums; same weight precision as the source) to ``out_dir``.

Model selection: with at least ``MIN_IMAGES_FOR_HOLDOUT`` images (and 2+ patient groups), one
group in eight (at least one) is held out and the epoch with the best held-out Dice is kept;
with fewer images every image trains and the final weights are kept.

The run itself happens in a hidden work folder next to ``out_dir`` that is always deleted, so a
cancelled, failed or killed fine-tune never leaves a partial checkpoint at ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..callbacks import CancelCallback, ProgressCallback, check_cancel
from ..errors import CheckpointError, ConfigError, DatasetError

logger = logging.getLogger("emclip.train")

MIN_IMAGES_FOR_HOLDOUT = 8
"""Below this many images every image is used for training and the final weights are kept."""

HOLDOUT_FRACTION = 0.125
_WORK_PREFIX = ".finetune-"


@dataclass(frozen=True)
class FinetunePlan:
    """What :func:`finetune` will do: images used, held-out selection and the step budget."""

    n_images: int
    n_train: int
    n_val: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    repeat: int
    val_fraction: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def default_model_dir() -> Path:
    """Folder of the bundled default checkpoint."""
    from ..inference.model_loading import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def _resolve_source(from_model: str | os.PathLike | None) -> Path:
    if from_model is None or str(from_model) == "default":
        path = default_model_dir()
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"no bundled default model at {path}; pass --from path/to/checkpoint")
        return path
    path = Path(from_model).expanduser()
    if path.is_file() and path.name in ("model.safetensors", "config.json"):
        path = path.parent
    if not (path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()):
        raise CheckpointError(
            f"{from_model} is not a checkpoint folder (config.json + model.safetensors); fine-tuning starts "
            "from a trained checkpoint: the bundled default (--from default) or a folder written by emclip"
        )
    return path.resolve()


def _check_out_dir(out: Path, source: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"{out} is a file; choose a folder for the fine-tuned checkpoint")
        if out.resolve() == source:
            raise CheckpointError(f"--out {out} is the model being fine-tuned; choose a new folder")
        entries = [p for p in out.iterdir()]
        if entries and not (out / "config.json").is_file():
            raise CheckpointError(f"{out} is a non-empty folder that is not an emclip checkpoint; choose a new folder")
    try:
        if out.resolve() == default_model_dir().resolve():
            raise CheckpointError("the bundled default model cannot be overwritten; choose another --out folder")
    except OSError:
        pass


def _remove_stale_work_dirs(parent: Path) -> None:
    """Delete work folders in ``parent`` left by fine-tunes whose process is gone (killed)."""
    for p in parent.glob(f".*{_WORK_PREFIX}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except (PermissionError, OSError):
            alive = True
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def plan_finetune(dataset_dir: str | os.PathLike, *, epochs: int, steps: int, batch_size: int, seed: int = 0,
                  holdout: bool | None = None) -> FinetunePlan:
    """Count images and decide the held-out part and the repeat factor (see module docstring)."""
    from ..data.folder import FolderDataset
    from ..data.splits import grouped_split

    ds = FolderDataset(dataset_dir)
    n = len(ds)
    groups = [ds.group_of(i) for i in range(n)]
    use_val = (n >= MIN_IMAGES_FOR_HOLDOUT and len(set(groups)) >= 2) if holdout is None else bool(holdout)
    if use_val and len(set(groups)) < 2:
        raise DatasetError(f"{dataset_dir}: holding out an image needs images of at least 2 patients/groups")
    if use_val:
        val_fraction = HOLDOUT_FRACTION
        split = grouped_split(groups, None, seed=seed, val_fraction=val_fraction, test_fraction=0.0)
        if not split.val:  # 2 groups: the fraction rounds to none; hold out one of them
            val_fraction = 0.5
            split = grouped_split(groups, None, seed=seed, val_fraction=val_fraction, test_fraction=0.0)
        n_train, n_val = len(split.train), len(split.val)
    else:
        n_train, n_val, val_fraction = n, 0, 0.0
    repeat = max(1, math.ceil(steps * batch_size / max(1, n_train)))
    return FinetunePlan(n_images=n, n_train=n_train, n_val=n_val, epochs=epochs, steps_per_epoch=steps,
                        batch_size=batch_size, repeat=repeat, val_fraction=val_fraction)


def finetune_config(dataset_dir: Path, source: Path, work: Path, plan: FinetunePlan, *, lr: float,
                    encoder_lr: float | None, image_size: int | None, device: str, seed: int,
                    augment: str = "default") -> dict[str, Any]:
    """The :class:`TrainConfig` mapping of a fine-tune run (also usable with ``emclip train``)."""
    holdout = plan.n_val > 0
    split = {"seed": seed, "val_fraction": plan.val_fraction, "test_fraction": 0.0}
    return {
        "model": str(source),
        "pretrained": False,
        "data_root": str(dataset_dir.parent),
        "train": [{"path": str(dataset_dir), "split": "train" if holdout else "all", "repeat": plan.repeat,
                   "name": dataset_dir.name}],
        "val": [{"path": str(dataset_dir), "split": "val", "name": dataset_dir.name}] if holdout else [],
        "test": [],
        "image_size": image_size,
        "batch_size": plan.batch_size,
        "epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "optim": {"lr": lr, "encoder_lr": lr / 4 if encoder_lr is None else encoder_lr,
                  "warmup_steps": max(1, plan.total_steps // 10), "min_lr_ratio": 0.05, "grad_clip": 1.0},
        "augment": {"strength": augment},
        "split": split,
        "seed": seed,
        "num_workers": 0,
        "amp": True,
        "device": device,
        "out_dir": str(work),
        "val_max_images": None,
        "log_every": max(1, min(10, plan.steps_per_epoch)),
        "keep_checkpoints": 1,
        "evaluate_at_end": False,
    }


def finetune(
    dataset_dir: str | os.PathLike,
    from_model: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    epochs: int = 4,
    steps: int = 25,
    lr: float = 1e-4,
    encoder_lr: float | None = None,
    batch_size: int = 4,
    image_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    holdout: bool | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Fine-tune ``from_model`` on ``dataset_dir`` and write the checkpoint to ``out_dir``.

    ``dataset_dir``: a 2D dataset folder (e.g. made by :func:`emclip.data.user_dataset.
    add_to_training_set`). ``from_model``: checkpoint folder, or None / ``"default"`` for the
    bundled model. ``out_dir``: new folder (or an existing checkpoint, replaced atomically).
    Budget: ``epochs`` x ``steps`` optimiser steps of ``batch_size`` augmented samples (default
    4 x 25 x 4); ``lr`` (default 1e-4) for the decoder, ``encoder_lr`` (default lr/4) for the
    image tower, linear warm-up over a tenth of the steps then cosine decay. ``image_size``:
    network side (default the checkpoint's). ``holdout``: None (auto, see module docstring),
    True or False. ``progress(done_steps, total_steps)``; ``cancel()`` polled between steps
    (raises :class:`~emclip.errors.Cancelled`, nothing is written to ``out_dir``).
    Returns ``out_dir``.
    """
    from .trainer import train

    if out_dir is None:
        raise ConfigError("give out_dir, the folder for the fine-tuned checkpoint")
    if epochs < 1 or steps < 1 or batch_size < 1:
        raise ConfigError(f"epochs, steps and batch_size must be >= 1 (got {epochs}, {steps}, {batch_size})")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    data = Path(dataset_dir).expanduser().resolve()
    source = _resolve_source(from_model)
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out, source)
    plan = plan_finetune(data, epochs=epochs, steps=steps, batch_size=batch_size, seed=seed, holdout=holdout)
    check_cancel(cancel)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(out.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}{_WORK_PREFIX}{os.getpid()}-", dir=out.parent))
    try:
        cfg = finetune_config(data, source, work / "run", plan, lr=lr, encoder_lr=encoder_lr,
                              image_size=image_size, device=device, seed=seed)
        logger.info("fine-tuning %s on %d images (%d train, %d held out), %d steps", source, plan.n_images,
                    plan.n_train, plan.n_val, plan.total_steps)
        result = train(cfg, progress=progress, cancel=cancel, log=log)
        chosen = result.best_checkpoint or result.last_checkpoint
        if chosen is None:
            raise CheckpointError(f"the fine-tune run in {work} wrote no checkpoint")
        check_cancel(cancel)
        _write_result(chosen, source, out, {
            "from_model": str(source), "dataset": str(data), "n_images": plan.n_images, "n_train": plan.n_train,
            "n_val": plan.n_val, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch,
            "batch_size": plan.batch_size, "lr": lr, "seed": seed, "selected": "best held-out Dice" if plan.n_val
            else "final weights", "best_val_dice": result.best_val_dice, "steps_done": result.steps_done,
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _write_result(chosen: Path, source: Path, out: Path, record: dict[str, Any]) -> None:
    """Save the chosen weights to ``out`` in the source's precision (atomic swap), plus a
    ``finetune.json`` record next to it (outside the checksummed files)."""
    import torch

    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..io import atomic_write_text

    try:
        dtype_name = json.loads((source / "config.json").read_text(encoding="utf-8")).get("weights_dtype", "float32")
    except (OSError, ValueError):
        dtype_name = "float32"
    dtype = torch.float16 if dtype_name in ("float16", "fp16") else torch.float32
    model = load_checkpoint(chosen)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.staged-", dir=out.parent)) / "ckpt"
    try:
        save_checkpoint(model, staged, dtype=dtype)
        atomic_write_text(staged / "finetune.json", json.dumps(record, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "ckpt")
            os.replace(staged, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, out)
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
