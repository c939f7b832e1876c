"""NIfTI inputs of ``emclip segment``: one case per patient, one mask volume per prompt.

Files whose names differ only by the sequence suffix (``pat1_flair.nii.gz``, ``pat1_t1ce.nii.gz``)
are the sequences of one case; a folder is one case (its NIfTI files except labels). For each
case it writes, into ``--out``, ``<case>_<prompt>.nii.gz`` (uint8 0/1 on the source voxel grid
with the source affine and header) and ``<case>_emclip.json`` (prompt -> file, found, score,
voxel count, axis, sequences). Volumes are segmented slice by slice along ``--axis`` (default
axial, found from the affine). Outputs are checked before the model loads and written
atomically; Ctrl-C cancels after the current batch of slices, leaving no partial file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError


def is_volume_input(images: list[str]) -> bool:
    """True if the inputs are NIfTI files or case folders (folders holding NIfTI images);
    refuses a mix with 2D images."""
    from ..volume_io import case_files, is_nifti_path

    kinds = [is_nifti_path(p) or (Path(p).is_dir() and bool(case_files(Path(p)))) for p in images]
    if any(kinds) and not all(kinds):
        raise InvalidArgumentError(
            "NIfTI volumes and 2D images/TIFF stacks cannot be mixed in one call; run emclip segment "
            "once for the volumes and once for the images"
        )
    return bool(kinds) and all(kinds)


def prompt_slug(prompt: str) -> str:
    """File-name part for a prompt: ``"whole tumour"`` -> ``whole_tumour``."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", prompt.strip().lower()).strip("_")
    return slug or "mask"


def group_cases(images: list[str]) -> list[tuple[str, list[Path]]]:
    """``[(case, files)]``: files sharing a case name (file name minus sequence suffix) form one
    case, in the order first seen; a folder is one case (all its NIfTI image files)."""
    from ..volume_io import case_files, split_sequence_name

    cases: dict[str, list[Path]] = {}
    for item in images:
        path = Path(item)
        if path.is_dir():
            files = case_files(path)
            if not files:
                raise InvalidArgumentError(f"{path} holds no NIfTI image files (.nii/.nii.gz other than labels)")
            name = path.name
        else:
            files = [path]
            name = split_sequence_name(path)[0]
        bucket = cases.setdefault(name, [])
        for f in files:
            clash = [g for g in bucket if g == f or split_sequence_name(g)[1] == split_sequence_name(f)[1]]
            if clash:
                raise InvalidArgumentError(
                    f"{clash[0]} and {f} would be the same sequence of case {name!r} and write the same "
                    "outputs; give each file once, or run them with different --out folders"
                )
            bucket.append(f)
    return list(cases.items())


def output_paths(case: str, prompts: list[str], out_dir: Path) -> list[Path]:
    """The files written for ``case``: one mask volume per prompt, then the JSON summary."""
    return [out_dir / f"{case}_{prompt_slug(p)}.nii.gz" for p in prompts] + [out_dir / f"{case}_emclip.json"]


def _check(args: argparse.Namespace, prompts: list[str]) -> tuple[list[tuple[str, list[Path]]], Path]:
    from ..volume_io import check_nifti_file
    from .common import check_out_dir

    if args.channel_axis is not None:
        raise InvalidArgumentError(
            "--channel-axis is not used for NIfTI volumes: give one file per sequence (case_flair.nii.gz case_t1ce.nii.gz)"
        )
    slugs = [prompt_slug(p) for p in prompts]
    if len(set(slugs)) != len(slugs):
        raise InvalidArgumentError(f"the prompts {prompts} would write the same file names {slugs}; make them differ")
    cases = group_cases(list(args.images))
    for _, files in cases:
        for f in files:
            check_nifti_file(f)
    planned = [p for case, _ in cases for p in output_paths(case, prompts, Path(args.out))]
    inputs = [f for _, files in cases for f in files]
    out_dir = check_out_dir(args.out, inputs, planned, args.overwrite, replaces=lambda p: "an input volume")
    return cases, out_dir


def run_volumes(args: argparse.Namespace, prompts: list[str]) -> int:
    """``emclip segment`` for NIfTI inputs (see module docstring); returns the exit code 0."""
    from tqdm import tqdm

    from ..errors import Cancelled, EMClipError
    from .common import sigint_cancels
    from .segment import _summary, _with_context

    if not prompts:
        raise InvalidArgumentError('NIfTI volumes need --prompts, e.g. --prompts "whole tumour, edema"')
    cases, out_dir = _check(args, prompts)
    from ..inference import load_model

    model = load_model(args.model, args.device, trust_pickle=args.trust_pickle)
    if args.all_components:
        model.config.single_object = []
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = bool(args.quiet)
    with sigint_cancels() as cancel:
        for done, (case, files) in enumerate(cases):
            try:
                result = _segment_case(case, files, prompts, model, out_dir, args, cancel)
            except Cancelled:
                raise
            except (EMClipError, ValueError, TypeError) as exc:
                raise _with_context(exc, files[0], done, len(cases)) from exc
            if not quiet:
                tqdm.write(_summary(case, result), file=sys.stdout)
    return 0


def _segment_case(
    case: str, files: list[Path], prompts: list[str], model: Any, out_dir: Path, args: argparse.Namespace, cancel
) -> Any:
    from ..io import atomic_open
    from ..volume_io import read_sequences, write_volume
    from ..volume_segmentation import segment_volume
    from .common import progress_bar

    data, names, meta = read_sequences(files)
    axis = args.axis if args.axis is not None else "axial"
    bar, progress = progress_bar(case, "slice", quiet=bool(args.quiet), leave=False)
    try:
        result = segment_volume(
            data,
            prompts,
            model,
            channels=names,
            channel_axis=-1,
            axis=axis,
            affine=meta.affine,
            modality=args.modality,
            threshold=args.threshold,
            tile_size=args.tile_size,
            min_area=args.min_area,
            progress=progress,
            cancel=cancel,
            mirror=args.mirror,
        )
    finally:
        bar.close()
    *mask_paths, json_path = output_paths(case, prompts, out_dir)
    for i, path in enumerate(mask_paths):
        write_volume(path, result.masks[i], meta, overwrite=args.overwrite, description=f"emclip: {result.prompts[i]}")
    summary = {
        "case": case,
        "inputs": [str(f) for f in files],
        "sequences": names,
        "axis": axis,
        "voxel_axis": result.info.get("voxel_axis"),
        "model": str(args.model) if args.model else "default",
        "modality": args.modality,
        "threshold": result.threshold,
        "affine": meta.affine.tolist(),
        "labels": [
            {
                "prompt": prompt,
                "file": path.name,
                "found": bool(found),
                "score": float(score),
                "voxels": int(area),
            }
            for prompt, path, found, score, area in zip(
                result.prompts, mask_paths, result.found, result.scores, result.areas
            )
        ],
    }
    with atomic_open(json_path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return result
