"""Frozen open_clip text towers with prompt templates and an embedding cache.

``build_text_encoder(cfg)`` wraps a CLIP ``TextTransformer`` or an ``HFTextEncoder`` (e.g.
all-MiniLM-L6-v2 with mean pooling, PubMedBERT) and its tokenizer. Prompts are wrapped in the
templates of the image modality (emclip.prompts): at inference (``mode="ensemble"``) the
L2-normalised embeddings of all templates are averaged and re-normalised; in training
(``mode="random"``) one template is drawn per prompt.

Sentence embeddings are cached (LRU, keyed by the exact sentence), so the same prompts never run
the tower twice; ``cache_info()`` reports hits and misses. The cache is bypassed while the
tower itself is being trained and is cleared when its weights, device or dtype change, or when
the tower switches between train and eval mode.
"""

from __future__ import annotations

import functools
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from ..errors import ConfigError, InvalidPromptError, PretrainedWeightsUnavailable
from ..prompts import apply_templates, random_template
from . import towers

MODES = ("ensemble", "random")


class EmbeddingCache:
    """A small LRU map sentence -> embedding with hit/miss counters."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(0, int(maxsize))
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


@functools.lru_cache(maxsize=8)
def _clip_tokenizer(context_length: int) -> Callable:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(source: str, context_length: int) -> Callable:
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(source, context_length=context_length)
    except Exception as exc:
        raise PretrainedWeightsUnavailable(f"cannot load the tokenizer from {source!r}: {str(exc).splitlines()[0]}") from exc


class TextEncoder(nn.Module):
    """Text tower ``tower`` + ``tokenizer``; ``embed_dim`` = D of the returned embeddings."""

    def __init__(
        self,
        tower: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        embed_dim: int,
        *,
        freeze: bool = True,
        cache_size: int = 4096,
        use_templates: bool = True,
        hf_source: str | None = None,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.tokenizer = tokenizer
        self.embed_dim = int(embed_dim)
        self.frozen = freeze
        self.use_templates = use_templates
        self.hf_source = hf_source  # folder/hub id of the HF config + tokenizer (HF towers only)
        self.cache = EmbeddingCache(cache_size)
        self._fingerprint_seen: tuple | None = None
        if freeze:
            towers.freeze(tower)
            tower.eval()

    @property
    def is_hf(self) -> bool:
        return self.hf_source is not None

    # -- mode / cache bookkeeping ---------------------------------------------------------------

    def train(self, mode: bool = True) -> TextEncoder:
        was = self.tower.training
        towers.set_mode_keeping_frozen(self, mode, [self.tower] if self.frozen else [])
        if self.tower.training != was:
            self.clear_cache()
        return self

    def clear_cache(self) -> None:
        self.cache.clear()

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "size", "maxsize"}`` of the sentence-embedding cache."""
        return {"hits": self.cache.hits, "misses": self.cache.misses, "size": len(self.cache), "maxsize": self.cache.maxsize}

    def _fingerprint(self) -> tuple:
        tensors = list(self.tower.parameters()) + list(self.tower.buffers())
        first = tensors[0] if tensors else None
        return (
            sum(t._version for t in tensors),
            first.data_ptr() if first is not None else 0,
            str(first.device) if first is not None else "",
            str(first.dtype) if first is not None else "",
            self.tower.training,
        )

    def _cache_usable(self) -> bool:
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters())
        if trainable or self.tower.training:
            return False
        fp = self._fingerprint()
        if fp != self._fingerprint_seen:
            self.clear_cache()
            self._fingerprint_seen = fp
        return True

    # -- encoding -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        for p in self.tower.parameters():
            return p.device
        return torch.device("cpu")

    def _run_tower(self, sentences: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(sentences).to(self.device)
        if self.frozen:
            with torch.no_grad():
                out = self.tower(tokens)
        else:
            out = self.tower(tokens)
        if isinstance(out, tuple):
            out = out[0]
        return F.normalize(out.float(), dim=-1)

    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 embeddings ``[N, D]`` of exact sentences (cached)."""
        sentences = list(sentences)
        if not sentences:
            raise InvalidPromptError("no sentence to encode")
        if not self._cache_usable():
            return self._run_tower(sentences)
        rows: list[torch.Tensor | None] = [self.cache.get(s) for s in sentences]
        todo = list(dict.fromkeys(s for s, r in zip(sentences, rows) if r is None))
        if todo:
            fresh = self._run_tower(todo).detach()
            new = dict(zip(todo, fresh))
            for s, e in new.items():
                self.cache.put(s, e)
            rows = [r if r is not None else new[s] for s, r in zip(sentences, rows)]
        return torch.stack(rows)  # type: ignore[arg-type]

    def encode_prompts(
        self,
        prompts: Sequence[str],
        modality: str | None = None,
        mode: str = "ensemble",
        rng: random.Random | None = None,
    ) -> torch.Tensor:
        """Embeddings ``[P, D]`` (unit norm) of prompts wrapped in the modality's templates.

        ``mode="ensemble"``: mean of all template embeddings (inference); ``"random"``: one
        random template per prompt (training augmentation; ``rng`` for reproducibility).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(prompts, str) or not prompts:
            raise InvalidPromptError("prompts must be a non-empty list of strings")
        groups: list[list[str]] = []
        for prompt in prompts:
            if not self.use_templates:
                groups.append([prompt])
            elif mode == "ensemble":
                groups.append(apply_templates(prompt, modality))
            else:
                groups.append([random_template(prompt, modality, rng)])
        flat = [s for g in groups for s in g]
        emb = self.encode_sentences(flat)
        out, start = [], 0
        for g in groups:
            out.append(emb[start: start + len(g)].mean(0))
            start += len(g)
        return F.normalize(torch.stack(out), dim=-1)

    # -- weights --------------------------------------------------------------------------------

    def load_tower_state_dict(self, sd: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load open_clip-named tower weights (extra keys such as position_ids/pooler are ignored)."""
        towers.load_matching_weights(self.tower, sd, section="text_encoder", source=source)
        self.clear_cache()

    def save_text_files(self, folder: str | Path) -> list[Path]:
        """Write the HF config and tokenizer files into ``folder`` (HF towers; no-op for CLIP)."""
        if not self.is_hf:
            return []
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tower.config.save_pretrained(str(folder))
        self.tokenizer.tokenizer.save_pretrained(str(folder))
        return sorted(p for p in folder.rglob("*") if p.is_file())


def build_text_encoder(cfg: TextEncoderConfig, *, text_source_dir: str | Path | None = None) -> TextEncoder:
    """Build the text tower of ``cfg`` with random weights (no download).

    HF towers take their config/tokenizer from ``text_source_dir`` (a checkpoint's
    ``text_tokenizer/``), else the seed / ``local-dir:`` folder of ``cfg.pretrained``, else the
    hub id (cache only when offline; see :func:`emclip.pretrained.hf_text_source`).
    """
    from open_clip.model import CLIPTextCfg, _build_text_tower

    from ..pretrained import hf_text_source, open_clip_architecture

    base: dict = {}
    if cfg.open_clip_model:
        base = dict(open_clip_architecture(cfg.open_clip_model).get("text_cfg", {}))
    text = {**base, **cfg.text_cfg}
    hf_source = None
    if text.get("hf_model_name"):
        hf_source = hf_text_source(text["hf_model_name"], cfg.pretrained, text_source_dir)
        text["hf_model_name"] = hf_source
        text["hf_model_pretrained"] = False
    try:
        text_cfg = CLIPTextCfg(**text)
    except TypeError as exc:
        allowed = sorted(CLIPTextCfg.__dataclass_fields__)
        raise ConfigError(f"text_encoder.text_cfg: {exc}; allowed keys: {', '.join(allowed)}") from exc
    try:
        tower = _build_text_tower(cfg.embed_dim, text_cfg, cfg.quick_gelu)
    except OSError as exc:
        raise PretrainedWeightsUnavailable(f"cannot build the HF text tower from {hf_source!r}: {str(exc).splitlines()[0]}") from exc
    if hf_source is not None:
        if not hasattr(tower, "proj"):
            width = getattr(tower.config, "hidden_size", "?")
            raise ConfigError(
                f"text_encoder.embed_dim={cfg.embed_dim} differs from the HF hidden size {width} while hf_proj_type "
                f"is null; set embed_dim={width} or hf_proj_type='linear'/'mlp'"
            )
        local = Path(hf_source).is_dir()
        tok_source = hf_source if local else (text_cfg.hf_tokenizer_name or hf_source)
        tokenizer = _hf_tokenizer(tok_source, int(text_cfg.context_length))
    else:
        tokenizer = _clip_tokenizer(int(text_cfg.context_length))
    return TextEncoder(
        tower,
        tokenizer,
        cfg.embed_dim,
        freeze=cfg.freeze,
        cache_size=cfg.cache_size,
        use_templates=cfg.use_templates,
        hf_source=hf_source,
    )
