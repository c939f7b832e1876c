"""Segmentation metrics: Dice, HD95 and ASD for binary 2D (or 3D) masks.

Surface distances use exact Euclidean distance transforms (``scipy.ndimage.distance_transform_edt``
with ``sampling=spacing``) evaluated on the *surface* voxels of each mask: the surface is the mask
minus its erosion by the face-connected (cross) structuring element, so a one-pixel-wide object is
all surface.

- ``hd95``: the larger of the two directed 95th percentiles (pred -> target, target -> pred) of
  surface distances (the MedPy / nnU-Net definition).
- ``asd``: *average symmetric surface distance*, the mean of all surface distances of both
  directions pooled: ``(sum d(pred->target) + sum d(target->pred)) / (|S_pred| + |S_target|)``.
- Distances are in the units of ``spacing`` (mm when given, pixels by default).

Empty-mask conventions (decided here; reported, never hidden):

==============================  =====  ===========  ===========
case                            dice   hd95         asd
==============================  =====  ===========  ===========
both empty (correct "absent")   1.0    0.0          0.0
exactly one empty               0.0    NaN          NaN
==============================  =====  ===========  ===========

A distance to an empty set is undefined, so HD95/ASD are NaN there; :func:`summarise` averages
only the defined values and reports how many were undefined (``n_undefined``) so a model that
misses or hallucinates whole structures is visible instead of silently skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool:
        arr = arr != 0
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D mask, got shape {arr.shape}")
    return arr


def _check(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_bool(pred, "pred"), _as_bool(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape")
    return p, t


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim  # type: ignore[arg-type]
    sp = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(sp) != ndim or any(s <= 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing}")
    return sp


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient ``2|P∩T| / (|P| + |T|)``; 1.0 when both are empty."""
    p, t = _check(pred, target)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of ``mask``: foreground voxels with a face-neighbour in the background
    (image borders count as background)."""
    m = _as_bool(mask, "mask")
    if not m.any():
        return m.copy()
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    eroded = ndimage.binary_erosion(m, structure=structure, border_value=0)
    return m & ~eroded


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every surface voxel of ``pred`` to the surface of ``target`` and back.

    Returns ``(d_pred_to_target, d_target_to_pred)`` (1D float arrays). Both masks must be
    non-empty (raises ValueError otherwise).
    """
    p, t = _check(pred, target)
    if not p.any() or not t.any():
        raise ValueError("surface distances need two non-empty masks")
    sp = _spacing(spacing, p.ndim)
    sp_, st = surface(p), surface(t)
    dt_to_t = ndimage.distance_transform_edt(~st, sampling=sp)
    dt_to_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    return dt_to_t[sp_].astype(np.float64), dt_to_p[st].astype(np.float64)


def _distances_unless_empty(
    pred: np.ndarray, target: np.ndarray, spacing: float | Sequence[float] | None
) -> float | tuple[np.ndarray, np.ndarray]:
    """Both ways' surface distances, or the distance itself when a mask is empty: 0 if both
    are, NaN if one is."""
    p, t = _check(pred, target)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    return surface_distances(p, t, spacing)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: float | Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance (see module docstring); 0 if both empty, NaN if one is."""
    d = _distances_unless_empty(pred, target, spacing)
    if isinstance(d, float):
        return d
    a, b = d
    return float(max(np.percentile(a, 95), np.percentile(b, 95)))


def asd(pred: np.ndarray, target: np.ndarray, spacing: float | Sequence[float] | None = None) -> float:
    """Average symmetric surface distance (see module docstring); 0 if both empty, NaN if one is."""
    d = _distances_unless_empty(pred, target, spacing)
    if isinstance(d, float):
        return d
    a, b = d
    return float((a.sum() + b.sum()) / (a.size + b.size))


def compute_metrics(
    pred: np.ndarray, target: np.ndarray, spacing: float | Sequence[float] | None = None
) -> dict[str, float]:
    """``{"dice", "hd95", "asd"}`` for one binary mask pair (distance transforms computed once)."""
    p, t = _check(pred, target)
    if not p.any() and not t.any():
        return {"dice": 1.0, "hd95": 0.0, "asd": 0.0}
    if not p.any() or not t.any():
        return {"dice": 0.0, "hd95": math.nan, "asd": math.nan}
    a, b = surface_distances(p, t, spacing)
    return {
        "dice": dice(p, t),
        "hd95": float(max(np.percentile(a, 95), np.percentile(b, 95))),
        "asd": float((a.sum() + b.sum()) / (a.size + b.size)),
    }


def summarise(values: Iterable[dict[str, float]]) -> dict[str, float | int]:
    """Mean and (population) std over images of each metric, NaNs excluded.

    Returns ``dice``, ``hd95``, ``asd``, ``dice_std``, ``hd95_std``, ``asd_std``, ``n_images`` and
    ``n_undefined`` (images whose HD95/ASD is NaN because exactly one mask was empty). A mean over
    no defined values is NaN.
    """
    rows = list(values)
    out: dict[str, float | int] = {}
    for key in ("dice", "hd95", "asd"):
        arr = np.array([r[key] for r in rows], dtype=np.float64)
        ok = arr[np.isfinite(arr)]
        out[key] = float(ok.mean()) if ok.size else math.nan
        out[f"{key}_std"] = float(ok.std()) if ok.size else math.nan
    out["n_images"] = len(rows)
    out["n_undefined"] = int(sum(1 for r in rows if not math.isfinite(r["hd95"])))
    return out
