"""CPU inference copies of CNN towers whose convolutions keep their weights in oneDNN's layout.

Eager ``F.conv2d`` on a CPU converts a convolution's weights to oneDNN's blocked layout on
every call. :func:`prepack_convolutions` returns a copy of a module in which each plain
``nn.Conv2d`` (and timm's ``Conv2dSame``) is a :class:`PrepackedConv2d`: it converts its weights
once per input shape and thread count and runs ``torch.ops.mkldnn._convolution_pointwise``, the convolution
``torch.compile``'s CPU backend emits, with a ReLU or ReLU6 that directly follows the
convolution applied inside it. On the bundled model's BatchNorm-folded EfficientNet tower this
makes the whole batch-1 forward x0.88 at 2 threads with bit-identical outputs (BENCHMARKS.md,
issue 6).

TF "same" padding (timm's ``Conv2dSame``) pads one row and column more at the end than at the
start, which oneDNN's symmetric padding cannot express, so the input is copied into a padded
buffer first. A depthwise convolution instead gets one zero tap prepended to its kernel on each
uneven axis and one more row/column of symmetric padding: the same sums, with the same values in
the same order (bit-identical outputs), without writing the padded copy (the stride-2 depthwise
convolution of EfficientNet-Lite0's stage 2: 0.26 -> 0.15 ms for one image, 1.11 -> 0.43 ms for
the mirrored pair). Dense convolutions keep the copy: oneDNN runs the widened 4x4 stem kernel
2.4x slower than the padded 3x3 one.

The copy is checked against the module on the same input and discarded if any output differs;
it is only built for float32 CPU modules when this torch has the oneDNN ops. Anything else keeps
the module as it is, so callers need no checks of their own.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .inference_copy import direct_feeds, replace_submodule, same_outputs

log = logging.getLogger("emclip")

__all__ = ["PrepackedConv2d", "can_prepack", "prepack_convolutions"]

MAX_SHAPES = 4
"""Weights kept in oneDNN's layout for at most this many input shapes (and thread counts) per
convolution (LRU)."""

_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}


def _ops() -> tuple[Callable, Callable] | None:
    """The oneDNN convolution and weight-reorder ops, or None where this torch lacks them."""
    try:
        conv = torch.ops.mkldnn._convolution_pointwise
        reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
    except (AttributeError, RuntimeError):
        return None
    return conv, reorder


def can_prepack(module: nn.Module) -> bool:
    """True if ``module``'s parameters are float32 on the CPU and this torch has oneDNN's ops."""
    params = list(module.parameters())
    return (
        bool(params)
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        and torch.backends.mkldnn.is_available()
        and _ops() is not None
    )


def _is_convertible(m: nn.Module) -> bool:
    kind = type(m)
    same = kind.__name__ == "Conv2dSame"  # timm: TF "same" padding computed per input, then padding 0
    return (
        (kind is nn.Conv2d or same)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.weight.dim() == 4
    )


class PrepackedConv2d(nn.Module):
    """A ``Conv2d`` (float32, CPU, inference) whose weights are reordered once per input shape
    and torch thread count.

    ``activation``: None, ``nn.ReLU`` or ``nn.ReLU6`` applied to the output inside the op.
    """

    def __init__(self, conv: nn.Conv2d, activation: type | None = None) -> None:
        super().__init__()
        self.same_padding = type(conv).__name__ == "Conv2dSame"
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = list(conv.stride)
        self.padding = [0, 0] if self.same_padding else list(conv.padding)
        self.dilation = list(conv.dilation)
        self.groups = int(conv.groups)
        self.weight = conv.weight.detach().contiguous()
        self.bias = None if conv.bias is None else conv.bias.detach().contiguous()
        self.attr, self.scalars = _ACTIVATIONS[activation] if activation else ("none", [])
        self.depthwise = self.groups > 1 and self.groups == conv.in_channels
        self._packed: dict[tuple[int, ...], tuple[torch.Tensor, tuple[int, ...] | None, list[int]]] = {}
        self._conv = _ops()[0]

    def _weight_for(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...] | None, list[int]]:
        """For an input ``shape``, cached together: the packed weights, the padded copy to make
        first (``F.pad``'s ``(left, right, top, bottom)``, None for none) and the convolution's
        own symmetric padding ``[rows, columns]``."""
        # oneDNN picks its kernel, and so the weight layout, for the input shape and the thread
        # count: weights packed for 2 threads run 20-30x slower at 1 thread (BENCHMARKS.md).
        key = (*shape, torch.get_num_threads())
        entry = self._packed.pop(key, None)
        if entry is None:
            _, reorder = _ops()
            weight, pad, padding = self.weight, None, self.padding
            if self.same_padding:  # timm's Conv2dSame: TF "same" padding for this input size
                from timm.layers.padding import pad_same_arg

                pad = tuple(pad_same_arg(list(shape[-2:]), list(self.kernel_size), self.stride, self.dilation))
                pad = pad if any(pad) else None
                if pad is not None and self.depthwise and self.dilation == [1, 1]:
                    weight, padding = _zero_taps_for(weight, pad)
                    pad = None
            padded = list(shape) if pad is None else [*shape[:-2], shape[-2] + pad[2] + pad[3], shape[-1] + pad[0] + pad[1]]
            entry = (reorder(weight.to_mkldnn(), padding, self.stride, self.dilation, self.groups, padded), pad, padding)
            while len(self._packed) >= MAX_SHAPES:
                self._packed.pop(next(iter(self._packed)))
        self._packed[key] = entry  # most recently used last
        return entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, pad, padding = self._weight_for(tuple(x.shape))
        if pad is not None:
            x = F.pad(x, pad)
        return self._conv(x, weight, self.bias, padding, self.stride, self.dilation, self.groups, self.attr,
                          self.scalars, "")

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, groups={self.groups}, activation={self.attr}")


def _zero_taps_for(weight: torch.Tensor, pad: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """``weight [O, I, kh, kw]`` and TF "same" ``pad`` ``(left, right, top, bottom)`` (each end
    pads at most one more than the start) -> the kernel with a zero row/column prepended on each
    uneven axis, and the symmetric padding ``[rows, columns]`` that gives the same outputs.

    Output row ``i`` of the padded input sees input rows ``s*i - top ... s*i - top + kh - 1``; the
    widened kernel with ``top + 1`` rows of padding sees one more row in front, times the zero tap.
    """
    left, right, top, bottom = pad
    dh, dw = bottom - top, right - left  # 0 or 1 for TF "same" padding
    o, i, kh, kw = weight.shape
    wide = weight.new_zeros(o, i, kh + dh, kw + dw)
    wide[:, :, dh:, dw:] = weight
    return wide, [top + dh, left + dw]


@torch.no_grad()
def prepack_convolutions(module: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[nn.Module, int]:
    """An inference copy of ``module`` with its convolutions as :class:`PrepackedConv2d`.

    ``run(m)`` runs ``m`` on a representative input and returns its output(s); it is used to find
    the convolution -> ReLU/ReLU6 pairs and to check the copy (same outputs within rtol 1e-3).
    Returns ``(copy, n_converted)``, or ``(module, 0)`` when the module cannot be prepacked
    (:func:`can_prepack`), has no convolution, or the copy's outputs differ.
    """
    if not can_prepack(module):
        return module, 0
    packed = copy.deepcopy(module).eval()
    fused = dict(direct_feeds(packed, run, _is_convertible, lambda m: type(m) in _ACTIVATIONS))
    convs = [n for n, m in packed.named_modules() if _is_convertible(m)]
    if not convs:
        return module, 0
    for name in convs:
        act = fused.get(name)
        activation = type(packed.get_submodule(act)) if act else None
        replace_submodule(packed, name, PrepackedConv2d(packed.get_submodule(name), activation))
        if act:
            replace_submodule(packed, act, nn.Identity())
    try:
        ok = same_outputs(run(module), run(packed))
    except RuntimeError as exc:  # an op this oneDNN build refuses: keep the module
        log.warning("prepacked convolutions failed (%s); using %s as it is", exc, type(module).__name__)
        return module, 0
    if not ok:
        log.warning("prepacked convolutions changed the outputs of %s; using it as it is", type(module).__name__)
        return module, 0
    return packed, len(convs)
