"""What the inference copies of a tower (:mod:`.bn_folding`, :mod:`.conv_prepacking`) share:
finding which module's output goes straight into which, swapping submodules, comparing outputs,
and running a copy as one flat generated function."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

log = logging.getLogger("emclip")

__all__ = ["direct_feeds", "flatten", "replace_submodule", "same_outputs", "submodules"]


def direct_feeds(
    module: nn.Module,
    run: Callable[[nn.Module], Any],
    producer: Callable[[nn.Module], bool],
    consumer: Callable[[nn.Module], bool],
) -> list[tuple[str, str]]:
    """``(producer name, consumer name)`` where a ``consumer`` module's input is exactly the output
    of a ``producer`` module, unchanged, found by running ``run(module)`` once. A producer called
    more than once (shared weights), feeding more than one consumer, or whose output was changed
    in place before the consumer read it (ResNet's ``x += shortcut`` between ``conv2`` and
    ``act2``) is left out: merging the pair would change the result.

    The pass runs outside inference mode (without gradients), so that the tensors it makes keep
    the version counters that show in-place changes. If ``run`` cannot run there but runs in the
    caller's mode (it changes an inference-mode tensor in place), no pair is returned: the copies
    then keep every module. Errors that ``run`` raises in both modes (a bad input) propagate."""
    names = {m: n for n, m in module.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}  # the tensor is kept so its id is not reused
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def after(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor) and not out.is_inference():
            produced[id(out)] = (names[m], out, out._version)
        calls[names[m]] = calls.get(names[m], 0) + 1

    def before(m: nn.Module, inp: tuple[Any, ...]) -> None:
        src = produced.get(id(inp[0])) if inp else None
        if src is not None and src[1] is inp[0] and inp[0]._version == src[2]:
            pairs.append((src[0], names[m]))

    hooks = [m.register_forward_hook(after) for m in module.modules() if producer(m)]
    hooks += [m.register_forward_pre_hook(before) for m in module.modules() if consumer(m)]
    try:
        with torch.inference_mode(False), torch.no_grad():
            run(module)
    except RuntimeError as exc:
        with torch.no_grad():  # in the caller's mode: a bad input raises here too, for the caller
            run(module)
        log.debug("direct_feeds: %s cannot run outside inference mode (%s)", type(module).__name__, exc)
        return []
    finally:
        for h in hooks:
            h.remove()
    sources = [p for p, _ in pairs]
    return [(p, c) for p, c in pairs if calls.get(p) == 1 and sources.count(p) == 1]


def submodules(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and each of its submodules once, as ``module.modules()`` but without building
    their names: it walks the private ``_modules`` dicts, ~4x cheaper, for checks that run before
    every inference call (0.4 -> 0.1 ms over EM-CLIP's 451 modules)."""
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack.extend(c for c in m._modules.values() if c is not None)


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


def flatten(
    module: nn.Module,
    call: Callable[[nn.Module, torch.Tensor], Any],
    x: torch.Tensor,
    leaves: tuple[type, ...],
) -> Callable[[torch.Tensor], Any] | None:
    """``call(module, ·)`` as one generated function (``torch.fx``): the blocks and containers
    around the ``leaves`` are inlined and the ``nn.Identity`` placeholders that folding leaves
    behind are dropped, so an EfficientNet-Lite0 forward makes 48 module calls instead of ~270
    (x0.97 of the whole batch-1 forward, BENCHMARKS.md, issue 6). Nothing is baked in from ``x``:
    shapes stay free. Returns None when ``call`` cannot be traced (Python that branches on
    values or shapes) or the function's outputs on ``x`` differ from ``call(module, x)``."""

    class _Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, inp: torch.Tensor) -> Any:
            return call(self.inner, inp)

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualified_name)

    root = _Call()
    try:
        flat = fx.GraphModule(root, _Tracer().trace(root))
        for node in list(flat.graph.nodes):
            if node.op == "call_module" and isinstance(flat.get_submodule(node.target), nn.Identity):
                node.replace_all_uses_with(node.args[0])
                flat.graph.erase_node(node)
        flat.recompile()
        with torch.no_grad():
            ok = same_outputs(call(module, x), flat(x))
    except Exception as exc:  # noqa: BLE001 - fx fails in many ways on arbitrary towers; they run as modules
        log.debug("%s runs as modules: it cannot be flattened (%s)", type(module).__name__, exc)
        return None
    if not ok:
        log.warning("the flattened %s changed the outputs; it runs as modules", type(module).__name__)
        return None
    return flat
