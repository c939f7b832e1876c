"""Semi-supervised training: unlabelled images, labelled-patient fraction, EMA teacher,
confidence-filtered pseudo-label loss, and exact resume of the teacher."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from emclip.errors import Cancelled, ConfigError, DatasetError

# --------------------------------------------------------------------------- synthetic data


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _cardiac_toy(root: Path, n_patients: int = 6, per_patient: int = 3, unlabelled: int = 0, seed: int = 0) -> Path:
    """Disc-in-ring toy slices grouped by patient (meta.csv ``patient``); the last ``unlabelled``
    images get no mask file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "dataset.yaml").write_text(
        "modality: cardiac cine MRI (bSSFP)\nstructures:\n  left ventricle: [2]\n  myocardium: [1]\n")
    yy, xx = np.mgrid[:48, :48]
    rows = ["id,patient"]
    n = n_patients * per_patient
    for i in range(n):
        cy, cx = rng.integers(16, 32, size=2)
        r = np.hypot(yy - cy, xx - cx)
        lab = np.where(r < 6, 2, np.where(r < 12, 1, 0)).astype(np.uint8)
        img = np.clip(rng.normal(40, 10, (48, 48)) + 80 * (lab >= 1) + 60 * (lab == 2), 0, 255).astype(np.uint8)
        _png(root / "images" / f"s{i:02d}.png", img)
        if i < n - unlabelled:
            _png(root / "masks" / f"s{i:02d}.png", lab)
        rows.append(f"s{i:02d},p{i // per_patient}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semi")
    _cardiac_toy(root / "cardiac", n_patients=8, per_patient=3)
    return root


def semi_config(root: Path, out: Path, **extra) -> dict:
    cfg = {
        "model": "tiny",
        "data_root": str(root),
        "train": [{"path": "cardiac", "split": "train", "labelled_fraction": 0.5, "labelled_seed": 3, "repeat": 2}],
        "val": [{"path": "cardiac", "split": "val"}],
        "split": {"val_fraction": 0.15, "test_fraction": 0.0},
        "batch_size": 2,
        "epochs": 2,
        "steps_per_epoch": 2,
        "log_every": 1,
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "prompts": {"cross_negatives": 0},
        "semi_supervised": {"enabled": True, "ema_decay": 0.9, "confidence": 0.6, "rampup_fraction": 0.5,
                            "unlabelled_batch_size": 2},
        "evaluate_at_end": False,
        "out_dir": str(out),
    }
    cfg.update(extra)
    return cfg


# --------------------------------------------------------------------------- data


def test_images_without_masks_load_as_unlabelled(tmp_path):
    from emclip.data.folder import open_dataset
    from emclip.data.training import Source
    from emclip.data.unlabelled import UnlabelledDataset, collate_unlabelled, select_labelled

    root = _cardiac_toy(tmp_path / "d", n_patients=2, per_patient=3, unlabelled=2)
    with pytest.raises(DatasetError, match="no mask"):
        open_dataset(root)
    ds = open_dataset(root, allow_unlabelled=True)
    assert len(ds) == 6 and [ds.has_mask(i) for i in range(6)] == [True] * 4 + [False] * 2
    s = ds[5]
    assert s.labels is None and s.image.shape == (48, 48)
    assert ds[0].labels.shape == (48, 48)
    lab, unl = select_labelled(ds, list(range(6)), 1.0)
    assert lab == [0, 1, 2, 3] and unl == [4, 5]  # images without masks are never labelled

    uds = UnlabelledDataset([Source(ds, unl)], 32, (0.5,) * 3, (0.5,) * 3, seed=1, cutout_p=1.0)
    item = uds[0]
    assert item["image"].shape == item["image_weak"].shape == (3, 32, 32)
    assert item["targets"].shape == (2, 32, 32) and item["prompts"] == ["left ventricle", "myocardium"]
    assert not torch.equal(item["image"], item["image_weak"])  # strong view differs (cutout always on)
    # same geometry: without the photometric part the strong view is the weak view exactly
    uds.strong = None
    item = uds[0]
    torch.testing.assert_close(item["image"], item["image_weak"])
    batch = collate_unlabelled([uds[0], uds[1]])
    assert batch["image_weak"].shape == (2, 3, 32, 32) and batch["prompt_mask"].all()


class _Groups:
    def __init__(self, groups):
        self.groups = groups

    def group_of(self, i):
        return self.groups[i]


