"""Architecture configs: small JSON files parsed into dataclasses (like open_clip's model configs).

A :class:`ModelConfig` fully describes a network: which open_clip towers it uses and where their
pretrained weights come from, the EM aggregation, the decoder and, for the U-Net baseline, its
class names. ``load_config("tiny")`` reads ``configs/models/tiny.json``; any key that is not a
field raises :class:`~emclip.errors.ConfigError` naming the key and the allowed keys, so a typo in
a JSON file never passes silently. ``ModelConfig.from_dict(cfg.to_dict()) == cfg`` always holds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataclass_io import from_mapping, to_plain
from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ARCHS = ("emclip", "unet")
GRAD_MODES = ("none", "last", "full")
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "models"

#: Keys a checkpoint's config.json carries next to the ModelConfig fields; ignored when parsing.
META_KEYS = ("format_version", "emclip_version", "weights_dtype")

#: Upper bounds of the size fields: far above any real network, low enough that an edited or
#: corrupted config is refused before the allocator is asked for terabytes.
SIZE_LIMITS = {
    "image_size": 8192,
    "image_encoder.embed_dim": 16384,
    "text_encoder.embed_dim": 16384,
    "em.channels": 8192,
    "em.num_bases": 4096,
    "em.iterations": 100,
    "decoder.channels": 8192,
    "decoder.embed_dim": 8192,
    "decoder.num_layers": 64,
    "decoder.num_heads": 256,
    "unet.base_channels": 4096,
    "unet.depth": 12,
    "unet.decoder_channels": 8192,
}


@dataclass
class ImageEncoderConfig:
    """An open_clip vision tower used as a multi-level feature extractor.

    ``open_clip_model`` names an open_clip architecture ("ViT-B-16", "hf-hub:org/repo",
    "local-dir:/path") whose ``vision_cfg`` is the base; ``vision_cfg`` holds open_clip
    ``CLIPVisionCfg`` fields merged on top (a custom tiny ViT, or ``timm_model_name`` for a timm
    trunk). ``image_size`` always comes from :attr:`ModelConfig.image_size`.
    ``pretrained`` (used only by ``create_model(..., pretrained=True)``): an open_clip tag such as
    "openai", "hf-hub:org/repo", "local-dir:/path", a weights file, or "seed:efficientnet-lite0".
    ``feature_indices``: ViT blocks to tap (default: 4 evenly spaced, last included) or timm
    feature stages (default: the stages with stride 4..32). ``freeze``: no gradients into the
    tower (default False). ``frozen_stages``: freeze only the stem and the first N stages/blocks
    (their norms stay in eval mode; default 0) — low-level pretrained filters are generic, and not
    back-propagating through the high-resolution stages makes CPU training ~2x faster.
    ``channels_last``: run the tower in channels-last memory format (faster convolutions on CPU;
    default False).
    """

    open_clip_model: str | None = None
    vision_cfg: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 512
    quick_gelu: bool = False
    pretrained: str | None = None
    feature_indices: list[int] | None = None
    freeze: bool = False
    frozen_stages: int = 0
    channels_last: bool = False


@dataclass
class TextEncoderConfig:
    """An open_clip text tower (CLIP ``TextTransformer`` or Hugging Face ``HFTextEncoder``).

    ``text_cfg`` holds open_clip ``CLIPTextCfg`` fields merged over the named architecture's
    (``hf_model_name`` selects an HF tower). ``embed_dim`` is the tower's output width D.
    The tower is frozen by default; embeddings of template sentences are cached (``cache_size``
    sentences, LRU). ``use_templates`` wraps prompts in modality templates (emclip.prompts).
    """

    open_clip_model: str | None = None
    text_cfg: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 512
    quick_gelu: bool = False
    pretrained: str | None = None
    freeze: bool = True
    cache_size: int = 4096
    use_templates: bool = True


@dataclass
class EMConfig:
    """EM aggregation (EMANet): K bases, T iterations, inverse temperature ``lam``.

    ``grad_mode``: "none" (EMANet: iterations without gradient), "last" (default: gradient
    through the final E/M step only) or "full" (unrolled). ``momentum`` is the share of the old
    stored bases kept at each training step (0.9).
    """

    enabled: bool = True
    channels: int = 256
    num_bases: int = 64
    iterations: int = 3
    lam: float = 1.0
    momentum: float = 0.9
    grad_mode: str = "last"


@dataclass
class DecoderConfig:
    """Text-guided pixel decoder: ``channels`` wide, ``embed_dim`` mask-embedding space.

    ``text_guidance`` False removes the pixel-to-text cross-attention (ablation); the mask head
    still compares pixels with prompts. ``num_layers`` cross-attention blocks of ``num_heads``.
    Mask logit = exp(scale) * cosine + bias, initialised to ``logit_scale_init`` and
    ``logit_bias_init``. ``text_centering`` (default False): subtract a stored mean prompt
    embedding (set by the trainer from its prompt vocabulary, saved in the checkpoint) and
    re-normalise before the text adapter. Sentence encoders give near-identical embeddings to
    "left ventricle" and "right ventricle" (cosine ~0.97); centring removes the shared component
    so the words that differ dominate.
    """

    channels: int = 256
    embed_dim: int = 128
    text_guidance: bool = True
    num_layers: int = 1
    num_heads: int = 8
    ffn_ratio: float = 4.0
    dropout: float = 0.0
    text_adapter: str = "mlp"
    logit_scale_init: float = 10.0
    logit_bias_init: float = -2.0
    text_centering: bool = False


@dataclass
class UNetConfig:
    """U-Net baseline: a plain conv encoder (``encoder="plain"``: ``base_channels`` doubling over
    ``depth`` down-sampling steps) or the config's ``image_encoder`` (``encoder="image_encoder"``)."""

    encoder: str = "plain"
    base_channels: int = 32
    depth: int = 4
    decoder_channels: int = 64


