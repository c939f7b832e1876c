"""The training loop: ``train(config, progress=None, cancel=None, log=None, resume=False)``.

Output folder (``config.out_dir``)::

    config.yaml                 the resolved config of the run
    log.csv                     one row per logged step: epoch, step, lr, loss, bce, dice, images/s
    val.csv                     one row per epoch: mean validation Dice overall and per dataset
    checkpoints/epoch_NNNN/     model checkpoint (emclip.checkpoint) + trainer_state.{json,safetensors}
    last.json                   {"epoch": N, "step": S, "path": "checkpoints/epoch_NNNN"} (atomic)
    best/                       model checkpoint with the best validation mean Dice
    eval.json, eval.md          results of emclip.evaluate on the ``test`` datasets (if any)

Every epoch ends with a checkpoint written to a temporary folder, renamed into place, then
``last.json`` is replaced atomically, so a run killed at any moment leaves the last complete
epoch loadable. ``resume=True`` restores weights, optimiser, grad scaler, every RNG, epoch, step
and best score from it and truncates the logs to that step; because each sample's randomness
depends only on (seed, epoch, index) and the sampler on (seed, epoch), the resumed run repeats
the uninterrupted one exactly (on the same device and thread count).

DDP: under torchrun every rank runs this function; the global ``batch_size`` is split over
ranks by a ``DistributedSampler`` (so a global batch holds the same samples as in one process),
gradients are averaged by ``DistributedDataParallel``, and only rank 0 writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..callbacks import CancelCallback, ProgressCallback, report
from ..errors import Cancelled, CheckpointError, ConfigError
from . import ddp
from .config import DatasetEntry, TrainConfig, load_train_config
from .losses import segmentation_loss
from .state import load_state, rng_state, save_state, set_rng_state

logger = logging.getLogger("emclip.train")

LOG_FIELDS = ["epoch", "step", "lr", "loss", "bce", "dice", "images_per_s", "seconds"]
SEMI_LOG_FIELDS = ["unsup_loss", "confident_fraction", "unsup_weight"]
LogCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` returns: where things are and the last numbers."""

    out_dir: Path
    epochs_done: int
    steps_done: int
    best_val_dice: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    images_per_s: float | None = None
    eval_results: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig):
    """The network to train: a checkpoint folder (fine-tune) or an architecture name/JSON."""
    from ..config import load_config
    from ..factory import create_model

    src = Path(cfg.model).expanduser()
    overrides = dict(cfg.model_overrides)
    if cfg.image_size is not None:
        overrides["image_size"] = cfg.image_size
    if src.is_dir() and (src / "model.safetensors").is_file():
        from ..checkpoint import load_checkpoint

        model = load_checkpoint(src)
        if overrides:
            if set(overrides) - {"image_size"}:
                raise ConfigError("model_overrides other than image_size cannot change a trained checkpoint")
            model.config.image_size = int(overrides["image_size"])
        return model
    return create_model(load_config(cfg.model, overrides or None), pretrained=cfg.pretrained)


def is_text_model(model: nn.Module) -> bool:
    """True for open-vocabulary models (EMCLIP), False for the closed-vocabulary U-Net."""
    return hasattr(model, "encode_prompts") and hasattr(model, "text_encoder")


def uses_templates(model: nn.Module) -> bool:
    return is_text_model(model) and bool(getattr(model.text_encoder, "use_templates", True))


def known_prompt_checker(model: nn.Module) -> Callable[[str], bool] | None:
    """For closed-vocabulary models, a predicate telling whether a prompt maps to a class."""
    if is_text_model(model) or not hasattr(model, "class_index"):
        return None

    def ok(prompt: str) -> bool:
        try:
            model.class_index(prompt)
        except ValueError:
            return False
        return True

    return ok


