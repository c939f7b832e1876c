"""Mask post-processing: keep one connected object for structures that are one object.

An optic disc, an optic cup or a left ventricle is a single connected region in a 2D image; a
segmentation that also marks a bright blob at the edge of a fundus photograph or a vessel
beside the heart is wrong there. For the prompts whose structure is listed in the model's
``config.single_object`` (canonical names; synonyms resolve through :mod:`emclip.prompts`),
:func:`keep_single_object` keeps the connected component (8-connected in 2D, 26 in 3D) with the
largest probability mass and clears the rest. ``benchmarks/bench_single_object.py`` proposes the
list per structure from the *source domain's* validation images (as nnU-Net does: on when it does
not lower Dice there). An empty list turns it off; the bundled model keeps it empty, because the
list chosen that way lowered Dice on an unseen scanner (MODEL_CARD.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["keep_single_object", "single_object_flags", "single_object_prompts"]


def _canonical(name: str) -> str:
    from .prompts import canonical_name, clean_prompt

    return canonical_name(name) or clean_prompt(name).casefold()


def single_object_flags(model: Any, prompts: Sequence[str]) -> list[bool]:
    """For each prompt, whether ``model.config.single_object`` names its structure."""
    listed = getattr(getattr(model, "config", None), "single_object", None) or []
    wanted = {_canonical(s) for s in listed}
    return [bool(wanted) and _canonical(str(p)) in wanted for p in prompts]


def single_object_prompts(prompts: Sequence[str], flags: Sequence[bool]) -> list[str]:
    """The prompts whose masks were reduced to one object (``result.info["single_object"]``)."""
    return [str(p) for p, f in zip(prompts, flags) if f]


def keep_single_object(mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """``mask`` (bool, 2D or 3D) reduced to its connected component with the largest sum of
    ``probability`` (same shape). An empty or one-component mask is returned unchanged."""
    from scipy import ndimage

    structure = np.ones((3,) * mask.ndim, dtype=bool)
    labels, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    mass = ndimage.sum_labels(probability, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(mass)) + 1)
