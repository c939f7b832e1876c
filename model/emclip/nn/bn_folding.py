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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .inference_copy import direct_feeds, flatten, replace_submodule, same_outputs, submodules

log = logging.getLogger("emclip")

__all__ = ["FoldedTowerCache", "fold_batchnorms", "tower_state"]


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


def tower_state(module: nn.Module) -> tuple[bool, tuple]:
    """``(training, key)`` of ``module`` in one pass over its tree: whether any submodule is in
    training mode, and a key that changes whenever any parameter or buffer is modified in place,
    replaced or moved (or a submodule replaced). It runs before every inference call, so it walks
    the private ``_modules``/``_parameters``/``_buffers`` dicts (:func:`.inference_copy.submodules`):
    ~0.2 ms on EfficientNet-Lite0 against ~0.8 ms for ``modules()`` + ``parameters()`` + ``buffers()``."""
    training = False
    key: list[tuple] = []
    for m in submodules(module):
        training = training or m.training
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                key.append((id(t), t.data_ptr(), 0 if t.is_inference() else t._version))
    return training, tuple(key)


@dataclass
class _Copy:
    key: tuple
    module: nn.Module
    folded: int
    prepacked: int
    flat: Callable[[torch.Tensor], Any] | None


class FoldedTowerCache:
    """A BatchNorm-folded copy of a tower (one per ``prepack`` setting), rebuilt when the tower's
    weights change; with ``prepack`` its convolutions also keep their weights in oneDNN's layout
    (:mod:`.conv_prepacking`) and it runs as one flat function (:func:`.inference_copy.flatten`).

    Not an ``nn.Module`` on purpose: the copy is neither in the owner's ``state_dict`` nor in its
    ``parameters()``, so saving, fine-tuning and optimisers only ever see the original.
    """

    def __init__(self) -> None:
        self._built: dict[bool, _Copy] = {}  # one per prepack setting
        self._current: _Copy | None = None  # the copy the last call ran

    @property
    def _tower(self) -> nn.Module | None:
        return None if self._current is None else self._current.module

    @property
    def folded(self) -> int:
        """BatchNorms folded in the copy the last call ran."""
        return 0 if self._current is None else self._current.folded

    @property
    def prepacked(self) -> int:
        """Convolutions prepacked in the copy the last call ran."""
        return 0 if self._current is None else self._current.prepacked

    @property
    def flattened(self) -> bool:
        """Whether the last call's copy runs as one flat function."""
        return self._current is not None and self._current.flat is not None

    def run(self, tower: nn.Module, call: Callable[[nn.Module, torch.Tensor], Any], x: torch.Tensor,
            prepack: bool = False, key: tuple | None = None) -> Any:
        """``call(copy, x)`` with the folded copy of ``tower`` (built on ``x``, see
        :func:`fold_batchnorms`); with ``prepack``, its convolutions prepacked
        (:func:`.conv_prepacking.prepack_convolutions`) and the whole call flattened. One copy is
        kept per value of ``prepack``, so switching it back and forth rebuilds nothing. ``key``:
        anything that changes with the tower's weights and with what ``call`` does, default
        ``tower_state(tower)[1]`` (the flat function bakes in ``call``'s arguments)."""
        if key is None:
            key = tower_state(tower)[1]
        prepack = bool(prepack)
        entry = self._built.get(prepack)
        if entry is None or entry.key != key:
            self._built = {p: e for p, e in self._built.items() if e.key == key}  # drop copies of old weights
            entry = self._built[prepack] = self._build(tower, call, x, prepack, key)
        self._current = entry
        if entry.flat is None:
            return call(entry.module, x)
        try:
            return entry.flat(x)
        except Exception as exc:  # noqa: BLE001 - decided below by whether the modules take the input
            out = call(entry.module, x)  # a bad input raises here too, and the flat function stays
            log.warning("the flattened %s failed on a %s input (%s); it runs as modules from now on",
                        type(tower).__name__, tuple(x.shape), exc)
            entry.flat = None
            return out

    @staticmethod
    def _build(tower: nn.Module, call: Callable[[nn.Module, torch.Tensor], Any], x: torch.Tensor,
               prepack: bool, key: tuple) -> _Copy:
        def run(m: nn.Module) -> Any:
            return call(m, x)

        module, folded = fold_batchnorms(tower, run)
        prepacked, flat = 0, None
        if prepack:
            from .conv_prepacking import PrepackedConv2d, prepack_convolutions

            module, prepacked = prepack_convolutions(module, run)
            if prepacked:
                flat = flatten(module, call, x, leaves=(PrepackedConv2d,))
        return _Copy(key, module, folded, prepacked, flat)

    def __deepcopy__(self, memo: dict) -> FoldedTowerCache:
        return FoldedTowerCache()  # a copied model folds its own tower when first used

    def __getstate__(self) -> dict:
        return FoldedTowerCache().__dict__
