"""Unlabelled training images for semi-supervised training (mean teacher, pseudo-labels).

Two sources of unlabelled images:

- images without a mask in a dataset folder (opened with ``allow_unlabelled=True``);
- labelled images whose masks are *hidden*: :func:`select_labelled` keeps the masks of a
  ``fraction`` of the training patients (meta.csv ``patient``/``case`` groups, drawn with
  ``random.Random(seed)``) and returns the rest as unlabelled — the "1 % / 5 % labelled" protocol.

:class:`UnlabelledDataset` yields two views of each image with the *same* geometry (so the pixels
correspond): a weak view (geometric augmentation only, for the teacher) and a strong view (the
same geometry plus strong intensity/colour changes, blur, noise and cutout, for the student).
Randomness of sample ``i`` in epoch ``e`` comes from ``SeedSequence([seed, e, i])`` as in
:class:`~emclip.data.training.PromptedDataset` (exact resume).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .augment import AugmentConfig, augment, build_augmentation
from .training import PromptedDataset, collate, presize

GEOMETRIC = ("Affine", "HorizontalFlip", "VerticalFlip")


def select_labelled(ds: Any, indices: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split ``indices`` into (labelled, unlabelled) by whole patients.

    The groups (``ds.group_of``) of the samples that have a mask are sorted, shuffled with
    ``random.Random(seed)`` and the first ``max(1, round(fraction * n_groups))`` keep their masks;
    every other sample, and every image without a mask (``ds.has_mask(i)`` False), is unlabelled.
    ``fraction`` in (0, 1]; 1 keeps all masks. Deterministic for a given (dataset, indices, seed).
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"labelled_fraction must be in (0, 1], got {fraction}")
    has_mask = getattr(ds, "has_mask", None)
    with_mask = [i for i in indices if has_mask is None or has_mask(i)]
    groups = sorted({ds.group_of(i) for i in with_mask})
    if fraction >= 1:
        chosen = set(groups)
    else:
        pool = list(groups)
        random.Random(seed).shuffle(pool)
        chosen = set(pool[: max(1, round(fraction * len(groups)))]) if pool else set()
    keep = set(with_mask)
    labelled = [i for i in indices if i in keep and ds.group_of(i) in chosen]
    taken = set(labelled)
    return labelled, [i for i in indices if i not in taken]


def build_strong_photometric(style_mix_p: float = 0.3, style_mix_beta: float = 0.05, noise_std: float = 0.08,
                             cutout_p: float = 0.5):
    """The student's strong view on top of the shared geometry: FDA style mixing (``style_mix_p``),
    brightness/contrast, gamma, saturation/hue, blur or down-scaling, Gaussian noise (std up to
    ``noise_std``) and cutout (1-3 black holes of 10-25 % of each side, probability ``cutout_p``)."""
    import albumentations as A

    from .augment import _identity

    ops = []
    if style_mix_p > 0:
        ops.append(A.FDA(reference_images=None, beta_limit=(0.0, style_mix_beta), read_fn=_identity, p=style_mix_p))
    ops += [
        A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.4, p=0.8),
        A.RandomGamma(gamma_limit=(60, 160), p=0.5),
        A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(0.6, 1.4), hue=(-0.06, 0.06), p=0.3),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0)),
                 A.Downscale(scale_range=(0.4, 0.9))], p=0.3),
    ]
    if noise_std > 0:
        ops.append(A.GaussNoise(std_range=(0.0, noise_std), p=0.5))
    if cutout_p > 0:
        ops.append(A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.25),
                                   hole_width_range=(0.1, 0.25), fill=0, p=cutout_p))
    return A.Compose(ops)


def build_geometric(cfg: AugmentConfig | None = None):
    """Only the geometric transforms (affine, flips) of :func:`build_augmentation` (None when off)."""
    import dataclasses

    import albumentations as A

    full = build_augmentation(dataclasses.replace(cfg or AugmentConfig(), style_mix_p=0.0))
    if full is None:
        return None
    ops = [t for t in full.transforms if type(t).__name__ in GEOMETRIC]
    return A.Compose(ops) if ops else None


class UnlabelledDataset(PromptedDataset):
    """Weak/strong view pairs of unlabelled images, with the dataset's prompts.

    ``ds[i]`` -> the keys of :class:`PromptedDataset` (``image`` is the *strong* view,
    ``targets`` all zero and unused) plus ``image_weak`` (float32 ``[3, S, S]``, same geometry).
    Options: ``augment_cfg`` gives the shared geometry (its strength and flips) and the style
    mixing; ``noise_std`` and ``cutout_p`` tune the strong view.
    """

    def __init__(self, sources, image_size: int, pixel_mean: Sequence[float], pixel_std: Sequence[float], *,
                 augment_cfg: AugmentConfig | None = None, prompt_cfg=None, seed: int = 0, known_names=None,
                 noise_std: float = 0.08, cutout_p: float = 0.5):
        super().__init__(sources, image_size, pixel_mean, pixel_std, train=True, augment_cfg=augment_cfg,
                         prompt_cfg=prompt_cfg, seed=seed, known_names=known_names)
        self.pipeline = None
        self.geometric = build_geometric(self.augment_cfg)
        self.strong = build_strong_photometric(self.augment_cfg.style_mix_p, self.augment_cfg.style_mix_beta,
                                               noise_std, cutout_p)

    def _load(self, src, j: int):
        from ..preprocess import to_float_rgb

        sample = src.dataset[j]
        image = to_float_rgb(sample.image, intensity_range=sample.intensity_range)
        image, _ = presize(image, np.zeros(image.shape[:2], np.uint8), 2 * self.image_size)
        return image, None, sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from ..preprocess import letterbox

        s_idx, j = self.entries[i]
        src = self.sources[s_idx]
        rng, aug_seed = self._rng(i)
        image, _, sample = self._load(src, j)
        dummy = np.zeros(image.shape[:2], np.uint8)
        weak, _ = augment(self.geometric, image, dummy, seed=aug_seed)
        reference = None
        if self.augment_cfg.style_mix_p > 0 and len(src.indices) > 1:
            other = rng.choice(src.indices)
            reference = self._load(src, other)[0]
        strong, _ = augment(self.strong, weak, dummy, seed=aug_seed + 1, reference=reference)
        weak, _ = letterbox(weak, self.image_size)
        strong, _ = letterbox(strong, self.image_size)
        spec = sample.spec
        prompts, names, texts = self._prompts_and_texts(spec, rng, bool(self.prompt_cfg.templates))

        def tensor(x: np.ndarray):
            x = (x.astype(np.float32) - self.mean) / self.std
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

        tensors = {
            "image": tensor(strong),
            "image_weak": tensor(weak),
            "targets": torch.zeros((len(prompts), self.image_size, self.image_size), dtype=torch.uint8),
        }
        return self._sample_dict(tensors, prompts, texts, names, spec, src, sample, i)


def collate_unlabelled(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~emclip.data.training.collate` plus the stacked ``image_weak``."""
    import torch

    out = collate(batch)
    out["image_weak"] = torch.stack([s["image_weak"] for s in batch])
    return out


__all__ = ["UnlabelledDataset", "build_geometric", "build_strong_photometric", "collate_unlabelled",
           "select_labelled"]
