"""Whole fundus photographs: find the optic disc, then segment disc and cup at full resolution.

Clinicians load whole photographs (a 30-50 degree field, disc 1-5 % of the image), but the
model segments best at the scale of the optic-nerve-head crops it was trained on (disc about
18 % of the crop). :func:`segment_fundus` therefore works coarse to fine:

1. **Locate** (one low-resolution pass): :func:`emclip.segment` on the image shrunk to at most
   ``LOCATE_SIDE_FACTOR * model.image_size`` pixels (1024 for the 256 px default model, the
   size of the whole photographs it was trained on), with the user's prompts plus
   ``"optic disc"``. The disc is the connected component of ``p(optic disc) > locate_threshold``
   with the largest probability mass times relative brightness squared
   (:func:`disc_from_probability`, :data:`BRIGHTNESS_POWER`: the disc is bright, the fovea
   that a model trained on disc-centred photographs may take for it is dark).
2. **Decide** (:func:`is_whole_photograph`): a disc covering less than
   :data:`WHOLE_MAX_AREA_FRACTION` of the image (and narrower than
   :data:`WHOLE_MAX_DIAMETER_FRACTION` of its short side) means a whole photograph; anything
   larger is already a disc crop (Drishti-GS ROIs: 12-31 %, RIM-ONE: 35-78 %) and the
   low-resolution pass *is* the answer.
3. **Crop** a square of side ``crop_ratio * disc diameter`` (:data:`CROP_TO_DISC_RATIO`, the
   ratio of the training crops) centred on the disc, padded with the image's darkest value
   where it leaves the image, and segment it (again one pass, letterboxed to the network side).
4. **Paste back** the crop's probabilities of the optic-nerve-head prompts (disc, cup, rim and
   their synonyms, :data:`DISC_REGION_STRUCTURES`) into full-size maps that are 0 outside the
   crop; other prompts ("vessels") keep the whole-image probabilities. Masks, ``found``, scores
   and areas are recomputed on the full-size maps with the caller's threshold and ``min_area``.

The EM cluster map and ``cluster_similarity`` come from the whole-image pass: cluster ids of
two EM passes are not comparable (each image gets its own bases), so pasting the crop's map
into the whole-image map would mix two unrelated labelings; the whole-image map covers every
pixel with one consistent set of ids.

If no credible disc is found the plain whole-image result is returned with a
:class:`CoarseToFineWarning`; an image recognised as a crop returns the plain result silently.
``result.info["coarse_to_fine"]`` always says what happened (crop box, disc location, reason).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from .callbacks import CancelCallback, ProgressCallback, check_cancel, report
from .errors import InvalidArgumentError
from .prompts import canonical_modality, canonical_name, parse_prompts

if TYPE_CHECKING:
    from .inference import SegmentationResult

LOCATE_PROMPT = "optic disc"
"""Prompt of the locating pass."""

LOCATE_MODALITY = "fundus"
"""Modality (prompt templates) used when the caller gives none."""

DISC_REGION_STRUCTURES = frozenset({"optic disc", "optic cup", "neuroretinal rim"})
"""Canonical names (see :func:`emclip.prompts.canonical_name`) segmented in the disc crop."""

CROP_TO_DISC_RATIO = 2.14
"""Crop side / disc equivalent diameter of the training ROI crops.

Drishti-GS1 ROIs are 800 px squares around the disc (``fundus/drishti_gs``, 512 px after
resizing); on the 50 official-train masks ``512 / (2 * sqrt(disc area / pi))`` has mean 2.14
(median 2.17, range 1.72-2.49; 2.11 on the 51 test crops). The same ratio from the whole
photographs (``800 * scale`` over the disc diameter in ``fundus_full``) is 2.13. So the crop
shows the disc at the scale the model learned, about 18 % of the crop area."""

WHOLE_MAX_AREA_FRACTION = 0.08
"""A located disc below this fraction of the image area means a whole photograph.

