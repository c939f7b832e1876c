"""Reference exemplars (image + mask + structure name) and template banks of them.

An :class:`Exemplar` is one labelled example: "this region of this image is the *name*".
:func:`emclip.segment` turns exemplars into *visual prompts* (``exemplars=``): the decoder
pixel embeddings of the exemplar image, averaged under its mask, become a score vector in the
space where the decoder compares pixels with prompts (``EMCLIP.encode_exemplars``). A
:class:`TemplateBank` is a list of exemplars that can be saved to and loaded from a folder::

    bank/
      bank.json          {"format_version": 1, "exemplars": [{"name", "modality", "image", "mask"}]}
      images/000.tif     the exemplar images (an image shared by several exemplars is stored once)
      masks/000.png      the masks, 8-bit PNG (0 outside, 255 inside)

No pickle anywhere; saving is atomic (a complete bank folder or the previous one). This module
imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from .errors import InvalidExemplarError, InvalidImageError
from .prompts import MAX_PROMPT_CHARS, clean_prompt

BANK_FILE = "bank.json"
BANK_FORMAT_VERSION = 1


def _image_view(image: Any) -> np.ndarray:
    from .preprocess import check_image

    try:
        return check_image(np.asarray(image))
    except InvalidImageError as exc:
        raise InvalidExemplarError(f"exemplar image: {exc}") from exc


def _mask_array(mask: Any, hw: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InvalidExemplarError(
            f"exemplar mask must be a 2D array (H, W), got shape {arr.shape}; pass one structure's "
            "mask, e.g. labels == value"
        )
    if tuple(arr.shape) != tuple(hw):
        raise InvalidExemplarError(
            f"exemplar mask is {arr.shape[0]}x{arr.shape[1]} but its image is {hw[0]}x{hw[1]}; "
            "the mask must cover the image pixel for pixel"
        )
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise InvalidExemplarError(f"exemplar mask must be boolean or numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InvalidExemplarError("exemplar mask contains NaN or infinite values")
    out = arr != 0
    if not out.any():
        raise InvalidExemplarError(
            "exemplar mask is empty (no pixel set); mark the structure in the mask (nonzero = inside)"
        )
    return out


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidExemplarError(f"exemplar name must be text such as 'optic cup', got {type(name).__name__}")
    text = clean_prompt(name)
    if not text:
        raise InvalidExemplarError("exemplar name is empty; give the structure's name, e.g. 'optic cup'")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidExemplarError(f"exemplar name of {len(text)} characters is too long (at most {MAX_PROMPT_CHARS})")
    return text


def _digest(arr: np.ndarray) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


@dataclass(eq=False)
class Exemplar:
    """One labelled example: ``image`` (2D grey ``(H, W)`` or RGB/RGBA channel-last, any numeric
    dtype), ``mask`` (``(H, W)``, nonzero = the structure; stored as bool), ``name`` (the
    structure, cleaned like a prompt) and ``modality`` (prompt templates; None = the modality of
    the :func:`emclip.segment` call). Invalid input raises :class:`InvalidExemplarError`.

    Arrays are copied and made read-only, so :attr:`key` (a content hash used to cache the
    exemplar's features) stays valid.
    """

    image: np.ndarray
    mask: np.ndarray
    name: str
    modality: str | None = None
    _keys: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        image = np.array(_image_view(self.image), copy=True)
        if not np.issubdtype(image.dtype, np.number) and image.dtype != bool:
            raise InvalidExemplarError(f"exemplar image must be numeric, got dtype {image.dtype}")
        mask = _mask_array(self.mask, image.shape[:2])
        self.name = _name(self.name)
        if self.modality is not None and not isinstance(self.modality, str):
            raise InvalidExemplarError(f"exemplar modality must be text or None, got {type(self.modality).__name__}")
        image.setflags(write=False)
        mask.setflags(write=False)
        self.image, self.mask = image, mask

    def __repr__(self) -> str:
        return (
            f"Exemplar(name={self.name!r}, image={self.image.shape} {self.image.dtype}, "
            f"mask_pixels={int(self.mask.sum())}, modality={self.modality!r})"
        )

    @property
    def image_key(self) -> str:
        """Content hash of the image alone (exemplars sharing an image are encoded together)."""
        if "image" not in self._keys:
            self._keys["image"] = _digest(self.image)
        return self._keys["image"]

    @property
    def key(self) -> str:
        """Content hash of image, mask, name and modality."""
        if "all" not in self._keys:
            h = hashlib.sha1(usedforsecurity=False)
            for part in (self.image_key, _digest(self.mask), self.name, repr(self.modality)):
                h.update(part.encode())
                h.update(b"\0")
            self._keys["all"] = h.hexdigest()
        return self._keys["all"]


def check_exemplars(exemplars: Any) -> list[Exemplar]:
    """``exemplars`` (one :class:`Exemplar`, a sequence of them, or a :class:`TemplateBank`) as a
    list; anything else raises :class:`InvalidExemplarError`."""
    if isinstance(exemplars, Exemplar):
        return [exemplars]
    if isinstance(exemplars, (str, bytes, os.PathLike)):
        raise InvalidExemplarError(
            "exemplars must be Exemplar objects or a TemplateBank; load a bank folder with "
            "emclip.TemplateBank.load(path)"
        )
    try:
        items = list(exemplars)
    except TypeError as exc:
        raise InvalidExemplarError(
            f"exemplars must be a list of Exemplar or a TemplateBank, got {type(exemplars).__name__}"
        ) from exc
    for i, item in enumerate(items):
        if not isinstance(item, Exemplar):
            raise InvalidExemplarError(
                f"exemplars[{i}] is a {type(item).__name__}, not an Exemplar; build one with "
                "emclip.Exemplar(image, mask, name)"
            )
    return items


class TemplateBank(MutableSequence):
    """A list of :class:`Exemplar` that can be saved to / loaded from a bank folder."""

    def __init__(self, exemplars: Iterable[Exemplar] = ()) -> None:
        self._items: list[Exemplar] = check_exemplars(list(exemplars))

    def __repr__(self) -> str:
        return f"TemplateBank({len(self)} exemplars: {', '.join(self.names())})"

    @overload
    def __getitem__(self, i: int) -> Exemplar: ...
    @overload
    def __getitem__(self, i: slice) -> TemplateBank: ...
    def __getitem__(self, i):
        return TemplateBank(self._items[i]) if isinstance(i, slice) else self._items[i]

    def __setitem__(self, i, value) -> None:
        self._items[i] = check_exemplars(value)[0] if not isinstance(i, slice) else check_exemplars(value)  # type: ignore[call-overload]

    def __delitem__(self, i) -> None:
        del self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Exemplar]:
        return iter(self._items)

    def insert(self, index: int, value: Exemplar) -> None:
        self._items.insert(index, check_exemplars(value)[0])

    def names(self) -> list[str]:
        """Distinct structure names, in order of first appearance."""
        return list(dict.fromkeys(e.name for e in self._items))

    # ----------------------------------------------------------------- folder format

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the bank to ``folder`` (see the module docstring) atomically; returns the path.

        An existing bank folder is replaced only with ``overwrite=True``; any other non-empty
        folder is refused (nothing is deleted that is not a bank).
        """
        import tifffile
        from PIL import Image

        folder = Path(folder)
        if not self._items:
            raise InvalidExemplarError("the template bank is empty; add at least one Exemplar before saving")
        if folder.exists():
            if not folder.is_dir():
                raise InvalidExemplarError(f"{folder} exists and is not a folder")
            if any(folder.iterdir()):
                if not (folder / BANK_FILE).is_file():
                    raise InvalidExemplarError(f"{folder} is a non-empty folder that is not a template bank; choose another")
                if not overwrite:
                    raise FileExistsError(f"the template bank {folder} exists; pass overwrite=True to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            (tmp / "images").mkdir(parents=True)
            (tmp / "masks").mkdir()
            image_files: dict[str, str] = {}
            entries = []
            for i, ex in enumerate(self._items):
                rel_image = image_files.get(ex.image_key)
                if rel_image is None:
                    rel_image = f"images/{len(image_files):03d}.tif"
                    tifffile.imwrite(tmp / rel_image, ex.image)
                    image_files[ex.image_key] = rel_image
                rel_mask = f"masks/{i:03d}.png"
                Image.fromarray(ex.mask.astype(np.uint8) * 255).save(tmp / rel_mask)
                entries.append({"name": ex.name, "modality": ex.modality, "image": rel_image, "mask": rel_mask})
            doc = {"format_version": BANK_FORMAT_VERSION, "exemplars": entries}
            (tmp / BANK_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            _swap_in(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TemplateBank:
        """Read a bank folder written by :meth:`save`; problems raise :class:`InvalidExemplarError`
        naming the file."""
        import tifffile
        from PIL import Image

        folder = Path(folder)
        index = folder / BANK_FILE
        if not index.is_file():
            raise InvalidExemplarError(f"{folder} is not a template bank: {BANK_FILE} is missing")
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidExemplarError(f"{index} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("exemplars"), list):
            raise InvalidExemplarError(f"{index} must hold an object with an 'exemplars' list")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > BANK_FORMAT_VERSION:
            raise InvalidExemplarError(
                f"{index} has format_version {version!r}; this emclip reads up to {BANK_FORMAT_VERSION} (upgrade emclip)"
            )
        root = folder.resolve()
        images: dict[str, np.ndarray] = {}
        out = []
        for i, entry in enumerate(doc["exemplars"]):
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "image", "mask")):
                raise InvalidExemplarError(f"{index}: exemplar {i} needs text fields 'name', 'image' and 'mask'")
            paths = {k: _inside(root, entry[k], index) for k in ("image", "mask")}
            try:
                if entry["image"] not in images:
                    images[entry["image"]] = tifffile.imread(paths["image"])
                with Image.open(paths["mask"]) as im:
                    mask = np.asarray(im)
            except (OSError, ValueError) as exc:
                raise InvalidExemplarError(f"{index}: exemplar {i} ({entry['name']!r}): cannot read its files: {exc}") from exc
            try:
                out.append(Exemplar(images[entry["image"]], mask, entry["name"], entry.get("modality")))
            except InvalidExemplarError as exc:
                raise InvalidExemplarError(f"{index}: exemplar {i} ({entry['name']!r}): {exc}") from exc
        return cls(out)


def _inside(root: Path, rel: str, index: Path) -> Path:
    path = (root / rel).resolve()
    if root not in path.parents:
        raise InvalidExemplarError(f"{index}: path {rel!r} points outside the bank folder")
    if not path.is_file():
        raise InvalidExemplarError(f"{index}: file {rel!r} is missing")
    return path


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete bank ``tmp`` to ``folder``; an old bank there is moved aside first and
    deleted only after the new one is in place (moved back if that fails)."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
