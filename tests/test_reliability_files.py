"""Reliability with untrusted and interrupted files: checkpoints, checksums, atomic writes.

- A pickle checkpoint is refused unless ``trust_pickle=True`` (CLI ``--trust-pickle``), and the
  refusal says why. The test pickle creates a file when unpickled: the file must never appear
  (and does appear with the flag, which shows the payload is live).
- Truncated or bit-flipped safetensors, a config naming an unknown architecture, weights that do
  not match the config, a newer format: one :class:`CheckpointError` each.
- The bundled model is verified against its ``checksums.json`` (which it must have).
- Every writer of the core writes a temporary file and renames it: a crash part-way (an
  exception, Ctrl-C, or SIGKILL of the process) leaves the previous file intact.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import emclip
import numpy as np
import pytest
import torch
from emclip.checkpoint import load_checkpoint, save_checkpoint
from emclip.errors import CheckpointError, UntrustedCheckpointError
from emclip.inference import model_loading

sys.path.insert(0, str(Path(__file__).parent))
import _reliability_writers as writers  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@pytest.fixture(scope="module")
def counts(reliability_counts):
    for key in ("crashes", "lost edits", "pickle payloads executed without the trust flag"):
        reliability_counts[key] += 0
    return reliability_counts


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory) -> Path:
    """A good checkpoint folder of the tiny model (copy it before damaging it)."""
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("good") / "tiny")


def _copy(saved: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(saved, tmp_path / name))


# --------------------------------------------------------------------------- pickle


class Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"config": {"arch": "emclip", "name": "tiny"}, "state_dict": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_checkpoints_are_refused_and_never_unpickled(counts, tmp_path, suffix):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _evil(tmp_path / f"model{suffix}", marker)
    image = np.zeros((32, 32), np.uint8)
    for attempt in (
        lambda: load_checkpoint(evil),
        lambda: emclip.load_model(evil, "cpu"),
        lambda: emclip.segment(image, "a", evil),
    ):
        counts["checkpoints: untrusted pickles: inputs tried"] += 1
        with pytest.raises(UntrustedCheckpointError) as info:
            attempt()
        message = str(info.value)
        assert (
            "arbitrary code" in message
            and "trust_pickle=True" in message
            and "--trust-pickle" in message
        )
        if marker.exists():
            counts["pickle payloads executed without the trust flag"] += 1
        assert not marker.exists(), "the pickle was unpickled"
    # the payload is live: with the explicit flag it runs (then the file is refused as no model)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil, trust_pickle=True)
    assert marker.exists()


def test_disguised_pickles_are_never_unpickled(counts, saved, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    only = tmp_path / "folder_with_a_pickle"
    only.mkdir()
    _evil(only / "weights.pth", marker)
    fake = _copy(saved, tmp_path, "fake_safetensors")
    _evil(fake / "model.safetensors", marker)
    (fake / "checksums.json").unlink()
    named = {ext: _evil(tmp_path / f"evil{ext}", marker) for ext in (".pkl", ".pickle", ".tar", "")}
    cases = [(only, UntrustedCheckpointError), (fake, CheckpointError)]
    cases += [(p, CheckpointError) for p in named.values()]
    for path, error in cases:
        counts["checkpoints: untrusted pickles: inputs tried"] += 1
        with pytest.raises(error):
            emclip.load_model(path, "cpu", cache=False)
        assert not marker.exists(), f"{path.name} was unpickled"


def test_cli_refuses_a_pickle_model_in_one_line(counts, tmp_path):
    from PIL import Image

    marker = tmp_path / "PAYLOAD_RAN"
    evil = _evil(tmp_path / "downloaded.ckpt", marker)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emclip.cli.main",
            "segment",
            str(tmp_path / "x.png"),
            "-p",
            "optic cup",
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(evil),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=180,
    )
    counts["checkpoints: untrusted pickles: inputs tried"] += 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("emclip: error: ")
    assert "pickle" in lines[0] and "--trust-pickle" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
    from emclip.cli.main import main

    assert main(["evaluate", "--model", str(evil), "--data", str(tmp_path), "--quiet"]) == 2
    assert not marker.exists()


# --------------------------------------------------------------------------- damaged checkpoints


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    # name: (damage(folder), keep checksums.json?, words in the error)
    "absurd sizes in config.json, no checksums": (
        lambda f: _edit_config(f, **{"em.num_bases": 10**9}),
        False,
        "far too large",
    ),
    "truncated weights, checksums present": (
        lambda f: _truncate(f / "model.safetensors"),
        True,
        "checksum",
    ),
    "truncated weights, no checksums": (
        lambda f: _truncate(f / "model.safetensors"),
        False,
        "truncated or corrupt",
    ),
    "bit-flipped weights": (
        lambda f: _flip(f / "model.safetensors", -100),
        True,
        "checksum mismatch",
    ),
    "bit-flipped header, no checksums": (
        lambda f: _flip(f / "model.safetensors", 12),
        False,
        "corrupt",
    ),
    "empty weights file": (lambda f: (f / "model.safetensors").write_bytes(b""), False, "corrupt"),
    "weights file missing": (
        lambda f: (f / "model.safetensors").unlink(),
        False,
        "model.safetensors is missing",
    ),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), False, "not valid JSON"),
    "config edited, checksums present": (lambda f: _edit_config(f, name="other"), True, "checksum"),
    "unknown architecture": (
        lambda f: _edit_config(f, arch="transformer9000"),
        False,
        "transformer9000",
    ),
    "weights do not match the config": (
        lambda f: _edit_config(f, **{"em.num_bases": 4}),
        False,
        "do not match",
    ),
    "newer format": (lambda f: _edit_config(f, format_version=99), False, "upgrade emclip"),
    "checksums file garbage": (
        lambda f: (f / "checksums.json").write_text("[1, 2]"),
        True,
        "checksum",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_each_damaged_checkpoint_gives_one_clear_error(counts, saved, tmp_path, case):
    damage, keep_sums, words = DAMAGE[case]
    folder = _copy(saved, tmp_path)
    if not keep_sums:
        (folder / "checksums.json").unlink()
    damage(folder)
    counts["checkpoints: damaged: inputs tried"] += 1
    with pytest.raises(CheckpointError, match=words) as info:
        emclip.load_model(folder, "cpu", cache=False)
    assert str(info.value).strip()
    # the command line: exit 2, one line, nothing written
    from contextlib import redirect_stderr

    from emclip.cli.main import main
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(
            [
                "segment",
                str(tmp_path / "x.png"),
                "-p",
                "a",
                "-o",
                str(tmp_path / "o"),
                "--model",
                str(folder),
            ]
        )
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("emclip: error: "), err.getvalue()
    assert words in lines[0] and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "key, value",
    [("em.num_bases", 10**9), ("decoder.channels", 10**8), ("image_size", 2**40), ("em.iterations", 10**7)],
)
def test_a_config_with_absurd_sizes_is_a_checkpoint_error(counts, saved, tmp_path, key, value):
    folder = _copy(saved, tmp_path)
    (folder / "checksums.json").unlink()
    _edit_config(folder, **{key: value})
    counts["checkpoints: damaged: inputs tried"] += 1
    with pytest.raises(CheckpointError, match=rf"{key}={value} is far too large"):
        load_checkpoint(folder)


def test_a_network_the_allocator_refuses_is_a_checkpoint_error(counts, saved, tmp_path, monkeypatch):
    """Sizes inside free-form sections (vision_cfg) are not bounded by the config: an allocation
    failure while building is still one CheckpointError naming the folder."""
    import emclip.factory

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(emclip.factory, "build_model", refuse)
    counts["checkpoints: damaged: inputs tried"] += 1
    with pytest.raises(CheckpointError, match="cannot be built") as info:
        load_checkpoint(saved)
    assert str(saved) in str(info.value) and "save the checkpoint again" in str(info.value)


def test_checksums_cannot_point_outside_the_checkpoint(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the checkpoint")
    sums = json.loads((folder / "checksums.json").read_text())
    import hashlib

    sums["files"]["../secret.txt"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    (folder / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(folder)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_saved_checkpoint_is_readable_by_others_as_the_umask_allows(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_checkpoint(tiny_model, tmp_path / "shared")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- the bundled model


def test_the_bundled_model_is_verified_against_its_checksums(counts, saved, tmp_path, monkeypatch):
    bundled = _copy(saved, tmp_path, "default")
    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", bundled)
    model_loading.clear_model_cache()
    try:
        assert emclip.load_model(None, "cpu").config.name == "tiny"
        model_loading.clear_model_cache()
        _flip(bundled / "model.safetensors", -64)  # one corrupted byte in the weights
        counts["checkpoints: damaged: inputs tried"] += 1
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            emclip.load_model(None, "cpu")
        shutil.copy(saved / "model.safetensors", bundled / "model.safetensors")
        (bundled / "checksums.json").unlink()  # an unverifiable bundled model is refused
        counts["checkpoints: damaged: inputs tried"] += 1
        with pytest.raises(CheckpointError, match="checksums.json.*reinstall"):
            emclip.load_model(None, "cpu")
    finally:
        model_loading.clear_model_cache()


def test_the_installed_bundled_model_passes_its_checksums(counts):
    from emclip.checkpoint import verify_checksums

    folder = model_loading.DEFAULT_MODEL_DIR
    if not (folder / "config.json").is_file():
        pytest.skip(f"no bundled model installed at {folder}")
    listed = json.loads((folder / "checksums.json").read_text())["files"]
    on_disk = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "checksums.json"
    }
    assert set(listed) == on_disk, "a bundled file is not covered by checksums.json"
    verify_checksums(folder)  # raises CheckpointError on any mismatch
    counts["bundled model files verified"] += len(listed)


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mode", ["full disk", "ctrl-c"])
@pytest.mark.parametrize("name", list(writers.WRITERS))
def test_a_write_that_fails_half_way_leaves_the_old_file(counts, tmp_path, monkeypatch, name, mode):
    write, check, target, _ = writers.WRITERS[name]
    path = writers.target_path(tmp_path, name)
    write(path, 1)
    before, files_before = writers.snapshot(path), sorted(tmp_path.rglob("*"))
    with monkeypatch.context() as mp:
        mp.setattr(*writers.broken(target, mode))
        with pytest.raises(KeyboardInterrupt if mode == "ctrl-c" else OSError):
            write(path, 2)
    counts["writers: failed half way (disk full, Ctrl-C): inputs tried"] += 1
    counts["edit-protection checks"] += 1
    if writers.snapshot(path) != before:
        counts["lost edits"] += 1
    assert writers.snapshot(path) == before, "the previous file was changed"
    check(path, 1)
    assert sorted(tmp_path.rglob("*")) == files_before, "temporary files were left behind"
    write(path, 3)  # and the next write works
    check(path, 3)


KILLED = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import _reliability_writers as w
setattr(*w.broken({target!r}, "sigkill"))
w.WRITERS[{name!r}][0](Path({path!r}), 2)
print("NOT KILLED")
"""