@dataclass
class FusionConfig:
    """Modality fusion before the image tower (emclip.nn.fusion; off by default).

    ``enabled``: the model takes one channel per sequence of ``sequences`` (default FLAIR, T1,
    T1ce, T2) instead of RGB. ``shared_stems``: sequence -> sequence whose stem it uses (default
    t1ce uses the t1 stem: both T1-weighted, so an unseen one still has a trained stem).
    ``stem_channels`` C (16); ``gate``: "pixel" (per-pixel softmax, default) or "image";
    ``sequence_dropout``: training-time chance of hiding each present sequence (0.3, >= 1 kept).
    ``unseen``: what inference does with a sequence the model never saw in training: "ignore"
    (default: left out, with a warning, unless nothing else is present) or "use".
    """

    enabled: bool = False
    sequences: list[str] = field(default_factory=lambda: ["flair", "t1", "t1ce", "t2"])
    shared_stems: dict[str, str] = field(default_factory=lambda: {"t1ce": "t1"})
    stem_channels: int = 16
    gate: str = "pixel"
    sequence_dropout: float = 0.3
    unseen: str = "ignore"

    def validate(self) -> None:
        seqs = [s.lower() for s in self.sequences]
        if not seqs or any(not s.strip() or s != "".join(s.split()) for s in seqs):
            raise ConfigError(f"fusion.sequences must be non-empty names without spaces, got {self.sequences}")
        if seqs != list(self.sequences) or len(set(seqs)) != len(seqs):
            raise ConfigError(f"fusion.sequences must be distinct lower-case names, got {self.sequences}")
        for k, v in self.shared_stems.items():
            if k not in seqs or v not in seqs or v in self.shared_stems:
                raise ConfigError(
                    f"fusion.shared_stems {k!r}: {v!r}: both must be in fusion.sequences {seqs} and {v!r} "
                    "must have its own stem"
                )
        if self.stem_channels < 1 or self.stem_channels > 1024:
            raise ConfigError(f"fusion.stem_channels must be in 1..1024, got {self.stem_channels}")
        if self.gate not in ("pixel", "image"):
            raise ConfigError(f"fusion.gate={self.gate!r}; use 'pixel' or 'image'")
        if not 0.0 <= self.sequence_dropout < 1.0:
            raise ConfigError(f"fusion.sequence_dropout must be in [0, 1), got {self.sequence_dropout}")
        if self.unseen not in ("ignore", "use"):
            raise ConfigError(f"fusion.unseen={self.unseen!r}; use 'ignore' or 'use'")


