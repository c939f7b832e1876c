"""npe2 writer: a Labels layer to a mask TIFF with the prompt names in its metadata.

Each label id becomes one 0/1 mask channel named after its prompt (from ``layer.features``
columns ``index``/``name``, else the layer name), written atomically by
``emclip.io.write_mask_tiff`` so ``emclip.io.read_mask_tiff`` and the CLI read it back.

Nothing is lost when the target exists (``viewer.layers.save(path)`` does not ask before
overwriting, unlike napari's save dialog): the previous file is kept next to it as
``<name>.previous<suffix>`` (replacing an older backup) and a notification says so. The new
file is written completely first; a failure before the final rename leaves every file as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
BACKUP_TAG = ".previous"


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


def backup_path(target: Path) -> Path:
    """Where the previous version of ``target`` is kept: ``a/b.tif`` -> ``a/b.previous.tif``,
    ``a/b.nii.gz`` -> ``a/b.previous.nii.gz``."""
    if target.name.lower().endswith(".nii.gz"):
        return target.with_name(f"{target.name[:-7]}{BACKUP_TAG}{target.name[-7:]}")
    return target.with_name(f"{target.stem}{BACKUP_TAG}{target.suffix}")


def keep_previous(target: Path) -> Path:
    """Copy ``target`` to its backup name atomically (hard link if possible); ``target`` stays.

    The backup appears in one ``os.replace``, so a crash leaves either the older backup or the
    new one, never a partial file.
    """
    backup = backup_path(target)
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.bak{target.suffix}")
    try:
        try:
            os.link(target, tmp)  # same bytes, no copy; the later replace of target unlinks only its name
        except OSError:
            shutil.copy2(target, tmp)
        os.replace(tmp, backup)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return backup


def notify(text: str) -> None:
    log.info(text)
    try:
        from napari.utils.notifications import show_info
    except ImportError:  # used without napari (scripts, tests of the writer alone)
        return
    show_info(text)


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer to ``path`` (``.tif``/``.tiff``); returns ``[path]``.

    An existing file at ``path`` is kept as ``<name>.previous<suffix>`` (see module docstring).
    """
    from emclip.io import atomic_path, write_mask_tiff

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
    backup = None
    # 1. the complete new file under a temporary name; 2. the old file copied to its backup
    # name; 3. the new file renamed over the old one (atomic_path does 1 and 3)
    with atomic_path(target) as tmp:
        write_mask_tiff(tmp, masks, names, metadata=meta)
        if target.is_file():
            backup = keep_previous(target)
    if backup is not None:
        notify(f"{target.name} existed: the previous version was kept as {backup.name}.")
    return [str(target)]
