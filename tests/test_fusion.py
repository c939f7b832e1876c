"""Modality fusion (emclip.nn.fusion), named MRI channels at inference, multi-sequence volumes."""

from __future__ import annotations

import warnings

import emclip
import numpy as np
import pytest
import torch
from emclip.config import FusionConfig, ModelConfig, load_config
from emclip.errors import ConfigError, InvalidArgumentError, InvalidImageError
from emclip.nn.fusion import ModalityFusion
from emclip.sequences import canonical_sequence, foreground_window, normalise_sequence, to_layout

SEQS = ["flair", "t1", "t1ce", "t2"]


def _fusion(**kw) -> ModalityFusion:
    torch.manual_seed(0)
    cfg = FusionConfig(enabled=True, **kw)
    return ModalityFusion(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()


def _tiny_fusion_model():
    from emclip.factory import create_model

    torch.manual_seed(0)
    return create_model(load_config("tiny", {"fusion.enabled": True})).eval()


def test_fusion_output_shape_and_weights_sum_to_one_over_present():
    f = _fusion()
    x = torch.zeros(3, 4, 16, 20)
    x[0, 0], x[0, 2] = torch.rand(16, 20), torch.rand(16, 20)  # flair + t1ce
    x[1, 1] = torch.rand(16, 20)  # t1 only
    x[2] = torch.rand(4, 16, 20)  # all four
    y, w = f(x)
    assert y.shape == (3, 3, 16, 20) and w.shape == (3, 4, 16, 20)
    assert torch.allclose(w.sum(dim=1), torch.ones(3, 16, 20), atol=1e-5)
    assert torch.all(w[0, [1, 3]] == 0) and torch.all(w[0, [0, 2]] > 0)
    assert torch.all(w[1, 1] == 1) and torch.all(w[1, [0, 2, 3]] == 0)
    assert torch.all(w[2] > 0)


def test_absent_sequences_are_ignored():
    """Changing an absent channel (declared absent via ``present``) changes nothing."""
    f = _fusion(gate="image")
    x = torch.rand(2, 4, 12, 12)
    present = torch.tensor([[True, False, True, False]] * 2)
    y1, w1 = f(x, present)
    x2 = x.clone()
    x2[:, [1, 3]] = torch.rand(2, 2, 12, 12) * 5
    y2, w2 = f(x2, present)
    assert torch.allclose(y1, y2) and torch.allclose(w1, w2)
    assert torch.all(w1[:, [1, 3]] == 0)
    # image gate: one weight per image and sequence (constant over pixels)
    assert torch.allclose(w1[:, 0], w1[:, 0, :1, :1].expand(-1, 12, 12))


def test_untrained_fusion_feeds_the_gated_grey_image():
    """proj starts at zero: the tower sees (sum_s w_s x_s - mean) / std on all 3 channels."""
    f = _fusion()
    x = torch.zeros(1, 4, 8, 8)
    x[0, 0] = torch.rand(8, 8)
    y, _ = f(x)
    expected = (x[0, 0] - 0.5) / 0.5
    for c in range(3):
        assert torch.allclose(y[0, c], expected, atol=1e-6)


def test_shared_stem_and_sequence_dropout():
    f = _fusion(sequence_dropout=0.5)
    assert f.stem_of["t1ce"] == "t1" and set(f.stems.keys()) == {"flair", "t1", "t2"}
    f.train()
    torch.manual_seed(1)
    x = torch.rand(64, 4, 4, 4)
    _, w = f(x)
    used = w.flatten(2).amax(-1) > 0
    assert bool(used.any(dim=1).all())  # at least one sequence always kept
    assert int((~used).sum()) > 0  # some were dropped
    assert torch.allclose(w.sum(1), torch.ones(64, 4, 4), atol=1e-5)


def test_model_runs_with_any_subset_including_one_sequence():
    m = _tiny_fusion_model()
    assert m.input_channels == 4 and m.sequences == SEQS
    rng = np.random.default_rng(0)
    outs = []
    for subset in ([0], [1], [0, 2], [0, 1], [0, 1, 2, 3]):
        x = torch.zeros(1, 4, 64, 64)
        x[0, subset] = torch.from_numpy(rng.random((len(subset), 64, 64), dtype=np.float32))
        with torch.no_grad():
            out = m.predict_logits(x, ["whole tumour", "edema"], "brain MRI")
        assert out.logits.shape == (1, 2, 64, 64) and torch.isfinite(out.logits).all()
        w = out.aux["fusion_weights"]
        assert torch.all(w[0, [i for i in range(4) if i not in subset]] == 0)
        outs.append(out.logits)
    assert not torch.allclose(outs[0], outs[2])
    with pytest.raises(InvalidImageError, match="fuses 4 MRI sequences"):
        m.predict_logits(torch.zeros(1, 3, 64, 64), ["edema"])


def test_sequence_names_and_unknown_name():
    assert canonical_sequence("T1c") == "t1ce" and canonical_sequence(" FLAIR ") == "flair"
    assert canonical_sequence("T1Gd") == "t1ce" and canonical_sequence("T2-FLAIR") == "flair"
    with pytest.raises(InvalidArgumentError, match="unknown MRI sequence 'pd'.*flair, t1, t1ce, t2"):
        canonical_sequence("pd")
    f = _fusion()
    with pytest.raises(InvalidArgumentError, match="named twice"):
        f.present_from(["flair", "FLAIR"])
    assert f.present_from(["t1c", "flair"]).tolist() == [True, False, True, False]


def test_foreground_window_ignores_constant_background():
    vol = np.full((10, 10, 10), -3.0, dtype=np.float32)
    vol[2:8, 2:8, 2:8] = np.linspace(0, 100, 216).reshape(6, 6, 6)
    lo, hi = foreground_window(vol)
    assert 0 <= lo < 2 and 98 < hi <= 100  # background (-3, 78 % of voxels) not in the window
    out = normalise_sequence(vol, (lo, hi))
    assert out.min() == 0 and out.max() == 1 and out[0, 0, 0] == 0
    lay = to_layout(np.ones((2, 2, 2), np.float32) * [1, 2], ["t1ce", "flair"], SEQS)
    assert lay[0, 0].tolist() == [2, 0, 1, 0]


def test_segment_with_channels_on_tiny_fusion_model():
    m = _tiny_fusion_model()
    rng = np.random.default_rng(0)
    img = rng.random((2, 40, 48)).astype(np.float32)  # channel-first, 2 sequences
    r = emclip.segment(img, "whole tumour, edema", m, channels=["FLAIR", "T1c"], channel_axis=0)
    assert r.masks.shape == (2, 40, 48) and r.info["channels"] == ["flair", "t1ce"]
    assert set(r.info["intensity_windows"]) == {"flair", "t1ce"}
    one = emclip.segment(img[0], "whole tumour", m, channels=["flair"])
    assert one.probabilities.shape == (1, 40, 48)
    # each channel is normalised on its own: scaling one sequence changes nothing
    r2 = emclip.segment(img * np.array([1.0, 50.0], np.float32)[:, None, None], "whole tumour, edema", m,
                        channels=["flair", "t1ce"], channel_axis=0)
    assert np.allclose(r.probabilities, r2.probabilities, atol=1e-5)
    vol = rng.random((10, 40, 48, 2)).astype(np.float32)
    s = emclip.segment_stack(vol, "whole tumour", m, channels=["flair", "t1"], channel_axis=-1, axis=1)
    assert s.masks.shape == (1, 10, 40, 48) and s.slice_found.shape == (40, 1) and s.stack_axis == 1
    with pytest.raises(InvalidArgumentError, match="unknown MRI sequence"):
        emclip.segment(img, "edema", m, channels=["flair", "dwi"], channel_axis=0)
    with pytest.raises(InvalidArgumentError, match="has 2"):
        emclip.segment(img, "edema", m, channels=["flair"], channel_axis=0)


def test_channels_with_a_model_without_fusion():
    from emclip.factory import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = create_model("tiny").eval()
    img = np.random.default_rng(1).random((40, 48, 2)).astype(np.float32)
    with pytest.raises(InvalidArgumentError, match="no modality fusion.*pick one"):
        emclip.segment(img, "edema", m, channels=["flair", "t1ce"])
    one = emclip.segment(img[..., :1], "edema", m, channels=["flair"])
    grey = emclip.segment(img[..., 0], "edema", m)
    assert np.allclose(one.probabilities, grey.probabilities)


def test_fusion_config_round_trip_and_validation():
    cfg = load_config("tiny", {"fusion.enabled": True, "fusion.gate": "image", "fusion.stem_channels": 8})
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fusion.gate == "image" and again.fusion.shared_stems == {"t1ce": "t1"}
    assert load_config("tiny").fusion.enabled is False
    with pytest.raises(ConfigError, match="fusion.gate"):
        load_config("tiny", {"fusion.gate": "voxel"})
    with pytest.raises(ConfigError, match="shared_stems"):
        load_config("tiny", {"fusion.shared_stems": {"t1ce": "pd"}})
    with pytest.raises(ConfigError, match="unknown config key 'fusion.stems'"):
        load_config("tiny", {"fusion.stems": 3})
    with pytest.raises(ConfigError, match="arch 'emclip'"):
        load_config("unet-tiny", {"fusion.enabled": True})


def test_fusion_checkpoint_round_trip(tmp_path):
    from emclip.checkpoint import load_checkpoint, save_checkpoint

    m = _tiny_fusion_model()
    with torch.no_grad():
        m.fusion.proj.weight.normal_()
    save_checkpoint(m, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    assert back.sequences == SEQS
    assert torch.equal(back.fusion.proj.weight, m.fusion.proj.weight)


def _write_volume_dataset(root, channels=("flair", "t1ce")):
    import nibabel as nib

    root.mkdir()
    (root / "dataset.yaml").write_text(
        "modality: brain MRI\nchannels: [" + ", ".join(channels) + "]\nstructures:\n  whole tumour: [1, 2]\n  edema: [2]\n"
    )
    rng = np.random.default_rng(0)
    for case in ("c1", "c2"):
        (root / case).mkdir()
        seg = np.zeros((12, 14, 5), np.uint8)
        seg[3:7, 4:9, 1:4] = 1
        seg[4:6, 5:7, 2] = 2
        for k, ch in enumerate(channels):
            vol = rng.normal(size=(12, 14, 5)).astype(np.float32) * (10 ** k) + 100 * k
            vol[0] = -5  # constant background row
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / case / f"{case}_{ch}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(root / case / f"{case}_seg.nii.gz"))


def test_multi_sequence_volume_dataset_and_training_samples(tmp_path):
    from emclip.data.folder import open_dataset
    from emclip.data.training import PromptedDataset, Source, collate
    from emclip.errors import ConfigError

    _write_volume_dataset(tmp_path / "brain")
    ds = open_dataset(tmp_path / "brain", channel="all", axis=2)
    assert len(ds) == 10 and ds.subset([0]).channels == ("flair", "t1ce")
    s = ds[2]
    assert s.image.shape == (12, 14, 2) and s.channels == ("flair", "t1ce")
    assert s.image.min() >= 0 and s.image.max() <= 1 and s.image[0].max() == 0  # background -> 0 per sequence
    pd = PromptedDataset([Source(ds, list(range(len(ds))))], 32, (0.5,) * 3, (0.5,) * 3, train=True, sequences=SEQS)
    item = pd[2]
    assert item["image"].shape == (4, 32, 32)
    assert item["image"][[1, 3]].abs().max() == 0 and item["image"][[0, 2]].amax() > 0  # t1, t2 absent
    batch = collate([pd[0], pd[2]])
    m = _tiny_fusion_model()
    out = m.predict_logits(torch.nn.functional.interpolate(batch["image"], size=64), batch["prompts"], "brain MRI")
    assert out.logits.shape[:2] == (2, 2)
    grey = PromptedDataset([Source(ds, [0])], 32, (0.5,) * 3, (0.5,) * 3, train=False)
    with pytest.raises(ConfigError, match="channel: all"):
        grey[0]


def test_unseen_sequences_are_left_out_at_inference_unless_configured():
    from emclip.inference.channels import UnseenSequenceWarning

    m = _tiny_fusion_model()
    f = m.fusion
    assert not bool(f.seen.any())
    x = torch.zeros(2, 4, 64, 64)
    x[:, 0], x[:, 2] = torch.rand(2, 64, 64), torch.rand(2, 64, 64)  # flair + t1ce
    f.train()
    f(torch.zeros(1, 4, 64, 64))  # a blank slice marks nothing as seen
    assert not bool(f.seen.any())
    f(x)
    assert f.seen.tolist() == [True, False, True, False]  # recorded in training only
    f.eval()
    y = torch.zeros(1, 4, 64, 64)
    y[0, 0], y[0, 1] = torch.rand(64, 64), torch.rand(64, 64)  # flair + t1 (t1 never seen)
    _, w = f(y)
    assert torch.all(w[0, 1] == 0) and torch.allclose(w[0, 0], torch.ones(64, 64))
    only_t1 = torch.zeros(1, 4, 64, 64)
    only_t1[0, 1] = torch.rand(64, 64)
    assert torch.all(f(only_t1)[1][0, 1] == 1)  # nothing else present: the unseen one is used
    f.unseen = "use"
    assert torch.all(f(y)[1][0, 1] > 0)
    f.unseen = "ignore"
    img = np.random.default_rng(2).random((40, 48, 2)).astype(np.float32)
    with pytest.warns(UnseenSequenceWarning, match=r"never saw \['t1'\]"):
        r = emclip.segment(img, "edema", m, channels=["flair", "t1"])
    assert r.info["ignored_channels"] == ["t1"]
    alone = emclip.segment(img[..., :1], "edema", m, channels=["flair"])
    assert np.allclose(r.probabilities, alone.probabilities, atol=1e-5)
