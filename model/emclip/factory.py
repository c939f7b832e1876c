"""One factory for every network: ``create_model("tiny")``, ``create_model("cpu-default",
pretrained=True)``, ``create_model("path/to/checkpoint")``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import CONFIG_DIR, ModelConfig, list_configs, load_config
from .pretrained import PICKLE_SUFFIXES, load_tower_weights, locate_tower_weights

log = logging.getLogger(__name__)


def list_models() -> list[str]:
    """Names of the bundled architectures (``configs/models/*.json``)."""
    return list_configs()


def _is_checkpoint_path(source: str | Path) -> bool:
    text = str(source)
    if isinstance(source, str) and "/" not in text and "\\" not in text and (CONFIG_DIR / f"{text}.json").is_file():
        return False  # a bundled name wins over a same-named folder in the working directory
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    return path.suffix in (".safetensors", *PICKLE_SUFFIXES)


def create_model(
    config: ModelConfig | Mapping[str, Any] | str | Path,
    *,
    pretrained: bool = False,
    device: Any = None,
):
    """Build a :class:`~emclip.nn.SegmentationModel`.

    ``config``: a ModelConfig, a dict, a bundled name (:func:`list_models`), a ``.json`` path, or
    a checkpoint folder (then its weights are loaded, see :func:`emclip.checkpoint.load_checkpoint`,
    and ``pretrained`` is ignored). ``pretrained=True`` loads the tower weights named by
    ``image_encoder.pretrained`` / ``text_encoder.pretrained`` (seeds, 'openai', 'hf-hub:...',
    'local-dir:...', files); otherwise every weight is random (no file or network access for the
    bundled seeds-free configs). ``device``: None keeps the CPU; "auto", "cuda", ... moves it.
    The model is returned in train mode.
    """
    if isinstance(config, (str, Path)) and _is_checkpoint_path(config):
        from .checkpoint import load_checkpoint

        model = load_checkpoint(config, device=device or "cpu")
        return model
    cfg = load_config(config)
    model = build_model(cfg, pretrained=pretrained)
    if device is not None:
        from .device import resolve_device

        model = model.to(resolve_device(device))
    return model


def build_model(cfg: ModelConfig, *, pretrained: bool = False, text_source_dir: str | Path | None = None):
    """Instantiate ``cfg``; with ``pretrained`` load the towers' pretrained weights.

    ``text_source_dir`` is where an HF text tower finds its config/tokenizer (a checkpoint's
    ``text_tokenizer/``).
    """
    from .nn.emclip import EMCLIP
    from .nn.image_encoder import build_image_encoder
    from .nn.text_encoder import build_text_encoder
    from .nn.unet import UNet

    uses_image = cfg.image_encoder is not None and (cfg.arch == "emclip" or cfg.unet.encoder == "image_encoder")
    uses_text = cfg.arch == "emclip"
    if pretrained:  # find every weight file first: a missing download fails before any building
        for used, section, tower in ((uses_image, cfg.image_encoder, "visual"), (uses_text, cfg.text_encoder, "text")):
            if used and section.pretrained:
                locate_tower_weights(section.pretrained, tower, section.open_clip_model)
    text = None
    if uses_text:  # the text tower first: an HF tower may need hub files that are missing
        text = build_text_encoder(cfg.text_encoder, text_source_dir=text_source_dir)
    image = None
    if uses_image:
        image = build_image_encoder(cfg.image_encoder, cfg.image_size)
        if pretrained:
            _load_image_weights(image, cfg)
    if cfg.arch == "unet":
        return UNet(cfg, image)
    if pretrained:
        source = cfg.text_encoder.pretrained
        if source:
            text.load_tower_state_dict(load_tower_weights(source, "text", cfg.text_encoder.open_clip_model), source)
        else:
            log.warning("text_encoder.pretrained is not set: the text tower of %s keeps random weights", cfg.name)
    return EMCLIP(cfg, image, text)


def _load_image_weights(image, cfg: ModelConfig) -> None:
    source = cfg.image_encoder.pretrained
    if not source:
        log.warning("image_encoder.pretrained is not set: the image tower of %s keeps random weights", cfg.name)
        return
    image.load_tower_state_dict(load_tower_weights(source, "visual", cfg.image_encoder.open_clip_model), source)
