"""Convolutions with weights kept in oneDNN's layout for CPU inference (emclip/nn/conv_prepacking.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from emclip.nn import conv_prepacking
from emclip.nn.conv_prepacking import MAX_SHAPES, PrepackedConv2d, can_prepack, prepack_convolutions
from torch import nn

pytestmark = pytest.mark.skipif(not can_prepack(nn.Conv2d(1, 1, 1)), reason="this torch has no oneDNN convolution ops")


def _features(enc, x, prepack: bool):
    enc.prepack_convolutions = prepack
    with torch.no_grad():
        return enc(x)


def test_prepacked_tower_gives_the_same_features_with_activations_fused(cnn_encoder):
    enc = cnn_encoder
    x = torch.randn(2, 3, 64, 96)
    plain = _features(enc, x, False)
    assert enc._folded.prepacked == 0
    packed = _features(enc, x, True)
    for a, b in zip(plain, packed):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    tower = enc._folded._tower
    convs = [m for m in tower.modules() if isinstance(m, PrepackedConv2d)]
    assert enc._folded.prepacked == len(convs) > 40
    assert not any(type(m) is nn.Conv2d or type(m).__name__ == "Conv2dSame" for m in tower.modules())
    fused = [m for m in convs if m.attr == "hardtanh"]
    relu6_left = [m for m in tower.modules() if isinstance(m, nn.ReLU6)]
    assert len(fused) > 20 and not relu6_left  # every ReLU6 of EfficientNet-Lite now runs inside its convolution
    assert {m.attr for m in convs} == {"hardtanh", "none"}  # projection convs have no activation
    # the model itself is untouched: its tower still has its convolutions and BatchNorms
    assert any(isinstance(m, nn.BatchNorm2d) for m in enc.visual.trunk.modules())
    assert not any(isinstance(m, PrepackedConv2d) for m in enc.modules())


def test_weights_are_reordered_per_input_shape_and_bounded(cnn_encoder):
    enc = cnn_encoder
    shapes = [(1, 3, 64, 64), (3, 3, 64, 64), (1, 3, 96, 64), (2, 3, 64, 64), (1, 3, 64, 128), (1, 3, 64, 64)]
    for shape in shapes:
        x = torch.randn(*shape)
        plain = _features(enc, x, False)
        packed = _features(enc, x, True)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(plain, packed)), shape
        stem = enc._folded._tower.conv_stem
        assert 1 <= len(stem._packed) <= MAX_SHAPES


def test_modules_that_cannot_be_prepacked_are_returned_as_they_are():
    m64 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    assert not can_prepack(m64)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert prepack_convolutions(m64, lambda m: m(x)) == (m64, 0)
    no_convs = nn.Sequential(nn.Linear(3, 3))
    assert prepack_convolutions(no_convs, lambda m: m(torch.randn(2, 3))) == (no_convs, 0)


class _ConvFeedsActAndSkip(nn.Module):
    """The convolution's raw output is also added after the ReLU: fusing the ReLU would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.act(y) + y


def test_a_copy_that_changes_the_outputs_is_refused(caplog):
    m = _ConvFeedsActAndSkip().eval()
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="emclip"):
        got, n = prepack_convolutions(m, lambda mod: mod(x))
    assert got is m and n == 0 and "changed the outputs" in caplog.text


def test_an_op_this_torch_refuses_keeps_the_module(monkeypatch, caplog):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval()
    x = torch.randn(1, 3, 8, 8)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported")

    real = conv_prepacking._ops()
    monkeypatch.setattr(conv_prepacking, "_ops", lambda: (refuse, real[1]))
    with caplog.at_level(logging.WARNING, logger="emclip"):
        got, n = prepack_convolutions(m, lambda mod: mod(x))
    assert got is m and n == 0 and "prepacked convolutions failed" in caplog.text


