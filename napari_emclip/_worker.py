"""The work of one run, Qt-free: load the model, segment, build layer specs.

:func:`execute` runs on a worker thread; it only talks to the GUI through the ``progress`` and
``stage`` callbacks and polls ``cancel`` (forwarded to emclip, which raises
``emclip.Cancelled``). Running out of memory is handled by emclip (it retries tiled, one tile at
a time, then on the CPU, warning each time); if even that fails, :class:`OutOfMemory` says what
to try next.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._layers import LayerSpec, RunInfo, build_layer_specs, fingerprint

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
StageFn = Callable[[str], None]
CancelFn = Callable[[], bool]


@dataclass
class RunRequest:
    """Everything a run needs, captured on the Qt thread when Run is pressed.

    ``image`` is the source layer's array (not a copy), or a list of sequence layers' arrays
    (stacked in the worker, :func:`source_array`); ``channel_axis`` is an axis of it or
    None; ``stack_axis`` (an axis of ``image``) is the slice axis used when the image without
    channels is 3D. ``model_source`` is None (bundled default), a config name or a checkpoint
    folder. ``tile_size`` None lets emclip decide (it tiles very large images); ``mirror`` None
    follows the model's ``test_time_mirror`` (see ``emclip.segment``). ``models``: the
    widget's :class:`ModelSlot` (keeps the model loaded between runs); None loads through
    emclip's shared cache.
    """

    image: Any
    prompts: list[str] | None
    info: RunInfo
    model_source: str | None = None
    device: str = "auto"
    threshold: float = 0.5
    modality: str | None = None
    channel_axis: int | None = None
    stack_axis: int = 0
    tile_size: int | None = None
    mirror: bool | None = None
    combined: bool = False
    clusters: bool = False
    probabilities: bool = False
    models: ModelSlot | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the library call (exemplars, channels, affine, axis, ...),
    set by the widget's sections (:mod:`napari_emclip._widget_sections`)."""
    volume: bool = False
    """True: ``emclip.segment_volume`` (3D, anatomical ``axis``, named channels) instead of
    ``segment``/``segment_stack``."""


def files_stamp(source: str | None) -> tuple:
    """Names, sizes and mtimes of a checkpoint folder's files (or of one file); () for config
    names. A changed stamp means the model must be loaded again."""
    if source is None:
        from emclip.inference import model_loading

        path = model_loading.DEFAULT_MODEL_DIR
    else:
        path = source
    try:
        if os.path.isdir(path):
            entries = sorted((e for e in os.scandir(path) if e.is_file()), key=lambda e: e.name)
            return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
        if os.path.isfile(path):
            st = os.stat(path)
            return ((os.path.basename(path), st.st_size, st.st_mtime_ns),)
    except OSError:
        pass
    return ()


class ModelSlot:
    """The one model a widget keeps loaded between runs (thread-safe).

    Loaded with ``emclip.load_model(..., cache=False)``, so the slot holds the only long-lived
    reference: :meth:`clear` (called when the widget closes) lets the model be freed. A run with
    another source or device, or after the checkpoint's files changed, loads anew and replaces
    the model.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model: Any = None

    @property
    def model(self) -> Any:
        return self._model

    def get(self, source: str | None, device: str) -> Any:
        """The model for ``source`` on ``device``, loading it if the slot holds another."""
        from emclip import inference

        key = (source, device, files_stamp(source))
        with self._lock:
            if self._key == key and self._model is not None:
                return self._model
        model = inference.load_model(source, device=device, cache=False)
        with self._lock:
            self._key, self._model = key, model
        return model

    def clear(self) -> None:
        """Forget the model (and return cached GPU memory to the driver if torch is loaded)."""
        with self._lock:
            self._key, self._model = None, None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class RunOutcome:
    """What a finished run hands back to the Qt thread."""

    specs: list[LayerSpec]
    not_found: list[str]
    fingerprint_before: str
    fingerprint_after: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""
    tiled: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    """The library result's ``info`` (e.g. the recognised modality of a prompt-free run)."""

    @property
    def source_changed(self) -> bool:
        return self.fingerprint_before != self.fingerprint_after


