"""The EM-CLIP dock widget: pick an image, type prompts, Run (off the Qt thread), Cancel.

The widget only gathers settings, starts :func:`napari_emclip._worker.execute` on a thread-pool
worker and places the returned layers; all model work is done by ``emclip``. Building the
widget imports neither torch nor the model code (they load on the first Run).

Latency: the loaded model stays in the widget's :class:`~napari_emclip._worker.ModelSlot`
between runs (released when the widget or its viewer closes); the worker's progress is shown
by a 20 Hz poll rather than one repaint per report; the visible result layers are added in one
event-loop turn (one repaint) when they are small, optional layers (probability maps, the
hidden cluster map) afterwards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from emclip.errors import (
    Cancelled,
    CheckpointError,
    ConfigError,
    EMClipError,
    InvalidPromptError,
    PretrainedWeightsUnavailable,
)
from emclip.prompts import PRESETS
from napari.layers import Image
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QThreadPool, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._layers import (
    MAIN_ROLES,
    RunInfo,
    apply_placements,
    geometry_of,
    layer_image_data,
    placement_batches,
    plan_placements,
)
from ._qt_helpers import idle_progress_bar, run_cancel_row, status_label
from ._widget_sections import Sections
from ._worker import (
    ModelSlot,
    OutOfMemory,
    RunOutcome,
    RunRequest,
    block_triton_if_llvm_loaded,
    execute,
    spatial_ndim,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
MODALITY_LABELS = {
    "fundus": "fundus photograph",
    "cardiac_mri": "cardiac MRI",
    "brain_mri": "brain MRI",
}
OTHER_MODALITY = "other (generic templates)"
BROWSE = "__browse__"
DISCLAIMER = "Research use only: not for diagnosis. Check every mask."
POLL_MS = 50
"""Progress and stage texts are shown at most this often (20 Hz): each repaint of the dock
re-composites napari's OpenGL canvas (~16 ms with a software renderer)."""
QUIET_S = 0.25
"""Nothing is shown during a run's first quarter second, not even the disabled Run button (a
quick run ends without intermediate repaints: each one re-composites the canvas and holds the
GIL, which slowed the worker by ~50 ms); after that the busy state (Run disabled, Cancel
enabled, the stage) and the progress, or an animated busy bar while none was reported yet."""
NOTIFY_DELAY_MS = 100
"""A finished run's napari notification waits this long (the new layers are drawn first)."""
BATCH_PIXELS = 8_000_000
"""Visible result layers are added together in one event-loop turn up to this many pixels
(one repaint instead of one per layer); bigger results one layer per turn."""

_SOURCE_IDS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def source_id(layer: Any) -> str:
    """A session-stable id for a source layer (survives renames, differs between layers)."""
    sid = _SOURCE_IDS.get(layer)
    if sid is None:
        sid = uuid.uuid4().hex
        _SOURCE_IDS[layer] = sid
    return sid


def config_names() -> list[str]:
    """Architecture config names shipped with emclip (``configs/models/*.json``), sorted."""
    try:
        folder = resources.files("emclip") / "configs" / "models"
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
        return []


def _sentence(exc: BaseException) -> str:
    """An exception's message as one sentence ending with a full stop."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.endswith((".", "!", "?")) else text + "."


def modality_label(key: str) -> str:
    return MODALITY_LABELS.get(key, key.replace("_", " "))


_WARM = threading.Event()


def _warm_up_layers() -> None:
    """Build one throw-away Labels layer, once, on the worker thread.

    napari imports pandas, scipy.linalg and parts of scikit-image the first time a Labels layer
    with features is made (about 0.4 s); doing it here keeps that off the Qt thread.
    """
    if _WARM.is_set():
        return
    try:
        from napari.layers import Labels

        Labels(np.zeros((2, 2), np.uint8), features={"index": [1], "name": ["warm-up"]})
    except Exception:
        log.debug("layer warm-up failed", exc_info=True)
    _WARM.set()


def _run_request(request: RunRequest, **callbacks: Any) -> RunOutcome:
    """Worker-thread entry point: warm napari's layer code up, then :func:`execute`."""
    block_triton_if_llvm_loaded()
    _warm_up_layers()
    return execute(request, **callbacks)