Whole Drishti photographs: 2.0-5.4 %; macula-centred 45 degree photographs: about 1-2 %;
Drishti ROI crops: 12-31 % (mean 18 %); RIM-ONE crops: 35 % and more. The discs the bundled
default model predicts: 12.7-32.2 % on the 51 Drishti test crops, 17.1-54.4 % on 80 RIM-ONE
crops (all recognised as crops)."""

WHOLE_MAX_DIAMETER_FRACTION = 0.35
"""... and a disc diameter below this fraction of the short side (whole Drishti photographs:
0.18-0.28; Drishti crops: 0.39 and more)."""

LOCATE_SIDE_FACTOR = 4
"""The locating pass sees the image shrunk to at most this many network sides (area
interpolation; 1024 px for a 256 px model). Smaller images are used as they are."""

MIN_DISC_AREA_FRACTION = 2e-4
"""A candidate disc smaller than this fraction of the image is not credible (noise)."""

MIN_CROP_SIDE = 32
"""The crop is at least this many pixels wide."""

BRIGHTNESS_POWER = 2.0
"""Exponent of the brightness prior when candidates are ranked (0 = probability mass only).

With a model trained on disc-*centred* photographs, the dark fovea at the centre of a
macula-centred photograph can get as much disc probability as the real disc: the epoch-1
checkpoint of the default training gave skimage's retina.jpg a fovea candidate of mass 9874
(relative brightness 0.88) against 9134 at the disc (brightness 1.54). Squaring the brightness
ratio makes the disc win even against a fovea candidate twice its mass, while a bright
artefact (e.g. a reflex) must still have about as much mass as the disc to win. (The final
default model ranks the retina.jpg disc first by mass alone, and finds one candidate in each of
the 51 Drishti test photographs; the prior is a safety net.)"""

FIELD_LEVEL = 0.05
"""Normalised luminance below which a pixel is camera surround, not retina."""


class CoarseToFineWarning(UserWarning):
    """The disc could not be located; the whole-image segmentation was returned instead."""


# --------------------------------------------------------------------------- locating


@dataclass(frozen=True)
class DiscLocation:
    """Where the optic disc is in an image of ``image_shape`` ``(H, W)`` pixels.

    Coordinates are image pixels (row, column; pixel centres at integers).
    """

    center: tuple[float, float]
    """``(row, col)``: probability-weighted centroid of the disc component."""
    diameter: float
    """Equivalent diameter ``2 * sqrt(area / pi)`` in pixels."""
    bbox: tuple[int, int, int, int]
    """``(y0, x0, y1, x1)``, end exclusive, inside the image."""
    area: float
    """Pixels in the component (holes filled), on the image grid."""
    confidence: float
    """Mean disc probability inside the component."""
    max_probability: float
    """Highest disc probability inside the component."""
    image_shape: tuple[int, int]
    relative_brightness: float = 1.0
    """Mean luminance in the component / median of the fundus field (1.0 if not measured)."""
    candidates: int = 1
    """How many candidate components there were (the others were less credible)."""

    @property
    def area_fraction(self) -> float:
        """Disc area / image area."""
        return self.area / float(self.image_shape[0] * self.image_shape[1])

    @property
    def diameter_fraction(self) -> float:
        """Disc diameter / the image's short side."""
        return self.diameter / float(min(self.image_shape))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-friendly), including the two fractions."""
        return {
            "center": [round(float(c), 2) for c in self.center],
            "diameter": round(float(self.diameter), 2),
            "bbox": [int(v) for v in self.bbox],
            "area": round(float(self.area), 1),
            "area_fraction": round(self.area_fraction, 5),
            "diameter_fraction": round(self.diameter_fraction, 4),
            "confidence": round(float(self.confidence), 4),
            "max_probability": round(float(self.max_probability), 4),
            "image_shape": [int(v) for v in self.image_shape],
            "relative_brightness": round(float(self.relative_brightness), 3),
            "candidates": int(self.candidates),
        }


def relative_brightness(image: np.ndarray) -> np.ndarray:
    """Luminance of a channel-last ``image`` relative to its fundus field: ``float32 [H, W]``.

    The image is normalised as for the network (:func:`emclip.preprocess.to_float_rgb`), its
    channels averaged, and divided by the median over the field (pixels brighter than
    :data:`FIELD_LEVEL`, i.e. not the black surround of the camera); 1 is a typical retina
    pixel, the optic disc is usually 1.5-2, the fovea below 1.
    """
    from .preprocess import to_float_rgb

    luma = to_float_rgb(image, channel_axis=_channel_axis(image)).mean(axis=-1)
    field = luma[luma > FIELD_LEVEL]
    level = float(np.median(field)) if field.size else 0.0
    return luma / level if level > 0 else np.ones_like(luma)


def disc_from_probability(
    probability: np.ndarray,
    *,
    threshold: float = 0.5,
    image_shape: tuple[int, int] | None = None,
    min_area_fraction: float = MIN_DISC_AREA_FRACTION,
    brightness: np.ndarray | None = None,
    brightness_power: float = BRIGHTNESS_POWER,
) -> DiscLocation | None:
    """The most credible disc in a probability map ``float [h, w]``, or None.

    Candidates are the connected components (8-connected) of ``probability > threshold`` that
    cover at least ``min_area_fraction`` of the map. Each is scored by its probability mass
    (sum of probabilities: large *and* confident beats a small sure blob), times its mean
    ``brightness`` (a relative luminance map on the same grid, see :func:`relative_brightness`)
    to the power ``brightness_power`` when ``brightness`` is given: the fundus prior that the
    optic disc is the brightest large structure and the fovea a dark one. The winner's holes
    are filled. ``image_shape`` (default: the map's shape) is the grid the map covers:
    coordinates, bbox and area are scaled to it. None when there is no candidate.
    """
    prob = np.asarray(probability, dtype=np.float32)
    if prob.ndim != 2 or prob.size == 0:
        raise InvalidArgumentError(f"expected a 2D probability map, got shape {prob.shape}")
    if brightness is not None and np.shape(brightness) != prob.shape:
        raise InvalidArgumentError(
            f"brightness map {np.shape(brightness)} must have the shape of the probability map "
            f"{prob.shape}"
        )
    h, w = prob.shape
    H, W = (int(image_shape[0]), int(image_shape[1])) if image_shape is not None else (h, w)
    labels, n = ndimage.label(prob > threshold, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return None
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(prob), labels, index=index)
    score = ndimage.sum_labels(prob, labels, index=index)
    bright = np.ones(n)
    if brightness is not None:
        bright = np.asarray(ndimage.mean(np.asarray(brightness, np.float64), labels, index=index))
        score = score * np.maximum(bright, 0.0) ** float(brightness_power)
    score = np.where(sizes >= max(1.0, min_area_fraction * h * w), score, -np.inf)
    if not np.isfinite(score).any():
        return None
    k = int(np.argmax(score))
    component = labels == k + 1
    filled = ndimage.binary_fill_holes(component)
    area_small = int(np.count_nonzero(filled))
    sy, sx = H / h, W / w
    cy, cx = ndimage.center_of_mass(np.where(filled, prob, 0.0))
    ((rows, cols),) = ndimage.find_objects(filled.astype(np.int32))
    area = area_small * sy * sx
    return DiscLocation(
        center=(float((cy + 0.5) * sy - 0.5), float((cx + 0.5) * sx - 0.5)),
        diameter=2.0 * math.sqrt(area / math.pi),
        bbox=(
            math.floor(rows.start * sy),
            math.floor(cols.start * sx),
            min(H, math.ceil(rows.stop * sy)),
            min(W, math.ceil(cols.stop * sx)),
        ),
        area=area,
        confidence=float(prob[component].mean()),
        max_probability=float(prob[component].max()),
        image_shape=(H, W),
        relative_brightness=float(bright[k]),
        candidates=int(np.count_nonzero(np.isfinite(score))),
    )


def is_whole_photograph(
    location: DiscLocation | None,
    *,
    max_area_fraction: float = WHOLE_MAX_AREA_FRACTION,
    max_diameter_fraction: float = WHOLE_MAX_DIAMETER_FRACTION,
) -> bool:
    """True if the located disc is small enough that the image is a whole photograph.

    Both must hold: disc area below ``max_area_fraction`` (default 0.08) of the image, and disc
    diameter below ``max_diameter_fraction`` (default 0.35) of the short side. False for
    ``location`` None (nothing to crop around) and for disc crops (Drishti ROI ~18 %,
    RIM-ONE >= 35 %).
    """
    if location is None:
        return False
    return (
        location.area_fraction < max_area_fraction
        and location.diameter_fraction < max_diameter_fraction
    )


def shrink_for_locating(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` (channel-last ``(H, W[, C])``) with its long side at most ``max_side``.

    Area interpolation (what :func:`emclip.preprocess.letterbox` uses when shrinking); returned
    unchanged (no copy) when it is small enough. dtypes OpenCV cannot resize are first strided
    to at most twice the target and converted to float32, so memory stays bounded.
    """
    import cv2

    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    src = image
    if src.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        step = max(1, max(h, w) // (2 * max_side))
        src = np.ascontiguousarray(src[::step, ::step]).astype(np.float32)
    out = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
    if out.ndim == 2 and image.ndim == 3:
        out = out[..., None]
    return out


def _network_side(net: Any) -> int:
    return int(net.image_size)


def _resolve(model: Any, device: Any) -> Any:
    """A model instance (loaded once, so every pass reuses it)."""
    if hasattr(model, "predict_logits") and hasattr(model, "image_size"):
        return model
    from .inference import load_model

    return load_model(model, device if device is not None else "auto")


AUTO_MIN_SIDE = 128
"""``segment(coarse_to_fine=None)`` considers coarse-to-fine only for images at least this short side..."""

AUTO_MIN_LONG_SIDE = 768
"""... and this long side (whole photographs; 512 px ROI crops and thumbnails keep one pass)."""


def _plain_segment(image: np.ndarray, prompts: Sequence[str], model: Any, **kwargs: Any) -> Any:
    """:func:`emclip.inference.segment` without coarse-to-fine (no recursion once hooked)."""
    from .inference import segment

    kwargs["coarse_to_fine"] = False
    return segment(image, list(prompts), model, **kwargs)


def _channel_axis(arr: np.ndarray) -> int | None:
    return -1 if arr.ndim == 3 else None


def locate_optic_disc(
    image: np.ndarray,
    model: Any = None,
    *,
    threshold: float = 0.5,
    modality: str = LOCATE_MODALITY,
    brightness_prior: bool = True,
    channel_axis: int | None = None,
    device: Any = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> DiscLocation | None:
    """Find the optic disc in a fundus ``image`` with one low-resolution pass, or None.

    ``image``: 2D grey or RGB(A) (``channel_axis`` as in :func:`emclip.segment`), any size;
    it is shrunk to at most ``LOCATE_SIDE_FACTOR * model.image_size`` pixels and segmented with
    the prompt "optic disc" (``modality`` default "fundus"). ``model``: an instance or anything
    :func:`emclip.load_model` takes (default: the bundled model). The component of
    ``p > threshold`` (default 0.5) with the largest probability mass, times its relative
    brightness squared with ``brightness_prior`` (default True), is the disc
    (:func:`disc_from_probability`); coordinates are in ``image`` pixels.
    """
    from .inference.options import check_threshold
    from .preprocess import check_image

    t = check_threshold(threshold)
    arr = check_image(image, channel_axis)
    net = _resolve(model, device)
    return _locating_pass(
        arr, [], net, threshold=t, locate_threshold=t, brightness_prior=brightness_prior, min_area=0,
        modality=modality, device=device, progress=progress, cancel=cancel,
    ).location


@dataclass(frozen=True)
class _Overview:
    """What the low-resolution pass gives: the result for the asked prompts plus the disc."""

    result: Any
    small: np.ndarray
    disc_index: int
    location: DiscLocation | None


def _locating_pass(
    arr: np.ndarray,
    prompts: Sequence[str],
    net: Any,
    *,
    threshold: float,
    locate_threshold: float,
    brightness_prior: bool,
    min_area: int,
    **options: Any,
) -> _Overview:
    """One pass over ``arr`` shrunk to ``LOCATE_SIDE_FACTOR`` network sides, asking ``prompts``
    plus "optic disc" (unless among them), then the disc of the disc probability map
    (:func:`disc_from_probability` with ``locate_threshold``). ``min_area`` applies only when
    the image was not shrunk (else 0). ``options``: modality, device, batch_size, progress, cancel, mirror."""
    disc_index = next((i for i, p in enumerate(prompts) if canonical_name(p) == LOCATE_PROMPT), None)
    asked = list(prompts)
    if disc_index is None:
        asked.append(LOCATE_PROMPT)
        disc_index = len(prompts)
    small = shrink_for_locating(arr, LOCATE_SIDE_FACTOR * _network_side(net))
    shrunk = small.shape[:2] != arr.shape[:2]
    result = _plain_segment(
        small,
        asked,
        net,
        threshold=threshold,
        channel_axis=_channel_axis(small),
        tile_size=0,
        min_area=0 if shrunk else min_area,
        **options,
    )
    location = disc_from_probability(
        result.probabilities[disc_index],
        threshold=locate_threshold,
        image_shape=arr.shape[:2],
        brightness=relative_brightness(small) if brightness_prior else None,
    )
    return _Overview(result, small, disc_index, location)


# --------------------------------------------------------------------------- crop geometry


@dataclass(frozen=True)
class CropBox:
    """A ``side x side`` square with top-left corner ``(y0, x0)`` in image pixels; it may
    extend beyond an image of ``image_shape`` (the outside part is padding)."""

    y0: int
    x0: int
    side: int
    image_shape: tuple[int, int]

    @property
    def inside(self) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of the part inside the image (end exclusive)."""
        H, W = self.image_shape
        return (
            max(0, self.y0),
            max(0, self.x0),
            min(H, self.y0 + self.side),
            min(W, self.x0 + self.side),
        )

    @property
    def padded(self) -> bool:
        """True if part of the square lies outside the image."""
        y0, x0, y1, x1 = self.inside
        return (y1 - y0, x1 - x0) != (self.side, self.side)

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [self.y0, self.x0, self.y0 + self.side, self.x0 + self.side],
            "inside": list(self.inside),
            "side": self.side,
            "padded": self.padded,
        }


def crop_box(
    location: DiscLocation,
    *,
    ratio: float = CROP_TO_DISC_RATIO,
    min_side: int = MIN_CROP_SIDE,
) -> CropBox:
    """The square crop centred on the disc, side ``round(ratio * diameter)`` (at least
    ``min_side``, at most the image's long side, which always contains the disc)."""
    H, W = location.image_shape
    side = round(ratio * location.diameter)
    side = max(int(min_side), min(side, max(H, W)))
    cy, cx = location.center
    # the square's centre, y0 + (side - 1) / 2, within half a pixel of the disc centre
    y0 = math.floor(cy - (side - 1) / 2.0 + 0.5)
    x0 = math.floor(cx - (side - 1) / 2.0 + 0.5)
    return CropBox(y0=y0, x0=x0, side=side, image_shape=(int(H), int(W)))


def extract_square(image: np.ndarray, box: CropBox) -> np.ndarray:
    """The ``box`` region of a channel-last ``image`` as a new ``(side, side[, C])`` array.

    Where the square leaves the image it is filled with the darkest value of the part inside
    (per channel): the black surround of a fundus photograph, which is also what the
    letterbox padding looks like to the network.
    """
    y0, x0, y1, x1 = box.inside
    part = image[y0:y1, x0:x1]
    if not box.padded:
        return np.array(part, copy=True)
    shape = (box.side, box.side) + tuple(image.shape[2:])
    fill = part.min(axis=(0, 1)) if part.size else np.zeros(image.shape[2:], dtype=image.dtype)
    out = np.empty(shape, dtype=image.dtype)
    out[...] = fill
    out[y0 - box.y0 : y1 - box.y0, x0 - box.x0 : x1 - box.x0] = part
    return out


def paste_square(maps: np.ndarray, box: CropBox, fill: float = 0.0) -> np.ndarray:
    """Put crop maps ``[P, side, side]`` back on the image grid: ``float32 [P, H, W]``, ``fill``
    outside the crop; the padding part of the crop is dropped."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[1:] != (box.side, box.side):
        raise InvalidArgumentError(
            f"expected crop maps of shape (P, {box.side}, {box.side}), got {maps.shape}"
        )
    H, W = box.image_shape
    out = np.full((maps.shape[0], H, W), fill, dtype=np.float32)
    y0, x0, y1, x1 = box.inside
    out[:, y0:y1, x0:x1] = maps[:, y0 - box.y0 : y1 - box.y0, x0 - box.x0 : x1 - box.x0]
    return out


def _resize_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``float32 [P, h, w]`` -> ``[P, H, W]`` bilinear (pixel centres aligned)."""
    import cv2

    if maps.shape[1:] == tuple(hw):
        return maps.astype(np.float32, copy=False)
    out = np.empty((maps.shape[0],) + tuple(hw), dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = cv2.resize(m.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0, out=out)


def _resize_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``int32 [h, w]`` label map to ``hw``."""
    h, w = labels.shape
    if (h, w) == tuple(hw):
        return labels
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * h / hw[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * w / hw[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


# --------------------------------------------------------------------------- segmenting


def is_disc_region_prompt(prompt: str) -> bool:
    """True for optic disc / cup / neuroretinal rim and their synonyms ("OD", "cup", ...)."""
    return canonical_name(prompt) in DISC_REGION_STRUCTURES


def should_use_coarse_to_fine(
    modality: str | None,
    prompts: str | Sequence[str],
    coarse_to_fine: bool | None = None,
) -> bool:
    """Whether :func:`emclip.segment` should hand the call to :func:`segment_fundus`.

    ``coarse_to_fine`` True/False decides; None (auto) means yes when at least one prompt is an
    optic-nerve-head structure (:func:`is_disc_region_prompt`) and ``modality`` is None/empty or
    a fundus modality ("fundus", "colour fundus photograph", ...). Whether the image is a whole
    photograph or already a crop is decided later, after locating the disc.
    """
    if coarse_to_fine is not None:
        if not isinstance(coarse_to_fine, (bool, np.bool_)):
            raise InvalidArgumentError(
                f"coarse_to_fine must be True, False or None (auto), got {coarse_to_fine!r}"
            )
        return bool(coarse_to_fine)
    if modality is not None and not isinstance(modality, str):
        raise InvalidArgumentError(
            f"modality must be text such as 'fundus' (or None), got {type(modality).__name__}"
        )
    if modality and modality.strip() and canonical_modality(modality) != "fundus":
        return False
    return any(is_disc_region_prompt(p) for p in parse_prompts(prompts))


class _Stages:
    """Maps the progress of consecutive passes onto one monotonic ``progress(done, total)``."""

    UNITS = 1000

    def __init__(self, progress: ProgressCallback | None, n: int) -> None:
        self.progress, self.n, self.done = progress, n, 0
        report(progress, 0, n * self.UNITS)

    def stage(self, k: int) -> ProgressCallback | None:
        if self.progress is None:
            return None

        def callback(done: int, total: int) -> None:
            value = k * self.UNITS + (self.UNITS * min(done, total)) // max(1, total)
            self.done = max(self.done, min(value, self.n * self.UNITS))
            report(self.progress, self.done, self.n * self.UNITS)

        return callback

    def finish(self) -> None:
        self.done = self.n * self.UNITS
        report(self.progress, self.done, self.done)


def segment_fundus(
    image: np.ndarray,
    prompts: str | Sequence[str],
    model: Any = None,
    *,
    modality: str | None = None,
    threshold: float = 0.5,
    channel_axis: int | None = None,
    device: Any = None,
    tile_size: int | None = None,
    min_area: int | None = None,
    batch_size: int = 4,
    whole_photograph: bool | None = None,
    locate_threshold: float = 0.5,
    brightness_prior: bool = True,
    crop_ratio: float = CROP_TO_DISC_RATIO,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    mirror: bool | None = None,
) -> SegmentationResult:
    """Segment ``prompts`` in a fundus ``image`` coarse to fine (see the module docstring).

    Arguments as :func:`emclip.segment`; returns the same
    :class:`~emclip.inference.SegmentationResult` at the image's full resolution.
    ``modality`` None means "fundus". ``whole_photograph``: None (default) decides from the
    located disc (:func:`is_whole_photograph`), True always crops around the located disc,
    False returns the whole-image pass. ``locate_threshold`` (default 0.5) is the disc
    probability that delimits the located disc; ``brightness_prior`` (default True) ranks
    candidate discs by probability mass x relative brightness squared
    (:data:`BRIGHTNESS_POWER`), else by mass only; ``crop_ratio`` (default
    :data:`CROP_TO_DISC_RATIO`) is crop side / disc diameter. ``tile_size`` only applies to the
    fallback whole-image result; the locate and crop passes are single letterboxed passes.

    ``result.info["coarse_to_fine"]``: ``used`` (bool), ``reason``, ``disc`` (the
    :class:`DiscLocation` as a dict, or None), ``crop`` (the :class:`CropBox` as a dict: square
    ``box`` ``[y0, x0, y1, x1]`` in image pixels, possibly beyond the image, its ``inside`` part
    and ``side``), ``crop_ratio``, ``locate_side`` (long side of the locating pass input).
    """
    from .inference import SegmentationResult
    from .inference.options import check_batch_size, check_min_area, check_modality, check_threshold
    from .inference.single_image import summarise
    from .postprocess import single_object_flags, single_object_prompts
    from .preprocess import check_image

    prompt_list = parse_prompts(prompts)
    t = check_threshold(threshold)
    lt = check_threshold(locate_threshold)
    modality = check_modality(modality)
    check_batch_size(batch_size)
    if (
        isinstance(crop_ratio, bool)
        or not isinstance(crop_ratio, numbers.Real)
        or not (1.0 <= float(crop_ratio) <= 20.0)
    ):
        raise InvalidArgumentError(
            f"crop_ratio (crop side / disc diameter) must be a number from 1 to 20, got "
            f"{crop_ratio!r}; the default {CROP_TO_DISC_RATIO} matches the training crops"
        )
    if whole_photograph is not None and not isinstance(whole_photograph, (bool, np.bool_)):
        raise InvalidArgumentError(
            f"whole_photograph must be True, False or None (auto), got {whole_photograph!r}"
        )
    arr = check_image(image, channel_axis)
    hw = (int(arr.shape[0]), int(arr.shape[1]))
    area = check_min_area(min_area, hw)
    net = _resolve(model, device)
    pass_modality = modality if modality is not None and modality.strip() else LOCATE_MODALITY
    common = {
        "modality": pass_modality,
        "device": device,
        "batch_size": batch_size,
        "cancel": cancel,
        "mirror": mirror,
    }

    stages = _Stages(progress, 2)
    located = _locating_pass(
        arr, prompt_list, net, threshold=t, locate_threshold=lt, brightness_prior=brightness_prior,
        min_area=area, progress=stages.stage(0), **common,
    )
    overview, small, disc_index, location = located.result, located.small, located.disc_index, located.location
    shrunk = small.shape[:2] != arr.shape[:2]
    record: dict[str, Any] = {
        "used": False,
        "disc": None if location is None else location.to_dict(),
        "crop": None,
        "crop_ratio": float(crop_ratio),
        "locate_side": int(max(small.shape[:2])),
    }

    def whole_image(reason: str) -> Any:
        record["reason"] = reason
        exact = not shrunk and disc_index < len(prompt_list) and tile_size in (None, 0)
        if exact:  # the locating pass was already the plain segmentation
            result = overview
        else:
            result = _plain_segment(
                arr,
                prompt_list,
                net,
                threshold=t,
                channel_axis=_channel_axis(arr),
                tile_size=tile_size,
                min_area=area,
                progress=stages.stage(1),
                **common,
            )
        stages.finish()
        result.info = dict(result.info, coarse_to_fine=record)
        return result

    if location is None:
        best = float(overview.probabilities[disc_index].max())
        warnings.warn(
            f"no optic disc found at low resolution (highest disc probability {best:.2f}, "
            f"threshold {lt}); returning the whole-image segmentation. If this is a fundus "
            "photograph, check the image, or pass a crop around the disc",
            CoarseToFineWarning,
            stacklevel=2,
        )
        return whole_image("no optic disc found at low resolution")
    if whole_photograph is False:
        return whole_image("whole_photograph=False")
    if whole_photograph is None and not is_whole_photograph(location):
        return whole_image(
            f"already a disc crop: the disc covers {100 * location.area_fraction:.1f} % of the "
            f"image (whole photographs: < {100 * WHOLE_MAX_AREA_FRACTION:.0f} %)"
        )

    check_cancel(cancel)
    box = crop_box(location, ratio=float(crop_ratio))
    crop = extract_square(arr, box)
    fine = _plain_segment(
        crop,
        prompt_list,
        net,
        threshold=t,
        channel_axis=_channel_axis(crop),
        tile_size=0,
        min_area=0,
        progress=stages.stage(1),
        **common,
    )
    del crop
    pasted = paste_square(fine.probabilities, box)
    whole_probs = overview.probabilities[: len(prompt_list)]
    for i, prompt in enumerate(prompt_list):
        if not is_disc_region_prompt(prompt):
            pasted[i] = _resize_maps(whole_probs[i : i + 1], hw)[0]
    single = single_object_flags(net, prompt_list)
    summary = summarise(pasted, t, area, single)
    stages.finish()
    record.update(used=True, reason="whole photograph", crop=box.to_dict())
    return SegmentationResult(
        prompts=prompt_list,
        probabilities=pasted,
        cluster_map=_resize_labels(overview.cluster_map, hw),
        cluster_similarity=overview.cluster_similarity[:, : len(prompt_list)],
        threshold=t,
        min_area=area,
        tiled=False,
        device=fine.device,
        info={
            "tile_size": None,
            "intensity_range": fine.info.get("intensity_range"),
            "overview_intensity_range": overview.info.get("intensity_range"),
            "modality": pass_modality,
            "coarse_to_fine": record,
            "single_object": single_object_prompts(prompt_list, single),
            "mirror": fine.info.get("mirror"),
        },
        **summary,
    )