class SentenceTable:
    """Frozen-text-tower embeddings of every sentence a run can ask, computed once up front.

    Computing a sentence inside different batches gives results that differ in the last bits
    (matrix-product blocking depends on the batch), which would make a resumed run drift from
    an uninterrupted one. So all template sentences of all possible prompts are encoded at the
    start in one fixed, sorted order; the few unexpected ones are encoded alone. With a
    trainable text tower nothing is cached (embeddings must carry gradients).
    """

    def __init__(self, model: nn.Module, prompts_by_modality: Mapping[str | None, Sequence[str]], chunk: int = 256):
        from ..prompts import apply_templates

        self.model = model
        self.table: dict[str, torch.Tensor] = {}
        self.frozen = bool(getattr(model.text_encoder, "frozen", True))
        if not self.frozen:
            return
        sentences = sorted({s for m, names in prompts_by_modality.items() for n in names
                            for s in (apply_templates(n, m) if uses_templates(model) else [n])})
        with torch.no_grad():
            for i in range(0, len(sentences), chunk):
                part = sentences[i: i + chunk]
                emb = model.text_encoder.encode_sentences(part)
                self.table.update(zip(part, emb.detach()))

    def __call__(self, texts: Sequence[Sequence[str]], device: torch.device) -> torch.Tensor:
        """``[B, P, D]`` embeddings of exact sentences per sample (padded rows repeat the first)."""
        width = max(len(t) for t in texts)
        unique = list(dict.fromkeys(s for row in texts for s in row))
        if self.frozen:
            for s in unique:
                if s not in self.table:
                    with torch.no_grad():
                        self.table[s] = self.model.text_encoder.encode_sentences([s])[0].detach()
            emb = torch.stack([self.table[s] for s in unique]).to(device)
        else:
            emb = self.model.text_encoder.encode_sentences(unique).to(device)
        where = {s: i for i, s in enumerate(unique)}
        index = torch.tensor([[where[row[min(k, len(row) - 1)]] for k in range(width)] for row in texts], device=device)
        return emb[index]


class _StepModule(nn.Module):
    """One training forward as ``forward`` so DistributedDataParallel sees the call.

    Text models get the per-sample template sentences drawn by the dataset (deterministic per
    sample) encoded by the frozen text tower, then ``model(images, embeddings, prompt_mask)``;
    the U-Net gets ``predict_logits(images, names)``. Returns ``(logits, deep_logits or None)``.
    """

    def __init__(self, model: nn.Module, sentences: SentenceTable | None = None):
        super().__init__()
        self.model = model
        self.sentences = sentences

    def forward(self, images: torch.Tensor, batch: Mapping[str, Any]):
        if is_text_model(self.model):
            texts = batch["texts"] if uses_templates(self.model) else batch["prompts"]
            emb = self.sentences(texts, images.device)
            out = self.model(images, emb, batch["prompt_mask"].to(images.device))
        else:
            out = self.model.predict_logits(images, [list(p) for p in batch["prompts"]], modality=list(batch["modality"]))
        return out.logits, out.aux.get("deep_logits")


def batch_prompts(model: nn.Module, batch: Mapping[str, Any]) -> tuple[list[list[str]], list[str | None]]:
    """Prompts and modalities for ``predict_logits`` (validation: the model applies its own
    template ensemble for the sample's modality, exactly as at inference)."""
    return [list(p) for p in batch["prompts"]], list(batch["modality"])


# ----------------------------------------------------------------------------------- data


def _disambiguated_names(entries: Sequence[DatasetEntry], paths: Sequence[Path]) -> list[str]:
    names = [e.name or p.name for e, p in zip(entries, paths)]
    dup = {n for n in names if names.count(n) > 1}
    return [n if n not in dup or e.name else f"{p.parent.name}/{p.name}" for n, e, p in zip(names, entries, paths)]


def _open_splits(cfg: TrainConfig, entries: Sequence[DatasetEntry], allow_unlabelled: bool = False):
    """Yield ``(entry, name, dataset, split indices)`` for each entry (limit applied)."""
    from ..data.folder import open_dataset
    from ..data.splits import split_dataset

    paths = [cfg.resolve_path(e) for e in entries]
    names = _disambiguated_names(entries, paths)
    for entry, path, name in zip(entries, paths, names):
        ds = open_dataset(path, axis=entry.axis, channel=entry.channel, only_labelled=entry.only_labelled,
                          allow_unlabelled=allow_unlabelled)
        split = split_dataset(ds, seed=cfg.split.seed, val_fraction=cfg.split.val_fraction,
                              test_fraction=cfg.split.test_fraction)
        idx = split.part(entry.split)
        if entry.limit is not None:
            idx = idx[: entry.limit]
        if not idx:
            raise ConfigError(f"{path}: the {entry.split!r} split is empty; choose another split or fractions")
        yield entry, name, ds, idx


