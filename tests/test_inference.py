"""The inference API: load_model, segment, segment_stack, SegmentationResult (emclip.inference).

The tiny config model is untrained, so tests check shapes, dtypes, ranges and invariants. A small
pointwise fake model (logit = f(pixel intensity)) gives known answers for geometry tests: tiling,
found / not found, out-of-memory retries.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import emclip
from emclip import inference
from emclip.errors import (
    Cancelled,
    CheckpointError,
    InvalidArgumentError,
    InvalidImageError,
    InvalidPromptError,
)
from emclip.inference import (
    OutOfMemoryFallbackWarning,
    SegmentationResult,
    UntrainedModelWarning,
    auto_tile_size,
    load_model,
    segment,
    segment_stack,
)
from emclip.nn.base import ModelOutput


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        return load_model("tiny", "cpu")


class PointwiseNet(torch.nn.Module):
    """Logit of every prompt = gain * (intensity - 0.5) + bias[p], pixel by pixel.

    Two EM "clusters": dark (1) and bright (2) pixels. ``fail`` holds exceptions raised by the
    next forward calls (to simulate running out of memory).
    """

    def __init__(self, image_size: int = 64, gain: float = 12.0, bias: float = 0.0):
        super().__init__()
        self.image_size = image_size
        self.pixel_mean = (0.5, 0.5, 0.5)
        self.pixel_std = (0.25, 0.25, 0.25)
        self.gain, self.bias = gain, bias
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.calls: list[tuple[int, ...]] = []
        self.fail: list[BaseException] = []

    def predict_logits(self, images, prompts, modality=None):
        self.calls.append(tuple(images.shape))
        if self.fail:
            raise self.fail.pop(0)
        assert images.shape[-1] == images.shape[-2] == self.image_size
        x = images[:, 0] * 0.25 + 0.5  # undo the normalisation
        n = len(prompts)
        offsets = torch.arange(n, dtype=torch.float32) * 0.0
        logits = self.gain * (x[:, None] - 0.5) + self.bias + offsets[None, :, None, None]
        small = torch.nn.functional.avg_pool2d(x[:, None], 4)[:, 0]
        resp = torch.softmax(torch.stack([-(small - 0.5) * 20, (small - 0.5) * 20], dim=1), dim=1)
        sim = torch.tensor([[0.9, -0.2], [-0.3, 0.8]])[:, :1].expand(2, n)
        return ModelOutput(
            logits=logits * self.weight,
            prompt_mask=torch.ones(images.shape[0], n, dtype=torch.bool),
            responsibilities=resp,
            cluster_text_similarity=sim[None].expand(images.shape[0], 2, n),
        )


def _smooth(h=128, w=128, dtype=np.uint16):
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.5 * np.sin(yy / 9.0) * np.cos(xx / 13.0)
    return (img * 1000).astype(dtype)


# ----------------------------------------------------------------------------- segment, tiny model


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 255, (100, 80), dtype=np.uint8),
        np.random.default_rng(1).integers(
            0, 4000, (3, 72, 96), dtype=np.uint16
        ),  # channel-first RGB
        np.random.default_rng(2).random((64, 90, 4)).astype(np.float32),  # RGBA
        np.random.default_rng(3).normal(0, 300, (50, 50)).astype(np.int16),
        np.random.default_rng(4).random((40, 60)) > 0.5,  # bool
    ],
    ids=["uint8-grey", "uint16-rgb-chw", "float32-rgba", "int16", "bool"],
)
def test_segment_outputs_have_the_contract_shapes(tiny, image):
    res = segment(image, "optic disc, optic cup; optic disc", tiny, threshold=0.2)
    h, w = image.shape[1:] if image.shape[0] == 3 else image.shape[:2]
    assert res.prompts == ["optic disc", "optic cup"]  # parsed, duplicates dropped
    assert res.masks.shape == res.probabilities.shape == (2, h, w)
    assert res.masks.dtype == bool and res.probabilities.dtype == np.float32
    assert 0.0 <= res.probabilities.min() and res.probabilities.max() <= 1.0
    assert res.found.dtype == bool and res.found.shape == (2,)
    assert res.scores.dtype == np.float32 and res.max_probability.shape == (2,)
    assert res.cluster_map.shape == (h, w) and res.cluster_map.dtype == np.int32
    k = tiny.config.em.num_bases
    assert (
        res.cluster_map.min() >= 1 and res.cluster_map.max() <= k
    )  # 0 never shows: no padding leaks
    assert res.cluster_similarity.shape == (k, 2) and res.cluster_similarity.dtype == np.float32
    assert np.abs(res.cluster_similarity).max() <= 1.0 + 1e-5
    for i in range(2):
        m = res.masks[i]
        assert not (m & (res.probabilities[i] <= 0.2)).any()  # a mask pixel is above threshold
        if res.found[i]:
            assert res.areas[i] == m.sum() >= res.min_area
            assert res.scores[i] == pytest.approx(res.probabilities[i][m].mean(), rel=1e-5)
        else:
            assert not m.any() and res.scores[i] == 0 and res.areas[i] == 0
        assert res.max_probability[i] == pytest.approx(res.probabilities[i].max())
    assert not res.tiled and res.device == "cpu"
    assert "optic disc" in repr(res)


def test_not_found_gives_an_empty_mask_never_a_false_one(tiny):
    img = _smooth(64, 64)
    decoder = tiny.decoder if hasattr(tiny, "decoder") else None
    assert decoder is not None and hasattr(decoder, "logit_bias")
    saved = decoder.logit_bias.detach().clone()
    try:
        with torch.no_grad():
            decoder.logit_bias.fill_(-1e3)  # every probability ~0, deterministically
        res = segment(img, "optic disc, optic cup", tiny)
    finally:
        with torch.no_grad():
            decoder.logit_bias.copy_(saved)
    assert not res.found.any() and not res.masks.any()
    assert (res.scores == 0).all() and (res.max_probability < 1e-6).all()
    assert not res.label_image().any()


def test_min_area_rejects_specks():
    net = PointwiseNet()
    img = np.zeros((64, 64), np.uint8)
    img[30:32, 30:32] = 255  # a 2x2 bright speck, the only pixels above threshold
    img[0, 0] = 1
    res = segment(img, "spot", net, min_area=10)
    assert not res.found[0] and not res.masks.any()
    assert res.max_probability[0] > 0.5  # it was there, but too small to count
    res = segment(img, "spot", net, min_area=1)
    assert res.found[0] and 1 <= res.areas[0] <= 16
    assert res.masks[0, 30:32, 30:32].all()


@pytest.fixture()
def no_bundled_model(tmp_path, monkeypatch):
    """As if no default model were installed (one may be, in emclip/weights/default)."""
    from emclip.inference import model_loading

    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", tmp_path / "not-installed")


def test_user_errors_come_before_loading_a_model(no_bundled_model):
    img = np.zeros((32, 32), np.uint8)
    # model=None would raise CheckpointError (no bundled model): argument errors must win
    with pytest.raises(InvalidArgumentError, match="threshold"):
        segment(img, "a", None, threshold=1.5)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        segment(img, "a", None, threshold=0)
    with pytest.raises(InvalidPromptError):
        segment(img, " , ;", None)
    with pytest.raises(InvalidImageError):
        segment(np.zeros(10), "a", None)
    with pytest.raises(InvalidArgumentError, match="min_area"):
        segment(img, "a", None, min_area=-1)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        segment(img, "a", None, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="tile_size"):
        segment(img, "a", PointwiseNet(), tile_size=10)
    with pytest.raises(CheckpointError, match="no bundled default model.*--model"):
        segment(img, "a", None)


# ----------------------------------------------------------------------------- label_image


def _result(masks, probs, scores):
    masks = np.asarray(masks, bool)
    return SegmentationResult(
        prompts=[f"p{i}" for i in range(len(masks))],
        masks=masks,
        probabilities=np.asarray(probs, np.float32),
        found=masks.reshape(len(masks), -1).any(1),
        scores=np.asarray(scores, np.float32),
        max_probability=np.asarray(probs, np.float32).reshape(len(masks), -1).max(1),
        areas=masks.reshape(len(masks), -1).sum(1),
        cluster_map=np.ones(masks.shape[1:], np.int32),
        cluster_similarity=np.zeros((0, len(masks)), np.float32),
    )


def test_label_image_resolves_overlaps_by_probability_then_score():
    masks = np.zeros((3, 4, 6), bool)
    masks[0, :, :4] = True  # big
    masks[1, 1:3, 2:6] = True  # overlaps 0 in columns 2-3
    masks[2, 3, 0] = True  # overlaps 0 at one pixel, equal probability there
    probs = np.where(masks, 0.6, 0.1).astype(np.float32)
    probs[1, 1:3, 2] = (
        0.9  # prompt 1 wins column 2, prompt 0 wins column 3 (0.6 vs 0.6: see scores)
    )
    probs[0, 1:3, 3] = 0.7
    res = _result(masks, probs, scores=[0.6, 0.8, 0.9])
    labels = res.label_image()
    assert labels.dtype == np.uint8
    assert (labels[0, :4] == 1).all() and (labels[0, 4:] == 0).all()
    assert (
        (labels[1:3, 2] == 2).all() and (labels[1:3, 3] == 1).all() and (labels[1:3, 4:] == 2).all()
    )
    assert labels[3, 0] == 3  # tie on probability: the higher score wins
    by_area = res.label_image(overlap="area")
    assert (by_area[1:3, 2:4] == 2).all() and by_area[3, 0] == 3  # smaller masks on top
    with pytest.raises(InvalidArgumentError):
        res.label_image(overlap="biggest")
    np.testing.assert_array_equal(res.mask("P1"), res.masks[1])
    with pytest.raises(KeyError):
        res.mask("nope")


def test_label_image_works_block_by_block_without_copying_the_whole_arrays():
    """For a whole-slide result the masks and probabilities are hundreds of MB: label_image may
    only allocate per-block temporaries (it used to copy both arrays once to reorder them), so its
    peak must not grow with the image, and the blocks must give what one pass over it gives."""
    import tracemalloc

    rng = np.random.default_rng(0)

    def run(h: int):
        probs = rng.random((2, h, 1000), dtype=np.float32)
        masks = probs > 0.4
        res = _result(masks, probs, scores=[0.5, 0.9])
        tracemalloc.start()
        labels = res.label_image()
        peak = tracemalloc.get_traced_memory()[1] - labels.nbytes
        tracemalloc.stop()
        return res, labels, peak

    _, _, small = run(2000)  # one block of rows
    res, labels, big = run(8000)  # four blocks; copying the whole arrays would add 80 MB
    assert big < 1.25 * small, (big, small)
    order = np.argsort(-np.asarray(res.scores, np.float64), kind="stable")
    key = np.where(res.masks[order], res.probabilities[order], -1.0)
    expected = np.where(res.masks.any(0), order[np.argmax(key, axis=0)] + 1, 0)
    np.testing.assert_array_equal(labels, expected)


# ----------------------------------------------------------------------------- tiling


def test_single_tile_equals_the_untiled_path(tiny):
    img = np.random.default_rng(5).integers(0, 255, (90, 70), dtype=np.uint8)
    whole = segment(img, "optic disc, optic cup", tiny)
    tiled = segment(img, "optic disc, optic cup", tiny, tile_size=96)  # one tile covers it
    assert tiled.tiled and not whole.tiled
    np.testing.assert_allclose(tiled.probabilities, whole.probabilities, atol=1e-5)
    np.testing.assert_array_equal(tiled.cluster_map, whole.cluster_map)
    np.testing.assert_allclose(tiled.cluster_similarity, whole.cluster_similarity, atol=1e-5)


def test_many_tiles_agree_with_the_untiled_path_for_a_pointwise_model():
    net = PointwiseNet(image_size=64, gain=6.0)
    img = _smooth(128, 128)
    whole = segment(img, "a, b", net, tile_size=0)
    net.calls.clear()
    tiled = segment(img, "a, b", net, tile_size=48, batch_size=3)
    assert tiled.tiled and tiled.info["tile_size"] == 48
    # one overview pass, then a 3x3 grid of 48 px tiles (overlap >= 6) in batches of 3
    assert net.calls[0] == (1, 3, 64, 64)
    assert [c[0] for c in net.calls[1:]] == [3, 3, 3]
    diff = np.abs(tiled.probabilities - whole.probabilities)
    assert diff.mean() < 0.01 and diff.max() < 0.08, "tiles misplaced or badly blended"
    assert (tiled.masks != whole.masks).mean() < 0.01
    # clusters: dark pixels 1, bright pixels 2, in both paths
    bright = img > 700
    assert (tiled.cluster_map[bright] == 2).mean() > 0.95 and (
        tiled.cluster_map[img < 300] == 1
    ).mean() > 0.95


def test_auto_tiling_rule_and_no_full_size_float_copy(monkeypatch):
    assert auto_tile_size((100, 100), 64) is None
    assert auto_tile_size((64 * 8 + 1, 10), 64) == 4 * 64  # shrinking more than 8x -> tiles
    assert auto_tile_size((20000, 20000), 1024) == 4096  # more than 64 Mpx -> tiles
    assert auto_tile_size((1000, 1000), 64, 0) is None and auto_tile_size((50, 50), 64, 40) == 40
    sizes = []
    from emclip.inference import single_image

    original = single_image.to_float_rgb

    def spy(arr, *args, **kwargs):
        sizes.append(arr.shape[0] * arr.shape[1])
        return original(arr, *args, **kwargs)

    monkeypatch.setattr(single_image, "to_float_rgb", spy)
    net = PointwiseNet(image_size=32)
    img = _smooth(300, 140)  # long side > 8 * 32 -> automatic tiles of 128 px
    res = segment(img, "a", net)
    assert res.tiled and res.info["tile_size"] == 128
    assert res.masks.shape == (1, 300, 140)
    assert max(sizes) <= 128 * 128 < 300 * 140, "the whole image was converted to float at once"


# ----------------------------------------------------------------------------- progress and cancel


def test_progress_is_monotonic_and_completes(tiny):
    calls = []
    segment(
        _smooth(100, 100),
        "a, b",
        tiny,
        tile_size=48,
        batch_size=2,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(set(done)) > 3
    assert all(0 <= d <= t for d, t in calls)


@pytest.mark.parametrize("tile_size", [None, 48])
def test_cancel_raises_and_restores_the_model(tiny, tile_size):
    tiny.train()
    try:
        with pytest.raises(Cancelled):
            segment(_smooth(100, 100), "a", tiny, tile_size=tile_size, cancel=lambda: True)
        assert tiny.training, "the model's train/eval mode must be restored"
        # a cancel that flips after the first progress report
        state = {"n": 0}
        with pytest.raises(Cancelled):
            segment(
                _smooth(100, 100),
                "a",
                tiny,
                tile_size=tile_size,
                progress=lambda d, t: state.__setitem__("n", state["n"] + 1),
                cancel=lambda: state["n"] >= 1,
            )
        assert tiny.training
    finally:
        tiny.eval()


def test_cancel_between_tiles_stops_the_loop():
    net = PointwiseNet(image_size=32)
    reports = []

    def progress(done, total):
        reports.append(done)

    with pytest.raises(Cancelled):
        segment(
            _smooth(128, 128),
            "a",
            net,
            tile_size=32,
            batch_size=1,
            progress=progress,
            cancel=lambda: len(net.calls) >= 3,
        )
    assert len(net.calls) == 3, "no tile may run after cancel() turned True"


# ----------------------------------------------------------------------------- out of memory


def test_out_of_memory_retries_tiled_then_one_tile_at_a_time():
    net = PointwiseNet(image_size=32)
    img = _smooth(80, 80)
    reference = segment(img, "a", net, tile_size=64, batch_size=1)
    net.calls.clear()
    oom = getattr(torch, "OutOfMemoryError", RuntimeError)
    net.fail = [
        oom("CUDA out of memory. Tried to allocate 2 GiB"),
        RuntimeError("out of memory (batch)"),
    ]
    reports = []
    with pytest.warns(OutOfMemoryFallbackWarning) as record:
        res = segment(img, "a", net, batch_size=4, progress=lambda d, t: reports.append((d, t)))
    messages = [str(w.message) for w in record]
    assert any("tiles" in m for m in messages) and any("one tile" in m for m in messages)
    assert res.tiled and res.info["tile_size"] == 64
    np.testing.assert_allclose(res.probabilities, reference.probabilities, atol=1e-6)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports) and reports[-1][0] == reports[
        -1
    ][1]


def test_other_errors_and_cpu_oom_are_not_swallowed():
    net = PointwiseNet(image_size=32)
    net.fail = [RuntimeError("shape mismatch")]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        segment(_smooth(64, 64), "a", net)
    net.fail = [RuntimeError("out of memory")] * 10  # nothing lighter is left on the CPU
    with (
        pytest.warns(OutOfMemoryFallbackWarning),
        pytest.raises(RuntimeError, match="out of memory"),
    ):
        segment(_smooth(64, 64), "a", net, batch_size=2)


# ----------------------------------------------------------------------------- stacks


def test_segment_stack_matches_slice_by_slice_and_keeps_axis_order(tiny):
    base = np.clip(_smooth(48, 40), 100, 900)  # > 0.5 % of pixels at each end: exact percentiles
    rng = np.random.default_rng(0)
    # same values in every slice (rolled), so the volume window equals each slice's window
    vol = np.stack([np.roll(base, int(s), axis=1) for s in rng.integers(0, 40, 5)])
    calls = []
    res = segment_stack(
        vol, "optic disc, optic cup", tiny, batch_size=2, progress=lambda d, t: calls.append((d, t))
    )
    assert res.masks.shape == res.probabilities.shape == (2, 5, 48, 40)
    assert res.cluster_map.shape == (5, 48, 40) and res.cluster_map.min() >= 1
    assert res.slice_found.shape == (5, 2) and res.stack_axis == 0
    assert (res.found == res.slice_found.any(0)).all()
    assert res.cluster_similarity.shape == (tiny.config.em.num_bases, 2)
    for k in (0, 3, 4):  # batching must not mix up slices
        single = segment(vol[k], "optic disc, optic cup", tiny, coarse_to_fine=False)  # stacks never crop
        np.testing.assert_allclose(res.probabilities[:, k], single.probabilities, atol=1e-4)
    assert calls[-1] == (5, 5) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    # slices along the last axis: results keep the volume's axis order
    moved = segment_stack(np.moveaxis(vol, 0, -1), "optic disc, optic cup", tiny, axis=-1)
    assert moved.masks.shape == (2, 48, 40, 5) and moved.cluster_map.shape == (48, 40, 5)
    assert moved.stack_axis == 2
    np.testing.assert_allclose(
        np.moveaxis(moved.probabilities, -1, 1), res.probabilities, atol=1e-4
    )


def test_segment_stack_normalises_all_slices_together(tiny):
    base = _smooth(48, 48).astype(np.float32)
    vol = np.stack([base, base * 3.0])
    res = segment_stack(vol, "a", tiny)
    one, three = segment(vol[0], "a", tiny), segment(vol[1], "a", tiny)
    # alone, scaling an image changes nothing (robust window); in a stack the dim slice stays dim
    np.testing.assert_allclose(one.probabilities, three.probabilities, atol=1e-5)
    assert np.abs(res.probabilities[:, 0] - res.probabilities[:, 1]).max() > 1e-3


def test_segment_stack_cancel_and_errors(tiny):
    vol = np.stack([_smooth(40, 40)] * 6)
    seen = []
    with pytest.raises(Cancelled):
        segment_stack(
            vol,
            "a",
            tiny,
            batch_size=2,
            progress=lambda d, t: seen.append(d),
            cancel=lambda: len(seen) >= 2,
        )
    assert max(seen) < 6
    with pytest.raises(InvalidImageError, match="segment"):
        segment_stack(np.zeros((40, 40)), "a", tiny)
    with pytest.raises(InvalidArgumentError, match="axis"):
        segment_stack(vol, "a", tiny, axis=3)
    with pytest.raises(InvalidArgumentError, match="channel"):
        segment_stack(np.zeros((4, 40, 40, 3)), "a", tiny, axis=3)
    rgb = segment_stack(np.zeros((2, 40, 40, 3), np.uint8), "a", tiny)
    assert rgb.masks.shape == (1, 2, 40, 40)


def test_segment_stack_tiles_big_slices_and_retries_on_oom():
    net = PointwiseNet(image_size=32)
    vol = np.stack([_smooth(80, 80)] * 3)
    res = segment_stack(vol, "a", net, tile_size=48)
    assert res.tiled and res.masks.shape == (1, 3, 80, 80)
    np.testing.assert_allclose(
        res.probabilities[:, 0], segment(vol[0], "a", net, tile_size=48).probabilities, atol=1e-6
    )
    net.fail = [RuntimeError("CUDA out of memory")]
    with pytest.warns(OutOfMemoryFallbackWarning, match="one tile/slice"):
        again = segment_stack(vol, "a", net, batch_size=3)
    assert again.masks.shape == (1, 3, 80, 80)


# ----------------------------------------------------------------------------- load_model


def test_load_model_sources(tmp_path, tiny, no_bundled_model):
    with pytest.raises(CheckpointError, match="no bundled default model"):
        load_model(None, "cpu")
    with pytest.raises(CheckpointError, match="tiny"):
        load_model("no-such-model", "cpu")
    with pytest.warns(UntrainedModelWarning):
        again = load_model("tiny", "cpu")
    assert again is tiny and not again.training  # cached, eval mode
    folder = emclip.save_model(tiny, tmp_path / "ckpt")
    loaded = load_model(folder, "cpu")
    assert loaded is not tiny and not loaded.training
    assert load_model(str(folder), "cpu") is loaded  # cached by resolved path
    img = _smooth(64, 64)
    np.testing.assert_allclose(
        segment(img, "a", loaded).probabilities, segment(img, "a", tiny).probabilities, atol=1e-5
    )
    assert load_model(loaded, "cpu") is loaded
    inference.clear_model_cache()
    assert load_model(folder, "cpu") is not loaded


def test_segment_by_model_name_and_device_argument(tiny):
    with pytest.warns(UntrainedModelWarning):
        res = segment(_smooth(40, 40), "a", "tiny", device="cpu")
    assert res.masks.shape == (1, 40, 40) and res.device == "cpu"
