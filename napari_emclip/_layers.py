"""Turning a segmentation result into napari layers (no Qt: works with a ``ViewerModel``).

The worker thread calls :func:`build_layer_specs` (numpy only); the Qt thread then calls
:func:`plan_placements` and :func:`apply_placements`, which decide, for every output, whether to
add a new layer or to update an earlier, unedited result of the same run settings in place
(through ``Labels.data_setitem``, so the change is undoable). A layer the user has edited is
never overwritten: the new result gets a fresh name such as ``"optic cup [2]"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

META_KEY = "emclip"
"""Key of the plugin's entry in ``layer.metadata`` (role, source, prompts, fingerprint)."""

CLUSTER_LAYER_NAME = "EM clusters"
COMBINED_LAYER_NAME = "EM-CLIP labels"


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """World placement of a layer: what every output copies from its source image."""

    scale: tuple[float, ...]
    translate: tuple[float, ...]
    rotate: np.ndarray
    shear: np.ndarray
    affine: np.ndarray
    units: tuple[Any, ...] | None = None
    axis_labels: tuple[str, ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.scale)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a napari layer constructor."""
        out: dict[str, Any] = {
            "scale": self.scale,
            "translate": self.translate,
            "rotate": self.rotate,
            "shear": self.shear,
            "affine": self.affine,
        }
        if self.units is not None:
            out["units"] = self.units
        if self.axis_labels is not None:
            out["axis_labels"] = self.axis_labels
        return out


def spatial_axes(layer: Any, channel_axis: int | None) -> list[int]:
    """Layer axes kept in the outputs: all of ``layer.ndim`` except a non-RGB channel axis.

    RGB(A) layers keep every axis (their colour axis is not a layer dimension).
    """
    ndim = int(layer.ndim)
    if channel_axis is None or getattr(layer, "rgb", False):
        return list(range(ndim))
    axis = channel_axis % ndim
    return [a for a in range(ndim) if a != axis]


def geometry_of(layer: Any, channel_axis: int | None = None) -> Geometry:
    """Scale, translate, rotate, shear, affine (and units, axis labels) of ``layer``.

    With a (non-RGB) ``channel_axis`` the geometry of the remaining axes is returned, so that a
    mask of shape ``data.shape`` without that axis lands exactly on the image.
    """
    from napari.utils.transforms import CompositeAffine

    keep = spatial_axes(layer, channel_axis)
    composite = CompositeAffine(
        scale=np.asarray(layer.scale, dtype=float),
        translate=np.asarray(layer.translate, dtype=float),
        rotate=np.asarray(layer.rotate, dtype=float),
        shear=np.asarray(layer.shear, dtype=float),
        ndim=int(layer.ndim),
    )
    affine = layer.affine
    if len(keep) != layer.ndim:
        composite = composite.set_slice(keep)
        affine = affine.set_slice(keep)
    units = getattr(layer, "units", None)
    labels = getattr(layer, "axis_labels", None)
    return Geometry(
        scale=tuple(float(s) for s in composite.scale),
        translate=tuple(float(t) for t in composite.translate),
        rotate=np.array(composite.rotate, dtype=float),
        shear=np.array(composite.shear, dtype=float),
        affine=np.array(affine.affine_matrix, dtype=float),
        units=tuple(units[a] for a in keep) if units is not None else None,
        axis_labels=tuple(labels[a] for a in keep) if labels is not None else None,
    )


# --------------------------------------------------------------------------- fingerprints


def fingerprint(array: Any) -> str:
    """A content hash of an array (shape, dtype and bytes); lazy arrays are read in full.

    Used to tell whether a source image or an output layer changed; call it off the Qt thread
    for big data (about 1 GB/s).
    """
    arr = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((arr.shape, arr.dtype.str)).encode())
    digest.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


def layer_image_data(layer: Any) -> Any:
    """The array a run reads from an Image layer (the full-resolution level if multiscale)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