class _Relay(QObject):
    """Worker-thread reports as Qt signals, for listeners (tests, benchmarks); the widget itself
    polls :class:`_Report` instead (at most 20 repaints a second)."""

    progress = Signal(int, int)
    stage = Signal(str)


class _Report:
    """The latest progress and stage of a run, written by the worker thread, read by the poll.

    ``emit`` re-emits each report on the relay; a relay already deleted (widget closed) is
    ignored so that the worker only stops through its cancel flag.
    """

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.progress: tuple[int, int] | None = None
        self.stage: str | None = None

    def on_progress(self, done: int, total: int) -> None:
        self.progress = (int(done), int(total))
        self._emit(self.relay.progress, done, total)

    def on_stage(self, text: str) -> None:
        self.stage = text
        self._emit(self.relay.stage, text)

    @staticmethod
    def _emit(signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except RuntimeError:  # the widget (and its relay) was deleted
            pass


@dataclass
class _Lifetime:
    """What must stop and be released when the widget goes away (holds no Qt object of it).

    Connected to the widget's ``destroyed`` signal too, so closing the whole viewer (which
    deletes the dock widget without a close event) still cancels the run and frees the model.
    """

    models: ModelSlot = field(default_factory=ModelSlot)
    cancel_event: threading.Event | None = None
    worker: Any = None
    closed: bool = False

    def release(self, *_: Any) -> None:
        self.closed = True
        if self.cancel_event is not None:
            self.cancel_event.set()
        if self.worker is not None:
            try:
                self.worker.quit()  # its result is never delivered
            except RuntimeError:
                pass
        self.models.clear()


@dataclass
class _ActiveRun:
    worker: Any
    cancel_event: threading.Event
    layer: Any
    data_ref: Any
    request: RunRequest
    started: float
    changed: list[str] = field(default_factory=list)
    status: str = "error"
    outcome: RunOutcome | None = None
    geometry: Any = None
    placements: list[Any] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)
    written: list[Any] = field(default_factory=list)
    written_roles: list[str] = field(default_factory=list)
    placing: bool = False
    worker_done: bool = False
    report: _Report | None = None
    shown: tuple[Any, Any] = (None, None)
    busy_text: str = ""
    busy_shown: bool = False


