"""2D dataset folders: ``<dataset>/images/<id>.*`` + ``<dataset>/masks/<id>.*`` + ``dataset.yaml``.

:class:`FolderDataset` yields raw :class:`Sample` objects (image as read, integer label map, the
dataset's :class:`~emclip.data.format.DatasetSpec`); training and evaluation turn them into
network inputs with the same preprocessing as inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .format import IMAGE_SUFFIXES, MASK_SUFFIXES, DatasetSpec, read_meta, read_spec


@dataclass
class Sample:
    """One 2D image with its labels.

    ``image``: as stored, ``(H, W)`` or ``(H, W, C)``; ``labels``: ``(H, W)`` integer label map
    (None only for an image without a mask in a dataset opened with ``allow_unlabelled=True``);
    ``spacing``: (row, col) pixel size in mm when known, else None (distances are then in pixels);
    ``intensity_range``: a fixed (lo, hi) window for :func:`emclip.preprocess.to_float_rgb`, or None
    for the per-image robust window.
    """

    image: np.ndarray
    labels: np.ndarray | None
    id: str
    spec: DatasetSpec
    spacing: tuple[float, float] | None = None
    intensity_range: tuple[float, float] | None = None
    channels: tuple[str, ...] | None = None
    """Multi-sequence volume slices only: sequence names of the channels of ``image (H, W, C)``,
    which is then already normalised per sequence to [0, 1] (emclip.sequences)."""

    def structure_masks(self) -> np.ndarray:
        """``[P, H, W]`` bool, one mask per structure of ``spec`` (union of its values)."""
        return self.spec.structure_masks(self.labels)


def read_image_file(path: Path) -> np.ndarray:
    """Read a png/jpg/bmp (Pillow) or tif (tifffile) image as a numpy array."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            return np.asarray(im)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot be read as an image ({exc})") from exc