@pytest.mark.parametrize("name", list(writers.WRITERS))
def test_a_process_killed_while_writing_leaves_the_old_file(counts, tmp_path, name):
    write, check, target, _ = writers.WRITERS[name]
    path = writers.target_path(tmp_path, name)
    write(path, 1)
    before = writers.snapshot(path)
    code = KILLED.format(tests=str(Path(__file__).parent), target=target, name=name, path=str(path))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=240
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-2000:]
    counts["writers: process SIGKILLed mid-write: inputs tried"] += 1
    counts["edit-protection checks"] += 1
    if writers.snapshot(path) != before:
        counts["lost edits"] += 1
    assert writers.snapshot(path) == before, "the previous file was changed"
    check(path, 1)
    # all a kill can leave is a hidden temporary file or folder next to the target
    assert all(p == path or p.name.startswith(".") for p in tmp_path.iterdir())


def _failing_replace(monkeypatch, first_failure: int, error: BaseException, later: BaseException | None):
    """Make ``os.replace`` raise ``error`` at call ``first_failure`` (1-based) and ``later`` (if
    given) at every call after it, as a process that died there would: nothing runs after."""
    import emclip.checkpoint as ck

    calls = {"n": 0}
    real_replace = os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == first_failure:
            raise error
        if calls["n"] > first_failure and later is not None:
            raise later
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    return calls


