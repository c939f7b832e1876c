"""The dock widget's extra sections: reference exemplar, Automatic (prompt-free), sequences.

The library calls are checked by wrapping or replacing ``emclip.inference.segment`` and
``emclip.volume_segmentation.segment_volume`` (the widget's worker looks them up at run time);
the Automatic test runs the real bundled default model on a small copy of the fundus sample.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.filterwarnings("ignore::UserWarning")]

FUNDUS_STRUCTURES = {"optic disc", "optic cup", "neuroretinal rim"}


def _disc(shape: tuple[int, ...], radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    return sum(g.astype(float) ** 2 for g in grids) < (radius * min(shape)) ** 2


def fake_result(prompts: list[str], shape: tuple[int, ...]):
    """A SegmentationResult in which prompt i is a centred disc/ball (every prompt found)."""
    from emclip.inference.result import SegmentationResult

    masks = np.stack([_disc(shape, 0.3 - 0.1 * i) for i in range(len(prompts))])
    p = len(prompts)
    return SegmentationResult(
        prompts=list(prompts),
        masks=masks,
        probabilities=masks.astype(np.float32),
        found=np.ones(p, bool),
        scores=np.ones(p, np.float32),
        max_probability=np.ones(p, np.float32),
        areas=masks.reshape(p, -1).sum(1),
        cluster_map=np.zeros(shape, np.int32),
        cluster_similarity=np.zeros((0, p), np.float32),
    )


@pytest.fixture
def viewer_widget(make_napari_viewer):
    """A viewer with a grey 2D image and the widget set to the tiny model on the CPU."""
    from napari_emclip._widget import EMClipWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.integers(0, 255, (64, 64), dtype=np.uint8), name="target")
    widget = EMClipWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_model_source("tiny")
    widget.device_combo.setCurrentText("cpu")
    widget.set_image_layer(image)
    return SimpleNamespace(viewer=viewer, widget=widget, image=image)


def run_and_wait(qtbot, start, signal, timeout: int = 60_000) -> str:
    with qtbot.waitSignal(signal, timeout=timeout) as blocker:
        assert start() is True
    return blocker.args[0]


def _reference(viewer, name: str = "optic cup", empty: bool = False, mask_shape=(48, 40)):
    ref_image = viewer.add_image(np.linspace(0, 255, 48 * 40).reshape(48, 40), name="reference")
    mask = np.zeros(mask_shape, np.uint8)
    if not empty:
        mask[10:20, 5:15] = 1
        mask[30:34, 30:36] = 2
    labels = viewer.add_labels(mask, name=name)
    return ref_image, labels, mask


# ============================================================================ reference exemplar


def test_reference_exemplar_is_passed_to_the_library(viewer_widget, qtbot, monkeypatch):
    from emclip import inference
    from emclip.exemplars import Exemplar

    v = viewer_widget
    ref_image, labels, mask = _reference(v.viewer)
    v.widget.set_image_layer(v.image)
    v.widget.set_prompts("optic disc")
    v.widget.sections.set_reference(labels, ref_image, label_id=2, only=True)
    calls = []
    real = inference.segment

    def recording(image, prompts, **kwargs):
        real(image, prompts, **kwargs)  # the library accepts the call (tiny model runs)
        calls.append((prompts, kwargs))
        return fake_result(["optic disc", "optic cup"], np.shape(image)[:2])

    monkeypatch.setattr(inference, "segment", recording)
    assert run_and_wait(qtbot, v.widget.run, v.widget.run_finished) == "done"
    [(prompts, kwargs)] = calls
    assert prompts == ["optic disc"] and kwargs["exemplar_mode"] == "only"
    [exemplar] = kwargs["exemplars"]
    assert isinstance(exemplar, Exemplar) and exemplar.name == "optic cup"
    np.testing.assert_array_equal(exemplar.mask, mask == 2)  # only the chosen label id
    np.testing.assert_array_equal(exemplar.image, ref_image.data)
    assert "optic disc" in v.viewer.layers
    assert v.viewer.layers["optic disc"].data.shape == (64, 64)
    # the result for the exemplar's name is a second layer, not the reference Labels layer
    result_cup = [
        layer
        for layer in v.viewer.layers
        if layer.name.startswith("optic cup") and layer is not labels
    ]
    assert len(result_cup) == 1 and result_cup[0].data.shape == (64, 64)


def test_reference_without_prompts_uses_every_nonzero_label(viewer_widget, qtbot, monkeypatch):
    from emclip import inference

    v = viewer_widget
    ref_image, labels, mask = _reference(v.viewer, name="lesion")
    v.widget.set_image_layer(v.image)
    v.widget.set_prompts("")
    v.widget.sections.set_reference(labels, ref_image)
    calls = []

    def fake(image, prompts, **kwargs):
        calls.append((prompts, kwargs))
        return fake_result(["lesion"], np.shape(image)[:2])

    monkeypatch.setattr(inference, "segment", fake)
    assert run_and_wait(qtbot, v.widget.run, v.widget.run_finished) == "done"
    [(prompts, kwargs)] = calls
    assert prompts == [] and kwargs["exemplar_mode"] == "combine"
    np.testing.assert_array_equal(kwargs["exemplars"][0].mask, mask > 0)
    assert kwargs["exemplars"][0].name == "lesion"


@pytest.mark.parametrize("problem", ["empty", "shape"])
def test_bad_reference_gives_a_message_and_no_layer(viewer_widget, monkeypatch, problem):
    from emclip import inference

    v = viewer_widget
    ref_image, labels, _ = _reference(
        v.viewer, empty=problem == "empty", mask_shape=(48, 40) if problem == "empty" else (30, 30)
    )
    v.widget.set_image_layer(v.image)
    v.widget.set_prompts("optic cup")
    v.widget.sections.set_reference(labels, ref_image)
    monkeypatch.setattr(inference, "segment", lambda *a, **k: pytest.fail("the library was called"))
    before = [layer.name for layer in v.viewer.layers]
    assert v.widget.run() is False
    level, text = v.widget.last_message
    assert level == "warning" and "Reference" in text
    assert (
        ("no pixel" in text) if problem == "empty" else ("(30, 30)" in text and "(48, 40)" in text)
    )
    assert [layer.name for layer in v.viewer.layers] == before
    assert not v.widget.is_running


# ============================================================================ Automatic


def test_automatic_on_the_fundus_sample_names_layers_after_fundus_structures(
    make_napari_viewer, qtbot
):
    from emclip.samples import fundus_image

    from napari_emclip._widget import EMClipWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(fundus_image()[::4, ::4], name="fundus photograph", rgb=True)
    widget = EMClipWidget(viewer)
    widget.device_combo.setCurrentText("cpu")
    widget.set_modality("cardiac_mri")  # Automatic ignores the picker: the model recognises it
    widget.set_prompts("")  # Automatic needs no prompts
    status = run_and_wait(
        qtbot, widget.sections.run_automatic, widget.run_finished, timeout=120_000
    )
    assert status == "done", widget.last_message
    added = [layer.name for layer in viewer.layers if layer is not image]
    assert added and set(added) <= FUNDUS_STRUCTURES
    assert all(viewer.layers[n].data.shape == image.data.shape[:2] for n in added)
    message = widget.sections.last_message
    assert "modality fundus" in message and "confidence" in message
    info = widget.last_outcome.info
    assert info["modality"] == "fundus" and info["modality_source"] == "recognised"
    assert set(added) | set(info["structures_not_found"]) == FUNDUS_STRUCTURES


def test_automatic_refusal_is_a_message_not_a_traceback(viewer_widget, qtbot):
    v = viewer_widget  # the tiny model records no known structures: the library refuses
    before = [layer.name for layer in v.viewer.layers]
    assert run_and_wait(qtbot, v.widget.sections.run_automatic, v.widget.run_finished) == "error"
    level, text = v.widget.last_message
    assert (
        level == "error"
        and text.startswith("Cannot segment 'target':")
        and "no known structures" in text
    )
    assert "Traceback" not in text
    assert [layer.name for layer in v.viewer.layers] == before
    assert v.widget.sections.last_message == ""  # no modality message after a refusal


# ============================================================================ sequences


def _volume_fake(monkeypatch):
    from emclip import volume_segmentation

    calls = []

    def fake(data, prompts, model=None, **kwargs):
        calls.append((np.asarray(data), prompts, kwargs))
        spatial = np.shape(data)[:3]
        return fake_result(list(prompts), spatial)

    monkeypatch.setattr(volume_segmentation, "segment_volume", fake)
    return calls


def test_two_image_layers_as_channels_call_segment_volume(viewer_widget, qtbot, monkeypatch):
    from napari_emclip._volumes import layer_world_matrix, ras_affine_of

    v = viewer_widget
    affine = np.array(
        [[3.0, 0, 0, 5], [0, 1.5, 0, -3], [0, 0, 2.0, 7], [0, 0, 0, 1]]
    )  # like the reader's
    shape = (6, 20, 24)
    rng = np.random.default_rng(3)
    flair = v.viewer.add_image(rng.random(shape, np.float32), name="case_flair", affine=affine)
    t1ce = v.viewer.add_image(rng.random(shape, np.float32), name="case_t1ce", affine=affine)
    v.widget.set_image_layer(flair)
    v.widget.sections.set_extra_channels([t1ce])
    v.widget.sections.set_axis("coronal")
    v.widget.set_prompts("tumour core")
    calls = _volume_fake(monkeypatch)
    assert run_and_wait(qtbot, v.widget.run, v.widget.run_finished) == "done"
    [(data, prompts, kwargs)] = calls
    assert data.shape == (*shape, 2)
    np.testing.assert_array_equal(data[..., 1], t1ce.data)
    assert prompts == ["tumour core"]
    assert kwargs["channels"] == ["flair", "t1ce"] and kwargs["channel_axis"] == -1
    assert kwargs["axis"] == "coronal"
    np.testing.assert_allclose(kwargs["affine"], ras_affine_of(layer_world_matrix(flair)))
    out = v.viewer.layers["tumour core"]
    assert type(out).__name__ == "Labels" and out.data.shape == shape
    np.testing.assert_allclose(out.affine.affine_matrix, flair.affine.affine_matrix)
    np.testing.assert_allclose(layer_world_matrix(out), layer_world_matrix(flair))


def test_mismatched_channels_give_a_message(viewer_widget, monkeypatch):
    v = viewer_widget
    a = v.viewer.add_image(np.zeros((4, 8, 8), np.float32), name="case_flair")
    b = v.viewer.add_image(np.zeros((4, 8, 9), np.float32), name="case_t1")
    v.widget.set_image_layer(a)
    v.widget.sections.set_extra_channels([b])
    v.widget.set_prompts("tumour")
    calls = _volume_fake(monkeypatch)
    assert v.widget.run() is False
    level, text = v.widget.last_message
    assert level == "warning" and "'case_t1'" in text and "shape" in text
    assert calls == []


def test_nifti_layer_goes_through_segment_volume_with_the_axis(viewer_widget, qtbot, monkeypatch):
    v = viewer_widget
    vol = v.viewer.add_image(
        np.random.default_rng(1).random((5, 16, 16), np.float32),
        name="brain",
        scale=(3.0, 1.0, 1.0),
        metadata={"nifti": {"sequence": "t1"}},
    )
    v.widget.set_image_layer(vol)
    v.widget.sections.set_axis("sagittal")
    v.widget.set_prompts("ventricle")
    calls = _volume_fake(monkeypatch)
    assert run_and_wait(qtbot, v.widget.run, v.widget.run_finished) == "done"
    [(data, _, kwargs)] = calls
    assert data.shape == (5, 16, 16) and kwargs["axis"] == "sagittal"
    assert "channels" not in kwargs and kwargs["channel_axis"] is None
    assert np.asarray(kwargs["affine"]).shape == (4, 4)
    out = v.viewer.layers["ventricle"]
    assert out.data.shape == (5, 16, 16) and tuple(out.scale) == (3.0, 1.0, 1.0)
