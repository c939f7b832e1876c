"""The "fine-tune on corrections" dock widget: add to the training set, fine-tune in a separate
process (tiny checkpoint), switch the EM-CLIP widget's model and back, cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny EM-CLIP, written by another process: torch (and Triton's LLVM) must not load
    in this one, which renders with Mesa's LLVM (the two clash)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("base") / "tiny"
    code = ("import sys, torch; from emclip.factory import create_model; from emclip.checkpoint import save_checkpoint;"
            "torch.manual_seed(0); save_checkpoint(create_model('tiny'), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, timeout=600)
    return folder


@pytest.fixture
def user_model(tmp_path) -> Path:
    """A folder standing for the model the EM-CLIP widget uses (the stub never loads it)."""
    folder = tmp_path / "user_model"
    folder.mkdir()
    return folder


def disc_and_cup(shape=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    return r < 15, r < 6


@pytest.fixture
def viewer_with_corrections(make_napari_viewer):
    """A viewer with an RGB image and two Labels layers as the EM-CLIP widget names them."""
    from napari_emclip._layers import META_KEY

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image((rng.random((48, 64, 3)) * 255).astype(np.uint8), name="eye", rgb=True)
    disc, cup = disc_and_cup()
    viewer.add_labels(disc.astype(np.uint8), name="optic disc")
    # a second run's output gets a " [2]" suffix; the feature table keeps the prompt
    viewer.add_labels(cup.astype(np.uint8) * 2, name="optic cup [2]", features={"index": [2], "name": ["optic cup"]},
                      metadata={META_KEY: {"role": "prompt"}})
    viewer.add_labels(np.zeros((48, 64), np.uint8), name="scratch")
    return viewer


def make_widget(viewer, folder: Path):
    from napari_emclip._training_widget import TrainingWidget

    widget = TrainingWidget(viewer)
    widget.set_folder(folder)
    widget.set_image_layer("eye")
    widget.set_checked_labels(["optic disc", "optic cup [2]"])
    widget.set_modality("colour fundus photograph")
    return widget


def test_add_to_training_set_writes_the_dataset(viewer_with_corrections, qtbot, tmp_path):
    from emclip.data.folder import FolderDataset

    widget = make_widget(viewer_with_corrections, tmp_path / "mine")
    qtbot.addWidget(widget)
    with qtbot.waitSignal(widget.added, timeout=5000) as signal:
        widget.add_button.click()
    path = Path(signal.args[0])
    assert path == tmp_path / "mine" / "images" / "eye.png" and path.is_file()
    ds = FolderDataset(tmp_path / "mine")
    assert ds.spec.structure_names == ["optic disc", "optic cup"]  # prompt names, no " [2]"
    sample = ds[0]
    disc, cup = disc_and_cup()
    masks = sample.structure_masks()
    assert np.array_equal(masks[0], disc) and np.array_equal(masks[1], cup)
    assert np.array_equal(sample.image, viewer_with_corrections.layers["eye"].data)
    assert "1 images in mine" == widget.count_label.text()
    # nothing checked -> refused, nothing written
    widget.set_checked_labels([])
    assert widget.add_to_training_set() is None
    assert len(FolderDataset(tmp_path / "mine")) == 1 and "Labels" in widget.status_label.text()


def test_a_stack_stores_the_slice_on_screen(make_napari_viewer, qtbot, tmp_path):
    from emclip.data.folder import FolderDataset

    from napari_emclip._training_widget import TrainingWidget

    viewer = make_napari_viewer()
    stack = np.arange(5 * 20 * 24, dtype=np.uint16).reshape(5, 20, 24)
    labels = np.zeros((5, 20, 24), np.uint8)
    labels[3, 5:10, 5:12] = 1
    viewer.add_image(stack, name="lge")
    viewer.add_labels(labels, name="myocardium")
    viewer.dims.set_current_step(0, 3)
    widget = TrainingWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_folder(tmp_path / "cardiac")
    widget.set_modality("cardiac MRI")
    assert widget.add_to_training_set() is not None
    sample = FolderDataset(tmp_path / "cardiac")[0]
    assert np.array_equal(sample.image, stack[3]) and np.array_equal(sample.structure_masks()[0], labels[3] > 0)


STUB = """
import argparse, os, signal, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("command"); ap.add_argument("dataset"); ap.add_argument("--from", dest="src")
ap.add_argument("--out"); ap.add_argument("--epochs", type=int); ap.add_argument("--steps", type=int)
ap.add_argument("--progress"); ap.add_argument("--sleep", type=float, default=0.0)
a = ap.parse_args()
assert a.command == "finetune" and a.progress == "lines" and os.path.isdir(a.dataset), sys.argv
total = a.epochs * a.steps
for k in range(total + 1):
    print(f"progress {k} {total}", flush=True)
    time.sleep(a.sleep)
