"""npe2 writer: a 3D Labels layer to NIfTI (``.nii.gz``/``.nii``) in world millimetres.

The voxel -> RAS+ affine comes from the layer's own transform (scale, translate, rotate, shear,
affine; see :mod:`napari_emclip._volumes`), so the file lines up with the image it was drawn
or segmented on. When the layer came from a NIfTI file (``metadata["nifti"]``), the labels are
put back in that file's voxel order and affine. Written atomically by
:func:`emclip.volume_io.write_volume` (uint8, or uint16 above 255 labels). An existing file is
kept as ``<name>.previous.nii.gz`` first, as the TIFF writer does (napari's save dialog asks
before overwriting; ``viewer.layers.save`` does not), so an edited mask is never lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._volumes import META_KEY, ras_affine_of, to_source_grid, world_matrix
from ._writer import keep_previous, notify


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one 3D Labels layer to ``path``; ``.nii.gz`` is appended to other names."""
    from emclip.volume_io import is_nifti_path, write_volume

    target = Path(path)
    if not is_nifti_path(target):
        target = target.with_name(target.name + ".nii.gz")
    labels = np.asarray(data)
    if labels.ndim != 3:
        raise ValueError(
            f"NIfTI labels must be 3D volumes, got {labels.ndim}D data of shape {labels.shape}; "
            "save 2D labels as a mask TIFF instead"
        )
    ndim = labels.ndim
    world = world_matrix(
        scale=attributes.get("scale", np.ones(ndim)),
        translate=attributes.get("translate", np.zeros(ndim)),
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
        affine=attributes.get("affine"),
    )
    ras = ras_affine_of(world)
    meta = (attributes.get("metadata") or {}).get(META_KEY)
    if isinstance(meta, dict):
        labels, ras = to_source_grid(labels, ras, meta.get("affine"), meta.get("shape"))
    backup = keep_previous(target) if target.is_file() else None
    write_volume(
        target,
        np.ascontiguousarray(labels),
        affine=ras,
        overwrite=True,
        description=f"napari-emclip: {attributes.get('name') or 'labels'}",
    )
    if backup is not None:
        notify(f"{target.name} existed: the previous version was kept as {backup.name}.")
    return [str(target)]
