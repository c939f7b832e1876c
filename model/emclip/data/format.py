"""The project's dataset format: ``dataset.yaml`` + ``images/`` + ``masks/`` (or NIfTI volumes).

A dataset is a folder::

    <dataset>/dataset.yaml          what the mask values mean (below)
    <dataset>/images/<id>.png       2D images: png, jpg, tif (grey, RGB or RGBA)
    <dataset>/masks/<id>.png        label maps with the same stem, same height and width
    <dataset>/meta.csv              optional: one row per image (``id``, ``official_split``,
                                    ``patient`` or ``case`` for grouped splits, ``pixel_mm``)

or, for 3D volumes (``channels`` given in dataset.yaml)::

    <dataset>/<case>/<case>_<channel>.nii.gz   one file per sequence (e.g. flair)
    <dataset>/<case>/<case>_<labels>.nii.gz    the label volume on the same grid

``dataset.yaml``::

    name: My dataset                 # optional, free text
    modality: colour fundus photograph
    structures:                      # structure name -> mask values it covers (union)
      optic disc: [1, 2]
      optic cup: [2]
    synonyms:                        # optional: other names of a structure
      optic disc: [optic nerve head, OD]
    channels: [flair, t1ce]          # volumes only: file suffixes of the sequences
    labels: seg                      # volumes only: suffix of the label volume (default seg)

Value 0 is background. Every other value found in a mask must belong to at least one structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

SPEC_FILE = "dataset.yaml"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii.gz", ".nii")

_EXAMPLE = (
    "e.g.\n  modality: colour fundus photograph\n  structures:\n    optic disc: [1, 2]\n"
    "    optic cup: [2]"
)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``dataset.yaml`` (see the module docstring).

    ``structures`` keeps the file's order; each value tuple is sorted. ``kind`` is ``"folder"``
    (images/ + masks/) or ``"volume"`` (NIfTI cases, when ``channels`` is given).
    """

    root: Path
    name: str
    modality: str | None
    structures: dict[str, tuple[int, ...]]
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    channels: tuple[str, ...] = ()
    labels: str = "seg"

    @property
    def kind(self) -> str:
        return "volume" if self.channels else "folder"

    @property
    def structure_names(self) -> list[str]:
        return list(self.structures)

    @property
    def label_values(self) -> frozenset[int]:
        """All non-background values named by some structure."""
        return frozenset(v for vals in self.structures.values() for v in vals)

    @property
    def dirname(self) -> str:
        return self.root.name

    def synonyms_of(self, structure: str) -> tuple[str, ...]:
        """Synonyms from dataset.yaml plus the built-in ones of :mod:`emclip.prompts`."""
        from ..prompts import synonyms_of

        return synonyms_of(structure, self.synonyms)

    def structure_masks(self, label_map: np.ndarray) -> np.ndarray:
        """Binary masks ``[P, H, W]`` (bool), one per structure in order: union of its values."""
        return np.stack([np.isin(label_map, vals) for vals in self.structures.values()], axis=0)

    def check_values(self, label_map: np.ndarray, path: Path | str) -> None:
        """Raise :class:`DatasetError` naming ``path`` if it holds values dataset.yaml does not name."""
        found = np.unique(label_map)
        unknown = sorted(int(v) for v in found if v != 0 and int(v) not in self.label_values)
        if unknown:
            raise DatasetError(
                f"{path}: mask values {unknown} are not named in {self.root / SPEC_FILE} "
                f"(known: {sorted(self.label_values)}); add them to a structure there or fix the mask"
            )


def _fail(path: Path, what: str) -> DatasetError:
    return DatasetError(f"{path}: {what}")


def _as_int_values(raw: Any, path: Path, name: str) -> tuple[int, ...]:
    if isinstance(raw, bool):
        raw = [raw]
    if isinstance(raw, int):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise _fail(path, f"structure {name!r} must list its mask values, e.g. '{name}: [1, 2]', got {raw!r}")
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(path, f"structure {name!r}: mask values must be integers, got {v!r}")
        if v <= 0 or v > 65535:
            raise _fail(path, f"structure {name!r}: mask value {v} must be in 1..65535 (0 is background)")
        out.append(int(v))
    return tuple(sorted(set(out)))


def _str_list(raw: Any, path: Path, key: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in raw):
        raise _fail(path, f"{key} must be a list of non-empty names, got {raw!r}")
    return tuple(s.strip() for s in raw)


