"""Extra sections of the EM-CLIP dock widget: reference exemplar, automatic mode, sequences.

Thin client code: each section only collects inputs and turns them into arguments of the
library call; ``emclip`` does the work. :class:`Sections` builds the Qt controls and
:meth:`Sections.prepare` fills a :class:`~napari_emclip._worker.RunRequest`:

- *Reference* (a checkable group): a Labels layer drawn on another image, that image, the
  structure name (default: the Labels layer's name) and a label id (0 = every nonzero pixel)
  become ``exemplars=[emclip.Exemplar(image, mask, name)]``; "exemplar only" sets
  ``exemplar_mode="only"`` (default ``"combine"``).
- *Automatic* button: the same run with ``prompts=None`` (prompt-free: the library recognises
  the modality and segments every structure it knows); a message then names the modality, its
  confidence and the known structures not found.
- *Sequences*: further Image layers ticked as extra channels of the picked image are stacked
  with :func:`~napari_emclip._volumes.check_image_layers` (stacked in the worker) and segmented by
  ``emclip.segment_volume(..., channel_axis=-1, channels=names, affine=affine, axis=...)``;
  a single 3D layer opened by the NIfTI reader (``metadata['nifti']``) goes through
  ``segment_volume`` too. ``axis`` is the anatomical axis picker (default "axial").

Imports neither torch nor ``emclip.inference`` (``emclip.Exemplar`` is numpy only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from emclip.errors import InvalidArgumentError, InvalidExemplarError
from emclip.prompts import parse_prompts
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ._layers import layer_image_data
from ._volumes import META_KEY, check_image_layers, layer_world_matrix, ras_affine_of

if TYPE_CHECKING:
    from ._worker import RunRequest

ANATOMICAL_AXES = ("axial", "coronal", "sagittal")


def _words(key: str) -> str:
    return str(key).replace("_", " ")


def is_nifti_volume(layer: Any) -> bool:
    """True for a single-channel 3D Image layer made by the NIfTI reader."""
    meta = getattr(layer, "metadata", None)
    return (
        isinstance(meta, dict)
        and isinstance(meta.get(META_KEY), dict)
        and not getattr(layer, "rgb", False)
        and np.ndim(layer_image_data(layer)) == 3
    )


def reference_exemplar(
    labels: Labels | None, image: Image | None, name: str = "", label_id: int = 0
) -> Any:
    """``emclip.Exemplar`` from a reference Labels layer and the Image layer it was drawn on.

    ``name`` empty = the Labels layer's name; ``label_id`` 0 = every nonzero label, else only
    that label. Raises :class:`emclip.InvalidExemplarError` (a ValueError) saying how to fix
    a missing layer, an empty mask or a mask whose shape does not match its image.
    """
    from emclip.exemplars import Exemplar

    if labels is None or image is None:
        raise InvalidExemplarError(
            "Reference: pick a Labels layer and the Image layer it was drawn on (or untick 'Reference')."
        )
    mask_data = np.asarray(layer_image_data(labels))
    img = np.asarray(layer_image_data(image))
    hw = img.shape[:2] if image.rgb else img.shape
    if tuple(mask_data.shape) != tuple(hw):
        raise InvalidExemplarError(
            f"Reference: the Labels layer {labels.name!r} is {mask_data.shape} but its image "
            f"{image.name!r} is {tuple(hw)}; draw the reference mask on that image (same shape)."
        )
    if img.ndim - (1 if image.rgb else 0) != 2:
        raise InvalidExemplarError(
            f"Reference: {image.name!r} is not a 2D image; a reference exemplar is one 2D image "
            "with its mask (take a slice first)."
        )
    mask = mask_data == label_id if label_id else mask_data > 0
    if not mask.any():
        which = f"label {label_id}" if label_id else "any label"
        raise InvalidExemplarError(
            f"Reference: the Labels layer {labels.name!r} has no pixel with {which}; paint the "
            "structure on the reference image first."
        )
    return Exemplar(img, mask, (name or "").strip() or str(labels.name))


class Sections:
    """The Reference group, the Sequences group and the Automatic button of one widget.

    ``widget`` is the :class:`~napari_emclip._widget.EMClipWidget`; the groups are added to
    ``layout`` (its main vertical layout), the button is :attr:`automatic_button` (the widget
    places it next to Run).
    """

    def __init__(self, widget: Any, layout: QVBoxLayout) -> None:
        self.widget = widget
        self.viewer = widget.viewer
        self._automatic_next = False
        self._automatic_run = False
        self.last_message = ""

        self.reference_group = QGroupBox("Reference exemplar")
        self.reference_group.setCheckable(True)
        self.reference_group.setChecked(False)
        self.reference_group.setToolTip(
            "Segment what a mask painted on another image shows (visual prompt)"
        )
        form = QFormLayout(self.reference_group)
        self.reference_labels_combo = QComboBox()
        self.reference_labels_combo.setToolTip(
            "Labels layer marking the structure on the reference image"
        )
        self.reference_labels_combo.currentIndexChanged.connect(self._on_reference_labels)
        form.addRow("Mask", self.reference_labels_combo)
        self.reference_image_combo = QComboBox()
        self.reference_image_combo.setToolTip("The Image layer the mask was drawn on")
        form.addRow("On image", self.reference_image_combo)
        self.reference_name_edit = QLineEdit()
        self.reference_name_edit.setPlaceholderText(
            "structure name (default: the mask layer's name)"
        )
        form.addRow("Name", self.reference_name_edit)
        self.reference_label_spin = QSpinBox()
        self.reference_label_spin.setRange(0, 2**31 - 1)
        self.reference_label_spin.setSpecialValueText("any nonzero")
        self.reference_label_spin.setToolTip(
            "Use only this label id of the mask (0: every nonzero pixel)"
        )
        form.addRow("Label", self.reference_label_spin)
        self.exemplar_only_check = QCheckBox("exemplar only (ignore the text of a matching prompt)")
        form.addRow(self.exemplar_only_check)
        layout.addWidget(self.reference_group)

        self.sequences_group = QGroupBox("Sequences (3D volumes)")
        seq_form = QFormLayout(self.sequences_group)
        self.channels_list = QListWidget()
        self.channels_list.setToolTip(
            "Tick further Image layers (other MRI sequences on the same grid) to use as channels "
            "after the picked image"
        )
        self.channels_list.setMaximumHeight(80)
        seq_form.addRow("Extra channels", self.channels_list)
        self.axis_combo = QComboBox()
        self.axis_combo.addItems(ANATOMICAL_AXES)
        self.axis_combo.setToolTip(
            "Anatomical slice direction for NIfTI volumes and stacked sequences"
        )
        seq_form.addRow("Slices", self.axis_combo)
        layout.addWidget(self.sequences_group)

        self.automatic_button = QPushButton("Automatic")
        self.automatic_button.setToolTip(
            "No prompts: recognise the modality and segment every structure the model knows "
            "for it (the Modality picker, the prompts and the reference are not used)"
        )
        self.automatic_button.clicked.connect(self.run_automatic)

        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.connect(self._refresh_later)
        widget.destroyed.connect(self._disconnect)
        widget.run_finished.connect(self._on_run_finished)
        widget.image_combo.currentIndexChanged.connect(self.refresh)
        self.refresh()

    # ------------------------------------------------------------------ layer lists

    def _disconnect(self, *_: Any) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            try:
                emitter.disconnect(self._refresh_later)
            except (TypeError, ValueError, RuntimeError):
                pass

    def _refresh_later(self, *_: Any) -> None:
        # after the widget's own image picker has caught up with the change
        QTimer.singleShot(0, self.refresh)

    @staticmethod
    def _fill(combo: QComboBox, layers: list[Any]) -> None:
        current = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        for layer in layers:
            combo.addItem(layer.name, layer)
        index = next((i for i, layer in enumerate(layers) if layer is current), 0 if layers else -1)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)

    def refresh(self, *_: Any) -> None:
        """Rebuild the layer pickers from the viewer (keeps choices and ticks)."""
        try:
            labels = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
            images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
            self._fill(self.reference_labels_combo, labels)
            self._fill(self.reference_image_combo, images)
            main = self.widget.current_image_layer()
            ticked = set(map(id, self.extra_channel_layers()))
            self.channels_list.clear()
            for layer in images:
                if layer is main or layer.rgb:
                    continue
                item = QListWidgetItem(layer.name)
                item.setData(Qt.ItemDataRole.UserRole, layer)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(
                    Qt.CheckState.Checked if id(layer) in ticked else Qt.CheckState.Unchecked
                )
                self.channels_list.addItem(item)
        except RuntimeError:  # the widget was deleted
            self._disconnect()

    def _on_reference_labels(self, *_: Any) -> None:
        """Default the reference image to the Image layer with the same shape as the mask."""
        labels = self.reference_labels_combo.currentData()
        if labels is None:
            return
        shape = tuple(np.shape(layer_image_data(labels)))
        for i in range(self.reference_image_combo.count()):
            image = self.reference_image_combo.itemData(i)
            data_shape = tuple(np.shape(layer_image_data(image)))
            if (data_shape[:2] if image.rgb else data_shape) == shape:
                self.reference_image_combo.setCurrentIndex(i)
                return

    # ------------------------------------------------------------------ settings (API)

    def set_reference(
        self,
        labels: Labels | None,
        image: Image | None = None,
        name: str = "",
        label_id: int = 0,
        only: bool = False,
    ) -> None:
        """Use ``labels`` drawn on ``image`` as the reference (None: no reference)."""
        self.refresh()
        self.reference_group.setChecked(labels is not None)
        if labels is None:
            return
        self.reference_labels_combo.setCurrentIndex(self.reference_labels_combo.findData(labels))
        if image is not None:
            self.reference_image_combo.setCurrentIndex(self.reference_image_combo.findData(image))
        self.reference_name_edit.setText(name)
        self.reference_label_spin.setValue(int(label_id))
        self.exemplar_only_check.setChecked(only)

    def extra_channel_layers(self) -> list[Image]:
        """The ticked extra channel layers, in list order."""
        out = []
        for i in range(self.channels_list.count()):
            item = self.channels_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.data(Qt.ItemDataRole.UserRole))
        return out

    def set_extra_channels(self, layers: list[Image]) -> None:
        self.refresh()
        wanted = set(map(id, layers))
        for i in range(self.channels_list.count()):
            item = self.channels_list.item(i)
            on = id(item.data(Qt.ItemDataRole.UserRole)) in wanted
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def set_axis(self, axis: str) -> None:
        if axis not in ANATOMICAL_AXES:
            raise ValueError(f"axis must be one of {ANATOMICAL_AXES}, got {axis!r}")
        self.axis_combo.setCurrentText(axis)

    # ------------------------------------------------------------------ runs

    def run_automatic(self, *_: Any) -> bool:
        """Start a prompt-free run (the same worker path as Run)."""
        self._automatic_next = True
        try:
            return bool(self.widget.run())
        finally:
            self._automatic_next = False

    def prompts(self, text: str) -> list[str] | None:
        """The run's prompts: None for Automatic; may be empty with a reference exemplar.
        Raises :class:`emclip.InvalidPromptError` otherwise for empty/invalid text."""
        if self._automatic_next:
            return None
        if self.reference_group.isChecked() and not text.strip():
            return []
        return parse_prompts(text)

    def prepare(self, request: RunRequest, layer: Image) -> None:
        """Add this run's section arguments to ``request`` (Qt thread, before the worker starts).

        Raises an ``emclip`` ValueError subclass with a message for bad section input.
        """
        kwargs: dict[str, Any] = {}
        self._automatic_run = request.prompts is None
        if self._automatic_run:  # the library recognises the modality (the picker is for prompts)
            request.modality = request.info.modality = None
        if self.reference_group.isChecked() and not self._automatic_run:
            exemplar = reference_exemplar(
                self.reference_labels_combo.currentData(),
                self.reference_image_combo.currentData(),
                self.reference_name_edit.text(),
                int(self.reference_label_spin.value()),
            )
            kwargs["exemplars"] = [exemplar]
            kwargs["exemplar_mode"] = "only" if self.exemplar_only_check.isChecked() else "combine"
            request.info.extra["exemplar"] = {
                "name": exemplar.name,
                "mask_layer": self.reference_labels_combo.currentText(),
            }
        extra = [item for item in self.extra_channel_layers() if item is not layer]
        if extra:
            if request.prompts is None:
                raise InvalidArgumentError(
                    "Automatic mode takes one image: untick the extra channels, or type prompts and press Run."
                )
            # checked here; stacked into one (Z, Y, X, C) array in the worker, not on the Qt thread
            arrays, names, affine = check_image_layers([layer, *extra])
            request.image = arrays
            kwargs.update(
                channel_axis=-1, channels=names, affine=affine, axis=self.axis_combo.currentText()
            )
            request.channel_axis = None  # results live on the first layer's 3D grid
            request.volume = True
            request.info.extra["channels"] = list(names)
        elif is_nifti_volume(layer) and request.channel_axis is None:
            kwargs.update(
                affine=ras_affine_of(layer_world_matrix(layer)), axis=self.axis_combo.currentText()
            )
            request.volume = True
        if request.volume:
            request.info.extra["axis"] = self.axis_combo.currentText()
        request.call_kwargs.update(kwargs)

    def _on_run_finished(self, status: str) -> None:
        """After an Automatic run: say which modality was recognised and what was not found."""
        automatic, self._automatic_run = self._automatic_run, False
        outcome = getattr(self.widget, "last_outcome", None)
        if not automatic or status != "done" or outcome is None:
            return
        info = getattr(outcome, "info", {}) or {}
        modality = info.get("modality")
        text = f"Automatic: modality {_words(modality)!s}" if modality else "Automatic"
        confidence = info.get("modality_confidence")
        if confidence is not None:
            text += f" (recognised, confidence {float(confidence):.2f})"
        elif info.get("modality_source") == "given":
            text += " (given)"
        missing = [str(s) for s in info.get("structures_not_found") or []]
        text += (
            "; not found: " + ", ".join(missing) + "."
            if missing
            else "; every known structure was found."
        )
        self.last_message = text
        show_info(text)
