"""Image preprocessing shared by training and inference.

Every image, whatever its dtype or layout, goes through the same two steps so that the network
sees the same thing at training and at inference time:

1. :func:`to_float_rgb` — validate, move channels last, make RGB, and rescale intensities
   robustly to float32 in [0, 1] (0.5th/99.5th percentiles, all channels jointly so colour ratios
   are kept). This removes most scanner/camera brightness differences.
2. :func:`letterbox` — resize the long side to the network size keeping the aspect ratio, and
   pad to a square. :func:`unletterbox` maps network outputs back to the image grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from . import memory
from .errors import InsufficientMemoryError, InvalidArgumentError, InvalidImageError

MIN_SIDE = 8
"""Images smaller than this on either side are refused."""

MAX_PIXELS = 2**31 - 1
"""Images with more pixels than this are refused (use tiles of a smaller crop)."""

PERCENTILES = (0.5, 99.5)
"""Default robust intensity window."""

_MAX_SAMPLES = 1_000_000


def _as_array(image: object) -> np.ndarray:
    if isinstance(image, np.ma.MaskedArray):
        masked = int(np.count_nonzero(np.ma.getmaskarray(image)))
        if masked:
            raise InvalidImageError(
                f"the image is a masked array with {masked} masked pixels, whose values would be used "
                "as they are; fill them first, e.g. image.filled(image.min())"
            )
        return np.ma.getdata(image)
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__"):
        try:
            return np.asarray(image)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidImageError(
                f"cannot turn the {type(image).__name__} into a numpy array ({exc}); "
                "pass a numpy array in main memory (e.g. tensor.cpu().numpy())"
            ) from exc
    raise InvalidImageError(
        f"expected a numpy array (or array-like), got {type(image).__name__}; "
        "load the file first, e.g. with tifffile.imread or emclip.io.read_image"
    )


def channels_last(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """Return a 2D ``(H, W)`` or channel-last ``(H, W, C)`` view of ``image``.

    With ``channel_axis`` None (default) the layout is guessed: 2D is grey; 3D with 1, 3 or 4
    entries on the last axis is channel-last; 3D with 1, 3 or 4 entries on the first axis (and
    more on the last) is channel-first. Anything else raises :class:`InvalidImageError` saying to
    pass ``channel_axis`` or to segment a stack slice by slice.
    """
    image = _as_array(image)
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise InvalidImageError(
            f"expected a 2D image (H, W) or (H, W, C), got an array of shape {image.shape}; "
            "for stacks or volumes use emclip.segment_stack(..., axis=...)"
        )
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise InvalidArgumentError(
                f"channel_axis must be an axis number such as 0 or -1 (or None to guess), got {channel_axis!r}"
            )
        try:
            image = np.moveaxis(image, channel_axis, -1)
        except np.exceptions.AxisError as exc:
            raise InvalidImageError(f"channel_axis={channel_axis} is out of range for shape {image.shape}") from exc
        return image
    if image.shape[-1] in (1, 3, 4):
        return image
    if image.shape[0] in (1, 3, 4):
        return np.moveaxis(image, 0, -1)
    raise InvalidImageError(
        f"cannot tell the channel axis of an array of shape {image.shape}: pass channel_axis=..., "
        "or use emclip.segment_stack for a stack of 2D slices"
    )


def check_values(image: np.ndarray) -> None:
    """Raise :class:`InvalidImageError` for a non-numeric dtype or NaN/inf values (checked in blocks)."""
    if image.dtype == bool:
        return
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InvalidImageError(
            f"unsupported dtype {image.dtype}; convert the image to an integer or float array"
        )
    if np.issubdtype(image.dtype, np.floating) and image.size:
        # In row blocks, so a huge image never needs a full-size boolean temporary.
        rows = max(1, _MAX_SAMPLES // max(1, image[:1].size))
        bad = beyond = 0
        wide = image.dtype.itemsize > 8  # long double: must also fit float64 (used for the window)
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, image.shape[0], rows):
                block = image[start : start + rows]
                finite = np.isfinite(block)
                bad += int(block.size - np.count_nonzero(finite))
                if wide:
                    beyond += int(np.count_nonzero(finite & ~np.isfinite(block.astype(np.float64))))
        if bad:
            raise InvalidImageError(
                f"the image contains {bad} NaN or infinite values; replace them first, "
                "e.g. numpy.nan_to_num(image, nan=0.0)"
            )
        if beyond:
            raise InvalidImageError(
                f"the image has {beyond} values beyond the float64 range; rescale it first, "
                "e.g. image.astype(numpy.float64) after dividing by its maximum"
            )


def subsample(image: np.ndarray, max_values: int = _MAX_SAMPLES) -> np.ndarray:
    """A regular-grid view of ``image`` with at most about ``max_values`` elements (no copy).

    Every axis longer than 4 (so not a channel axis) is strided by the same step; small arrays
    are returned unchanged.
    """
    if image.size <= max_values:
        return image
    axes = [i for i, n in enumerate(image.shape) if n > 4] or list(range(image.ndim))
    step = max(1, math.ceil((image.size / max_values) ** (1.0 / len(axes))))
    while step > 1:
        index = tuple(slice(None, None, step) if i in axes else slice(None) for i in range(image.ndim))
        view = image[index]
        if view.size <= max_values:
            return view
        step += 1
    return image


def robust_range(image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """Low and high intensity of ``image`` at the given percentiles (default 0.5, 99.5).

    Large images are subsampled on a regular grid (at most ~1e6 values, see :func:`subsample`)
    so time and memory stay bounded whatever the image size or memory layout. Bool and 8/16-bit
    integer images are counted instead of sorted (:func:`percentiles_by_counting`, same values).
    """
    sample = subsample(np.asarray(image))
    if sample.size == 0:
        raise InvalidImageError("the image is empty")
    counted = percentiles_by_counting(sample, percentiles)
    if counted is not None:
        lo, hi = counted
    else:
        sample = np.asarray(sample, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            lo, hi = np.percentile(sample, percentiles)
            if not (math.isfinite(lo) and math.isfinite(hi)):  # interpolating across ~1e308 overflows
                lo, hi = np.percentile(sample, percentiles, method="nearest")
    if hi <= lo:  # nearly constant: fall back to the full range
        lo, hi = float(sample.min()), float(sample.max())
    return float(lo), float(hi)


def percentiles_by_counting(values: np.ndarray, percentiles: Sequence[float]) -> list[float] | None:
    """``np.percentile(values.astype(np.float64), percentiles)`` (method "linear", the same
    float64 rounding) for bool and 8/16-bit integer arrays, from a histogram of their levels:
    one O(n) pass where ``np.percentile`` partitions a float copy (a 512x512 RGB uint8 image:
    ~1 ms instead of ~9 ms, BENCHMARKS.md). None for other dtypes."""
    if values.dtype.kind not in "biu" or values.dtype.itemsize > 2 or values.size == 0:
        return None
    flat = values.reshape(-1)
    lowest = 0
    if flat.dtype.kind == "b":
        flat = flat.view(np.uint8)
    elif flat.dtype.kind == "i":  # shift signed levels to 0..2^bits-1 for bincount
        lowest = int(np.iinfo(flat.dtype).min)
        flat = flat.astype(np.int32) - lowest
    cumulative = np.cumsum(np.bincount(flat))
    n = int(cumulative[-1])

    def order_statistic(k: int) -> float:  # the k-th smallest value, 0-based
        return float(np.searchsorted(cumulative, k, side="right") + lowest)

    out = []
    for p in percentiles:  # numpy's "linear": virtual index (n - 1) q, then its _lerp
        position = (n - 1) * (float(p) / 100.0)
        below = min(max(math.floor(position), 0), n - 1)
        gamma = position - below
        a, b = order_statistic(below), order_statistic(min(below + 1, n - 1))
        out.append(b - (b - a) * (1.0 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    return out


def intensity_range(
    image: np.ndarray,
    channel_axis: int | None = None,
    *,
    percentiles: tuple[float, float] = PERCENTILES,
) -> tuple[float, float]:
    """The ``(lo, hi)`` window :func:`to_float_rgb` would use for ``image`` (alpha ignored).

    Compute it once for a whole big image (or, with ``channel_axis``, any array whose spatial
    axes come first) and pass it as ``intensity_range=`` when converting its tiles or slices, so
    every piece is normalised the same way. Memory stays bounded (subsampled).
    """
    arr = _as_array(image)
    if arr.ndim >= 3 and channel_axis is not None:
        arr = np.moveaxis(arr, channel_axis, -1)
    elif arr.ndim == 3:
        arr = channels_last(arr)
    if arr.ndim >= 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.size:
        check_values(subsample(arr))
    return robust_range(arr, percentiles)


def check_image(image: np.ndarray, channel_axis: int | None = None, *, values: bool = True) -> np.ndarray:
    """Validate a 2D image and return its channel-last view ``(H, W)`` or ``(H, W, C)``.

    Checks what :func:`to_float_rgb` needs: not empty, at least ``MIN_SIDE`` pixels per side, at
    most ``MAX_PIXELS``, 1/3/4 channels, a numeric or bool dtype and (``values=True``, default)
    finite values. Raises :class:`InvalidImageError` with a message that says what to do. Never
    copies the image. With ``values=False`` only the cheap checks run (call :func:`check_values`
    later).
    """
    arr = channels_last(image, channel_axis)
    if arr.size == 0:
        raise InvalidImageError(f"the image is empty (shape {arr.shape})")
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InvalidImageError(
            f"the image is {h}x{w} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed "
            "(did you pass one row, or a channel, instead of the whole image?)"
        )
    if h * w > MAX_PIXELS:
        raise InvalidImageError(f"the image is {h}x{w} pixels, larger than {MAX_PIXELS}; segment a crop")
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        c = arr.shape[-1]
        raise InvalidImageError(
            f"the image has {c} channels; pass a grey, RGB or RGBA image "
            "(for multi-sequence MRI pick one sequence, or use a model trained for it)"
        )
    if values:
        check_values(arr)
    elif not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        check_values(arr[:1, :1])  # the dtype message, without scanning the values
    return arr


def to_float_rgb(
    image: np.ndarray,
    channel_axis: int | None = None,
    *,
    percentiles: tuple[float, float] = PERCENTILES,
    intensity_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Convert any supported 2D image to float32 RGB ``(H, W, 3)`` in [0, 1].

    Grey images are repeated over three channels, RGBA drops alpha, one-channel images are grey.
    Intensities map ``[lo, hi] -> [0, 1]`` (clipped) where ``lo, hi`` are the ``percentiles``
    (default 0.5, 99.5) over all channels jointly, or ``intensity_range`` if given (use it to
    normalise tiles of one big image, or the slices of a volume, consistently). A constant image
    becomes all zeros. Raises :class:`InvalidImageError` for empty, tiny, non-finite or
    non-numeric input, with a message that says what to do.
    """
    arr = check_image(image, channel_axis, values=False)
    _check_fits(arr.shape[:2])
    check_values(arr)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    lo, hi = intensity_range if intensity_range is not None else robust_range(arr, percentiles)
    out = _rescale(arr, float(lo), float(hi))
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    elif out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def _check_fits(hw: tuple[int, int]) -> None:
    """Refuse a conversion whose float32 RGB output (and one temporary) cannot fit in the free
    memory, instead of letting the operating system kill the process half way."""
    need = int(hw[0]) * int(hw[1]) * 16
    free = memory.available_memory()
    if free is not None and need > free:
        raise InsufficientMemoryError(
            f"converting a {hw[0]}x{hw[1]} image to float RGB needs about {memory.format_bytes(need)}, "
            f"but only {memory.format_bytes(free)} of memory is free; work on tiles or a crop "
            "(emclip.segment tiles big images by itself)"
        )


