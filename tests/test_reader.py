"""napari side of NIfTI: the reader contribution, world coordinates, the NIfTI labels writer and
stacking several Image layers as the sequences of one volume (no Qt needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from napari_emclip._nifti_writer import write_labels_nifti
from napari_emclip._reader import get_reader, read_nifti
from napari_emclip._volumes import META_KEY, WORLD_FROM_RAS, stack_image_layers

SHAPE = (16, 20, 10)
RAS = np.array([[1.2, 0, 0, -10.0], [0, 0.8, 0, 4.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1.0]])
LPS = np.array([[-1.0, 0, 0, 49.0], [0, -1.0, 0, 198.0], [0, 0, 1.0, 8.0], [0, 0, 0, 1.0]])
PERMUTED = np.array([[0.0, -1.0, 0, 5.0], [0, 0, -2.0, 7.0], [3.0, 0, 0, -9.0], [0, 0, 0, 1.0]])
# 10 degrees about z on top of LPS: not axis-aligned, rendered through the layer's affine
c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
OBLIQUE = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]) @ LPS


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def numbered() -> np.ndarray:
    """Every voxel holds a distinct value, so it can be found after reorientation."""
    return np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)


def as_layer(layer_data):
    from napari.layers import Layer

    data, kwargs, kind = layer_data
    return Layer.create(data, kwargs, kind)


def test_get_reader_only_takes_nifti(tmp_path):
    path = save(tmp_path / "a.nii.gz", numbered(), RAS)
    assert get_reader(path) is read_nifti
    assert get_reader([path, path.replace(".nii.gz", ".nii")]) is read_nifti
    assert get_reader(str(tmp_path / "a.png")) is None
    assert get_reader([path, str(tmp_path / "b.tif")]) is None


@pytest.mark.parametrize("affine", [RAS, LPS, PERMUTED, OBLIQUE], ids=["RAS", "LPS", "permuted", "oblique"])
def test_world_coordinates_match_nibabel(tmp_path, affine):
    data = numbered()
    path = save(tmp_path / "pat_flair.nii.gz", data, affine)
    [layer_data] = read_nifti(path)
    layer = as_layer(layer_data)
    assert layer_data[2] == "image" and layer.name == "pat_flair"
    shown = np.asarray(layer.data)
    for ijk in [(0, 0, 0), (3, 7, 2), (15, 19, 9), (8, 1, 5)]:
        display = tuple(int(v) for v in np.argwhere(shown == data[ijk])[0])
        world = layer.data_to_world(display)
        expected = (WORLD_FROM_RAS @ np.r_[apply_affine(affine, ijk), 1.0])[:3]
        np.testing.assert_allclose(world, expected, atol=1e-4)
    meta = layer.metadata[META_KEY]
    np.testing.assert_allclose(meta["affine"], affine)
    assert meta["sequence"] == "flair" and meta["shape"] == list(SHAPE)


@pytest.mark.parametrize("affine", [RAS, LPS, PERMUTED], ids=["RAS", "LPS", "permuted"])
def test_axis_aligned_volumes_slice_without_napari_warnings(tmp_path, affine):
    from napari.components import ViewerModel

    [layer_data] = read_nifti(save(tmp_path / "v.nii.gz", numbered(), affine))
    linear = np.asarray(layer_data[1]["affine"])[:3, :3]
    assert np.allclose(linear, np.diag(np.diag(linear))) and (np.diag(linear) > 0).all()
    viewer = ViewerModel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Non-orthogonal slicing" would fail here
        layer = viewer.add_layer(as_layer(layer_data))
        viewer.dims.set_point(0, float(viewer.dims.range[0].start))
    assert layer._slice.image.raw.shape == layer.data.shape[1:]
    # radiological display: data axis 0 runs inferior, rows posterior (anterior up), columns to
    # the patient's left (shown on the right)
    ras_from_display = np.linalg.inv(WORLD_FROM_RAS) @ np.asarray(layer_data[1]["affine"])
    steps = ras_from_display[:3, :3]
    assert steps[2, 0] < 0 and steps[1, 1] < 0 and steps[0, 2] < 0


def test_label_files_open_as_labels(tmp_path):
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:5, 3:9, 1:4] = 2
    [(data, _, kind)] = read_nifti(save(tmp_path / "case_seg.nii.gz", seg, LPS))
    assert kind == "labels" and np.issubdtype(data.dtype, np.integer)
    assert np.count_nonzero(data == 2) == np.count_nonzero(seg == 2)
    image = save(tmp_path / "case_t1.nii.gz", seg.astype(np.float32) + 0.5, LPS)
    assert read_nifti(image)[0][2] == "image"


def test_npe2_reads_nifti_through_the_manifest(tmp_path):
    import npe2

    npe2.PluginManager.instance().discover()
    path = save(tmp_path / "p_t2.nii.gz", numbered(), LPS)
    layers = npe2.read([path], stack=False, plugin_name="napari-emclip")
    assert len(layers) == 1 and layers[0][2] == "image"


def test_labels_written_back_on_the_source_grid(tmp_path):
    from napari.layers import Labels

    seg = np.zeros(SHAPE, np.uint8)
    seg[1:4, 5:12, 2:7] = 1
    seg[9, 0, 9] = 3
    src = save(tmp_path / "case_seg.nii.gz", seg, PERMUTED)
    layer = as_layer(read_nifti(src)[0])
    assert isinstance(layer, Labels)
    data, attributes, _ = layer.as_layer_data_tuple()
    [out] = write_labels_nifti(str(tmp_path / "edited"), data, attributes)
    assert out.endswith("edited.nii.gz")
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, PERMUTED, atol=1e-6)
    assert np.array_equal(np.asarray(back.dataobj), seg)


def test_napari_saves_nii_gz_labels_through_the_plugin(tmp_path):
    import npe2
    from napari.components import ViewerModel

    npe2.PluginManager.instance().discover()
    viewer = ViewerModel()
    seg = np.zeros(SHAPE, np.uint8)
    seg[3, 4, 5] = 2
    viewer.add_layer(as_layer(read_nifti(save(tmp_path / "c_seg.nii.gz", seg, LPS))[0]))
    [out] = viewer.layers.save(str(tmp_path / "saved.nii.gz"))  # chosen by the extension
    back = nib.load(out)
    assert np.array_equal(np.asarray(back.dataobj), seg) and np.allclose(back.affine, LPS)


def test_labels_without_nifti_metadata_keep_world_positions(tmp_path):
    """A mask made in napari on a NIfTI image (same geometry, no metadata) lands on the same
    world positions, in the display voxel order."""
    from napari.layers import Labels

    image = as_layer(read_nifti(save(tmp_path / "pat_flair.nii.gz", numbered(), LPS))[0])
    mask = np.zeros(image.data.shape, np.uint8)
    mask[4, 2:6, 3] = 7
    labels = Labels(mask, affine=image.affine.affine_matrix)
    data, attributes, _ = labels.as_layer_data_tuple()
    [out] = write_labels_nifti(str(tmp_path / "mask.nii.gz"), data, attributes)
    img = nib.load(out)
    written = np.argwhere(np.asarray(img.dataobj) == 7)
    world_written = {tuple(np.round(apply_affine(img.affine, v), 4)) for v in written}
    world_drawn = {
        tuple(np.round((np.linalg.inv(WORLD_FROM_RAS) @ np.r_[image.data_to_world(v), 1.0])[:3], 4))
        for v in np.argwhere(mask == 7)
    }
    assert world_written == world_drawn and len(world_written) == 4
    with pytest.raises(ValueError, match="3D"):
        write_labels_nifti(str(tmp_path / "flat.nii.gz"), np.zeros((4, 4), np.uint8), {"scale": [1, 1]})


def test_stack_image_layers(tmp_path):
    from napari.layers import Image, Labels

    rng = np.random.default_rng(0)
    flair, t1ce = rng.normal(size=SHAPE).astype(np.float32), rng.normal(size=SHAPE).astype(np.float32)
    a = as_layer(read_nifti(save(tmp_path / "p_flair.nii.gz", flair, LPS))[0])
    b = as_layer(read_nifti(save(tmp_path / "p_t1c.nii.gz", t1ce, LPS))[0])
    data, names, affine = stack_image_layers([b, a])
    assert names == ["t1ce", "flair"] and data.shape == a.data.shape + (2,)
    assert np.array_equal(data[..., 1], np.asarray(a.data))
    # the affine maps display voxels to RAS, so axial is display axis 0 (the slider)
    from emclip.volume_io import voxel_axis

    assert voxel_axis("axial", affine) == 0
    np.testing.assert_allclose(apply_affine(affine, (3, 4, 5)), (np.linalg.inv(WORLD_FROM_RAS) @ np.r_[a.data_to_world((3, 4, 5)), 1])[:3])
    # names from layer names when there is no NIfTI metadata; explicit names win
    plain = [Image(np.asarray(a.data), name="case_T2"), Image(np.asarray(b.data), name="other")]
    assert stack_image_layers(plain)[1] == ["t2", "other"]
    assert stack_image_layers(plain, ["x", "y"])[1] == ["x", "y"]
    with pytest.raises(ValueError, match="shape"):
        stack_image_layers([a, Image(np.zeros((4, 5, 6), np.float32), name="small")])
    with pytest.raises(ValueError, match="placed differently"):
        stack_image_layers([Image(np.asarray(a.data), name="p_t1"), Image(np.asarray(a.data), name="p_t2", scale=(2, 1, 1))])
    with pytest.raises(ValueError, match="Labels"):
        stack_image_layers([a, Labels(np.zeros(a.data.shape, np.uint8), name="seg")])
    with pytest.raises(ValueError, match="same sequence name"):
        stack_image_layers([a, a])


def test_stacked_layers_segment_as_one_volume(tmp_path, tiny_model):
    import emclip

    layers = [
        as_layer(read_nifti(save(tmp_path / f"p_{seq}.nii.gz", np.random.default_rng(i).normal(size=SHAPE).astype(np.float32), LPS))[0])
        for i, seq in enumerate(["flair"])
    ]
    data, names, affine = stack_image_layers(layers)
    result = emclip.segment_volume(data, "tumour", tiny_model, channel_axis=-1, channels=names, affine=affine)
    assert result.masks.shape == (1,) + layers[0].data.shape and result.stack_axis == 0


def test_real_brain_case_opens_in_world_coordinates(shared_data):
    case = next(iter(sorted((shared_data / "brain" / "brats2015_deepmedic").glob("brats_*"))), None)
    if case is None:
        pytest.skip("no brain case in the shared data")
    flair = case / f"{case.name}_flair.nii.gz"
    seg = case / f"{case.name}_seg.nii.gz"
    image_data, labels_data = read_nifti([str(flair), str(seg)])
    assert (image_data[2], labels_data[2]) == ("image", "labels")
    image, labels = as_layer(image_data), as_layer(labels_data)
    np.testing.assert_allclose(image.affine.affine_matrix, labels.affine.affine_matrix)
    src = nib.load(str(flair))
    ijk = tuple(int(n) // 2 for n in src.shape)
    expected = (WORLD_FROM_RAS @ np.r_[apply_affine(src.affine, ijk), 1.0])[:3]
    display = np.round(image.world_to_data(expected)).astype(int)
    assert np.isclose(image.data[tuple(display)], src.dataobj[ijk], atol=1e-3)


def test_saving_over_an_existing_nifti_keeps_the_previous_version(tmp_path):
    """viewer.layers.save does not ask before overwriting: the old labels must survive."""
    first = np.zeros((4, 5, 6), np.uint8)
    first[1, 2, 3] = 1
    second = np.zeros_like(first)
    second[2, 2, 2] = 2
    target = tmp_path / "mask.nii.gz"
    write_labels_nifti(str(target), first, {"scale": [1, 1, 1]})
    [out] = write_labels_nifti(str(target), second, {"scale": [1, 1, 1]})
    backup = tmp_path / "mask.previous.nii.gz"
    assert out == str(target) and backup.is_file()
    assert np.asarray(nib.load(backup).dataobj).max() == 1
    assert np.asarray(nib.load(target).dataobj).max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "mask.previous.nii.gz"]
