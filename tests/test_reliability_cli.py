"""Reliability of the command line on bad files: ``emclip segment`` and ``emclip evaluate``.

A user mistake (a file that is not an image, a truncated PNG/TIFF, a wrong extension, an empty
file, a folder, a broken dataset folder, a malformed option) must end with exit code 2 and
exactly one line on stderr starting ``emclip: error:``, never a traceback; a valid input must
end with exit code 0 and readable outputs. Existing outputs are never replaced without
``--overwrite`` (nothing the user edited is lost). Hypothesis generates files, prompts, options
and dataset folders; the counts go to ``reliability_counts`` (tests/conftest.py).

Most runs are in-process (``emclip.cli.main.main``, stdout/stderr captured) for speed; a few run
the real ``python -m emclip.cli.main`` in a subprocess to check exit codes and stderr as a shell
sees them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from emclip.cli import main as cli_main
from emclip.io import read_mask_tiff
from emclip.prompts import parse_prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ = os.environ.get("EMCLIP_FUZZ") == "1"
HANG_SECONDS = 30.0
WATCHDOG_SECONDS = 300
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _settings(n: int) -> settings:
    return settings(
        max_examples=n * 10 if FUZZ else n,
        deadline=None,
        database=None,
        derandomize=not FUZZ,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved as a checkpoint folder (a real model source: no untrained warning)."""
    import emclip

    return emclip.save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def counts(reliability_counts):
    for key in ("crashes", "hangs", "lost edits"):
        reliability_counts[key] += 0
    return reliability_counts


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``emclip ARGV`` in this process: (exit code, stdout, stderr). A run still going after
    ``WATCHDOG_SECONDS`` is a hang: every stack is dumped and the test process exits."""
    out, err = io.StringIO(), io.StringIO()
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True, file=sys.__stderr__)
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("default")
            code = cli_main.main([str(a) for a in argv])
    finally:
        faulthandler.cancel_dump_traceback_later()
    return code, out.getvalue(), err.getvalue()


def run_subprocess(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emclip.cli.main", *map(str, argv)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def error_line(err: str) -> str:
    """The single ``emclip: error:`` line of ``err`` (fails on a traceback or more lines)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith("emclip: error: "), lines[0]
    assert len(lines[0]) > len("emclip: error: ") + 10
    return lines[0]


def classify(label: str, code: int, out: str, err: str, elapsed: float, counts) -> str:
    """'ok' (exit 0) or 'error' (exit 2 + one line); anything else is a crash and fails."""
    counts[f"{label}: inputs tried"] += 1
    if elapsed > HANG_SECONDS:
        counts["hangs"] += 1
        raise AssertionError(f"{label} took {elapsed:.1f} s (hang)")
    if code == 0:
        assert "Traceback" not in err and "error" not in err.lower(), err
        counts[f"{label}: exit 0 with outputs"] += 1
        return "ok"
    if code == 2:
        try:
            error_line(err)
        except AssertionError:
            counts["crashes"] += 1
            raise
        counts[f"{label}: exit 2 with one error line"] += 1
        return "error"
    counts["crashes"] += 1
    raise AssertionError(f"{label}: exit code {code}\nstdout: {out}\nstderr: {err}")


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header that declares a huge image, followed by a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def tiff_declaring(width: int, height: int) -> bytes:
    """A zlib TIFF whose header claims ``height x width`` pixels but holds 16x16 (classic TIFF:
    each IFD entry is tag, type, count, then a 4-byte inline value; patched to type LONG)."""
    data = bytearray(tiff_bytes(np.zeros((16, 16), np.uint8), compression="zlib"))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        assert not tif.is_bigtiff and tif.byteorder == "<"
        tags = tif.pages[0].tags
        for name, value in (
            ("ImageWidth", width),
            ("ImageLength", height),
            ("RowsPerStrip", height),
        ):
            entry = tags[name].offset
            data[entry + 2 : entry + 4] = struct.pack("<H", 4)  # type LONG
            data[entry + 8 : entry + 12] = struct.pack("<I", value)
    return bytes(data)


RNG = np.random.default_rng(0)
GOOD_RGB = RNG.integers(0, 255, (40, 52, 3), dtype=np.uint8)
GOOD_PNG = png_bytes(GOOD_RGB)
GOOD_TIF = tiff_bytes(RNG.integers(0, 4000, (40, 52), dtype=np.uint16))
GOOD_ZTIF = tiff_bytes(RNG.integers(0, 4000, (40, 52), dtype=np.uint16), compression="zlib")


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


