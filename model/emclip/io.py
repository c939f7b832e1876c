"""Reading images and writing results: atomic writes, mask TIFFs with prompt names, overlays.

Nothing here imports torch. Every writer goes through :func:`atomic_path`: the data is written to
a temporary file next to the target and moved over it with ``os.replace`` only once complete, so
a crash, a full disk or Ctrl-C never leaves a half-written file (an existing file stays intact).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from . import memory
from ._version import __version__
from .errors import InsufficientMemoryError, InvalidImageError
from .memory import format_bytes

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES
"""File extensions :func:`read_image` accepts (case-insensitive)."""

MEMMAP_BYTES = 256 * 2**20
"""Uncompressed TIFFs larger than this are memory-mapped instead of read into RAM."""

#: Leading bytes of the formats :func:`read_image` reads, and the format they identify.
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)

#: Colours of the prompts in overlays (RGB), in prompt order; repeats after 12.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64),
    (64, 160, 255),
    (255, 200, 0),
    (64, 220, 120),
    (200, 90, 255),
    (255, 130, 40),
    (0, 220, 220),
    (255, 105, 180),
    (150, 200, 40),
    (140, 110, 255),
    (230, 230, 230),
    (160, 90, 40),
)


# --------------------------------------------------------------------------- reading


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def sniff_format(path: str | os.PathLike) -> Optional[str]:
    """The image format of a file from its first bytes: "png", "jpeg", "tiff", "bmp", "gif",
    "webp" or None."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    for magic, kind in SIGNATURES:
        if head.startswith(magic):
            return kind
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return None


def check_image_file(path: str | os.PathLike) -> str:
    """Cheap checks of an image file before reading it; returns its format (see :func:`sniff_format`).

    Raises ``FileNotFoundError`` for a missing path and :class:`InvalidImageError` for a folder,
    something that is not a regular file, an extension other than :data:`IMAGE_SUFFIXES`, an empty
    file, or content that is not PNG, JPEG, TIFF, BMP (or GIF/WebP) whatever the extension says.
    Reads 16 bytes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image file: {path}")
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder; pass image files, e.g. {path}/*.png")
    if not path.is_file():
        raise InvalidImageError(f"{path} is not a regular file; pass an image file")
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        hint = (
            " (for NIfTI volumes load them with nibabel and use emclip.segment_stack)"
            if (path.name.lower().endswith((".nii", ".nii.gz")))
            else ""
        )
        raise InvalidImageError(
            f"cannot read {path.name}: unsupported file type {suffix or '(no extension)'}; "
            f"use one of {', '.join(IMAGE_SUFFIXES)}{hint}"
        )
    if path.stat().st_size == 0:
        raise InvalidImageError(f"{path} is empty (0 bytes); it was not saved completely, save or copy it again")
    kind = sniff_format(path)
    if kind is None:
        with open(path, "rb") as fh:
            head = fh.read(8)
        raise InvalidImageError(
            f"{path} is not an image file: its content (starting {head!r}) is not PNG, JPEG, TIFF, BMP "
            "(or GIF/WebP) "
            f"whatever its {suffix} extension says; check that it is really an image"
        )
    return kind


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image (or a TIFF stack) as a numpy array, keeping its dtype.

    The format comes from the file's content (a PNG named ``.tif`` is read as a PNG); the
    extension must still be one of :data:`IMAGE_SUFFIXES`. TIFFs are read with tifffile (big
    uncompressed files are memory-mapped, read only); PNG/JPEG/BMP with Pillow (JPEG orientation
    from EXIF applied, palette images expanded to RGB(A), 16-bit PNGs kept 16-bit). Raises
    ``FileNotFoundError`` for a missing path and :class:`InvalidImageError` for folders, other
    extensions, empty files, files that are truncated, corrupted or not images, and TIFFs whose
    pixels would not fit in the free memory.
    """
    path = Path(path)
    kind = check_image_file(path)
    if kind == "tiff":
        image = _read_tiff(path)
    else:
        image = _read_pil(path, kind)
    if image.size == 0:
        raise InvalidImageError(f"{path} contains an empty image (shape {image.shape})")
    return image


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(self.local, "notes", None)
        if notes is not None:
            notes.append(record.getMessage())


