"""Fine-tune on corrections (issue 8): the training-set folder writer, finetune() and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from emclip.data.folder import FolderDataset
from emclip.data.format import read_spec
from emclip.data.user_dataset import (
    TrainingSetConflictError,
    add_to_training_set,
    encode_label_map,
    training_set_size,
)
from emclip.errors import Cancelled, CheckpointError, DatasetError, InvalidImageError


def disc_cup(h: int = 40, w: int = 56) -> dict[str, np.ndarray]:
    disc = np.zeros((h, w), bool)
    disc[5:30, 10:40] = True
    cup = np.zeros((h, w), bool)
    cup[10:20, 15:25] = True
    return {"optic disc": disc, "optic cup": cup}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files/folders left anywhere below ``folder``."""
    return [str(p) for p in folder.rglob(".*")]


# ----------------------------------------------------------------------------- training-set folder


def test_nested_structures_use_union_values_like_the_shared_data(tmp_path):
    masks = disc_cup()
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    path = add_to_training_set(tmp_path / "ts", img, masks, modality="colour fundus photograph", name="eye one")
    assert path == tmp_path / "ts" / "images" / "eye_one.png"
    spec = read_spec(tmp_path / "ts")
    # disc only -> 1, disc and cup -> 2 (no value for "cup alone": it never occurs)
    assert spec.structures == {"optic disc": (1, 2), "optic cup": (2,)}
    assert spec.modality == "colour fundus photograph"
    sample = FolderDataset(tmp_path / "ts")[0]
    assert np.array_equal(sample.image, img)
    assert set(np.unique(sample.labels)) == {0, 1, 2}
    decoded = sample.structure_masks()
    assert np.array_equal(decoded[0], masks["optic disc"]) and np.array_equal(decoded[1], masks["optic cup"])
    assert leftovers(tmp_path / "ts") == []


def test_partial_overlaps_and_many_structures_round_trip():
    rng = np.random.default_rng(1)
    masks = {f"s{k}": rng.random((30, 31)) > 0.5 for k in range(5)}  # every overlap pattern
    label_map, table = encode_label_map(masks)
    assert label_map.dtype == np.uint8 and len(np.unique(label_map)) > 8
    for name, mask in masks.items():
        assert np.array_equal(np.isin(label_map, table[name]), mask)
    # existing values are reused; only new combinations get new values
    again, table2 = encode_label_map(masks, table)
    assert np.array_equal(again, label_map) and table2 == table


@pytest.mark.parametrize(
    ("image", "suffix"),
    [
        (np.arange(37 * 53, dtype=np.uint16).reshape(37, 53) * 31, ".tif"),  # 16-bit grey, odd size
        ((np.arange(37 * 53 * 3) % 256).astype(np.uint8).reshape(37, 53, 3), ".png"),  # 8-bit RGB
        ((np.arange(37 * 53 * 4) % 256).astype(np.uint8).reshape(37, 53, 4), ".png"),  # RGBA
        (np.linspace(-3, 7, 37 * 53, dtype=np.float32).reshape(37, 53), ".tif"),  # float
        ((np.arange(37 * 53 * 3) * 97 % 65536).astype(np.uint16).reshape(37, 53, 3), ".tif"),  # 16-bit RGB
        ((np.arange(37 * 53) % 256).astype(np.uint8).reshape(37, 53, 1), ".png"),  # grey with a channel axis
    ],
)
def test_images_are_stored_losslessly_in_any_dtype(tmp_path, image, suffix):
    mask = np.zeros((37, 53), np.uint8)
    mask[3:9, 4:20] = 7  # any non-zero value means inside
    path = add_to_training_set(tmp_path / "ts", image, {"left ventricle": mask}, modality="cardiac MRI")
    assert path.suffix == suffix
    sample = FolderDataset(tmp_path / "ts")[0]
    assert sample.image.dtype == image.dtype
    assert np.array_equal(sample.image, image.squeeze(-1) if image.shape[-1] == 1 else image)
    assert np.array_equal(sample.structure_masks()[0], mask != 0)


