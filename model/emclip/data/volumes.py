"""NIfTI volume datasets sliced to 2D along a named axis.

Layout (``channels`` and ``labels`` come from dataset.yaml)::

    <dataset>/<case>/<case>_<channel>.nii.gz    one file per sequence, e.g. _flair, _t1ce
    <dataset>/<case>/<case>_<labels>.nii.gz     label volume on the same voxel grid (default _seg)

``axis`` is ``"axial"``, ``"coronal"``, ``"sagittal"`` (found from the affine's orientation codes,
so it is right whatever the voxel order) or a voxel axis index 0..2. Each 2D slice is one grey
image of the chosen ``channel`` (default: the first in dataset.yaml). ``channel="all"`` reads every
sequence of dataset.yaml into one ``(H, W, C)`` slice, each sequence normalised to [0, 1] with its
own foreground window over the whole case (:func:`emclip.sequences.foreground_window`, the same
rule as ``segment_stack(..., channels=...)``); the sample's ``channels`` names them (for models
with modality fusion).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .folder import Sample
from .format import VOLUME_SUFFIXES, DatasetSpec, read_meta, read_spec

AXIS_CODES = {"axial": ("S", "I"), "coronal": ("A", "P"), "sagittal": ("L", "R")}


def _find_file(case_dir: Path, stem: str) -> Path:
    for suffix in VOLUME_SUFFIXES:
        p = case_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DatasetError(f"{case_dir / (stem + '.nii.gz')}: missing (every case needs one file per channel and a label file)")


def _load(path: Path, dtype) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype) if dtype is not None else np.asarray(img.dataobj)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def voxel_axis(axis: str | int, affine: np.ndarray) -> int:
    """Voxel axis index of a named anatomical ``axis`` (or the index itself)."""
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        if not 0 <= int(axis) <= 2:
            raise DatasetError(f"axis {axis} out of range: use 0, 1, 2 or axial/coronal/sagittal")
        return int(axis)
    name = str(axis).lower()
    if name not in AXIS_CODES:
        raise DatasetError(f"unknown axis {axis!r}: use axial, coronal, sagittal or a voxel index 0..2")
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    for i, code in enumerate(codes):
        if code in AXIS_CODES[name]:
            return i
    raise DatasetError(f"cannot find the {name} axis from the orientation codes {codes}")


class VolumeDataset:
    """2D slices of the NIfTI cases of one dataset; ``ds[i]`` is a :class:`~emclip.data.folder.Sample`.

    Parameters: ``axis`` (default "axial"), ``channel`` (default first of dataset.yaml channels;
    "all": every sequence, see the module docstring),
    ``cases`` (default all case folders, sorted), ``only_labelled`` (keep only slices with some
    label, default False; slices with a constant image are always dropped), ``normalise``
    ("volume": one robust window per case, as :func:`emclip.inference.segment_stack` does, default;
    "slice": per-slice window as :func:`emclip.inference.segment` on a single 2D slice),
    ``cache_size`` (decoded cases kept in memory, default 8).
    """

    def __init__(
        self,
        root: str | Path | DatasetSpec,
        *,
        axis: str | int = "axial",
        channel: str | None = None,
        cases: Sequence[str] | None = None,
        only_labelled: bool = False,
        normalise: str = "volume",
        cache_size: int = 8,
    ):
        self.spec = root if isinstance(root, DatasetSpec) else read_spec(root)
        if self.spec.kind != "volume":
            raise DatasetError(f"{self.spec.root / 'dataset.yaml'}: name the sequences in 'channels' to read NIfTI volumes")
        if channel is None:
            channel = self.spec.channels[0]
        self.channels = tuple(self.spec.channels) if channel == "all" else None
        if channel not in self.spec.channels and self.channels is None:
            raise DatasetError(f"channel {channel!r} not in dataset.yaml channels {list(self.spec.channels)}")
        if normalise not in ("slice", "volume"):
            raise DatasetError(f"normalise must be 'slice' or 'volume', got {normalise!r}")
        self.axis, self.channel, self.normalise = axis, channel, normalise
        self.only_labelled = only_labelled
        root = self.spec.root
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if cases is None:
            cases = found
        else:
            missing = [c for c in cases if c not in found]
            if missing:
                raise DatasetError(f"{root}: case folders not found: {missing[:5]}")
        if not cases:
            raise DatasetError(f"{root}: no case folders (<case>/<case>_<channel>.nii.gz) found")
        self.cases = list(cases)
        self.meta = read_meta(root)
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._cache_size = max(1, int(cache_size))
        self._windows: dict[str, tuple[float, float]] = {}
        self.index: list[tuple[str, int]] = []
        for case in self.cases:
            image, labels, _, _ = self._case(case)
            ax = self._axis_of(case)
            if image.ndim == 4:
                image = image[..., 0]
            img_m = np.moveaxis(image, ax, 0).reshape(image.shape[ax], -1)
            lab_m = np.moveaxis(labels, ax, 0).reshape(labels.shape[ax], -1)
            keep = img_m.max(axis=1) > img_m.min(axis=1)
            if only_labelled:
                keep &= lab_m.max(axis=1) > 0
            self.index += [(case, int(k)) for k in np.flatnonzero(keep)]
        self.ids = [f"{c}_{self._axis_name()}{k:03d}" for c, k in self.index]

    def _axis_name(self) -> str:
        return self.axis if isinstance(self.axis, str) else f"ax{self.axis}"

    def _case(self, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
        if case in self._cache:
            self._cache.move_to_end(case)
            return self._cache[case]
        case_dir = self.spec.root / case
        names = self.channels or (self.channel,)
        paths = [_find_file(case_dir, f"{case}_{name}") for name in names]
        img_path = paths[0]
        lab_path = _find_file(case_dir, f"{case}_{self.spec.labels}")
        image, affine, zooms = _load(img_path, np.float32)
        labels, _, _ = _load(lab_path, None)
        if self.channels is not None:
            from ..sequences import foreground_window, normalise_sequence

            vols = [image] + [_load(p, np.float32)[0] for p in paths[1:]]
            for p, v in zip(paths[1:], vols[1:]):
                if v.shape != image.shape:
                    raise DatasetError(f"{p}: volume {v.shape} does not match {img_path.name} {image.shape}")
            image = np.stack([normalise_sequence(v, foreground_window(v)) for v in vols], axis=-1)
        if image.shape[:3] != labels.shape:
            raise DatasetError(f"{lab_path}: label volume {labels.shape} does not match {img_path.name} {image.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.mod(labels, 1) == 0):
                raise DatasetError(f"{lab_path}: label values must be integers")
            labels = labels.astype(np.int32)
        self.spec.check_values(labels, lab_path)
        entry = (image, labels, affine, zooms)
        self._cache[case] = entry
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def _axis_of(self, case: str) -> int:
        return voxel_axis(self.axis, self._case(case)[2])

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, indices: Sequence[int]) -> VolumeDataset:
        """A dataset restricted to the cases of the given samples (whole cases, never single slices)."""
        cases = sorted({self.index[i][0] for i in indices})
        return VolumeDataset(
            self.spec, axis=self.axis, channel="all" if self.channels else self.channel, cases=cases, only_labelled=self.only_labelled,
            normalise=self.normalise, cache_size=self._cache_size,
        )

    def group_of(self, i: int) -> str:
        return self.index[i][0]

    def case_volume(self, case: str) -> tuple[np.ndarray, np.ndarray, int, tuple[float, ...]]:
        """``(image, labels, voxel_axis, zooms)`` of a whole case (3D arrays, voxel order)."""
        image, labels, affine, zooms = self._case(case)
        return image, labels, voxel_axis(self.axis, affine), zooms

    def case_sequences(self, case: str, names: Sequence[str]) -> np.ndarray:
        """``float32 (I, J, K, len(names))``: the case's sequence files as stored (not normalised:
        ``segment_stack(..., channels=names)`` normalises each sequence itself)."""
        shape = self._case(case)[1].shape
        vols = []
        for name in names:
            path = _find_file(self.spec.root / case, f"{case}_{name}")
            vol = _load(path, np.float32)[0]
            if vol.shape != tuple(shape):
                raise DatasetError(f"{path}: volume {vol.shape} does not match the label volume {tuple(shape)}")
            vols.append(vol)
        return np.stack(vols, axis=-1)

    def official_split_of(self, i: int) -> str | None:
        return self.meta.get(self.index[i][0], {}).get("official_split") or None

    def __getitem__(self, i: int) -> Sample:
        case, k = self.index[i]
        image, labels, affine, zooms = self._case(case)
        ax = voxel_axis(self.axis, affine)
        img2d = np.ascontiguousarray(np.take(image, k, axis=ax))
        lab2d = np.ascontiguousarray(np.take(labels, k, axis=ax))
        spacing = tuple(z for j, z in enumerate(zooms) if j != ax)
        window = None
        if self.channels is not None:  # already normalised per sequence in _case
            return Sample(image=img2d, labels=lab2d, id=self.ids[i], spec=self.spec,
                          spacing=(float(spacing[0]), float(spacing[1])), channels=self.channels)
        if self.normalise == "volume":
            window = self._windows.get(case)
            if window is None:
                from ..preprocess import robust_range

                window = self._windows[case] = robust_range(image)
        return Sample(image=img2d, labels=lab2d, id=self.ids[i], spec=self.spec,
                      spacing=(float(spacing[0]), float(spacing[1])), intensity_range=window)