# name -> (file name, content (None: a folder; "missing": nothing), words the error line must hold)
BAD_FILES = {
    "not an image": ("notes.png", b"just some text, not pixels", "not an image file"),
    "random bytes": (
        "noise.bmp",
        bytes(RNG.integers(0, 255, 500, dtype=np.uint8)),
        "not an image file",
    ),
    "empty file": ("empty.png", b"", "empty (0 bytes)"),
    "empty tiff": ("empty.tif", b"", "empty (0 bytes)"),
    "folder": ("folder.png", None, "is a folder"),
    "missing": ("missing.png", "missing", "no such image file"),
    "wrong extension": ("scan.txt", GOOD_PNG, "use one of"),
    "NIfTI": ("brain.nii.gz", b"\x5c\x01\x00\x00" + b"\0" * 400, "NIfTI"),
    "truncated PNG": ("half.png", GOOD_PNG[: len(GOOD_PNG) // 2], "truncated"),
    "PNG header only": ("header.png", GOOD_PNG[:20], "header.png"),
    "bit-flipped PNG": ("flipped.png", _flip(GOOD_PNG, len(GOOD_PNG) // 2), "flipped.png"),
    "truncated TIFF": ("half.tif", GOOD_TIF[: len(GOOD_TIF) // 2], "truncated"),
    "truncated zlib TIFF": ("halfz.tif", GOOD_ZTIF[: len(GOOD_ZTIF) - 40], "truncated"),
    "TIFF header only": ("header.tif", GOOD_TIF[:8], "no image data"),
    "PNG declaring 100000^2 px": ("bomb.png", png_declaring(100_000, 100_000), "bomb.png"),
    "TIFF declaring 1e6^2 px": ("bomb.tif", tiff_declaring(1_000_000, 1_000_000), "bomb.tif"),
    "2x2 image": ("tiny.png", png_bytes(np.zeros((2, 2), np.uint8)), "at least 8x8"),
    "NaN TIFF": ("nan.tif", tiff_bytes(np.full((20, 20), np.nan, np.float32)), "NaN"),
    "complex TIFF": ("complex.tif", tiff_bytes(np.ones((20, 20), np.complex64)), "dtype"),
}


def _make(folder: Path, name: str, content) -> Path:
    path = folder / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    return path


# --------------------------------------------------------------------------- emclip segment, named files


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_segment_bad_file_exits_2_with_one_line(ckpt, counts, tmp_path, case):
    name, content, words = BAD_FILES[case]
    path = _make(tmp_path, name, content)
    out = tmp_path / "out"
    start = time.perf_counter()
    code, stdout, err = run_cli("segment", path, "-p", "optic disc", "-o", out, "-m", ckpt, "-q")
    assert (
        classify(
            "cli segment: named bad files", code, stdout, err, time.perf_counter() - start, counts
        )
        == "error"
    )
    line = error_line(err)
    assert name in line and words in line
    assert not out.exists() or not any(out.iterdir()), "a failed run left files behind"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_is_refused_instead_of_read_forever(ckpt, counts, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block until a writer comes
    start = time.perf_counter()
    code, stdout, err = run_cli(
        "segment", tmp_path / "pipe.png", "-p", "a", "-o", tmp_path / "o", "-m", ckpt
    )
    assert (
        classify(
            "cli segment: named bad files", code, stdout, err, time.perf_counter() - start, counts
        )
        == "error"
    )
    assert "not a regular file" in error_line(err)
    os.mkfifo(tmp_path / "model.safetensors")
    code, stdout, err = run_cli(
        "segment",
        tmp_path / "x.png",
        "-p",
        "a",
        "-o",
        tmp_path / "o",
        "-m",
        tmp_path / "model.safetensors",
    )
    assert code == 2  # x.png does not exist: refused before the model; with an image:
    (tmp_path / "x.png").write_bytes(GOOD_PNG)
    code, stdout, err = run_cli(
        "segment",
        tmp_path / "x.png",
        "-p",
        "a",
        "-o",
        tmp_path / "o",
        "-m",
        tmp_path / "model.safetensors",
    )
    assert (
        classify(
            "cli segment: named bad files", code, stdout, err, time.perf_counter() - start, counts
        )
        == "error"
    )
    assert "not a regular file" in error_line(err)


def test_segment_reads_images_by_content_whatever_the_extension(ckpt, counts, tmp_path):
    (tmp_path / "really_png.tif").write_bytes(GOOD_PNG)
    (tmp_path / "really_tiff.png").write_bytes(GOOD_TIF)
    (tmp_path / "really_jpeg.PNG").write_bytes(jpeg_bytes(GOOD_RGB))
    files = sorted(tmp_path.glob("really_*"))
    code, stdout, err = run_cli(
        "segment", *files, "-p", "optic disc", "-o", tmp_path / "o", "-m", ckpt
    )
    assert classify("cli segment: named valid files", code, stdout, err, 0, counts) == "ok"
    for f in files:
        masks = read_mask_tiff(tmp_path / "o" / f"{f.stem}_masks.tif")
        assert masks.masks.shape == (1, 40, 52) and masks.prompts == ["optic disc"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["segment", "a.png", "-p", "x", "-o", "o", "--threshold", "abc"], "invalid float value"),
        (["segment", "a.png", "-p", "x", "-o", "o", "--tile-size", "1.5"], "invalid int value"),
        (["segment", "a.png", "-p", "x"], "required"),
        (["segment", "a.png", "-p", "x", "-o", "o", "--device", "gpu"], "invalid choice"),
        (["segment", "a.png", "-p", "x", "-o", "o", "--bogus"], "unrecognized arguments"),
        (["evaluate", "--model", "tiny"], "required"),
        (["evaluate", "--model", "m", "--data", "d", "--split", "nope"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_malformed_options_are_one_line_too(counts, argv, words):
    code, stdout, err = run_cli(*argv)
    assert classify("cli: malformed options", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert words in line and "--help" in line


def test_subprocess_bad_files_exit_2_without_traceback(ckpt, counts, tmp_path):
    """The real command, as a shell runs it: exit status 2 and one stderr line."""
    for case in ("not an image", "empty file", "folder", "truncated PNG"):
        name, content, words = BAD_FILES[case]
        path = _make(tmp_path, name, content)
        proc = run_subprocess(
            "segment", path, "-p", "optic disc", "-o", tmp_path / "o", "-m", ckpt, "-q"
        )
        assert (
            classify(
                "cli segment: subprocess", proc.returncode, proc.stdout, proc.stderr, 0, counts
            )
            == "error"
        )
        assert words in error_line(proc.stderr) and not proc.stdout


def test_subprocess_undecodable_names_and_prompts_do_not_crash_output(ckpt, counts, tmp_path):
    """A file name that is not UTF-8 and a prompt with a lone surrogate (as argv gives them),
    printed to a strict UTF-8 stdout (a UTF-8 terminal): escaped, never a UnicodeEncodeError."""
    name = os.fsdecode(b"caf\xe9.png")  # -> 'caf\udce9.png' on POSIX
    try:
        (tmp_path / name).write_bytes(GOOD_PNG)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system cannot hold a non-UTF-8 name")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emclip.cli.main",
            "segment",
            os.fsencode(tmp_path / name),
            b"-p",
            b"optic disc, \xff\xfe",
            b"-o",
            os.fsencode(tmp_path / "o"),
            b"-m",
            os.fsencode(ckpt),
        ],
        capture_output=True,
        env={**ENV, "PYTHONIOENCODING": "utf-8:strict"},
        timeout=180,
    )
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert classify("cli segment: subprocess", proc.returncode, out, err, 0, counts) == "ok"
    assert "caf\\udce9.png: optic disc" in out  # escaped, not a UnicodeEncodeError
    assert read_mask_tiff(tmp_path / "o" / f"{Path(name).stem}_masks.tif").prompts == ["optic disc"]


# --------------------------------------------------------------------------- nothing lost


def test_existing_outputs_are_never_replaced_without_overwrite(ckpt, counts, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(GOOD_PNG)
    (images / "b.png").write_bytes(GOOD_PNG)
    out = tmp_path / "out"
    out.mkdir()
    edited = out / "b_masks.tif"
    edited.write_bytes(b"labels the user corrected by hand")
    argv = ["segment", images / "a.png", images / "b.png", "-p", "optic cup", "-o", out, "-m", ckpt]
    code, stdout, err = run_cli(*argv)
    counts["edit-protection checks"] += 1
    assert classify("cli segment: existing outputs", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert "b_masks.tif" in line and "--overwrite" in line and "nothing was written" in line
    if edited.read_bytes() != b"labels the user corrected by hand":
        counts["lost edits"] += 1
    assert edited.read_bytes() == b"labels the user corrected by hand"
    assert sorted(p.name for p in out.iterdir()) == ["b_masks.tif"]  # not even a's outputs
    code, stdout, err = run_cli(*argv, "--overwrite", "-q")
    assert code == 0, err
    assert read_mask_tiff(edited).prompts == ["optic cup"]  # replaced only when asked


def test_an_output_never_replaces_an_input(ckpt, counts, tmp_path):
    (tmp_path / "x.png").write_bytes(GOOD_PNG)
    (tmp_path / "x_overlay.png").write_bytes(GOOD_PNG)  # an input that is also x's overlay path
    before = (tmp_path / "x_overlay.png").read_bytes()
    code, stdout, err = run_cli(
        "segment",
        tmp_path / "x.png",
        tmp_path / "x_overlay.png",
        "-p",
        "a",
        "-o",
        tmp_path,
        "-m",
        ckpt,
        "--overwrite",
    )
    counts["edit-protection checks"] += 1
    assert classify("cli segment: existing outputs", code, stdout, err, 0, counts) == "error"
    assert "would replace the input" in error_line(err)
    if (tmp_path / "x_overlay.png").read_bytes() != before:
        counts["lost edits"] += 1
    assert (tmp_path / "x_overlay.png").read_bytes() == before


def test_a_bad_file_in_a_batch_keeps_the_finished_outputs_and_says_so(ckpt, counts, tmp_path):
    (tmp_path / "good.png").write_bytes(GOOD_PNG)
    (tmp_path / "broken.png").write_bytes(GOOD_PNG[:300])
    code, stdout, err = run_cli(
        "segment",
        tmp_path / "good.png",
        tmp_path / "broken.png",
        "-p",
        "a",
        "-o",
        tmp_path / "o",
        "-m",
        ckpt,
        "-q",
    )
    assert classify("cli segment: batches", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert "broken.png" in line and "1 of 2 images" in line
    counts["edit-protection checks"] += 1
    if not (tmp_path / "o" / "good_masks.tif").is_file():
        counts["lost edits"] += 1
    assert read_mask_tiff(tmp_path / "o" / "good_masks.tif").prompts == ["a"]
    assert not (tmp_path / "o" / "broken_masks.tif").exists()
    assert not list((tmp_path / "o").glob(".*tmp*")), "a temporary file was left behind"


# --------------------------------------------------------------------------- emclip evaluate, named datasets

YAML = "modality: fundus\nstructures:\n  optic disc: [1, 2]\n  optic cup: [2]\n"


def make_dataset(root: Path, n: int = 2, yaml_text: str = YAML) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(yaml_text, encoding="utf-8")
    for i in range(n):
        (root / "images" / f"im{i}.png").write_bytes(png_bytes(GOOD_RGB))
        lab = np.zeros((40, 52), np.uint8)
        lab[10:30, 10:30] = 1
        lab[15:22, 15:22] = 2
        (root / "masks" / f"im{i}.png").write_bytes(png_bytes(lab))
    return root


def _write(path: Path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


# name -> (how to break a fresh dataset folder, words the error line must hold)
BAD_DATASETS = {
    "mask of another size": (
        lambda d: _write(d / "masks/im0.png", png_bytes(np.zeros((30, 30), np.uint8))),
        "im0.png",
    ),
    "mask values not in dataset.yaml": (
        lambda d: _write(d / "masks/im1.png", png_bytes(np.full((40, 52), 7, np.uint8))),
        "[7]",
    ),
    "missing dataset.yaml": (lambda d: (d / "dataset.yaml").unlink(), "dataset.yaml: missing"),
    "dataset.yaml syntax error": (
        lambda d: _write(d / "dataset.yaml", "structures: [a: b: c\n - ]]"),
        "cannot be read as YAML",
    ),
    "dataset.yaml binary": (
        lambda d: _write(d / "dataset.yaml", b"\xff\xfe\x00\x81garbage"),
        "cannot be read as YAML",
    ),
    "dataset.yaml is a folder": (
        lambda d: ((d / "dataset.yaml").unlink(), (d / "dataset.yaml").mkdir()),
        "dataset.yaml",
    ),
    "dataset.yaml empty": (lambda d: _write(d / "dataset.yaml", ""), "structures"),
    "dataset.yaml wrong types": (
        lambda d: _write(d / "dataset.yaml", "structures:\n  disc: [one]\n"),
        "integers",
    ),
    "dataset.yaml negative value": (
        lambda d: _write(d / "dataset.yaml", "structures:\n  disc: [-1]\n"),
        "1..65535",
    ),
    "dataset.yaml unknown key": (
        lambda d: _write(d / "dataset.yaml", YAML + "colour: red\n"),
        "unknown keys",
    ),
    "missing mask file": (lambda d: (d / "masks/im1.png").unlink(), "no mask"),
    "missing image file": (lambda d: (d / "images/im1.png").unlink(), "no image"),
    "no images folder": (lambda d: shutil.rmtree(d / "images"), "images: missing"),
    "no images at all": (
        lambda d: [p.unlink() for p in (*(d / "images").iterdir(), *(d / "masks").iterdir())],
        "no images found",
    ),
    "truncated image": (lambda d: _write(d / "images/im0.png", GOOD_PNG[:200]), "im0.png"),
    "image is text": (lambda d: _write(d / "images/im0.png", "hello"), "im0.png"),
    "empty mask file": (lambda d: _write(d / "masks/im1.png", b""), "im1.png"),
    "colour mask": (lambda d: _write(d / "masks/im0.png", png_bytes(GOOD_RGB)), "colour"),
    "NaN mask": (
        lambda d: (
            (d / "masks/im0.png").unlink(),
            _write(d / "masks/im0.tif", tiff_bytes(np.full((40, 52), np.nan, np.float32))),
        ),
        "integers",
    ),
    "JPEG mask": (lambda d: _write(d / "masks/extra.jpg", b"\xff\xd8\xff"), "lossless"),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
def test_evaluate_bad_dataset_exits_2_with_one_line(ckpt, counts, tmp_path, case):
    breaker, words = BAD_DATASETS[case]
    root = make_dataset(tmp_path / "ds")
    breaker(root)
    start = time.perf_counter()
    code, stdout, err = run_cli(
        "evaluate", "--model", ckpt, "--data", root, "--split", "all", "--device", "cpu", "--quiet"
    )
    assert (
        classify(
            "cli evaluate: named bad datasets",
            code,
            stdout,
            err,
            time.perf_counter() - start,
            counts,
        )
        == "error"
    )
    assert words in error_line(err)


def test_evaluate_refuses_a_dataset_path_that_is_a_file_or_missing(ckpt, counts, tmp_path):
    (tmp_path / "file.yaml").write_text(YAML)
    for target in (tmp_path / "file.yaml", tmp_path / "nowhere"):
        code, stdout, err = run_cli("evaluate", "--model", ckpt, "--data", target, "--quiet")
        assert classify("cli evaluate: named bad datasets", code, stdout, err, 0, counts) == "error"
        assert "not found" in error_line(err)


def test_evaluate_yaml_tags_never_run_code(ckpt, counts, tmp_path):
    marker = tmp_path / "PWNED"
    root = make_dataset(
        tmp_path / "ds",
        yaml_text=(f'structures: !!python/object/apply:os.system ["touch {marker}"]\n'),
    )
    code, stdout, err = run_cli("evaluate", "--model", ckpt, "--data", root, "--quiet")
    assert classify("cli evaluate: named bad datasets", code, stdout, err, 0, counts) == "error"
    assert "YAML" in error_line(err) and not marker.exists()


def test_evaluate_valid_dataset_still_works(ckpt, counts, tmp_path):
    root = make_dataset(tmp_path / "ds", n=3)
    code, stdout, err = run_cli(
        "evaluate",
        "--model",
        ckpt,
        "--data",
        root,
        "--split",
        "all",
        "--quiet",
        "--json",
        tmp_path / "r.json",
    )
    assert classify("cli evaluate: named valid datasets", code, stdout, err, 0, counts) == "ok"
    assert "| ds | optic disc | 3 |" in stdout and (tmp_path / "r.json").is_file()


@pytest.mark.parametrize(
    "case",
    [
        "mask of another size",
        "mask values not in dataset.yaml",
        "missing mask file",
        "dataset.yaml syntax error",
    ],
)
def test_train_bad_dataset_exits_2_with_one_line(counts, tmp_path, case):
    """`emclip train` on a broken dataset: the same one-line errors, and no checkpoint written."""
    import yaml

    breaker, words = BAD_DATASETS[case]
    root = make_dataset(tmp_path / "ds", n=4)
    breaker(root)
    config = {
        "model": "tiny",
        "data_root": str(tmp_path),
        "train": [{"path": "ds", "split": "all"}],
        "val": [],
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 2,
        "num_workers": 0,
        "evaluate_at_end": False,
        "out_dir": str(tmp_path / "run"),
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    code, stdout, err = run_cli("train", tmp_path / "train.yaml", "--quiet")
    assert classify("cli train: named bad datasets", code, stdout, err, 0, counts) == "error"
    assert words in error_line(err)
    assert not (tmp_path / "run" / "last.json").exists()


def test_evaluate_names_the_image_that_cannot_be_segmented(ckpt, counts, tmp_path):
    root = make_dataset(tmp_path / "ds")
    _write(root / "images/im1.png", png_bytes(np.zeros((4, 4), np.uint8)))
    _write(root / "masks/im1.png", png_bytes(np.zeros((4, 4), np.uint8)))
    code, stdout, err = run_cli(
        "evaluate", "--model", ckpt, "--data", root, "--split", "all", "--quiet"
    )
    assert classify("cli evaluate: named bad datasets", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert "im1.png" in line and "4x4" in line and "8x8" in line  # which image, what, how to fix
    assert "replace or remove" in line and not stdout


@pytest.mark.parametrize(
    "yaml_text, words",
    [
        ('structures:\n  "\\x00\\x1b": [1]\n  optic cup: [2]\n', "no visible characters"),
        ('structures:\n  "\\u200b\\u200d": [1]\n  optic cup: [2]\n', "no visible characters"),
        ("structures:\n  Optic Cup: [1]\n  optic cup: [2]\n", "same prompt"),
        (f"structures:\n  {'x' * 300}: [1]\n", "characters long"),
    ],
)
def test_evaluate_explains_a_structure_name_that_is_not_a_prompt(ckpt, counts, tmp_path, yaml_text, words):
    root = make_dataset(tmp_path / "ds", yaml_text=yaml_text)
    code, stdout, err = run_cli(
        "evaluate", "--model", ckpt, "--data", root, "--split", "all", "--quiet"
    )
    assert classify("cli evaluate: named bad datasets", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert "dataset.yaml" in line and words in line


def test_evaluate_reports_an_empty_split(ckpt, counts, tmp_path):
    root = make_dataset(tmp_path / "ds", n=1)  # one image: the test split is empty
    code, stdout, err = run_cli(
        "evaluate", "--model", ckpt, "--data", root, "--split", "test", "--quiet",
        "--json", tmp_path / "r.json",
    )
    assert classify("cli evaluate: named bad datasets", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert "'test' split has no images" in line and "--split all" in line and "test 0" in line
    assert not (tmp_path / "r.json").exists() and not stdout


@pytest.mark.parametrize("limit", ["-1", "0", "two", "1.5"])
def test_evaluate_refuses_a_limit_below_one(ckpt, counts, tmp_path, limit):
    root = make_dataset(tmp_path / "ds")
    code, stdout, err = run_cli(
        "evaluate", "--model", ckpt, "--data", root, "--split", "all", "--quiet", "--limit", limit
    )
    assert classify("cli: malformed options", code, stdout, err, 0, counts) == "error"
    line = error_line(err)
    assert "--limit" in line and ">= 1" in line and "--help" in line


# --------------------------------------------------------------------------- property tests

_IMAGE_KINDS = ["png"] * 4 + [
    "tif",
    "tif",
    "ztif",
    "jpg",
    "truncated",
    "bitflip",
    "random",
    "signature+random",
    "empty",
]
_EXTENSIONS = [".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".PNG", ".txt", ""]


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    """(file name, bytes): valid encodings of small images and many ways of breaking them."""
    h, w = (
        draw(st.sampled_from(range(8, 41))),
        draw(st.sampled_from([6, 7] + list(range(8, 41)) * 2)),
    )
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "I;16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arr = {
        "L": lambda: rng.integers(0, 255, (h, w), dtype=np.uint8),
        "RGB": lambda: rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        "RGBA": lambda: rng.integers(0, 255, (h, w, 4), dtype=np.uint8),
        "I;16": lambda: rng.integers(0, 65535, (h, w), dtype=np.uint16),
    }[mode]()
    kind = draw(st.sampled_from(_IMAGE_KINDS))
    png = png_bytes(arr)
    if kind == "png":
        data = png
    elif kind == "tif":
        data = tiff_bytes(arr)
    elif kind == "ztif":
        data = tiff_bytes(arr, compression="zlib")
    elif kind == "jpg":
        data = jpeg_bytes(
            arr[..., :3]
            if arr.ndim == 3
            else (arr // 256).astype(np.uint8)
            if arr.dtype == np.uint16
            else arr
        )
    elif kind == "truncated":
        base = draw(st.sampled_from([png, tiff_bytes(arr), tiff_bytes(arr, compression="zlib")]))
        data = base[: draw(st.integers(0, len(base) - 1))]
    elif kind == "bitflip":
        base = draw(st.sampled_from([png, tiff_bytes(arr)]))
        data = bytearray(base)
        for at in draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=4)):
            data[at] ^= 1 << draw(st.integers(0, 7))
        data = bytes(data)
    elif kind == "random":
        data = draw(st.binary(max_size=300))
    elif kind == "signature+random":
        data = draw(
            st.sampled_from([b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff", b"BM"])
        )
        data += draw(st.binary(max_size=300))
    else:
        data = b""
    ext = draw(st.sampled_from([".png"] * 6 + _EXTENSIONS))
    if kind in ("jpg",) and ext in (".png", ".tif"):
        ext = draw(st.sampled_from([".jpg", ext]))
    return f"img{ext}", data


_CLI_TEXT = st.lists(
    st.one_of(
        st.characters(exclude_characters="\x00"),  # argv cannot hold NUL bytes
        st.sampled_from(["\x07", "\x1b[31m", "\u200b", "\u202e", "\udcff", ",", ";", " ", "\t"]),
    ),
    min_size=1,
    max_size=30,
).map("".join)
_GOOD_PROMPTS = [
    "optic disc",
    "optic disc, optic cup",
    "cup; rim; cup",
    "视盘, émoji 🧠",
    "\x1b[1;31mcup\x1b[0m",
    "\u202ecup, Cup",
    "optic\tdisc\n",
]
cli_prompts = st.one_of(
    *[st.sampled_from(_GOOD_PROMPTS)] * 4,
    _CLI_TEXT,
    st.integers(0, 8).map(lambda n: ", " * n),
    st.integers(150, 3000).map(lambda n: "x" * n),
    st.lists(
        st.text("abcdefgh", min_size=1, max_size=5), min_size=60, max_size=100, unique=True
    ).map(",".join),
)
cli_options = st.one_of(
    st.just([]),
    st.just(["--threshold", "0.2"]),
    st.lists(
        st.sampled_from(
            [
                ["--threshold", "0.3"],
                ["--threshold", "1.5"],
                ["--threshold", "nan"],
                ["--threshold", "abc"],
                ["--tile-size", "0"],
                ["--tile-size", "8"],
                ["--tile-size", "64"],
                ["--tile-size", "-2"],
                ["--min-area", "0"],
                ["--min-area", "-4"],
                ["--min-area", "100000"],
                ["--channel-axis", "0"],
                ["--channel-axis", "-1"],
                ["--channel-axis", "7"],
                ["--axis", "0"],
                ["--axis", "2"],
                ["--axis", "9"],
                ["--modality", "fundus"],
                ["--modality", "\u202eodd\x07"],
                ["--no-overlay"],
                ["--device", "cpu"],
            ]
        ),
        max_size=2,
    ).map(lambda groups: [a for g in groups for a in g]),
)


@_settings(110)
@given(file=image_files(), prompts=cli_prompts, options=cli_options)
def test_segment_cli_on_generated_files(ckpt, counts, file, prompts, options):
    name, data = file
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / name
        path.write_bytes(data)
        out = tmp / "out"
        start = time.perf_counter()
        code, stdout, err = run_cli(
            "segment", path, "-p", prompts, "-o", out, "-m", ckpt, "-q", *options
        )
        outcome = classify(
            "cli segment: generated files", code, stdout, err, time.perf_counter() - start, counts
        )
        written = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert not [n for n in written if ".tmp" in n], "temporary files left behind"
        if outcome == "ok":
            masks = read_mask_tiff(out / f"{path.stem}_masks.tif")
            assert masks.prompts == parse_prompts(prompts)
            assert masks.masks.dtype == np.uint8 and set(np.unique(masks.masks)) <= {0, 1}
        else:
            assert not written, f"a failed run wrote {written}"


_YAMLS = [
    YAML,
    "structures:\n  disc: [1]\n",
    "modality: cardiac MRI\nstructures:\n  left ventricle: 1\n  myocardium: [2, 7]\n",
    "structures:\n  optic disc: [1, 2]\nsynonyms:\n  optic disc: [OD]\n",
    "structures: {}\n",
    "structures:\n  disc: []\n",
    "structures: 5\n",
    "- a\n- b\n",
    "just text",
    "structures:\n  disc: [0]\n",
    "structures:\n  disc: [70000]\n",
    "structures:\n  '': [1]\n",
    "structures:\n  disc: [1]\nsynonyms:\n  cup: [c]\n",
    "structures:\n  disc: [1.5]\n",
    "structures: [unclosed",
    "\x00\x01",
    "structures:\n  disc: !!binary aGVsbG8=\n",
]


@st.composite
def datasets(draw) -> tuple[str | None, list[tuple[str, bytes | None, str, bytes | None]]]:
    """(dataset.yaml text or None, [(image name, bytes, mask name, bytes)]). Half are clean
    datasets (exit 0 expected), half have one or more things wrong."""
    clean = draw(st.booleans())
    if clean:
        yaml_text = draw(st.sampled_from(_YAMLS[:4]))
    else:
        yaml_text = draw(st.one_of(st.sampled_from(_YAMLS), st.none(), st.text(max_size=60)))
    files = []
    for i in range(draw(st.integers(1, 3) if clean else st.integers(0, 3))):
        h, w = draw(st.sampled_from([(40, 52), (16, 16), (24, 9)] + ([] if clean else [(5, 30)])))
        img = RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)
        image = draw(
            st.sampled_from(
                ["png", "tif"] if clean else ["png", "png", "tif", "truncated", "text", "none"]
            )
        )
        image_bytes = {
            "png": lambda: png_bytes(img),
            "tif": lambda: tiff_bytes(img),
            "truncated": lambda: png_bytes(img)[:100],
            "text": lambda: b"hello",
            "none": lambda: None,
        }[image]()
        mh, mw = (h, w) if clean or draw(st.integers(0, 4)) else (h + 1, w)
        values = draw(
            st.sampled_from(
                [[0, 1], [0], [0, 1, 1]] if clean else [[0, 1, 2], [0, 1], [0], [0, 7], [0, 255]]
            )
        )
        lab = np.asarray(values, np.uint8)[RNG.integers(0, len(values), (mh, mw))]
        mask = draw(
            st.sampled_from(
                ["png", "tif"] if clean else ["png", "png", "tif", "rgb", "empty", "none"]
            )
        )
        mask_bytes = {
            "png": lambda: png_bytes(lab),
            "tif": lambda: tiff_bytes(lab),
            "rgb": lambda: png_bytes(np.stack([lab, lab * 0, lab], -1)),
            "empty": lambda: b"",
            "none": lambda: None,
        }[mask]()
        ext = ".tif" if mask == "tif" else ".png"
        files.append(
            (f"im{i}.{'tif' if image == 'tif' else 'png'}", image_bytes, f"im{i}{ext}", mask_bytes)
        )
    return yaml_text, files


@_settings(70)
@given(
    dataset=datasets(),
    split=st.sampled_from(["all", "all", "train"]),
    threshold=st.sampled_from(["0.5", "0.5", "0.5", "0.01", "0", "2", "x"]),
)
def test_evaluate_cli_on_generated_datasets(ckpt, counts, dataset, split, threshold):
    # (splits that can come out empty, --split test/val on 1-3 images, are left out: a known bug
    # in evaluate.py, see test_evaluate_reports_an_empty_split below)
    yaml_text, files = dataset
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        if yaml_text is not None:
            (root / "dataset.yaml").write_text(yaml_text, encoding="utf-8", errors="surrogatepass")
        for image_name, image_bytes, mask_name, mask_bytes in files:
            if image_bytes is not None:
                (root / "images" / image_name).write_bytes(image_bytes)
            if mask_bytes is not None:
                (root / "masks" / mask_name).write_bytes(mask_bytes)
        start = time.perf_counter()
        code, stdout, err = run_cli(
            "evaluate",
            "--model",
            ckpt,
            "--data",
            root,
            "--split",
            split,
            "--threshold",
            threshold,
            "--device",
            "cpu",
            "--quiet",
        )
        outcome = classify(
            "cli evaluate: generated datasets",
            code,
            stdout,
            err,
            time.perf_counter() - start,
            counts,
        )
        if outcome == "ok":
            assert stdout.startswith("Model: ") and "| dataset | structure |" in stdout
