"""Evaluation: JSON shape, geometry through the inference path, synonyms, CLI, real folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from emclip.config import ModelConfig
from emclip.evaluate import evaluate, to_markdown
from emclip.nn.base import ModelOutput, SegmentationModel

FUNDUS_YAML = """\
modality: colour fundus photograph
structures:
  optic disc: [1, 2]
  optic cup: [2]
synonyms:
  optic disc: [OD]
  optic cup: [OC]
"""


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def toy(tmp_path) -> Path:
    """Images whose intensity *is* the label: 0 background, 128 disc rim, 255 cup; 4 test images."""
    root = tmp_path / "toy_fundus"
    root.mkdir()
    (root / "dataset.yaml").write_text(FUNDUS_YAML)
    yy, xx = np.mgrid[:60, :90]
    rows = ["id,official_split"]
    for i in range(6):
        r = np.hypot(yy - 30, xx - 30 - 5 * i)
        lab = np.where(r < 8, 2, np.where(r < 18, 1, 0)).astype(np.uint8)
        if i == 5:
            lab[:] = 0  # an image without any structure
        img = np.array([0, 128, 255], np.uint8)[lab]
        _png(root / "images" / f"im{i}.png", np.stack([img] * 3, -1))
        _png(root / "masks" / f"im{i}.png", lab)
        rows.append(f"im{i},{'train' if i == 0 else 'test'}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


class IntensityModel(SegmentationModel):
    """A 'model' that reads the answer from the intensity (disc >= mid grey, cup = white), to
    check that evaluation maps predictions back onto the image grid correctly."""

    def __init__(self):
        super().__init__(ModelConfig(arch="unet", name="intensity", image_size=64, pixel_mean=(0.5, 0.5, 0.5),
                                     pixel_std=(0.5, 0.5, 0.5), class_names=["optic disc", "optic cup"],
                                     synonyms={"optic disc": ["OD"], "optic cup": ["OC"]}))
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def class_index(self, prompt: str) -> int:
        table = {"optic disc": 0, "od": 0, "optic cup": 1, "oc": 1}
        key = prompt.casefold()
        if key not in table:
            from emclip.errors import UnknownPromptError

            raise UnknownPromptError(prompt)
        return table[key]

    def _predict(self, images, batch, modality):
        x = images[:, 0] * 0.5 + 0.5
        maps = torch.stack([(x - 0.25) * 60, (x - 0.75) * 60], 1)
        idx = torch.tensor([[self.class_index(p) if p else 0 for p in row] for row in batch.names])
        logits = maps[torch.arange(len(idx))[:, None], idx]
        return ModelOutput(logits=logits, prompt_mask=batch.mask)


def test_json_shape_and_near_perfect_scores(toy):
    res = evaluate(IntensityModel(), [toy], split="test", model_name="intensity")
    assert set(res) == {"model", "mirror", "datasets"} and res["model"] == "intensity"
    assert res["mirror"] is False  # a model without test_time_mirror in its config: one plain pass
    entry = res["datasets"]["toy_fundus"]
    assert set(entry) == {"n_images", "structures"} and entry["n_images"] == 5
    assert list(entry["structures"]) == ["optic disc", "optic cup"]
    for name, m in entry["structures"].items():
        for key in ("dice", "hd95", "asd", "dice_std", "hd95_std", "asd_std"):
            assert isinstance(m[key], float), (name, key)
        assert m["n_images"] == 5 and m["n_undefined"] == 0 and m["distance_unit"] == "px"
        # geometry through letterbox -> network -> unletterbox is right: near-perfect masks
        assert m["dice"] > 0.9 and m["hd95"] <= 2.0, (name, m)
    json.dumps(res, allow_nan=False)  # all numbers finite here
    md = to_markdown(res)
    assert "| toy_fundus | optic disc | 5 |" in md and "(mirror pass off)" in md
    mirrored = evaluate(IntensityModel(), [toy], split="test", mirror=True)
    assert mirrored["mirror"] is True  # the toy model is left-right symmetric: same near-perfect scores
    assert mirrored["datasets"]["toy_fundus"]["structures"]["optic disc"]["dice"] > 0.9


def test_synonym_prompt_set_reports_each_synonym(toy):
    res = evaluate(IntensityModel(), [toy], split="all", prompt_set="synonyms")
    disc = res["datasets"]["toy_fundus"]["structures"]["optic disc"]
    assert disc["prompts"] == ["OD"] and set(disc["by_prompt"]) == {"OD"}  # unknown synonyms skipped
    assert disc["by_prompt"]["OD"] == pytest.approx(disc["dice"])
    assert res["datasets"]["toy_fundus"]["n_images"] == 6


def test_missing_structure_is_counted_not_hidden(toy):
    class Blind(IntensityModel):
        def _predict(self, images, batch, modality):
            out = super()._predict(images, batch, modality)
            return ModelOutput(logits=torch.full_like(out.logits, -20.0), prompt_mask=out.prompt_mask)

    res = evaluate(Blind(), [toy], split="test")
    cup = res["datasets"]["toy_fundus"]["structures"]["optic cup"]
    # 4 images with a cup -> Dice 0 and HD undefined; the empty image -> Dice 1, HD 0
    assert cup["n_undefined"] == 4 and cup["dice"] == pytest.approx(0.2)
    assert cup["hd95"] == 0.0
    disc_only_empty = evaluate(Blind(), [toy], split="test", limit=1)["datasets"]["toy_fundus"]["structures"]["optic disc"]
    assert math.isnan(disc_only_empty["hd95"]) and disc_only_empty["n_undefined"] == 1
    from emclip.evaluate import to_json

    assert json.loads(to_json({"model": "m", "datasets": {"t": {"n_images": 1, "structures": {"optic disc": disc_only_empty}}}}))[
        "datasets"]["t"]["structures"]["optic disc"]["hd95"] is None


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3"])
def test_a_limit_below_one_is_refused_before_the_model_runs(toy, limit):
    from emclip.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="limit must be a whole number >= 1"):
        evaluate(IntensityModel(), [toy], split="test", limit=limit)


def test_an_empty_split_is_a_dataset_error_saying_what_to_do(toy):
    from emclip.errors import DatasetError

    (toy / "meta.csv").write_text("id,official_split\n" + "".join(f"im{i},train\n" for i in range(6)))
    with pytest.raises(DatasetError, match=r"'test' split has no images \(images per split: train 5, val 1, test 0\)"):
        evaluate("no-such-model-is-loaded", [toy], split="test")  # refused before loading the model
    assert evaluate(IntensityModel(), [toy], split="all")["datasets"]["toy_fundus"]["n_images"] == 6


def test_an_image_segment_refuses_is_named_with_its_type_kept(toy):
    from emclip.errors import InvalidImageError

    _png(toy / "images" / "im3.png", np.zeros((4, 4, 3), np.uint8))
    _png(toy / "masks" / "im3.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InvalidImageError) as info:
        evaluate(IntensityModel(), [toy], split="test")
    text = str(info.value)
    assert str(toy / "images" / "im3.png") in text and "8x8" in text and "remove this image" in text


def test_structure_names_are_matched_as_cleaned_prompts(toy):
    """A name that cleaning changes (NFKC: full-width letters, a tab) still finds its mask."""
    (toy / "dataset.yaml").write_text("structures:\n  \"optic\\tdisc\": [1, 2]\n  ｏｐｔｉｃ cup: [2]\n")
    entry = evaluate(IntensityModel(), [toy], split="test")["datasets"]["toy_fundus"]["structures"]
    assert [m["dice"] > 0.9 for m in entry.values()] == [True, True], entry


def test_cli_evaluate_writes_json_and_markdown(toy, tmp_path, capsys):
    from emclip.checkpoint import save_checkpoint
    from emclip.cli.main import main
    from emclip.factory import create_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(create_model("tiny"), tmp_path / "tiny_ckpt")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = main(["evaluate", "--model", str(ckpt), "--data", str(toy), "--json", str(out_json),
                 "--markdown", str(out_md), "--device", "cpu", "--quiet"])
    assert code == 0
    res = json.loads(out_json.read_text())
    st = res["datasets"]["toy_fundus"]["structures"]
    assert set(st) == {"optic disc", "optic cup"} and 0.0 <= st["optic disc"]["dice"] <= 1.0
    assert out_md.read_text() == capsys.readouterr().out
    assert main(["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "nope"), "--quiet"]) == 2


@pytest.mark.data
@pytest.mark.slow
def test_real_folders_units_and_volumes(shared_data):
    from emclip.factory import create_model

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    res = evaluate(model, [shared_data / "fundus" / "drishti_gs", shared_data / "cardiac" / "mscmr_lge",
                           shared_data / "brain" / "brats2018_dvn2"], split="test", limit=2, device="cpu")
    ds = res["datasets"]
    assert set(ds) == {"drishti_gs", "mscmr_lge", "brats2018_dvn2"}
    assert ds["drishti_gs"]["structures"]["optic disc"]["distance_unit"] == "px"
    assert ds["mscmr_lge"]["structures"]["myocardium"]["distance_unit"] == "mm"
    assert ds["brats2018_dvn2"]["n_images"] == 1  # one held-out case, evaluated in 3D
    assert ds["brats2018_dvn2"]["structures"]["whole tumour"]["distance_unit"] == "mm"
    for entry in ds.values():
        for m in entry["structures"].values():
            assert 0.0 <= m["dice"] <= 1.0 and (math.isnan(m["hd95"]) or m["hd95"] >= 0)


# --------------------------------------------------------------------------- several MRI sequences


@pytest.fixture()
def brain(tmp_path) -> Path:
    """Three NIfTI cases with FLAIR + T1ce on different intensity scales; axial = voxel axis 2."""
    import nibabel as nib

    root = tmp_path / "toy_brain"
    root.mkdir()
    (root / "dataset.yaml").write_text("modality: brain MRI\nchannels: [flair, t1ce]\nlabels: seg\n"
                                       "structures:\n  whole tumour: [1]\n")
    rng = np.random.default_rng(0)
    for i in range(3):
        case = root / f"c{i}"
        case.mkdir()
        seg = np.zeros((40, 48, 5), np.uint8)
        seg[10 + i:22 + i, 12:26, 1:4] = 1
        flair = (rng.random(seg.shape) * 100 + 300.0 * seg).astype(np.float32)
        t1ce = (rng.random(seg.shape) * 2000).astype(np.float32)
        for name, arr in (("flair", flair), ("t1ce", t1ce), ("seg", seg)):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(case / f"c{i}_{name}.nii.gz"))
    return root


def _tiny(fusion: bool):
    from emclip.config import load_config
    from emclip.factory import create_model

    torch.manual_seed(0)
    m = create_model(load_config("tiny", {"fusion.enabled": True} if fusion else None)).eval()
    if fusion:
        m.fusion.seen[:] = True  # as if trained on every sequence: nothing is left out
    return m


@pytest.fixture()
def calls(monkeypatch):
    """Records (channels, volume shape, volume) of every segment_stack call evaluate makes."""
    from emclip import inference

    real, seen = inference.segment_stack, []

    def spy(volume, prompts, model, **kw):
        seen.append((kw.get("channels"), np.shape(volume), np.asarray(volume)))
        return real(volume, prompts, model, **kw)

    monkeypatch.setattr(inference, "segment_stack", spy)
    return seen


def test_fusion_model_gets_every_sequence_raw_and_channels_restricts(brain, calls):
    import nibabel as nib

    model = _tiny(True)
    res = evaluate(model, [brain], split="all")
    entry = res["datasets"]["toy_brain"]
    assert entry["n_images"] == 3 and entry["channels"] == ["flair", "t1ce"]
    assert 0.0 <= entry["structures"]["whole tumour"]["dice"] <= 1.0
    assert [c for c, _, _ in calls] == [["flair", "t1ce"]] * 3
    assert all(shape == (40, 48, 5, 2) for _, shape, _ in calls)
    # the stored intensities (segment_stack normalises each sequence itself, as bench_brain.py)
    raw = [np.asarray(nib.load(str(brain / "c0" / f"c0_{s}.nii.gz")).dataobj) for s in ("flair", "t1ce")]
    np.testing.assert_array_equal(calls[0][2], np.stack(raw, -1))
    assert "toy_brain (flair+t1ce)" in to_markdown(res)
    calls.clear()
    only = evaluate(model, [brain], split="all", channels=["FLAIR"])
    assert only["datasets"]["toy_brain"]["channels"] == ["flair"]
    assert [c for c, _, _ in calls] == [["flair"]] * 3 and calls[0][1] == (40, 48, 5, 1)
    np.testing.assert_array_equal(calls[0][2][..., 0], raw[0])
    from emclip.errors import DatasetError

    with pytest.raises(DatasetError, match="no sequence 'dwi'"):
        evaluate(model, [brain], split="all", channels=["dwi"])
    from emclip.inference.channels import UnseenSequenceWarning

    model.fusion.seen[2] = False  # t1ce never seen in training: the model leaves it out, and says so
    with pytest.warns(UnseenSequenceWarning):
        part = evaluate(model, [brain], split="all", limit=1)
    assert part["datasets"]["toy_brain"]["ignored_channels"] == ["t1ce"]


def test_cli_channels_option_restricts_the_sequences(brain, calls, tmp_path):
    from emclip.checkpoint import save_checkpoint
    from emclip.cli.main import main

    ckpt = save_checkpoint(_tiny(True), tmp_path / "fusion_ckpt")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(brain), "--split", "all", "--limit", "1",
                 "--channels", "flair", "--json", str(out), "--device", "cpu", "--quiet"]) == 0
    assert [c for c, _, _ in calls] == [["flair"]]
    assert json.loads(out.read_text())["datasets"]["toy_brain"]["channels"] == ["flair"]
    calls.clear()
    assert main(["evaluate", "--model", str(ckpt), "--data", str(brain), "--split", "all", "--limit", "1",
                 "--device", "cpu", "--quiet"]) == 0
    assert [c for c, _, _ in calls] == [["flair", "t1ce"]]


def test_model_without_fusion_keeps_the_first_sequence_path(brain, calls):
    import nibabel as nib
    from emclip.errors import InvalidArgumentError

    model = _tiny(False)
    res = evaluate(model, [brain], split="all")
    assert set(res["datasets"]["toy_brain"]) == {"n_images", "structures"}
    assert [c for c, _, _ in calls] == [None] * 3 and calls[0][1] == (40, 48, 5)
    flair = np.asarray(nib.load(str(brain / "c0" / "c0_flair.nii.gz")).dataobj)
    np.testing.assert_array_equal(calls[0][2], flair)
    with pytest.raises(InvalidArgumentError, match="no modality fusion"):
        evaluate(model, [brain], split="all", channels=["flair", "t1ce"])
    calls.clear()
    t1ce = evaluate(model, [brain], split="all", channels=["t1ce"])  # one other sequence, grey
    assert t1ce["datasets"]["toy_brain"]["channels"] == ["t1ce"] and [c for c, _, _ in calls] == [["t1ce"]] * 3
