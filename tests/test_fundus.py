"""Coarse-to-fine optic disc segmentation in whole fundus photographs (emclip.fundus).

Most tests use the untrained "tiny" model (64 px input) whose ``predict_logits`` is wrapped into
an *oracle* that reads the answer from the pixels it is given (the network still runs):

- synthetic photographs are red (R = 255) inside a fundus circle, black outside, so the
  intensity window is always [0, 255] and the oracle sees the original pixel values;
- the green channel codes the structures: background 60, disc 200, cup 240; blue 255 marks a
  "vessel" stripe;
- "optic disc" -> logit 40 (g - 0.5), "optic cup" -> 40 (g - 0.86), "vessel" -> 40 (b - 0.5).

So a pass sees exactly what its input shows, at the network resolution: coarse-to-fine must
find the disc, crop, and give full-resolution masks much closer to the truth than one
letterboxed pass. The ``data`` tests at the end use a trained checkpoint on real photographs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from emclip import fundus
from emclip.fundus import (
    CROP_TO_DISC_RATIO,
    CoarseToFineWarning,
    CropBox,
    DiscLocation,
    crop_box,
    disc_from_probability,
    extract_square,
    is_whole_photograph,
    paste_square,
    segment_fundus,
    should_use_coarse_to_fine,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["optic disc", "optic cup"]


# ============================================================================ oracle model


def make_oracle() -> SimpleNamespace:
    """A private tiny model whose logits come from the pixel colours (see module docstring);
    ``calls`` records the input shape of every forward pass."""
    import torch
    from emclip.factory import create_model

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    original = model.predict_logits
    mean = torch.tensor(model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.pixel_std).view(1, 3, 1, 1)
    calls: list[tuple[int, ...]] = []

    def predict(images, prompts, modality=None):
        out = original(images, prompts, modality=modality)
        calls.append(tuple(images.shape))
        rgb = images.float() * std + mean
        names = prompts[0] if prompts and isinstance(prompts[0], (list, tuple)) else prompts
        logits = torch.full_like(out.logits, -20.0)
        for i, name in enumerate(names):
            key = name.casefold()
            if "disc" in key:
                logits[:, i] = 40.0 * (rgb[:, 1] - 0.5)
            elif "cup" in key:
                logits[:, i] = 40.0 * (rgb[:, 1] - 0.86)
            elif "vessel" in key:
                logits[:, i] = 40.0 * (rgb[:, 2] - 0.5)
        out.logits = logits
        return out

    model.predict_logits = predict
    return SimpleNamespace(model=model, calls=calls)


@pytest.fixture(scope="module")
def oracle() -> SimpleNamespace:
    return make_oracle()


def photo(h, w, cy, cx, r, *, fundus_circle=True, vessel=False, gap=0):
    """Synthetic RGB photo + truth (disc, cup) masks: disc radius r at (cy, cx), cup r/2;
    ``gap`` > 0 draws a background-coloured vertical line that wide through the disc centre
    (not part of the disc: a detail only a full-resolution pass can keep)."""
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    field = (
        (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.5 * min(h, w) * 1.15) ** 2
        if fundus_circle
        else np.ones((h, w), bool)
    )
    img[field, 0] = 255
    img[field, 1] = 60
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    disc, cup = d2 < r**2, d2 < (r / 2) ** 2
    img[disc, 0], img[disc, 1] = 255, 200
    img[cup, 1] = 240
    if vessel:
        img[h // 4 : h // 4 + 12, w // 10 : w // 3, 2] = 255
    if gap:
        line = np.abs(xx - cx) < gap / 2
        img[line & disc, 1] = 60
        disc, cup = disc & ~line, cup & ~line
    return img, disc, cup


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def plain(image, prompts, model, **kw):
    return fundus._plain_segment(image, prompts, model, modality="fundus", **kw)


# ============================================================================ pure geometry


def _location(center, diameter, shape):
    return DiscLocation(
        center=center,
        diameter=diameter,
        bbox=(0, 0, 1, 1),
        area=math.pi * diameter**2 / 4,
        confidence=0.9,
        max_probability=0.99,
        image_shape=shape,
    )


def test_crop_ratio_matches_training_crops(shared_data):
    """The documented ratio is the mean over the official-train Drishti ROI crops."""
    import csv

    from PIL import Image

    folder = shared_data / "fundus" / "drishti_gs"
    ratios = []
    with open(folder / "meta.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["official_split"] != "train":
                continue
            mask = np.asarray(Image.open(folder / "masks" / f"{row['id']}.png"))
            area = np.count_nonzero(mask >= 1)
            ratios.append(mask.shape[0] / (2 * math.sqrt(area / math.pi)))
    assert len(ratios) == 50
    assert abs(np.mean(ratios) - CROP_TO_DISC_RATIO) < 0.01


def test_crop_box_is_centred_square_of_ratio_times_diameter():
    box = crop_box(_location((300.0, 400.0), 100.0, (600, 800)), ratio=2.0)
    assert box.side == 200
    assert (box.y0, box.x0) == (201, 301)  # centre 300.5, 400.5: half a pixel at most
    assert box.inside == (201, 301, 401, 501) and not box.padded
    # odd side, fractional centre: the square's centre is within half a pixel of the disc's
    box = crop_box(_location((100.3, 50.7), 40.0, (300, 300)), ratio=2.14)
    assert box.side == 86
    assert abs(box.y0 + (box.side - 1) / 2 - 100.3) <= 0.5
    assert abs(box.x0 + (box.side - 1) / 2 - 50.7) <= 0.5


def test_crop_box_side_is_clamped():
    tiny = crop_box(_location((50.0, 50.0), 3.0, (100, 100)))
    assert tiny.side == fundus.MIN_CROP_SIDE
    huge = crop_box(_location((50.0, 80.0), 400.0, (100, 160)))
    assert huge.side == 160  # never more than the long side


def test_crop_near_border_is_padded_and_pasted_back_exactly():
    rng = np.random.default_rng(0)
    img = rng.integers(10, 250, size=(50, 70, 3), dtype=np.uint8)
    box = CropBox(y0=-10, x0=55, side=30, image_shape=(50, 70))
    assert box.padded and box.inside == (0, 55, 20, 70)
    crop = extract_square(img, box)
    assert crop.shape == (30, 30, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop[10:30, 0:15], img[0:20, 55:70])
    # padding = per-channel minimum of the part inside
    fill = img[0:20, 55:70].min(axis=(0, 1))
    np.testing.assert_array_equal(crop[0, 20], fill)
    np.testing.assert_array_equal(crop[29, 29], fill)
    # paste back: exactly the inside part, zeros elsewhere
    maps = rng.random((2, 30, 30)).astype(np.float32)
    full = paste_square(maps, box)
    assert full.shape == (2, 50, 70)
    np.testing.assert_array_equal(full[:, 0:20, 55:70], maps[:, 10:30, 0:15])
    assert not full[:, 20:].any() and not full[:, :, :55].any()
    with pytest.raises(ValueError, match="crop maps"):
        paste_square(maps[:, :10], box)


def test_extract_square_without_padding_is_a_copy():
    img = np.arange(100 * 120, dtype=np.uint16).reshape(100, 120)
    box = CropBox(y0=10, x0=20, side=40, image_shape=(100, 120))
    crop = extract_square(img, box)
    np.testing.assert_array_equal(crop, img[10:50, 20:60])
    crop[0, 0] = 0
    assert img[10, 20] != 0


def test_disc_from_probability_picks_largest_mass_and_scales():
    prob = np.zeros((40, 50), np.float32)
    prob[5:7, 5:7] = 0.99  # small but sure
    yy, xx = np.mgrid[:40, :50]
    big = (yy - 20) ** 2 + (xx - 30) ** 2 < 8**2
    prob[big] = 0.8
    prob[20, 30] = 0.3  # a hole: filled for the area
    loc = disc_from_probability(prob, threshold=0.5, image_shape=(400, 500))
    assert loc is not None
    assert abs(loc.center[0] - (20.5 * 10 - 0.5)) < 3 and abs(loc.center[1] - (30.5 * 10 - 0.5)) < 3
    assert abs(loc.area - np.count_nonzero(big) * 100) < 1e-6
    assert abs(loc.diameter - 2 * math.sqrt(loc.area / math.pi)) < 1e-9
    assert loc.bbox == (130, 230, 280, 380)
    assert loc.confidence == pytest.approx(0.8) and loc.max_probability == pytest.approx(0.8)
    assert loc.image_shape == (400, 500)
    assert loc.to_dict()["area_fraction"] == pytest.approx(loc.area / 200000, abs=1e-5)


def test_brightness_prior_prefers_the_bright_candidate():
    """Two candidates: a larger one on dark pixels (a fovea) and the disc on bright pixels."""
    prob = np.zeros((100, 200), np.float32)
    yy, xx = np.mgrid[:100, :200]
    fovea = (yy - 50) ** 2 + (xx - 100) ** 2 < 14**2
    disc = (yy - 50) ** 2 + (xx - 30) ** 2 < 10**2
    prob[fovea | disc] = 0.9
    bright = np.ones_like(prob)
    bright[fovea], bright[disc] = 0.85, 1.6
    by_mass = disc_from_probability(prob)
    assert by_mass.candidates == 2 and abs(by_mass.center[1] - 100) < 1
    located = disc_from_probability(prob, brightness=bright)
    assert abs(located.center[1] - 30) < 1 and located.relative_brightness == pytest.approx(1.6)
    # the prior only re-ranks: a much larger candidate still wins with power 0
    assert (
        abs(disc_from_probability(prob, brightness=bright, brightness_power=0).center[1] - 100) < 1
    )
    with pytest.raises(ValueError, match="brightness map"):
        disc_from_probability(prob, brightness=bright[:50])


def test_relative_brightness_ignores_the_black_surround():
    img = np.zeros((100, 100, 3), np.uint8)
    img[10:90, 10:90] = (200, 80, 40)  # the retina
    img[40:50, 40:50] = (255, 255, 200)  # a bright disc
    rel = fundus.relative_brightness(img)
    assert rel.shape == (100, 100) and rel.dtype == np.float32
    assert rel[20, 20] == pytest.approx(1.0, abs=1e-6)  # the field median
    assert rel[45, 45] > 1.5 and rel[0, 0] == 0.0


def test_disc_from_probability_none_when_nothing_credible():
    prob = np.full((200, 200), 0.4, np.float32)
    assert disc_from_probability(prob, threshold=0.5) is None
    prob[10:12, 10:12] = 0.9  # 4 pixels of 40000 is below MIN_DISC_AREA_FRACTION (8 px)
    assert disc_from_probability(prob, threshold=0.5) is None
    assert disc_from_probability(prob, threshold=0.5, min_area_fraction=0.0) is not None


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (np.uint8, (600, 900, 3)),
        (np.uint16, (600, 900)),
        (np.int16, (600, 900, 1)),
        (np.int32, (600, 900)),
        (np.float64, (600, 900, 4)),
        (bool, (600, 900)),
    ],
)
def test_shrink_for_locating_keeps_layout_and_content(dtype, shape):
    img = np.zeros(shape, dtype=dtype)
    img[200:400, 300:500] = 1  # a bright square: rows 67:133, cols 100:167 after 3x shrinking
    small = fundus.shrink_for_locating(img, 300)
    assert small.ndim == img.ndim and small.shape[2:] == img.shape[2:]
    assert small.shape[:2] == (200, 300)
    assert float(np.asarray(small[100, 133], dtype=np.float64).max()) == pytest.approx(1.0)
    assert float(np.asarray(small[5, 5], dtype=np.float64).max()) == 0.0
    assert fundus.shrink_for_locating(img, 1000) is img  # small enough: unchanged, no copy


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.02, True), (0.054, True), (0.12, False), (0.18, False), (0.40, False)],
)
def test_whole_photograph_decision(fraction, expected):
    """Whole Drishti photos (2-5.4 %) vs Drishti ROI (12-31 %) and RIM-ONE (>= 35 %) crops."""
    h, w = 880, 1024
    d = 2 * math.sqrt(fraction * h * w / math.pi)
    assert is_whole_photograph(_location((440.0, 512.0), d, (h, w))) is expected


def test_whole_photograph_needs_small_diameter_too():
    # 5 % of the area but 60 % of the short side: a thin strip around the disc, not a photo
    loc = _location((50.0, 500.0), 0.6 * 100, (100, 5600))
    assert loc.area_fraction < fundus.WHOLE_MAX_AREA_FRACTION
    assert not is_whole_photograph(loc)
    assert not is_whole_photograph(None)


@pytest.mark.parametrize(
    "modality, prompts, flag, expected",
    [
        (None, "optic disc, optic cup", None, True),
        ("colour fundus photograph", "OD", None, True),
        ("fundus", "cup", None, True),
        (None, ["neuroretinal rim"], None, True),
        ("fundus", "vessels", None, False),
        ("cardiac MRI", "optic disc", None, False),
        ("histology", "optic disc", None, False),
        (None, "left ventricle", None, False),
        ("cardiac MRI", "left ventricle", True, True),
        (None, "optic disc", False, False),
    ],
)
def test_should_use_coarse_to_fine(modality, prompts, flag, expected):
    assert should_use_coarse_to_fine(modality, prompts, flag) is expected


def test_should_use_coarse_to_fine_rejects_non_bool():
    with pytest.raises(ValueError, match="coarse_to_fine"):
        should_use_coarse_to_fine(None, "optic disc", "yes")


# ============================================================================ with the oracle


def test_locate_finds_disc_in_large_photo(oracle):
    # 600x800 > 4 * 64: the locating pass runs on a shrunk copy; coordinates come back
    img, disc, _ = photo(600, 800, 250, 560, 45)
    loc = fundus.locate_optic_disc(img, oracle.model)
    assert loc is not None and loc.image_shape == (600, 800)
    assert abs(loc.center[0] - 250) < 4 and abs(loc.center[1] - 560) < 4
    assert abs(loc.diameter - 90) < 0.1 * 90
    assert disc[round(loc.center[0]), round(loc.center[1])]
    assert is_whole_photograph(loc)


def test_locate_prefers_bright_disc_over_dark_lookalike(oracle):
    """A larger dark region the model also calls "disc" (like the fovea of a macula-centred
    photo for a model trained on disc-centred ones) loses to the bright real disc."""
    img, disc, _ = photo(300, 400, 150, 80, 22)
    yy, xx = np.mgrid[:300, :400]
    fake = (yy - 150) ** 2 + (xx - 250) ** 2 < 30**2
    img[fake] = (0, 200, 0)  # "disc" to the oracle (green), but dark
    loc = fundus.locate_optic_disc(img, oracle.model)
    assert loc.candidates == 2 and disc[round(loc.center[0]), round(loc.center[1])]
    naive = fundus.locate_optic_disc(img, oracle.model, brightness_prior=False)
    assert fake[round(naive.center[0]), round(naive.center[1])]
    res = segment_fundus(img, PROMPTS, oracle.model)
    assert res.info["coarse_to_fine"]["used"] and dice(res.masks[0], disc) > 0.95


def test_coarse_to_fine_is_accurate_at_full_resolution(oracle):
    img, disc, cup = photo(600, 800, 250, 560, 45, gap=6)
    line = (img[..., 1] == 60) & (img[..., 0] == 255) & photo(600, 800, 250, 560, 45)[1]
    oracle.calls.clear()
    res = segment_fundus(img, PROMPTS, oracle.model)
    assert len(oracle.calls) == 2  # locate + crop, nothing else
    info = res.info["coarse_to_fine"]
    assert info["used"] is True and info["locate_side"] == 256
    side = info["crop"]["side"]
    assert abs(side - CROP_TO_DISC_RATIO * 90) < 0.1 * CROP_TO_DISC_RATIO * 90
    y0, x0, y1, x1 = info["crop"]["box"]
    assert abs((y0 + y1) / 2 - 250) < 4 and abs((x0 + x1) / 2 - 560) < 4
    # result fields on the full grid
    assert res.prompts == PROMPTS
    assert res.masks.shape == res.probabilities.shape == (2, 600, 800)
    assert res.cluster_map.shape == (600, 800) and res.cluster_map.min() >= 1
    assert res.cluster_similarity.shape[1] == 2
    assert res.found.all() and res.areas[0] == np.count_nonzero(res.masks[0])
    # nothing outside the crop
    iy0, ix0, iy1, ix1 = info["crop"]["inside"]
    outside = np.ones((600, 800), bool)
    outside[iy0:iy1, ix0:ix1] = False
    assert not res.probabilities[:, outside].any()
    # better than one letterboxed pass over the whole photo (12.5x smaller): the 6 px gap
    # through the disc is resolved only at full resolution
    whole = plain(img, PROMPTS, oracle.model, tile_size=0)
    assert res.masks[0][line].mean() < 0.2 and whole.masks[0][line].mean() > 0.8
    d_fine, c_fine = dice(res.masks[0], disc), dice(res.masks[1], cup)
    d_plain, c_plain = dice(whole.masks[0], disc), dice(whole.masks[1], cup)
    assert d_fine > 0.98 and c_fine > 0.9
    assert d_fine > d_plain + 0.03 and c_fine > c_plain + 0.2


def test_disc_at_the_border_is_padded(oracle):
    img, disc, cup = photo(300, 400, 20, 385, 25, fundus_circle=False)
    res = segment_fundus(img, PROMPTS, oracle.model)
    info = res.info["coarse_to_fine"]
    assert info["used"] and info["crop"]["padded"]
    y0, _x0, _y1, x1 = info["crop"]["box"]
    assert y0 < 0 and x1 > 400
    assert dice(res.masks[0], disc) > 0.95
    assert dice(res.masks[1], cup) > 0.9


def test_disc_crop_is_recognised_and_returns_plain_result(oracle):
    """An ROI-like crop (disc 18 % of the image) gets the plain whole-image segmentation."""
    r = math.sqrt(0.18 * 256 * 256 / math.pi)
    img, _disc, _ = photo(256, 256, 128, 128, r, fundus_circle=False)
    oracle.calls.clear()
    res = segment_fundus(img, PROMPTS, oracle.model)
    assert len(oracle.calls) == 1  # the locating pass was the answer
    info = res.info["coarse_to_fine"]
    assert info["used"] is False and "crop" in info["reason"]
    assert 0.15 < info["disc"]["area_fraction"] < 0.21
    ref = plain(img, PROMPTS, oracle.model)
    np.testing.assert_array_equal(res.masks, ref.masks)
    np.testing.assert_allclose(res.probabilities, ref.probabilities, atol=1e-6)
    # forcing coarse-to-fine on the crop still crops around the disc
    forced = segment_fundus(img, PROMPTS, oracle.model, whole_photograph=True)
    assert forced.info["coarse_to_fine"]["used"] is True


def test_no_disc_falls_back_with_warning(oracle):
    img, _, _ = photo(300, 400, 150, 200, 30)
    img[..., 1] = 60  # no disc colour anywhere
    with pytest.warns(CoarseToFineWarning, match="no optic disc"):
        res = segment_fundus(img, "optic cup", oracle.model)
    info = res.info["coarse_to_fine"]
    assert info["used"] is False and info["disc"] is None
    assert res.prompts == ["optic cup"] and res.probabilities.shape == (1, 300, 400)
    ref = plain(img, ["optic cup"], oracle.model)
    np.testing.assert_allclose(res.probabilities, ref.probabilities, atol=1e-6)


def test_other_prompts_keep_whole_image_probabilities(oracle):
    img, disc, _ = photo(480, 640, 240, 480, 35, vessel=True)
    res = segment_fundus(img, ["optic disc", "vessel"], oracle.model)
    assert res.info["coarse_to_fine"]["used"]
    vessel_truth = img[..., 2] > 0
    assert dice(res.masks[1], vessel_truth) > 0.8  # found far outside the disc crop
    assert dice(res.masks[0], disc) > 0.95


def test_added_locate_prompt_is_not_in_the_result(oracle):
    img, _, cup = photo(480, 640, 240, 200, 35)
    res = segment_fundus(img, "cup", oracle.model)
    assert res.prompts == ["cup"] and res.masks.shape == (1, 480, 640)
    assert res.cluster_similarity.shape[1] == 1
    assert res.info["coarse_to_fine"]["used"] and dice(res.masks[0], cup) > 0.9


def test_channel_first_and_threshold_min_area(oracle):
    img, _, _ = photo(300, 400, 150, 120, 25)
    a = segment_fundus(img, PROMPTS, oracle.model)
    b = segment_fundus(np.moveaxis(img, -1, 0), PROMPTS, oracle.model, channel_axis=0)
    np.testing.assert_array_equal(a.masks, b.masks)
    big = segment_fundus(img, PROMPTS, oracle.model, min_area=10**6)
    assert not big.found.any() and not big.masks.any() and big.min_area == 10**6
    assert big.probabilities.max() > 0.9  # probabilities kept


def test_progress_is_monotonic_and_cancel_raises(oracle):
    import emclip

    img, _, _ = photo(300, 400, 150, 120, 25)
    seen = []
    segment_fundus(img, PROMPTS, oracle.model, progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] and seen[0][0] == 0
    with pytest.raises(emclip.Cancelled):
        segment_fundus(img, PROMPTS, oracle.model, cancel=lambda: True)


def test_bad_arguments_raise_helpful_errors(oracle):
    img, _, _ = photo(100, 100, 50, 50, 10)
    with pytest.raises(ValueError, match="crop_ratio"):
        segment_fundus(img, PROMPTS, oracle.model, crop_ratio=0.5)
    with pytest.raises(ValueError, match="whole_photograph"):
        segment_fundus(img, PROMPTS, oracle.model, whole_photograph="auto")
    with pytest.raises(ValueError, match="threshold"):
        segment_fundus(img, PROMPTS, oracle.model, locate_threshold=1.5)


def test_segment_hands_fundus_prompts_to_coarse_to_fine_without_recursing(oracle, monkeypatch):
    """emclip.segment's ``coarse_to_fine`` hook: auto for fundus prompts, off when False; the
    inner passes of segment_fundus call segment with coarse_to_fine=False (no recursion)."""
    from emclip import inference
    from emclip.inference import single_image

    real = single_image.segment
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("coarse_to_fine"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "segment", spy)
    img, disc, _ = photo(300, 400, 150, 120, 25)
    res = real(img, "optic disc, optic cup", oracle.model, coarse_to_fine=True)
    assert seen == [False, False]  # the locate and the crop passes, both plain
    assert res.info["coarse_to_fine"]["used"] and dice(res.masks[0], disc) > 0.95
    off = real(img, "optic disc", oracle.model, coarse_to_fine=False)
    assert "coarse_to_fine" not in off.info


# ============================================================================ trained model


def _trained_model():
    """The bundled model, else the team's training run; skip (saying why) if neither exists."""
    import emclip
    from emclip.errors import CheckpointError

    try:
        return emclip.load_model(device="cpu")
    except CheckpointError as exc:
        run = REPO_ROOT.parent / "runs" / "default" / "best"
        if (run / "config.json").is_file():
            return emclip.load_model(run, device="cpu")
        pytest.skip(f"no trained model: {exc} (and no checkpoint at {run})")


