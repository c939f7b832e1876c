"""What the inference copies of a tower (:mod:`.bn_folding`, :mod:`.conv_prepacking`) share:
finding which module's output goes straight into which, swapping submodules, comparing outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["direct_feeds", "replace_submodule", "same_outputs"]


def direct_feeds(
    module: nn.Module,
    run: Callable[[nn.Module], Any],
    producer: Callable[[nn.Module], bool],
    consumer: Callable[[nn.Module], bool],
) -> list[tuple[str, str]]:
    """``(producer name, consumer name)`` where a ``consumer`` module's input is exactly the output
    of a ``producer`` module, found by running ``run(module)`` once. A producer called more than
    once (shared weights) or feeding more than one consumer is left out: changing it would change
    its other uses."""
    names = {m: n for n, m in module.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept so its id is not reused
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def after(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        produced[id(out)] = (names[m], out)
        calls[names[m]] = calls.get(names[m], 0) + 1

    def before(m: nn.Module, inp: tuple[Any, ...]) -> None:
        src = produced.get(id(inp[0])) if inp else None
        if src is not None and src[1] is inp[0]:
            pairs.append((src[0], names[m]))

    hooks = [m.register_forward_hook(after) for m in module.modules() if producer(m)]
    hooks += [m.register_forward_pre_hook(before) for m in module.modules() if consumer(m)]
    try:
        with torch.no_grad():
            run(module)
    finally:
        for h in hooks:
            h.remove()
    sources = [p for p, _ in pairs]
    return [(p, c) for p, c in pairs if calls.get(p) == 1 and sources.count(p) == 1]


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) of ``root`` is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def same_outputs(a: Any, b: Any) -> bool:
    """Equal outputs (tensors within rtol 1e-3, nested lists/tuples, other values by ``==``)."""
    if isinstance(a, torch.Tensor):
        scale = float(a.abs().max()) if a.numel() else 0.0
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, scale)))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b))
    return a == b
