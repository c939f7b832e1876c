"""Exemplars (reference image + mask + name) as prompts of :func:`segment` / :func:`segment_stack`.

:func:`plan_prompts` decides the result's prompt list: the text prompts first, then the names of
exemplars that match no prompt (case-insensitive), each once. :func:`prompt_keys` builds the
decoder-space prompts for that list (``EMCLIP.text_prompts``, ``EMCLIP.encode_exemplars``,
``emclip.nn.combine_prompts``):

- a prompt with no exemplar: its text;
- a prompt with exemplars of the same name: ``exemplar_mode="combine"`` (default) merges text and
  visual prompt (the logit is the mean of both), ``"only"`` uses the visual prompt alone;
- an exemplar name that is not a prompt: the visual prompt alone.

Several exemplars of one name are averaged (mean of their unit score vectors, renormalised).
Visual prompts are cached on the model per exemplar content hash, its pass's prompt list,
modality, device, dtype and weight version, so repeated calls do not re-encode the exemplars.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, InvalidPromptError
from ..exemplars import Exemplar
from ..preprocess import letterbox, to_float_rgb
from ..prompts import MAX_PROMPTS

EXEMPLAR_MODES = ("combine", "only")
DEFAULT_COMBINE = "calibrated"
"""How ``exemplar_mode="combine"`` merges text and visual prompts: "calibrated" (the
``combined`` prompt of ``EMCLIP.encode_exemplar_prompts``: mean of both logits, offset calibrated
on the exemplar), or "mean-logit" / "mean-key" (:func:`emclip.nn.combine_prompts` of the call's
text prompt and the visual prompt, no own calibration). Chosen by benchmarks/bench_exemplars.py."""
ENCODE_OPTIONS: dict[str, Any] = {}
"""Extra keyword options of ``EMCLIP.encode_exemplar_prompts`` used by :func:`segment` (empty:
its defaults; benchmarks/bench_exemplars.py sets others for its ablations)."""
EXEMPLAR_CACHE_SIZE = 256
"""Visual prompts kept per model (least recently used dropped)."""

_CACHE_ATTR = "_emclip_exemplar_cache"


def check_exemplar_mode(mode: str) -> str:
    if mode not in EXEMPLAR_MODES:
        raise InvalidArgumentError(
            f"exemplar_mode must be 'combine' (text + exemplar) or 'only' (exemplar alone), got {mode!r}"
        )
    return mode


def plan_prompts(prompts: list[str], exemplars: Sequence[Exemplar]) -> list[str]:
    """The result's prompt names: ``prompts``, then exemplar names matching none of them."""
    seen = {p.casefold() for p in prompts}
    names = list(prompts)
    for ex in exemplars:
        if ex.name.casefold() not in seen:
            seen.add(ex.name.casefold())
            names.append(ex.name)
    if len(names) > MAX_PROMPTS:
        raise InvalidPromptError(
            f"{len(names)} prompts and exemplar names together; at most {MAX_PROMPTS} per call"
        )
    return names