def test_unique_names_groups_and_meta(tmp_path):
    img = np.zeros((20, 20), np.uint8)
    m = {"myocardium": np.eye(20, dtype=bool)}
    a = add_to_training_set(tmp_path / "ts", img, m, modality="cardiac MRI", name="slice", group="patient7")
    b = add_to_training_set(tmp_path / "ts", img, m, modality="cardiac MRI", name="slice", group="patient7")
    c = add_to_training_set(tmp_path / "ts", img, m, modality="cardiac MRI")
    assert len({a.stem, b.stem, c.stem}) == 3 and a.stem == "slice"
    ds = FolderDataset(tmp_path / "ts")
    assert len(ds) == 3 == training_set_size(tmp_path / "ts")
    groups = {ds.ids[i]: ds.group_of(i) for i in range(len(ds))}
    assert groups[a.stem] == groups[b.stem] == "patient7" and groups[c.stem] == c.stem


def test_refuses_mismatches_with_clear_errors(tmp_path):
    img = np.zeros((40, 56), np.uint8)
    folder = tmp_path / "ts"
    with pytest.raises(TrainingSetConflictError, match="40x56") as info:
        add_to_training_set(folder, img, {"optic disc": np.zeros((40, 55), bool)}, modality="fundus")
    assert isinstance(info.value, ValueError)
    assert not folder.exists() or training_set_size(folder) == 0
    with pytest.raises(InvalidImageError, match="2D image"):
        add_to_training_set(folder, np.zeros((4, 40, 56), np.uint8), disc_cup(), modality="fundus")
    with pytest.raises(DatasetError, match="two masks"):
        add_to_training_set(folder, img, {"optic cup": img, "Optic  cup": img}, modality="fundus")
    with pytest.raises(DatasetError, match="modality"):
        add_to_training_set(folder, img, disc_cup(), modality="  ")
    add_to_training_set(folder, img, disc_cup(), modality="colour fundus photograph")
    with pytest.raises(TrainingSetConflictError, match="cardiac MRI"):
        add_to_training_set(folder, img, disc_cup(), modality="cardiac MRI")
    with pytest.raises(TrainingSetConflictError, match="merge_structures"):
        add_to_training_set(folder, img, {"neuroretinal rim": img > 0}, modality="fundus photograph",
                            merge_structures=False)
    assert training_set_size(folder) == 1
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="non-empty"):
        add_to_training_set(other, img, disc_cup(), modality="fundus")


def test_new_structures_merge_and_earlier_images_count_them_absent(tmp_path):
    folder = tmp_path / "ts"
    img = np.zeros((40, 56), np.uint8)
    add_to_training_set(folder, img, disc_cup(), modality="colour fundus photograph")
    rim = disc_cup()["optic disc"] & ~disc_cup()["optic cup"]
    # same names in another case are the same structures; a new one is merged in
    add_to_training_set(folder, img, {"Optic Disc": disc_cup()["optic disc"], "neuroretinal rim": rim},
                        modality="fundus photograph")
    spec = read_spec(folder)
    assert list(spec.structures) == ["optic disc", "optic cup", "neuroretinal rim"]
    ds = FolderDataset(folder)
    first, second = ds[0].structure_masks(), ds[1].structure_masks()
    assert not first[2].any()  # the earlier image has no rim annotation: absent
    assert np.array_equal(second[0], disc_cup()["optic disc"]) and np.array_equal(second[2], rim)
    assert not second[1].any()  # the cup was not given for the second image: absent


