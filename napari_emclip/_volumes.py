"""NIfTI geometry in napari, and several Image layers as one multi-sequence volume (no Qt).

napari slices 2D views correctly only when each data axis maps to one world axis (a permuting
affine triggers "non-orthogonal slicing" and shows the wrong plane). So the reader reorients
each volume (transposes and flips, no resampling) to the display voxel order
:data:`DISPLAY_AXCODES` ``("I", "P", "L")``, and the napari world axes are
``(-z, -y, -x)`` of NIfTI's RAS+ millimetres (:data:`WORLD_FROM_RAS`, a proper rotation). Axis 0
is the slider: 2D views show axial slices with anterior up and the patient's left on the right
(radiological convention); rolling the dims gives coronal/sagittal slices with superior up.

Everything here imports nibabel/napari lazily (module import is numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

META_KEY = "nifti"
"""Key of the NIfTI description in ``layer.metadata`` (source affine, shape, sequence, ...)."""

DISPLAY_AXCODES = ("I", "P", "L")
"""Orientation of the data axes of layers made by the reader (nibabel axis codes)."""

WORLD_FROM_RAS = np.array(
    [[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
"""napari world ``(w0, w1, w2) = (-z, -y, -x)`` from RAS+ ``(x, y, z)`` (homogeneous 4x4)."""

RAS_FROM_WORLD = np.linalg.inv(WORLD_FROM_RAS)


def to_display(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient a NIfTI volume for napari: ``(display_data, napari_affine, ras_affine)``.

    ``data`` ``(I, J, K)`` in file order with ``affine`` (voxel -> RAS+). ``display_data`` is a
    view (transposed/flipped) in :data:`DISPLAY_AXCODES` order; ``ras_affine`` maps its voxels to
    RAS+; ``napari_affine`` = ``WORLD_FROM_RAS @ ras_affine`` (nearly diagonal and positive, so
    napari renders and slices it exactly).
    """
    import nibabel.orientations as nio

    affine = np.asarray(affine, dtype=float)
    start = nio.io_orientation(affine)
    end = nio.axcodes2ornt(DISPLAY_AXCODES)
    transform = nio.ornt_transform(start, end)
    shown = nio.apply_orientation(np.asarray(data), transform)
    ras = affine @ nio.inv_ornt_aff(transform, np.asarray(data).shape)
    return shown, WORLD_FROM_RAS @ ras, ras


