""":func:`segment_volume`: NIfTI volumes (one or several sequences) slice by slice along an
anatomical axis, on top of :func:`emclip.inference.segment_stack`.

The result keeps the voxel grid of the input (``masks [P, I, J, K]`` in the file's voxel order),
so :func:`emclip.volume_io.write_volume` saves each mask with the source affine.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .callbacks import CancelCallback, ProgressCallback
from .errors import InvalidArgumentError, InvalidImageError
from .volume_io import Volume, check_affine, read_sequences, read_volume, voxel_axis


def _as_volumes(
    source: Any, channels: Sequence[str] | None, channel_axis: int | None
) -> tuple[np.ndarray, list[str] | None, np.ndarray | None, Volume | None]:
    """``(data, names, affine, meta)``: data ``(I, J, K)`` for one sequence or ``(I, J, K, C)``
    (channel axis last) for several; names None for one unnamed sequence."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        data, names, meta = read_sequences(source, channels)
        return _squeeze(data, names, meta.affine, meta)
    if isinstance(source, (list, tuple)):
        if not source:
            raise InvalidArgumentError("no volumes given; pass a Volume, a path, an array or a list of them")
        if all(isinstance(s, (str, os.PathLike, Volume)) for s in source):
            data, names, meta = read_sequences(list(source), channels)
            return _squeeze(data, names, meta.affine, meta)
        arrays = [np.asarray(s.data if isinstance(s, Volume) else s) for s in source]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1 or arrays[0].ndim != 3:
            raise InvalidImageError(
                f"the sequences must be 3D arrays of one shape, got shapes {[a.shape for a in arrays]}"
            )
        names = list(channels) if channels is not None else [f"channel {i + 1}" for i in range(len(arrays))]
        if len(names) != len(arrays):
            raise InvalidArgumentError(f"{len(names)} channel names for {len(arrays)} volumes; give one name per volume")
        data = np.stack([a.astype(np.float32, copy=False) for a in arrays], axis=-1)
        return _squeeze(data, names, None, None)
    if isinstance(source, (str, os.PathLike)):
        source = read_volume(source)
    if isinstance(source, Volume):
        names = list(channels) if channels is not None else ([source.sequence] if source.sequence else None)
        if names is not None and len(names) != 1:
            raise InvalidArgumentError(f"one volume but {len(names)} channel names {names}")
        return source.data, names, source.affine, source
    arr = np.asarray(source)
    if arr.ndim == 3 and channel_axis is None:
        names = list(channels) if channels is not None else None
        if names is not None and len(names) != 1:
            raise InvalidArgumentError(f"a 3D volume has one sequence but {len(names)} channel names were given")
        return arr, names, None, None
    if arr.ndim == 4:
        if channel_axis is None:
            raise InvalidImageError(
                f"a 4D array {arr.shape} needs channel_axis=... (the axis holding the sequences)"
            )
        data = np.moveaxis(arr, channel_axis, -1)
        n = data.shape[-1]
        names = list(channels) if channels is not None else [f"channel {i + 1}" for i in range(n)]
        if len(names) != n:
            raise InvalidArgumentError(f"{len(names)} channel names for {n} sequences on axis {channel_axis}")
        return _squeeze(data, names, None, None)
    raise InvalidImageError(f"expected a 3D volume (I, J, K) or 4D with channel_axis, got shape {arr.shape}")


def _squeeze(data: np.ndarray, names: list[str], affine: Any, meta: Volume | None):
    if data.shape[-1] == 1:
        return data[..., 0], names, affine, meta
    return data, names, affine, meta


def supports_channels() -> bool:
    """True if :func:`emclip.inference.segment_stack` takes ``channels=`` (sequence fusion)."""
    from .inference import segment_stack

    return "channels" in inspect.signature(segment_stack).parameters


def segment_volume(
    volumes: Any,
    prompts: str | Sequence[str],
    model: Any = None,
    *,
    channels: Sequence[str] | None = None,
    axis: str | int = "axial",
    affine: Any = None,
    channel_axis: int | None = None,
    modality: str | None = None,
    threshold: float = 0.5,
    device: Any = None,
    tile_size: int | None = None,
    min_area: int | None = None,
    batch_size: int = 4,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    mirror: bool | None = None,
) -> Any:
    """Segment a 3D volume slice by slice along an anatomical ``axis``.

    ``volumes``: a :class:`~emclip.volume_io.Volume`, a NIfTI path, a 3D array, a case folder, or
    a list of these (several sequences of one patient on one grid), or a 4D array with
    ``channel_axis``. ``channels``: sequence names (default: from the file names); several
    sequences need a model with sequence fusion. ``axis``: "axial" (default), "coronal",
    "sagittal" (found from the affine's orientation codes) or a voxel axis 0..2. ``affine``:
    4x4 voxel -> RAS+ mm, overrides the volume's (needed for named axes on plain arrays).
    ``progress(done, total)`` counts slices; ``cancel()`` is polled between slice batches and
    raises :class:`emclip.Cancelled`. Other arguments as in :func:`emclip.segment_stack`.

    Returns a ``SegmentationResult`` with ``masks [P, I, J, K]`` on the input's voxel grid;
    ``info`` adds ``affine`` (list of lists or None), ``axis`` (the name or index asked),
    ``voxel_axis`` and ``channels``.
    """
    from .inference import segment_stack

    data, names, vol_affine, meta = _as_volumes(volumes, channels, channel_axis)
    if affine is not None:
        vol_affine = check_affine(affine)
    ax = voxel_axis(axis, vol_affine)
    options: dict[str, Any] = {
        "modality": modality,
        "threshold": threshold,
        "device": device,
        "tile_size": tile_size,
        "min_area": min_area,
        "batch_size": batch_size,
        "progress": progress,
        "cancel": cancel,
        "mirror": mirror,
    }
    if names is not None and supports_channels():
        # named sequences: per-sequence windows + the model's fusion (a model without fusion takes one)
        cax = -1 if data.ndim == 4 else None
        result = segment_stack(data, prompts, model, axis=ax, channel_axis=cax, channels=names, **options)
    elif data.ndim == 4:
        raise InvalidArgumentError(
            f"{data.shape[-1]} sequences {names} were given, but this emclip cannot fuse sequences; "
            f"pass one sequence (e.g. channels=[{names[0]!r}] with a case folder, or one file)"
        )
    else:
        result = segment_stack(data, prompts, model, axis=ax, **options)
    result.info.update(
        {
            "affine": None if vol_affine is None else np.asarray(vol_affine, dtype=float).tolist(),
            "axis": axis,
            "voxel_axis": ax,
            "channels": names,
            "source": None if meta is None else meta.name,
        }
    )
    return result
