"""Sample data and the Labels → mask TIFF writer (no Qt needed)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from emclip.io import read_mask_tiff

from napari_emclip import _samples
from napari_emclip._writer import label_masks, write_labels


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the sample tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_fundus_sample_is_read_from_the_installed_skimage_folder(no_network):
    import skimage.data

    path = _samples.retina_path()
    assert path.parent == Path(skimage.data.__file__).parent  # shipped in the wheel, not the cache
    [(data, kwargs, kind)] = _samples.fundus_sample()
    assert kind == "image" and kwargs["rgb"] is True
    assert data.shape == (1411, 1411, 3) and data.dtype == np.uint8
    assert "CC0" in kwargs["metadata"]["source"]
    # same pixels as scikit-image's own loader (which finds the file locally, no fetch)
    np.testing.assert_array_equal(data, skimage.data.retina())


def test_cardiac_phantom_is_a_labelled_16bit_stack():
    (image, ikw, ikind), (labels, lkw, lkind) = _samples.cardiac_sample()
    assert ikind == "image" and lkind == "labels"
    assert image.dtype == np.uint16 and image.shape == labels.shape and image.ndim == 3
    assert ikw["scale"] == lkw["scale"] and ikw["metadata"]["synthetic"] is True
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # apex slice has no right ventricle, base does; the blood pool is brighter than the wall
    assert (labels[0] == 3).any() and not (labels[-1] == 3).any()
    assert image[labels == 1].mean() > 2 * image[labels == 2].mean()
    again, _ = _samples.cardiac_phantom()
    np.testing.assert_array_equal(again, image)  # deterministic


def test_writer_round_trips_masks_and_prompt_names(tmp_path):
    data = np.zeros((20, 30), np.uint8)
    data[2:8, 3:9] = 1
    data[10:15, 10:25] = 2
    attrs = {
        "name": "EM-CLIP labels",
        "features": {"index": [1, 2, 3], "name": ["optic disc", "optic cup", "vessel"]},
        "scale": (0.5, 0.5),
        "metadata": {
            "emclip": {"prompts": ["optic disc", "optic cup", "vessel"], "fingerprint": "x"}
        },
    }
    [written] = write_labels(str(tmp_path / "out.tif"), data, attrs)
    back = read_mask_tiff(written)
    assert back.prompts == ["optic disc", "optic cup", "vessel"]
    np.testing.assert_array_equal(back.masks[0], data == 1)
    np.testing.assert_array_equal(back.masks[1], data == 2)
    assert not back.masks[2].any()  # named but empty: kept so names stay aligned with ids
    assert back.metadata["label_ids"] == [1, 2, 3]
    assert "fingerprint" not in back.metadata["run"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out.tif"]
    assert leftovers == []  # written through a temporary file, nothing left behind


def test_writer_names_unlisted_labels_and_single_layers(tmp_path):
    data = np.zeros((2, 6, 6), np.uint16)
    data[0, 1:3, 1:3] = 4
    masks, names, ids = label_masks(data, {"name": "optic cup"})
    assert names == ["optic cup"] and ids == [4] and masks.shape == (1, 2, 6, 6)
    data[1, 4, 4] = 9  # painted by hand, not in the features
    masks, names, ids = label_masks(
        data, {"name": "x", "features": {"index": [4], "name": ["optic cup"]}}
    )
    assert names == ["optic cup", "label 9"] and ids == [4, 9]
    [written] = write_labels(str(tmp_path / "stack"), data, {"name": "x"})
    assert written.endswith("stack.tif")
    back = read_mask_tiff(written)
    assert back.masks.shape == (2, 2, 6, 6) and back.prompts == ["label 4", "label 9"]


def test_writer_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "keep.tif"
    data = np.ones((4, 4), np.uint8)
    write_labels(str(target), data, {"name": "optic disc"})
    before = target.read_bytes()

    import tifffile

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError):
        write_labels(str(target), data * 0, {"name": "optic disc"})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tif"]


def test_writer_refuses_4d_labels(tmp_path):
    with pytest.raises(ValueError, match="2D or 3D"):
        write_labels(str(tmp_path / "x.tif"), np.zeros((2, 2, 2, 2), np.uint8), {"name": "x"})


def _saved_masks(path):
    return read_mask_tiff(path).masks


def test_writing_twice_keeps_the_previous_file_as_a_backup(tmp_path, monkeypatch):
    from napari_emclip import _writer

    told = []
    monkeypatch.setattr(_writer, "notify", told.append)
    target = tmp_path / "cup.tif"
    first = np.zeros((6, 6), np.uint8)
    first[1:3, 1:3] = 1
    second = np.zeros((6, 6), np.uint8)
    second[3:5, 3:5] = 1
    write_labels(str(target), first, {"name": "optic cup"})
    assert told == []  # nothing existed: nothing to keep, nothing said
    write_labels(str(target), second, {"name": "optic cup"})
    backup = tmp_path / "cup.previous.tif"
    np.testing.assert_array_equal(_saved_masks(target)[0], second)
    np.testing.assert_array_equal(_saved_masks(backup)[0], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cup.previous.tif", "cup.tif"]
    assert len(told) == 1 and "cup.previous.tif" in told[0]
    # a third save keeps the second version (the backup is the version before the last save)
    write_labels(str(target), first, {"name": "optic cup"})
    np.testing.assert_array_equal(_saved_masks(backup)[0], second)
    np.testing.assert_array_equal(_saved_masks(target)[0], first)


@pytest.mark.parametrize("fail_at", ["backup", "final rename"])
def test_a_crash_while_replacing_leaves_the_old_file_intact(tmp_path, monkeypatch, fail_at):
    import os

    target = tmp_path / "disc.tif"
    old = np.ones((4, 4), np.uint8)
    write_labels(str(target), old, {"name": "optic disc"})
    before = target.read_bytes()
    real_replace = os.replace

    def crashing_replace(src, dst):
        name = os.path.basename(os.fspath(dst))
        if (fail_at == "backup" and name == "disc.previous.tif") or (
            fail_at == "final rename" and name == "disc.tif"
        ):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        write_labels(str(target), old * 0, {"name": "optic disc"})
    assert target.read_bytes() == before  # the old file is intact...
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(not n.startswith(".") for n in names)  # ...and no temporary file is left behind
    if "disc.previous.tif" in names:  # the backup, if it was made, is the old file too
        assert (tmp_path / "disc.previous.tif").read_bytes() == before


def test_sample_names_and_metadata_state_synthetic_data_and_licences():
    import yaml

    (_, ikw, _), (_, lkw, _) = _samples.cardiac_sample()
    assert "synthetic" in ikw["name"] and "synthetic" in lkw["name"]
    assert "BSD-3-Clause" in ikw["metadata"]["license"]
    [(_, fkw, _)] = _samples.fundus_sample()
    assert fkw["metadata"]["license"].startswith("CC0")
    manifest = yaml.safe_load((Path(_samples.__file__).parent / "napari.yaml").read_text())
    [cardiac] = [s for s in manifest["contributions"]["sample_data"] if s["key"] == "cardiac_mri"]
    assert "Synthetic" in cardiac["display_name"] and "BSD-3-Clause" in cardiac["display_name"]
