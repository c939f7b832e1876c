"""Running a tower's inference copy as one flat generated function (emclip/nn/inference_copy.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from emclip.nn.conv_prepacking import PrepackedConv2d, can_prepack
from emclip.nn.inference_copy import direct_feeds, flatten, submodules
from torch import nn


def _call(m: nn.Module, x: torch.Tensor):
    return m(x)


@pytest.mark.skipif(not can_prepack(nn.Conv2d(1, 1, 1)), reason="this torch has no oneDNN convolution ops")
def test_the_prepacked_tower_runs_flat_with_only_its_convolutions_as_calls(cnn_encoder):
    enc = cnn_encoder
    with torch.no_grad():
        enc(torch.randn(1, 3, 64, 64))
        cache = enc._folded
        assert cache.flattened and cache.prepacked > 40
        flat = cache._built[True].flat
        calls = [n for n in flat.graph.nodes if n.op == "call_module"]
        assert len(calls) == cache.prepacked  # no Identity placeholders, no containers or blocks
        assert all(isinstance(flat.get_submodule(n.target), PrepackedConv2d) for n in calls)
        # nothing from the input it was traced on is baked in: other batch sizes and shapes
        x = torch.randn(3, 3, 96, 64)
        for a, b in zip(flat(x), enc._call_trunk(cache._tower, x)):
            assert torch.equal(a, b)
        enc.prepack_convolutions = False  # the plain folded copy runs as modules
        enc(x)
        assert not cache.flattened


def test_a_flat_function_that_fails_where_the_modules_do_not_is_dropped(cnn_encoder, caplog):
    enc = cnn_encoder
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = enc(x)
        entry = enc._folded._built[True]
        assert entry.flat is not None

        def broken(inp):
            raise RuntimeError("not traced for this")

        entry.flat = broken
        with caplog.at_level(logging.WARNING, logger="emclip"):
            got = enc(x)
        assert "runs as modules from now on" in caplog.text
        assert entry.flat is None and not enc._folded.flattened
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_an_input_the_modules_refuse_too_keeps_the_flat_function(cnn_encoder):
    enc = cnn_encoder
    with torch.no_grad():
        enc(torch.randn(1, 3, 64, 64))
        flat = enc._folded._built[True].flat
        with pytest.raises(RuntimeError):
            enc(torch.randn(1, 3, 64, 64, dtype=torch.float64))  # wrong dtype for the float32 weights
    assert enc._folded._built[True].flat is flat


class _BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def test_modules_that_cannot_be_traced_are_left_as_modules():
    m = _BranchesOnValues()
    assert flatten(m, _call, torch.ones(1, 2, 4, 4), leaves=(nn.Conv2d,)) is None


def test_a_flat_function_with_other_outputs_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="emclip"):
        assert flatten(_Noisy(), _call, torch.zeros(1, 2, 4, 4), leaves=()) is None
    assert "changed the outputs" in caplog.text


def test_identity_placeholders_are_dropped_and_leaves_kept():
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Identity(), nn.Sequential(nn.ReLU(), nn.Identity()), nn.Conv2d(3, 2, 1))
    x = torch.randn(2, 2, 5, 5)
    flat = flatten(m, _call, x, leaves=(nn.Conv2d,))
    ops = [(n.op, n.target) for n in flat.graph.nodes if n.op in ("call_module", "call_function")]
    assert len(ops) == 3 and not any("Identity" in type(flat.get_submodule(t)).__name__ for o, t in ops if o == "call_module")
    with torch.no_grad():
        assert torch.equal(flat(x), m(x))


def test_submodules_are_modules_without_the_names(tiny_model):
    shared = nn.Linear(2, 2)
    m = nn.Sequential(shared, nn.Sequential(shared, nn.ReLU()), nn.Identity())
    for module in (m, tiny_model):
        walked = list(submodules(module))
        assert len(walked) == len({id(x) for x in walked})  # each once, shared ones too
        assert {id(x) for x in walked} == {id(x) for x in module.modules()}



class _ScalesItsInputInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 2, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # allowed on an inference tensor only inside inference mode
        return self.act(self.conv(x))


def test_direct_feeds_gives_no_pairs_when_the_pass_cannot_leave_inference_mode():
    m = _ScalesItsInputInPlace().eval()
    is_conv, is_act = (lambda mod: isinstance(mod, nn.Conv2d)), (lambda mod: isinstance(mod, nn.ReLU))
    plain = torch.randn(1, 2, 4, 4)
    assert direct_feeds(m, lambda mod: mod(plain.clone()), is_conv, is_act) == [("conv", "act")]
    with torch.inference_mode():
        x = torch.randn(1, 2, 4, 4)
        assert direct_feeds(m, lambda mod: mod(x), is_conv, is_act) == []


@pytest.mark.parametrize("inference_mode", [False, True])
def test_a_bad_first_input_raises_and_the_next_call_still_gets_the_folded_prepacked_copy(cnn_encoder, inference_mode):
    enc = cnn_encoder
    with torch.inference_mode() if inference_mode else torch.no_grad():  # folding needs no gradients
        with pytest.raises(RuntimeError):
            enc(torch.randn(1, 4, 64, 64))  # four channels: the stem refuses them
        assert enc._folded._current is None  # nothing was cached for the bad input
        enc(torch.randn(1, 3, 64, 64))
    assert enc._folded.folded > 40 and enc._folded.prepacked > 40
