"""npe2 writer: a Labels layer to a mask TIFF with the prompt names in its metadata.

Each label id becomes one 0/1 mask channel named after its prompt (from ``layer.features``
columns ``index``/``name``, else the layer name), written atomically by
``emclip.io.write_mask_tiff`` so ``emclip.io.read_mask_tiff`` and the CLI read it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")


def _feature_columns(features: Any) -> tuple[list[int], list[str]]:
    if features is None:
        return [], []
    try:
        index = [int(v) for v in features["index"]]
        names = [str(v) for v in features["name"]]
    except (KeyError, TypeError, ValueError):
        return [], []
    return (index, names) if len(index) == len(names) else ([], [])


def label_masks(data: Any, attributes: dict[str, Any]) -> tuple[np.ndarray, list[str], list[int]]:
    """Split a label image into ``(P, *data.shape)`` uint8 masks, their names and label ids.

    Ids named in the features come first (in feature order, even if empty); other ids present
    in the data follow as ``"label N"``. A layer with no labels at all gives one empty mask
    named after the layer.
    """
    labels = np.asarray(data)
    if labels.ndim not in (2, 3):
        raise ValueError(
            f"can save 2D or 3D labels as a mask TIFF, got {labels.ndim}D data of shape {labels.shape}"
        )
    ids, names = _feature_columns(attributes.get("features"))
    present = [int(v) for v in np.unique(labels) if v != 0]
    layer_name = str(attributes.get("name") or "mask")
    if not ids and len(present) == 1:
        ids, names = present, [layer_name]
    for value in present:
        if value not in ids:
            ids.append(value)
            names.append(f"label {value}")
    if not ids:
        return np.zeros((1, *labels.shape), np.uint8), [layer_name], [1]
    masks = np.stack([(labels == i) for i in ids]).astype(np.uint8)
    return masks, names, ids


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer to ``path`` (``.tif``/``.tiff``); returns ``[path]``."""
    from emclip.io import write_mask_tiff

    target = Path(path)
    if target.suffix.lower() not in TIFF_SUFFIXES:
        target = target.with_suffix(".tif")
    masks, names, ids = label_masks(data, attributes)
    meta: dict[str, Any] = {
        "label_ids": ids,
        "layer_name": attributes.get("name"),
        "scale": attributes.get("scale"),
        "translate": attributes.get("translate"),
    }
    emclip_meta = (attributes.get("metadata") or {}).get("emclip")
    if isinstance(emclip_meta, dict):
        meta["run"] = {
            k: v for k, v in emclip_meta.items() if k not in ("fingerprint", "source_id")
        }
    write_mask_tiff(target, masks, names, metadata=meta)
    return [str(target)]
