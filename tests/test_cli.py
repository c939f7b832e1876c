"""The ``emclip`` command line (emclip.cli): registry, error policy, ``emclip segment``."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from emclip._version import __version__
from emclip.cli import main as cli_main
from emclip.cli import segment as cli_segment
from emclip.io import read_mask_tiff

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emclip.cli.main", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


@pytest.fixture()
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "fundus.png")
    tifffile.imwrite(tmp_path / "stack.tif", rng.integers(0, 4000, (5, 40, 48), dtype=np.uint16))
    return tmp_path


@pytest.fixture(autouse=True)
def _quiet_untrained_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _one_error_line(err: str, code_text: str = "emclip: error: ") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(code_text)
    return lines[0]


# ----------------------------------------------------------------------------- entry point


def test_version_does_not_import_torch():
    code = (
        "import sys\n"
        "from emclip.cli.main import main\n"
        "rc = main(['--version'])\n"
        "assert rc == 0, rc\n"
        "main(['--help'])\n"
        "heavy = [m for m in ('torch', 'open_clip', 'napari', 'cv2') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"emclip {__version__}" in out.stdout
    assert "HEAVY []" in out.stdout


def test_console_script_version():
    script = Path(sys.executable).with_name("emclip")
    if not script.exists():
        pytest.skip("the emclip console script is not installed in this environment")
    out = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == f"emclip {__version__}"


def test_registry_lists_importable_subcommands():
    assert "emclip.cli.segment" in cli_main.SUBCOMMANDS
    for name in cli_main.SUBCOMMANDS:
        module = importlib.import_module(name)
        assert callable(module.add_parser) and callable(module.run)
    parser = cli_main.build_parser()
    args = parser.parse_args(["segment", "a.png", "-p", "x", "-o", "out", "--debug"])
    assert args._run is cli_segment.run and args.debug is True
    assert parser.parse_args(["--debug", "segment", "a.png", "-p", "x", "-o", "o"]).debug is True
    assert parser.parse_args(["segment", "a.png", "-p", "x", "-o", "o"]).debug is False


def test_no_command_and_usage_errors_exit_2(capsys):
    assert cli_main.main([]) == 2
    assert "segment" in capsys.readouterr().err
    assert cli_main.main(["segment", "a.png"]) == 2  # --prompts/--out missing: argparse usage error
    assert "required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- segment


def test_segment_writes_masks_and_overlays(images, capsys):
    out = images / "out"
    rc = cli_main.main(
        [
            "segment",
            str(images / "fundus.png"),
            str(images / "stack.tif"),
            "--prompts",
            "optic disc, optic cup",
            "--out",
            str(out),
            "--model",
            "tiny",
            "--threshold",
            "0.1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "fundus_masks.tif",
        "fundus_overlay.png",
        "stack_masks.tif",
        "stack_overlay.png",
    ]
    masks = read_mask_tiff(out / "fundus_masks.tif")
    assert masks.prompts == ["optic disc", "optic cup"]
    assert masks.masks.shape == (2, 60, 80) and masks.masks.dtype == np.uint8
    assert (
        masks.metadata["threshold"] == pytest.approx(0.1)
        and masks.metadata["source"] == "fundus.png"
    )
    assert len(masks.metadata["found"]) == 2
    stack = read_mask_tiff(out / "stack_masks.tif")
    assert stack.masks.shape == (2, 5, 40, 48) and stack.metadata["axes"] == "CZYX"
    with Image.open(out / "fundus_overlay.png") as png:
        assert png.size == (80, 60) and png.mode == "RGB"
    with Image.open(out / "stack_overlay.png") as png:
        assert png.size == (48, 40)
    summary = capsys.readouterr().out
    assert "fundus.png: optic disc" in summary and "stack.tif" in summary


def test_single_object_masks_and_all_components(images, tmp_path, capsys):
    """A model listing "optic disc" as one object gives one region; --all-components keeps all."""
    import torch
    from scipy import ndimage

    import emclip

    torch.manual_seed(0)
    net = emclip.create_model("tiny").eval()
    net.config.single_object = ["optic disc"]
    emclip.save_model(net, tmp_path / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8)).save(images / "g.png")
    counts = {}
    for extra in ([], ["--all-components"]):
        out = tmp_path / f"out{len(extra)}"
        rc = cli_main.main(["segment", str(images / "g.png"), "--prompts", "optic disc", "--out", str(out),
                            "--model", str(tmp_path / "model"), "--threshold", "0.03", "--min-area", "1",
                            "--no-overlay", *extra])
        assert rc == 0, capsys.readouterr().err
        mask = read_mask_tiff(out / "g_masks.tif").masks[0] > 0
        counts[bool(extra)] = ndimage.label(mask, structure=np.ones((3, 3), bool))[1]
    assert counts[False] == 1 and counts[True] > 5


def test_existing_outputs_are_refused_without_overwrite(images, capsys):
    out = images / "out"
    out.mkdir()
    (out / "stack_overlay.png").write_bytes(b"precious")
    args = [
        "segment",
        str(images / "fundus.png"),
        str(images / "stack.tif"),
        "-p",
        "optic cup",
        "-o",
        str(out),
        "-m",
        "tiny",
    ]
    assert cli_main.main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "stack_overlay.png" in line and "--overwrite" in line
    # nothing was written, not even the outputs of the other image
    assert sorted(p.name for p in out.iterdir()) == ["stack_overlay.png"]
    assert (out / "stack_overlay.png").read_bytes() == b"precious"
    assert cli_main.main(args + ["--overwrite", "-q"]) == 0
    assert (out / "stack_overlay.png").read_bytes() != b"precious"
    assert (out / "fundus_masks.tif").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "1.5"], "threshold"),
        (["--tile-size", "-3"], "tile-size"),
        (["-p", " ,; "], "prompt"),
        (["-m", "./no/such/checkpoint"], "not found"),
    ],
)
def test_user_errors_are_one_line_exit_2(images, capsys, extra, message):
    args = [
        "segment",
        str(images / "fundus.png"),
        "-p",
        "optic cup",
        "-o",
        str(images / "o"),
        "-m",
        "tiny",
        *extra,
    ]
    assert cli_main.main(args) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (images / "o" / "fundus_masks.tif").exists()


def test_bad_input_files(images, capsys):
    (images / "notes.txt").write_text("x")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for name, message in [
        ("missing.png", "no such image"),
        ("notes.txt", "use one of"),
        ("broken.png", "broken.png"),
    ]:
        rc = cli_main.main(
            ["segment", str(images / name), "-p", "a", "-o", str(images / "o"), "-m", "tiny"]
        )
        assert rc == 2
        assert message in _one_error_line(capsys.readouterr().err)
    two = ["segment", str(images / "fundus.png"), str(images / "stack.tif")]
    (images / "sub").mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(images / "sub" / "fundus.png")
    rc = cli_main.main(
        two[:2] + [str(images / "sub" / "fundus.png"), "-p", "a", "-o", str(images / "o")]
    )
    assert rc == 2 and "same output" in _one_error_line(capsys.readouterr().err)


def test_no_bundled_model_and_debug_traceback(images, capsys, monkeypatch):
    from emclip.inference import model_loading

    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", images / "not-installed")
    args = ["segment", str(images / "fundus.png"), "-p", "a", "-o", str(images / "o")]
    assert cli_main.main(args) == 2
    assert "--model" in _one_error_line(capsys.readouterr().err)
    assert cli_main.main(args + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        "emclip: error: no bundled"
    )


def test_cancel_and_ctrl_c_exit_130_without_outputs(images, capsys, monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def cancelled_at_once():
        yield lambda: True

    monkeypatch.setattr(cli_segment, "_sigint_cancels", cancelled_at_once)
    args = ["segment", str(images / "fundus.png"), "-p", "a", "-o", str(images / "o"), "-m", "tiny"]
    assert cli_main.main(args) == 130
    assert _one_error_line(capsys.readouterr().err, "emclip: cancelled")
    assert not list((images / "o").glob("*"))
    monkeypatch.undo()

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("emclip.io.read_image", interrupted)
    assert cli_main.main(args) == 130
    assert _one_error_line(capsys.readouterr().err, "emclip: cancelled")


def test_first_ctrl_c_requests_cancel_second_interrupts(capsys):
    before = signal.getsignal(signal.SIGINT)
    with cli_segment._sigint_cancels() as cancel:
        assert cancel() is False
        os.kill(os.getpid(), signal.SIGINT)
        assert cancel() is True
        assert "cancelling" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_unexpected_errors_exit_1_with_a_hint(images, capsys, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("emclip.inference.segment", boom)
    rc = cli_main.main(
        ["segment", str(images / "fundus.png"), "-p", "a", "-o", str(images / "o"), "-m", "tiny"]
    )
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "ZeroDivisionError" in line and "--debug" in line


def test_subprocess_user_error_exit_code(images):
    bad = _run("segment", str(images / "missing.png"), "-p", "a", "-o", str(images / "o"))
    assert bad.returncode == 2
    assert _one_error_line(bad.stderr).endswith("missing.png")
    assert not bad.stdout


@pytest.mark.slow
def test_subprocess_segment_end_to_end(images):
    ok = _run(
        "segment",
        str(images / "fundus.png"),
        "-p",
        "optic disc",
        "-o",
        str(images / "o"),
        "-m",
        "tiny",
        "-q",
        "--device",
        "cpu",
        "--no-coarse-to-fine",
    )
    assert ok.returncode == 0, ok.stderr
    assert read_mask_tiff(images / "o" / "fundus_masks.tif").prompts == ["optic disc"]
    # the untrained-model warning is one readable line, not a Python warning dump
    assert _one_error_line(ok.stderr, "emclip: warning: ")
