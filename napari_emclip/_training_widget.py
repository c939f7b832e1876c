"""The "Learn from corrections" dock widget: add corrected masks to a training set, fine-tune.

- *Add to training set*: the chosen Image layer and the checked Labels layers (each named after
  its prompt, as the EM-CLIP widget names its outputs) are stored with
  :func:`emclip.data.user_dataset.add_to_training_set` in a dataset folder. For a 3D stack the
  slice shown in the viewer is stored.
- *Fine-tune*: runs ``emclip finetune`` in a separate process (:class:`QProcess`; its memory is
  released when it ends), reading ``progress DONE TOTAL`` lines into the progress bar. Cancel
  sends SIGTERM (the command stops after the current step and writes nothing), then kills it
  after a grace period; the checkpoint folder only appears once complete.
- When it finishes, *Use fine-tuned model* sets the EM-CLIP widget's model (when one is docked
  in this viewer, or given with :meth:`set_segmentation_widget`) to the new checkpoint, and
  *Back to previous model* restores what it had; without one, the path is shown to copy.

Importing this module loads neither torch nor the model code.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QProcess, QProcessEnvironment, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ._layers import META_KEY
from ._qt_helpers import idle_progress_bar, run_cancel_row, status_label

if TYPE_CHECKING:
    import napari

MODALITIES = ("cardiac MRI", "colour fundus photograph", "brain MRI")
"""Offered modality texts (the combo box is editable: any other text works)."""

CANCEL_GRACE_MS = 15000
"""After Cancel, the process gets this long to stop by itself before it is killed."""

_COPY_SUFFIX = re.compile(r"\s*\[\d+\]$")


def prompt_of(layer: Labels) -> str:
    """The prompt a Labels layer stands for: its EM-CLIP feature name, else its layer name
    without napari's `` [2]`` copy suffix."""
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    if isinstance(meta, dict) and meta.get("role") == "prompt":
        try:
            names = list(layer.features["name"])
            if names and str(names[0]).strip():
                return str(names[0]).strip()
        except (KeyError, AttributeError, TypeError):
            pass
    return _COPY_SUFFIX.sub("", layer.name).strip()


def current_slice(layer: Any, viewer: Any) -> np.ndarray:
    """The 2D plane of ``layer`` shown in the viewer (the whole array for 2D layers; RGB(A)
    images keep their channel axis)."""
    arr = np.asarray(layer.data)
    spatial = arr.ndim - (1 if getattr(layer, "rgb", False) else 0)
    if spatial <= 2:
        return arr
    point = layer.world_to_data(viewer.dims.point[-spatial:] if len(viewer.dims.point) >= spatial
                                else viewer.dims.point)
    for axis in range(spatial - 2):
        index = int(np.clip(round(float(point[axis])), 0, arr.shape[0] - 1))
        arr = arr[index]
    return arr