# --------------------------------------------------------------------------- layer specs


@dataclass
class LayerSpec:
    """One output layer, built off the Qt thread.

    ``key`` identifies the output across runs (role + prompt), ``kwargs`` excludes name and
    geometry (both are decided when the layer is placed).
    """

    layer_type: str  # "labels" | "image"
    base_name: str
    data: np.ndarray
    kwargs: dict[str, Any]
    role: str  # "prompt" | "combined" | "clusters" | "probability"
    key: str
    fingerprint: str | None = None


@dataclass
class RunInfo:
    """What a run was: recorded in every output's metadata."""

    source_id: str
    source_name: str
    prompts: list[str]
    model: str
    threshold: float
    modality: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "source_name": self.source_name,
            "prompts": list(self.prompts),
            "model": self.model,
            "threshold": float(self.threshold),
            "modality": self.modality,
            **self.extra,
        }


def _label_dtype(max_id: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"too many labels ({max_id})")


def _metadata(info: RunInfo, role: str, key: str) -> dict[str, Any]:
    return {META_KEY: {**info.as_dict(), "role": role, "key": key}}


def build_layer_specs(
    result: Any,
    info: RunInfo,
    *,
    combined: bool = False,
    clusters: bool = False,
    probabilities: bool = False,
) -> tuple[list[LayerSpec], list[str]]:
    """Layer specs for a ``SegmentationResult`` and the prompts that were not found.

    - Per prompt (default): one Labels layer per *found* prompt, named after it; its pixels
      hold the prompt's 1-based position so that layers get distinct colours;
      ``features`` has columns index, name, score, found.
    - ``combined=True``: one Labels layer (``result.label_image()``, overlaps resolved by
      score) with one feature row per prompt.
    - ``clusters=True``: the EM cluster map (ids from 1), hidden, with a feature column
      ``similarity: <prompt>`` per prompt holding ``cluster_similarity[k, p]``.
    - ``probabilities=True``: one float32 Image layer per prompt, contrast limits 0..1.

    A prompt whose ``found`` flag is False gets no Labels layer (not a false mask) and is
    returned in the second element.
    """
    prompts = [str(p) for p in result.prompts]
    masks = np.asarray(result.masks)
    found = np.asarray(result.found, dtype=bool).reshape(-1)
    scores = np.asarray(result.scores, dtype=float).reshape(-1)
    not_found = [p for p, f in zip(prompts, found) if not f]
    specs: list[LayerSpec] = []

    if probabilities and getattr(result, "probabilities", None) is not None:
        probs = np.asarray(result.probabilities)
        for p, prompt in enumerate(prompts):
            key = f"probability:{prompt.casefold()}"
            specs.append(
                LayerSpec(
                    layer_type="image",
                    base_name=f"{prompt} probability",
                    data=np.asarray(probs[p], dtype=np.float32),
                    kwargs={
                        "colormap": "magma",
                        "contrast_limits": (0.0, 1.0),
                        "blending": "additive",
                        "opacity": 0.6,
                        "metadata": _metadata(info, "probability", key),
                    },
                    role="probability",
                    key=key,
                )
            )

    index = np.arange(1, len(prompts) + 1)
    features_all = {
        "index": index,
        "name": prompts,
        "score": scores,
        "found": found,
    }
    if combined:
        data = np.asarray(result.label_image())
        data = data.astype(_label_dtype(max(len(prompts), int(data.max(initial=0)))), copy=False)
        key = "combined:" + "|".join(p.casefold() for p in prompts)
        specs.append(
            LayerSpec(
                layer_type="labels",
                base_name=COMBINED_LAYER_NAME,
                data=data,
                kwargs={"features": features_all, "metadata": _metadata(info, "combined", key)},
                role="combined",
                key=key,
                fingerprint=fingerprint(data),
            )
        )
    else:
        dtype = _label_dtype(len(prompts))
        for p, prompt in enumerate(prompts):
            if not found[p]:
                continue
            label_id = p + 1
            data = np.where(masks[p], dtype.type(label_id), dtype.type(0)).astype(dtype, copy=False)
            key = f"prompt:{prompt.casefold()}"
            specs.append(
                LayerSpec(
                    layer_type="labels",
                    base_name=prompt,
                    data=data,
                    kwargs={
                        "features": {
                            "index": [label_id],
                            "name": [prompt],
                            "score": [float(scores[p])],
                            "found": [True],
                        },
                        "metadata": _metadata(info, "prompt", key),
                    },
                    role="prompt",
                    key=key,
                    fingerprint=fingerprint(data),
                )
            )

    if clusters and getattr(result, "cluster_map", None) is not None:
        cmap = np.asarray(result.cluster_map)
        sim = np.asarray(result.cluster_similarity, dtype=float)
        n_clusters = int(max(sim.shape[0] if sim.ndim == 2 else 0, cmap.max(initial=0)))
        ids = np.arange(1, n_clusters + 1)
        features: dict[str, Any] = {"index": ids}
        counts = np.bincount(cmap.reshape(-1).astype(np.int64), minlength=n_clusters + 1)
        features["pixels"] = counts[1 : n_clusters + 1]
        for p, prompt in enumerate(prompts):
            col = np.full(n_clusters, np.nan)
            if sim.ndim == 2 and p < sim.shape[1]:
                col[: sim.shape[0]] = sim[:, p]
            features[f"similarity: {prompt}"] = col
        if sim.ndim == 2 and sim.size:
            best = np.argmax(sim, axis=1)
            features["closest prompt"] = [prompts[b] for b in best] + [""] * (
                n_clusters - len(best)
            )
        data = cmap.astype(_label_dtype(max(n_clusters, 1)), copy=False)
        key = "clusters"
        specs.append(
            LayerSpec(
                layer_type="labels",
                base_name=CLUSTER_LAYER_NAME,
                data=data,
                kwargs={
                    "features": features,
                    "visible": False,
                    "opacity": 0.5,
                    "metadata": _metadata(info, "clusters", key),
                },
                role="clusters",
                key=key,
                fingerprint=fingerprint(data),
            )
        )
    return specs, not_found