_TIFF_LOG = _LogCollector()
_TIFF_LOG_LOCK = threading.Lock()
_TIFF_LOG_USERS = [0, True]  # readers inside _tifffile_notes, tifffile logger's own propagate


@contextmanager
def _tifffile_notes() -> Iterator[list[str]]:
    """Collect what tifffile logs (instead of printing it) while reading one file."""
    logger = logging.getLogger("tifffile")
    with _TIFF_LOG_LOCK:
        if _TIFF_LOG_USERS[0] == 0:
            _TIFF_LOG_USERS[1] = logger.propagate
            logger.addHandler(_TIFF_LOG)
            logger.propagate = False
        _TIFF_LOG_USERS[0] += 1
    notes: list[str] = []
    _TIFF_LOG.local.notes = notes
    try:
        yield notes
    finally:
        _TIFF_LOG.local.notes = None
        with _TIFF_LOG_LOCK:
            _TIFF_LOG_USERS[0] -= 1
            if _TIFF_LOG_USERS[0] == 0:
                logger.removeHandler(_TIFF_LOG)
                logger.propagate = _TIFF_LOG_USERS[1]


def _read_tiff(path: Path) -> np.ndarray:
    """First series of a TIFF; memory-mapped when big and uncompressed; refused when it is
    truncated or would not fit in memory (judged from its header, before reading pixels)."""
    import tifffile

    with _tifffile_notes() as notes:
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InvalidImageError(f"{path} holds no image data; the file may be truncated")
                series = tif.series[0]
                shape, dtype = tuple(int(n) for n in series.shape), np.dtype(series.dtype)
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes == 0:
                    raise InvalidImageError(
                        f"{path} holds no image data (shape {shape}); the file may be truncated"
                    )
                size, offset = int(tif.filehandle.size), series.dataoffset
                if offset is not None and offset + nbytes > size:
                    raise InvalidImageError(
                        f"{path} is truncated: its header describes a {shape} {dtype} image "
                        f"({format_bytes(nbytes)}) but the file ends {format_bytes(offset + nbytes - size)} "
                        "early, so it is not complete; copy or save it again"
                    )
                free = memory.available_memory()
                too_big = free is not None and nbytes > free
                if offset is None and too_big:
                    raise InsufficientMemoryError(
                        f"{path} holds a {shape} {dtype} image ({format_bytes(nbytes)} uncompressed), more "
                        f"than the {format_bytes(free)} of free memory; crop or downsample it first, or save "
                        "it uncompressed so it can be memory-mapped"
                    )
                if offset is None or not (too_big or size > MEMMAP_BYTES):
                    return np.asarray(series.asarray())
            try:
                return tifffile.memmap(path, mode="r")
            except (ValueError, OSError):  # not mappable after all (e.g. byte order): read it
                return np.asarray(tifffile.imread(path))
        except (InvalidImageError, MemoryError):
            raise
        except Exception as exc:  # tifffile raises many types for broken files
            said = f"; tifffile: {'; '.join(notes)[:300]}" if notes else ""
            raise InvalidImageError(
                f"cannot read {path} as a TIFF image ({type(exc).__name__}: {exc}{said}); "
                "check that the file is complete and really a TIFF"
            ) from exc


