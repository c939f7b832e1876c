"""npe2 reader: NIfTI volumes (``.nii``, ``.nii.gz``) as napari Image or Labels layers.

Each file becomes one layer in world millimetres (see :mod:`napari_emclip._volumes` for the
display orientation): ``affine`` carries voxel size, orientation and origin, so every file of
a patient, and every mask computed on it, lines up. Files named like label volumes
(``..._seg``, ``_label(s)``, ``_mask``, ``_brainmask``, ``_gt``) holding whole numbers open as
Labels. ``layer.metadata["nifti"]`` keeps the source file, its affine, shape, orientation,
voxel size and sequence name, so the NIfTI writer can save labels back on the source grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._volumes import DISPLAY_AXCODES, META_KEY, to_display

LayerData = tuple[Any, dict[str, Any], str]


def _is_nifti(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).lower().endswith((".nii", ".nii.gz"))


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader function when every path is a NIfTI file, else None (napari tries others)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(_is_nifti(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | list[str]) -> list[LayerData]:
    """Layer data tuples for one or several NIfTI files (one layer per file)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [nifti_layer_data(p) for p in paths]


def nifti_layer_data(path: str | Path) -> LayerData:
    """``(data, kwargs, "image"|"labels")`` for one NIfTI file (see module docstring)."""
    from emclip.volume_io import is_label_path, read_volume

    volume = read_volume(path)
    data = volume.data
    kind = "image"
    if is_label_path(path) and _whole_numbers(data):
        kind = "labels"
        if not np.issubdtype(data.dtype, np.integer):
            data = data.astype(np.int32)
    shown, napari_affine, _ = to_display(data, volume.affine)
    meta = {
        META_KEY: {
            "path": str(Path(path)),
            "affine": volume.affine.tolist(),
            "shape": list(volume.shape),
            "axcodes": list(volume.axcodes),
            "spacing": list(volume.spacing),
            "sequence": volume.sequence,
            "display_axcodes": list(DISPLAY_AXCODES),
        }
    }
    kwargs: dict[str, Any] = {"name": volume.name, "affine": napari_affine, "metadata": meta}
    if kind == "image":
        kwargs["colormap"] = "gray"
        lo, hi = float(np.min(shown)), float(np.max(shown))
        kwargs["contrast_limits"] = (lo, hi if hi > lo else lo + 1.0)
    else:
        kwargs["opacity"] = 0.5
    return np.ascontiguousarray(shown), kwargs, kind


def _whole_numbers(data: np.ndarray) -> bool:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return True
    return bool(np.all(np.mod(data, 1) == 0))
