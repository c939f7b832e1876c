"""Training configs: YAML files parsed into :class:`TrainConfig` (presets in configs/train/).

A config may start with ``extends: other.yaml`` (a path relative to the file, or a bundled preset
name); its keys are merged over the base recursively (lists are replaced). Command-line
overrides are ``key=value`` with dotted keys and YAML values, e.g. ``batch_size=4``,
``optim.lr=1e-3``, ``train.0.repeat=3``, ``model=unet-baseline``. Unknown keys raise
:class:`~emclip.errors.ConfigError` listing the allowed ones.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import dataclass_io
from ..data.augment import AugmentConfig
from ..data.training import PromptConfig
from ..errors import ConfigError
from .losses import LossConfig
from .semi import SemiSupervisedConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"


@dataclass
class DatasetEntry:
    """One dataset of a run. ``path``: dataset folder, relative to ``data_root`` unless absolute.
    ``split``: train | val | test | trainval | all (default train; see emclip.data.splits).
    ``repeat``: times each sample appears per epoch (balance small datasets; default 1).
    ``limit``: use only the first N samples of the split (quick runs; default all).
    ``name``: label in logs and results (default the folder name).
    Volumes only: ``axis`` (axial), ``channel`` (first of dataset.yaml), ``only_labelled`` (False).
    Training entries only (semi-supervised protocol, see emclip.train.semi): ``labelled_fraction``
    (1.0) keeps the masks of that fraction of the split's patients, drawn with ``labelled_seed``
    (0); the other patients are unlabelled (used only when ``semi_supervised.enabled``);
    ``unlabelled`` (False): use the whole entry as unlabelled images."""

    path: str = ""
    split: str = "train"
    repeat: int = 1
    limit: int | None = None
    name: str = ""
    axis: str = "axial"
    channel: str | None = None
    only_labelled: bool = False
    labelled_fraction: float = 1.0
    labelled_seed: int = 0
    unlabelled: bool = False


@dataclass
class SplitConfig:
    """Seeded grouped split used when meta.csv has no official split (fractions of groups)."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    ``lr`` for new parts, ``encoder_lr`` for parameters whose name starts with one of
    ``encoder_prefixes`` (the image tower of EM-CLIP / the U-Net baseline) when that tower starts
    from pretrained weights. ``grad_clip`` (max global norm; 0 = off)."""

    lr: float = 3e-4
    encoder_lr: float = 3e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    encoder_prefixes: list[str] = field(default_factory=lambda: ["image_encoder.", "encoder."])


@dataclass
class TrainConfig:
    """A whole training run (all fields have defaults; see configs/train/*.yaml).

    ``model``: bundled architecture name, model-config .json, or a checkpoint folder (fine-tune).
    ``image_size``: network input side (None: the model config's). ``batch_size`` is the *global*
    batch (split over DDP ranks). An epoch is ``steps_per_epoch`` steps (None: one pass,
    ``len(train samples) // batch_size``). ``amp`` applies on CUDA only. ``out_dir`` receives
    log.csv, val.csv, checkpoints/, last.json and best/ (a folder holding a run is refused unless
    resuming). ``sync_batchnorm``: SyncBatchNorm under DDP on CUDA (torch has none on CPU: there
    each rank normalises with its own batch statistics). ``evaluate_at_end``: run
    :func:`emclip.evaluate.evaluate` with the best checkpoint on ``test`` (writes eval.json/.md).
    """

    model: str = "tiny"
    pretrained: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_root: str = "../shared/data"
    train: list[DatasetEntry] = field(default_factory=list)
    val: list[DatasetEntry] = field(default_factory=list)
    test: list[DatasetEntry] = field(default_factory=list)
    image_size: int | None = None
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    semi_supervised: SemiSupervisedConfig = field(default_factory=SemiSupervisedConfig)
    seed: int = 0
    num_workers: int = 0
    amp: bool = True
    device: str = "auto"
    out_dir: str = "runs/emclip"
    val_max_images: int | None = 64
    val_batch_size: int = 8
    log_every: int = 10
    keep_checkpoints: int = 1
    tensorboard: bool = False
    sync_batchnorm: bool = True
    find_unused_parameters: bool = False
    evaluate_at_end: bool = True

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("the config lists no training datasets: add 'train: [{path: fundus/drishti_gs}]'")
        for group in ("train", "val", "test"):
            for k, e in enumerate(getattr(self, group)):
                if not e.path:
                    raise ConfigError(f"{group}[{k}] has no 'path'")
                if e.repeat < 1 or (e.limit is not None and e.limit < 1):
                    raise ConfigError(f"{group}[{k}]: repeat and limit must be >= 1")
                if not 0 < e.labelled_fraction <= 1 or (group != "train" and (e.labelled_fraction < 1 or e.unlabelled)):
                    raise ConfigError(f"{group}[{k}]: labelled_fraction must be in (0, 1]; it and 'unlabelled' "
                                      "apply to training entries only")
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch_size and epochs must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError("steps_per_epoch must be >= 1 (or null for one pass over the data)")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size} is too small (use >= 16)")
        o = self.optim
        if o.lr <= 0 or o.encoder_lr < 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError("optim: lr > 0, encoder_lr >= 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_io.to_plain(dataclasses.asdict(self))

    def resolve_path(self, entry: DatasetEntry) -> Path:
        p = Path(entry.path).expanduser()
        return p if p.is_absolute() else Path(self.data_root).expanduser() / p


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming allowed keys.
    Numbers are accepted where text is expected (YAML reads ``name: 2020`` as a number)."""
    return dataclass_io.from_mapping(cls, data, prefix, numbers_as_text=True)


def list_presets() -> list[str]:
    """Names of the bundled training presets (configs/train/*.yaml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _find(source: str | Path, base_dir: Path | None = None) -> Path:
    text = str(source)
    p = Path(text).expanduser()
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [p]
    if "/" not in text and "\\" not in text:
        candidates.append(PRESET_DIR / (text if text.endswith(".yaml") else f"{text}.yaml"))
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"training config {text!r} not found: pass a .yaml path or a preset ({', '.join(list_presets())})")


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml_config(source: str | Path, _seen: tuple[Path, ...] = (), _base_dir: Path | None = None) -> dict[str, Any]:
    """The merged mapping of a YAML config and its ``extends`` chain."""
    import yaml

    path = _find(source, _base_dir).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config must be a mapping of keys to values")
    parent = data.pop("extends", None)
    if parent:
        data = _merge(read_yaml_config(parent, _seen + (path,), path.parent), data)
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``key=value`` strings (YAML values) or a {dotted key: value} mapping to ``data``."""
    import yaml

    data = copy.deepcopy(data)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override {text!r} must look like key=value, e.g. batch_size=4")
            key, raw = text.split("=", 1)
            try:
                items.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    for key, value in items:
        parts = key.split(".")
        node: Any = data
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override '{key}': '{part}' is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                    if not isinstance(node, (dict, list)):
                        raise ConfigError(f"override '{key}': '{part}' is not a section")
    return data


def load_train_config(
    source: str | Path | Mapping[str, Any] | TrainConfig,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> TrainConfig:
    """Load a :class:`TrainConfig` from a preset name, a YAML path, a mapping or a TrainConfig,
    then apply ``overrides`` and validate."""
    if isinstance(source, TrainConfig):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
        if "extends" in data:
            parent = data.pop("extends")
            data = _merge(read_yaml_config(parent), data)
    else:
        data = read_yaml_config(source)
    data = apply_overrides(data, overrides)
    cfg = from_mapping(TrainConfig, data)
    cfg.validate()
    return cfg