def _read_pil(path: Path, kind: Optional[str] = None) -> np.ndarray:
    from PIL import Image, ImageOps

    kind = kind or _suffix(path)[1:]
    try:
        with Image.open(path) as img:
            img.load()
            if kind in ("jpeg", "jpg"):
                img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode == "PA":
                img = img.convert("RGBA")
            elif mode == "LA":
                img = img.getchannel("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            array = np.array(img)
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"{path} is larger than Pillow reads safely ({exc}); convert it to TIFF first"
        ) from exc
    except Exception as exc:  # UnidentifiedImageError, truncated data (OSError), zlib errors...
        raise InvalidImageError(
            f"cannot read {path} as a {kind.upper()} image ({type(exc).__name__}: {exc}); "
            "check that the file is complete and really an image"
        ) from exc
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # Pillow reads some 16-bit PNGs as mode "I"
    return array


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path`` atomically.

    Write the whole file to the yielded path (it keeps ``path``'s extension, so libraries that
    pick the format by name work). If the block raises, the temporary file is deleted and
    ``path`` is left as it was. The parent folder must exist.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {parent} does not exist")
    while True:
        tmp = parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            # os.open applies the umask, so the final file gets normal permissions (not 0600).
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync(parent, directory=True)  # and the rename itself survives a power cut


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory=True`` a folder's entries) to disk; a no-op
    where the platform cannot (Windows folders, some network file systems)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open()`` for writing that only replaces ``path`` once the block finishes without error."""
    if not any(m in mode for m in "wax") or "+" in mode or "r" in mode:
        raise ValueError(f"atomic_open is for writing; got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("x", "w").replace("a", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


# --------------------------------------------------------------------------- mask TIFFs


class MaskFile(NamedTuple):
    """What :func:`read_mask_tiff` returns."""

    masks: np.ndarray
    """``uint8`` ``(P, H, W)`` (or ``(P, Z, H, W)``), 1 inside the structure."""
    prompts: list[str]
    """Prompt of each mask channel."""
    metadata: dict
    """Everything else stored with the masks (emclip version, threshold, found, scores...)."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


_RESERVED = {"shape", "axes", "prompts"}


def write_mask_tiff(
    path: str | os.PathLike,
    masks: np.ndarray,
    prompt_names: Sequence[str],
    *,
    metadata: dict | None = None,
    compression: str | None = "zlib",
) -> Path:
    """Write masks ``(P, H, W)`` or ``(P, Z, H, W)`` as a ``uint8`` (0/1) TIFF, atomically.

    The prompt names (and ``metadata``, any JSON-serialisable dict) are stored as JSON in the
    TIFF ImageDescription, together with the axes (``CYX`` or ``CZYX``); :func:`read_mask_tiff`
    returns them. ``compression`` defaults to zlib (lossless). Returns the path written.
    """
    masks = np.asarray(masks)
    names = [str(n) for n in prompt_names]
    if masks.ndim == 2 and len(names) == 1:
        masks = masks[None]
    if masks.ndim not in (3, 4):
        raise InvalidImageError(f"masks must be (P, H, W) or (P, Z, H, W), got shape {masks.shape}")
    if masks.shape[0] != len(names) or not names:
        raise InvalidImageError(
            f"{masks.shape[0]} mask channels but {len(names)} prompt names; give one name per mask"
        )
    extra = {k: v for k, v in _jsonable(dict(metadata or {})).items() if k not in _RESERVED}
    meta = {
        "axes": "CYX" if masks.ndim == 3 else "CZYX",
        "prompts": names,
        "emclip_version": __version__,
        **extra,
    }
    data = np.ascontiguousarray(masks != 0 if masks.dtype != bool else masks).astype(np.uint8)

    import tifffile

    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, metadata=meta, compression=compression)
    return path


def read_mask_tiff(path: str | os.PathLike) -> MaskFile:
    """Read a TIFF written by :func:`write_mask_tiff`: masks, prompt names and metadata.

    A TIFF from elsewhere (no emclip metadata) is read too; its masks are named
    ``"mask 1"``, ``"mask 2"``, ... and a 2D image counts as one mask.
    """
    import tifffile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such mask file: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            shaped = tif.shaped_metadata
            meta = dict(shaped[0]) if shaped else {}
            masks = tif.asarray()
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(
            f"cannot read {path} as a mask TIFF ({type(exc).__name__}: {exc})"
        ) from exc
    if masks.ndim == 2:
        masks = masks[None]
    prompts = [str(p) for p in meta.pop("prompts", [])]
    if len(prompts) != masks.shape[0]:
        prompts = [f"mask {i + 1}" for i in range(masks.shape[0])]
    meta.pop("shape", None)
    return MaskFile(masks=masks, prompts=prompts, metadata=meta)


# --------------------------------------------------------------------------- overlays