class EMClipWidget(QWidget):
    """Dock widget: text-prompted segmentation of the selected image layer.

    Signals: ``run_started()``, ``result_received(n_layers)`` (the worker's result was accepted
    and its layers are being added, one per event-loop turn), ``run_finished(status)`` with
    status one of ``"done"``,
    ``"cancelled"``, ``"dropped"``, ``"error"``. ``last_layers`` holds the layers written by the
    last successful run, ``last_outcome`` its :class:`RunOutcome`.
    """

    run_started = Signal()
    result_received = Signal(int)
    run_finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._run: _ActiveRun | None = None
        self._relay = _Relay(self)
        self._life = _Lifetime()
        self.destroyed.connect(self._life.release)
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_MS)
        self._poll.timeout.connect(self._poll_run)
        self._preset_texts = {", ".join(v) for v in PRESETS.values()}
        self._last_model_index = 0
        self.last_layers: list[Any] = []
        self.last_outcome: RunOutcome | None = None
        self.last_message: tuple[str, str] = ("", "")
        self._image_list: list[Image] = []
        self._docked = False
        self._deferred: list[tuple[str, str]] = []
        self._build_ui()
        self._connect_viewer()
        self._refresh_images()
        self._on_image_changed()

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment")
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)

        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip("Axis holding channels (for multi-channel, non-RGB images)")
        self.channel_combo.currentIndexChanged.connect(self._update_axis_controls)
        form.addRow("Channel axis", self.channel_combo)

        self.slice_combo = QComboBox()
        self.slice_combo.setToolTip("3D stacks are segmented slice by slice along this axis")
        form.addRow("Slice axis", self.slice_combo)

        self.modality_combo = QComboBox()
        for key in PRESETS:
            self.modality_combo.addItem(modality_label(key), key)
        self.modality_combo.addItem(OTHER_MODALITY, None)
        self.modality_combo.currentIndexChanged.connect(self._on_modality_changed)
        preset_row = QHBoxLayout()
        preset_row.addWidget(self.modality_combo, 1)
        self.preset_button = QToolButton()
        self.preset_button.setText("presets")
        self.preset_button.setToolTip("Fill the prompts with this modality's presets")
        self.preset_button.clicked.connect(lambda: self._fill_presets(force=True))
        preset_row.addWidget(self.preset_button)
        form.addRow("Modality", preset_row)

        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText(
            "structures to segment, comma or newline separated,\ne.g. optic disc, optic cup"
        )
        self.prompt_edit.setFixedHeight(70)
        form.addRow("Prompts", self.prompt_edit)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "The bundled default model, a trained checkpoint folder (config.json + "
            "model.safetensors), or an architecture config (random weights: for testing only)"
        )
        self.model_combo.addItem("default (bundled)", None)
        for name in config_names():
            self.model_combo.addItem(f"config: {name} (untrained)", name)
        self.model_combo.addItem("checkpoint folder…", BROWSE)
        self.model_combo.activated.connect(self._on_model_activated)
        form.addRow("Model", self.model_combo)

        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)

        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setValue(0.5)
        form.addRow("Threshold", self.threshold_spin)

        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 16384)
        self.tile_spin.setSingleStep(256)
        self.tile_spin.setSpecialValueText("auto")
        self.tile_spin.setToolTip(
            "Tile side in pixels for very large 2D images (auto: the library decides)"
        )
        form.addRow("Tile size", self.tile_spin)

        self.mirror_combo = QComboBox()
        for label, value in (("model's setting", None), ("on", True), ("off", False)):
            self.mirror_combo.addItem(label, value)
        self.mirror_combo.setToolTip(
            "Average each pass with a left-right mirrored pass (test-time augmentation). The bundled "
            "model does it by default: a little more accurate, ~1.3x the time; 'off' for one plain pass"
        )
        form.addRow("Mirror pass", self.mirror_combo)

        self.sections = Sections(self, layout)

        outputs = QGroupBox("Outputs")
        out_layout = QVBoxLayout(outputs)
        self.combined_check = QCheckBox("one combined labels layer (overlaps resolved by score)")
        self.clusters_check = QCheckBox("EM cluster map (hidden labels layer)")
        self.probabilities_check = QCheckBox("probability map per prompt")
        for box in (self.combined_check, self.clusters_check, self.probabilities_check):
            out_layout.addWidget(box)
        layout.addWidget(outputs)

        buttons, self.run_button, self.cancel_button = run_cancel_row(
            "Run", self.run, self.cancel
        )
        buttons.addWidget(self.sections.automatic_button)
        layout.addLayout(buttons)

        self.progress_bar = idle_progress_bar()
        layout.addWidget(self.progress_bar)
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        disclaimer = QLabel(DISCLAIMER)
        disclaimer.setWordWrap(True)
        disclaimer.setStyleSheet("color: gray; font-size: small")
        layout.addWidget(disclaimer)
        layout.addStretch(1)
        self._fill_presets(force=True)

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._on_layers_changed)
        events.moved.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    def _disconnect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.disconnect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._on_layers_changed)

    # ------------------------------------------------------------------ settings helpers

    def image_layers(self) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def current_image_layer(self) -> Image | None:
        """The Image layer chosen in the picker (None if there is none)."""
        index = self.image_combo.currentIndex()
        if 0 <= index < len(self._image_list):
            layer = self._image_list[index]
            if layer in self.viewer.layers:
                return layer
        return None

    def set_image_layer(self, layer: Image) -> None:
        index = next((i for i, item in enumerate(self._image_list) if item is layer), -1)
        if index < 0:
            raise ValueError(f"{layer.name!r} is not an image layer of this viewer")
        self.image_combo.setCurrentIndex(index)

    def set_prompts(self, text: str) -> None:
        self.prompt_edit.setPlainText(text)

    def prompts_text(self) -> str:
        return self.prompt_edit.toPlainText()

    def set_modality(self, key: str | None) -> None:
        index = self.modality_combo.findData(key)
        if index < 0:
            raise ValueError(f"unknown modality {key!r}; use one of {list(PRESETS)} or None")
        self.modality_combo.setCurrentIndex(index)

    def model_source(self) -> str | None:
        data = self.model_combo.currentData()
        return None if data == BROWSE else data

    def set_model_source(self, source: str | None) -> None:
        """Select the bundled default (None), a config name or a checkpoint folder."""
        index = self.model_combo.findData(source)
        if index < 0:
            label = f"folder: {source}" if os.path.sep in source or os.path.isdir(source) else source
            index = self.model_combo.count() - 1  # before "checkpoint folder…"
            self.model_combo.insertItem(index, label, source)
        self.model_combo.setCurrentIndex(index)
        self._last_model_index = index

    def channel_axis(self) -> int | None:
        data = self.channel_combo.currentData()
        return None if data is None else int(data)

    def set_channel_axis(self, axis: int | None) -> None:
        index = self.channel_combo.findData(axis)
        if index < 0:
            raise ValueError(f"axis {axis} is not an axis of the selected image")
        self.channel_combo.setCurrentIndex(index)

    def slice_axis(self) -> int:
        data = self.slice_combo.currentData()
        return 0 if data is None else int(data)

    def set_slice_axis(self, axis: int) -> None:
        index = self.slice_combo.findData(axis)
        if index < 0:
            raise ValueError(f"axis {axis} cannot be the slice axis of the selected image")
        self.slice_combo.setCurrentIndex(index)

    @property
    def is_running(self) -> bool:
        return self._run is not None

    # ------------------------------------------------------------------ reactions

    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        if event is not None and getattr(event, "type", "") == "removed":
            event.value.events.name.disconnect(self._on_layers_changed)
            self._check_source_removed(event.value)
        self._refresh_images()

    def _refresh_images(self) -> None:
        """Rebuild the picker from the viewer's Image layers, keeping the chosen layer."""
        current = self.current_image_layer()
        layers = self.image_layers()
        names = [layer.name for layer in layers]
        unchanged = len(layers) == len(self._image_list) and all(
            a is b for a, b in zip(layers, self._image_list)
        )
        if (
            unchanged
            and [self.image_combo.itemText(i) for i in range(self.image_combo.count())] == names
        ):
            return
        self.image_combo.blockSignals(True)
        self._image_list = layers
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current is not None and current in layers:
            self.image_combo.setCurrentIndex(layers.index(current))
        elif layers:
            active = self.viewer.layers.selection.active
            self.image_combo.setCurrentIndex(
                layers.index(active) if active in layers else len(layers) - 1
            )
        self.image_combo.blockSignals(False)
        if self.current_image_layer() is not current:
            self._on_image_changed()

    def _on_image_changed(self, *_: Any) -> None:
        layer = self.current_image_layer()
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        if layer is None:
            self.channel_combo.addItem("none", None)
        elif layer.rgb:
            self.channel_combo.addItem("RGB(A) colours (last axis)", None)
        else:
            shape = layer_image_data(layer).shape
            self.channel_combo.addItem("none", None)
            for axis, size in enumerate(shape):
                self.channel_combo.addItem(f"axis {axis} ({size})", axis)
        self.channel_combo.setEnabled(layer is not None and not layer.rgb and layer.ndim > 2)
        self.channel_combo.blockSignals(False)
        self._update_axis_controls()
        if self._run is not None and layer is not self._run.layer:
            self._run.changed.append(
                f"the image picker was switched to {layer.name!r}"
                if layer
                else "the image picker was cleared"
            )

    def _update_axis_controls(self, *_: Any) -> None:
        layer = self.current_image_layer()
        self.slice_combo.clear()
        if layer is None:
            self.slice_combo.setEnabled(False)
            return
        shape = layer_image_data(layer).shape
        channel = None if layer.rgb else self.channel_axis()
        axes = [a for a in range(layer.ndim) if a != channel]
        stack = len(axes) == 3
        for axis in axes if stack else axes[:1]:
            self.slice_combo.addItem(
                f"axis {axis} ({shape[axis]} slices)" if stack else "— (2D image)", axis
            )
        self.slice_combo.setEnabled(stack)

    def _on_modality_changed(self, *_: Any) -> None:
        self._fill_presets(force=False)

    def _fill_presets(self, force: bool) -> None:
        key = self.modality_combo.currentData()
        text = self.prompt_edit.toPlainText().strip()
        if force or not text or text in self._preset_texts:
            if key in PRESETS:
                self.prompt_edit.setPlainText(", ".join(PRESETS[key]))
            elif force:
                self.prompt_edit.clear()

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != BROWSE:
            self._last_model_index = index
            return
        folder = QFileDialog.getExistingDirectory(
            self, "Choose an EM-CLIP checkpoint folder (config.json + model.safetensors)"
        )
        if folder:
            self.set_model_source(folder)
        else:
            self.model_combo.setCurrentIndex(self._last_model_index)

    # ------------------------------------------------------------------ messages

    def _notify(self, level: str, text: str, defer: bool = False) -> None:
        """Status line now; napari notification now, or with ``defer`` shortly after (so that
        the canvas draws new layers before napari builds the notification's pop-up)."""
        self.last_message = (level, text)
        self.status_label.setText(text)
        if defer:
            self._deferred.append((level, text))
            QTimer.singleShot(NOTIFY_DELAY_MS, self._flush_notifications)
        else:
            self._show(level, text)

    def _flush_notifications(self) -> None:
        pending, self._deferred = self._deferred, []
        for level, text in pending:
            self._show(level, text)

    @staticmethod
    def _show(level: str, text: str) -> None:
        {"info": show_info, "warning": show_warning, "error": show_error}[level](text)

    # ------------------------------------------------------------------ run / cancel

    def run(self) -> bool:
        """Start a run with the current settings; False (and a message) if it cannot start."""
        if self._life.closed:
            return False
        if self._run is not None:
            self._notify(
                "warning", "A run is already in progress: wait for it to finish or press Cancel."
            )
            return False
        layer = self.current_image_layer()
        if layer is None:
            self._notify(
                "warning", "No image layer: open an image, or File ▸ Open Sample ▸ napari-emclip."
            )
            return False
        try:
            prompts = self.sections.prompts(self.prompts_text())
        except InvalidPromptError as exc:
            self._notify("warning", _sentence(exc))
            return False
        channel_axis = -1 if layer.rgb else self.channel_axis()
        data = layer_image_data(layer)
        ndim = spatial_ndim(tuple(data.shape), channel_axis)
        if ndim not in (2, 3):
            self._notify(
                "warning",
                f"{layer.name!r} has {ndim} image axes: EM-CLIP segments 2D images and 3D stacks. "
                "Pick its channel axis, or take a 2D/3D sub-volume first.",
            )
            return False
        model_source = self.model_source()
        info = RunInfo(
            source_id=source_id(layer),
            source_name=layer.name,
            prompts=prompts or [],
            model=model_source or "default",
            threshold=float(self.threshold_spin.value()),
            modality=self.modality_combo.currentData(),
        )
        request = RunRequest(
            image=data,
            prompts=prompts,
            info=info,
            model_source=model_source,
            device=self.device_combo.currentText(),
            threshold=float(self.threshold_spin.value()),
            modality=self.modality_combo.currentData(),
            channel_axis=channel_axis,
            stack_axis=self.slice_axis(),
            tile_size=self.tile_spin.value() or None,
            mirror=self.mirror_combo.currentData(),
            combined=self.combined_check.isChecked(),
            clusters=self.clusters_check.isChecked(),
            probabilities=self.probabilities_check.isChecked(),
            models=self._life.models,
        )
        try:
            self.sections.prepare(request, layer)
        except (EMClipError, ValueError) as exc:
            self._notify("warning", _sentence(exc))
            return False
        from napari.qt.threading import FunctionWorker

        cancel_event = threading.Event()
        report = _Report(self._relay)
        worker = FunctionWorker(
            _run_request,
            request,
            progress=report.on_progress,
            cancel=cancel_event.is_set,
            stage=report.on_stage,
        )
        self._run = _ActiveRun(worker, cancel_event, layer, data, request, time.perf_counter())
        self._run.report = report
        self._life.cancel_event, self._life.worker = cancel_event, worker
        layer.events.data.connect(self._on_source_data_changed)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        worker.warned.connect(self._on_warned)
        # the busy state (buttons, status, progress) is left to the poll, after QUIET_S: every
        # repaint now would re-composite the canvas while the worker starts (see QUIET_S); a
        # second press meanwhile is refused by the check above
        what = ", ".join(prompts) if prompts is not None else "every known structure"
        self._run.busy_text = f"Segmenting {what} in {layer.name!r}…"
        # start the thread now: worker.start() would wait for the next event-loop turn, i.e.
        # until the dock has been repainted (tens of ms with a software OpenGL canvas)
        QThreadPool.globalInstance().start(worker)
        self._poll.start()
        self.run_started.emit()
        return True

    def cancel(self) -> None:
        """Ask the running job to stop; nothing it computed is added to the viewer."""
        if self._run is None:
            return
        self._run.cancel_event.set()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("Cancelling…")

    def _poll_run(self) -> None:
        """Show the run's latest progress and stage (timer, 20 Hz; only what changed)."""
        run = self._run
        if run is None or run.report is None or run.placing:
            return
        if time.perf_counter() - run.started < QUIET_S:
            return  # a quick run finishes without a single intermediate repaint
        if not run.busy_shown:
            run.busy_shown = True
            self.run_button.setEnabled(False)
            if not run.cancel_event.is_set():
                self.cancel_button.setEnabled(True)
                self.status_label.setText(run.busy_text)
                run.shown = (run.shown[0], run.report.stage)  # later stages replace it
        progress, stage = run.report.progress, run.report.stage
        shown_progress, shown_stage = run.shown
        if progress != shown_progress and progress is not None and progress[1] > 0:
            done, total = progress
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
        elif progress is None and self.progress_bar.maximum() != 0:
            self.progress_bar.setRange(0, 0)  # busy: e.g. the model is loading
        if stage != shown_stage and stage and not run.cancel_event.is_set():
            self.status_label.setText(f"{stage[:1].upper()}{stage[1:]}…")
        run.shown = (progress, stage)

    def _on_warned(self, warning: tuple) -> None:
        message, category = warning[0], warning[1]
        name = getattr(category, "__name__", "")
        if name == "UntrainedModelWarning":
            show_warning(f"Untrained model: {message}")
        elif name == "OutOfMemoryFallbackWarning":
            show_info(f"{str(message)[:1].upper()}{str(message)[1:]}")
        else:
            log.warning("%s: %s", name, message)

    def _on_source_data_changed(self, event: Any = None) -> None:
        if self._run is not None:
            self._run.changed.append(f"the data of {self._run.layer.name!r} changed")

    def _check_source_removed(self, layer: Any) -> None:
        if self._run is not None and layer is self._run.layer:
            self._run.changed.append(f"{layer.name!r} was removed")

    def _drop_reason(self, outcome: RunOutcome) -> str | None:
        run = self._run
        assert run is not None
        reasons = list(run.changed)
        if run.layer not in self.viewer.layers and not any("removed" in r for r in reasons):
            reasons.append(f"{run.layer.name!r} was removed")
        if self.current_image_layer() is not run.layer and not any("picker" in r for r in reasons):
            reasons.append("another image was picked")
        if layer_image_data(run.layer) is not run.data_ref and not reasons:
            reasons.append(f"the data of {run.layer.name!r} was replaced")
        if outcome.source_changed and not reasons:
            reasons.append(f"the pixels of {run.layer.name!r} were modified")
        return "; ".join(dict.fromkeys(reasons)) or None

    def _on_returned(self, outcome: RunOutcome) -> None:
        run = self._run
        if run is None:
            return
        run.outcome = outcome
        if run.cancel_event.is_set():
            run.status = "cancelled"
            self._notify("info", "Run cancelled: nothing was added.")
            return
        reason = self._drop_reason(outcome)
        if reason:
            run.status = "dropped"
            self._notify(
                "warning", f"Result dropped because {reason} during the run. Press Run again."
            )
            return
        for note in outcome.notes:
            show_info(note)
        run.geometry = geometry_of(
            run.layer, run.request.channel_axis if not run.layer.rgb else None
        )
        run.placements = plan_placements(
            outcome.specs, list(self.viewer.layers), run.request.info.source_id
        )
        run.pending = placement_batches(run.placements, BATCH_PIXELS)
        run.placing = True
        if run.busy_shown:  # a quick run goes straight to the result (no repaint in between)
            self.cancel_button.setEnabled(False)  # the result is accepted: it is being added
            self.status_label.setText("Adding layers…")
        self.result_received.emit(len(run.placements))
        self._place_next()

    def _place_next(self) -> None:
        """Add or update one batch of layers, then yield to the event loop.

        napari needs ~0.15-0.7 s per new Labels layer on the Qt thread (vispy visuals, editing
        overlays, layer controls); small visible results go in one batch (one repaint), big
        ones and the optional layers one per event-loop turn so the viewer stays responsive.
        """
        run = self._run
        if run is None:
            return
        while run.pending:
            batch = run.pending.pop(0)
            for placement in batch:
                layers = apply_placements(
                    self.viewer,
                    [placement],
                    run.geometry,
                    insert_at=self._insert_index(run, placement),
                )
                run.written += layers
                run.written_roles += [placement.spec.role] * len(layers)
            if run.pending and not self._life.closed:
                QTimer.singleShot(0, self._place_next)
                return
        run.placing = False
        self._report_done(run)
        if run.worker_done:
            self._finish_run()

    def _insert_index(self, run: _ActiveRun, placement: Any) -> int | None:
        """Probability maps go below the result labels (added first), the rest on top."""
        if placement.spec.role != "probability":
            return None
        labels = [
            layer
            for layer, role in zip(run.written, run.written_roles)
            if role in MAIN_ROLES and layer in self.viewer.layers
        ]
        return min(self.viewer.layers.index(layer) for layer in labels) if labels else None

    def _report_done(self, run: _ActiveRun) -> None:
        outcome = run.outcome
        assert outcome is not None
        placements = run.placements
        self.last_layers = list(run.written)
        self.last_outcome = outcome
        prompt_layers = [
            p.name
            for p in placements
            if p.spec.layer_type == "labels" and p.spec.role != "clusters"
        ]
        updated = [p.name for p in placements if p.is_update]
        parts = (
            [f"{len(prompt_layers)} labels layer(s) in {outcome.seconds:.1f} s"]
            if prompt_layers
            else []
        )
        if updated:
            parts.append(f"updated in place (undo with Ctrl+Z): {', '.join(updated)}")
        renamed = [p.name for p in placements if not p.is_update and p.name != p.spec.base_name]
        if renamed:
            parts.append(f"kept your edited layers, new: {', '.join(renamed)}")
        run.status = "done"
        if outcome.not_found:
            missing = ", ".join(repr(p) for p in outcome.not_found)
            self._notify(
                "warning",
                f"Not found in {run.layer.name!r}: {missing} (no mask added; try a lower threshold or another "
                f"wording)." + (f" Added {'; '.join(parts)}." if parts else ""),
                defer=True,
            )
        else:
            self._notify("info", "Done: " + "; ".join(parts) + ".", defer=True)

    def _on_errored(self, exc: BaseException) -> None:
        run = self._run
        if run is None:
            return
        if isinstance(exc, Cancelled) or run.cancel_event.is_set():
            run.status = "cancelled"
            self._notify("info", "Run cancelled: nothing was added.")
            return
        run.status = "error"
        if isinstance(exc, (CheckpointError, PretrainedWeightsUnavailable, ConfigError)):
            self._notify(
                "error",
                f"The model could not be loaded: {_sentence(exc)} "
                "In the widget: choose a checkpoint folder (or a config) under 'Model'.",
            )
        elif isinstance(exc, OutOfMemory):
            self._notify("error", f"Out of memory: {_sentence(exc)}")
        elif isinstance(exc, (EMClipError, ValueError, TypeError)):
            self._notify("error", f"Cannot segment {run.layer.name!r}: {_sentence(exc)}")
        else:
            log.error("EM-CLIP run failed", exc_info=exc)
            self._notify(
                "error", f"EM-CLIP failed ({type(exc).__name__}: {exc}). Details are in the log."
            )

    def _on_finished(self) -> None:
        run = self._run
        if run is None:
            return
        run.worker_done = True
        if not run.placing:
            self._finish_run()

    def _finish_run(self) -> None:
        run = self._run
        if run is None:
            return
        try:
            run.layer.events.data.disconnect(self._on_source_data_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._run = None
        self._poll.stop()
        if self._life.worker is run.worker:
            self._life.cancel_event, self._life.worker = None, None
        self.run_button.setEnabled(not self._life.closed)
        self.cancel_button.setEnabled(False)
        # only if it changes: QProgressBar.setValue repaints the window synchronously, before
        # the canvas could draw the new layers
        value = 1 if run.status == "done" else 0
        if (self.progress_bar.minimum(), self.progress_bar.maximum()) != (0, 1):
            self.progress_bar.setRange(0, 1)
        if self.progress_bar.value() != value:
            self.progress_bar.setValue(value)
        self.run_finished.emit(run.status)

    # ------------------------------------------------------------------ teardown

    @property
    def is_closed(self) -> bool:
        return self._life.closed

    def shutdown(self) -> None:
        """Close down (idempotent; called when the widget closes or leaves its dock).

        A running job is cancelled and its result never added; a result already being added
        is completed at once (the viewer never keeps half a result); the worker is told to quit,
        the loaded model is released, and the widget stops listening to the viewer.
        """
        if self._life.closed:
            return
        self._life.release()  # cancel flag, worker.quit(), model slot cleared
        run = self._run
        if run is not None and run.placing:
            self._place_next()  # with the widget closed, adds every remaining batch now
        run = self._run
        if run is not None:
            for signal, slot in (
                (run.worker.returned, self._on_returned),
                (run.worker.errored, self._on_errored),
                (run.worker.finished, self._on_finished),
                (run.worker.warned, self._on_warned),
            ):
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):
                    pass
            if not run.placing and run.status != "done":
                run.status = "cancelled"
            run.placing = False
            self._finish_run()
        self._poll.stop()
        self.last_outcome = None
        self.last_layers = []
        self.status_label.setText("Closed.")
        try:
            self._disconnect_viewer()
        except (TypeError, ValueError, RuntimeError):
            pass

    def closeEvent(self, event: Any) -> None:
        self.shutdown()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:
        # napari's dock close button takes the widget out of its dock (setParent(None)) without
        # closing it: treat leaving the dock like closing
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                self.shutdown()
        return super().event(event)