def _weights_version(net: torch.nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (training, load_state_dict)."""
    return sum(t._version for t in net.parameters()) + sum(t._version for t in net.buffers())


def _cache(net: torch.nn.Module) -> OrderedDict[tuple, Any]:
    cache = net.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = OrderedDict()
        net.__dict__[_CACHE_ATTR] = cache
    return cache


def clear_exemplar_cache(net: torch.nn.Module) -> None:
    """Forget the visual prompts cached on ``net``."""
    net.__dict__.pop(_CACHE_ATTR, None)


def _prepare_image(ex: Exemplar, net: torch.nn.Module) -> np.ndarray:
    """Network-ready image ``(3, S, S)`` float32 (the preprocessing of :func:`segment`)."""
    boxed, _ = letterbox(to_float_rgb(ex.image), int(net.image_size))
    mean = np.asarray(net.pixel_mean, dtype=np.float32)
    std = np.asarray(net.pixel_std, dtype=np.float32)
    return np.ascontiguousarray(((boxed - mean) / std).transpose(2, 0, 1))


def _prepare_mask(ex: Exemplar, net: torch.nn.Module) -> np.ndarray:
    """Mask weights ``(S, S)`` in [0, 1] on the letterboxed grid (area-resampled)."""
    mask, _ = letterbox(ex.mask.astype(np.float32), int(net.image_size))
    return np.clip(mask, 0.0, 1.0)


def _content(ex: Exemplar, net: torch.nn.Module) -> np.ndarray:
    """1 on the letterboxed image, 0 on the padding ``(S, S)``."""
    ones, _ = letterbox(np.ones(ex.mask.shape, dtype=np.float32), int(net.image_size))
    return ones


def visual_prompts(
    net: Any, exemplars: Sequence[Exemplar], modality: str | None, device: torch.device, dtype: torch.dtype
) -> list[Any]:
    """One ``emclip.nn.ExemplarPrompts`` (``visual``, ``combined``; each ``[1, ...]``) per
    exemplar (cached; call in eval / inference mode on ``device``). Exemplars on the same image
    are encoded in one pass prompted by all their names."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(exemplars):
        groups.setdefault(ex.image_key, []).append(i)
    cache = _cache(net)
    version = _weights_version(net)
    out: list[Any] = [None] * len(exemplars)
    todo: list[tuple[list[int], tuple[str, ...], str | None]] = []
    keys: dict[int, tuple] = {}
    for idx in groups.values():
        context = tuple(dict.fromkeys(exemplars[i].name for i in idx))
        mod = exemplars[idx[0]].modality if exemplars[idx[0]].modality is not None else modality
        missing = []
        for i in idx:
            key = (exemplars[i].key, context, mod, str(device), str(dtype), version, repr(sorted(ENCODE_OPTIONS.items())))
            keys[i] = key
            if key in cache:
                cache.move_to_end(key)
                out[i] = cache[key]
            else:
                missing.append(i)
        if missing:
            todo.append((missing, context, mod))
    for missing, context, mod in todo:  # one pass per image
        image = _prepare_image(exemplars[missing[0]], net)
        masks = np.stack([_prepare_mask(exemplars[i], net) for i in missing])
        valid = np.repeat(_content(exemplars[missing[0]], net)[None], len(missing), axis=0)
        x = torch.from_numpy(image[None]).to(device=device, dtype=dtype)
        prompts = net.encode_exemplar_prompts(
            x, torch.from_numpy(masks).to(device), [exemplars[i].name for i in missing], mod,
            image_index=[0] * len(missing), context=[list(context)], valid=torch.from_numpy(valid).to(device),
            **ENCODE_OPTIONS,
        )
        for j, i in enumerate(missing):
            pick = torch.tensor([j], device=device)
            out[i] = type(prompts)(prompts.visual.select(pick), prompts.combined.select(pick))
            cache[keys[i]] = out[i]
            while len(cache) > EXEMPLAR_CACHE_SIZE:
                cache.popitem(last=False)
    return out


def _mean_prompt(parts: list[Any]) -> Any:
    """Average several visual prompts of one name (unit score vectors, tokens re-derived)."""
    from ..nn import DecoderPrompts

    if len(parts) == 1:
        return parts[0]
    cat = DecoderPrompts.cat(parts)
    return DecoderPrompts(
        cat.tokens.mean(0, keepdim=True),
        F.normalize(cat.keys.float().mean(0, keepdim=True), dim=-1),
        F.normalize(cat.deep_keys.float().mean(0, keepdim=True), dim=-1),
        cat.offsets().float().mean(0, keepdim=True),
    )


def prompt_keys(
    net: Any,
    prompts: list[str],
    names: list[str],
    exemplars: Sequence[Exemplar],
    modality: str | None,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    combine: str | None = None,
) -> Any:
    """Decoder-space prompts ``[len(names), ...]`` for :func:`plan_prompts`' ``names``."""
    from ..nn import DecoderPrompts, combine_prompts

    if not hasattr(net, "encode_exemplars"):
        raise InvalidArgumentError(
            f"exemplars need an EM-CLIP model (visual prompts live in its decoder); {type(net).__name__} has none"
        )
    how = combine or DEFAULT_COMBINE
    encoded = visual_prompts(net, exemplars, modality, device, dtype)
    by_name: dict[str, list[Any]] = {}
    for ex, ep in zip(exemplars, encoded):
        by_name.setdefault(ex.name.casefold(), []).append(ep)
    text = net.text_prompts(prompts, modality).to(device) if prompts else None
    rows = []
    for i, name in enumerate(names):
        eps = by_name.get(name.casefold())
        if i >= len(prompts):
            rows.append(_mean_prompt([e.visual.to(device) for e in eps]))
            continue
        tp = text.select(torch.tensor([i], device=device))
        if eps is None:
            rows.append(tp)
        elif mode == "only":
            rows.append(_mean_prompt([e.visual.to(device) for e in eps]))
        elif how == "calibrated":
            rows.append(_mean_prompt([e.combined.to(device) for e in eps]))
        else:
            rows.append(combine_prompts(tp, _mean_prompt([e.visual.to(device) for e in eps]), how))
    return DecoderPrompts.cat(rows)


def text_prompt_list(prompts: Any, exemplars: Sequence[Exemplar]) -> list[str]:
    """``prompts`` parsed; with exemplars, None or an empty string/list means no text prompt."""
    from ..prompts import parse_prompts

    if exemplars and _no_text(prompts):
        return []
    return parse_prompts(prompts)


def _no_text(prompts: Any) -> bool:
    if prompts is None:
        return True
    items = [prompts] if isinstance(prompts, str) else prompts if isinstance(prompts, (list, tuple)) else None
    return items is not None and all(isinstance(p, str) and not p.strip(" ,;\t\r\n") for p in items)


def exemplar_info(exemplars: Sequence[Exemplar], mode: str) -> dict[str, Any]:
    """What ``result.info["exemplars"]`` records: the mode and the number of exemplars per name."""
    counts: dict[str, int] = {}
    for ex in exemplars:
        counts[ex.name] = counts.get(ex.name, 0) + 1
    return {"mode": mode, "counts": counts}