def open_entries(cfg: TrainConfig, entries: Sequence[DatasetEntry]):
    """Open the datasets of ``entries`` and select their split; returns a list of Sources."""
    from ..data.training import Source

    return [Source(dataset=ds, indices=idx, repeat=entry.repeat, name=name)
            for entry, name, ds, idx in _open_splits(cfg, entries)]


def open_train_sources(cfg: TrainConfig):
    """``(labelled, unlabelled)`` Sources of ``cfg.train``.

    Per entry, :func:`emclip.data.unlabelled.select_labelled` keeps the masks of
    ``labelled_fraction`` of the patients (``labelled_seed``); entries with ``unlabelled: true``
    and images without masks are unlabelled. Unlabelled samples are returned only when
    ``semi_supervised.enabled`` (a supervised run drops them, so the two protocols see the same
    labelled patients); ``repeat`` applies to the labelled part.
    """
    from ..data.training import Source
    from ..data.unlabelled import select_labelled

    semi = cfg.semi_supervised.enabled
    labelled, unlabelled = [], []
    for entry, name, ds, idx in _open_splits(cfg, cfg.train, allow_unlabelled=semi):
        if entry.unlabelled:
            lab, unl = [], list(idx)
        else:
            lab, unl = select_labelled(ds, idx, entry.labelled_fraction, entry.labelled_seed)
        if lab:
            labelled.append(Source(dataset=ds, indices=lab, repeat=entry.repeat, name=name))
        if unl and semi:
            unlabelled.append(Source(dataset=ds, indices=unl, repeat=1, name=name))
        groups = sorted({ds.group_of(i) for i in lab})
        logger.info("%s: %d labelled images (%d groups%s), %d %s", name, len(lab), len(groups),
                    f": {', '.join(groups)}" if len(groups) <= 5 else "", len(unl),
                    "unlabelled" if semi else "without masks left out")
    if not labelled:
        raise ConfigError("no labelled training images: keep labelled_fraction > 0 on at least one entry that is "
                          "not 'unlabelled: true'")
    if semi and not unlabelled:
        raise ConfigError("semi_supervised.enabled but there are no unlabelled images: set labelled_fraction < 1, "
                          "add an entry with 'unlabelled: true', or put images without masks in a dataset")
    return labelled, unlabelled


def _check_vocabulary(model: nn.Module, sources) -> None:
    ok = known_prompt_checker(model)
    if ok is None:
        return
    for src in sources:
        missing = [n for n in src.dataset.spec.structure_names if not ok(n)]
        if missing:
            raise ConfigError(
                f"the closed-vocabulary model {model.config.name!r} has no class for {missing} of {src.name}; "
                f"its classes are {model.config.class_names}: add them to class_names in its config"
            )


