"""Inference copies of CNN towers with each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel scale and shift, so it can be merged into the weights
and bias of the convolution that feeds it (``torch.nn.utils.fusion.fuse_conv_bn_weights``); the
activation that timm's ``BatchNormAct2d`` applies stays. On this 2-core CPU that removes 48
passes over memory from each EfficientNet-Lite0 forward (see BENCHMARKS.md, issue 6).

The pairs are found by running the tower once and watching which convolution output goes
straight into which BatchNorm, so no architecture is hard-coded; the folded copy is then checked
against the original on the same input and discarded if it differs (:func:`fold_batchnorms`).
:class:`FoldedTowerCache` keeps the folded copy and rebuilds it when any weight of the original
changes (fine-tuning, ``load_state_dict``, ``.to()``), so training always sees the real tower.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .inference_copy import direct_feeds, replace_submodule, same_outputs

log = logging.getLogger("emclip")

__all__ = ["FoldedTowerCache", "fold_batchnorms"]


def _is_plain_batchnorm(m: nn.Module) -> bool:
    """``nn.BatchNorm2d`` or timm's ``BatchNormAct2d`` (norm, then ``drop``, then ``act``) with
    running statistics; other subclasses may do more than scale and shift, so they are left."""
    if not isinstance(m, nn.BatchNorm2d) or not m.track_running_stats or m.running_mean is None:
        return False
    return type(m) is nn.BatchNorm2d or (type(m).__name__ == "BatchNormAct2d" and hasattr(m, "act") and hasattr(m, "drop"))


def _after_norm(bn: nn.Module) -> nn.Module:
    """What is left of ``bn`` once its scale and shift live in the convolution."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(bn.drop, bn.act)


@torch.no_grad()
def fold_batchnorms(module: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``module`` with its BatchNorms folded into their convolutions.

    ``run(m)`` runs ``m`` on a representative input and returns its output(s); it is used to find
    the pairs and to check the copy (same outputs within rtol 1e-3). Returns ``(copy, n_folded)``;
    when nothing can be folded or the check fails, ``(module, 0)`` — the original, unchanged.
    """
    folded = copy.deepcopy(module).eval()
    pairs = direct_feeds(folded, run, lambda m: isinstance(m, nn.Conv2d), _is_plain_batchnorm)
    if not pairs:
        return module, 0
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        channels_last = conv.weight.dim() == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last)
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        if channels_last:
            weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), weight.requires_grad)
        conv.weight, conv.bias = weight, bias
        replace_submodule(folded, bn_name, _after_norm(bn))
    was_training = module.training
    module.eval()
    try:
        reference = run(module)
    finally:
        module.train(was_training)
    if not same_outputs(reference, run(folded)):
        log.warning("BatchNorm folding changed the outputs of %s; using the unfolded tower", type(module).__name__)
        return module, 0
    return folded, len(pairs)


def _weights_key(module: nn.Module) -> tuple:
    """Changes whenever any parameter or buffer is modified in place, replaced or moved."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device)
                 for t in (*module.parameters(), *module.buffers()))


class FoldedTowerCache:
    """A BatchNorm-folded copy of a tower (one per ``prepack`` setting), rebuilt when the tower's
    weights change; with ``prepack`` its convolutions also keep their weights in oneDNN's layout
    (:mod:`.conv_prepacking`).

    Not an ``nn.Module`` on purpose: the copy is neither in the owner's ``state_dict`` nor in its
    ``parameters()``, so saving, fine-tuning and optimisers only ever see the original.
    """

    def __init__(self) -> None:
        self._built: dict[bool, tuple[tuple, nn.Module, int, int]] = {}  # prepack -> (key, copy, folded, prepacked)
        self._tower: nn.Module | None = None
        self.folded = 0
        self.prepacked = 0

    def get(self, tower: nn.Module, run: Callable[[nn.Module], Any], prepack: bool = False) -> nn.Module:
        """The folded copy of ``tower`` (built with ``run``, see :func:`fold_batchnorms`); with
        ``prepack``, its convolutions prepacked (:func:`.conv_prepacking.prepack_convolutions`).
        One copy is kept per value of ``prepack``, so switching it back and forth rebuilds nothing."""
        key = _weights_key(tower)
        prepack = bool(prepack)
        entry = self._built.get(prepack)
        if entry is None or entry[0] != key:
            self._built = {p: e for p, e in self._built.items() if e[0] == key}  # drop copies of old weights
            copy_, folded = fold_batchnorms(tower, run)
            prepacked = 0
            if prepack:
                from .conv_prepacking import prepack_convolutions

                copy_, prepacked = prepack_convolutions(copy_, run)
            entry = self._built[prepack] = (key, copy_, folded, prepacked)
        _, self._tower, self.folded, self.prepacked = entry
        return self._tower

    def __deepcopy__(self, memo: dict) -> FoldedTowerCache:
        return FoldedTowerCache()  # a copied model folds its own tower when first used

    def __getstate__(self) -> dict:
        return FoldedTowerCache().__dict__
