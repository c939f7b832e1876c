"""Evaluate a model on dataset folders: Dice, HD95 and ASD per structure and dataset.

The model runs through the inference API (:func:`emclip.inference.segment` per 2D image,
:func:`emclip.inference.segment_stack` per volume), so the numbers are those a user gets,
including its thresholding and small-region removal. Prompts are the structure names of each
dataset.yaml (``prompt_set="names"``) or, to measure prompt robustness, their synonyms
(``prompt_set="synonyms"``: every synonym is asked in the same pass and the structure's numbers
average over them; ``by_prompt`` lists the Dice per synonym).

Metrics follow :mod:`emclip.metrics` (empty-mask conventions there): computed per image at the
image's own resolution (2D datasets) or per case in 3D (volume datasets), then mean and std over
images. Distances are in mm when every image of a dataset has a known spacing (meta.csv
``pixel_mm``, NIfTI header), else in pixels (``distance_unit``). A mean over no defined value is
NaN in the returned dict and ``null`` in the JSON written by :func:`to_json`.

NIfTI datasets with several sequences (dataset.yaml ``channels``) and a model with modality fusion
(``model.config.fusion.enabled``): each case's sequences are read (raw) and passed together as
``segment_stack(..., channels=names)``, which normalises each on its own, as
``benchmarks/bench_brain.py`` does; ``channels=`` restricts them (e.g. ``["flair"]``), default
every dataset sequence the model knows. The dataset's entry then also lists ``"channels"`` (and
``"ignored_channels"``: those a fusion model left out as never seen in training).
A model without fusion reads the first sequence as today (``channels=`` may name one other).

Result shape::

    {"model": "...", "mirror": bool (the mirror pass was used),
     "datasets": {"<dataset dir name>": {"n_images": int,
        "structures": {"optic disc": {"dice": float, "hd95": float, "asd": float,
                                      "dice_std": float, "hd95_std": float, "asd_std": float,
                                      "n_images": int, "n_undefined": int,
                                      "distance_unit": "px" | "mm", "prompts": [...]}, ...}}}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .callbacks import CancelCallback, ProgressCallback, check_cancel, report
from .errors import DatasetError, EMClipError, InvalidArgumentError, InvalidImageError
from .metrics import compute_metrics, summarise
from .prompts import clean_prompt
from .sequences import sequence_alias

PROMPT_SETS = ("names", "synonyms")


def _prompts_for(spec, prompt_set: str, accepts) -> dict[str, list[str]]:
    """Structure -> prompts to ask for it."""
    out: dict[str, list[str]] = {}
    for name in spec.structure_names:
        if prompt_set == "names":
            out[name] = [name]
        else:
            syns = [s for s in spec.synonyms_of(name) if clean_prompt(s) and accepts(s)]
            out[name] = syns or [name]
    return out


def _accepts(model) -> Any:
    from .train.trainer import known_prompt_checker

    ok = known_prompt_checker(model)
    return ok if ok is not None else (lambda _p: True)


def _same_sequence(a: str, b: str) -> bool:
    """Whether two sequence names mean the same sequence ("T1c" and "t1ce")."""
    return a.strip().casefold() == b.strip().casefold() or (
        sequence_alias(a) is not None and sequence_alias(a) == sequence_alias(b))


def _check_channels(channels: Any) -> list[str] | None:
    if channels is None:
        return None
    if isinstance(channels, str):  # "flair,t1ce" as on the command line
        channels = [c for c in channels.split(",") if c.strip()]
    if not isinstance(channels, Sequence) or not channels or not all(isinstance(c, str) and c.strip() for c in channels):
        raise InvalidArgumentError(
            f"channels must name dataset sequences, e.g. ['flair', 't1ce'] (CLI: --channels flair,t1ce), got {channels!r}")
    return [c.strip() for c in channels]


def _dataset_channels(spec, wanted: list[str] | None) -> list[str] | None:
    """``wanted`` spelled as in dataset.yaml ``channels`` (None: all); DatasetError for one it lacks."""
    if wanted is None:
        return None
    out = []
    for name in wanted:
        hit = [c for c in spec.channels if _same_sequence(name, c)]
        if not hit:
            raise DatasetError(f"{spec.root / 'dataset.yaml'}: no sequence {name!r} among its channels "
                               f"{list(spec.channels)}; pick from those (CLI: --channels {','.join(spec.channels)})")
        if hit[0] not in out:
            out.append(hit[0])
    return out


def _sequences_to_feed(net, spec, wanted: list[str] | None) -> list[str] | None:
    """The dataset sequences passed to ``segment_stack(channels=...)`` for one volume dataset, or
    None for today's single-sequence path (model without fusion, no ``channels`` asked)."""
    from .inference.channels import fusion_sequences, no_fusion_error
    from .sequences import canonical_sequence

    fusion = getattr(getattr(net, "config", None), "fusion", None)
    layout = fusion_sequences(net) if getattr(fusion, "enabled", False) else None
    if layout is None:
        if wanted is not None and len(wanted) > 1:
            raise no_fusion_error(net, wanted)
        return wanted

    def known(name: str) -> bool:
        try:
            canonical_sequence(name, layout)
        except EMClipError:
            return False
        return True

    names = list(spec.channels) if wanted is None else wanted
    unknown = [n for n in names if not known(n)]
    if wanted is not None and unknown:
        raise InvalidArgumentError(f"the model's fusion knows the sequences {layout}, not {unknown}; "
                                   "leave those out of channels")
    names = [n for n in names if known(n)]
    if not names:
        raise DatasetError(f"{spec.root / 'dataset.yaml'}: none of its sequences {list(spec.channels)} is one the "
                           f"model's fusion knows ({layout})")
    return names