def _check_usable_prompt(name: str, seen: dict[str, str], path: Path) -> None:
    """Structure names are the prompts of evaluation and training: each must stay a distinct,
    non-empty prompt once cleaned as :func:`emclip.prompts.parse_prompts` cleans user input."""
    from ..prompts import MAX_PROMPT_CHARS, clean_prompt

    prompt = clean_prompt(name)
    if not prompt:
        raise _fail(path, f"structure name {name!r} has no visible characters (only control or invisible "
                          "characters), so it cannot be a prompt; name the structure in words, e.g. 'optic disc'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _fail(path, f"structure name {prompt[:40]!r}... is {len(prompt)} characters long, more than a "
                          f"prompt may be ({MAX_PROMPT_CHARS}); name the structure in a few words")
    key = prompt.casefold()
    if key in seen:
        raise _fail(path, f"structure names {seen[key]!r} and {name!r} are the same prompt ({prompt!r}, case "
                          "ignored); merge their mask values under one name")
    seen[key] = name


def parse_spec(data: Mapping[str, Any], root: Path, path: Path | None = None) -> DatasetSpec:
    """Validate the content of a dataset.yaml (already loaded) and build a :class:`DatasetSpec`."""
    path = path or root / SPEC_FILE
    if not isinstance(data, Mapping):
        raise _fail(path, f"expected a mapping with 'modality' and 'structures', {_EXAMPLE}")
    known = {"name", "modality", "structures", "synonyms", "channels", "labels", "description"}
    extra = sorted(set(data) - known)
    if extra:
        raise _fail(path, f"unknown keys {extra}; allowed keys are {sorted(known)}")
    structures_raw = data.get("structures")
    if not isinstance(structures_raw, Mapping) or not structures_raw:
        raise _fail(path, f"'structures' must map each structure name to its mask values, {_EXAMPLE}")
    structures: dict[str, tuple[int, ...]] = {}
    as_prompts: dict[str, str] = {}  # casefolded prompt -> structure name
    for name, vals in structures_raw.items():
        if not isinstance(name, str) or not name.strip():
            raise _fail(path, f"structure names must be non-empty text, got {name!r}")
        _check_usable_prompt(name, as_prompts, path)
        structures[" ".join(name.split())] = _as_int_values(vals, path, name)
    synonyms_raw = data.get("synonyms") or {}
    if not isinstance(synonyms_raw, Mapping):
        raise _fail(path, "'synonyms' must map a structure name to a list of other names")
    synonyms: dict[str, tuple[str, ...]] = {}
    for name, syns in synonyms_raw.items():
        if name not in structures:
            raise _fail(path, f"synonyms given for {name!r}, which is not one of the structures {list(structures)}")
        synonyms[name] = _str_list(syns, path, f"synonyms of {name!r}")
    modality = data.get("modality")
    if modality is not None and not isinstance(modality, str):
        raise _fail(path, f"'modality' must be text such as 'cardiac MRI', got {modality!r}")
    channels = _str_list(data["channels"], path, "channels") if data.get("channels") is not None else ()
    labels = data.get("labels", "seg")
    if not isinstance(labels, str) or not labels.strip():
        raise _fail(path, f"'labels' must be the suffix of the label volumes (e.g. seg), got {labels!r}")
    name = data.get("name") or root.name
    return DatasetSpec(
        root=root,
        name=str(name),
        modality=modality.strip() if modality else None,
        structures=structures,
        synonyms=synonyms,
        channels=channels,
        labels=labels.strip(),
    )


def read_spec(root: str | Path) -> DatasetSpec:
    """Read and validate ``<root>/dataset.yaml``; raises :class:`DatasetError` naming the file."""
    import yaml

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; pass a folder holding dataset.yaml, images/ and masks/")
    path = root / SPEC_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing; describe the mask values in a dataset.yaml, {_EXAMPLE}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise DatasetError(f"{path}: cannot be read as YAML ({exc}); {_EXAMPLE}") from exc
    spec = parse_spec(data, root.resolve(), path)
    if spec.kind == "folder":
        for sub in ("images", "masks"):
            if not (root / sub).is_dir():
                raise DatasetError(
                    f"{root / sub}: missing; a dataset folder needs images/ and masks/ with the same file "
                    "names (or 'channels' in dataset.yaml for NIfTI volumes)"
                )
    return spec


def read_meta(root: str | Path) -> dict[str, dict[str, str]]:
    """Rows of ``<root>/meta.csv`` keyed by their ``id`` (or ``case``) column; {} when absent."""
    import csv

    path = Path(root) / "meta.csv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot be read as CSV ({exc})") from exc
    if not rows:
        return {}
    key = "id" if "id" in rows[0] else "case" if "case" in rows[0] else None
    if key is None:
        raise DatasetError(f"{path}: needs an 'id' column (or 'case' for volumes) naming each image's file stem")
    return {row[key]: row for row in rows}
