"""Augmentation for cross-scanner / cross-camera generalisation (albumentations).

Works on the output of :func:`emclip.preprocess.to_float_rgb` (float32 RGB in [0, 1]) and the
integer label map, *before* the letterbox, so training and inference share the geometry step.

Everything is an albumentations transform, including the style mixing: ``A.FDA`` swaps the
low-frequency amplitude spectrum of the image with that of another training image (Fourier
domain adaptation, the amplitude-spectrum style mixing used in domain generalisation); the
reference image is passed per call (``fda_metadata=[other]``).

Randomness: albumentations has its own generators; :func:`augment` seeds them per call, so an
augmented sample depends only on (seed, epoch, index) — needed for exact resume and for
identical results with any number of data-loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

STRENGTHS = ("none", "light", "default", "strong")
STRENGTH_FACTORS = {"none": 0.0, "light": 0.5, "default": 1.0, "strong": 1.5}


@dataclass
class AugmentConfig:
    """``strength``: none | light | default | strong; ``style_mix_p``: probability of FDA
    amplitude mixing with another image of the same dataset (0 disables, default 0.3);
    ``style_mix_beta``: upper bound of the swapped low-frequency window (fraction of the
    spectrum, default 0.05); ``flips``: allow horizontal/vertical flips (default True; turn off
    when left/right matters); ``remap_p``: probability of a random intensity remapping
    (:func:`emclip.data.intensity_remap.random_intensity_remap`, GIN/IPA-style; default 0, off;
    single images only: multi-sequence samples get their per-sequence jitter instead);
    ``scale``: ``(low, high)`` zoom range of the random affine (> 1 zooms in, so the structures
    fill more of the frame), default None = ``1 -/+ 0.2`` times the strength factor
    (``(0.8, 1.2)`` for "default"); with strength "none" there is no affine at all;
    ``label_contrast_p``: probability of a random contrast per labelled structure
    (:func:`emclip.data.label_contrast.random_label_contrast`, SynthSeg-style; default 0, off;
    single images only); ``label_contrast_modalities``: canonical modality keys it applies to
    (e.g. ``["cardiac_mri"]``, see :data:`emclip.prompts.MODALITY_ALIASES`; default None = all)."""

    strength: str = "default"
    style_mix_p: float = 0.3
    style_mix_beta: float = 0.05
    flips: bool = True
    remap_p: float = 0.0
    scale: tuple[float, float] | None = None
    label_contrast_p: float = 0.0
    label_contrast_modalities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.strength not in STRENGTHS:
            raise ConfigError(f"augment.strength must be one of {STRENGTHS}, got {self.strength!r}")
        if not 0 <= self.style_mix_p <= 1:
            raise ConfigError(f"augment.style_mix_p must be in [0, 1], got {self.style_mix_p}")
        if not 0 <= self.style_mix_beta <= 0.5:
            raise ConfigError(f"augment.style_mix_beta must be in [0, 0.5], got {self.style_mix_beta}")
        if not 0 <= self.remap_p <= 1:
            raise ConfigError(f"augment.remap_p must be in [0, 1], got {self.remap_p}")
        if self.scale is not None:
            low, high = (float(v) for v in self.scale)
            if not 0.25 <= low <= high <= 4.0:
                raise ConfigError(
                    f"augment.scale must be [low, high] with 0.25 <= low <= high <= 4 "
                    f"(1 = no zoom), got {list(self.scale)}"
                )
            self.scale = (low, high)
        if not 0 <= self.label_contrast_p <= 1:
            raise ConfigError(f"augment.label_contrast_p must be in [0, 1], got {self.label_contrast_p}")
        if self.label_contrast_modalities is not None:
            from ..prompts import MODALITY_ALIASES

            keys = tuple(str(m) for m in self.label_contrast_modalities)
            unknown = [m for m in keys if m not in MODALITY_ALIASES]
            if unknown:
                raise ConfigError(
                    f"augment.label_contrast_modalities: unknown {unknown}; use the canonical keys "
                    f"{sorted(MODALITY_ALIASES)}"
                )
            self.label_contrast_modalities = keys

    def label_contrast_applies(self, modality_key: str | None) -> bool:
        """Whether the per-structure contrast may be drawn for a sample of this canonical modality."""
        if self.label_contrast_p <= 0:
            return False
        return self.label_contrast_modalities is None or modality_key in self.label_contrast_modalities

    def zoom_range(self) -> tuple[float, float]:
        """``scale`` or the default range of ``strength`` (``(1, 1)`` for "none")."""
        if self.scale is not None:
            return self.scale
        k = STRENGTH_FACTORS[self.strength]
        return (1 - 0.2 * k, 1 + 0.2 * k)


def _identity(image: np.ndarray) -> np.ndarray:
    """FDA ``read_fn``: references are passed as arrays already (module-level so it pickles)."""
    return image


def build_augmentation(cfg: AugmentConfig | None = None):
    """An ``A.Compose`` for image (float RGB) + mask, or None when ``strength == "none"``
    and style mixing is off."""
    import albumentations as A
    import cv2

    cfg = cfg or AugmentConfig()
    if cfg.strength == "none" and cfg.style_mix_p == 0:
        return None
    k = STRENGTH_FACTORS[cfg.strength]
    ops = []
    if cfg.style_mix_p > 0:
        ops.append(A.FDA(reference_images=None, beta_limit=(0.0, cfg.style_mix_beta), read_fn=_identity,
                         p=cfg.style_mix_p))
    if k > 0:
        ops += [
            A.Affine(scale=cfg.zoom_range(), rotate=(-15 * k, 15 * k),
                     translate_percent=(-0.05 * k, 0.05 * k), interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0,
                     fill_mask=0, p=min(1.0, 0.6 * k)),
        ]
        if cfg.flips:
            ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.2)]
        ops += [
            A.RandomBrightnessContrast(brightness_limit=0.2 * k, contrast_limit=0.25 * k, p=min(1.0, 0.6 * k)),
            A.RandomGamma(gamma_limit=(100 - 30 * k, 100 + 30 * k), p=min(1.0, 0.4 * k)),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(1 - 0.3 * k, 1 + 0.3 * k),
                          hue=(-0.04 * k, 0.04 * k), p=min(1.0, 0.4 * k)),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 1.5 * k)),
                     A.Downscale(scale_range=(max(0.3, 1 - 0.4 * k), 0.95))], p=min(1.0, 0.25 * k)),
            A.GaussNoise(std_range=(0.0, 0.05 * k), p=min(1.0, 0.25 * k)),
        ]
    return A.Compose(ops)


def augment(
    pipeline,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``pipeline`` to float RGB ``image`` (H, W, 3) and ``labels`` (H, W) with a fixed seed.

    ``reference`` (float RGB, any size) is the style source for FDA; without it FDA is skipped.
    Returns float32 image in [0, 1] and the label map with its original dtype.
    """
    if pipeline is None:
        return image, labels
    pipeline.set_random_seed(int(seed) % (2**32))
    dtype = labels.dtype
    mask = labels.astype(np.uint16 if labels.max(initial=0) > 255 else np.uint8, copy=False)
    kwargs = {}
    has_fda = any(type(t).__name__ == "FDA" for t in pipeline.transforms)
    if has_fda:
        kwargs["fda_metadata"] = [reference if reference is not None else image]
    out = pipeline(image=image, mask=mask, **kwargs)
    img = np.clip(out["image"].astype(np.float32, copy=False), 0.0, 1.0)
    return img, out["mask"].astype(dtype, copy=False)
