"""The EM-CLIP dock widget and its layer logic, on the untrained "tiny" model.

The tiny model's weights are random, so its ``predict_logits`` is wrapped (the network still
runs) to return known masks: prompt ``i`` is a centred disc of radius ``RADII[i]`` (fraction
of the network input side, probability sigmoid(2 + 2 i) inside), and any prompt containing
"absent" is nowhere. Tests then check
behaviour (names, geometry, undo, threads), not accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_emclip import _layers
from napari_emclip._layers import build_layer_specs, plan_placements, unique_name

pytestmark = [pytest.mark.gui, pytest.mark.filterwarnings("ignore::UserWarning")]

RADII = {0: 0.35, 1: 0.15, 2: 0.25}
LOGIT = 20.0


# ============================================================================ fixtures


@pytest.fixture
def known_masks(monkeypatch):
    """The cached tiny model, with logits replaced by known discs; returns a mutable control."""
    import torch
    from emclip import inference

    control = SimpleNamespace(scale=1.0, calls=0)
    model = inference.load_model("tiny", device="cpu")
    cls = type(model)  # patched on the class: the widget loads its own instance
    original = cls.predict_logits

    def predict(self, images, prompts, modality=None):
        out = original(self, images, prompts, modality=modality)
        control.calls += 1
        h, w = out.logits.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        dist = torch.sqrt((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / h
        names = prompts[0] if prompts and isinstance(prompts[0], (list, tuple)) else prompts
        logits = torch.full_like(out.logits, -LOGIT)
        for i, name in enumerate(names):
            if "absent" in name:
                continue
            inside = dist < RADII[i % len(RADII)] * control.scale
            logits[:, i] = torch.where(inside, 2.0 + 2.0 * i, -LOGIT)  # later prompts more probable
        out.logits = logits
        return out

    monkeypatch.setattr(cls, "predict_logits", predict)
    return control


def _fundus_like(n: int = 128) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 80, size=(n, n, 3), dtype=np.uint8)
    img[n // 3 : 2 * n // 3, n // 3 : 2 * n // 3] = (230, 200, 120)
    return img


@pytest.fixture
def setup(make_napari_viewer, known_masks, qtbot):
    """A viewer with one RGB image and the widget, set to the tiny model on the CPU."""
    from napari_emclip._widget import EMClipWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(
        _fundus_like(),
        name="fundus",
        rgb=True,
        scale=(0.5, 0.25),
        translate=(10.0, -4.0),
        rotate=12.0,
    )
    widget = EMClipWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_model_source("tiny")
    widget.device_combo.setCurrentText("cpu")
    widget.set_modality("fundus")
    return SimpleNamespace(viewer=viewer, image=image, widget=widget, control=known_masks)


def run_and_wait(qtbot, widget, timeout: int = 30_000) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=timeout) as blocker:
        assert widget.run() is True
    return blocker.args[0]


def layer_names(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers]


# ============================================================================ pure layer logic


def _fake_result(n=32):
    yy, xx = np.mgrid[:n, :n]
    disc = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 3) ** 2
    cup = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 6) ** 2
    masks = np.stack([disc, cup, np.zeros_like(disc)])
    probs = masks.astype(np.float32) * 0.9
    cmap = np.where(disc, 2, 1).astype(np.int32)

    def label_image():
        out = np.zeros((n, n), np.uint8)
        out[disc] = 1
        out[cup] = 2
        return out

    return SimpleNamespace(
        prompts=["optic disc", "optic cup", "vessel"],
        masks=masks,
        probabilities=probs,
        found=np.array([True, True, False]),
        scores=np.array([0.9, 0.8, 0.0], np.float32),
        cluster_map=cmap,
        cluster_similarity=np.array([[0.1, 0.2, 0.0], [0.7, 0.5, 0.1]], np.float32),
        label_image=label_image,
    )


INFO = _layers.RunInfo(
    source_id="src",
    source_name="fundus",
    prompts=["optic disc", "optic cup", "vessel"],
    model="tiny",
    threshold=0.5,
)


def test_specs_one_labels_layer_per_found_prompt():
    specs, missing = build_layer_specs(_fake_result(), INFO, clusters=True, probabilities=True)
    assert missing == ["vessel"]
    labels = [s for s in specs if s.role == "prompt"]
    assert [s.base_name for s in labels] == ["optic disc", "optic cup"]
    # distinct label values so the layers get distinct colours; the feature row names them
    assert set(np.unique(labels[1].data)) == {0, 2}
    assert labels[1].kwargs["features"]["name"] == ["optic cup"]
    probs = [s for s in specs if s.role == "probability"]
    assert [s.base_name for s in probs] == [
        "optic disc probability",
        "optic cup probability",
        "vessel probability",
    ]
    [clusters] = [s for s in specs if s.role == "clusters"]
    assert clusters.kwargs["visible"] is False
    feats = clusters.kwargs["features"]
    assert list(feats["index"]) == [1, 2] and list(feats["pixels"]) == [
        int((~_fake_result().masks[0]).sum()),
        int(_fake_result().masks[0].sum()),
    ]
    np.testing.assert_allclose(feats["similarity: optic cup"], [0.2, 0.5])
    assert feats["closest prompt"] == ["optic cup", "optic disc"]


def test_specs_combined_layer_names_ids_in_features():
    specs, _ = build_layer_specs(_fake_result(), INFO, combined=True)
    [spec] = specs
    assert spec.base_name == _layers.COMBINED_LAYER_NAME and spec.data.dtype == np.uint8
    feats = spec.kwargs["features"]
    assert list(feats["index"]) == [1, 2, 3] and feats["name"] == [
        "optic disc",
        "optic cup",
        "vessel",
    ]
    assert list(feats["found"]) == [True, True, False]


def test_unique_names():
    assert unique_name("optic cup", ["optic disc"]) == "optic cup"
    assert unique_name("optic cup", ["optic cup", "optic cup [2]"]) == "optic cup [3]"


def test_geometry_drops_the_channel_axis():
    from napari.layers import Image

    layer = Image(np.zeros((3, 40, 50)), scale=(1.0, 0.5, 0.25), translate=(0, 5, 6), rotate=30)
    geo = _layers.geometry_of(layer, channel_axis=0)
    assert geo.scale == (0.5, 0.25) and geo.translate == (5.0, 6.0)
    np.testing.assert_allclose(geo.rotate, layer.rotate[1:, 1:])
    rgb = Image(np.zeros((40, 50, 3)), rgb=True, scale=(2, 3))
    assert _layers.geometry_of(rgb, channel_axis=-1).scale == (2.0, 3.0)


def test_placement_updates_unedited_results_undoably_and_spares_edited_ones():
    from napari.components import ViewerModel

    viewer = ViewerModel()
    viewer.add_image(np.zeros((32, 32)), name="fundus")
    geo = _layers.geometry_of(viewer.layers["fundus"])
    specs, _ = build_layer_specs(_fake_result(), INFO)
    _layers.apply_placements(viewer, plan_placements(specs, list(viewer.layers), "src"), geo)
    disc, cup = viewer.layers["optic disc"], viewer.layers["optic cup"]
    first_disc = disc.data.copy()
    cup.data_setitem((np.array([0]), np.array([0])), 7)  # the user paints one pixel
    edited_cup = cup.data.copy()

    again = _fake_result()
    again.masks[0] = np.roll(again.masks[0], 3, axis=1)  # a different result for the disc
    specs, _ = build_layer_specs(again, INFO)
    plan = plan_placements(specs, list(viewer.layers), "src")
    assert [(p.name, p.is_update) for p in plan] == [("optic disc", True), ("optic cup [2]", False)]
    _layers.apply_placements(viewer, plan, geo)
    assert viewer.layers["optic disc"] is disc and not np.array_equal(disc.data, first_disc)
    np.testing.assert_array_equal(cup.data, edited_cup)
    disc.undo()
    np.testing.assert_array_equal(disc.data, first_disc)
    # a result for another source image never reuses these layers
    other = plan_placements(specs, list(viewer.layers), "other-image")
    assert not any(p.is_update for p in other)


# ============================================================================ widget runs


def test_run_adds_labels_named_after_prompts_with_image_geometry(setup, qtbot):
    w, viewer, image = setup.widget, setup.viewer, setup.image
    w.set_prompts("optic disc, optic cup")
    w.clusters_check.setChecked(True)
    w.probabilities_check.setChecked(True)
    assert run_and_wait(qtbot, w) == "done"
    assert layer_names(viewer) == [
        "fundus",
        "optic disc probability",
        "optic cup probability",
        "optic disc",
        "optic cup",
        "EM clusters",
    ]
    n = image.data.shape[0]
    for i, name in enumerate(["optic disc", "optic cup"]):
        layer = viewer.layers[name]
        assert type(layer).__name__ == "Labels" and layer.data.shape == image.data.shape[:2]
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
        np.testing.assert_allclose(layer.rotate, image.rotate)
        np.testing.assert_allclose(layer.shear, image.shear)
        np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
        area = np.count_nonzero(layer.data) / n**2
        assert area == pytest.approx(np.pi * RADII[i] ** 2, rel=0.25)  # edges blur in upsampling
        assert layer.data[n // 2, n // 2] == i + 1 and layer.data[0, 0] == 0
        assert list(layer.features["name"]) == [name]
        assert layer.editable
    clusters = viewer.layers["EM clusters"]
    assert not clusters.visible and clusters.data.min() >= 1
    assert {"index", "similarity: optic disc", "similarity: optic cup"} <= set(
        clusters.features.columns
    )
    assert (
        len(clusters.features) == clusters.data.max()
        or len(clusters.features) >= clusters.data.max()
    )
    prob = viewer.layers["optic cup probability"]
    assert prob.data.dtype == np.float32 and prob.data[n // 2, n // 2] == pytest.approx(
        1 / (1 + np.exp(-4)), abs=0.01
    )
    np.testing.assert_allclose(prob.scale, image.scale)


def test_widget_runs_on_the_plugin_sample(make_napari_viewer, known_masks, qtbot):
    from napari_emclip._widget import EMClipWidget

    viewer = make_napari_viewer()
    [image] = viewer.open_sample("napari-emclip", "fundus")
    image.scale = (0.01, 0.01)  # mm per pixel
    widget = EMClipWidget(viewer)
    assert widget.current_image_layer() is image
    assert widget.prompts_text() == "optic disc, optic cup"  # the fundus presets
    widget.set_model_source("tiny")
    assert run_and_wait(qtbot, widget) == "done"
    assert layer_names(viewer)[1:] == ["optic disc", "optic cup"]
    assert all(tuple(viewer.layers[n].scale) == (0.01, 0.01) for n in ("optic disc", "optic cup"))
    assert viewer.layers["optic disc"].data.shape == (1411, 1411)


def test_not_found_prompt_gives_a_message_not_a_mask(setup, qtbot):
    w = setup.widget
    w.set_prompts("optic disc\nabsent thing")
    assert run_and_wait(qtbot, w) == "done"
    assert layer_names(setup.viewer) == ["fundus", "optic disc"]
    level, text = w.last_message
    assert level == "warning" and "Not found" in text and "'absent thing'" in text


def test_combined_layer(setup, qtbot):
    w = setup.widget
    w.set_prompts("optic disc, optic cup")
    w.combined_check.setChecked(True)
    assert run_and_wait(qtbot, w) == "done"
    assert layer_names(setup.viewer) == ["fundus", "EM-CLIP labels"]
    layer = setup.viewer.layers["EM-CLIP labels"]
    n = layer.data.shape[0]
    # the cup (inside the disc) is more probable there, so it wins the overlap
    assert layer.data[n // 2, n // 2] == 2 and layer.data[n // 2, n // 2 + int(0.3 * n)] == 1
    assert set(np.unique(layer.data)) == {0, 1, 2}
    assert list(layer.features["name"]) == ["optic disc", "optic cup"]
    assert list(layer.features["index"]) == [1, 2]
    np.testing.assert_allclose(layer.scale, setup.image.scale)


def test_rerun_updates_unedited_layers_undoably_and_never_overwrites_edits(setup, qtbot):
    w, viewer = setup.widget, setup.viewer
    w.set_prompts("optic disc, optic cup")
    assert run_and_wait(qtbot, w) == "done"
    disc, cup = viewer.layers["optic disc"], viewer.layers["optic cup"]
    first_disc = disc.data.copy()
    cup.paint((5, 5), 9, refresh=True)  # the user edits the cup
    edited = cup.data.copy()
    setup.control.scale = 0.6  # the next run gives smaller discs
    assert run_and_wait(qtbot, w) == "done"
    assert layer_names(viewer) == ["fundus", "optic disc", "optic cup", "optic cup [2]"]
    np.testing.assert_array_equal(cup.data, edited)  # edits untouched
    assert viewer.layers["optic disc"] is disc
    assert np.count_nonzero(disc.data) < np.count_nonzero(first_disc)  # updated in place...
    disc.undo()  # ...through the undo history
    np.testing.assert_array_equal(disc.data, first_disc)
    assert "optic cup [2]" in w.last_message[1]


def test_second_run_is_refused_while_one_is_going(setup, qtbot):
    w = setup.widget
    w.set_prompts("optic disc")
    with qtbot.waitSignal(w.run_finished, timeout=30_000):
        assert w.run() is True
        assert w.run() is False
        assert w.last_message[0] == "warning" and "already in progress" in w.last_message[1]
    assert layer_names(setup.viewer) == ["fundus", "optic disc"]
    assert w.run_button.isEnabled() and not w.is_running


def test_busy_state_shows_only_after_a_quarter_second(setup, qtbot, monkeypatch):
    """A quick run repaints nothing before its result; a longer one shows Run disabled and
    Cancel enabled after QUIET_S, and its Cancel button works."""
    from emclip import inference
    from emclip.callbacks import check_cancel
    from napari_emclip._widget import QUIET_S

    def until_cancelled(*args, cancel=None, **kwargs):
        """A stack run that lasts until Cancel is pressed (so the test never races the CPU)."""
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            check_cancel(cancel)
            time.sleep(0.01)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(inference, "segment_stack", until_cancelled)
    w, viewer = setup.widget, setup.viewer
    vol = viewer.add_image(_stack(4), name="stack")
    w.set_image_layer(vol)
    w.set_prompts("left ventricle")
    idle_text = w.status_label.text()
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        assert w.run() is True
        started = time.perf_counter()
        assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()
        assert w.status_label.text() == idle_text
        qtbot.waitUntil(lambda: w.cancel_button.isEnabled() or not w.is_running, timeout=10_000)
        assert w.is_running
        assert time.perf_counter() - started >= QUIET_S
        assert not w.run_button.isEnabled() and "Segmenting left ventricle" in w.status_label.text()
        w.cancel_button.click()
    assert blocker.args == ["cancelled"]
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()


def _stack(n_slices: int = 16, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, size=(n_slices, size, size), dtype=np.uint16)


def test_cancel_stops_within_a_second_and_leaves_the_viewer_as_it_was(setup, qtbot):
    w, viewer = setup.widget, setup.viewer
    vol = viewer.add_image(_stack(24), name="stack", scale=(3.0, 1.0, 1.0))
    w.set_image_layer(vol)
    w.set_prompts("left ventricle, myocardium")
    before = layer_names(viewer)
    timing = {}

    def on_progress(done, total):
        if done >= 1 and "cancel" not in timing and w.is_running:
            timing["cancel"] = time.perf_counter()
            w.cancel()

    w._relay.progress.connect(on_progress)
    with qtbot.waitSignal(w.run_finished, timeout=60_000) as blocker:
        assert w.run()
    latency = time.perf_counter() - timing["cancel"]
    assert blocker.args == ["cancelled"]
    assert latency < 1.0, f"cancel took {latency:.2f} s"
    assert layer_names(viewer) == before
    assert "cancelled" in w.last_message[1]
    print(f"\ncancel latency: {latency * 1000:.0f} ms")


def test_switching_the_image_mid_run_drops_the_result(setup, qtbot):
    w, viewer = setup.widget, setup.viewer
    other = viewer.add_image(_fundus_like(96), name="other", rgb=True)
    w.set_image_layer(setup.image)
    w.set_prompts("optic disc")
    with qtbot.waitSignal(w.run_finished, timeout=30_000) as blocker:
        assert w.run()
        w.set_image_layer(other)  # before the result can land
    assert blocker.args == ["dropped"]
    assert layer_names(viewer) == ["fundus", "other"]
    assert "dropped" in w.last_message[1] and "other" in w.last_message[1]


def test_replacing_the_data_mid_run_drops_the_result(setup, qtbot):
    w, image = setup.widget, setup.image
    w.set_prompts("optic disc")
    with qtbot.waitSignal(w.run_finished, timeout=30_000) as blocker:
        assert w.run()
        image.data = image.data[::-1].copy()
    assert blocker.args == ["dropped"]
    assert layer_names(setup.viewer) == ["fundus"]


def test_editing_pixels_in_place_mid_run_drops_the_result(setup, qtbot):
    w, image = setup.widget, setup.image
    w.set_prompts("optic disc")

    def on_stage(text):  # after the worker fingerprinted the image: an in-place edit, no event
        if text == "segmenting":
            image.data[:4, :4] = 255

    w._relay.stage.connect(
        on_stage, type=__import__("qtpy.QtCore", fromlist=["Qt"]).Qt.ConnectionType.DirectConnection
    )
    with qtbot.waitSignal(w.run_finished, timeout=30_000) as blocker:
        assert w.run()
    assert blocker.args == ["dropped"]
    assert layer_names(setup.viewer) == ["fundus"]


def test_3d_stack_slice_by_slice_with_a_chosen_axis(setup, qtbot):
    w, viewer = setup.widget, setup.viewer
    vol = viewer.add_image(_stack(5, 96).transpose(1, 0, 2), name="stack", scale=(1.0, 8.0, 1.0))
    w.set_image_layer(vol)
    assert w.slice_combo.isEnabled()
    w.set_slice_axis(1)
    w.set_modality("cardiac_mri")
    assert w.prompts_text() == "left ventricle, myocardium, right ventricle"
    progress = []
    w._relay.progress.connect(lambda d, t: progress.append((d, t)))
    assert run_and_wait(qtbot, w) == "done"
    lv = viewer.layers["left ventricle"]
    assert lv.data.shape == vol.data.shape
    np.testing.assert_allclose(lv.scale, (1.0, 8.0, 1.0))
    # every slice along axis 1 holds the same centred disc
    for k in range(5):
        assert lv.data[48, k, 48] == 1 and lv.data[0, k, 0] == 0
    assert progress[-1][0] == progress[-1][1] == 5


def test_multichannel_and_16bit_inputs(setup, qtbot):
    w, viewer = setup.widget, setup.viewer
    multi = viewer.add_image(
        np.random.default_rng(2).random((3, 80, 80)).astype(np.float32),
        name="multi",
        scale=(1.0, 0.3, 0.3),
        translate=(0.0, 2.0, 3.0),
    )
    w.set_image_layer(multi)
    w.set_channel_axis(0)
    assert not w.slice_combo.isEnabled()  # 2D once the channels are set aside
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "done"
    disc = viewer.layers["optic disc"]
    assert disc.data.shape == (80, 80)
    np.testing.assert_allclose(disc.scale, (0.3, 0.3))
    np.testing.assert_allclose(disc.translate, (2.0, 3.0))

    grey = viewer.add_image(
        np.random.default_rng(3).integers(0, 65535, (64, 64), dtype=np.uint16), name="grey16"
    )
    w.set_image_layer(grey)
    w.set_prompts("optic cup")
    assert run_and_wait(qtbot, w) == "done"
    assert viewer.layers["optic cup"].data.shape == (64, 64) and not w.last_outcome.tiled
    w.tile_spin.setValue(32)  # overlapping tiles, done by emclip
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "done"
    assert w.last_outcome.tiled and viewer.layers["optic disc [2]"].data.shape == (64, 64)
    assert w.last_outcome.info["mirror"] is False  # the model's setting: the tiny config does not mirror
    w.mirror_combo.setCurrentIndex(w.mirror_combo.findData(True))
    assert run_and_wait(qtbot, w) == "done"
    assert w.last_outcome.info["mirror"] is True


def test_multiscale_image_is_segmented_at_full_resolution(setup, qtbot):
    w, viewer = setup.widget, setup.viewer
    base = _fundus_like(128)
    pyramid = viewer.add_image([base, base[::2, ::2]], name="pyramid", rgb=True, multiscale=True)
    w.set_image_layer(pyramid)
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "done"
    assert viewer.layers["optic disc"].data.shape == (128, 128)


def test_messages_for_missing_image_empty_prompt_and_bad_model(
    make_napari_viewer, qtbot, monkeypatch
):
    from emclip.inference import clear_model_cache, model_loading
    from napari_emclip import _widget

    # as if no bundled model were installed (one is, in emclip/weights/default)
    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", Path("/nonexistent") / "weights" / "default")
    clear_model_cache()
    shown = []
    monkeypatch.setattr(_widget, "show_warning", lambda m: shown.append(("warning", m)))
    monkeypatch.setattr(_widget, "show_error", lambda m: shown.append(("error", m)))
    viewer = make_napari_viewer()
    w = _widget.EMClipWidget(viewer)
    assert w.run() is False and "No image layer" in shown[-1][1]
    viewer.add_image(_fundus_like(64), rgb=True, name="img")
    w.set_prompts(" ,\n ")
    assert w.run() is False and shown[-1][0] == "warning" and "empty" in shown[-1][1]
    w.set_prompts("optic disc")
    w.set_model_source(None)  # the bundled default, "not installed" above
    assert run_and_wait(qtbot, w) == "error"
    level, text = shown[-1]
    assert level == "error" and "could not be loaded" in text
    assert (
        str(Path("weights") / "default") in text and "checkpoint folder" in text
    )  # names what it needs
    assert "Traceback" not in text and not viewer.layers[1:]


def test_out_of_memory_message(setup, qtbot, monkeypatch):
    from emclip import inference

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(inference, "segment", oom)
    w = setup.widget
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "error"
    level, text = w.last_message
    assert level == "error" and text.startswith("Out of memory") and "tile" in text
    assert layer_names(setup.viewer) == ["fundus"]


def test_out_of_memory_fallbacks_are_reported(setup, qtbot, monkeypatch):
    from emclip import inference

    from napari_emclip import _widget

    real = inference.segment
    shown = []

    def tight(*args, **kwargs):
        import warnings

        warnings.warn(
            "out of memory on cuda (CUDA out of memory); retrying with 128-pixel tiles",
            inference.OutOfMemoryFallbackWarning,
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "segment", tight)
    monkeypatch.setattr(_widget, "show_info", lambda m: shown.append(m))
    w = setup.widget
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "done"
    assert any(m.startswith("Out of memory on cuda") and "tiles" in m for m in shown)
    assert layer_names(setup.viewer) == ["fundus", "optic disc"]


def test_viewer_stays_responsive_during_a_run(setup, qtbot):
    """Measure the Qt event loop during a run: a 10 ms QTimer must keep ticking.

    Two phases: the computation (worker thread) and adding the layers (Qt thread, one layer
    per event-loop turn; napari itself needs a few hundred ms per new Labels layer here).
    """
    from qtpy.QtCore import Qt, QTimer

    w, viewer = setup.widget, setup.viewer
    vol = viewer.add_image(_stack(64, 256), name="stack")
    w.set_image_layer(vol)
    w.set_prompts("left ventricle, myocardium")
    ticks: list[float] = []
    marks: dict[str, float] = {}
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    w.result_received.connect(lambda n: marks.setdefault("result", time.perf_counter()))
    w._relay.stage.connect(
        lambda text: marks.setdefault(text, time.perf_counter()),
        type=Qt.ConnectionType.DirectConnection,
    )  # worker-thread time stamps
    timer.start()
    qtbot.wait(50)
    marks["start"] = time.perf_counter()
    status = run_and_wait(qtbot, w, timeout=120_000)
    qtbot.wait(100)  # a few ticks after the end, to catch a gap that spans it
    marks["end"] = time.perf_counter()
    timer.stop()
    assert status == "done"
    t = np.asarray(ticks)
    gaps = np.diff(t) * 1000
    ends = t[1:]

    def phase(a: float, b: float) -> np.ndarray:  # gaps that ended within (a, b]
        return gaps[(ends > a) & (ends <= b)]

    compute, placing = phase(marks["start"], marks["result"]), phase(marks["result"], marks["end"])
    compute_s = marks["result"] - marks["start"]
    assert compute_s > 0.2 and compute.size > 10, "the run was too short to measure anything"
    print(
        f"\ncompute {compute_s:.2f} s: {compute.size} ticks, median gap {np.median(compute):.1f} ms, "
        f"p95 {np.percentile(compute, 95):.1f} ms, max {compute.max():.1f} ms; "
        f"adding 2 layers {marks['end'] - marks['result']:.2f} s: max gap {placing.max():.0f} ms"
    )
    worst = int(np.argmax(gaps))
    print(
        "stages:",
        {k: round(v - marks["start"], 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
        f"worst gap ends at {ends[worst] - marks['start']:.3f} s",
    )
    # the machine is shared (2 cores): allow rare scheduler hiccups, not a blocked event loop
    assert np.median(compute) < 30 and np.percentile(compute, 95) < 60 and compute.max() < 500
    assert placing.max() < 3000


def test_screenshot_shows_the_labels(make_napari_viewer, known_masks, qtbot):
    """The labels are drawn on the canvas where the mask is, and only there."""
    from napari_emclip._widget import EMClipWidget

    viewer = make_napari_viewer(show=True)  # the canvas only renders in a shown window (Xvfb)
    viewer.add_image(_fundus_like(), name="fundus", rgb=True, scale=(0.5, 0.25))
    w = EMClipWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.set_model_source("tiny")
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "done"
    disc = viewer.layers["optic disc"]
    disc.opacity = 1.0
    viewer.reset_view()
    with_labels = viewer.screenshot(canvas_only=True, flash=False)
    disc.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    assert without[..., :3].mean() > 5  # the image itself was rendered
    diff = np.abs(with_labels[..., :3].astype(int) - without[..., :3].astype(int)).sum(-1) > 30
    h, wd = diff.shape
    # the disc is centred on the image, which is centred on the canvas: pixels differ there...
    assert diff[h // 2 - 3 : h // 2 + 3, wd // 2 - 3 : wd // 2 + 3].all()
    # ...and not at the canvas corners (outside the image)
    assert not diff[:3, :3].any() and not diff[-3:, -3:].any()
    # the coloured area is about the disc's share of the image's footprint on the canvas
    image_px = (without[..., :3].sum(-1) > 0).sum()
    assert diff.sum() / image_px == pytest.approx(np.pi * RADII[0] ** 2, rel=0.3)


# ============================================================================ closing, latency


def test_placement_batches_put_visible_results_first_and_split_big_ones():
    specs, _ = build_layer_specs(_fake_result(), INFO, clusters=True, probabilities=True)
    plan = plan_placements(specs, [], "src")
    batches = _layers.placement_batches(plan, max_pixels=2 * 32 * 32)
    roles = [[p.spec.role for p in b] for b in batches]
    assert roles == [["prompt", "prompt"], ["probability"], ["probability"], ["probability"], ["clusters"]]
    small = _layers.placement_batches(plan, max_pixels=32 * 32)  # one prompt layer per batch
    assert [[p.spec.role for p in b] for b in small][:2] == [["prompt"], ["prompt"]]


def test_model_slot_keeps_one_model_and_reloads_when_the_checkpoint_changes(tmp_path, monkeypatch):
    from emclip import inference

    from napari_emclip._worker import ModelSlot

    loads = []

    def fake_load(source, device="auto", cache=True):
        assert cache is False  # the slot, not emclip's shared cache, owns the model
        loads.append(source)
        return object()

    monkeypatch.setattr(inference, "load_model", fake_load)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    slot = ModelSlot()
    first = slot.get(str(folder), "cpu")
    assert slot.get(str(folder), "cpu") is first and len(loads) == 1  # warm: not loaded again
    (folder / "model.safetensors").write_bytes(b"new weights")  # the checkpoint changed
    second = slot.get(str(folder), "cpu")
    assert second is not first and len(loads) == 2
    assert slot.get(str(folder), "auto") is not second and len(loads) == 3  # another device
    slot.clear()
    assert slot.model is None


def _start_long_run(qtbot, w, viewer):
    """A 24-slice stack run, returned once the model is loaded and slices are being segmented."""
    vol = viewer.add_image(_stack(24), name="stack")
    w.set_image_layer(vol)
    w.set_prompts("left ventricle, myocardium")
    before = layer_names(viewer)
    assert w.run()
    run = w._run
    qtbot.waitUntil(lambda: run.report.progress is not None and run.report.progress[0] >= 1, timeout=30_000)
    return run, before


@pytest.mark.parametrize("how", ["dock close button", "closeEvent"])
def test_closing_the_widget_mid_run_cancels_and_releases_the_model(setup, qtbot, how):
    import gc
    import weakref

    w, viewer = setup.widget, setup.viewer
    run, before = _start_long_run(qtbot, w, viewer)
    model = weakref.ref(w._life.models.model)
    assert model() is not None
    worker = run.worker
    with qtbot.waitSignal(w.run_finished, timeout=5_000) as blocker:
        if how == "dock close button":
            viewer.window.remove_dock_widget(w)  # what napari's close button on the dock does
        else:
            w.close()
    assert blocker.args == ["cancelled"] and w.is_closed
    assert worker.abort_requested and w._life.models.model is None
    qtbot.waitUntil(lambda w=worker: not w.is_running, timeout=5_000)  # stops at its cancel check
    qtbot.wait(300)  # anything it might still deliver
    assert layer_names(viewer) == before  # nothing added, now or later
    assert not w.is_running and not w.run()  # a closed widget starts nothing
    del run, worker
    gc.collect()
    assert model() is None, gc.get_referrers(model())


def test_closing_the_widget_after_a_run_releases_the_model(setup, qtbot):
    import gc
    import weakref

    w = setup.widget
    w.set_prompts("optic disc")
    assert run_and_wait(qtbot, w) == "done"
    model = weakref.ref(w._life.models.model)
    assert run_and_wait(qtbot, w) == "done"
    assert w._life.models.model is model()  # kept warm between runs
    setup.viewer.window.remove_dock_widget(w)
    gc.collect()
    assert model() is None
    assert layer_names(setup.viewer) == ["fundus", "optic disc"]


def test_closing_the_viewer_mid_run_cancels_and_releases_the_model(setup, qtbot):
    import gc
    import weakref

    w, viewer = setup.widget, setup.viewer
    run, _ = _start_long_run(qtbot, w, viewer)
    model = weakref.ref(w._life.models.model)
    worker = run.worker
    life = w._life
    viewer.close()
    qtbot.waitUntil(lambda: life.closed, timeout=5_000)  # the dock widget was destroyed
    assert worker.abort_requested
    qtbot.waitUntil(lambda w=worker: not w.is_running, timeout=5_000)
    qtbot.wait(300)
    del run, worker, w
    setup.widget = None
    gc.collect()
    assert model() is None


def test_progress_is_shown_at_most_20_times_a_second(setup, qtbot, monkeypatch):
    """Every report would repaint the dock (and re-composite the canvas); the poll caps it."""
    from emclip import inference

    real = inference.segment

    def chatty(image, prompts, progress=None, **kwargs):  # 300 reports in ~0.3-0.6 s
        for i in range(300):
            progress(i, 300)
            time.sleep(0.001)
        return real(image, prompts, progress=progress, **kwargs)

    monkeypatch.setattr(inference, "segment", chatty)
    w = setup.widget
    w.set_prompts("optic disc")
    reports, shown = [], []
    w._relay.progress.connect(lambda d, t: reports.append(time.perf_counter()))
    w.progress_bar.valueChanged.connect(lambda v: shown.append(time.perf_counter()))
    start = time.perf_counter()
    assert run_and_wait(qtbot, w) == "done"
    seconds = time.perf_counter() - start
    assert len(reports) >= 300
    assert len(shown) <= seconds / 0.05 + 3, (len(shown), seconds)
    assert w.progress_bar.value() == w.progress_bar.maximum()  # ends full


def test_in_place_updates_follow_the_image_geometry_and_leave_equal_geometry_alone():
    from napari.components import ViewerModel

    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((32, 32)), name="fundus", scale=(0.5, 0.5))
    specs, _ = build_layer_specs(_fake_result(), INFO)
    _layers.apply_placements(
        viewer, plan_placements(specs, list(viewer.layers), "src"), _layers.geometry_of(image)
    )
    disc = viewer.layers["optic disc"]
    events = []
    for name in ("scale", "translate", "rotate", "shear", "affine"):
        getattr(disc.events, name).connect(lambda e, name=name: events.append(name))
    specs, _ = build_layer_specs(_fake_result(), INFO)
    plan = plan_placements(specs, list(viewer.layers), "src")
    assert all(p.is_update for p in plan)
    _layers.apply_placements(viewer, plan, _layers.geometry_of(image))
    assert events == []  # same geometry: no transform is touched (each one redraws the layer)
    image.scale, image.rotate = (2.0, 3.0), 30.0
    _layers.apply_placements(viewer, plan, _layers.geometry_of(image))
    np.testing.assert_allclose(disc.scale, (2.0, 3.0))
    np.testing.assert_allclose(disc.rotate, image.rotate)
    assert "scale" in events and "rotate" in events