@pytest.fixture(scope="module")
def trained():
    return _trained_model()


def _full_test_photos(shared_data, n):
    import csv

    from PIL import Image

    folder = shared_data / "fundus_full" / "drishti_gs"
    with open(folder / "meta.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["official_split"] == "test"][:n]
    for row in rows:
        img = np.asarray(Image.open(folder / "images" / f"{row['id']}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(folder / "masks" / f"{row['id']}.png"))
        yield row["id"], img, mask


@pytest.mark.data
def test_trained_model_finds_disc_in_whole_test_photographs(trained, shared_data):
    for name, img, mask in _full_test_photos(shared_data, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", CoarseToFineWarning)
            res = segment_fundus(img, PROMPTS, trained)
        info = res.info["coarse_to_fine"]
        assert info["used"], f"{name}: {info['reason']}"
        cy, cx = (round(c) for c in info["disc"]["center"])
        assert mask[cy, cx] >= 1, f"{name}: located centre {cy, cx} is outside the disc"
        assert dice(res.masks[0], mask >= 1) > 0.8, name


@pytest.mark.data
def test_trained_model_recognises_roi_crops(trained, shared_data):
    from PIL import Image

    folder = shared_data / "fundus" / "drishti_gs" / "images"
    img = np.asarray(Image.open(folder / "drishtiGS_001.png").convert("RGB"))
    res = segment_fundus(img, PROMPTS, trained)
    assert res.info["coarse_to_fine"]["used"] is False
    assert "crop" in res.info["coarse_to_fine"]["reason"]


@pytest.mark.data
def test_trained_model_finds_disc_in_skimage_retina(trained):
    """skimage's retina.jpg (macula-centred, 1411x1411, left eye): the disc is near the left
    edge, centre about (row 640, col 225), diameter about 190 px; the macula is in the middle."""
    data = pytest.importorskip("skimage.data")
    img = data.retina()
    loc = fundus.locate_optic_disc(img, trained)
    assert loc is not None and is_whole_photograph(loc)
    assert abs(loc.center[0] - 640) < 80 and abs(loc.center[1] - 225) < 80


@pytest.mark.parametrize("options, words", [({"batch_size": 0}, "batch_size"), ({"crop_ratio": 0.5}, "crop_ratio")])
def test_segment_fundus_checks_its_arguments_before_loading_a_model(options, words):
    from emclip.errors import InvalidArgumentError

    image = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(InvalidArgumentError, match=words):  # not the CheckpointError of the model name
        fundus.segment_fundus(image, "optic disc", "/no/such/model", **options)


def test_locate_optic_disc_and_segment_fundus_share_one_locating_pass(monkeypatch):
    """Both run the same low-resolution pass: same shrunk input, the disc prompt added once."""
    calls = []
    real = fundus._plain_segment

    def spy(image, prompts, model, **kwargs):
        calls.append((image.shape, list(prompts), kwargs["tile_size"], kwargs["min_area"]))
        return real(image, prompts, model, **kwargs)

    monkeypatch.setattr(fundus, "_plain_segment", spy)
    from emclip.inference import load_model

    net = load_model("tiny", "cpu")
    image = np.random.default_rng(0).integers(0, 255, (600, 900, 3), np.uint8)
    fundus.locate_optic_disc(image, net)
    fundus.segment_fundus(image, "optic cup, optic disc", net, whole_photograph=False)
    side = fundus.LOCATE_SIDE_FACTOR * net.image_size
    assert calls[0][1] == ["optic disc"] and calls[1][1] == ["optic cup", "optic disc"]
    assert calls[0][0] == calls[1][0] and max(calls[0][0][:2]) <= side
    assert calls[0][2:] == calls[1][2:] == (0, 0)  # single pass, no minimum area on the shrunk image
