"""Training: configs, losses, a real short run, exact resume after SIGKILL, DDP (gloo, 2 ranks), cancel."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from emclip.errors import Cancelled, ConfigError
from emclip.train.config import apply_overrides, list_presets, load_train_config
from emclip.train.losses import LossConfig, segmentation_loss, soft_dice_loss

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --------------------------------------------------------------------------- synthetic data


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _toy(root: Path, kind: str, n: int, seed: int) -> Path:
    """Learnable toy data: a bright disc (value 1) with a brighter core (value 2) on noise."""
    rng = np.random.default_rng(seed)
    if kind == "fundus":
        yaml_text = "modality: colour fundus photograph\nstructures:\n  optic disc: [1, 2]\n  optic cup: [2]\n"
        hw, rgb = (48, 64), True
    else:
        yaml_text = "modality: cardiac cine MRI (bSSFP)\nstructures:\n  left ventricle: [2]\n  myocardium: [1]\n"
        hw, rgb = (56, 48), False
    root.mkdir(parents=True)
    (root / "dataset.yaml").write_text(yaml_text)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    rows = ["id,official_split"]
    for i in range(n):
        cy, cx = rng.integers(16, hw[0] - 16), rng.integers(16, hw[1] - 16)
        r = np.hypot(yy - cy, xx - cx)
        lab = np.where(r < 6, 2, np.where(r < 12, 1, 0)).astype(np.uint8)
        img = rng.normal(40, 10, hw) + 80 * (lab >= 1) + 60 * (lab == 2)
        img = np.clip(img, 0, 255).astype(np.uint8)
        if rgb:
            img = np.stack([img, (img * 0.6).astype(np.uint8), (img * 0.3).astype(np.uint8)], -1)
        _png(root / "images" / f"{kind}{i:02d}.png", img)
        _png(root / "masks" / f"{kind}{i:02d}.png", lab)
        rows.append(f"{kind}{i:02d},{'test' if i >= n - 2 else 'train'}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    _toy(root / "fundus", "fundus", 10, 0)
    _toy(root / "cardiac", "cardiac", 10, 1)
    return root


def toy_config(root: Path, out: Path, **extra) -> dict:
    cfg = {
        "model": "tiny",
        "data_root": str(root),
        "train": [{"path": "fundus", "split": "train"}, {"path": "cardiac", "split": "train"}],
        "val": [{"path": "fundus", "split": "val"}, {"path": "cardiac", "split": "val"}],
        "batch_size": 4,
        "epochs": 3,
        "steps_per_epoch": 3,
        "log_every": 1,
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "augment": {"strength": "default", "style_mix_p": 0.5},
        "split": {"val_fraction": 0.15},
        "evaluate_at_end": False,
        "out_dir": str(out),
    }
    cfg.update(extra)
    return cfg


def read_log(out: Path) -> list[dict[str, str]]:
    with (out / "log.csv").open() as fh:
        return list(csv.DictReader(fh))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    rec = json.loads((out / "last.json").read_text())
    return load_file(str(out / rec["path"] / "model.safetensors"))


# --------------------------------------------------------------------------- losses


def test_loss_masks_padding_and_rewards_correct_masks():
    t = torch.zeros(2, 3, 8, 8)
    t[0, 0, 2:6, 2:6] = 1
    good = torch.where(t > 0, 20.0, -20.0)
    bad = -good
    mask = torch.tensor([[True, True, False], [True, False, False]])
    lg, _ = segmentation_loss(good, t, mask)
    lb, parts = segmentation_loss(bad, t, mask)
    assert lg.item() < 0.01 and lb.item() > 1.0 and set(parts) == {"bce", "dice"}
    # padded prompts do not count: garbage in padded slots changes nothing
    noisy = good.clone()
    noisy[0, 2] = 50.0
    noisy[1, 1:] = 50.0
    assert segmentation_loss(noisy, t, mask)[0].item() == pytest.approx(lg.item())
    # empty target + empty prediction scores Dice 1 thanks to the smoothing term
    assert soft_dice_loss(torch.full((1, 1, 4, 4), -30.0), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0, abs=1e-6)
    # the per-sample mean makes the global mean equal to the mean of per-rank means
    full, _ = segmentation_loss(noisy, t, mask, LossConfig())
    halves = [segmentation_loss(noisy[i : i + 1], t[i : i + 1], mask[i : i + 1])[0] for i in range(2)]
    assert full.item() == pytest.approx(float(sum(halves) / 2))


# --------------------------------------------------------------------------- configs


def test_config_overrides_extends_and_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: tiny\ntrain:\n  - {path: a}\n  - {path: b, repeat: 2}\noptim: {lr: 0.1, encoder_lr: 0.01}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\noptim: {lr: 0.5}\nbatch_size: 2\n")
    cfg = load_train_config(child, ["train.1.repeat=5", "optim.warmup_steps=7", "model=unet-tiny"])
    assert cfg.optim.lr == 0.5 and cfg.optim.encoder_lr == 0.01  # merged, not replaced
    assert cfg.train[1].repeat == 5 and cfg.train[1].path == "b" and cfg.optim.warmup_steps == 7
    assert cfg.model == "unet-tiny" and cfg.batch_size == 2
    with pytest.raises(ConfigError, match="batch_sise"):
        load_train_config(child, ["batch_sise=3"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_train_config(child, ["batch_size=two"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["oops"])
    with pytest.raises(ConfigError, match="no training datasets"):
        load_train_config({"model": "tiny"})
    with pytest.raises(ConfigError, match="not found"):
        load_train_config("no_such_preset")


def test_presets_load_and_unet_variants_share_the_budget():
    names = list_presets()
    assert {"default_combined", "fundus_drishti_sdg", "cardiac_acdc_sdg", "fundus_lodo_rimone_dl_r1"} <= set(names)
    for name in names:
        cfg = load_train_config(name)
        if name.startswith("unet_"):
            base = load_train_config(name[len("unet_"):])
            assert cfg.model == "unet-baseline" and base.model == "cpu-default"
            for key in ("batch_size", "epochs", "steps_per_epoch", "optim", "augment", "train", "test", "seed"):
                assert getattr(cfg, key) == getattr(base, key), (name, key)
    sdg = load_train_config("fundus_drishti_sdg")
    assert [e.path for e in sdg.train] == ["fundus/drishti_gs"]
    assert {e.path for e in sdg.test} >= {"fundus/rimone_dl_r1", "fundus/rimone_dl_r2"}
    card = load_train_config("cardiac_acdc_sdg")
    assert [e.path for e in card.train] == ["cardiac/acdc"] and "cardiac/mscmr_lge" in [e.path for e in card.test]
    lodo = load_train_config("fundus_lodo_rimone_dl_r1")
    assert "fundus/rimone_dl_r1" not in [e.path for e in lodo.train + lodo.val]


@pytest.mark.data
def test_preset_datasets_exist(shared_data):
    for name in list_presets():
        cfg = load_train_config(name, [f"data_root={shared_data}"])
        for e in cfg.train + cfg.val + cfg.test:
            assert (cfg.resolve_path(e) / "dataset.yaml").is_file(), (name, e.path)


def test_lr_schedule_warmup_then_cosine():
    from emclip.train.trainer import lr_factor

    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


# --------------------------------------------------------------------------- real short run


@pytest.mark.data
@pytest.mark.slow
def test_short_real_training_lowers_loss(shared_data, tmp_path):
    from emclip.train.trainer import train

    cfg = {
        "model": "tiny",
        "data_root": str(shared_data),
        "train": [{"path": "fundus/drishti_gs", "limit": 6, "repeat": 8}, {"path": "cardiac/acdc", "limit": 24, "repeat": 2}],
        "batch_size": 4,
        "epochs": 1,
        "steps_per_epoch": 24,
        "log_every": 1,
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "augment": {"strength": "light", "style_mix_p": 0.0},
        "out_dir": str(tmp_path / "run"),
    }
    result = train(cfg)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.85 * first, (first, last)
    assert result.images_per_s and result.images_per_s > 0
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- resume after SIGKILL

KILLER = """
import os, signal, sys, json
from emclip.train.trainer import train
kill_at = int(sys.argv[2])
def log(rec):
    if rec.get("kind") == "train" and rec["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
train(json.loads(open(sys.argv[1]).read()), log=log)
"""


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_run(toy_root, tmp_path):
    from emclip.checkpoint import load_checkpoint
    from emclip.train.trainer import train

    full = tmp_path / "full"
    train(toy_config(toy_root, full))
    killed = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(toy_config(toy_root, killed)))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # killed in the middle of epoch 2, after the epoch-1 checkpoint and 2 more logged steps
    proc = subprocess.run([sys.executable, str(script), str(cfg_file), "5"], check=False, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((killed / "last.json").read_text())["epoch"] == 1
    assert [int(r["step"]) for r in read_log(killed)] == [1, 2, 3, 4, 5]
    load_checkpoint(killed / "checkpoints" / "epoch_0001")  # the last complete checkpoint is valid

    result = train(toy_config(toy_root, killed), resume=True)
    assert result.epochs_done == 3 and result.steps_done == 9
    a, b = read_log(full), read_log(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(i) for i in range(1, 10)]  # no lost epoch
    np.testing.assert_allclose([float(r["loss"]) for r in b], [float(r["loss"]) for r in a], rtol=1e-5)
    wa, wb = final_weights(full), final_weights(killed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    val_a = [r["val_dice"] for r in csv.DictReader((full / "val.csv").open())]
    val_b = [r["val_dice"] for r in csv.DictReader((killed / "val.csv").open())]
    assert len(val_b) == 3
    np.testing.assert_allclose(np.array(val_b, float), np.array(val_a, float), rtol=1e-5)


@pytest.mark.slow
def test_cancel_keeps_last_complete_checkpoint(toy_root, tmp_path):
    from emclip.checkpoint import load_checkpoint
    from emclip.train.trainer import train

    out = tmp_path / "run"
    steps = []

    def progress(done, total):
        steps.append(done)

    with pytest.raises(Cancelled):
        train(toy_config(toy_root, out, epochs=2, steps_per_epoch=2), progress=progress,
              cancel=lambda: len(steps) > 0 and steps[-1] >= 3)
    rec = json.loads((out / "last.json").read_text())
    assert rec["epoch"] == 1 and rec["step"] == 2
    model = load_checkpoint(out / rec["path"])
    assert model.config.name == "tiny"
    assert not list((out / "checkpoints").glob(".*tmp*"))
    cfg = toy_config(toy_root, out, epochs=2, steps_per_epoch=2)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(cfg)
    result = train(cfg, resume=True)
    assert result.epochs_done == 2 and result.steps_done == 4
    assert [r["step"] for r in read_log(out)] == ["1", "2", "3", "4"]


def test_unet_baseline_through_the_same_trainer(toy_root, tmp_path):
    from emclip.train.trainer import train

    out = tmp_path / "unet"
    result = train(toy_config(toy_root, out, model="unet-tiny", epochs=1, steps_per_epoch=2,
                              prompts={"synonym_p": 1.0, "cross_negatives": 2}))
    assert result.steps_done == 2 and (out / "best" / "model.safetensors").is_file()
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["arch"] == "unet"
    assert saved["test_time_mirror"] is True  # trained with flips (the default): mirrored at inference
    with pytest.raises(ConfigError, match="no class for"):
        bad = toy_config(toy_root, tmp_path / "bad", model="unet-tiny")
        bad["model_overrides"] = {"class_names": ["optic disc"]}
        train(bad)


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_training_without_flips_saves_a_model_that_does_not_mirror(toy_root, tmp_path):
    from emclip.inference import load_model
    from emclip.train.trainer import train

    out = tmp_path / "noflip"
    train(toy_config(toy_root, out, model="unet-tiny", epochs=1, steps_per_epoch=1, augment={"flips": False}))
    assert json.loads((out / "best" / "config.json").read_text())["test_time_mirror"] is False
    assert load_model(out / "best").config.test_time_mirror is False


def test_ddp_gloo_two_ranks_matches_single_process(toy_root, tmp_path):
    import yaml
    from emclip.train.trainer import train

    single = tmp_path / "single"
    cfg = toy_config(toy_root, single, epochs=2, steps_per_epoch=2, val=[])
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each rank with one thread
    try:
        train(cfg)
    finally:
        torch.set_num_threads(torch_threads)
    ddp_out = tmp_path / "ddp"
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(dict(cfg, out_dir=str(ddp_out))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "emclip.cli.main", "train", str(cfg_file), "--quiet"]
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_log(single), read_log(ddp_out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["1", "2", "3", "4"]
    # same global batches: the first step is the same computation split over two ranks
    assert float(b[0]["loss"]) == pytest.approx(float(a[0]["loss"]), rel=1e-5)
    np.testing.assert_allclose([float(r["loss"]) for r in b], [float(r["loss"]) for r in a], rtol=2e-3)
    wa, wb = final_weights(single), final_weights(ddp_out)
    diffs = [float((wa[k] - wb[k]).abs().max()) for k in wa if wa[k].is_floating_point()]
    assert max(diffs) < 5e-3
    # only rank 0 wrote: one log, one checkpoint folder
    assert len(list((ddp_out / "checkpoints").iterdir())) == 1