def _rescale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(arr - lo) / (hi - lo)`` clipped to [0, 1] as a new float32 array (0 where ``hi <= lo``).

    Plain float32 arithmetic unless the window is extreme (``lo``/``hi`` beyond 1e30 in size or
    a span below 1e-30, which float32 cannot hold): then float64 in row blocks, halving the
    operands when ``hi - lo`` itself would overflow, so the result is never NaN. Outliers beyond
    the float32 range saturate at 0 or 1 as any value outside the window does.
    """
    out = np.empty(arr.shape, dtype=np.float32)
    if not hi > lo:
        out[...] = 0.0
        return out
    extreme = max(abs(lo), abs(hi)) > 1e30 or (hi - lo) < 1e-30
    if not extreme:
        with np.errstate(over="ignore", invalid="ignore"):
            out[...] = arr
            out -= np.float32(lo)
            out *= np.float32(1.0 / (hi - lo))
        np.clip(out, 0.0, 1.0, out=out)
        return out
    span = hi - lo
    half = not math.isfinite(span)
    rows = max(1, _MAX_SAMPLES // max(1, arr[:1].size))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for start in range(0, arr.shape[0], rows):
            block = arr[start : start + rows].astype(np.float64)
            if half:
                block = (block * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)
            else:
                block = (block - lo) / span
            np.clip(block, 0.0, 1.0, out=block)
            out[start : start + rows] = block
    return out


@dataclass(frozen=True)
class Letterbox:
    """How an ``(H, W)`` image was placed into a ``size x size`` square.

    The resized image occupies rows ``top:top+new_h`` and columns ``left:left+new_w``.
    """

    size: int
    orig_hw: tuple[int, int]
    new_hw: tuple[int, int]
    top: int
    left: int

    @property
    def scale(self) -> float:
        """New pixels per original pixel."""
        return self.new_hw[0] / self.orig_hw[0]


def letterbox_geometry(hw: tuple[int, int], size: int) -> Letterbox:
    """Placement of an image of shape ``hw`` in a ``size``-pixel square (long side = size)."""
    h, w = int(hw[0]), int(hw[1])
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    top, left = (size - nh) // 2, (size - nw) // 2
    return Letterbox(size=size, orig_hw=(h, w), new_hw=(nh, nw), top=top, left=left)


def letterbox(image: np.ndarray, size: int, *, is_mask: bool = False) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` (``(H, W)`` or ``(H, W, C)``) so its long side is ``size``; pad to square.

    Images use area interpolation when shrinking and bilinear when enlarging; masks
    (``is_mask=True``) use nearest neighbour. Padding is 0. Returns the square array and the
    :class:`Letterbox` needed to map results back.
    """
    geo = letterbox_geometry(image.shape[:2], size)
    nh, nw = geo.new_hw
    if is_mask:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if nh < image.shape[0] else cv2.INTER_LINEAR
    src = image
    if is_mask and src.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
        src = src.astype(np.uint16 if src.max(initial=0) > 255 else np.uint8)
    resized = cv2.resize(src, (nw, nh), interpolation=interp)
    if resized.ndim == 2 and image.ndim == 3:
        resized = resized[..., None]
    out = np.zeros((size, size) + image.shape[2:], dtype=resized.dtype)
    out[geo.top : geo.top + nh, geo.left : geo.left + nw] = resized
    return out, geo


def unletterbox(maps: "torch.Tensor", geo: Letterbox) -> "torch.Tensor":  # noqa: F821
    """Map network outputs ``(..., size, size)`` back to the image grid ``(..., H, W)``.

    Crops the padding and resizes bilinearly (use on logits or probabilities, then threshold).
    """
    import torch
    import torch.nn.functional as F

    nh, nw = geo.new_hw
    cropped = maps[..., geo.top : geo.top + nh, geo.left : geo.left + nw]
    lead = cropped.shape[:-2]
    flat = cropped.reshape(-1, 1, nh, nw)
    if flat.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        flat = flat.float()
    out = F.interpolate(flat, size=geo.orig_hw, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *geo.orig_hw)
