"""open_clip vision towers as multi-level feature extractors.

``build_image_encoder(cfg, image_size)`` returns an :class:`ImageEncoder` whose ``forward(x)``
gives a list of feature maps ``[B, out_channels[i], H / strides[i], W / strides[i]]``, finest
first. Two kinds of tower:

- ViT (open_clip ``VisionTransformer`` or a timm ViT trunk): patch tokens of several blocks
  (``feature_indices``) become ``[B, width, H/p, W/p]`` maps, and a small learned neck
  (transposed convs / max-pool, as in ViTDet's simple pyramid) turns them into strides
  p/4, p/2, p, 2p. The positional embedding is built (and pretrained ones resized) for the
  configured ``image_size``; other input sizes interpolate it on the fly.
- CNN (timm trunk inside open_clip's ``TimmModel``, e.g. ``tf_efficientnet_lite0``): the stage
  outputs of ``forward_intermediates`` with strides 4, 8, 16, 32.

Layers after the last tapped one and the CLIP pooling/projection head are removed, so every
parameter gets a gradient (DDP needs no ``find_unused_parameters``). The open_clip tower module
is ``self.visual``; its state dict uses open_clip's names, so CLIP checkpoints load directly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ImageEncoderConfig
from ..errors import ConfigError
from . import towers
from .bn_folding import FoldedTowerCache, tower_state

log = logging.getLogger(__name__)


def resize_token_pos_embed(pos: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Bicubically resize a ``[prefix + h*w, C]`` (or ``[1, prefix + h*w, C]``) positional
    embedding of a square grid to ``grid`` (gh, gw); prefix (class) tokens are kept."""
    squeeze = pos.ndim == 2
    if squeeze:
        pos = pos[None]
    tokens = pos.shape[1] - prefix
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"positional embedding with {tokens} patch tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos[0] if squeeze else pos
    head, body = pos[:, :prefix], pos[:, prefix:]
    body = body.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    body = F.interpolate(body, size=tuple(grid), mode="bicubic", align_corners=False, antialias=grid[0] < side)
    body = body.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    out = torch.cat([head, body], dim=1)
    return out[0] if squeeze else out


