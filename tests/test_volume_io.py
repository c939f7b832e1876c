"""NIfTI volumes: reading, writing with the source affine, sequences, segment_volume, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import emclip
import nibabel as nib
import numpy as np
import pytest
from emclip.cli import main as cli_main
from emclip.errors import Cancelled, InvalidArgumentError, InvalidImageError
from emclip.volume_io import (
    Volume,
    read_sequences,
    read_volume,
    split_sequence_name,
    voxel_axis,
    write_volume,
)

LPS = np.array(
    [[-1.5, 0.0, 0.0, 40.0], [0.0, -1.5, 0.0, 60.0], [0.0, 0.0, 2.5, -20.0], [0.0, 0.0, 0.0, 1.0]]
)
# voxel axes (S, L, P): axis 0 runs superior, 1 towards the left, 2 posterior
PERMUTED = np.array(
    [[0.0, -1.0, 0.0, 5.0], [0.0, 0.0, -2.0, 7.0], [3.0, 0.0, 0.0, -9.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPE = (16, 20, 10)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS, slope: float | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))
    return path


def phantom(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 100).astype(np.int16)


# --------------------------------------------------------------------------- read / write


def test_read_volume_applies_slope_and_keeps_geometry(tmp_path):
    raw = phantom()
    path = save_nifti(tmp_path / "pat1_t1c.nii.gz", raw, slope=0.01)
    vol = read_volume(path)
    assert vol.data.dtype == np.float32 and vol.shape == SHAPE
    np.testing.assert_allclose(vol.data, raw * 0.01, atol=1e-4)
    np.testing.assert_allclose(vol.affine, LPS)
    assert vol.axcodes == ("L", "P", "S")
    assert vol.spacing == pytest.approx((1.5, 1.5, 2.5))
    assert (vol.name, vol.sequence) == ("pat1_t1c", "t1ce")


def test_unscaled_integer_volume_keeps_its_dtype(tmp_path):
    raw = phantom()
    vol = read_volume(save_nifti(tmp_path / "a.nii", raw))
    assert vol.data.dtype == np.int16 and np.array_equal(vol.data, raw)


def test_label_round_trip_keeps_affine_data_and_refuses_overwrite(tmp_path):
    vol = read_volume(save_nifti(tmp_path / "case_flair.nii.gz", phantom(), slope=0.5))
    labels = (vol.data > 0).astype(np.int64) * 3
    out = write_volume(tmp_path / "case_seg.nii.gz", labels, vol)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, LPS)
    assert np.array_equal(np.asarray(img.dataobj), labels)
    assert img.dataobj.slope == 1.0  # the source's intensity scaling is not copied
    assert int(img.header["sform_code"]) > 0
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_volume(out, labels * 0, vol)
    assert out.read_bytes() == before
    write_volume(out, labels * 0, vol, overwrite=True)
    assert not np.asarray(nib.load(str(out)).dataobj).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_flair.nii.gz", "case_seg.nii.gz"]


def test_write_volume_dtypes_and_refusals(tmp_path):
    vol = Volume(np.zeros(SHAPE, np.float32), LPS, (1.5, 1.5, 2.5), ("L", "P", "S"))
    big = np.zeros(SHAPE, np.int32)
    big[0, 0, 0] = 300
    assert nib.load(str(write_volume(tmp_path / "b.nii", big, vol))).get_data_dtype() == np.uint16
    with pytest.raises(InvalidArgumentError, match="shape"):
        write_volume(tmp_path / "c.nii.gz", np.zeros((2, 2, 2), np.uint8), vol)
    with pytest.raises(InvalidArgumentError, match="0..65535"):
        write_volume(tmp_path / "d.nii.gz", big - 1000, vol)
    with pytest.raises(InvalidArgumentError, match=".nii"):
        write_volume(tmp_path / "e.tif", big, vol)
    with pytest.raises(InvalidArgumentError, match="affine"):
        write_volume(tmp_path / "f.nii.gz", big)
    # affine alone (no source volume) is enough
    out = write_volume(tmp_path / "g.nii.gz", big > 0, affine=PERMUTED)
    np.testing.assert_allclose(nib.load(str(out)).affine, PERMUTED)


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    vol = Volume(np.zeros(SHAPE, np.float32), LPS, (1.5, 1.5, 2.5), ("L", "P", "S"))
    target = write_volume(tmp_path / "m.nii.gz", np.ones(SHAPE, np.uint8), vol)
    before = target.read_bytes()

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_volume(target, np.zeros(SHAPE, np.uint8), vol, overwrite=True)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]  # no temporary file left


def test_broken_and_foreign_files_raise_clear_errors(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", phantom())
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InvalidImageError, match="truncated"):
        read_volume(truncated)
    garbage = tmp_path / "junk.nii"
    garbage.write_bytes(b"not a nifti header at all" * 20)
    with pytest.raises(InvalidImageError, match="NIfTI"):
        read_volume(garbage)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        read_volume(empty)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(InvalidImageError, match="only NIfTI"):
        read_volume(png)
    with pytest.raises(FileNotFoundError):
        read_volume(tmp_path / "missing.nii.gz")
    four_d = save_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.int16))
    with pytest.raises(InvalidImageError, match="2 volumes"):
        read_volume(four_d)
    squeezed = read_volume(save_nifti(tmp_path / "4d1.nii.gz", np.zeros((4, 5, 6, 1), np.int16)))
    assert squeezed.shape == (4, 5, 6)


# --------------------------------------------------------------------------- axes, sequences


@pytest.mark.parametrize(
    "affine, expected",
    [
        (np.eye(4), {"sagittal": 0, "coronal": 1, "axial": 2}),  # RAS
        (LPS, {"sagittal": 0, "coronal": 1, "axial": 2}),
        (PERMUTED, {"axial": 0, "sagittal": 1, "coronal": 2}),
    ],
)
def test_axis_names_follow_the_orientation(affine, expected):
    for name, index in expected.items():
        assert voxel_axis(name, affine) == index
        assert voxel_axis(name.upper(), affine) == index
    assert voxel_axis(1, affine) == 1 and voxel_axis(-1, affine) == 2


def test_axis_errors():
    with pytest.raises(InvalidArgumentError, match="affine"):
        voxel_axis("axial", None)
    with pytest.raises(InvalidArgumentError, match="unknown axis"):
        voxel_axis("transverse", np.eye(4))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        voxel_axis(3, np.eye(4))


def test_sequence_names_from_file_names():
    assert split_sequence_name("pat_1_flair.nii.gz") == ("pat_1", "flair")
    assert split_sequence_name("Brats18_X_1_T1CE.nii") == ("Brats18_X_1", "t1ce")
    assert split_sequence_name("p-t1c.nii.gz") == ("p", "t1ce")
    assert split_sequence_name("case_t2.nii.gz") == ("case", "t2")
    assert split_sequence_name("BraTS-GLI-0001-000-t2f.nii.gz") == ("BraTS-GLI-0001-000", "flair")
    assert split_sequence_name("scan.nii.gz") == ("scan", None)


def test_read_sequences_from_folder_and_list(tmp_path):
    case = tmp_path / "pat7"
    case.mkdir()
    flair, t1ce = phantom(seed=1), phantom(seed=2)
    save_nifti(case / "pat7_t1c.nii.gz", t1ce)
    save_nifti(case / "pat7_flair.nii.gz", flair)
    save_nifti(case / "pat7_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    data, names, meta = read_sequences(case)
    assert sorted(names) == ["flair", "t1ce"] and data.shape == SHAPE + (2,)
    assert np.array_equal(data[..., names.index("flair")], flair)
    np.testing.assert_allclose(meta.affine, LPS)
    data, names, _ = read_sequences(case, channels=["T1c", "flair"])
    assert names == ["t1ce", "flair"] and np.array_equal(data[..., 0], t1ce)
    with pytest.raises(InvalidArgumentError, match="t2"):
        read_sequences(case, channels=["t2"])
    data, names, _ = read_sequences([case / "pat7_flair.nii.gz", case / "pat7_t1c.nii.gz"], channels=["a", "b"])
    assert names == ["a", "b"] and np.array_equal(data[..., 1], t1ce)


def test_mismatched_grids_are_refused(tmp_path):
    a = save_nifti(tmp_path / "p_flair.nii.gz", phantom())
    b = save_nifti(tmp_path / "p_t1.nii.gz", phantom((16, 20, 9)))
    with pytest.raises(InvalidImageError, match="shape"):
        read_sequences([a, b])
    shifted = LPS.copy()
    shifted[0, 3] += 3.0
    c = save_nifti(tmp_path / "p_t2.nii.gz", phantom(), shifted)
    with pytest.raises(InvalidImageError, match="affine"):
        read_sequences([a, c])
    with pytest.raises(InvalidArgumentError, match="differ"):
        read_sequences([a, a])


# --------------------------------------------------------------------------- segment_volume


@pytest.fixture()
def volume(tmp_path) -> Volume:
    return read_volume(save_nifti(tmp_path / "pat1_flair.nii.gz", phantom(), PERMUTED))


@pytest.mark.parametrize("axis, voxel", [("axial", 0), ("sagittal", 1), ("coronal", 2), (1, 1)])
def test_segment_volume_slices_along_the_named_axis(volume, tiny_model, axis, voxel):
    calls = []
    result = emclip.segment_volume(volume, "tumour, edema", tiny_model, axis=axis, progress=lambda d, t: calls.append((d, t)))
    assert result.masks.shape == (2,) + SHAPE and result.probabilities.shape == (2,) + SHAPE
    assert result.stack_axis == voxel
    assert calls[-1] == (SHAPE[voxel], SHAPE[voxel])  # progress counts slices of that axis
    assert result.info["voxel_axis"] == voxel
    np.testing.assert_allclose(result.info["affine"], PERMUTED)


def test_segment_volume_cancel(volume, tiny_model):
    seen = []

    def cancel() -> bool:
        seen.append(1)
        return len(seen) > 2

    progress = []
    with pytest.raises(Cancelled):
        emclip.segment_volume(volume, "tumour", tiny_model, axis="coronal", batch_size=2, cancel=cancel,
                              progress=lambda d, t: progress.append(d))
    assert max(progress, default=0) < SHAPE[2]  # stopped before the last slice


def test_segment_volume_from_path_and_arrays(volume, tiny_model):
    by_path = emclip.segment_volume(volume.path, "tumour", tiny_model)
    by_array = emclip.segment_volume(volume.data, "tumour", tiny_model, affine=volume.affine)
    assert by_path.stack_axis == by_array.stack_axis == 0
    np.testing.assert_allclose(by_path.probabilities, by_array.probabilities, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="affine"):
        emclip.segment_volume(volume.data, "tumour", tiny_model)  # a named axis needs the orientation


def test_segment_volume_several_sequences(tmp_path, tiny_model):
    from emclip.config import load_config
    from emclip.factory import create_model

    a = save_nifti(tmp_path / "p_flair.nii.gz", phantom(seed=3))
    b = save_nifti(tmp_path / "p_t1ce.nii.gz", phantom(seed=4))
    with pytest.raises(InvalidArgumentError, match="fusion"):
        emclip.segment_volume([a, b], "tumour", tiny_model)  # grey model: pick one sequence
    fusion = create_model(load_config("tiny", overrides={"fusion.enabled": True})).eval()
    result = emclip.segment_volume([a, b], "tumour", fusion, axis="axial")
    assert result.masks.shape == (1,) + SHAPE and result.stack_axis == 2
    assert result.info["channels"] == ["flair", "t1ce"]


# --------------------------------------------------------------------------- CLI


def test_cli_writes_nifti_masks_with_the_source_affine(tmp_path, capsys):
    src = save_nifti(tmp_path / "pat1_flair.nii.gz", phantom(), PERMUTED)
    out = tmp_path / "out"
    args = ["segment", str(src), "-p", "whole tumour, edema", "-o", str(out), "--model", "tiny", "--axis", "sagittal", "-q"]
    assert cli_main.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pat1_edema.nii.gz", "pat1_emclip.json", "pat1_whole_tumour.nii.gz"]
    img = nib.load(str(out / "pat1_whole_tumour.nii.gz"))
    np.testing.assert_allclose(img.affine, PERMUTED)
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    summary = json.loads((out / "pat1_emclip.json").read_text())
    assert [x["prompt"] for x in summary["labels"]] == ["whole tumour", "edema"]
    assert summary["voxel_axis"] == 1 and summary["sequences"] == ["flair"]
    assert cli_main.main(args) == 2  # outputs exist, no --overwrite
    assert "already exist" in capsys.readouterr().err
    assert cli_main.main(args + ["--overwrite"]) == 0


def test_cli_case_of_several_sequences(tmp_path, capsys):
    from emclip.checkpoint import save_checkpoint
    from emclip.config import load_config
    from emclip.factory import create_model

    case = tmp_path / "pat9"
    case.mkdir()
    save_nifti(case / "pat9_flair.nii.gz", phantom(seed=5), LPS)
    save_nifti(case / "pat9_t1ce.nii.gz", phantom(seed=6), LPS)
    save_nifti(case / "pat9_seg.nii.gz", np.zeros(SHAPE, np.uint8), LPS)
    out = tmp_path / "out"
    # a grey model cannot take two sequences: one error line, nothing written
    assert cli_main.main(["segment", str(case), "-p", "edema", "-o", str(out), "--model", "tiny", "-q"]) == 2
    assert "pick one" in capsys.readouterr().err and not list(out.glob("*.nii.gz"))
    model_dir = save_checkpoint(create_model(load_config("tiny", overrides={"fusion.enabled": True})), tmp_path / "fusion")
    files = [str(case / "pat9_flair.nii.gz"), str(case / "pat9_t1ce.nii.gz")]
    assert cli_main.main(["segment", *files, "-p", "edema", "-o", str(out), "--model", str(model_dir), "-q"]) == 0
    summary = json.loads((out / "pat9_emclip.json").read_text())
    assert summary["sequences"] == ["flair", "t1ce"] and summary["voxel_axis"] == 2
    np.testing.assert_allclose(nib.load(str(out / "pat9_edema.nii.gz")).affine, LPS)
    # the same sequence twice would write the same outputs
    twice = [files[0], str(tmp_path / "pat9_flair.nii.gz")]
    save_nifti(Path(twice[1]), phantom(), LPS)
    assert cli_main.main(["segment", *twice, "-p", "edema", "-o", str(tmp_path / "o2"), "--model", "tiny"]) == 2
    assert "same sequence" in capsys.readouterr().err


def test_cli_refuses_mixed_inputs_and_named_axis_for_tiffs(tmp_path, capsys):
    import tifffile

    src = save_nifti(tmp_path / "a_flair.nii.gz", phantom())
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, np.zeros((4, 32, 32), np.uint8))
    out = str(tmp_path / "out")
    assert cli_main.main(["segment", str(src), str(tif), "-p", "x", "-o", out, "--model", "tiny"]) == 2
    assert "cannot be mixed" in capsys.readouterr().err
    assert cli_main.main(["segment", str(tif), "-p", "x", "-o", out, "--model", "tiny", "--axis", "axial"]) == 2
    assert "NIfTI" in capsys.readouterr().err
    assert cli_main.main(["segment", str(src), "-p", "x", "-o", out, "--axis", "oblique"]) == 2
    assert not (tmp_path / "out").exists()


def test_cli_ctrl_c_leaves_no_partial_output(tmp_path, monkeypatch):
    from emclip.cli import common

    src = save_nifti(tmp_path / "pat1_flair.nii.gz", phantom())
    out = tmp_path / "out"

    import contextlib

    @contextlib.contextmanager
    def cancelled_at_once(*a, **k):
        yield lambda: True

    monkeypatch.setattr(common, "sigint_cancels", cancelled_at_once)
    rc = cli_main.main(["segment", str(src), "-p", "tumour", "-o", str(out), "--model", "tiny", "-q"])
    assert rc == 130
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- real data


def test_real_brain_case_reads_as_one_grid(shared_data, tmp_path):
    case = next(iter(sorted((shared_data / "brain" / "brats2015_deepmedic").glob("brats_*"))), None)
    if case is None:
        pytest.skip("no brain case in the shared data")
    data, names, meta = read_sequences(case)
    assert sorted(names) == ["flair", "t1ce"] and data.shape == meta.shape + (2,)
    seg = read_volume(case / f"{case.name}_seg.nii.gz")
    assert seg.shape == meta.shape and np.allclose(seg.affine, meta.affine)
    assert set(np.unique(seg.data)) <= {0, 1, 2, 3, 4}
    out = write_volume(tmp_path / "wt.nii.gz", seg.data > 0, meta)
    back = read_volume(out)
    assert np.array_equal(back.data, seg.data > 0) and np.allclose(back.affine, meta.affine)
    assert voxel_axis("axial", meta.affine) == 2  # LPS grid
