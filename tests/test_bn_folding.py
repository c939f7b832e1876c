"""BatchNorm folding of CNN towers for inference (emclip/nn/bn_folding.py)."""

from __future__ import annotations

import logging

import torch
from emclip.nn.bn_folding import fold_batchnorms, tower_state
from torch import nn


def _both(enc, x):
    with torch.no_grad():
        enc.fold_batchnorm = False
        plain = enc(x)
        enc.fold_batchnorm = True
        folded = enc(x)
    return plain, folded


def test_folded_tower_gives_the_same_features_without_batchnorms(cnn_encoder):
    enc = cnn_encoder
    x = torch.randn(2, 3, 64, 96)
    plain, folded = _both(enc, x)
    for a, b in zip(plain, folded):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in enc.visual.trunk.modules())
    assert enc._folded.folded == n_bn > 40
    copy = enc._folded._tower
    assert copy is not enc.visual.trunk and not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    # the copy is not part of the model: same state_dict and parameters as before
    assert not any("_folded" in k for k in enc.state_dict())
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in enc.visual.parameters())


def test_weights_changed_in_place_rebuild_the_copy(cnn_encoder):
    enc = cnn_encoder
    x = torch.randn(1, 3, 64, 64)
    _both(enc, x)
    first = enc._folded._tower
    with torch.no_grad():  # what an optimiser step or load_state_dict does
        enc.visual.trunk.blocks[3][0].bn2.running_mean.add_(0.3)
        enc.visual.trunk.blocks[3][0].conv_pw.weight.mul_(1.1)
    plain, folded = _both(enc, x)
    assert enc._folded._tower is not first
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(plain, folded))


def test_weights_replaced_or_moved_rebuild_the_copy(cnn_encoder):
    """Not only in-place changes: a new Parameter, new storage (``.data =``, as ``.to()`` does) and
    a swapped submodule must each give a new folded copy with the new weights."""
    enc = cnn_encoder
    x = torch.randn(1, 3, 64, 64)
    trunk = enc.visual.trunk
    block = trunk.blocks[3][0]
    changes = [
        lambda: setattr(block.conv_pw, "weight", nn.Parameter(block.conv_pw.weight.detach() * 1.1)),
        lambda: setattr(block.conv_pwl.weight, "data", block.conv_pwl.weight.detach() * 0.9),
        lambda: setattr(block, "bn2", _renormed(block.bn2)),
    ]
    for change in changes:
        _both(enc, x)
        before = enc._folded._tower
        with torch.no_grad():
            change()
        plain, folded = _both(enc, x)
        assert enc._folded._tower is not before
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(plain, folded))


def _renormed(bn: nn.Module) -> nn.Module:
    import copy

    new = copy.deepcopy(bn)
    with torch.no_grad():
        new.running_mean.add_(0.5)
    return new


def test_tower_state_sees_training_anywhere_and_every_kind_of_weight_change():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())).eval()
    training, key = tower_state(m)
    assert not training and tower_state(m) == (False, key)  # stable while nothing changes
    m[1][1].train()
    assert tower_state(m)[0]
    m.eval()
    with torch.no_grad():
        m[0].bias.add_(1.0)
    assert tower_state(m)[1] != key
    key = tower_state(m)[1]
    m[1][0].running_var = torch.ones(4)  # a replaced buffer
    assert tower_state(m)[1] != key
    key = tower_state(m)[1]
    m[1][1] = nn.Sequential(nn.BatchNorm2d(4))  # new parameters under a swapped submodule
    assert tower_state(m)[1] != key


def test_training_and_gradients_use_the_tower_itself(cnn_encoder):
    enc = cnn_encoder
    x = torch.randn(2, 3, 64, 64)
    enc(x)  # eval mode, but gradients on: the real tower (gradients must reach its weights)
    assert enc._folded._tower is None
    enc.train()
    with torch.no_grad():
        enc(x)
    assert enc._folded._tower is None
    # norms switched to training on their own (re-estimating statistics) must see the data
    enc.eval()
    bn = enc.visual.trunk.blocks[4][0].bn1
    bn.train()
    before = bn.running_mean.clone()
    with torch.no_grad():
        enc(x * 2 + 1)
    assert enc._folded._tower is None and not torch.equal(bn.running_mean, before)


class _ConvFeedsNormAndSkip(nn.Module):
    """The convolution's raw output is also used after the norm: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_fold_that_changes_the_outputs_is_refused(caplog):
    m = _ConvFeedsNormAndSkip().eval()
    m.bn.running_mean.fill_(0.7)
    m.bn.running_var.fill_(3.0)
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="emclip"):
        out, n = fold_batchnorms(m, lambda mod: mod(x))
    assert out is m and n == 0 and "changed the outputs" in caplog.text


def test_plain_sequential_conv_bn_relu_is_folded():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 10, 10)
    out, n = fold_batchnorms(m, lambda mod: mod(x))
    assert n == 1 and isinstance(out[1], nn.Identity) and isinstance(m[1], nn.BatchNorm2d)  # original kept
    with torch.no_grad():
        assert torch.allclose(out(x), m(x), atol=1e-5)


def test_vit_towers_are_never_folded(tiny_model):
    enc = tiny_model.image_encoder
    with torch.no_grad():
        enc(torch.randn(1, 3, 64, 64))
    assert getattr(enc, "_folded", None) is None or enc._folded._tower is None


def test_copies_of_a_model_do_not_carry_the_folded_tower(cnn_encoder):
    import copy
    import pickle

    enc = cnn_encoder
    _both(enc, torch.randn(1, 3, 64, 64))
    assert enc._folded._tower is not None
    assert copy.deepcopy(enc)._folded._tower is None
    assert pickle.loads(pickle.dumps(enc))._folded._tower is None