class ViTPyramid(nn.Module):
    """Turn same-stride ViT maps ``[B, width, H/p, W/p]`` into strides p/4, p/2, p, 2p.

    Levels whose stride would not be a whole number (p not divisible by 4 or 2) are left out.
    Level i reads tap ``floor(i * taps / levels)``, so 1..4 taps all work. Each tap is first
    layer-normalised over channels (intermediate CLIP tokens have large norms).
    """

    def __init__(self, width: int, patch: int, taps: int) -> None:
        super().__init__()
        scales = [s for s in (4.0, 2.0, 1.0, 0.5) if (patch / s).is_integer()]
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(taps))
        self.sources = [min(taps - 1, (i * taps) // len(scales)) for i in range(len(scales))]
        self.stages = nn.ModuleList()
        self.out_channels: list[int] = []
        self.strides: list[int] = []
        for s in scales:
            if s == 4.0:
                stage = nn.Sequential(
                    nn.ConvTranspose2d(width, width // 2, 2, stride=2),
                    nn.GroupNorm(1, width // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2),
                )
                ch = width // 4
            elif s == 2.0:
                stage, ch = nn.ConvTranspose2d(width, width // 2, 2, stride=2), width // 2
            elif s == 1.0:
                stage, ch = nn.Identity(), width
            else:
                stage, ch = nn.MaxPool2d(2), width
            self.stages.append(stage)
            self.out_channels.append(ch)
            self.strides.append(int(patch / s))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        normed = [n(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for n, m in zip(self.norms, maps)]
        return [stage(normed[src]) for stage, src in zip(self.stages, self.sources)]


class ImageEncoder(nn.Module):
    """Base: ``visual`` (the open_clip tower), ``out_channels``, ``strides``, ``size_divisor``."""

    visual: nn.Module
    out_channels: list[int]
    strides: list[int]

    def __init__(self, visual: nn.Module, freeze: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self.frozen = freeze
        self.frozen_modules: list[nn.Module] = []
        self.channels_last = False
        if freeze:
            towers.freeze(visual)

    def freeze_early(self, stages: int) -> None:
        """Freeze the stem and the first ``stages`` stages (no gradients, norms in eval mode)."""
        if stages <= 0:
            return
        modules = self._early_modules(stages)
        for m in modules:
            towers.freeze(m)
        self.frozen_modules = modules
        self.train(self.training)

    def _early_modules(self, stages: int) -> list[nn.Module]:
        raise ConfigError(f"image_encoder.frozen_stages is not supported for {type(self).__name__}; use freeze")

    def use_channels_last(self, enabled: bool = True) -> None:
        """Store the tower's weights channels-last and feed it channels-last inputs."""
        self.channels_last = enabled
        if enabled:
            self.visual.to(memory_format=torch.channels_last)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def size_divisor(self) -> int:
        return math.lcm(*self.strides)

    def train(self, mode: bool = True) -> ImageEncoder:
        towers.set_mode_keeping_frozen(self, mode, ([self.visual] if self.frozen else []) + self.frozen_modules)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adapt_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sd

    def load_tower_state_dict(self, sd: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load open_clip-named tower weights; pruned/head keys are ignored, anything the tower
        needs but does not get (or gets with the wrong shape) raises PretrainedWeightsUnavailable."""
        sd = self._adapt_state_dict(dict(sd))
        loaded = towers.load_matching_weights(
            self.visual, sd, section="image_encoder", source=source,
            advice="; check open_clip_model / vision_cfg against the weights",
        )
        log.info("image tower: loaded %d tensors from %s (%d unused)", loaded, source, len(sd) - loaded)


class OpenCLIPViTEncoder(ImageEncoder):
    """open_clip ``VisionTransformer`` -> pyramid of 4 levels (see module docstring)."""

    def __init__(self, visual: nn.Module, indices: list[int], freeze: bool = False) -> None:
        layers = len(visual.transformer.resblocks)
        _check_indices(indices, layers, "ViT block")
        visual.transformer.resblocks = visual.transformer.resblocks[: max(indices) + 1]
        visual.ln_post = nn.Identity()
        visual.proj = None
        visual.attn_pool = None
        if hasattr(visual, "attn_pool_contrastive"):
            visual.attn_pool_contrastive = None
        super().__init__(visual, freeze)
        self.indices = list(indices)
        self.patch = int(visual.patch_size[0])
        self.width = int(visual.transformer.width)
        self.pyramid = ViTPyramid(self.width, self.patch, len(indices))
        self.out_channels = self.pyramid.out_channels
        self.strides = self.pyramid.strides

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.visual.positional_embedding
        if tuple(grid) == tuple(self.visual.grid_size):
            return pos
        return resize_token_pos_embed(pos, grid, prefix=1)

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens of the tapped blocks as ``[B, width, H/p, W/p]`` maps (before the neck)."""
        v = self.visual
        x = v.conv1(x)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed((gh, gw)).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        _, inter = v.transformer.forward_intermediates(x, indices=self.indices, stop_early=True)
        return [t[:, 1:].reshape(b, gh, gw, c).permute(0, 3, 1, 2) for t in inter]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.pyramid(self.forward_maps(x))

    def _adapt_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pos = sd.get("positional_embedding")
        if pos is not None and pos.shape != self.visual.positional_embedding.shape:
            sd["positional_embedding"] = resize_token_pos_embed(pos, tuple(self.visual.grid_size), prefix=1)
        return sd


class TimmEncoder(ImageEncoder):
    """timm trunk of an open_clip ``TimmModel``: CNN stages (strides 4..32) or, for a timm ViT,
    the same pyramid as :class:`OpenCLIPViTEncoder`. ``fold_batchnorm`` (default True): a CNN
    trunk called in eval mode without gradients runs a BatchNorm-folded copy (:mod:`.bn_folding`);
    ``prepack_convolutions`` (default True): on the CPU in float32, that copy's convolutions keep
    their weights in oneDNN's layout (:mod:`.conv_prepacking`) and it runs as one flat function
    (:func:`.inference_copy.flatten`)."""

    def __init__(self, visual: nn.Module, indices: list[int] | None, image_size: int, freeze: bool = False) -> None:
        trunk = visual.trunk
        visual.head = nn.Sequential()  # CLIP pooling/projection head is not used
        info = list(getattr(trunk, "feature_info", None) or [])
        if not info or not hasattr(trunk, "forward_intermediates"):
            raise ConfigError(f"timm model {type(trunk).__name__} has no feature_info/forward_intermediates; pick another")
        reductions = [int(f["reduction"]) for f in info]
        self.is_vit = len(set(reductions)) == 1 and hasattr(trunk, "patch_embed")
        if self.is_vit:
            layers = len(trunk.blocks)
            indices = indices or default_vit_indices(layers)
            _check_indices(indices, layers, "ViT block")
            if hasattr(trunk, "set_input_size"):
                trunk.set_input_size(img_size=(image_size, image_size))
            _enable_dynamic_size(trunk)
        else:
            indices = indices or [i for i, r in enumerate(reductions) if r >= 4]
            _check_indices(indices, len(info), "timm feature stage")
        trunk.prune_intermediate_layers(indices, prune_norm=not self.is_vit, prune_head=True)
        if self.is_vit:
            trunk.norm = nn.Identity()
        super().__init__(visual, freeze)
        self.fold_batchnorm = True
        self.prepack_convolutions = True
        self._folded = FoldedTowerCache()
        self.indices = list(indices)
        if self.is_vit:
            self.patch = int(trunk.patch_embed.patch_size[0])
            self.pyramid = ViTPyramid(int(trunk.embed_dim), self.patch, len(indices))
            self.out_channels, self.strides = self.pyramid.out_channels, self.pyramid.strides
        else:
            self.pyramid = None
            self.out_channels = [int(info[i]["num_chs"]) for i in indices]
            self.strides = [reductions[i] for i in indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self._run_trunk(self._input(x))
        if self.pyramid is not None:
            return self.pyramid(feats)
        # A channels-last tower hands its maps on channels-last: the decoder's convolutions then
        # run on them without NCHW <-> blocked-layout reorders (faster on CPU, same values).
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [f.contiguous(memory_format=fmt) for f in feats]

    def _call_trunk(self, trunk: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        return trunk.forward_intermediates(x, indices=self.indices, intermediates_only=True, stop_early=True)

    def _run_trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Inference without gradients (every trunk module in eval mode, ``fold_batchnorm``) runs a
        BatchNorm-folded copy of a CNN trunk (:mod:`.bn_folding`, same outputs, fewer passes over
        memory); training (of any module, e.g. norms re-estimating their statistics), gradients and
        ViTs run the trunk itself."""
        trunk = self.visual.trunk
        if self.is_vit or torch.is_grad_enabled() or not self.fold_batchnorm:
            return self._call_trunk(trunk, x)
        training, key = tower_state(trunk)
        if training:
            return self._call_trunk(trunk, x)
        return self._folded.run(trunk, self._call_trunk, x, prepack=self.prepack_convolutions,
                                key=(tuple(self.indices), key))

    def _early_modules(self, stages: int) -> list[nn.Module]:
        trunk = self.visual.trunk
        if self.is_vit or not hasattr(trunk, "blocks"):
            return super()._early_modules(stages)
        if stages > len(trunk.blocks):
            raise ConfigError(f"image_encoder.frozen_stages={stages} but the trunk has {len(trunk.blocks)} stages")
        stem = [m for name in ("conv_stem", "bn1") if (m := getattr(trunk, name, None)) is not None]
        return stem + list(trunk.blocks[:stages])

    def _adapt_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = "trunk.pos_embed"
        own = getattr(self.visual.trunk, "pos_embed", None)
        if self.is_vit and key in sd and own is not None and sd[key].shape != own.shape:
            prefix = 0 if getattr(self.visual.trunk, "no_embed_class", False) else self.visual.trunk.num_prefix_tokens
            grid = tuple(self.visual.trunk.patch_embed.grid_size)
            sd[key] = resize_token_pos_embed(sd[key], grid, prefix=prefix)
        return sd


def _enable_dynamic_size(trunk: nn.Module) -> None:
    """Let a timm ViT take any input size (pos-embed resampled per call) like
    ``dynamic_img_size=True`` at creation does."""
    from timm.layers import Format

    trunk.dynamic_img_size = True
    pe = trunk.patch_embed
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC


def default_vit_indices(layers: int) -> list[int]:
    """Four evenly spaced blocks ending with the last (12 -> [2, 5, 8, 11]; 2 -> [0, 1])."""
    return sorted({max(0, round(layers * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)})


def _check_indices(indices: list[int], count: int, what: str) -> None:
    if not indices or any(not 0 <= i < count for i in indices) or sorted(set(indices)) != list(indices):
        raise ConfigError(
            f"image_encoder.feature_indices={indices} is invalid: give increasing {what} indices in 0..{count - 1}"
        )


def build_image_encoder(cfg: ImageEncoderConfig, image_size: int) -> ImageEncoder:
    """Build the tower named by ``cfg`` with random weights at ``image_size`` (no download)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_clip.transformer import VisionTransformer

    from ..pretrained import open_clip_architecture

    embed_dim, quick_gelu, base = cfg.embed_dim, cfg.quick_gelu, {}
    if cfg.open_clip_model:
        arch = open_clip_architecture(cfg.open_clip_model)
        base = dict(arch.get("vision_cfg", {}))
    vision: dict[str, Any] = {**base, **cfg.vision_cfg, "image_size": image_size}
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False  # weights come from emclip.pretrained only
    try:
        vision_cfg = CLIPVisionCfg(**vision)
    except TypeError as exc:
        allowed = sorted(CLIPVisionCfg.__dataclass_fields__)
        raise ConfigError(f"image_encoder.vision_cfg: {exc}; allowed keys: {', '.join(allowed)}") from exc
    if isinstance(vision_cfg.layers, (list, tuple)) and not vision_cfg.timm_model_name:
        raise ConfigError("image_encoder: open_clip ModifiedResNet towers are not supported; use a ViT or a timm model")
    try:
        visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu)
    except RuntimeError as exc:
        raise ConfigError(f"image_encoder: cannot build the vision tower ({exc})") from exc
    if isinstance(visual, VisionTransformer):
        indices = cfg.feature_indices or default_vit_indices(len(visual.transformer.resblocks))
        encoder = OpenCLIPViTEncoder(visual, indices, freeze=cfg.freeze)
        encoder.freeze_early(cfg.frozen_stages)
        return encoder
    if hasattr(visual, "trunk"):
        encoder = TimmEncoder(visual, cfg.feature_indices, image_size, freeze=cfg.freeze)
        encoder.freeze_early(cfg.frozen_stages)
        encoder.use_channels_last(cfg.channels_last)
        return encoder
    raise ConfigError(f"image_encoder: unsupported open_clip tower {type(visual).__name__}")  # pragma: no cover