os.makedirs(a.out)
for name in ("config.json", "model.safetensors"):
    open(os.path.join(a.out, name), "w").write(a.src)
print(f"checkpoint {a.out}", flush=True)
"""


@pytest.fixture
def stub_command(tmp_path) -> list[str]:
    """Stands in for ``python -m emclip.cli.main``: same arguments, progress lines, a checkpoint
    folder at the end (no model work, so the Qt side is tested in well under a second)."""
    import sys

    path = tmp_path / "stub_finetune.py"
    path.write_text(STUB)
    return [sys.executable, str(path)]


def test_finetune_process_progress_then_switch_models_and_back(viewer_with_corrections, qtbot, tmp_path,
                                                               stub_command, user_model):
    from napari_emclip._widget import EMClipWidget

    viewer = viewer_with_corrections
    main = EMClipWidget(viewer)
    viewer.window.add_dock_widget(main, name="EM-CLIP segmentation")
    main.set_model_source(str(user_model))  # the user's current model
    widget = make_widget(viewer, tmp_path / "mine")
    qtbot.addWidget(widget)
    widget.command_prefix = stub_command
    assert not widget.start_finetune()  # empty training set: refused
    assert "Add at least one" in widget.status_label.text()
    assert widget.add_to_training_set() is not None
    assert widget.segmentation_widget() is main  # found among the docked widgets
    assert widget.start_model() == str(user_model)  # fine-tunes what the user uses
    widget.epochs_spin.setValue(2)
    widget.steps_spin.setValue(3)
    seen = []
    widget.progress_changed.connect(lambda d, t: seen.append((d, t)))
    with qtbot.waitSignal(widget.finetune_finished, timeout=30000) as signal:
        assert widget.start_finetune()
        assert widget.is_running and not widget.finetune_button.isEnabled()
        assert not widget.start_finetune()  # one at a time
    assert signal.args == ["done"], widget.status_label.text()
    assert seen == [(k, 6) for k in range(7)]
    ckpt = widget.last_checkpoint
    assert ckpt.parent == tmp_path / "mine-models" and ckpt.name.startswith("finetune-")
    assert (ckpt / "model.safetensors").read_text() == str(user_model)  # --from was the user's model
    assert widget.use_button.isEnabled() and not widget.is_running
    widget.use_button.click()
    assert main.model_source() == str(ckpt)
    widget.back_button.click()
    assert main.model_source() == str(user_model)
    assert widget.use_button.isEnabled() and not widget.back_button.isEnabled()


def test_without_a_segmentation_widget_the_path_is_shown(viewer_with_corrections, qtbot, tmp_path, stub_command):
    widget = make_widget(viewer_with_corrections, tmp_path / "mine")
    qtbot.addWidget(widget)
    widget.command_prefix = stub_command
    widget.add_to_training_set()
    assert widget.start_model() == "default"
    widget.steps_spin.setValue(1)
    with qtbot.waitSignal(widget.finetune_finished, timeout=30000):
        widget.start_finetune()
    assert not widget.use_finetuned()
    assert str(widget.last_checkpoint) in widget.status_label.text()


def test_cancel_terminates_the_process_and_no_checkpoint_appears(viewer_with_corrections, qtbot, tmp_path,
                                                                 stub_command):
    widget = make_widget(viewer_with_corrections, tmp_path / "mine")
    qtbot.addWidget(widget)
    widget.command_prefix = stub_command
    widget.add_to_training_set()
    widget.steps_spin.setValue(1000)
    with qtbot.waitSignal(widget.progress_changed, timeout=30000, check_params_cb=lambda d, t: d >= 1):
        widget.start_finetune(extra_args=["--sleep", "0.05"])
    with qtbot.waitSignal(widget.finetune_finished, timeout=30000) as signal:
        widget.cancel_button.click()
    assert signal.args == ["cancelled"] and widget.last_checkpoint is None
    assert not (tmp_path / "mine-models").exists()
    assert "no checkpoint" in widget.status_label.text() and widget.finetune_button.isEnabled()


def test_a_failing_process_is_reported(viewer_with_corrections, qtbot, tmp_path):
    import sys

    widget = make_widget(viewer_with_corrections, tmp_path / "mine")
    qtbot.addWidget(widget)
    widget.add_to_training_set()
    failing = "import sys; print('emclip: error: bad model', file=sys.stderr); sys.exit(2)"
    widget.command_prefix = [sys.executable, "-c", failing]
    with qtbot.waitSignal(widget.finetune_finished, timeout=30000) as signal:
        widget.start_finetune()
    assert signal.args == ["error"] and "bad model" in widget.status_label.text()


# ------------------------------------------------------------------ the real command (slow: model work)


@pytest.mark.slow
def test_real_finetune_subprocess_finishes_and_is_switched_to(viewer_with_corrections, qtbot, tmp_path,
                                                               tiny_checkpoint):
    import json

    from napari_emclip._widget import EMClipWidget

    viewer = viewer_with_corrections
    main = EMClipWidget(viewer)
    viewer.window.add_dock_widget(main, name="EM-CLIP segmentation")
    main.set_model_source(str(tiny_checkpoint))
    widget = make_widget(viewer, tmp_path / "mine")
    qtbot.addWidget(widget)
    assert widget.add_to_training_set() is not None
    widget.epochs_spin.setValue(1)
    widget.steps_spin.setValue(2)
    with qtbot.waitSignal(widget.finetune_finished, timeout=300000) as signal:
        widget.start_finetune(extra_args=["--batch-size", "2"])
    assert signal.args == ["done"], widget.status_label.text()
    ckpt = widget.last_checkpoint
    assert json.loads((ckpt / "config.json").read_text())["name"] == "tiny"
    assert json.loads((ckpt / "finetune.json").read_text())["steps_done"] == 2
    widget.use_finetuned()
    assert main.model_source() == str(widget.last_checkpoint)
    widget.back_to_previous()
    assert main.model_source() == str(tiny_checkpoint)


@pytest.mark.slow
def test_real_finetune_cancel_leaves_no_checkpoint(viewer_with_corrections, qtbot, tmp_path, tiny_checkpoint):
    widget = make_widget(viewer_with_corrections, tmp_path / "mine")
    qtbot.addWidget(widget)
    widget.add_to_training_set()
    widget.epochs_spin.setValue(1)
    widget.steps_spin.setValue(10000)
    with qtbot.waitSignal(widget.progress_changed, timeout=300000, check_params_cb=lambda d, t: d >= 1):
        widget.start_finetune(from_model=str(tiny_checkpoint), extra_args=["--batch-size", "2"])
    with qtbot.waitSignal(widget.finetune_finished, timeout=60000) as signal:
        widget.cancel_button.click()
    assert signal.args == ["cancelled"]
    models = tmp_path / "mine-models"
    assert not models.exists() or list(models.iterdir()) == []  # SIGTERM: no checkpoint, no work folder


def test_importing_and_building_the_widget_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, napari; from napari_emclip._training_widget import TrainingWidget; "
            "v = napari.Viewer(show=False); w = TrainingWidget(v); "
            "print(sorted(m for m in ('torch', 'open_clip', 'emclip.train') if m in sys.modules)); v.close()")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