def _display_rgb(
    image: np.ndarray, channel_axis: int | None, max_side: int
) -> tuple[np.ndarray, int]:
    """The image as uint8 RGB, strided down so its long side is at most ``max_side``."""
    from .preprocess import channels_last, intensity_range, to_float_rgb

    arr = channels_last(image, channel_axis)
    step = max(1, math.ceil(max(arr.shape[:2]) / max_side))
    window = intensity_range(arr)  # over the full image, subsampled
    small = to_float_rgb(arr[::step, ::step], intensity_range=window)
    return (small * 255.0 + 0.5).astype(np.uint8), step


def overlay_rgb(
    image: np.ndarray,
    masks: np.ndarray,
    prompt_names: Sequence[str] | None = None,
    *,
    alpha: float = 0.4,
    channel_axis: int | None = None,
    max_side: int = 4096,
    legend: bool = True,
) -> np.ndarray:
    """Colour ``masks`` ``(P, H, W)`` over ``image`` (any layout/dtype :func:`to_float_rgb` takes).

    Each prompt gets a colour from :data:`PALETTE`, filled with opacity ``alpha`` (default 0.4)
    and outlined; a legend with the prompt names is drawn top-left (ASCII only). Images whose
    long side exceeds ``max_side`` (default 4096) are drawn at a reduced, integer-strided size.
    Returns ``uint8`` ``(h, w, 3)``.
    """
    import cv2

    from .preprocess import channels_last

    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    hw = channels_last(image, channel_axis).shape[:2]
    if masks.ndim != 3 or masks.shape[1:] != hw:
        raise InvalidImageError(
            f"masks of shape {masks.shape} do not match an image of {hw[0]}x{hw[1]} pixels; "
            "pass masks (P, H, W) computed for this image"
        )
    rgb, step = _display_rgb(image, channel_axis, max_side)
    small = masks[:, ::step, ::step] != 0
    out = rgb.astype(np.float32)
    thickness = max(1, max(rgb.shape[:2]) // 500)
    for i, mask in enumerate(small):
        if not mask.any():
            continue
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour
    out_u8 = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for i, mask in enumerate(small):
        if mask.any():
            contours, _ = cv2.findContours(
                mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE
            )
            cv2.drawContours(out_u8, contours, -1, PALETTE[i % len(PALETTE)], thickness)
    if legend and prompt_names:
        _draw_legend(out_u8, list(prompt_names))
    return out_u8


def _draw_legend(rgb: np.ndarray, names: list[str]) -> None:
    import cv2

    h, w = rgb.shape[:2]
    scale = max(0.35, min(1.5, w / 900))
    line = int(22 * scale) + 4
    box = int(14 * scale) + 2
    for i, name in enumerate(names):
        y = 6 + i * line
        if y + box > h:
            break
        text = name.encode("ascii", "replace").decode("ascii")
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        rgb[y : y + line - 2, 4 : min(w, 12 + box + tw)] //= 3  # darken under the label
        cv2.rectangle(rgb, (8, y + 2), (8 + box, y + 2 + box), PALETTE[i % len(PALETTE)], -1)
        cv2.putText(
            rgb,
            text,
            (12 + box, y + 2 + box),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )


def write_overlay_png(
    path: str | os.PathLike,
    image: np.ndarray,
    result: Any,
    *,
    prompt_names: Sequence[str] | None = None,
    alpha: float = 0.4,
    channel_axis: int | None = None,
    max_side: int = 4096,
) -> Path:
    """Write the masks coloured over the image as an RGB PNG, atomically.

    ``result`` is a :class:`~emclip.inference.SegmentationResult` (its ``masks`` and ``prompts``
    are used) or a mask array ``(P, H, W)`` with ``prompt_names``. See :func:`overlay_rgb`.
    """
    from PIL import Image

    if hasattr(result, "masks"):
        masks = result.masks
        prompt_names = prompt_names or list(getattr(result, "prompts", []))
    else:
        masks = result
    rgb = overlay_rgb(
        image, masks, prompt_names, alpha=alpha, channel_axis=channel_axis, max_side=max_side
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
