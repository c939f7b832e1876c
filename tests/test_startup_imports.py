"""``import napari_emclip``, plugin discovery and building the widget must not import torch.

Each check runs in a fresh interpreter and reports which heavy modules ended up in sys.modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "open_clip", "timm", "transformers", "torchvision")

PRELUDE = textwrap.dedent(
    f"""
    import json, sys
    HEAVY = {HEAVY!r}
    def heavy():
        return sorted({{m.split('.')[0] for m in sys.modules}} & set(HEAVY))
    """
)


def run_python(code: str, timeout: float = 120) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_check_itself_sees_torch():
    # guards against a check that can never fail (e.g. a wrong module name)
    assert run_python("import torch\nprint(json.dumps(heavy()))") == ["torch"]


def test_import_and_plugin_modules_are_torch_free():
    found = run_python(
        """
        import napari_emclip
        first = heavy()
        import napari_emclip._samples, napari_emclip._writer, napari_emclip._layers, napari_emclip._worker
        from npe2 import PluginManager
        pm = PluginManager.instance()
        pm.discover()
        mf = pm.get_manifest("napari-emclip")
        assert mf.name == "napari-emclip"
        import numpy as np, tempfile, os
        d = tempfile.mkdtemp()
        napari_emclip._writer.write_labels(os.path.join(d, "m.tif"), np.ones((4, 4), np.uint8), {"name": "x"})
        print(json.dumps({"import": first, "after": heavy()}))
        """
    )
    assert found == {"import": [], "after": []}


@pytest.mark.gui
def test_napari_startup_and_widget_are_torch_free():
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X server (pytest-xvfb provides one)")
    found = run_python(
        """
        import napari
        viewer = napari.Viewer(show=False)
        after_viewer = heavy()
        dock, widget = viewer.window.add_plugin_dock_widget("napari-emclip", "EM-CLIP segmentation")
        names = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
        result = {"viewer": after_viewer, "widget": heavy(), "has_tiny": "config: tiny (untrained)" in names}
        viewer.close()
        print(json.dumps(result))
        """
    )
    assert found == {"viewer": [], "widget": [], "has_tiny": True}


@pytest.mark.gui
def test_torch_stack_loads_after_napari_opened_its_opengl_canvas():
    """Mesa's OpenGL drivers load libLLVM; Triton's own LLVM loaded afterwards segfaults.

    The widget's worker calls ``block_triton_if_llvm_loaded`` first: with napari's canvas
    already drawn, importing the model stack (torchvision pulls Triton in) must not crash.
    """
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X server (pytest-xvfb provides one)")
    found = run_python(
        """
        import napari
        from napari_emclip._worker import block_triton_if_llvm_loaded
        viewer = napari.Viewer(show=True)
        viewer.screenshot(canvas_only=True)  # the OpenGL context exists and has drawn
        with open("/proc/self/maps") as f:
            llvm = any("libLLVM" in line for line in f)
        blocked = block_triton_if_llvm_loaded()
        import torchvision.ops  # imports Triton when it is importable
        viewer.close()
        print(json.dumps({"llvm": llvm, "blocked": blocked, "torch": "torch" in heavy()}))
        """,
        timeout=300,
    )
    assert found["blocked"] == found["llvm"] and found["torch"]


@pytest.mark.slow
@pytest.mark.gui
def test_emclip_demo_screenshot(tmp_path):
    """``emclip demo --screenshot`` runs the presets on the fundus sample and saves the window."""
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X server (pytest-xvfb provides one)")
    from PIL import Image

    from napari_emclip._demo import WINDOW_SIZE

    target = tmp_path / "demo.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "emclip.cli.main",
            "demo",
            "--screenshot",
            str(target),
            "--model",
            "tiny",
            "--threshold",
            "0.05",
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Done: 2 labels layer(s)" in out.stderr + out.stdout
    with Image.open(target) as img:
        assert img.size[0] >= WINDOW_SIZE[0] * 0.9  # the whole window, not just the canvas
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]


def test_emclip_demo_without_a_display_says_how_to_run_it():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    }
    out = subprocess.run(
        [sys.executable, "-m", "emclip.cli.main", "demo"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2
    assert "xvfb-run" in out.stderr and "Traceback" not in out.stderr