class OutOfMemory(RuntimeError):
    """The run ran out of memory even after emclip's fallbacks (tiles, CPU)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for host ``MemoryError`` and CUDA/MPS out-of-memory errors (no torch import)."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def block_triton_if_llvm_loaded() -> bool:
    """Stop ``import triton`` from crashing a process that already renders with Mesa.

    Mesa's software and AMD/Intel OpenGL drivers load their own ``libLLVM``; loading Triton's
    bundled LLVM into the same process afterwards segfaults (seen with napari under Xvfb as
    soon as torchvision is imported). Triton is only needed for ``torch.compile`` kernels,
    which emclip does not use, so when ``libLLVM`` is already mapped and Triton is not yet
    imported, ``import triton`` is made to raise ImportError instead (torch then runs without
    it). Returns True if it did so. Linux only; elsewhere a no-op.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            loaded = any("libLLVM" in line for line in maps)
    except OSError:
        return False
    if loaded:
        sys.modules["triton"] = None  # type: ignore[assignment]
        log.info("OpenGL driver's libLLVM is loaded: Triton disabled to avoid an LLVM clash")
    return loaded


def source_array(image: Any) -> np.ndarray:
    """The run's input array: a layer's data, or a list of same-grid sequence layers' data
    stacked channel-last (a copy made here, in the worker; the list keeps the layers' own
    arrays, so an edit to any of them during the run is noticed)."""
    if isinstance(image, list):
        from ._volumes import stack_channels

        return stack_channels(image)
    return np.asarray(image)


def spatial_ndim(shape: tuple[int, ...], channel_axis: int | None) -> int:
    """Number of image axes once a channel axis (if any) is set aside."""
    return len(shape) - (0 if channel_axis is None else 1)


def execute(
    request: RunRequest,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    stage: StageFn | None = None,
) -> RunOutcome:
    """Run one segmentation request (worker thread).

    2D images go to ``emclip.segment``, 3D stacks (after setting the channel axis aside) to
    ``emclip.segment_stack`` along ``request.stack_axis``. Raises ``emclip.Cancelled`` when
    ``cancel()`` turns True, emclip's ValueError subclasses for bad input or a model that
    cannot load, and :class:`OutOfMemory`.
    """
    from emclip import inference
    from emclip.callbacks import check_cancel

    say = stage or (lambda text: None)
    start = time.perf_counter()
    say("reading the image")
    image = source_array(request.image)
    before = fingerprint(image)
    check_cancel(cancel)

    say("loading the model")
    if request.models is not None:
        model = request.models.get(request.model_source, request.device)
    else:
        model = inference.load_model(request.model_source, device=request.device)
    check_cancel(cancel)

    kwargs: dict[str, Any] = {
        "model": model,
        "modality": request.modality,
        "threshold": request.threshold,
        "channel_axis": request.channel_axis,
        "tile_size": request.tile_size,
        "mirror": request.mirror,
        "progress": progress,
        "cancel": cancel,
    }
    say("segmenting")
    try:
        kwargs.update(request.call_kwargs)
        if request.volume:
            from emclip import volume_segmentation

            result = volume_segmentation.segment_volume(image, request.prompts, **kwargs)
        elif spatial_ndim(image.shape, request.channel_axis) == 3:
            result = inference.segment_stack(
                image, request.prompts, axis=request.stack_axis, **kwargs
            )
        else:
            result = inference.segment(image, request.prompts, **kwargs)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemory(
                "the image does not fit in memory even in tiles on the CPU; set a smaller tile size, "
                "close other programs, or crop/downsample the image"
            ) from exc
        raise

    check_cancel(cancel)
    say("building layers")
    notes: list[str] = []
    clusters = request.clusters
    if clusters and not np.asarray(result.cluster_map).any():
        notes.append("This model has no EM aggregation, so there is no cluster map.")
        clusters = False
    specs, not_found = build_layer_specs(
        result,
        request.info,
        combined=request.combined,
        clusters=clusters,
        probabilities=request.probabilities,
    )
    after = fingerprint(source_array(request.image))
    return RunOutcome(
        specs=specs,
        not_found=not_found,
        fingerprint_before=before,
        fingerprint_after=after,
        notes=notes,
        seconds=time.perf_counter() - start,
        device=str(getattr(result, "device", "")),
        tiled=bool(getattr(result, "tiled", False)),
        info=dict(getattr(result, "info", None) or {}),
    )
