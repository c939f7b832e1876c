"""Random intensity remapping for single-source domain generalisation (training only).

A new scanner or camera mostly changes how tissue maps to intensity (bSSFP -> LGE, one fundus
camera -> another) while shapes stay. Following the idea of global intensity non-linear
augmentation (GIN) and interventional pseudo-correlation augmentation (IPA) from Ouyang et al.,
"Causality-inspired single-source domain generalization for medical image segmentation"
(IEEE TMI 2022), each call:

1. passes the image through a shallow convolutional network whose weights are freshly drawn
   (``layers`` 1x1 / 3x3 convolutions, ``width`` hidden channels, leaky ReLU in between) — a random,
   spatially local, non-linear intensity/colour mapping that keeps edges and shapes;
2. blends it with the input by a random factor and restores the input's overall energy;
3. with probability ``ipa_p`` does this twice and mixes the two remappings through a smooth random
   field (a coarse random grid upsampled bicubically), so the mapping also varies across the image;
4. rescales the result to [0, 1] with the robust 0.5-99.5 % window the inference preprocessing
   uses (:func:`emclip.preprocess.to_float_rgb`), so a few extreme pixels do not wash it out.

Deterministic given ``rng``. Works on float RGB ``(H, W, 3)`` in [0, 1]; labels are untouched.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_intensity_remap", "rescale_to_unit"]


def rescale_to_unit(out: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``out`` mapped to [0, 1] (float32, clipped) with its 0.5-99.5 % window, as the inference
    preprocessing does; a copy of ``fallback`` when that window is flat (below 1e-6)."""
    lo, hi = (float(v) for v in np.percentile(out, (0.5, 99.5)))
    if hi - lo < 1e-6:
        return fallback.copy()
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _random_network(image: np.ndarray, rng: np.random.Generator, layers: int, width: int) -> np.ndarray:
    """One freshly drawn conv net applied to ``image`` (H, W, C) -> (H, W, C), float32."""
    import torch
    import torch.nn.functional as F

    c = image.shape[2]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    for k in range(layers):
        c_out = c if k == layers - 1 else width
        size = int(rng.choice([1, 3]))
        w = torch.from_numpy(rng.standard_normal((c_out, x.shape[1], size, size)).astype(np.float32))
        b = torch.from_numpy(rng.standard_normal(c_out).astype(np.float32))
        if size > 1:  # replicate borders: zero padding would draw a false edge round the image
            x = F.pad(x, (size // 2,) * 4, mode="replicate")
        x = F.conv2d(x, w, b)
        if k < layers - 1:
            x = F.leaky_relu(x, 0.2)
    return x[0].numpy().transpose(1, 2, 0)


def _blend_and_renormalise(image: np.ndarray, remapped: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha = float(rng.uniform(0.0, 1.0))
    out = alpha * remapped + (1.0 - alpha) * image
    norm_in = float(np.linalg.norm(image))
    norm_out = float(np.linalg.norm(out))
    return out * (norm_in / norm_out) if norm_out > 1e-8 else image.copy()


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth random map in [0, 1] of ``shape``: a 3..8 cell random grid, bicubic upsampling."""
    import cv2

    cells = int(rng.integers(3, 9))
    grid = rng.uniform(0.0, 1.0, (cells, cells)).astype(np.float32)
    field = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0.0, 1.0)[..., None]


def random_intensity_remap(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    layers: int = 4,
    width: int = 2,
    ipa_p: float = 0.5,
) -> np.ndarray:
    """Randomly remap the intensities of float RGB ``image`` (H, W, 3) in [0, 1].

    ``layers`` (default 4) and ``width`` (default 2) size the random network; ``ipa_p``
    (default 0.5) is the chance of mixing two remappings through a smooth random field.
    Returns float32 (H, W, 3) in [0, 1] with the input's spatial structure.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    x = image.astype(np.float32, copy=False)
    out = _blend_and_renormalise(x, _random_network(x, rng, layers, width), rng)
    if rng.uniform() < ipa_p:
        other = _blend_and_renormalise(x, _random_network(x, rng, layers, width), rng)
        field = _smooth_field(x.shape[:2], rng)
        out = field * out + (1.0 - field) * other
    return rescale_to_unit(out, fallback=x)