def test_labelled_fraction_selects_whole_patients_deterministically():
    from emclip.data.unlabelled import select_labelled

    groups = [f"p{k:02d}" for k in range(20) for _ in range(4)]  # 20 patients x 4 slices
    ds = _Groups(groups)
    idx = list(range(len(groups)))
    lab, unl = select_labelled(ds, idx, 0.1, seed=7)
    assert sorted(lab + unl) == idx and not set(lab) & set(unl)
    chosen = {groups[i] for i in lab}
    assert len(chosen) == 2  # round(0.1 * 20) whole patients
    assert all(groups[i] not in chosen for i in unl)  # no patient is split
    assert select_labelled(ds, idx, 0.1, seed=7) == (lab, unl)  # deterministic
    seeds = {tuple(select_labelled(ds, idx, 0.1, seed=s)[0]) for s in range(6)}
    assert len(seeds) > 1  # the seed matters
    assert len({groups[i] for i in select_labelled(ds, idx, 0.01, seed=7)[0]}) == 1  # at least one patient
    with pytest.raises(ConfigError):
        select_labelled(ds, idx, 0.0)


def test_supervised_and_semi_runs_share_the_labelled_patients(toy, tmp_path):
    from emclip.train.config import load_train_config
    from emclip.train.trainer import open_train_sources

    semi = load_train_config(semi_config(toy, tmp_path / "a"))
    sup = load_train_config(semi_config(toy, tmp_path / "b", semi_supervised={"enabled": False}))
    lab_s, unl_s = open_train_sources(semi)
    lab_p, unl_p = open_train_sources(sup)
    assert lab_s[0].indices == lab_p[0].indices and unl_p == []
    groups = {lab_s[0].dataset.group_of(i) for i in lab_s[0].indices}
    ugroups = {unl_s[0].dataset.group_of(i) for i in unl_s[0].indices}
    assert groups and ugroups and not groups & ugroups
    with pytest.raises(ConfigError, match="training entries only"):
        load_train_config(semi_config(toy, tmp_path / "c", val=[{"path": "cardiac", "split": "val",
                                                                  "labelled_fraction": 0.5}]))
    with pytest.raises(ConfigError, match="no unlabelled images"):
        open_train_sources(load_train_config(semi_config(toy, tmp_path / "d", train=[{"path": "cardiac"}])))


# --------------------------------------------------------------------------- teacher and loss


def test_ema_teacher_update_is_the_moving_average():
    from emclip.train.semi import EMATeacher

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    student[2].weight.requires_grad_(False)  # a frozen parameter
    teacher = EMATeacher(student, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    student.train()
    student(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    d = teacher.update(student, step=0)
    assert d == 0.9
    after, s = teacher.module.state_dict(), student.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var", "2.bias"):
        torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * s[name])
    for name in ("0.weight", "1.weight", "1.running_mean", "2.bias"):  # these moved: the teacher lags
        assert not torch.allclose(after[name], s[name]) and not torch.allclose(after[name], before[name])
    assert int(after["1.num_batches_tracked"]) == 1  # integer buffers are copied
    torch.testing.assert_close(after["2.weight"], s["2.weight"])  # frozen: stays equal
    assert not any(p.requires_grad for p in teacher.module.parameters())
    warm = EMATeacher(student, decay=0.99, warmup=True)
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10_000) == 0.99
    # state round trip
    other = EMATeacher(student, decay=0.9, warmup=False)
    other.load_state_dict(teacher.state_dict())
    for k, v in teacher.module.state_dict().items():
        torch.testing.assert_close(other.module.state_dict()[k], v)


def test_pseudo_label_loss_ignores_low_confidence_pixels():
    from emclip.train.semi import confident_mask, pseudo_label_loss, rampup_weight

    torch.manual_seed(0)
    q = torch.rand(2, 3, 8, 8)
    q[0, 0, :4] = 0.97  # confident foreground rows
    q[1, 2] = 0.5  # prompt with no confident pixel at all
    pmask = torch.tensor([[True, True, True], [True, True, False]])
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss, parts = pseudo_label_loss(logits, q, pmask, confidence=0.9)
    loss.backward()
    conf = confident_mask(q, 0.9)
    assert conf.any() and (~conf).any()
    g = logits.grad
    assert torch.all(g[~conf] == 0)  # unconfident pixels give no gradient
    assert torch.all(g[conf & pmask[..., None, None]] != 0)
    assert torch.all(g[1, 2] == 0)  # padded prompt
    assert torch.all(g[0, 0, :4] < 0)  # confident foreground pulls logits up
    # changing the student only where the teacher is unsure leaves the loss unchanged
    changed = logits.detach().clone()
    changed[~conf] = 50.0
    torch.testing.assert_close(pseudo_label_loss(changed, q, pmask, 0.9)[0], loss.detach())
    changed[0, 0, 0, 0] = -50.0  # a confident foreground pixel predicted as background
    assert pseudo_label_loss(changed, q, pmask, 0.9)[0] > loss.detach()
    frac = (conf[0].float().mean((1, 2)).sum() + conf[1, :2].float().mean((1, 2)).sum()).item() / 5  # 5 real prompts
    assert parts["confident"].item() == pytest.approx(frac, rel=1e-5)
    # ramp-up: 0 -> weight
    from emclip.train.semi import SemiSupervisedConfig

    c = SemiSupervisedConfig(weight=2.0, rampup_fraction=0.5)
    assert rampup_weight(0, 100, c) == pytest.approx(2 * np.exp(-5)) and rampup_weight(50, 100, c) == 2.0
    with pytest.raises(ConfigError):
        SemiSupervisedConfig(confidence=0.3)