# --------------------------------------------------------------------------- placement


@dataclass
class Placement:
    """Where one spec goes: a new layer called ``name``, or in place into ``target``."""

    spec: LayerSpec
    name: str
    target: Any | None = None

    @property
    def is_update(self) -> bool:
        return self.target is not None


def unique_name(base: str, taken: Iterable[str]) -> str:
    """``base`` if free, else ``"base [2]"``, ``"base [3]"``, ... (first free)."""
    used = set(taken)
    if base not in used:
        return base
    n = 2
    while f"{base} [{n}]" in used:
        n += 1
    return f"{base} [{n}]"


def is_edited(layer: Any) -> bool:
    """True if a plugin-made layer's data no longer matches what the plugin last wrote.

    Layers the plugin did not make count as edited (they are never written to).
    """
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    if not meta or not meta.get("fingerprint"):
        return True
    return fingerprint(layer.data) != meta["fingerprint"]


def _reusable(layer: Any, spec: LayerSpec, source_id: str) -> bool:
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    if not meta or meta.get("key") != spec.key or meta.get("source_id") != source_id:
        return False
    if spec.layer_type == "labels":
        if type(layer).__name__ != "Labels" or getattr(layer, "multiscale", False):
            return False
        data = layer.data
        if tuple(data.shape) != spec.data.shape or np.dtype(data.dtype) != spec.data.dtype:
            return False
        return not is_edited(layer)
    return type(layer).__name__ == "Image" and tuple(layer.data.shape) == spec.data.shape


