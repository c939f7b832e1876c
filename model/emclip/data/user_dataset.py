"""Grow a dataset folder from corrected masks: :func:`add_to_training_set`.

The folder follows the project's dataset format (:mod:`emclip.data.format`): ``images/``,
``masks/``, ``dataset.yaml`` and ``meta.csv``. Each call stores one image and one label map.

Encoding of several (possibly overlapping) structures in one label map: every distinct
*combination* of structures present at a pixel gets its own label value, and each structure in
``dataset.yaml`` lists the values of the combinations that contain it (a structure is the union
of its values). So an optic disc that contains an optic cup is stored as value 1 (disc only) and
2 (disc and cup), with ``optic disc: [1, 2]`` and ``optic cup: [2]``, exactly like the shared
fundus data. The values of an existing folder are reused; new combinations get new values
(uint8 masks up to 255 values, uint16 beyond).

Images are stored losslessly as given: 8-bit grey / RGB / RGBA as PNG, anything else (16-bit,
float, other channel counts) as TIFF. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, InvalidImageError
from .format import IMAGE_SUFFIXES, MASK_SUFFIXES, SPEC_FILE, read_spec

META_FILE = "meta.csv"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class TrainingSetConflictError(DatasetError):
    """The masks do not fit the folder: other shape, other modality or other structures."""


def _clean_name(name: str) -> str:
    text = " ".join(str(name).split())
    if not text:
        raise DatasetError("a structure name is empty; name each mask after its prompt, e.g. 'optic cup'")
    return text


def _check_image(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InvalidImageError(
            f"the image has shape {arr.shape}; store a 2D image: (H, W) grey or (H, W, 3|4) RGB(A) "
            "with channels last (pick one slice of a stack first)"
        )
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InvalidImageError(f"the image is {arr.shape[0]}x{arr.shape[1]} pixels; it needs at least 2x2")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidImageError(f"the image has dtype {arr.dtype}; use integer or floating-point pixels")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InvalidImageError("the image has NaN or infinite pixels; replace them before adding it")
    return np.ascontiguousarray(arr)


def _check_masks(masks: Mapping[str, Any], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    if not isinstance(masks, Mapping) or not masks:
        raise DatasetError("give at least one mask: {'structure name': 2D array}, e.g. {'optic disc': mask}")
    out: dict[str, np.ndarray] = {}
    for raw_name, mask in masks.items():
        name = _clean_name(raw_name)
        if name.casefold() in {k.casefold() for k in out}:
            raise DatasetError(f"two masks are named {name!r}; give each structure one mask")
        arr = np.asarray(mask)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.shape != shape:
            raise TrainingSetConflictError(
                f"the mask of {name!r} is {'x'.join(map(str, arr.shape))} but the image is {shape[0]}x{shape[1]}; "
                "masks must have the image's height and width (use the Labels layer drawn on this image)"
            )
        out[name] = arr != 0
    return out


def _combination_table(structures: Mapping[str, tuple[int, ...]]) -> dict[frozenset[str], int]:
    """Label value of each combination of structures in an existing dataset.yaml."""
    members: dict[int, set[str]] = {}
    for name, values in structures.items():
        for v in values:
            members.setdefault(v, set()).add(name)
    table: dict[frozenset[str], int] = {}
    for v in sorted(members):
        table.setdefault(frozenset(members[v]), v)
    return table


def encode_label_map(
    masks: Mapping[str, np.ndarray], structures: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[np.ndarray, dict[str, tuple[int, ...]]]:
    """One label map for binary ``masks`` (name -> bool [H, W]) and the updated structures table.

    ``structures`` is the folder's current table (name -> values), kept as is; structures and
    combinations it does not have are added with new values. Returns ``(label_map [H, W]
    uint8|uint16, structures)``, where decoding ``np.isin(label_map, structures[name])`` gives back
    each mask exactly.
    """
    table = {k: tuple(v) for k, v in (structures or {}).items()}
    combos = _combination_table(table)
    used = {v for vals in table.values() for v in vals}
    names = list(masks)
    for name in names:  # every structure gets a value of its own (the structure alone)
        if name not in table:
            table[name] = ()
    stack = np.stack([masks[n] for n in names], axis=0)
    weights = np.uint64(1) << np.arange(len(names), dtype=np.uint64)
    codes = np.tensordot(weights, stack.astype(np.uint64), axes=(0, 0)) if len(names) <= 63 else None
    if codes is None:
        raise DatasetError(f"{len(names)} structures in one image are too many (at most 63)")
    present = [int(c) for c in np.unique(codes) if c != 0]
    code_to_combo = {c: frozenset(n for k, n in enumerate(names) if c >> k & 1) for c in present}
    wanted = set(code_to_combo.values())
    covered = {n for combo in wanted for n in combo}
    wanted |= {frozenset([n]) for n in names if not table[n] and n not in covered}  # absent new structures
    next_value = max(used, default=0) + 1
    for combo in sorted(wanted, key=lambda s: (len(s), sorted(s))):
        if combo in combos:
            continue
        if next_value > 65535:
            raise DatasetError("the folder needs more than 65535 label values; start a new training-set folder")
        combos[combo] = next_value
        for n in combo:
            table[n] = tuple(sorted(set(table[n]) | {next_value}))
        next_value += 1
    dtype = np.uint8 if max(combos.values(), default=0) <= 255 else np.uint16
    label_map = np.zeros(codes.shape, dtype=dtype)
    for c, combo in code_to_combo.items():
        label_map[codes == c] = combos[combo]
    return label_map, table


def _image_suffix(arr: np.ndarray) -> str:
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[-1] in (3, 4)):
        return ".png"
    return ".tif"


def _encode_file(arr: np.ndarray, suffix: str) -> bytes:
    buf = io.BytesIO()
    if suffix == ".png":
        from PIL import Image

        if arr.dtype == np.uint16:
            Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")  # 16-bit grey
        else:
            Image.fromarray(arr).save(buf, format="PNG")
    else:
        import tifffile

        photometric = "rgb" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else "minisblack"
        extrasamples = {"extrasamples": ["unassalpha"]} if arr.ndim == 3 and arr.shape[-1] == 4 else {}
        tifffile.imwrite(buf, arr, photometric=photometric, compression="zlib", **extrasamples)
    return buf.getvalue()


def _taken_stems(root: Path) -> set[str]:
    stems = set()
    for sub, suffixes in (("images", IMAGE_SUFFIXES), ("masks", MASK_SUFFIXES)):
        folder = root / sub
        if folder.is_dir():
            stems |= {p.stem for p in folder.iterdir() if p.suffix.lower() in suffixes}
    return stems


def _unique_stem(root: Path, name: str | None) -> str:
    base = _SAFE.sub("_", name.strip()).strip("._-") if name else ""
    base = base[:80] or "image"
    taken = _taken_stems(root)
    if name and base not in taken:
        return base
    k = 1
    while f"{base}_{k:04d}" in taken:
        k += 1
    return f"{base}_{k:04d}"


def _read_meta_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _same_modality(a: str | None, b: str | None) -> bool:
    from ..prompts import canonical_modality

    if a is None or b is None:
        return a is b
    return a.strip().casefold() == b.strip().casefold() or (
        canonical_modality(a) is not None and canonical_modality(a) == canonical_modality(b)
    )


def add_to_training_set(
    folder: str | os.PathLike,
    image: Any,
    masks: Mapping[str, Any],
    *,
    modality: str,
    name: str | None = None,
    group: str | None = None,
    merge_structures: bool = True,
    pixel_mm: float | None = None,
) -> Path:
    """Store ``image`` and its ``masks`` in the dataset folder ``folder``; returns the image path.

    ``image``: 2D ``(H, W)`` or ``(H, W, 3|4)``, any size, any integer or float dtype (8-bit
    grey/RGB(A) as PNG, everything else as lossless TIFF). ``masks``: structure name (the prompt)
    -> ``(H, W)`` array, non-zero = inside; structures may overlap. ``modality``: the folder's
    modality text (e.g. ``"cardiac MRI"``; a folder holds one domain). ``name``: file stem
    (default ``image_NNNN``; a taken name gets a ``_NNNN`` suffix). ``group``: meta.csv
    ``patient`` column, so splits keep images of one patient together (default: the stem).

    The folder and its ``dataset.yaml`` are created on first use. Structures the folder does not
    have yet are added when ``merge_structures`` (default; images added before count them as
    absent, so add every structure from the start when you can), else refused. A mask of another
    shape, or another modality than the folder's, raises :class:`TrainingSetConflictError`.
    """
    import yaml

    from ..io import atomic_path, atomic_write_bytes, atomic_write_text

    if not isinstance(modality, str) or not modality.strip():
        raise DatasetError("give the image's modality, e.g. modality='cardiac MRI' or 'colour fundus photograph'")
    modality = " ".join(modality.split())
    arr = _check_image(image)
    binary = _check_masks(masks, arr.shape[:2])
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file; choose a folder for the training set")
    spec_path = root / SPEC_FILE
    existing: dict[str, tuple[int, ...]] = {}
    data: dict[str, Any] = {"name": root.name, "modality": modality, "structures": {}}
    if spec_path.is_file():
        for sub in ("images", "masks"):
            (root / sub).mkdir(exist_ok=True)
        spec = read_spec(root)
        if spec.kind != "folder":
            raise TrainingSetConflictError(f"{spec_path} describes NIfTI volumes; choose another folder for 2D images")
        if not _same_modality(spec.modality, modality):
            raise TrainingSetConflictError(
                f"{root} holds {spec.modality!r} images, not {modality!r}; keep one training-set folder per "
                "modality (imaging domain) and choose another folder"
            )
        data = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
        existing = dict(spec.structures)
        by_fold = {k.casefold(): k for k in existing}
        binary = {by_fold.get(k.casefold(), k): v for k, v in binary.items()}  # same name, any case
        new = [k for k in binary if k not in existing]
        if new and not merge_structures:
            raise TrainingSetConflictError(
                f"{root} has the structures {list(existing)}, and {new} would be new; name the masks like the "
                "folder's structures, or pass merge_structures=True to add them"
            )
    elif root.is_dir() and not {p.name for p in root.iterdir() if not p.name.startswith(".")} <= {
        "images", "masks", META_FILE
    }:
        raise DatasetError(f"{root} is a non-empty folder without {SPEC_FILE}; choose an empty or new folder")
    # structures of the folder that this image does not mention: absent here (empty masks)
    for missing in existing:
        if missing not in binary:
            binary[missing] = np.zeros(arr.shape[:2], dtype=bool)
    label_map, table = encode_label_map(binary, existing)

    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(root, name)
    image_path = root / "images" / f"{stem}{_image_suffix(arr)}"
    mask_path = root / "masks" / f"{stem}.png"
    image_bytes = _encode_file(arr, image_path.suffix)
    mask_bytes = _encode_file(label_map, ".png")

    data["structures"] = {k: list(v) for k, v in table.items()}
    data.setdefault("modality", modality)
    if table != existing or not spec_path.is_file():
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
        atomic_write_text(spec_path, "# written by emclip.data.user_dataset.add_to_training_set\n" + text)
    # the two files appear back to back (each atomically): mask first, then the image
    with atomic_path(mask_path) as tmp_mask, atomic_path(image_path) as tmp_image:
        tmp_mask.write_bytes(mask_bytes)
        tmp_image.write_bytes(image_bytes)
    fields, rows = _read_meta_rows(root / META_FILE)
    row = {"id": stem, "patient": group or stem, "added": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "size_hw": f"{arr.shape[0]}x{arr.shape[1]}", "dtype": str(arr.dtype)}
    if pixel_mm is not None:
        row["pixel_mm"] = f"{float(pixel_mm):g}"
    for key in row:
        if key not in fields:
            fields.append(key)
    rows.append(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(root / META_FILE, out.getvalue().encode("utf-8"))
    return image_path


def training_set_size(folder: str | os.PathLike) -> int:
    """Number of image/mask pairs in a training-set folder (0 when it does not exist yet)."""
    root = Path(folder).expanduser()
    if not (root / SPEC_FILE).is_file():
        return 0
    images = {p.stem for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if (
        root / "images").is_dir() else set()
    masks = {p.stem for p in (root / "masks").iterdir() if p.suffix.lower() in MASK_SUFFIXES} if (
        root / "masks").is_dir() else set()
    return len(images & masks)
