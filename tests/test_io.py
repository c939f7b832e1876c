"""Reading images, atomic writes, mask TIFFs with prompt names, overlays (emclip.io)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import tifffile
from PIL import Image

from emclip import io as eio
from emclip.errors import InvalidImageError


def _grad(h=40, w=60, dtype=np.uint8):
    g = np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)
    return g.astype(dtype)


# ----------------------------------------------------------------------------- read_image


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_read_image_round_trips_grey_rgb_rgba(tmp_path, suffix):
    grey = _grad()
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 200, np.uint8)], axis=-1)
    for name, arr in {"grey": grey, "rgb": rgb, "rgba": rgba}.items():
        if suffix == ".bmp" and name == "rgba":
            continue
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".tif":
            tifffile.imwrite(path, arr)
        else:
            Image.fromarray(arr).save(path)
        out = eio.read_image(path)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, arr)


def test_read_image_keeps_16_bit_and_float_and_stacks(tmp_path):
    img16 = (_grad(dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(img16).save(tmp_path / "a.png")
    out = eio.read_image(tmp_path / "a.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img16)
    f32 = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tiff", f32)
    np.testing.assert_array_equal(eio.read_image(tmp_path / "f.tiff"), f32)
    stack = np.zeros((5, 20, 30), np.int16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    assert eio.read_image(tmp_path / "s.tif").shape == (5, 20, 30)


def test_read_image_jpeg_and_palette(tmp_path):
    rgb = np.stack([_grad()] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "a.JPG", quality=95)
    out = eio.read_image(tmp_path / "a.JPG")  # extension check is case-insensitive
    assert out.shape == (40, 60, 3) and np.abs(out.astype(int) - rgb).mean() < 3
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert eio.read_image(tmp_path / "p.png").shape == (40, 60, 3)


def test_read_image_big_uncompressed_tiff_is_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(eio, "MEMMAP_BYTES", 1000)
    arr = _grad(100, 100)
    tifffile.imwrite(tmp_path / "big.tif", arr)
    out = eio.read_image(tmp_path / "big.tif")
    assert isinstance(out, np.memmap)
    np.testing.assert_array_equal(out, arr)


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image"):
        eio.read_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="folder"):
        eio.read_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidImageError, match=r"unsupported file type \.txt.*\.png"):
        eio.read_image(tmp_path / "notes.txt")
    (tmp_path / "vol.nii.gz").write_bytes(b"\0" * 10)
    with pytest.raises(InvalidImageError, match="nibabel"):
        eio.read_image(tmp_path / "vol.nii.gz")
    (tmp_path / "fake.png").write_text("this is not a png")
    with pytest.raises(InvalidImageError, match="really an image"):
        eio.read_image(tmp_path / "fake.png")
    (tmp_path / "fake.tif").write_text("this is not a tiff either")
    with pytest.raises(InvalidImageError, match="TIFF"):
        eio.read_image(tmp_path / "fake.tif")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_read_image_truncated_files(tmp_path, suffix):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)  # noise: compresses badly
    path = tmp_path / f"full{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="complete"):
        eio.read_image(cut)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a.txt"
    eio.atomic_write_text(target, "one")
    eio.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    # normal permissions (as open() would give), not the 0600 of a private temp file
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with eio.atomic_open(target, "w") as f:
            f.write("new, half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write too
        with eio.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eio.atomic_write_text(tmp_path / "nope" / "a.txt", "x")
    with pytest.raises(ValueError):
        with eio.atomic_open(target, "r"):
            pass


def test_mask_tiff_write_failure_mid_way_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m_masks.tif"
    old = np.zeros((1, 16, 16), bool)
    old[0, :4] = True
    eio.write_mask_tiff(target, old, ["old"])
    before = target.read_bytes()

    def broken_imwrite(path, data, **kwargs):
        with open(path, "wb") as f:
            f.write(b"II*\0partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError, match="No space"):
        eio.write_mask_tiff(target, np.ones((2, 16, 16), bool), ["a", "b"])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m_masks.tif"]
    monkeypatch.undo()
    assert eio.read_mask_tiff(target).prompts == ["old"]


# ----------------------------------------------------------------------------- mask TIFFs


def test_mask_tiff_round_trip_with_names_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((3, 30, 40)) > 0.5
    names = ["optic disc", "optic cup", "œdème, périphérique"]
    meta = {
        "threshold": np.float32(0.5),
        "found": np.array([True, False, True]),
        "scores": [0.9, 0.0, float("nan")],
    }
    path = eio.write_mask_tiff(tmp_path / "x_masks.tif", masks, names, metadata=meta)
    back = eio.read_mask_tiff(path)
    assert back.prompts == names
    assert back.masks.dtype == np.uint8 and back.masks.shape == (3, 30, 40)
    np.testing.assert_array_equal(back.masks, masks.astype(np.uint8))
    assert back.metadata["threshold"] == pytest.approx(0.5)
    assert back.metadata["found"] == [True, False, True]
    assert back.metadata["scores"][2] is None  # NaN is not JSON
    assert back.metadata["axes"] == "CYX"
    # other tools see the names too: they are JSON in the ImageDescription
    with tifffile.TiffFile(path) as tif:
        assert "optic cup" in tif.pages[0].description


def test_mask_tiff_stack_and_foreign_files(tmp_path):
    masks = np.zeros((2, 4, 10, 12), np.uint8)
    masks[1, 2, 3:5, 4:9] = 5  # any non-zero counts as inside
    eio.write_mask_tiff(tmp_path / "s.tif", masks, ["a", "b"])
    back = eio.read_mask_tiff(tmp_path / "s.tif")
    assert back.masks.shape == (2, 4, 10, 12) and back.metadata["axes"] == "CZYX"
    assert set(np.unique(back.masks)) == {0, 1}
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((10, 12), np.uint8))
    plain = eio.read_mask_tiff(tmp_path / "plain.tif")
    assert plain.prompts == ["mask 1"] and plain.masks.shape == (1, 10, 12)
    with pytest.raises(InvalidImageError, match="prompt names"):
        eio.write_mask_tiff(tmp_path / "bad.tif", np.zeros((2, 5, 5)), ["only one"])
    assert not (tmp_path / "bad.tif").exists()
    with pytest.raises(FileNotFoundError):
        eio.read_mask_tiff(tmp_path / "none.tif")


# ----------------------------------------------------------------------------- overlays


def test_overlay_colours_only_the_masks():
    img = np.full((60, 80), 100, np.uint8)
    img[0, 0] = 0
    img[-1, -1] = 255
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 35:55, 40:70] = True
    rgb = eio.overlay_rgb(img, masks, ["a", "b"], legend=False)
    assert rgb.dtype == np.uint8 and rgb.shape == (60, 80, 3)
    plain = eio.overlay_rgb(img, np.zeros_like(masks), legend=False)
    assert (plain[..., 0] == plain[..., 1]).all()  # no mask: the grey image, untouched
    inside_a, inside_b = rgb[20, 20].astype(int), rgb[45, 55].astype(int)
    assert inside_a[0] > inside_a[2] + 30  # red-ish (PALETTE[0])
    assert inside_b[2] > inside_b[0] + 30  # blue-ish (PALETTE[1])
    np.testing.assert_array_equal(rgb[5, 75], plain[5, 75])  # background unchanged
    with_legend = eio.overlay_rgb(img, masks, ["a", "b"])
    assert not np.array_equal(with_legend[:20, :60], rgb[:20, :60])


def test_overlay_large_images_are_reduced_and_shapes_checked(tmp_path):
    img = np.zeros((500, 300), np.uint16)
    masks = np.zeros((1, 500, 300), bool)
    rgb = eio.overlay_rgb(img, masks, max_side=100)
    assert max(rgb.shape[:2]) <= 100
    with pytest.raises(InvalidImageError, match="do not match"):
        eio.overlay_rgb(img, np.zeros((1, 50, 30), bool))
    path = eio.write_overlay_png(
        tmp_path / "o.png", img[:50, :40], masks[:, :50, :40], prompt_names=["x"]
    )
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (40, 50)
