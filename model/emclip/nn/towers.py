"""What the image and the text encoder do alike with their open_clip tower: freezing it, keeping
frozen parts in eval mode through ``model.train()``, and loading pretrained tower weights
strictly with a message that names what does not fit."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import PretrainedWeightsUnavailable


def freeze(module: nn.Module) -> None:
    """No gradients into any parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)


def set_mode_keeping_frozen(module: nn.Module, mode: bool, frozen: Iterable[nn.Module]) -> None:
    """``nn.Module.train(mode)`` on ``module``, then the ``frozen`` sub-modules back to eval mode
    (their norm statistics and dropout stay those of the pretrained tower)."""
    nn.Module.train(module, mode)
    for m in frozen:
        m.eval()


def load_matching_weights(
    tower: nn.Module, sd: dict[str, torch.Tensor], *, section: str, source: str, advice: str = ""
) -> int:
    """Load the entries of ``sd`` the tower has (others, e.g. heads or position ids, are ignored)
    and return how many were loaded. A tower weight missing from ``sd`` or of another shape raises
    :class:`PretrainedWeightsUnavailable` naming ``section`` (``image_encoder``/``text_encoder``),
    the ``source`` and the first keys concerned, followed by ``advice``."""
    own = tower.state_dict()
    matched = {k: v for k, v in sd.items() if k in own}
    missing = sorted(k for k in own if k not in matched)
    wrong = sorted(k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape))
    if missing or wrong:
        detail = [f"missing {len(missing)}: {missing[:5]}"] if missing else []
        if wrong:
            detail.append(f"shape mismatch: {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}")
        tower_name = section.split("_")[0]
        raise PretrainedWeightsUnavailable(
            f"{tower_name} tower weights from {source} do not fit this {section} config ({'; '.join(detail)}){advice}"
        )
    tower.load_state_dict(matched, strict=True)
    return len(matched)
