"""``emclip demo``: napari with the fundus sample and the EM-CLIP widget docked.

With ``screenshot`` set, the default prompts are run on the sample, and once the layers are in
the viewer the whole window is saved as a PNG (atomically) and napari exits: the exit code is 0
only if the run succeeded and the file was written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ._samples import fundus_sample

WIDGET_NAME = "EM-CLIP segmentation"
RENDER_DELAY_MS = 500
"""Time given to the canvas to draw the new layers before the screenshot."""
WINDOW_SIZE = (1500, 950)
"""Window size (width, height) of the demo, so the canvas gets most of the screenshot."""


def has_display() -> bool:
    """False on Linux/BSD when no X11/Wayland display (nor a Qt platform override) is set."""
    if not sys.platform.startswith(("linux", "freebsd")):
        return True
    return any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"))


def run_demo(
    screenshot: str | None = None,
    model: str | None = None,
    threshold: float | None = None,
    prompts: str | None = None,
    timeout: float = 600.0,
) -> int:
    """Open the demo; with ``screenshot`` run, save the window to that PNG and exit.

    ``model``: None for the bundled default, a config name (e.g. ``"tiny"``) or a checkpoint
    folder. ``threshold`` and ``prompts`` override the widget's defaults (0.5; the fundus
    presets). ``timeout`` (seconds) bounds the screenshot run. Returns a process exit code.
    """
    if not has_display():
        print(
            "emclip demo needs a display: none was found (DISPLAY/WAYLAND_DISPLAY are unset). "
            "On a headless machine run it under Xvfb: xvfb-run -a emclip demo ...",
            file=sys.stderr,
        )
        return 2
    import napari
    from napari.layers import Layer
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(title="EM-CLIP demo")
    viewer.window.resize(*WINDOW_SIZE)
    image = None
    for data, kwargs, layer_type in fundus_sample():
        image = Layer.create(data, kwargs, layer_type)
        viewer.layers.append(image)
    _, widget = viewer.window.add_plugin_dock_widget("napari-emclip", WIDGET_NAME)
    widget.set_image_layer(image)
    widget.set_modality("fundus")
    if prompts:
        widget.set_prompts(prompts)
    if model:
        widget.set_model_source(model)
    if threshold is not None:
        widget.threshold_spin.setValue(float(threshold))
    if screenshot is None:
        napari.run()
        return 0

    target = Path(screenshot).expanduser().resolve()
    if target.suffix.lower() != ".png":
        print(f"--screenshot must name a .png file, got {target.name}", file=sys.stderr)
        viewer.close()
        return 2
    state = {"code": 1}

    def shoot(status: str) -> None:
        from emclip.io import atomic_path

        if status == "done":
            viewer.reset_view()
            with atomic_path(target) as tmp:
                viewer.screenshot(str(tmp), canvas_only=False)
            print(f"saved {target}")
            state["code"] = 0
        else:
            print(f"EM-CLIP demo: run {status}: {widget.last_message[1]}", file=sys.stderr)
        viewer.close()

    def on_finished(status: str) -> None:
        QTimer.singleShot(RENDER_DELAY_MS, lambda: shoot(status))

    def start() -> None:
        if not widget.run():
            print(f"EM-CLIP demo: could not start: {widget.last_message[1]}", file=sys.stderr)
            viewer.close()

    def on_timeout() -> None:
        if widget.is_running:
            print(f"EM-CLIP demo: no result after {timeout:.0f} s; giving up", file=sys.stderr)
            state["code"] = 3
            widget.cancel()
            widget.run_finished.disconnect(on_finished)
            viewer.close()

    widget.run_finished.connect(on_finished)
    QTimer.singleShot(0, start)
    QTimer.singleShot(int(timeout * 1000), on_timeout)
    napari.run()
    return state["code"]
