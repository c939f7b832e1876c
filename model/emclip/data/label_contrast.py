"""Random per-structure contrast for single-source domain generalisation (training only).

Another MRI sequence keeps the anatomy but changes how bright each tissue is *relative to the
others*: in cine bSSFP the ventricles' blood is the brightest thing in the heart, in LGE it is a
dull grey close to the tissue around it. A global intensity mapping
(:mod:`emclip.data.intensity_remap`) cannot teach that, because it maps equal intensities to equal
intensities everywhere. Following the contrast randomisation of SynthSeg (Billot et al., Medical
Image Analysis 2023), each call draws a random gain and offset **per label value** of the training
mask (background included), blurs the resulting gain/offset maps so that no artificial step is
drawn exactly on the label boundary, applies them, and rescales with the robust 0.5-99.5 % window of
the inference preprocessing (:func:`emclip.data.intensity_remap.rescale_to_unit`). The model
then has to find the structures by shape and context, not by one fixed contrast between them.

Deterministic given ``rng``. Works on float RGB ``(H, W, 3)`` in [0, 1] and the integer label map of
the same height and width; labels are untouched.
"""

from __future__ import annotations

import numpy as np

from .intensity_remap import rescale_to_unit

__all__ = ["random_label_contrast"]


def random_label_contrast(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    max_log_gain: float = 0.7,
    max_offset: float = 0.15,
    blur_sigma: tuple[float, float] = (0.5, 2.0),
) -> np.ndarray:
    """Give every label value of ``labels`` (H, W) its own random contrast in ``image`` (H, W, 3).

    Per label value: gain ``exp(U(-max_log_gain, max_log_gain))`` (default 0.7: ~0.5x to 2x) and
    offset ``U(-max_offset, max_offset)`` (default 0.15), the same for the three channels; the maps
    are Gaussian-blurred with a sigma drawn from ``blur_sigma`` pixels (default 0.5-2). Returns
    float32 (H, W, 3) in [0, 1]; a result without contrast left returns a copy of the input.
    """
    import cv2

    if image.ndim != 3 or labels.shape != image.shape[:2]:
        raise ValueError(f"expected an (H, W, C) image and an (H, W) label map, got {image.shape} and {labels.shape}")
    x = image.astype(np.float32, copy=False)
    values, index = np.unique(labels, return_inverse=True)
    index = index.reshape(labels.shape)
    gains = np.exp(rng.uniform(-max_log_gain, max_log_gain, len(values))).astype(np.float32)
    offsets = rng.uniform(-max_offset, max_offset, len(values)).astype(np.float32)
    sigma = float(rng.uniform(*blur_sigma))
    gain_map = cv2.GaussianBlur(gains[index], (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    offset_map = cv2.GaussianBlur(offsets[index], (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    out = x * gain_map[..., None] + offset_map[..., None]
    return rescale_to_unit(out, fallback=x)