def to_source_grid(
    data: np.ndarray, ras_affine: np.ndarray, source_affine: Any, source_shape: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` moved back to the source file's voxel order when they describe the same
    grid (same voxels up to axis order and flips); else unchanged."""
    if source_affine is None or source_shape is None:
        return data, ras_affine
    import nibabel.orientations as nio

    src = np.asarray(source_affine, dtype=float)
    transform = nio.ornt_transform(nio.io_orientation(ras_affine), nio.io_orientation(src))
    moved = nio.apply_orientation(data, transform)
    aff = ras_affine @ nio.inv_ornt_aff(transform, data.shape)
    if tuple(moved.shape) == tuple(int(n) for n in source_shape) and np.allclose(aff, src, atol=1e-3):
        return moved, src
    return data, ras_affine


def world_matrix(
    *,
    scale: Any,
    translate: Any,
    rotate: Any = None,
    shear: Any = None,
    affine: Any = None,
) -> np.ndarray:
    """The full data -> world matrix ``(ndim+1, ndim+1)`` of a napari layer from its transform
    attributes (``layer.affine`` applied after scale/translate/rotate/shear, as napari does)."""
    from napari.utils.transforms import Affine, CompositeAffine

    scale = np.asarray(scale, dtype=float)
    ndim = scale.size
    inner = CompositeAffine(
        scale=scale,
        translate=np.asarray(translate, dtype=float),
        rotate=None if rotate is None else np.asarray(rotate, dtype=float),
        shear=None if shear is None else np.asarray(shear, dtype=float),
        ndim=ndim,
    )
    outer = affine.affine_matrix if hasattr(affine, "affine_matrix") else affine
    outer_m = np.eye(ndim + 1) if outer is None else Affine(affine_matrix=np.asarray(outer, float)).affine_matrix
    return outer_m @ inner.affine_matrix


def layer_world_matrix(layer: Any) -> np.ndarray:
    """:func:`world_matrix` of a napari layer object."""
    return world_matrix(
        scale=layer.scale,
        translate=layer.translate,
        rotate=layer.rotate,
        shear=layer.shear,
        affine=layer.affine,
    )


def ras_affine_of(world: np.ndarray) -> np.ndarray:
    """NIfTI voxel -> RAS+ affine of 3D layer data from its napari data -> world matrix."""
    world = np.asarray(world, dtype=float)
    if world.shape != (4, 4):
        raise ValueError(f"a 3D layer is needed (world matrix 4x4), got {world.shape}")
    return RAS_FROM_WORLD @ world


def sequence_name(layer: Any) -> str:
    """The sequence a layer holds: its NIfTI metadata, else inferred from its name
    (``case_t1c`` -> ``t1ce``), else the layer name."""
    meta = layer.metadata.get(META_KEY) if isinstance(getattr(layer, "metadata", None), dict) else None
    if isinstance(meta, dict) and meta.get("sequence"):
        return str(meta["sequence"])
    from emclip.volume_io import split_sequence_name

    name = str(layer.name)
    return split_sequence_name(name + ".nii")[1] or name


def stack_image_layers(
    layers: Sequence[Any], names: Sequence[str] | None = None, *, atol: float = 1e-3
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Several 3D Image layers (sequences of one patient) as one volume.

    Returns ``(data, names, affine)``: ``data`` ``(Z, Y, X, C)`` float32 (layer data order,
    channel axis last), one name per layer (``names`` or :func:`sequence_name`) and the 4x4
    voxel -> RAS+ affine of the shared grid, ready for
    ``emclip.segment_volume(data, prompts, channel_axis=-1, channels=names, affine=affine)``.
    Raises ``ValueError`` as :func:`check_image_layers`.
    """
    arrays, chosen, affine = check_image_layers(layers, names, atol=atol)
    return stack_channels(arrays), chosen, affine


def stack_channels(arrays: Sequence[Any]) -> np.ndarray:
    """Same-shape 3D arrays -> one float32 ``(Z, Y, X, C)`` copy (call it off the Qt thread)."""
    return np.stack([np.asarray(a, dtype=np.float32) for a in arrays], axis=-1)


def check_image_layers(
    layers: Sequence[Any], names: Sequence[str] | None = None, *, atol: float = 1e-3
) -> tuple[list[Any], list[str], np.ndarray]:
    """Check that Image layers can be stacked as sequences, without copying their data.

    Returns ``(arrays, names, affine)``: each layer's full-resolution array (not copied), one
    name per layer and the shared voxel -> RAS+ affine. Raises ``ValueError`` when a layer is
    not a single-channel 3D image, or when shapes or world transforms differ (say which layer
    and how to fix it).
    """
    from ._layers import layer_image_data

    layers = list(layers)
    if not layers:
        raise ValueError("pick at least one Image layer as a sequence")
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers; give one name per layer")
    arrays, worlds = [], []
    for layer in layers:
        if type(layer).__name__ != "Image":
            raise ValueError(f"layer {layer.name!r} is a {type(layer).__name__} layer; pick Image layers")
        if getattr(layer, "rgb", False):
            raise ValueError(f"layer {layer.name!r} is an RGB image; sequences must be single-channel volumes")
        data = layer_image_data(layer)
        if np.ndim(data) != 3:
            raise ValueError(
                f"layer {layer.name!r} has {np.ndim(data)}D data {tuple(np.shape(data))}; sequences must be 3D volumes"
            )
        arrays.append(data)
        worlds.append(layer_world_matrix(layer))
    first = layers[0]
    for layer, data, world in zip(layers[1:], arrays[1:], worlds[1:]):
        if tuple(np.shape(data)) != tuple(np.shape(arrays[0])):
            raise ValueError(
                f"layer {layer.name!r} has shape {tuple(np.shape(data))} but {first.name!r} has "
                f"{tuple(np.shape(arrays[0]))}; the sequences must share one voxel grid (co-register them first)"
            )
        if not np.allclose(world, worlds[0], atol=atol):
            raise ValueError(
                f"layer {layer.name!r} is placed differently from {first.name!r} (scale/translate/affine "
                "differ); the sequences must share one voxel grid and position"
            )
    chosen = [str(n) for n in names] if names is not None else [sequence_name(layer) for layer in layers]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"two layers have the same sequence name {chosen}; name them, e.g. 'case_flair', 'case_t1ce'")
    return arrays, chosen, ras_affine_of(worlds[0])
