"""Prompt-free mode: known structures, the modality head, segment(image) without prompts, CLI --auto."""

from __future__ import annotations

import json
import warnings

import emclip
import numpy as np
import pytest
import torch
from emclip.checkpoint import load_checkpoint, save_checkpoint
from emclip.config import ModelConfig, load_config
from emclip.errors import CheckpointError, InvalidArgumentError
from emclip.factory import create_model
from emclip.modality import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    ModalityHead,
    attach_modality_head,
    fit_modality_head,
    image_features,
    load_modality_head,
    merge_known_structures,
    network_input,
    recognise_modality,
    save_modality_head,
    structures_for,
)

MODALITIES = ["fundus", "cardiac_mri", "brain_mri"]
KNOWN = {
    "fundus": ["optic disc", "optic cup", "neuroretinal rim"],
    "cardiac_mri": ["left ventricle", "myocardium", "right ventricle"],
}


def _tiny(known=KNOWN) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(load_config("tiny", {"known_structures": known})).eval()
    return model


def _biased_head(model, favourite: str, margin: float = 6.0) -> ModalityHead:
    """A head that ignores the image and answers ``favourite`` (confidence ~0.995)."""
    c = int(image_features(model, torch.zeros(1, 3, model.image_size, model.image_size)).shape[1])
    bias = torch.tensor([margin if m == favourite else 0.0 for m in MODALITIES])
    return ModalityHead(MODALITIES, torch.zeros(3, c), bias, torch.zeros(c), torch.ones(c))


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (48, 56, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ known structures


def test_known_structures_merge_canonical_keys_and_dedupe():
    merged = merge_known_structures(
        {"fundus": ["optic disc"]},
        [("colour fundus photograph", ["Optic Disc", "optic cup"]), ("cardiac cine MRI (bSSFP)", ["left ventricle"]),
         ("cardiac late gadolinium enhancement MRI", ["myocardium"]), (None, ["ignored"]), ("X-ray", ["lung"])],
    )
    assert merged == {"fundus": ["optic disc", "optic cup"], "cardiac_mri": ["left ventricle", "myocardium"],
                      "x-ray": ["lung"]}


def test_known_structures_round_trip_through_save_and_load(tmp_path):
    model = _tiny()
    assert ModelConfig.from_dict(model.config.to_dict()).known_structures == KNOWN
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["known_structures"] == KNOWN
    loaded = load_checkpoint(folder)
    assert loaded.config.known_structures == KNOWN
    assert structures_for(loaded, "cardiac MRI") == KNOWN["cardiac_mri"]
    assert structures_for(loaded, "retina") == KNOWN["fundus"]
    assert structures_for(loaded, "brain MRI") == []


def _toy_dataset(root, modality: str, structures: str, rgb: bool) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.yaml").write_text(f"modality: {modality}\nstructures:\n{structures}")
    for i in range(6):
        lab = np.zeros((32, 32), np.uint8)
        lab[8:20, 8:20], lab[11:17, 11:17] = 1, 2
        img = (rng.normal(60, 10, (32, 32)) + 80 * (lab > 0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(np.stack([img] * 3, -1) if rgb else img).save(root / "images" / f"im{i}.png")
        Image.fromarray(lab).save(root / "masks" / f"im{i}.png")


def test_trainer_records_known_structures_from_dataset_yaml(tmp_path):
    from emclip.train.trainer import train

    _toy_dataset(tmp_path / "eye", "colour fundus photograph", "  optic disc: [1, 2]\n  optic cup: [2]\n", True)
    _toy_dataset(tmp_path / "heart", "cardiac cine MRI (bSSFP)", "  left ventricle: [2]\n  myocardium: [1]\n", False)
    cfg = {"model": "tiny", "data_root": str(tmp_path), "out_dir": str(tmp_path / "run"),
           "train": [{"path": "eye", "split": "all"}, {"path": "heart", "split": "all"}], "val": [],
           "batch_size": 2, "epochs": 1, "steps_per_epoch": 1, "evaluate_at_end": False}
    result = train(cfg)
    saved = load_checkpoint(result.last_checkpoint)
    assert saved.config.known_structures == {"fundus": ["optic disc", "optic cup"],
                                             "cardiac_mri": ["left ventricle", "myocardium"]}


def test_bad_known_structures_are_refused():
    with pytest.raises(ValueError, match="known_structures"):
        load_config("tiny", {"known_structures": {"fundus": "optic disc"}})


# ------------------------------------------------------------------------------ the head


def test_fit_head_separates_classes_and_rejects_unsure():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16)) * 4
    x = torch.tensor(np.concatenate([c + rng.normal(0, 1, (30, 16)) for c in centres]), dtype=torch.float32)
    y = [0] * 30 + [1] * 30 + [2] * 30
    head = fit_modality_head(x, y, MODALITIES)
    assert (head.probabilities(x).argmax(1) == torch.tensor(y)).float().mean() > 0.95
    assert torch.allclose(head.probabilities(x).sum(1), torch.ones(90))
    with pytest.raises(InvalidArgumentError, match="training samples"):
        fit_modality_head(x[:60], y[:60], MODALITIES)  # no brain sample
    with pytest.raises(InvalidArgumentError, match="another image encoder"):
        head.probabilities(torch.zeros(2, 5))


def test_head_save_load_with_checkpoint_keeps_segmentation_weights(tmp_path):
    model = _tiny()
    keys = set(model.state_dict())
    head = _biased_head(model, "cardiac_mri")
    attach_modality_head(model, head)
    assert set(model.state_dict()) == keys  # not a submodule: segmentation weights unchanged
    folder = save_checkpoint(model, tmp_path / "ckpt")
    sums = json.loads((folder / "checksums.json").read_text())["files"]
    assert HEAD_WEIGHTS in sums and HEAD_CONFIG in sums
    from safetensors.torch import load_file

    assert not any("modality" in k for k in load_file(str(folder / "model.safetensors")))
    loaded = load_checkpoint(folder)
    assert loaded.modality_head.modalities == MODALITIES
    assert torch.equal(loaded.modality_head.bias, head.bias)
    assert recognise_modality(np.zeros((40, 40), np.uint8), loaded).modality == "cardiac_mri"
    # a head without the checkpoint's own model: save_modality_head adds it and its checksums
    plain = save_checkpoint(_tiny(), tmp_path / "plain")
    assert load_checkpoint(plain).__dict__.get("modality_head") is None
    save_modality_head(_biased_head(model, "brain_mri"), plain)
    again = load_checkpoint(plain)
    assert again.modality_head.modalities[int(again.modality_head.bias.argmax())] == "brain_mri"
    data = bytearray((plain / HEAD_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (plain / HEAD_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(plain)
    (plain / HEAD_CONFIG).unlink()
    with pytest.raises(CheckpointError, match="only one of"):
        load_modality_head(plain)


def test_network_input_matches_segment_preprocessing(tiny_model, image):
    x = network_input(tiny_model, image)
    assert x.shape == (1, 3, tiny_model.image_size, tiny_model.image_size)
    # letterbox padding is 0 before standardisation: the bottom rows equal -mean/std
    mean, std = torch.tensor(tiny_model.pixel_mean), torch.tensor(tiny_model.pixel_std)
    assert torch.allclose(x[0, :, -1, 0], -mean / std, atol=1e-5)


# ------------------------------------------------------------------------------ segment(image)


def test_prompt_free_recognised_modality_and_only_found_structures(image):
    model = _tiny()
    attach_modality_head(model, _biased_head(model, "fundus"))
    everything = emclip.segment(image, None, model, threshold=1e-6, min_area=0)
    assert everything.prompts == KNOWN["fundus"] and everything.found.all()
    info = everything.info
    assert info["modality"] == "fundus" and info["modality_source"] == "recognised"
    assert info["modality_confidence"] > 0.99 and set(info["modality_probabilities"]) == set(MODALITIES)
    assert info["structures_tried"] == KNOWN["fundus"] and info["structures_not_found"] == []
    nothing = emclip.segment(image, None, model, threshold=1 - 1e-7)
    assert nothing.prompts == [] and nothing.masks.shape == (0, 48, 56)
    assert nothing.cluster_similarity.shape[1] == 0
    assert nothing.info["structures_not_found"] == KNOWN["fundus"]
    # the kept prompts keep their own arrays: the same as prompting them with the modality
    prompted = emclip.segment(image, KNOWN["fundus"], model, modality="fundus", threshold=1e-6, min_area=0)
    assert np.array_equal(prompted.probabilities, everything.probabilities)


def test_given_modality_overrides_recognition(image):
    model = _tiny()
    attach_modality_head(model, _biased_head(model, "fundus"))
    result = emclip.segment(image, None, model, modality="cardiac MRI", threshold=1e-6, min_area=0)
    assert result.info["modality"] == "cardiac_mri" and result.info["modality_source"] == "given"
    assert result.prompts == KNOWN["cardiac_mri"] and result.info["modality_confidence"] is None


def test_refusals_say_what_to_do(image):
    model = _tiny()
    with pytest.raises(InvalidArgumentError, match="modality="):  # no head, no modality
        emclip.segment(image, None, model)
    attach_modality_head(model, _biased_head(model, "brain_mri"))
    with pytest.raises(InvalidArgumentError, match="knows no structures for brain MRI"):
        emclip.segment(image, None, model)
    with pytest.raises(InvalidArgumentError, match="knows no structures for brain MRI"):
        emclip.segment(image, None, model, modality="brain MRI")
    attach_modality_head(model, _biased_head(model, "fundus", margin=0.0))  # 1/3 each
    with pytest.raises(InvalidArgumentError, match="could not be recognised"):
        emclip.segment(image, None, model)
    empty = _tiny(known={})
    with pytest.raises(InvalidArgumentError, match="known structures"):
        emclip.segment(image, None, empty, modality="fundus")
    with pytest.raises(InvalidArgumentError, match="threshold"):  # options checked first
        emclip.segment(image, None, model, threshold=2.0)


def test_segment_stack_prompt_free():
    model = _tiny()
    attach_modality_head(model, _biased_head(model, "cardiac_mri"))
    volume = np.random.default_rng(1).integers(0, 4000, (7, 40, 48), dtype=np.uint16)
    volume[0] = 0  # a constant slice is never used for recognition
    result = emclip.segment_stack(volume, None, model, threshold=1e-6, min_area=0)
    assert result.prompts == KNOWN["cardiac_mri"] and result.masks.shape == (3, 7, 40, 48)
    assert result.slice_found.shape == (7, 3)
    assert result.info["modality"] == "cardiac_mri" and result.info["recognition_slices"]
    assert 0 not in result.info["recognition_slices"]
    moved = emclip.segment_stack(np.moveaxis(volume, 0, 2), None, model, axis=2, threshold=1 - 1e-7)
    assert moved.prompts == [] and moved.slice_found.shape == (7, 0)


# ------------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def default_model():
    model = emclip.load_model(None, "cpu")
    if getattr(model, "modality_head", None) is None:
        pytest.fail("the bundled model has no modality head (modality_head.safetensors)")
    return model


def test_default_model_prompt_free_on_the_retina_sample(default_model):
    from emclip import samples

    result = emclip.segment(samples.fundus_image(), model=default_model)  # prompts default to None
    assert result.info["modality"] == "fundus" and result.info["modality_source"] == "recognised"
    assert result.info["modality_confidence"] >= default_model.modality_head.min_confidence
    assert result.prompts and set(result.prompts) <= set(default_model.config.known_structures["fundus"])
    assert result.found.all() and "optic disc" in result.prompts


# ------------------------------------------------------------------------------ CLI


def test_cli_auto(tmp_path, image, capsys):
    from emclip.cli import main as cli_main
    from emclip.io import read_mask_tiff
    from PIL import Image

    model = _tiny()
    attach_modality_head(model, _biased_head(model, "fundus"))
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    Image.fromarray(image).save(tmp_path / "eye.png")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main.main(["segment", str(tmp_path / "eye.png"), "--auto", "-o", str(out), "--model", str(ckpt),
                            "--threshold", "1e-6", "--min-area", "0", "--device", "cpu"])
    assert rc == 0
    masks = read_mask_tiff(out / "eye_masks.tif")
    assert masks.prompts == KNOWN["fundus"] and masks.metadata["modality"] == "fundus"
    assert "modality fundus (recognised" in capsys.readouterr().out
    rc = cli_main.main(["segment", str(tmp_path / "eye.png"), "-o", str(tmp_path / "none"), "--model", str(ckpt),
                        "--threshold", "0.9999999", "--device", "cpu"])  # prompts omitted = auto
    assert rc == 0 and not (tmp_path / "none" / "eye_masks.tif").exists()
    assert "nothing written" in capsys.readouterr().out
    rc = cli_main.main(["segment", str(tmp_path / "eye.png"), "--auto", "-p", "optic cup", "-o", str(out),
                        "--model", str(ckpt)])
    assert rc == 2 and "either --auto or --prompts" in capsys.readouterr().err
