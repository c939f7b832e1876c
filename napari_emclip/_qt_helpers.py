"""Small Qt building blocks shared by the dock widgets (Run/Cancel row, progress bar, status).

Importing this module loads only qtpy (no torch, no model code).
"""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton


def run_cancel_row(
    run_text: str, on_run: Callable[[], object], on_cancel: Callable[[], object]
) -> tuple[QHBoxLayout, QPushButton, QPushButton]:
    """A row with a start button (``run_text``) and a Cancel button (disabled until started).

    Returns ``(row, run_button, cancel_button)``; the buttons are connected to ``on_run`` and
    ``on_cancel``.
    """
    row = QHBoxLayout()
    run_button = QPushButton(run_text)
    run_button.clicked.connect(on_run)
    cancel_button = QPushButton("Cancel")
    cancel_button.setEnabled(False)
    cancel_button.clicked.connect(on_cancel)
    row.addWidget(run_button)
    row.addWidget(cancel_button)
    return row, run_button, cancel_button


def idle_progress_bar() -> QProgressBar:
    """A progress bar at 0 of range 0..1 (nothing running)."""
    bar = QProgressBar()
    bar.setRange(0, 1)
    bar.setValue(0)
    return bar


def status_label(text: str = "Ready.") -> QLabel:
    """A word-wrapped, mouse-selectable status label showing ``text`` (default ``"Ready."``)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label