def test_replacing_a_checkpoint_never_leaves_the_path_empty(counts, tmp_path, monkeypatch):
    """Ctrl-C between moving the old folder out and the new one in: the old one is moved back."""
    folder = tmp_path / "ckpt"
    writers.checkpoint(folder, 1)
    before = writers.snapshot(folder)
    _failing_replace(monkeypatch, 2, KeyboardInterrupt(), None)
    with pytest.raises(KeyboardInterrupt):
        writers.checkpoint(folder, 2)
    monkeypatch.undo()
    counts["writers: failed half way (disk full, Ctrl-C): inputs tried"] += 1
    counts["edit-protection checks"] += 1
    if writers.snapshot(folder) != before:
        counts["lost edits"] += 1
    assert writers.snapshot(folder) == before
    writers.check_checkpoint(folder, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "temporary folders were left behind"


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_crash_at_any_rename_of_a_replace_leaves_a_loadable_checkpoint(counts, tmp_path, monkeypatch, step):
    """A crash that leaves no chance to clean up (every later rename fails too, as after a
    SIGKILL) at each rename of the swap: loading the path gives the old or the new checkpoint,
    restoring the old one from its hidden sibling when the crash came between the renames."""
    folder = tmp_path / "ckpt"
    writers.checkpoint(folder, 1)
    calls = _failing_replace(monkeypatch, step, OSError(5, "Input/output error"), OSError(5, "gone"))
    try:
        writers.checkpoint(folder, 2)
    except OSError:
        pass
    monkeypatch.undo()
    counts["writers: failed half way (disk full, Ctrl-C): inputs tried"] += 1
    saved_renames = 2  # moving the old folder out, moving the new one in
    if step > saved_renames:  # the save finished before the failing call
        assert calls["n"] == saved_renames
        writers.check_checkpoint(folder, 2)
        return
    if step == 2:  # the crash left the path empty: the load restores the old checkpoint
        assert not folder.exists()
        with pytest.warns(UserWarning, match="restored"):
            writers.check_checkpoint(folder, 1)
    else:
        writers.check_checkpoint(folder, 1)
    assert folder.is_dir()
    writers.check_checkpoint(folder, 1)  # restored for good, no warning needed any more
    writers.checkpoint(folder, 3)  # and the next save works as usual
    writers.check_checkpoint(folder, 3)


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import _reliability_writers as w
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the old folder is out, the new one not yet in
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
w.checkpoint(Path({path!r}), 2)
print("NOT KILLED")
"""


def test_a_process_killed_between_the_renames_of_a_replace_loses_nothing(counts, tmp_path):
    folder = tmp_path / "ckpt"
    writers.checkpoint(folder, 1)
    before = writers.snapshot(folder)
    code = KILLED_BETWEEN_RENAMES.format(tests=str(Path(__file__).parent), path=str(folder))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-2000:]
    counts["writers: process SIGKILLed mid-write: inputs tried"] += 1
    assert not folder.exists()  # killed in the window the old code lost the checkpoint in
    with pytest.warns(UserWarning, match="restored"):
        writers.check_checkpoint(folder, 1)
    counts["edit-protection checks"] += 1
    if writers.snapshot(folder) != before:
        counts["lost edits"] += 1
    assert writers.snapshot(folder) == before
    assert all(p == folder or p.name.startswith(".") for p in tmp_path.iterdir())


def test_load_model_finds_a_checkpoint_a_killed_replace_left_hidden(counts, saved, tmp_path):
    """The widget and CLI go through load_model, which checks the path first: it must recover too."""
    folder = tmp_path / "ckpt"
    hidden = tmp_path / ".ckpt.old-123-abcd"
    shutil.copytree(saved, hidden)  # the state a SIGKILL between the two renames leaves
    model_loading.clear_model_cache()
    with pytest.warns(UserWarning, match="restored"):
        net = emclip.load_model(folder, device="cpu")
    counts["edit-protection checks"] += 1
    assert folder.is_dir() and not hidden.exists()
    assert net.config.to_dict() == load_checkpoint(saved).config.to_dict()