class TrainingWidget(QWidget):
    """Dock widget: grow a training set from corrected Labels layers and fine-tune on it.

    Signals: ``added(path)`` after an image was stored; ``finetune_finished(status)`` with
    ``"done"``, ``"cancelled"`` or ``"error"``; ``progress_changed(done, total)``.
    ``last_checkpoint`` is the newest fine-tuned checkpoint (None before the first).
    """

    added = Signal(str)
    finetune_finished = Signal(str)
    progress_changed = Signal(int, int)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.last_checkpoint: Path | None = None
        self._segmentation_widget: Any = None
        self._previous_model: tuple[bool, str | None] = (False, None)
        self._process: QProcess | None = None
        self.command_prefix: list[str] = [sys.executable, "-m", "emclip.cli.main"]
        """Program and first arguments of the fine-tune process (``emclip`` of this Python)."""
        self._cancelling = False
        self._out_dir: Path | None = None
        self._stdout_buffer = ""
        self._stderr_tail: list[str] = []
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self._kill)
        self._build_ui()
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        add_box = QGroupBox("Add corrected masks")
        form = QFormLayout(add_box)
        self.image_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        self.labels_list = QListWidget()
        self.labels_list.setToolTip("Checked Labels layers are stored, each under its prompt name")
        self.labels_list.setFixedHeight(90)
        form.addRow("Masks", self.labels_list)
        self.modality_combo = QComboBox()
        self.modality_combo.setEditable(True)
        self.modality_combo.addItems(MODALITIES)
        form.addRow("Modality", self.modality_combo)
        folder_row = QHBoxLayout()
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("training-set folder (created on first use)")
        self.folder_edit.editingFinished.connect(self._update_count)
        browse = QToolButton()
        browse.setText("…")
        browse.clicked.connect(self._browse_folder)
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(browse)
        form.addRow("Folder", folder_row)
        self.add_button = QPushButton("Add to training set")
        self.add_button.clicked.connect(self.add_to_training_set)
        form.addRow(self.add_button)
        self.count_label = QLabel("")
        form.addRow(self.count_label)
        layout.addWidget(add_box)

        ft_box = QGroupBox("Fine-tune")
        ft_form = QFormLayout(ft_box)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 100)
        self.epochs_spin.setValue(4)
        ft_form.addRow("Epochs", self.epochs_spin)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 10000)
        self.steps_spin.setValue(25)
        ft_form.addRow("Steps per epoch", self.steps_spin)
        buttons, self.finetune_button, self.cancel_button = run_cancel_row(
            "Fine-tune", self.start_finetune, self.cancel
        )
        ft_form.addRow(buttons)
        self.progress_bar = idle_progress_bar()
        ft_form.addRow(self.progress_bar)
        switch = QHBoxLayout()
        self.use_button = QPushButton("Use fine-tuned model")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self.use_finetuned)
        self.back_button = QPushButton("Back to previous model")
        self.back_button.setEnabled(False)
        self.back_button.clicked.connect(self.back_to_previous)
        switch.addWidget(self.use_button)
        switch.addWidget(self.back_button)
        ft_form.addRow(switch)
        layout.addWidget(ft_box)
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose or create a training-set folder")
        if folder:
            self.set_folder(folder)

    def _refresh_layers(self, event: Any = None) -> None:
        current = self.image_combo.currentText()
        images = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(images)
        if current in images:
            self.image_combo.setCurrentIndex(images.index(current))
        self.image_combo.blockSignals(False)
        checked = {self.labels_list.item(i).text() for i in range(self.labels_list.count())
                   if self.labels_list.item(i).checkState() == Qt.CheckState.Checked}
        known = {self.labels_list.item(i).text() for i in range(self.labels_list.count())}
        self.labels_list.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                item = QListWidgetItem(layer.name)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                on = layer.name in checked or layer.name not in known
                item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
                self.labels_list.addItem(item)

    # ------------------------------------------------------------------ settings

    def set_folder(self, folder: str | os.PathLike) -> None:
        self.folder_edit.setText(os.fspath(folder))
        self._update_count()

    def folder(self) -> Path | None:
        text = self.folder_edit.text().strip()
        return Path(text).expanduser() if text else None

    def set_image_layer(self, name: str) -> None:
        index = self.image_combo.findText(name)
        if index < 0:
            raise ValueError(f"{name!r} is not an Image layer of this viewer")
        self.image_combo.setCurrentIndex(index)

    def set_checked_labels(self, names: list[str]) -> None:
        """Check exactly the Labels layers called ``names``."""
        for i in range(self.labels_list.count()):
            item = self.labels_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def set_modality(self, text: str) -> None:
        self.modality_combo.setCurrentText(text)

    def set_segmentation_widget(self, widget: Any) -> None:
        """The EM-CLIP widget whose model the switch changes (default: the one docked here)."""
        self._segmentation_widget = widget

    def segmentation_widget(self) -> Any:
        if self._segmentation_widget is not None:
            return self._segmentation_widget
        window = getattr(self.viewer, "window", None)
        try:
            docked = list(window.dock_widgets.values()) if window is not None else []
        except (AttributeError, RuntimeError):
            docked = []
        for widget in docked:
            if hasattr(widget, "set_model_source") and hasattr(widget, "model_source"):
                return widget
        return None

    def _update_count(self) -> None:
        folder = self.folder()
        if folder is None:
            self.count_label.setText("")
            return
        from emclip.data.user_dataset import training_set_size

        self.count_label.setText(f"{training_set_size(folder)} images in {folder.name}")

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    # ------------------------------------------------------------------ add

    def add_to_training_set(self) -> Path | None:
        """Store the chosen image and checked masks; returns the image path (None on error)."""
        from emclip.data.user_dataset import add_to_training_set
        from emclip.errors import EMClipError

        folder = self.folder()
        image = next((layer for layer in self.viewer.layers
                      if isinstance(layer, Image) and layer.name == self.image_combo.currentText()), None)
        names = [self.labels_list.item(i).text() for i in range(self.labels_list.count())
                 if self.labels_list.item(i).checkState() == Qt.CheckState.Checked]
        labels = [layer for layer in self.viewer.layers if isinstance(layer, Labels) and layer.name in names]
        problem = ("choose a training-set folder" if folder is None else "choose an Image layer" if image is None
                   else "check at least one Labels layer (named after its prompt)" if not labels else "")
        if problem:
            self._set_status(f"Cannot add: {problem}.")
            show_error(f"EM-CLIP: {problem}")
            return None
        try:
            pixels = current_slice(image, self.viewer)
            masks: dict[str, np.ndarray] = {}
            for layer in labels:
                mask = current_slice(layer, self.viewer)
                masks[prompt_of(layer)] = np.asarray(mask) != 0
            path = add_to_training_set(folder, pixels, masks, modality=self.modality_combo.currentText(),
                                       name=image.name)
        except (EMClipError, ValueError, OSError) as exc:
            self._set_status(f"Not added: {exc}")
            show_error(f"EM-CLIP: {exc}")
            return None
        self._update_count()
        self._set_status(f"Added {path.name} with {', '.join(masks)}.")
        self.added.emit(str(path))
        return path

    # ------------------------------------------------------------------ fine-tune

    @property
    def is_running(self) -> bool:
        return self._process is not None

    def start_model(self) -> str:
        """The model to start from: the EM-CLIP widget's checkpoint folder, else the bundled one."""
        widget = self.segmentation_widget()
        source = widget.model_source() if widget is not None else None
        if source and Path(source).is_dir():
            return str(source)
        return "default"

    def new_checkpoint_dir(self, folder: Path) -> Path:
        """``<folder>-models/finetune-<time>`` next to the training set."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = folder.parent / f"{folder.name}-models"
        out = base / f"finetune-{stamp}"
        k = 1
        while out.exists():
            k += 1
            out = base / f"finetune-{stamp}-{k}"
        return out

    def finetune_command(self, out_dir: Path, from_model: str | None = None) -> list[str]:
        folder = self.folder()
        return [*self.command_prefix[1:], "finetune", str(folder), "--from", from_model or self.start_model(),
                "--out", str(out_dir), "--epochs", str(self.epochs_spin.value()),
                "--steps", str(self.steps_spin.value()), "--progress", "lines"]

    def start_finetune(self, *, from_model: str | None = None, extra_args: list[str] | None = None) -> bool:
        """Start ``emclip finetune`` on the folder in a separate process; False if it cannot start."""
        if self._process is not None:
            return False
        folder = self.folder()
        from emclip.data.user_dataset import training_set_size

        if folder is None or training_set_size(folder) == 0:
            self._set_status("Add at least one corrected image to the training set first.")
            show_error("EM-CLIP: the training set is empty")
            return False
        out = self.new_checkpoint_dir(folder)
        self._out_dir = out
        self._stdout_buffer = ""
        self._stderr_tail = []
        self._cancelling = False
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        proc.setProcessEnvironment(env)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_process_error)
        self._process = proc
        self.finetune_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy until the first progress line
        self._set_status("Fine-tuning: starting a separate process…")
        proc.start(self.command_prefix[0], self.finetune_command(out, from_model) + list(extra_args or []))
        return True

    def cancel(self) -> None:
        """Ask the process to stop (SIGTERM: it stops after the current step, writing nothing);
        kill it if it has not stopped after :data:`CANCEL_GRACE_MS`."""
        if self._process is None:
            return
        self._cancelling = True
        self.cancel_button.setEnabled(False)
        self._set_status("Cancelling…")
        self._process.terminate()
        self._kill_timer.start(CANCEL_GRACE_MS)

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    def _read_stdout(self) -> None:
        if self._process is None:
            return
        self._stdout_buffer += bytes(self._process.readAllStandardOutput()).decode("utf-8", "replace")
        *lines, self._stdout_buffer = self._stdout_buffer.split("\n")
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "progress" and parts[1].isdigit() and parts[2].isdigit():
                done, total = int(parts[1]), int(parts[2])
                self.progress_bar.setRange(0, max(total, 1))
                self.progress_bar.setValue(done)
                self._set_status(f"Fine-tuning: step {done} of {total}.")
                self.progress_changed.emit(done, total)
            elif len(parts) == 3 and parts[0] == "val":
                self._set_status(f"Fine-tuning: epoch {parts[1]}, held-out Dice {float(parts[2]):.3f}.")

    def _read_stderr(self) -> None:
        if self._process is None:
            return
        text = bytes(self._process.readAllStandardError()).decode("utf-8", "replace")
        self._stderr_tail = (self._stderr_tail + [s for s in text.splitlines() if s.strip()])[-20:]

    def _on_process_error(self, error: Any) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._stderr_tail.append(f"could not start {self.command_prefix[0]}")
            self._on_finished(-1, QProcess.ExitStatus.CrashExit)

    def _on_finished(self, exit_code: int, exit_status: Any = None) -> None:
        if self._process is None:
            return
        self._read_stdout()
        self._read_stderr()
        self._kill_timer.stop()
        proc, self._process = self._process, None
        proc.deleteLater()
        self.finetune_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        out = self._out_dir
        complete = exit_code == 0 and out is not None and (out / "model.safetensors").is_file()
        if complete:
            self.last_checkpoint = out
            self.progress_bar.setValue(1)
            self.use_button.setEnabled(True)
            self._set_status(f"Fine-tuned model ready: {out}. Use it with 'Use fine-tuned model'.")
            show_info(f"EM-CLIP: fine-tuned model saved to {out}")
            status = "done"
        elif self._cancelling:
            self.progress_bar.setValue(0)
            self._set_status("Fine-tuning cancelled; no checkpoint was written.")
            status = "cancelled"
        else:
            self.progress_bar.setValue(0)
            errors = [s for s in self._stderr_tail if "error" in s.lower()] or self._stderr_tail
            reason = errors[-1] if errors else f"exit code {exit_code}"
            self._set_status(f"Fine-tuning failed: {reason}")
            show_error(f"EM-CLIP fine-tuning failed: {reason}")
            status = "error"
        self.finetune_finished.emit(status)

    # ------------------------------------------------------------------ model switch

    def use_finetuned(self) -> bool:
        """Switch the EM-CLIP widget to the last fine-tuned checkpoint (remembering its model)."""
        if self.last_checkpoint is None:
            return False
        widget = self.segmentation_widget()
        if widget is None:
            self._set_status(f"No EM-CLIP widget is open: choose 'checkpoint folder…' there and pick "
                             f"{self.last_checkpoint}")
            return False
        current = widget.model_source()
        if current != str(self.last_checkpoint):
            self._previous_model = (True, current)
        widget.set_model_source(str(self.last_checkpoint))
        self.use_button.setEnabled(False)
        self.back_button.setEnabled(True)
        self._set_status(f"EM-CLIP now uses the fine-tuned model {self.last_checkpoint}.")
        return True

    def back_to_previous(self) -> bool:
        """Give the EM-CLIP widget back the model it had before :meth:`use_finetuned`."""
        remembered, previous = self._previous_model
        widget = self.segmentation_widget()
        if not remembered or widget is None:
            return False
        widget.set_model_source(previous)
        self.back_button.setEnabled(False)
        self.use_button.setEnabled(self.last_checkpoint is not None)
        self._set_status(f"EM-CLIP uses {previous or 'the bundled default model'} again.")
        return True

    def closeEvent(self, event: Any) -> None:
        if self._process is not None:
            self._process.terminate()
            if not self._process.waitForFinished(CANCEL_GRACE_MS):
                self._process.kill()
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.disconnect(self._refresh_layers)
        super().closeEvent(event)