def read_mask_file(path: Path) -> np.ndarray:
    """Read a label map; palette PNGs keep their indices, equal-channel RGB masks are reduced to 2D."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot be read as a mask ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DatasetError(
                f"{path}: the mask is a colour image; save it as a single-channel label map (one integer per pixel)"
            )
        arr = rgb[..., 0]
    if arr.ndim != 2:
        raise DatasetError(f"{path}: a mask must be a 2D label map, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise DatasetError(f"{path}: mask values must be integers, got non-integer {arr.dtype} values")
        arr = arr.astype(np.int64)
    return arr


def _index_folder(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in suffixes:
            if what == "mask" and p.suffix.lower() in (".jpg", ".jpeg"):
                raise DatasetError(f"{p}: masks must be lossless (png or tif); JPEG changes label values")
            continue
        if p.stem in out:
            raise DatasetError(f"{p}: two {what} files share the stem {p.stem!r} ({out[p.stem].name}); keep one")
        out[p.stem] = p
    return out


class FolderDataset:
    """Image/mask pairs of one dataset folder; ``ds[i]`` is a :class:`Sample`.

    ``ids`` restricts to those stems (default: all pairs, sorted). Pairing is checked at
    construction (a missing mask or image raises :class:`DatasetError` naming the file); shapes
    and mask values are checked on every read. ``allow_unlabelled=True`` keeps images that have no
    mask (for semi-supervised training): their samples have ``labels=None`` and
    :meth:`has_mask` is False.
    """

    def __init__(self, root: str | Path | DatasetSpec, ids: Sequence[str] | None = None, *,
                 allow_unlabelled: bool = False):
        self.spec = root if isinstance(root, DatasetSpec) else read_spec(root)
        if self.spec.kind != "folder":
            raise DatasetError(
                f"{self.spec.root}: dataset.yaml names 'channels', so it is a volume dataset; "
                "use emclip.data.volumes.VolumeDataset"
            )
        root = self.spec.root
        images = _index_folder(root / "images", IMAGE_SUFFIXES, "image")
        masks = _index_folder(root / "masks", MASK_SUFFIXES, "mask")
        for stem, p in images.items():
            if stem not in masks and not allow_unlabelled:
                raise DatasetError(f"{p}: no mask with the same name in {root / 'masks'} (expected {stem}.png); "
                                   "images without masks are only used by semi-supervised training")
        for stem, p in masks.items():
            if stem not in images:
                raise DatasetError(f"{p}: no image with the same name in {root / 'images'}")
        if not images:
            raise DatasetError(f"{root / 'images'}: no images found ({', '.join(IMAGE_SUFFIXES)})")
        all_ids = sorted(images)
        if ids is not None:
            missing = [i for i in ids if i not in images]
            if missing:
                raise DatasetError(f"{root}: ids not found in images/: {missing[:5]}")
            all_ids = list(ids)
        self.ids: list[str] = all_ids
        self._images = images
        self._masks = masks
        self.allow_unlabelled = allow_unlabelled
        self.meta = read_meta(root)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> FolderDataset:
        """A dataset over ``[self.ids[i] for i in indices]``."""
        return FolderDataset(self.spec, [self.ids[i] for i in indices], allow_unlabelled=self.allow_unlabelled)

    def image_path(self, i: int) -> Path:
        return self._images[self.ids[i]]

    def mask_path(self, i: int) -> Path:
        return self._masks[self.ids[i]]

    def has_mask(self, i: int) -> bool:
        """False for an image without a mask (only possible with ``allow_unlabelled=True``)."""
        return self.ids[i] in self._masks

    def group_of(self, i: int) -> str:
        """Split group of sample ``i``: meta.csv ``patient``, else ``case``, else the id itself."""
        row = self.meta.get(self.ids[i], {})
        return row.get("patient") or row.get("case") or self.ids[i]

    def official_split_of(self, i: int) -> str | None:
        """meta.csv ``official_split`` of sample ``i`` (None when there is no such column)."""
        return self.meta.get(self.ids[i], {}).get("official_split") or None

    def spacing_of(self, i: int) -> tuple[float, float] | None:
        row = self.meta.get(self.ids[i], {})
        value = row.get("pixel_mm") or row.get("spacing_mm")
        try:
            return (float(value), float(value)) if value else None
        except ValueError:
            return None

    def __getitem__(self, i: int) -> Sample:
        if not self.has_mask(i):
            return Sample(image=read_image_file(self.image_path(i)), labels=None, id=self.ids[i], spec=self.spec,
                          spacing=self.spacing_of(i))
        img_path, mask_path = self.image_path(i), self.mask_path(i)
        image = read_image_file(img_path)
        labels = read_mask_file(mask_path)
        if image.shape[:2] != labels.shape:
            raise DatasetError(
                f"{mask_path}: mask is {labels.shape[0]}x{labels.shape[1]} but image {img_path.name} is "
                f"{image.shape[0]}x{image.shape[1]}; masks must have the image's height and width"
            )
        self.spec.check_values(labels, mask_path)
        return Sample(image=image, labels=labels, id=self.ids[i], spec=self.spec, spacing=self.spacing_of(i))


def open_dataset(root: str | Path | DatasetSpec, *, allow_unlabelled: bool = False,
                 **volume_options) -> FolderDataset | VolumeDataset:  # noqa: F821
    """Open a dataset folder as a :class:`FolderDataset` or, when dataset.yaml names ``channels``,
    a :class:`~emclip.data.volumes.VolumeDataset` (``volume_options``: axis, channel, ...).
    ``allow_unlabelled`` (2D folders only, default False): keep images without a mask."""
    spec = root if isinstance(root, DatasetSpec) else read_spec(root)
    if spec.kind == "volume":
        from .volumes import VolumeDataset

        return VolumeDataset(spec, **volume_options)
    return FolderDataset(spec, allow_unlabelled=allow_unlabelled)
