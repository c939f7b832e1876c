"""Dataset format, volumes, splits, augmentation and prompted samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from emclip.data.augment import AugmentConfig, augment, build_augmentation
from emclip.data.folder import FolderDataset, open_dataset
from emclip.data.format import read_spec
from emclip.data.splits import grouped_split, split_dataset
from emclip.data.training import PromptConfig, PromptedDataset, Source, collate
from emclip.errors import ConfigError, DatasetError

FUNDUS_YAML = """\
name: toy fundus
modality: colour fundus photograph
structures:
  optic disc: [1, 2]
  optic cup: [2]
synonyms:
  optic disc: [OD]
"""

CARDIAC_YAML = """\
modality: cardiac cine MRI (bSSFP)
structures:
  left ventricle: [1]
  myocardium: [2]
"""


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_dataset(root: Path, yaml_text: str = FUNDUS_YAML, n: int = 3, hw=(40, 60), rgb=True, meta: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(yaml_text)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = hw + ((3,) if rgb else ())
        img = rng.integers(0, 255, shape, dtype=np.uint8)
        mask = np.zeros(hw, np.uint8)
        mask[10:30, 10 + i : 30 + i] = 1
        mask[15:25, 15 + i : 25 + i] = 2
        _png(root / "images" / f"img{i}.png", img)
        _png(root / "masks" / f"img{i}.png", mask)
    if meta:
        (root / "meta.csv").write_text(meta)
    return root


# --------------------------------------------------------------------------- format errors


def test_spec_reads_structures_and_synonyms(tmp_path):
    spec = read_spec(make_dataset(tmp_path / "d"))
    assert spec.structure_names == ["optic disc", "optic cup"]
    assert spec.structures["optic disc"] == (1, 2)
    assert "OD" in spec.synonyms_of("optic disc") and "optic nerve head" in spec.synonyms_of("optic disc")
    assert spec.kind == "folder"


def test_structure_is_union_of_values(tmp_path):
    ds = FolderDataset(make_dataset(tmp_path / "d"))
    s = ds[0]
    masks = s.structure_masks()
    assert np.array_equal(masks[0], s.labels >= 1)
    assert np.array_equal(masks[1], s.labels == 2)


def test_missing_yaml_names_file(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "dataset.yaml").unlink()
    with pytest.raises(DatasetError, match=r"dataset\.yaml.*missing"):
        FolderDataset(root)


def test_unreadable_yaml_names_file(tmp_path):
    root = make_dataset(tmp_path / "d", yaml_text="structures: [unclosed\n  : :")
    with pytest.raises(DatasetError, match=r"dataset\.yaml.*YAML"):
        FolderDataset(root)


@pytest.mark.parametrize(
    "text, match",
    [
        ("modality: x\n", "structures"),
        ("structures:\n  disc: [one]\n", "integers"),
        ("structures:\n  disc: [0]\n", "background"),
        ("structures:\n  disc: [1]\nsynonyms:\n  cup: [c]\n", "not one of the structures"),
        ("structures:\n  disc: [1]\ncolour: red\n", "unknown keys"),
    ],
)
def test_invalid_yaml_content(tmp_path, text, match):
    root = make_dataset(tmp_path / "d", yaml_text=text)
    with pytest.raises(DatasetError, match=match) as info:
        read_spec(root)
    assert "dataset.yaml" in str(info.value)


def test_missing_mask_names_image(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "masks" / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"img1\.png.*no mask"):
        FolderDataset(root)


def test_missing_image_names_mask(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "images" / "img2.png").unlink()
    with pytest.raises(DatasetError, match=r"masks/img2\.png.*no image"):
        FolderDataset(root)


def test_size_mismatch_names_mask(tmp_path):
    root = make_dataset(tmp_path / "d")
    _png(root / "masks" / "img0.png", np.zeros((20, 20), np.uint8))
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match=r"masks/img0\.png.*20x20.*40x60"):
        ds[0]


def test_unknown_mask_value_names_mask(tmp_path):
    root = make_dataset(tmp_path / "d")
    bad = np.zeros((40, 60), np.uint8)
    bad[0, 0] = 7
    _png(root / "masks" / "img1.png", bad)
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match=r"img1\.png.*\[7\]"):
        ds[1]


def test_corrupt_image_names_file(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "images" / "img0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"images/img0\.png.*cannot be read"):
        FolderDataset(root)[0]


def test_jpeg_mask_refused(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "masks" / "extra.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="lossless"):
        FolderDataset(root)


def test_tiff_images_and_masks(tmp_path):
    import tifffile

    root = tmp_path / "t"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(CARDIAC_YAML)
    img = (np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 7)
    lab = np.zeros((32, 48), np.uint16)
    lab[5:10, 5:10] = 2
    tifffile.imwrite(root / "images" / "a.tif", img)
    tifffile.imwrite(root / "masks" / "a.tif", lab)
    s = FolderDataset(root)[0]
    assert s.image.dtype == np.uint16 and s.image.shape == (32, 48)
    assert s.structure_masks()[1].sum() == 25


# --------------------------------------------------------------------------- volumes


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_volume_named_axis_follows_affine(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    (root / "dataset.yaml").write_text(
        "modality: brain MRI\nchannels: [flair]\nlabels: seg\nstructures:\n  tumour: [1]\n"
    )
    # voxel axes ordered (S, A, R): axial must be voxel axis 0, sagittal axis 2
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    data = np.random.default_rng(0).random((5, 12, 16)).astype(np.float32)
    seg = np.zeros((5, 12, 16), np.uint8)
    seg[2, 3:6, 4:8] = 1
    _nifti(root / "c1" / "c1_flair.nii.gz", data, affine)
    _nifti(root / "c1" / "c1_seg.nii.gz", seg, affine)
    ds = open_dataset(root)
    assert len(ds) == 5
    s = ds[2]
    assert s.image.shape == (12, 16) and s.labels.sum() == 12
    np.testing.assert_allclose(s.image, data[2], rtol=1e-6)
    sag = open_dataset(root, axis="sagittal", only_labelled=True)
    assert len(sag) == 4 and sag[0].image.shape == (5, 12)
    assert split_dataset(ds).part("all") == list(range(5))


def test_volume_missing_label_file_named(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    (root / "dataset.yaml").write_text("channels: [t1]\nstructures:\n  tumour: [1]\n")
    _nifti(root / "c1" / "c1_t1.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(DatasetError, match=r"c1_seg\.nii\.gz.*missing"):
        open_dataset(root)


# --------------------------------------------------------------------------- splits


def test_random_split_groups_never_leak_and_is_seeded():
    groups = [f"p{i // 7}" for i in range(7 * 30)]  # 30 patients x 7 slices
    a = grouped_split(groups, None, seed=3, val_fraction=0.1, test_fraction=0.2)
    b = grouped_split(groups, None, seed=3, val_fraction=0.1, test_fraction=0.2)
    c = grouped_split(groups, None, seed=4, val_fraction=0.1, test_fraction=0.2)
    assert a == b and a.test != c.test and a.source == "random"
    parts = [{groups[i] for i in getattr(a, p)} for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(parts[2]) == 6 and len(parts[1]) == 3 and len(parts[0]) == 21
    assert sorted(a.train + a.val + a.test) == list(range(len(groups)))


def test_official_split_is_used_and_val_carved_from_train():
    groups = [f"id{i}" for i in range(20)]
    official = ["train"] * 10 + ["random_test"] * 10
    s = grouped_split(groups, official, seed=0, val_fraction=0.2)
    assert s.source == "official"
    assert s.test == list(range(10, 20))
    assert len(s.val) == 2 and set(s.val) <= set(range(10))
    with pytest.raises(DatasetError, match="both"):
        grouped_split(["p1", "p1"], ["train", "test"])


@pytest.mark.data
def test_real_fundus_folders(shared_data):
    ds = FolderDataset(shared_data / "fundus" / "drishti_gs")
    assert len(ds) == 101
    assert ds.spec.structure_names == ["optic disc", "optic cup", "neuroretinal rim"]
    split = split_dataset(ds)
    assert split.source == "official" and len(split.test) == 51 and len(split.train) + len(split.val) == 50
    s = ds[0]
    assert s.image.shape == (512, 512, 3)
    m = s.structure_masks()
    assert np.array_equal(m[0], m[1] | m[2]) and not (m[1] & m[2]).any()
    r1 = split_dataset(FolderDataset(shared_data / "fundus" / "rimone_dl_r1"))
    assert r1.source == "official" and len(r1.test) == 17


@pytest.mark.data
def test_real_cardiac_split_by_patient(shared_data):
    ds = FolderDataset(shared_data / "cardiac" / "acdc")
    assert len(ds) == 958
    split = split_dataset(ds, seed=0)
    assert split.source == "random"
    pats = {p: {ds.group_of(i) for i in getattr(split, p)} for p in ("train", "val", "test")}
    assert len(set().union(*pats.values())) == 50
    assert not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"]) and not (pats["val"] & pats["test"])
    lge = FolderDataset(shared_data / "cardiac" / "mscmr_lge")
    assert len(lge) == 304 and lge[0].spacing == (1.523, 1.523)
    assert set(np.unique(lge[5].labels)) <= {0, 1, 2, 3}


@pytest.mark.data
def test_real_brain_volumes(shared_data):
    ds = open_dataset(shared_data / "brain" / "brats2018_dvn2", only_labelled=True)
    assert ds.spec.kind == "volume" and len(ds.cases) == 4
    s = ds[0]
    assert s.labels.any() and s.spacing == (1.0, 1.0) and s.intensity_range is not None
    split = split_dataset(ds)
    cases = {p: {ds.group_of(i) for i in getattr(split, p)} for p in ("train", "val", "test")}
    assert not (cases["train"] & cases["test"]) and sum(map(len, cases.values())) == 4
    item = PromptedDataset([Source(ds, split.train[:3])], 64, (0.5,) * 3, (0.5,) * 3, train=False)[0]
    assert item["prompts"] == ["whole tumour"] and item["targets"].shape == (1, 64, 64)
    assert item["targets"].sum() > 0 and item["modality"] == "brain MRI"


# --------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_keeps_labels():
    rng = np.random.default_rng(1)
    img = rng.random((64, 80, 3)).astype(np.float32)
    lab = np.zeros((64, 80), np.uint8)
    lab[20:40, 20:50] = 1
    lab[25:35, 30:40] = 2
    pipe = build_augmentation(AugmentConfig(strength="strong", style_mix_p=1.0))
    ref = rng.random((50, 50, 3)).astype(np.float32)
    a1, l1 = augment(pipe, img, lab, seed=5, reference=ref)
    a2, l2 = augment(pipe, img, lab, seed=5, reference=ref)
    a3, _ = augment(pipe, img, lab, seed=6, reference=ref)
    assert np.array_equal(a1, a2) and np.array_equal(l1, l2)
    assert not np.array_equal(a1, a3)
    assert a1.shape == img.shape and a1.dtype == np.float32 and 0 <= a1.min() and a1.max() <= 1
    assert set(np.unique(l1)) <= {0, 1, 2}
    assert build_augmentation(AugmentConfig(strength="none", style_mix_p=0.0)) is None
    with pytest.raises(ConfigError):
        AugmentConfig(strength="wild")


def test_augmentation_zoom_range_is_configurable():
    """``augment.scale`` sets the affine zoom: a fixed 1.6x zoom makes a centred object 2.56x
    larger whenever the affine is drawn; the default range (0.8-1.2) never exceeds 1.44x."""
    lab = np.zeros((96, 96), np.uint8)
    lab[38:58, 38:58] = 1  # 400 pixels at the centre
    img = np.repeat(lab[..., None], 3, axis=2).astype(np.float32)

    def area_ratios(cfg: AugmentConfig) -> np.ndarray:
        pipe = build_augmentation(cfg)
        return np.array([augment(pipe, img, lab, seed=s)[1].sum() / lab.sum() for s in range(24)])

    fixed = area_ratios(AugmentConfig(style_mix_p=0.0, scale=(1.6, 1.6)))
    default = area_ratios(AugmentConfig(style_mix_p=0.0))
    assert (fixed > 2.2).sum() >= 6  # the affine is drawn with p = 0.6
    assert default.max() < 1.6
    assert AugmentConfig(scale=[0.8, 1.7]).zoom_range() == (0.8, 1.7)
    assert AugmentConfig(strength="light").zoom_range() == (0.9, 1.1)
    with pytest.raises(ConfigError, match="augment.scale"):
        AugmentConfig(scale=(1.5, 1.2))
    with pytest.raises(ConfigError, match="augment.scale"):
        AugmentConfig(scale=(0.1, 1.0))


def test_style_mixing_uses_reference_spectrum():
    import albumentations as A

    rng = np.random.default_rng(2)
    img = rng.random((64, 64, 3)).astype(np.float32) * 0.2
    ref = np.full((64, 64, 3), 0.9, np.float32)
    pipe = A.Compose([A.FDA(reference_images=None, beta_limit=(0.1, 0.1), read_fn=lambda x: x, p=1.0)])
    out, _ = augment(pipe, img, np.zeros((64, 64), np.uint8), seed=0, reference=ref)
    # the DC amplitude is swapped: the mean moves towards the reference's brightness
    assert out.mean() > img.mean() + 0.3


# --------------------------------------------------------------------------- prompted samples


def test_prompted_samples_negatives_letterbox_and_determinism(tmp_path):
    fundus = FolderDataset(make_dataset(tmp_path / "f", hw=(40, 60)))
    cardiac = FolderDataset(make_dataset(tmp_path / "c", CARDIAC_YAML, rgb=False, hw=(48, 32)))
    sources = [Source(fundus, [0, 1, 2], name="f"), Source(cardiac, [0, 1], name="c")]
    ds = PromptedDataset(sources, 64, (0.5,) * 3, (0.25,) * 3, seed=7,
                         augment_cfg=AugmentConfig(strength="none", style_mix_p=0.0),
                         prompt_cfg=PromptConfig(synonym_p=0.0, cross_negatives=1))
    assert len(ds) == 5
    item = ds[0]
    assert item["prompts"][:2] == ["optic disc", "optic cup"]
    assert item["prompts"][2] in ("left ventricle", "myocardium")  # other modality -> negative
    assert item["names"][2] == "" and item["targets"][2].sum() == 0
    assert item["texts"][0] != "optic disc" and "optic disc" in item["texts"][0]  # template applied
    # letterbox: 40x60 -> 43x64 centred; rows outside are padding (zero image after normalising back)
    x = item["image"].numpy() * 0.25 + 0.5
    assert np.allclose(x[:, :10], 0, atol=1e-6) and x[:, 20:40].max() > 0
    t = item["targets"].numpy()
    assert t[0].sum() > t[1].sum() > 0 and not t[1][~t[0].astype(bool)].any()  # cup inside disc
    card = ds[3]
    assert card["prompts"][:2] == ["left ventricle", "myocardium"] and card["modality"].startswith("cardiac")
    same = ds[3]
    assert same["texts"] == card["texts"] and np.array_equal(same["image"].numpy(), card["image"].numpy())
    batch = collate([ds[0], ds[3]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["targets"].shape == (2, 3, 64, 64)
    assert batch["prompt_mask"].tolist() == [[True, True, True], [True, True, True]]
    # validation samples: names only, no negatives, no templates
    val = PromptedDataset(sources, 64, (0.5,) * 3, (0.25,) * 3, train=False)
    v = val[0]
    assert v["prompts"] == v["texts"] == ["optic disc", "optic cup"]


def test_intensity_remapping_wired_into_training_samples_only(tmp_path):
    fundus = FolderDataset(make_dataset(tmp_path / "f", hw=(40, 60)))
    sources = [Source(fundus, [0, 1, 2], name="f")]

    def image(remap_p: float, train: bool = True) -> np.ndarray:
        ds = PromptedDataset(sources, 64, (0.5,) * 3, (0.25,) * 3, seed=3, train=train,
                             augment_cfg=AugmentConfig(strength="none", style_mix_p=0.0, remap_p=remap_p))
        return ds[1]["image"].numpy()

    plain, remapped = image(0.0), image(1.0)
    assert not np.allclose(plain, remapped, atol=1e-3)
    assert np.array_equal(remapped, image(1.0))  # seeded per (seed, epoch, index)
    assert np.array_equal(image(1.0, train=False), image(0.0, train=False))  # never at validation


def test_synonyms_drawn_and_epochs_differ(tmp_path):
    fundus = FolderDataset(make_dataset(tmp_path / "f"))
    ds = PromptedDataset([Source(fundus, [0, 1, 2], repeat=4)], 64, (0.5,) * 3, (0.25,) * 3, seed=0,
                         prompt_cfg=PromptConfig(synonym_p=1.0, cross_negatives=0))
    first = [ds[i]["prompts"][0] for i in range(len(ds))]
    assert all(p != "optic disc" for p in first) and "OD" in first
    e0 = ds[0]["image"].clone()
    ds.set_epoch(1)
    assert not np.array_equal(e0.numpy(), ds[0]["image"].numpy())