def test_switching_prepacking_off_rebuilds_the_copy(cnn_encoder):
    enc = cnn_encoder
    x = torch.randn(1, 3, 64, 64)
    _features(enc, x, True)
    packed = enc._folded._tower
    assert enc._folded.prepacked > 0
    _features(enc, x, False)
    assert enc._folded.prepacked == 0 and enc._folded.folded > 40
    assert not any(isinstance(m, PrepackedConv2d) for m in enc._folded._tower.modules())
    _features(enc, x, True)  # back on: the same copy, not rebuilt (benchmarks switch back and forth)
    assert enc._folded._tower is packed
    with torch.no_grad():  # new weights: both copies are stale
        enc.visual.trunk.conv_stem.weight.mul_(1.1)
    _features(enc, x, True)
    assert enc._folded._tower is not packed and enc._folded.prepacked > 0


def test_weights_are_reordered_again_when_the_thread_count_changes(cnn_encoder):
    """oneDNN's weight layout depends on the thread count: weights packed at 2 threads and run at
    1 were 20-30x slower, so a new count gets its own packed weights (and the same features)."""
    enc = cnn_encoder
    x = torch.randn(1, 3, 64, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _features(enc, x, True)
        stem = enc._folded._tower.conv_stem
        assert [k[-1] for k in stem._packed] == [2]
        torch.set_num_threads(1)
        again = _features(enc, x, True)
        assert [k[-1] for k in stem._packed] == [2, 1]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(first, again))


class _ResidualBlock(nn.Module):
    """conv -> ReLU -> conv, then ResNet's in-place ``x += shortcut`` and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.act1(self.conv1(x)))
        out += x
        return self.act2(out)


@pytest.mark.parametrize("inference_mode", [False, True])
def test_an_activation_after_an_in_place_residual_add_is_not_fused(inference_mode, caplog):
    torch.manual_seed(0)
    block = _ResidualBlock().eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode(inference_mode):  # segment() builds the copies in inference mode
        packed, n = prepack_convolutions(block, lambda m: m(x))
        assert n == 2 and packed is not block  # before: conv2 + act2 fused, outputs differed, copy dropped
        assert {name: m.attr for name, m in packed.named_modules() if isinstance(m, PrepackedConv2d)} == {
            "conv1": "relu", "conv2": "none"}
        assert isinstance(packed.act2, nn.ReLU) and isinstance(packed.act1, nn.Identity)
        assert torch.allclose(packed(x), block(x), rtol=1e-5, atol=1e-5)
    assert "changed the outputs" not in caplog.text


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(8, 8), (9, 8), (7, 10)])
def test_depthwise_same_padding_needs_no_padded_copy_and_changes_no_bit(kernel, size, monkeypatch):
    from timm.layers import create_conv2d

    torch.manual_seed(0)
    depthwise = create_conv2d(6, 6, kernel, stride=2, padding="same", depthwise=True).eval()
    dense = create_conv2d(6, 4, kernel, stride=2, padding="same").eval()
    assert type(depthwise).__name__ == type(dense).__name__ == "Conv2dSame"
    x = torch.randn(2, 6, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want_depthwise, want_dense = depthwise(x), dense(x)  # timm pads a copy, then convolves
    pads = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(conv_prepacking.F, "pad", lambda t, p, *a, **k: pads.append(p) or real_pad(t, p, *a, **k))
    with torch.no_grad():
        zero_taps = PrepackedConv2d(depthwise)(x)
        assert pads == []  # the kernel got zero taps instead
        assert torch.allclose(zero_taps, want_depthwise, rtol=1e-5, atol=1e-5)
        copied = PrepackedConv2d(depthwise)
        copied.depthwise = False  # the padded-copy path, as dense convolutions run
        assert torch.equal(copied(x), zero_taps)  # same sums in the same order
        assert len(pads) == 1
        assert torch.allclose(PrepackedConv2d(dense)(x), want_dense, rtol=1e-5, atol=1e-5)
        assert len(pads) == 2  # dense convolutions keep the copy (oneDNN is slower with the wider kernel)
