"""NIfTI volumes: read one or several sequences of a patient, write label volumes back.

Axis order: a :class:`Volume` keeps the voxel order of the file (nibabel's ``(i, j, k)``), and
``affine`` maps a voxel index ``(i, j, k, 1)`` to RAS+ world millimetres, exactly as nibabel's
``img.affine``. Label volumes written by :func:`write_volume` use the same grid, so a mask
computed on ``volume.data`` lines up with the source in any viewer.

Nothing here imports torch; nibabel is imported when a file is read or written. Files are
written atomically (temp file next to the target, then ``os.replace``).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, InvalidImageError
from .sequences import sequence_alias

NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""File name endings read as NIfTI (case-insensitive)."""

AXIS_CODES: dict[str, tuple[str, str]] = {
    "axial": ("S", "I"),
    "coronal": ("A", "P"),
    "sagittal": ("L", "R"),
}
"""Orientation codes (nibabel ``aff2axcodes``) of the voxel axis each slice plane is stacked along."""

LABEL_SUFFIXES = ("seg", "label", "labels", "mask", "brainmask", "gt")
"""Suffixes of files holding labels, not images (skipped by :func:`read_sequences`)."""


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True if the file name ends with ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii``/``.nii.gz``: ``case_flair.nii.gz`` -> ``case_flair``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def split_sequence_name(path: str | os.PathLike) -> tuple[str, str | None]:
    """``(case, sequence)`` from a file name: ``pat1_t1c.nii.gz`` -> ``("pat1", "t1ce")``.

    The sequence is the part after the last ``_`` or ``-`` when it names a sequence
    (:func:`emclip.sequences.sequence_alias`), else None (and ``case`` is the whole stem).
    """
    stem = nifti_stem(path)
    match = re.match(r"^(.*?)[_\-.]([A-Za-z0-9]+)$", stem)
    if match:
        sequence = sequence_alias(match.group(2))
        if sequence is not None:
            return match.group(1), sequence
    return stem, None


def is_label_path(path: str | os.PathLike) -> bool:
    """True if the file name marks a label volume (``..._seg.nii.gz``, ``_mask``, ``_label``)."""
    stem = nifti_stem(path).lower()
    return any(re.search(rf"(^|[_\-.]){s}$", stem) for s in LABEL_SUFFIXES)


@dataclass
class Volume:
    """One 3D NIfTI volume.

    ``data``: ``(I, J, K)`` array in the file's voxel order, scaling (``scl_slope``/``scl_inter``)
    applied: float32 when the file is scaled, else the stored dtype. ``affine``: 4x4 float64,
    voxel index -> RAS+ mm. ``spacing``: voxel size in mm per axis. ``axcodes``: orientation code
    of each voxel axis, e.g. ``("L", "P", "S")``. ``name``: file name without ``.nii(.gz)``.
    ``sequence``: canonical sequence name (flair, t1, t1ce, t2) if known. ``header``: the nibabel
    header (copied into written label volumes), or None.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    axcodes: tuple[str, str, str]
    name: str = "volume"
    sequence: str | None = None
    path: Path | None = None
    header: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]


def axcodes_of(affine: np.ndarray) -> tuple[str, str, str]:
    """Orientation codes of the voxel axes (nibabel ``aff2axcodes``), e.g. ``("R", "A", "S")``."""
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, dtype=float))
    if any(c is None for c in codes):
        raise InvalidImageError(f"the affine has a degenerate axis (orientation {codes}); check the file's header")
    return tuple(str(c) for c in codes)  # type: ignore[return-value]


def check_affine(affine: Any) -> np.ndarray:
    """A 4x4 float64 affine with an invertible 3x3 part, or :class:`InvalidArgumentError`."""
    arr = np.asarray(affine, dtype=float)
    if arr.shape != (4, 4) or not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"affine must be a finite 4x4 matrix, got shape {arr.shape}")
    if abs(np.linalg.det(arr[:3, :3])) < 1e-12:
        raise InvalidArgumentError("affine is singular (a voxel axis has zero size); check the header")
    return arr


def voxel_axis(axis: str | int, affine: Any = None) -> int:
    """Voxel axis index (0..2) of ``axis``: an index, or "axial"/"coronal"/"sagittal" found from
    the affine's orientation codes (so it is right for RAS, LPS or any other voxel order)."""
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        if not -3 <= int(axis) <= 2:
            raise InvalidArgumentError(f"axis {axis} is out of range: use 0, 1, 2 or axial/coronal/sagittal")
        return int(axis) % 3
    name = str(axis).strip().lower()
    if name not in AXIS_CODES:
        raise InvalidArgumentError(f"unknown axis {axis!r}: use axial, coronal, sagittal or a voxel index 0..2")
    if affine is None:
        raise InvalidArgumentError(
            f"axis={name!r} needs the volume's affine to find the {name} axis; pass affine=... "
            "(or a Volume from read_volume), or give the axis as a number 0..2"
        )
    codes = axcodes_of(check_affine(affine))
    for i, code in enumerate(codes):
        if code in AXIS_CODES[name]:
            return i
    raise InvalidArgumentError(f"cannot find the {name} axis from the orientation codes {codes}")