def _left_out(net, names: list[str]) -> list[str]:
    """Which of ``names`` a fusion model leaves out (never seen in training, ``fusion.unseen="ignore"``)."""
    from .inference.channels import fusion_sequences, ignored_sequences
    from .sequences import canonical_sequences

    layout = fusion_sequences(net)
    if layout is None:
        return []
    canon = canonical_sequences(names, layout)
    dropped = set(ignored_sequences(net, canon))
    return [n for n, c in zip(names, canon) if c in dropped]


def _dataset_key(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else f"{p.parent.name}/{p.name}" for n, p in zip(names, paths)]


def evaluate(
    model: Any,
    datasets: Sequence[str | Path],
    *,
    split: str = "test",
    prompt_set: str = "names",
    device: Any = None,
    threshold: float = 0.5,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    axis: str = "axial",
    channels: Sequence[str] | str | None = None,
    model_name: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    mirror: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (instance, checkpoint folder or config name) on dataset folders.

    ``split``: test | val | train | trainval | all, chosen as in training
    (:func:`emclip.data.splits.split_dataset` with ``split_seed``, ``val_fraction``,
    ``test_fraction``, defaults 0 / 0.1 / 0.2 as in TrainConfig). ``limit``: at most this many
    images (cases for volumes) per dataset. ``progress(done, total)`` counts images;
    ``cancel()`` is polled between images. ``channels`` (NIfTI datasets only; default None: for a
    fusion model every dataset sequence it knows, else the first sequence as before): the
    sequences to feed, e.g. ``["flair"]``; several need a model with fusion. ``mirror``: as in
    :func:`emclip.segment` (None = the model's default). Returns the dict described in the
    module docstring.
    """
    from .data.folder import open_dataset
    from .data.splits import split_dataset
    from .inference import load_model
    from .inference.options import check_mirror
    from .inference.runner import model_mirrors

    if prompt_set not in PROMPT_SETS:
        raise DatasetError(f"prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(
            f"limit must be a whole number >= 1 (at most that many images per dataset) or None for all, got {limit!r}"
        )
    check_mirror(mirror)
    wanted = _check_channels(channels)
    paths = [Path(d).expanduser() for d in datasets]
    keys = _dataset_key(paths)
    plans = []
    for path in paths:
        ds = open_dataset(path, axis=axis)
        parts = split_dataset(ds, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
        idx = parts.part(split)
        if ds.spec.kind == "volume":
            units = sorted({ds.index[i][0] for i in idx})
        else:
            units = idx
        if not units:
            sizes = ", ".join(f"{p} {len(parts.part(p))}" for p in ("train", "val", "test"))
            raise DatasetError(
                f"{path}: the {split!r} split has no images (images per split: {sizes}); evaluate another split "
                "(split='all', CLI: --split all) or add images to the dataset"
            )
        if limit is not None:
            units = units[:limit]
        plans.append((ds, units, _dataset_channels(ds.spec, wanted) if ds.spec.kind == "volume" else None))
    # the datasets and their splits are checked before the model loads
    name = model_name or (str(model) if isinstance(model, (str, Path)) else getattr(getattr(model, "config", None), "name", "model"))
    net = load_model(model, device if device is not None else "auto") if not hasattr(model, "predict_logits") else model
    if device is not None:
        from .device import resolve_device

        net = net.to(resolve_device(device))
    net.eval()
    accepts = _accepts(net)
    feeds = [_sequences_to_feed(net, ds.spec, w) if ds.spec.kind == "volume" else None for ds, _, w in plans]
    total = sum(len(u) for _, u, _ in plans)
    done = 0
    report(progress, 0, total)
    results: dict[str, Any] = {}
    used_mirror = model_mirrors(net, mirror)
    options = {"threshold": threshold, "mirror": used_mirror}  # passed on to segment / segment_stack
    for key, (ds, units, _), feed in zip(keys, plans, feeds):
        spec = ds.spec
        asked = _prompts_for(spec, prompt_set, accepts)
        flat = list(dict.fromkeys(p for ps in asked.values() for p in ps))
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in asked}
        per_prompt: dict[str, list[float]] = {p: [] for p in flat}
        use_spacing = spec.kind == "volume" or all(ds.spacing_of(i) is not None for i in units)
        for unit in units:
            check_cancel(cancel)
            try:
                if spec.kind == "volume":
                    probs_masks, targets, spacing = _run_volume(net, ds, unit, flat, options, feed)
                else:
                    probs_masks, targets, spacing = _run_image(net, ds, unit, flat, options)
            except InvalidImageError as exc:  # about this image: say which one
                named = _naming_the_input(exc, ds, unit)
                if named is None:
                    raise
                raise named from exc
            spacing = spacing if use_spacing else None
            for s_idx, structure in enumerate(spec.structure_names):
                tgt = targets[s_idx]
                per_structure = []
                for prompt in asked[structure]:
                    pred = probs_masks[flat.index(prompt)]
                    m = compute_metrics(pred, tgt, spacing)
                    per_prompt[prompt].append(m["dice"])
                    per_structure.append(m)
                rows[structure].append({k: _nanmean([m[k] for m in per_structure]) for k in ("dice", "hd95", "asd")})
            done += 1
            report(progress, done, total)
        unit_name = "mm" if use_spacing and units else "px"
        structures = {}
        for structure, vals in rows.items():
            summary = summarise(vals) if vals else {}
            summary["distance_unit"] = unit_name
            summary["prompts"] = asked[structure]
            if prompt_set == "synonyms":
                summary["by_prompt"] = {p: (float(np.mean(per_prompt[p])) if per_prompt[p] else math.nan)
                                        for p in asked[structure]}
            structures[structure] = summary
        results[key] = {"n_images": len(units), "structures": structures}
        if feed is not None:
            results[key]["channels"] = feed
            left_out = _left_out(net, feed)
            if left_out:
                results[key]["ignored_channels"] = left_out
    return {"model": name, "mirror": used_mirror, "datasets": results}


def _naming_the_input(exc: InvalidImageError, ds, unit: int | str) -> EMClipError | None:
    """A copy of ``exc`` naming the image file (or volume case) it is about; None when its
    message already names it."""
    volume = ds.spec.kind == "volume"
    where = f"case {unit} of {ds.spec.root}" if volume else str(ds.image_path(unit))
    text = str(exc)
    if (str(unit) if volume else Path(where).name) in text:
        return None
    message = f"{where}: {text} (replace or remove this {'case' if volume else 'image'} in the dataset)"
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - an error type with another signature
        return DatasetError(message)


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else math.nan


def _run_image(net, ds, i: int, prompts: list[str], options: dict[str, Any]):
    from .inference import segment

    sample = ds[i]
    res = segment(sample.image, prompts, net, modality=sample.spec.modality, **options)
    return _by_prompt(res, prompts), sample.structure_masks(), sample.spacing


def _run_volume(net, ds, case: str, prompts: list[str], options: dict[str, Any], channels: list[str] | None = None):
    from .inference import segment_stack

    image, labels, ax, zooms = ds.case_volume(case)
    if channels is None:
        res = segment_stack(image, prompts, net, axis=ax, modality=ds.spec.modality, **options)
    else:
        res = segment_stack(ds.case_sequences(case, channels), prompts, net, axis=ax,
                            channel_axis=-1, channels=channels, modality=ds.spec.modality, **options)
    return _by_prompt(res, prompts), ds.spec.structure_masks(labels), tuple(zooms)


def _by_prompt(res, prompts: list[str]) -> np.ndarray:
    """Masks in the order of ``prompts`` (the result's prompts are the cleaned versions)."""
    got = [p.casefold() for p in res.prompts]
    return np.stack([res.masks[got.index(clean_prompt(p).casefold())] for p in prompts])


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def to_json(results: dict[str, Any]) -> str:
    """Strict JSON text of ``results``: undefined values (NaN) are written as ``null``."""
    import json

    return json.dumps(_nan_to_none(results), indent=2, allow_nan=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def to_markdown(results: dict[str, Any]) -> str:
    """A markdown table: one row per dataset and structure (mean ± std)."""
    mirror = results.get("mirror")
    lines = [f"Model: `{results['model']}`" + ("" if mirror is None else f" (mirror pass {'on' if mirror else 'off'})"), "",
             "| dataset | structure | n | Dice | HD95 | ASD | undefined HD | unit |",
             "|---|---|---:|---|---|---|---:|---|"]
    for ds, entry in results["datasets"].items():
        label = f"{ds} ({'+'.join(entry['channels'])})" if entry.get("channels") else ds
        for structure, m in entry["structures"].items():
            lines.append(
                f"| {label} | {structure} | {m.get('n_images', entry['n_images'])} | "
                f"{_fmt(m['dice'])} ± {_fmt(m['dice_std'])} | {_fmt(m['hd95'])} ± {_fmt(m['hd95_std'])} | "
                f"{_fmt(m['asd'])} ± {_fmt(m['asd_std'])} | {m.get('n_undefined', 0)} | {m.get('distance_unit', 'px')} |"
            )
    return "\n".join(lines) + "\n"
