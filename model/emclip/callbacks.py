"""Progress and cancel callbacks shared by inference, training, the CLI and the napari widget.

Library functions never draw anything: they call ``progress(done, total)`` and poll
``cancel()``; the CLI wires these to a tqdm bar and Ctrl-C, the widget to a progress bar and a
Cancel button.
"""

from __future__ import annotations

from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: ``done`` steps of ``total`` are finished."""

CancelCallback = Callable[[], bool]
"""``cancel() -> bool``: return True to stop the running call (it raises :class:`Cancelled`)."""


def check_cancel(cancel: Optional[CancelCallback]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is given and returns True."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressCallback], done: int, total: int) -> None:
    """Call ``progress(done, total)`` if a callback is given."""
    if progress is not None:
        progress(int(done), int(total))