# --------------------------------------------------------------------------- reading


def check_nifti_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such NIfTI file: {path}")
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder; pass a .nii or .nii.gz file")
    if not is_nifti_path(path):
        raise InvalidImageError(
            f"cannot read {path.name} as a volume: only NIfTI files (.nii, .nii.gz) are read; "
            "for 2D images and TIFF stacks use emclip.io.read_image"
        )
    if path.stat().st_size == 0:
        raise InvalidImageError(f"{path} is empty (0 bytes); it was not saved completely, copy it again")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI volume (``.nii`` or ``.nii.gz``) into a :class:`Volume`.

    Trailing axes of size 1 are dropped (``(X, Y, Z, 1)`` is 3D). Raises ``FileNotFoundError``
    and :class:`InvalidImageError` for other extensions, empty, truncated or corrupted files,
    non-NIfTI content and volumes that are not 3D.
    """
    import nibabel as nib

    path = Path(path)
    check_nifti_file(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InvalidImageError(f"{path} is a {type(img).__name__}, not a NIfTI image")
        proxy = img.dataobj
        slope = getattr(proxy, "slope", 1.0)
        inter = getattr(proxy, "inter", 0.0)
        scaled = not (slope in (None, 1.0) and inter in (None, 0.0))
        if scaled:
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            data = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        affine = np.array(img.affine, dtype=float)
        zooms = img.header.get_zooms()
        header = img.header.copy()
    except InvalidImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error...
        raise InvalidImageError(
            f"cannot read {path} as NIfTI ({type(exc).__name__}: {exc}); check that the file is "
            "complete (not truncated) and really a .nii/.nii.gz volume"
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        hint = (
            f"; it holds {data.shape[3]} volumes, save each sequence as its own file"
            if data.ndim == 4
            else ""
        )
        raise InvalidImageError(f"{path} is not a 3D volume (shape {data.shape}){hint}")
    if data.size == 0:
        raise InvalidImageError(f"{path} holds an empty volume (shape {data.shape})")
    return Volume(
        data=data,
        affine=affine,
        spacing=tuple(float(z) for z in zooms[:3]),  # type: ignore[arg-type]
        axcodes=axcodes_of(affine),
        name=nifti_stem(path),
        sequence=split_sequence_name(path)[1],
        path=path,
        header=header,
    )


def same_grid(a: Volume, b: Volume, *, atol: float = 1e-3) -> bool:
    """True if ``a`` and ``b`` have the same shape and (to ``atol`` mm) the same affine."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def case_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))
    return [p for p in files if not is_label_path(p)]


def read_sequences(
    sources: str | os.PathLike | Sequence[str | os.PathLike | Volume],
    channels: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str], Volume]:
    """Several sequences of one patient as one array: ``(data, names, meta)``.

    ``sources``: a case folder (its ``.nii``/``.nii.gz`` files except label files such as
    ``_seg``), or a list of files / :class:`Volume`. ``channels``: with a folder, the sequences
    to take and their order (e.g. ``["flair", "t1ce"]``); with a list, one name per file.
    Default: names inferred from the file names (``_flair``, ``_t1``, ``_t1ce``/``_t1c``,
    ``_t2``, ...; else the file name). Returns ``data`` ``(I, J, K, C)`` float32 (channel axis
    last, voxel order of the files), the ``C`` names, and the first :class:`Volume` (its
    ``affine``, ``spacing`` and ``header`` describe the shared grid; pass it as ``like`` to
    :func:`write_volume`).
    Raises :class:`InvalidImageError` when the grids (shape or affine) differ, and
    :class:`InvalidArgumentError` for unknown or duplicate sequence names.
    """
    if isinstance(sources, (str, os.PathLike)) and Path(sources).is_dir():
        folder = Path(sources)
        files = case_files(folder)
        if not files:
            raise InvalidImageError(f"{folder} holds no NIfTI image files (.nii/.nii.gz other than labels)")
        volumes = [read_volume(p) for p in files]
        names = _names(volumes)
        if channels is not None:
            wanted = [_canonical(c) for c in channels]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise InvalidArgumentError(f"{folder}: no file for the sequences {missing}; it has {names}")
            volumes = [volumes[names.index(c)] for c in wanted]
            names = wanted
    else:
        items = [sources] if isinstance(sources, (str, os.PathLike, Volume)) else list(sources)
        if not items:
            raise InvalidArgumentError("no volumes given; pass NIfTI files or a case folder")
        volumes = [v if isinstance(v, Volume) else read_volume(v) for v in items]
        if channels is not None:
            if len(channels) != len(volumes):
                raise InvalidArgumentError(
                    f"{len(channels)} channel names for {len(volumes)} volumes; give one name per volume"
                )
            names = [_canonical(c) for c in channels]
        else:
            names = _names(volumes)
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"sequence names must differ, got {names}; pass channels=[...] to name them")
    first = volumes[0]
    for vol, name in zip(volumes[1:], names[1:]):
        if vol.shape != first.shape:
            raise InvalidImageError(
                f"sequence {name!r} ({vol.name}) has shape {vol.shape} but {names[0]!r} ({first.name}) has "
                f"{first.shape}; all sequences of a case must share one voxel grid (resample/co-register them first)"
            )
        if not np.allclose(vol.affine, first.affine, atol=1e-3):
            raise InvalidImageError(
                f"sequence {name!r} ({vol.name}) has another affine than {names[0]!r} ({first.name}): "
                f"orientation {vol.axcodes} vs {first.axcodes}, origin {vol.affine[:3, 3].round(2).tolist()} vs "
                f"{first.affine[:3, 3].round(2).tolist()}; co-register the sequences onto one grid first"
            )
    data = np.stack([np.asarray(v.data, dtype=np.float32) for v in volumes], axis=-1)
    return data, names, first