# --------------------------------------------------------------------------- training


def _teacher_of(out: Path) -> dict[str, torch.Tensor]:
    from emclip.train.state import load_state

    rec = json.loads((out / "last.json").read_text())
    return load_state(out / rec["path"])["teacher"]


def test_semi_run_logs_selects_the_teacher_and_resume_restores_it(toy, tmp_path):
    from emclip.train.trainer import train

    full = tmp_path / "full"
    result = train(semi_config(toy, full, keep_checkpoints=2))
    assert result.steps_done == 4
    rows = list(csv.DictReader((full / "log.csv").open()))
    assert float(rows[0]["unsup_weight"]) < float(rows[-1]["unsup_weight"])
    assert all(0 <= float(r["confident_fraction"]) <= 1 and r["unsup_loss"] for r in rows)
    val = list(csv.DictReader((full / "val.csv").open()))
    assert [r["selected"] for r in val] == ["teacher", "teacher"]
    assert all(r["val_dice"] == r["val_dice_teacher"] for r in val)
    teacher = _teacher_of(full)
    from emclip.train.state import load_state
    from safetensors.torch import load_file

    best = load_file(str(full / "best" / "model.safetensors"))
    scores = [float(r["val_dice"]) for r in val]
    best_epoch = scores.index(max(scores)) + 1
    ck = full / "checkpoints" / f"epoch_{best_epoch:04d}"
    best_teacher, student = load_state(ck)["teacher"], load_file(str(ck / "model.safetensors"))
    name = next(k for k in teacher if k.startswith("decoder.") and teacher[k].is_floating_point())
    assert not torch.equal(best_teacher[name], student[name])  # the teacher is not the student
    for k in best_teacher:
        torch.testing.assert_close(best[k], best_teacher[k])  # best/ holds the teacher of the best epoch

    # stopped after epoch 1, then resumed: teacher and student end exactly as in one run
    part = tmp_path / "part"
    steps: list[int] = []
    with pytest.raises(Cancelled):
        train(semi_config(toy, part), progress=lambda d, t: steps.append(d), cancel=lambda: bool(steps) and steps[-1] >= 3)
    assert json.loads((part / "last.json").read_text())["epoch"] == 1
    train(semi_config(toy, part), resume=True)
    resumed = _teacher_of(part)
    assert resumed.keys() == teacher.keys()
    for k in teacher:
        torch.testing.assert_close(resumed[k], teacher[k], rtol=1e-5, atol=1e-6)
    a = [float(r["unsup_loss"]) for r in rows]
    b = [float(r["unsup_loss"]) for r in csv.DictReader((part / "log.csv").open())]
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_semi_presets_match_their_supervised_twins():
    from emclip.train.config import load_train_config

    base = load_train_config("cardiac_acdc_sup_100pct")
    assert not base.semi_supervised.enabled and base.train[0].labelled_fraction == 1.0
    for pct, fraction in (("1pct", 0.01), ("5pct", 0.05)):
        semi, sup = load_train_config(f"cardiac_acdc_semi_{pct}"), load_train_config(f"cardiac_acdc_sup_{pct}")
        assert semi.semi_supervised.enabled and not sup.semi_supervised.enabled
        assert semi.train == sup.train and semi.train[0].labelled_fraction == fraction
        for key in ("model", "pretrained", "image_size", "batch_size", "epochs", "steps_per_epoch", "optim", "augment",
                    "loss", "split", "seed", "val", "test"):
            assert getattr(semi, key) == getattr(sup, key) == getattr(base, key), (pct, key)
        assert [e.path for e in semi.test] == ["cardiac/acdc", "cardiac/mscmr_lge"]