def plan_placements(
    specs: Sequence[LayerSpec], layers: Sequence[Any], source_id: str
) -> list[Placement]:
    """Decide, for each spec, between a new layer and an in-place update.

    An existing layer is updated only if the plugin made it from the same source image for the
    same output (prompt), it has the same shape and dtype, and the user has not edited it since
    (its data still hashes to the fingerprint recorded when it was written). Otherwise the spec
    becomes a new layer with a unique name.
    """
    taken = [layer.name for layer in layers]
    by_name = {layer.name: layer for layer in layers}
    used_targets: set[int] = set()
    out: list[Placement] = []
    for spec in specs:
        target = by_name.get(spec.base_name)
        if (
            target is not None
            and id(target) not in used_targets
            and _reusable(target, spec, source_id)
        ):
            used_targets.add(id(target))
            out.append(Placement(spec, target.name, target))
            continue
        name = unique_name(spec.base_name, taken)
        taken.append(name)
        out.append(Placement(spec, name))
    return out


MAIN_ROLES = ("prompt", "combined")
"""Roles of the visible result layers (what the user waits for); the others are optional."""


def placement_batches(
    placements: Sequence[Placement], max_pixels: int = 8_000_000
) -> list[list[Placement]]:
    """Group placements into the batches added per event-loop turn.

    The visible results (``MAIN_ROLES``) come first, grouped while their pixels add up to at
    most ``max_pixels`` (each batch holds at least one); then every optional layer
    (probability maps, cluster map) in a batch of its own.
    """
    main = [p for p in placements if p.spec.role in MAIN_ROLES]
    extra = [p for p in placements if p.spec.role not in MAIN_ROLES]
    batches: list[list[Placement]] = []
    size = 0
    for placement in main:
        n = int(placement.spec.data.size)
        if batches and size + n <= max_pixels:
            batches[-1].append(placement)
            size += n
        else:
            batches.append([placement])
            size = n
    return batches + [[p] for p in extra]


def _stamp(metadata: dict[str, Any], spec: LayerSpec) -> dict[str, Any]:
    meta = dict(metadata)
    entry = dict(meta.get(META_KEY, {}))
    entry["fingerprint"] = spec.fingerprint
    meta[META_KEY] = entry
    return meta


def apply_placements(
    viewer: Any,
    placements: Sequence[Placement],
    geometry: Geometry,
    insert_at: int | None = None,
) -> list[Any]:
    """Add or update layers in ``viewer`` (Qt thread); returns the layers written.

    New layers carry ``geometry`` and are appended (or inserted at ``insert_at``). Updates of
    Labels layers go through ``data_setitem`` (one undo step per layer: ``layer.undo()``
    restores the previous result); geometry attributes are only set where they differ (each
    assignment re-transforms the layer's visual).
    """
    from napari.layers import Layer

    written = []
    for placement in placements:
        spec = placement.spec
        kwargs = dict(spec.kwargs)
        kwargs["metadata"] = _stamp(kwargs.get("metadata", {}), spec)
        if placement.target is None:
            layer = Layer.create(
                spec.data, {"name": placement.name, **kwargs, **geometry.kwargs()}, spec.layer_type
            )
            if spec.layer_type == "labels" and spec.role == "prompt":
                layer.selected_label = int(spec.kwargs["features"]["index"][0])
            if insert_at is None:
                viewer.layers.append(layer)
            else:
                viewer.layers.insert(insert_at, layer)
            written.append(layer)
            continue
        layer = placement.target
        if spec.layer_type == "labels":
            changed = np.nonzero(np.asarray(layer.data) != spec.data)
            if changed[0].size:
                layer.data_setitem(changed, spec.data[changed])
            layer.features = kwargs.get("features", {})
        else:
            layer.data = spec.data
        layer.metadata = kwargs["metadata"]
        for attr, value in geometry.kwargs().items():
            if attr in ("units", "axis_labels"):
                continue
            current = getattr(layer, attr)
            if attr == "affine":
                current = current.affine_matrix
            if np.shape(current) != np.shape(value) or not np.allclose(current, value):
                setattr(layer, attr, value)
        written.append(layer)
    return written