# ----------------------------------------------------------------------------------- optimiser


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: pretrained image tower (``encoder_lr``) vs new parts (``lr``); no weight
    decay on biases and norm weights (1-D tensors).

    The tower counts as pretrained (and gets ``encoder_lr``) when the run starts from pretrained
    weights (``pretrained: true``) or from a checkpoint, and the model config has an image tower;
    otherwise every parameter uses ``lr``.
    """
    o = cfg.optim
    src = Path(cfg.model).expanduser()
    from_weights = cfg.pretrained or (src.is_dir() and (src / "model.safetensors").is_file())
    has_tower = getattr(model.config, "image_encoder", None) is not None
    prefixes = tuple(o.encoder_prefixes) if (from_weights and has_tower) else ()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        enc = bool(prefixes) and name.startswith(prefixes)
        decay = p.ndim > 1
        groups.setdefault((enc, decay), []).append(p)
    out = []
    for (enc, decay), params in sorted(groups.items()):
        lr = o.encoder_lr if enc else o.lr
        out.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": o.weight_decay if decay else 0.0,
                    "name": f"{'encoder' if enc else 'new'}_{'decay' if decay else 'no_decay'}"})
    if not out:
        raise ConfigError("the model has no trainable parameters")
    return out


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------- files


def _write_csv_rows(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    from ..io import atomic_open

    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


class _CsvLog:
    """Append-only CSV (header once, flushed each row)."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        new = not path.is_file() or path.stat().st_size == 0
        self.fh = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.fh, fieldnames=fields, extrasaction="ignore")
        if new:
            self.writer.writeheader()
            self.fh.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        self.writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def last_checkpoint(out_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The folder and record of the last complete epoch checkpoint of a run, or None."""
    out = Path(out_dir)
    pointer = out / "last.json"
    if not pointer.is_file():
        return None
    try:
        rec = json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable ({exc}); delete it to start over") from exc
    folder = out / rec["path"]
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} points to {folder}, which is missing")
    return folder, rec


def _save_epoch(out: Path, model: nn.Module, state: dict[str, Any], epoch: int, step: int, keep: int) -> Path:
    from ..checkpoint import save_checkpoint
    from ..io import atomic_write_text

    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"epoch_{epoch:04d}"
    tmp = ckdir / f".epoch_{epoch:04d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_checkpoint(model, tmp)
    save_state(tmp, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(out / "last.json", json.dumps({"epoch": epoch, "step": step, "path": f"checkpoints/{final.name}"}))
    olds = sorted(p for p in ckdir.glob("epoch_*") if p.is_dir() and p != final)
    for p in olds[: max(0, len(olds) - max(0, keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.glob(".epoch_*.tmp*"):
        shutil.rmtree(p, ignore_errors=True)
    return final


def _save_best(out: Path, model: nn.Module) -> Path:
    from ..checkpoint import save_checkpoint

    return save_checkpoint(model, out / "best")  # written to a temporary folder and swapped in


# ----------------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, cancel: CancelCallback | None = None) -> dict[str, float]:
    """Mean Dice at network resolution (threshold 0.5) per dataset and overall.

    Per (image, structure) Dice with the empty convention of :mod:`emclip.metrics` (both empty
    = 1); averaged per structure, then per dataset; ``"mean"`` is the mean over datasets.
    """
    from ..callbacks import check_cancel

    was_training = model.training
    model.eval()
    sums: dict[tuple[str, str], list[float]] = {}
    try:
        for batch in loader:
            check_cancel(cancel)
            images = batch["image"].to(device)
            prompts, modality = batch_prompts(model, batch)
            out = model.predict_logits(images, prompts, modality=modality)
            pred = out.logits > 0
            tgt = batch["targets"].to(device).bool()
            inter = (pred & tgt).flatten(2).sum(-1).float()
            denom = (pred.flatten(2).sum(-1) + tgt.flatten(2).sum(-1)).float()
            d = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).cpu()
            for b, names in enumerate(batch["names"]):
                for k, name in enumerate(names):
                    if name:
                        sums.setdefault((batch["dataset"][b], name), []).append(float(d[b, k]))
    finally:
        model.train(was_training)
    per_ds: dict[str, list[float]] = {}
    for (ds, _), vals in sums.items():
        per_ds.setdefault(ds, []).append(float(np.mean(vals)))
    out = {ds: float(np.mean(v)) for ds, v in per_ds.items()}
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


# ----------------------------------------------------------------------------------- train


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"state": sd["state"], "param_groups": sd["param_groups"]}


def _load_optimizer_state(opt: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    state = {int(k): dict(v) for k, v in saved["state"].items()}
    groups = [dict(g) for g in saved["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def train(
    config: TrainConfig | str | Path | Mapping[str, Any],
    *,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    log: LogCallback | None = None,
) -> TrainResult:
    """Train a model as ``config`` says (see module docstring for the output folder).

    ``progress(done_steps, total_steps)`` after every step; ``cancel()`` polled between steps
    (raises :class:`~emclip.errors.Cancelled`; the last complete epoch checkpoint stays valid);
    ``log(record)`` receives every logged step / validation record (dicts) for live display.
    """
    cfg = config if isinstance(config, TrainConfig) and not overrides else load_train_config(config, overrides)
    cfg.validate()
    from ..device import resolve_device

    device = resolve_device(cfg.device)
    info = ddp.setup(device.type)
    try:
        return _train(cfg, device, info, resume, progress, cancel, log)
    finally:
        ddp.cleanup(info)


def _train(cfg: TrainConfig, device: torch.device, info: ddp.DistInfo, resume: bool,
           progress, cancel, log) -> TrainResult:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from ..data.training import PromptedDataset, collate

    semi = cfg.semi_supervised
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    out = Path(cfg.out_dir).expanduser()
    if not resume and ((out / "last.json").exists() or (out / "log.csv").exists()):
        raise ConfigError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    _seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    model.train()

    train_sources, unlabelled_sources = open_train_sources(cfg)
    _check_vocabulary(model, train_sources + unlabelled_sources)
    from ..modality import merge_known_structures

    # what the model will know, per modality, for prompt-free segmentation (saved in config.json)
    model.config.known_structures = merge_known_structures(
        model.config.known_structures, [(s.dataset.spec.modality, s.dataset.spec.structure_names) for s in train_sources]
    )
    if model.config.test_time_mirror is None:  # a model trained on mirrored images is mirrored at inference
        model.config.test_time_mirror = bool(cfg.augment.flips)
    known = known_prompt_checker(model)
    prompt_cfg = cfg.prompts
    if prompt_cfg.templates and not uses_templates(model):
        prompt_cfg = dataclasses.replace(prompt_cfg, templates=False)
    train_ds = PromptedDataset(train_sources, model.image_size, model.pixel_mean, model.pixel_std, train=True,
                               augment_cfg=cfg.augment, prompt_cfg=prompt_cfg, seed=cfg.seed, known_names=known,
                               sequences=getattr(model, "sequences", None))
    unl_ds = None
    if semi.enabled:
        from ..data.unlabelled import UnlabelledDataset

        unl_ds = UnlabelledDataset(unlabelled_sources, model.image_size, model.pixel_mean, model.pixel_std,
                                   augment_cfg=cfg.augment, prompt_cfg=prompt_cfg, seed=cfg.seed + 1,
                                   known_names=known, noise_std=semi.noise_std, cutout_p=semi.cutout_p)
        unl_batch = semi.unlabelled_batch_size or cfg.batch_size
        if unl_batch % info.world_size or len(unl_ds) < unl_batch:
            raise ConfigError(f"semi_supervised.unlabelled_batch_size={unl_batch} must be divisible by the number of "
                              f"processes ({info.world_size}) and at most the {len(unl_ds)} unlabelled images")
    val_loader = val_ds = None
    if cfg.val:
        val_sources = open_entries(cfg, cfg.val)
        _check_vocabulary(model, val_sources)
        if cfg.val_max_images:
            for s in val_sources:
                s.indices = s.indices[: cfg.val_max_images]
        val_ds = PromptedDataset(val_sources, model.image_size, model.pixel_mean, model.pixel_std, train=False,
                                 seed=cfg.seed, known_names=known, sequences=getattr(model, "sequences", None))
        if info.is_main:
            val_loader = DataLoader(val_ds, batch_size=cfg.val_batch_size, shuffle=False, collate_fn=collate,
                                    num_workers=cfg.num_workers)

    per_rank = cfg.batch_size // info.world_size
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"only {len(train_ds)} training samples for batch_size={cfg.batch_size}: lower the batch size")
    if cfg.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)

    sentences = None
    if is_text_model(model):
        wanted = train_ds.possible_prompts()
        for other in (val_ds, unl_ds):  # on every rank, so all ranks encode the same sentence list
            if other is None:
                continue
            for m, names in other.possible_prompts().items():
                wanted[m] = sorted(set(wanted.get(m, [])) | set(names))
        sentences = SentenceTable(model, wanted)
        from_checkpoint = Path(cfg.model).expanduser().is_dir()
        if (getattr(getattr(model, "decoder", None), "text_centering", False) and sentences.table
                and not from_checkpoint):
            # centre of the run's prompt vocabulary (a resumed run reloads the saved buffer below);
            # a run starting from a trained checkpoint keeps its centre (its decoder was fitted to it)
            model.decoder.set_text_center(torch.stack([sentences.table[k] for k in sorted(sentences.table)]))
    step_module: nn.Module = _StepModule(model, sentences)
    if info.enabled:
        # SyncBatchNorm needs CUDA; on CPU each rank normalises with its own batch statistics
        if (cfg.sync_batchnorm and device.type == "cuda"
                and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())):
            step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
            model = step_module.model
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=cfg.find_unused_parameters)

    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay)
    use_amp = bool(cfg.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    epoch, step, best = 0, 0, -math.inf
    resume_state: dict[str, Any] | None = None
    log_fields = LOG_FIELDS + (SEMI_LOG_FIELDS if semi.enabled else [])
    if resume:
        found = last_checkpoint(out)
        if found is None:
            logger.warning("no checkpoint in %s: starting from scratch", out)
        else:
            folder, rec = found
            from safetensors.torch import load_file

            from ..checkpoint import load_weights_into

            weights = load_file(str(folder / "model.safetensors"), device=str(device))
            load_weights_into(model, weights, str(folder))
            st = resume_state = load_state(folder)
            _load_optimizer_state(opt, st["optimizer"])
            if st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            set_rng_state(st["rng"])
            epoch, step = int(st["epoch"]), int(st["step"])
            best = float(st["best"]) if st.get("best") is not None else -math.inf
            if int(st.get("world_size", 1)) != info.world_size:
                logger.warning("resuming a %s-process run with %s processes", st.get("world_size"), info.world_size)
            if info.is_main:
                rows = [r for r in read_csv(out / "log.csv") if int(r["step"]) <= step]
                _write_csv_rows(out / "log.csv", rows, log_fields)
                vrows = [r for r in read_csv(out / "val.csv") if int(r["epoch"]) <= epoch]
                if vrows or (out / "val.csv").exists():
                    _write_csv_rows(out / "val.csv", vrows, list(vrows[0].keys()) if vrows else ["epoch", "step", "val_dice"])
            logger.info("resumed from %s (epoch %d, step %d)", folder, epoch, step)

    teacher = teacher_step = None
    if semi.enabled:
        from .semi import EMATeacher

        teacher = EMATeacher(model, semi.ema_decay, semi.ema_warmup)
        if resume_state is not None:
            if "teacher" not in resume_state:
                raise CheckpointError("the checkpoint has no EMA teacher (it comes from a supervised run); "
                                      "resume it with semi_supervised.enabled=false")
            teacher.load_state_dict(resume_state["teacher"])
        teacher_step = _StepModule(teacher.module, sentences)

    tb = None
    csv_log = val_log = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        from ..io import atomic_write_text

        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        csv_log = _CsvLog(out / "log.csv", log_fields)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; logging to CSV only (pip install tensorboard)")

    history: list[dict[str, Any]] = []
    last_ck = best_ck = None
    found = last_checkpoint(out) if info.is_main else None
    if found:
        last_ck = found[0]
    if (out / "best").is_dir():
        best_ck = out / "best"
    ips_hist: list[float] = []
    report(progress, step, total_steps)
    try:
        while epoch < cfg.epochs:
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, drop_last=True, collate_fn=collate,
                                num_workers=cfg.num_workers)
            unl_stream = None
            if unl_ds is not None:
                unl_stream = _unlabelled_batches(unl_ds, epoch, unl_batch // info.world_size, info, cfg)
            t_last = time.perf_counter()
            window = _new_window()
            for k, batch in enumerate(loader):
                if k >= steps_per_epoch:
                    break
                if ddp.broadcast_flag(bool(cancel is not None and cancel()), info, device):
                    raise Cancelled("training cancelled; the last complete epoch checkpoint is kept")
                factor = lr_factor(step, total_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                images = batch["image"].to(device, non_blocking=True)
                targets = batch["targets"].to(device, non_blocking=True)
                pmask = batch["prompt_mask"].to(device)
                ubatch = next(unl_stream) if unl_stream is not None else None
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    if ubatch is None:
                        logits, deep = step_module(images, batch)
                    else:  # one student forward over labelled + strong unlabelled views (one DDP call)
                        from .semi import merge_batches

                        with torch.no_grad():
                            t_logits, _ = teacher_step(ubatch["image_weak"].to(device), ubatch)
                        both = torch.cat([images, ubatch["image"].to(device)])
                        logits, deep = step_module(both, merge_batches(batch, ubatch))
                        n_l, p_l, p_u = images.shape[0], pmask.shape[1], ubatch["prompt_mask"].shape[1]
                        u_logits = logits[n_l:, :p_u]
                        logits, deep = logits[:n_l, :p_l], (deep[:n_l, :p_l] if deep is not None else None)
                loss, parts = segmentation_loss(logits.float(), targets, pmask, cfg.loss)
                if ubatch is not None:
                    from .semi import pseudo_label_loss, rampup_weight

                    u_loss, u_parts = pseudo_label_loss(u_logits.float(), torch.sigmoid(t_logits.float()),
                                                        ubatch["prompt_mask"].to(device), semi.confidence, cfg.loss)
                    u_weight = rampup_weight(step, total_steps, semi)
                    parts.update(u_parts, unsup_weight=torch.tensor(u_weight))
                if deep is not None and cfg.loss.deep_weight > 0:
                    up = torch.nn.functional.interpolate(deep.float(), size=targets.shape[-2:], mode="bilinear",
                                                         align_corners=False)
                    deep_loss, _ = segmentation_loss(up, targets, pmask, cfg.loss)
                    loss = loss + cfg.loss.deep_weight * deep_loss
                if ubatch is not None:
                    loss = loss + u_weight * u_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optim.lr or check the data")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                if teacher is not None:
                    teacher.update(model, step)
                step += 1
                keys = ["loss", "bce", "dice"] + (["unsup", "confident", "unsup_weight"] if ubatch is not None else [])
                parts["loss"] = loss.detach()
                lv = ddp.all_reduce_mean(torch.stack([parts[key].float().to(device) for key in keys]), info).cpu()
                for key, value in zip(keys, lv):
                    window[key] += float(value)
                window["n"] += 1
                window["images"] += cfg.batch_size
                report(progress, step, total_steps)
                if step % max(1, cfg.log_every) == 0 or k == steps_per_epoch - 1:
                    now = time.perf_counter()
                    ips = window["images"] / max(now - t_last, 1e-9)
                    ips_hist.append(ips)
                    rec = {"epoch": epoch, "step": step, "lr": cfg.optim.lr * factor,
                           "loss": window["loss"] / window["n"], "bce": window["bce"] / window["n"],
                           "dice": window["dice"] / window["n"], "images_per_s": ips, "seconds": now - t_last}
                    if teacher is not None:
                        rec.update({"unsup_loss": window["unsup"] / window["n"],
                                    "confident_fraction": window["confident"] / window["n"],
                                    "unsup_weight": window["unsup_weight"] / window["n"]})
                    history.append(rec)
                    if csv_log is not None:
                        csv_log.write(rec)
                    if tb is not None:
                        for key in ("loss", "bce", "dice", "lr", "images_per_s"):
                            tb.add_scalar(f"train/{key}", rec[key], step)
                    if log is not None and info.is_main:
                        log(dict(rec, kind="train"))
                    window = _new_window()
                    t_last = time.perf_counter()
            if unl_stream is not None:
                unl_stream.close()
            epoch += 1
            # validation + checkpoint on rank 0, others wait
            if info.is_main:
                val = validate(model, val_loader, device, cancel) if val_loader is not None else {}
                chosen, extra = model, {}
                if teacher is not None:
                    chosen, val, extra = _select(model, teacher.module, val, val_loader, device, cancel, semi.select)
                score = val.get("mean")
                improved = score is not None and math.isfinite(score) and score > best
                if improved:
                    best = float(score)
                state = {"optimizer": _optimizer_state(opt), "scaler": scaler.state_dict() if use_amp else {},
                         "rng": rng_state(), "epoch": epoch, "step": step,
                         "best": best if math.isfinite(best) else None, "world_size": info.world_size,
                         "config": cfg.to_dict()}
                if teacher is not None:
                    state["teacher"] = teacher.state_dict()
                last_ck = _save_epoch(out, model, state, epoch, step, cfg.keep_checkpoints)
                if improved or (val_loader is None and epoch == cfg.epochs):
                    best_ck = _save_best(out, chosen)
                if val:
                    vrec = {"epoch": epoch, "step": step, "val_dice": val["mean"],
                            **{f"val_dice/{k}": v for k, v in val.items() if k != "mean"}, **extra}
                    if val_log is None:
                        val_log = _CsvLog(out / "val.csv", list(vrec.keys()))
                    val_log.write(vrec)
                    if tb is not None:
                        tb.add_scalar("val/dice", val["mean"], step)
                    if log is not None:
                        log(dict(vrec, kind="val"))
                    logger.info("epoch %d: val mean Dice %.4f%s", epoch, val["mean"], " (best)" if improved else "")
            ddp.barrier(info)
    finally:
        if csv_log is not None:
            csv_log.close()
        if val_log is not None:
            val_log.close()
        if tb is not None:
            tb.close()

    eval_results = None
    if info.is_main and cfg.test and cfg.evaluate_at_end and best_ck is not None:
        eval_results = _evaluate_at_end(cfg, best_ck, device, cancel)
    return TrainResult(
        out_dir=out, epochs_done=epoch, steps_done=step, best_val_dice=best if math.isfinite(best) else None,
        last_checkpoint=last_ck, best_checkpoint=best_ck, history=history,
        images_per_s=float(np.median(ips_hist)) if ips_hist else None, eval_results=eval_results,
    )


def _new_window() -> dict[str, float]:
    return {"loss": 0.0, "bce": 0.0, "dice": 0.0, "unsup": 0.0, "confident": 0.0, "unsup_weight": 0.0,
            "n": 0, "images": 0}


def _unlabelled_batches(unl_ds, epoch: int, per_rank: int, info: ddp.DistInfo, cfg: TrainConfig):
    """Endless unlabelled batches for ``epoch``: reshuffled passes ("cycles") whose order and
    augmentation depend only on (seed, epoch, cycle), so a resumed epoch repeats exactly."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from ..data.unlabelled import collate_unlabelled

    cycle = 0
    while True:
        sub_epoch = epoch * 1_000_000 + cycle
        unl_ds.set_epoch(sub_epoch)
        sampler = DistributedSampler(unl_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed + 1, drop_last=True)
        sampler.set_epoch(sub_epoch)
        yield from DataLoader(unl_ds, batch_size=per_rank, sampler=sampler, drop_last=True,
                              collate_fn=collate_unlabelled, num_workers=cfg.num_workers)
        cycle += 1


def _select(student: nn.Module, teacher: nn.Module, val: dict[str, float], loader, device, cancel,
            mode: str) -> tuple[nn.Module, dict[str, float], dict[str, Any]]:
    """The model kept for ``best/`` (semi-supervised runs), its validation scores and the extra
    val.csv columns (``val_dice_student``, ``val_dice_teacher``, ``selected``)."""
    if loader is None:
        return (student if mode == "student" else teacher), val, {}
    tval = validate(teacher, loader, device, cancel)
    use_teacher = mode == "teacher" or (mode == "better" and tval["mean"] >= val["mean"])
    extra = {"val_dice_student": val["mean"], "val_dice_teacher": tval["mean"],
             "selected": "teacher" if use_teacher else "student"}
    return (teacher, tval, extra) if use_teacher else (student, val, extra)


def _evaluate_at_end(cfg: TrainConfig, best: Path, device: torch.device, cancel) -> dict[str, Any]:
    from ..checkpoint import load_checkpoint
    from ..evaluate import evaluate, to_json, to_markdown
    from ..io import atomic_write_text

    model = load_checkpoint(best).to(device).eval()
    splits = sorted({e.split for e in cfg.test})
    results = {}
    for split in splits:
        paths = [cfg.resolve_path(e) for e in cfg.test if e.split == split]
        res = evaluate(model, paths, split=split, device=device, split_seed=cfg.split.seed,
                       val_fraction=cfg.split.val_fraction, test_fraction=cfg.split.test_fraction, cancel=cancel,
                       model_name=str(best))
        results.update(res["datasets"])
    merged = {"model": str(best), "datasets": results}
    atomic_write_text(Path(cfg.out_dir) / "eval.json", to_json(merged))
    atomic_write_text(Path(cfg.out_dir) / "eval.md", to_markdown(merged))
    return merged