# ----------------------------------------------------------------------------- finetune()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny EM-CLIP with prompt centring on and a known centre vector."""
    from emclip.checkpoint import save_checkpoint
    from emclip.config import load_config
    from emclip.factory import create_model

    torch.manual_seed(0)
    model = create_model(load_config("tiny", {"decoder.text_centering": True}))
    model.decoder.text_center.copy_(torch.linspace(-0.2, 0.2, model.decoder.text_center.numel()))
    return save_checkpoint(model, tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture()
def small_set(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "ts"
    for k in range(3):
        img = (rng.random((40, 56)) * 255).astype(np.uint8)
        add_to_training_set(folder, img, disc_cup(), modality="colour fundus photograph", group=f"p{k}")
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_finetune_writes_a_complete_checkpoint_and_keeps_the_prompt_centre(small_set, tiny_checkpoint, tmp_path):
    from emclip.checkpoint import load_checkpoint
    from emclip.train.finetune import finetune

    before = weights(tiny_checkpoint)
    calls = []
    out = finetune(small_set, tiny_checkpoint, tmp_path / "out", epochs=1, steps=3, batch_size=2,
                   progress=lambda d, t: calls.append((d, t)))
    assert out == tmp_path / "out"
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)
    assert {"config.json", "model.safetensors", "checksums.json", "finetune.json"} <= {p.name for p in out.iterdir()}
    model = load_checkpoint(out)  # checksums verified
    after = weights(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("decoder.") for k in changed)
    assert torch.equal(after["decoder.text_center"], before["decoder.text_center"])  # not re-centred
    assert not any(k.startswith("text_encoder.") for k in changed)  # frozen text tower
    assert torch.equal(weights(tiny_checkpoint)["decoder.text_center"], before["decoder.text_center"])
    record = json.loads((out / "finetune.json").read_text())
    assert record["n_images"] == 3 and record["n_val"] == 0 and record["selected"] == "final weights"
    assert model.config.name == "tiny"
    assert leftovers(tmp_path) == []  # work folders removed


def test_finetune_selects_on_a_held_out_group_when_there_are_enough_images(tmp_path, tiny_checkpoint):
    from emclip.train.finetune import MIN_IMAGES_FOR_HOLDOUT, finetune, plan_finetune

    rng = np.random.default_rng(1)
    folder = tmp_path / "ts"
    for k in range(MIN_IMAGES_FOR_HOLDOUT):
        img = (rng.random((40, 56)) * 255).astype(np.uint8)
        add_to_training_set(folder, img, disc_cup(), modality="fundus photograph", group=f"p{k // 2}")
    plan = plan_finetune(folder, epochs=2, steps=2, batch_size=2)
    assert plan.n_val == 2 and plan.n_train == MIN_IMAGES_FOR_HOLDOUT - 2  # one patient (2 images) held out
    assert plan_finetune(folder, epochs=2, steps=2, batch_size=2, holdout=False).n_val == 0
    out = finetune(folder, tiny_checkpoint, tmp_path / "out", epochs=2, steps=2, batch_size=2)
    record = json.loads((out / "finetune.json").read_text())
    assert record["selected"] == "best held-out Dice" and record["n_val"] == 2
    assert record["best_val_dice"] is not None


def test_finetune_cancel_and_bad_inputs_leave_nothing(small_set, tiny_checkpoint, tmp_path):
    from emclip.train.finetune import finetune

    seen = []

    def cancel() -> bool:
        return len(seen) >= 1

    with pytest.raises(Cancelled):
        finetune(small_set, tiny_checkpoint, tmp_path / "out", epochs=1, steps=50, batch_size=2,
                 progress=lambda d, t: seen.append(d) if d else None, cancel=cancel)
    assert seen == [1]  # stopped after the first step
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="non-empty"):
        finetune(small_set, tiny_checkpoint, busy)
    assert (busy / "x.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        finetune(small_set, small_set, tmp_path / "out2")
    with pytest.raises(DatasetError):
        finetune(tmp_path / "missing", tiny_checkpoint, tmp_path / "out3")


def test_cli_finetune_prints_progress_lines_and_replaces_its_own_checkpoint(small_set, tiny_checkpoint, tmp_path,
                                                                           capsys):
    from emclip.cli.main import main

    out = tmp_path / "ckpt"
    args = ["finetune", str(small_set), "--from", str(tiny_checkpoint), "--out", str(out), "--epochs", "1",
            "--steps", "2", "--batch-size", "2", "--progress", "lines"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["progress 0 2", "progress 1 2", "progress 2 2"]
    assert lines[-1] == f"checkpoint {out}"
    first = (out / "checksums.json").read_text()
    assert main(args + ["--seed", "1"]) == 0  # an existing checkpoint folder is replaced
    assert (out / "checksums.json").read_text() != first
    assert main(["finetune", str(small_set), "--from", str(small_set), "--out", str(tmp_path / "o")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_work_folders_of_killed_runs_are_removed_by_the_next_run(small_set, tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    from emclip.train.finetune import finetune

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = tmp_path / f".old.finetune-{dead}-abc123"  # a SIGKILLed run's leftovers
    (stale / "run").mkdir(parents=True)
    mine = tmp_path / ".other.finetune-notapid-x"  # not ours to judge: kept
    mine.mkdir()
    finetune(small_set, tiny_checkpoint, tmp_path / "new", epochs=1, steps=1, batch_size=2)
    assert not stale.exists() and mine.exists()