def _canonical(name: str) -> str:
    """The known sequence ``name`` spells, else ``name`` stripped and lower-cased."""
    return sequence_alias(name) or str(name).strip().lower()


def _names(volumes: Sequence[Volume]) -> list[str]:
    return [v.sequence or v.name for v in volumes]


# --------------------------------------------------------------------------- writing


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint8 when the labels fit, else uint16; :class:`InvalidArgumentError` otherwise."""
    if labels.dtype == bool:
        return np.dtype(np.uint8)
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise InvalidArgumentError(f"labels must be integers or booleans, got dtype {labels.dtype}")
    if labels.size == 0:
        return np.dtype(np.uint8)
    lo, hi = labels.min(), labels.max()
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.mod(labels, 1) == 0):
        raise InvalidArgumentError("labels must be whole numbers; threshold probabilities into masks first")
    if lo < 0 or hi > 65535:
        raise InvalidArgumentError(f"label values must lie in 0..65535, got {lo}..{hi}")
    return np.dtype(np.uint8 if hi <= 255 else np.uint16)


def write_volume(
    path: str | os.PathLike,
    labels: np.ndarray,
    like: Volume | None = None,
    *,
    affine: Any = None,
    overwrite: bool = False,
    description: str = "emclip labels",
) -> Path:
    """Write a label volume as NIfTI (``.nii`` or ``.nii.gz``, chosen by the name), atomically.

    ``labels``: ``(I, J, K)`` bool/int array on the grid of ``like`` (the source :class:`Volume`;
    its affine and header are copied, with the data type set to uint8, or uint16 above 255, and no
    intensity scaling) or of ``affine`` (4x4, voxel -> RAS+ mm; overrides ``like.affine``). An
    existing file is kept (``FileExistsError``) unless ``overwrite=True``. Returns the path.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti_path(path):
        raise InvalidArgumentError(f"{path.name}: NIfTI label files must end with .nii.gz or .nii")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise InvalidArgumentError(f"labels must be a 3D volume (I, J, K), got shape {arr.shape}")
    if like is not None and arr.shape != like.shape:
        raise InvalidArgumentError(
            f"labels of shape {arr.shape} do not match the volume {like.name} of shape {like.shape}; "
            "write masks computed on that volume"
        )
    if affine is None:
        if like is None:
            raise InvalidArgumentError("pass like=<source Volume> or affine=<4x4> so the labels keep their position")
        affine = like.affine
    aff = check_affine(affine)
    dtype = label_dtype(arr)
    data = arr.astype(dtype, copy=False)
    header = None
    if like is not None and isinstance(like.header, nib.Nifti1Header):
        header = like.header.copy()
    img = nib.Nifti1Image(data, aff, header=header)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(data.max(initial=0))
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    code = int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 2
    img.set_sform(aff, code=code)
    qcode = int(header["qform_code"]) if header is not None and int(header["qform_code"]) > 0 else code
    img.set_qform(aff, code=qcode)
    if header is not None and header.get_xyzt_units()[0] != "unknown":
        img.header.set_xyzt_units(*header.get_xyzt_units())
    else:
        img.header.set_xyzt_units("mm")
    payload = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    from .io import atomic_open

    with atomic_open(path, "wb") as fh:
        fh.write(payload)
    return path