@dataclass
class ModelConfig:
    """A whole network. ``arch`` is "emclip" or "unet"; ``image_size`` is the square input side;
    ``pixel_mean``/``pixel_std`` normalise [0, 1] RGB. ``class_names``/``synonyms`` are for the
    closed-vocabulary U-Net only. ``fusion``: multi-sequence MRI input (FusionConfig). ``known_structures`` maps a modality key (emclip.modality) to
    the structures the model was trained on (set by the trainer; used by prompt-free segment).
    ``single_object``: structures that are one connected object in a 2D image; their masks keep
    only the main connected component (:mod:`emclip.postprocess`; default empty = off).
    ``test_time_mirror``: average every inference pass with a left-right mirrored pass (one batch
    of two; :mod:`emclip.inference.runner`). None (default) = the trainer sets it to whether
    training used horizontal flips; a None left at inference means off."""

    arch: str = "emclip"
    name: str = "custom"
    description: str = ""
    image_size: int = 256
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD
    image_encoder: ImageEncoderConfig | None = None
    text_encoder: TextEncoderConfig | None = None
    em: EMConfig = field(default_factory=EMConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    class_names: list[str] = field(default_factory=list)
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    known_structures: dict[str, list[str]] = field(default_factory=dict)
    single_object: list[str] = field(default_factory=list)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    test_time_mirror: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists); ``from_dict`` restores an equal config."""
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Parse and validate; unknown keys raise ConfigError naming the key and allowed keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model config must be a JSON object (dict), got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in META_KEYS}
        cfg = from_mapping(cls, data)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _check_size_limits(self) -> None:
        for key, limit in SIZE_LIMITS.items():
            section, _, name = key.rpartition(".")
            owner = getattr(self, section) if section else self
            value = getattr(owner, name) if owner is not None else None
            if isinstance(value, int) and value > limit:
                raise ConfigError(
                    f"{key}={value} is far too large (at most {limit}); the config was probably mistyped "
                    "or corrupted: fix the value or save the model again"
                )

    def validate(self) -> None:
        """Check values that types alone do not catch; raise ConfigError saying what to change."""
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture arch={self.arch!r}; use one of {list(ARCHS)}")
        if self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size} is too small; use at least 16 (e.g. 256)")
        self._check_size_limits()
        self.fusion.validate()
        if self.fusion.enabled and self.arch != "emclip":
            raise ConfigError("fusion.enabled needs arch 'emclip' (the U-Net baseline takes RGB/grey only)")
        for key in ("pixel_mean", "pixel_std"):
            value = getattr(self, key)
            if len(value) != 3:
                raise ConfigError(f"{key} needs 3 values (R, G, B), got {len(value)}")
        if any(s <= 0 for s in self.pixel_std):
            raise ConfigError(f"pixel_std must be positive, got {list(self.pixel_std)}")
        if self.arch == "emclip":
            if self.image_encoder is None or self.text_encoder is None:
                raise ConfigError("arch 'emclip' needs both an 'image_encoder' and a 'text_encoder' section")
            if self.em.grad_mode not in GRAD_MODES:
                raise ConfigError(f"em.grad_mode={self.em.grad_mode!r}; use one of {list(GRAD_MODES)}")
            for key in ("channels", "num_bases", "iterations"):
                if getattr(self.em, key) < 1:
                    raise ConfigError(f"em.{key} must be >= 1, got {getattr(self.em, key)}")
            if not 0.0 <= self.em.momentum < 1.0:
                raise ConfigError(f"em.momentum must be in [0, 1), got {self.em.momentum}")
            if self.em.lam <= 0:
                raise ConfigError(f"em.lam must be positive, got {self.em.lam}")
            d = self.decoder
            if d.channels < 1 or d.embed_dim < 1 or d.num_layers < 0 or d.num_heads < 1:
                raise ConfigError("decoder.channels, embed_dim and num_heads must be >= 1, num_layers >= 0")
            if d.channels % d.num_heads:
                raise ConfigError(
                    f"decoder.channels={d.channels} must be divisible by decoder.num_heads={d.num_heads}"
                )
            if d.text_adapter not in ("mlp", "linear"):
                raise ConfigError(f"decoder.text_adapter={d.text_adapter!r}; use 'mlp' or 'linear'")
            if d.logit_scale_init <= 0:
                raise ConfigError(f"decoder.logit_scale_init must be positive, got {d.logit_scale_init}")
        else:
            if not self.class_names:
                raise ConfigError("arch 'unet' needs 'class_names' (the structures its output channels predict)")
            if len({c.casefold() for c in self.class_names}) != len(self.class_names):
                raise ConfigError(f"class_names contains duplicates: {self.class_names}")
            if self.unet.encoder not in ("plain", "image_encoder"):
                raise ConfigError(f"unet.encoder={self.unet.encoder!r}; use 'plain' or 'image_encoder'")
            if self.unet.encoder == "image_encoder" and self.image_encoder is None:
                raise ConfigError("unet.encoder='image_encoder' needs an 'image_encoder' section")
            if self.unet.base_channels < 1 or self.unet.depth < 1 or self.unet.decoder_channels < 1:
                raise ConfigError("unet.base_channels, depth and decoder_channels must be >= 1")
            unknown = sorted(set(self.synonyms) - set(self.class_names))
            if unknown:
                raise ConfigError(f"synonyms given for {unknown}, which are not in class_names {self.class_names}")


# ----------------------------------------------------------------------------------------------
# loading


def list_configs() -> list[str]:
    """Names of the bundled architecture configs (``configs/models/*.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; parse errors become ConfigError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def load_config(
    source: ModelConfig | Mapping[str, Any] | str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """Load a :class:`ModelConfig`.

    ``source`` is a ModelConfig (copied), a dict, a bundled name (``list_configs()``: "tiny",
    "cpu-default", ...), a path to a ``.json`` file, or a checkpoint folder holding
    ``config.json``. ``overrides`` maps dotted keys to values, e.g.
    ``{"image_encoder.pretrained": "local-dir:/models/vit-b-16", "em.num_bases": 32}``.
    """
    if isinstance(source, ModelConfig):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    elif isinstance(source, (str, Path)):
        data = _read_source(source)
    else:
        raise ConfigError(
            f"cannot load a model config from {type(source).__name__}; pass a name {list_configs()}, "
            "a .json path, a checkpoint folder or a dict"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return ModelConfig.from_dict(data)


def _read_source(source: str | Path) -> Any:
    text = str(source)
    bundled = CONFIG_DIR / f"{text}.json"
    if isinstance(source, str) and "/" not in text and "\\" not in text and bundled.is_file():
        return read_json(bundled)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return read_json(path / "config.json")
        raise ConfigError(f"folder {path} has no config.json; pass a checkpoint folder or a .json file")
    if path.is_file():
        return read_json(path)
    raise ConfigError(
        f"unknown model config {text!r}: not a bundled name ({', '.join(list_configs())}) "
        "and no such file or folder"
    )
