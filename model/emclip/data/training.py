"""Network-ready training/validation samples with per-sample prompt lists.

Every sample goes through the inference preprocessing: :func:`emclip.preprocess.to_float_rgb`
(per-image robust window) -> augmentation (training only) -> :func:`emclip.preprocess.letterbox`
to the model's ``image_size`` (labels with ``is_mask=True``) -> ``(x - pixel_mean) / pixel_std``.

Prompts: each sample carries *all* structures of its dataset — absent ones too, with an empty
target (so the model learns to answer "not here") — and, when training, ``cross_negatives``
structure names of *other* modalities (e.g. "optic cup" on a cardiac slice), also with empty
targets. With probability ``synonym_p`` a structure is named by one of its synonyms
(dataset.yaml + built-in). Templates are applied later by the model / trainer, which knows the
text tower.

All randomness of sample ``i`` in epoch ``e`` comes from ``SeedSequence([seed, e, i])``, so the
stream is identical across resumes, worker counts and DDP ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..prompts import canonical_modality, random_template
from .augment import STRENGTH_FACTORS, AugmentConfig, augment, build_augmentation
from .intensity_remap import random_intensity_remap
from .label_contrast import random_label_contrast


@dataclass
class PromptConfig:
    """``synonym_p``: chance of naming a structure by a synonym (default 0.3, training only);
    ``cross_negatives``: names of other modalities' structures added as empty targets (default 1);
    ``templates``: draw a random modality template per prompt (text models; default True);
    ``max_prompts``: cap per sample (default 16; structures of the sample are kept first)."""

    synonym_p: float = 0.3
    cross_negatives: int = 1
    templates: bool = True
    max_prompts: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.synonym_p <= 1:
            raise ConfigError(f"prompts.synonym_p must be in [0, 1], got {self.synonym_p}")
        if self.cross_negatives < 0 or self.max_prompts < 1:
            raise ConfigError("prompts.cross_negatives must be >= 0 and prompts.max_prompts >= 1")


@dataclass
class Source:
    """One dataset in a run: the dataset object, the sample indices used, and a repeat factor."""

    dataset: Any
    indices: list[int]
    repeat: int = 1
    name: str = ""


def presize(image: np.ndarray, labels: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink (never enlarge) so the long side is at most ``max_side`` (area for the image,
    nearest for labels), keeping the aspect ratio. Only used to bound augmentation cost."""
    import cv2

    h, w = labels.shape
    if max(h, w) <= max_side:
        return image, labels
    s = max_side / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    lab = labels.astype(np.uint16 if labels.max(initial=0) > 255 else np.uint8, copy=False)
    labels = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST).astype(labels.dtype, copy=False)
    return image, labels


class PromptedDataset:
    """A torch-style map dataset over several :class:`Source` objects.

    ``ds[i]`` -> dict with ``image`` (float32 tensor [3, S, S], normalised), ``targets`` (uint8
    tensor [P, S, S]), ``prompts`` (list[str], the structure names asked for), ``texts`` (the same
    wrapped in a random modality template when training with ``templates``), ``names`` (canonical
    structure names, "" for nothing), ``modality`` (dataset.yaml modality), ``dataset``, ``id``.
    ``train=False`` disables augmentation, synonyms and cross-modality negatives.
    ``known_names`` (optional): prompts the model accepts (the U-Net's classes); other cross
    negatives are skipped and synonyms outside it are not used.
    ``sequences`` (models with modality fusion: ``model.sequences``): samples of multi-sequence
    volumes (``channel: all``) become ``image [len(sequences), S, S]`` in that order, each
    sequence in [0, 1] and absent ones all zero, not standardised (the fusion module does it);
    augmentation is then geometric (affine, flips) plus a per-sequence gamma/contrast jitter.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        image_size: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        *,
        train: bool = True,
        augment_cfg: AugmentConfig | None = None,
        prompt_cfg: PromptConfig | None = None,
        seed: int = 0,
        known_names: Callable[[str], bool] | None = None,
        sequences: Sequence[str] | None = None,
    ):
        self.sources = list(sources)
        self.image_size = int(image_size)
        self.mean = np.asarray(pixel_mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(pixel_std, dtype=np.float32).reshape(1, 1, 3)
        self.train = train
        self.augment_cfg = augment_cfg or AugmentConfig()
        self.prompt_cfg = prompt_cfg or PromptConfig()
        self.seed = int(seed)
        self.epoch = 0
        self.known = known_names
        self.pipeline = build_augmentation(self.augment_cfg) if train else None
        self.sequences = list(sequences) if sequences else None
        self.geometric = None
        if self.pipeline is not None and self.sequences:
            import albumentations as A

            keep = ("Affine", "HorizontalFlip", "VerticalFlip")
            self.geometric = A.Compose([op for op in self.pipeline.transforms if type(op).__name__ in keep])
        self.entries: list[tuple[int, int]] = []
        for s_idx, src in enumerate(self.sources):
            for _ in range(max(1, int(src.repeat))):
                self.entries += [(s_idx, j) for j in src.indices]
        # structure names of every modality in the run, for cross-modality negatives
        self._by_modality: dict[str | None, list[str]] = {}
        for src in self.sources:
            key = canonical_modality(src.dataset.spec.modality) or src.dataset.spec.modality
            names = self._by_modality.setdefault(key, [])
            names += [n for n in src.dataset.spec.structure_names if n not in names]

    def possible_prompts(self) -> dict[str | None, list[str]]:
        """Every prompt a sample of each dataset modality can carry (names, synonyms, negatives),
        keyed by the dataset.yaml modality; sorted, for precomputing text embeddings."""
        out: dict[str | None, set[str]] = {}
        for src in self.sources:
            spec = src.dataset.spec
            names = out.setdefault(spec.modality, set())
            names.update(spec.structure_names)
            if self.train and self.prompt_cfg.synonym_p > 0:
                names.update(s for n in spec.structure_names for s in spec.synonyms_of(n)
                             if self.known is None or self.known(s))
            if self.train and self.prompt_cfg.cross_negatives > 0:
                own = canonical_modality(spec.modality) or spec.modality
                names.update(n for key, ns in self._by_modality.items() if key != own for n in ns
                             if self.known is None or self.known(n))
        return {m: sorted(v) for m, v in out.items()}

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (call before building the epoch's loader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def _rng(self, i: int) -> tuple[random.Random, int]:
        ss = np.random.SeedSequence([self.seed, self.epoch, int(i)])
        a, b = ss.generate_state(2)
        return random.Random(int(a)), int(b)

    def _load(self, src: Source, j: int) -> tuple[np.ndarray, np.ndarray, Any]:
        from ..preprocess import to_float_rgb

        sample = src.dataset[j]
        channels = getattr(sample, "channels", None)
        if bool(channels) != bool(self.sequences):
            raise ConfigError(
                f"{src.name or sample.spec.dirname}: a model with modality fusion trains on multi-sequence volumes "
                "(set 'channel: all' on the dataset entry), and 'channel: all' needs a model with "
                "fusion.enabled (model_overrides: {fusion.enabled: true})"
            )
        if channels:
            from ..sequences import canonical_sequences, to_layout

            image = to_layout(sample.image, canonical_sequences(channels, self.sequences), self.sequences)
            image, labels = presize(image, sample.labels, 2 * self.image_size)
            return image, labels, sample
        image = to_float_rgb(sample.image, intensity_range=sample.intensity_range)
        image, labels = presize(image, sample.labels, 2 * self.image_size)
        return image, labels, sample

    def _prompts(self, spec, rng: random.Random) -> tuple[list[str], list[str]]:
        cfg = self.prompt_cfg
        prompts, names = [], []
        for name in spec.structure_names:
            text = name
            if self.train and cfg.synonym_p > 0 and rng.random() < cfg.synonym_p:
                syns = [s for s in spec.synonyms_of(name) if self.known is None or self.known(s)]
                if syns:
                    text = rng.choice(syns)
            prompts.append(text)
            names.append(name)
        if self.train and cfg.cross_negatives > 0:
            own = canonical_modality(spec.modality) or spec.modality
            taken = {n.casefold() for n in spec.structure_names}
            taken |= {s.casefold() for n in spec.structure_names for s in spec.synonyms_of(n)}
            pool = sorted({
                n for key, ns in self._by_modality.items() if key != own for n in ns
                if n.casefold() not in taken and (self.known is None or self.known(n))
            })
            for n in rng.sample(pool, min(cfg.cross_negatives, len(pool))):
                prompts.append(n)
                names.append("")
        return prompts[: cfg.max_prompts], names[: cfg.max_prompts]

    def _prompts_and_texts(self, spec, rng: random.Random, templates: bool) -> tuple[list[str], list[str], list[str]]:
        """``(prompts, names, texts)``: :meth:`_prompts`, then each prompt put in a random
        template when ``templates`` (else the texts are the prompts)."""
        prompts, names = self._prompts(spec, rng)
        if templates:
            texts = [random_template(p, spec.modality, rng) for p in prompts]
        else:
            texts = list(prompts)
        return prompts, names, texts

    def _sample_dict(self, tensors: dict[str, Any], prompts: list[str], texts: list[str], names: list[str],
                     spec: Any, src: Source, sample: Any, i: int) -> dict[str, Any]:
        """One item: ``tensors`` (image, targets, ...) first, then prompts, texts, names, modality,
        dataset, id and index."""
        return {
            **tensors,
            "prompts": prompts,
            "texts": texts,
            "names": names,
            "modality": spec.modality,
            "dataset": src.name or spec.dirname,
            "id": sample.id,
            "index": int(i),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from ..preprocess import letterbox

        s_idx, j = self.entries[i]
        src = self.sources[s_idx]
        rng, aug_seed = self._rng(i)
        image, labels, sample = self._load(src, j)
        multi = self.sequences is not None
        if multi and self.geometric is not None:
            image, labels = augment(self.geometric, image, labels, seed=aug_seed)
            image = _jitter_sequences(image, np.random.default_rng(aug_seed), self.augment_cfg.strength)
        elif self.pipeline is not None:
            reference = None
            if self.augment_cfg.style_mix_p > 0 and len(src.indices) > 1:
                other = rng.choice(src.indices)
                if other == j:
                    other = src.indices[(src.indices.index(j) + 1) % len(src.indices)]
                reference = self._load(src, other)[0]
            image, labels = augment(self.pipeline, image, labels, seed=aug_seed, reference=reference)
        if self.train and not multi and self.augment_cfg.label_contrast_applies(
                canonical_modality(sample.spec.modality)):
            contrast_rng = np.random.default_rng([aug_seed, 2])
            if contrast_rng.uniform() < self.augment_cfg.label_contrast_p:
                image = random_label_contrast(image, labels, contrast_rng)
        if self.train and not multi and self.augment_cfg.remap_p > 0:
            remap_rng = np.random.default_rng([aug_seed, 1])
            if remap_rng.uniform() < self.augment_cfg.remap_p:
                image = random_intensity_remap(image, remap_rng)
        image, _ = letterbox(image, self.image_size)
        labels, _ = letterbox(labels, self.image_size, is_mask=True)
        spec = sample.spec
        prompts, names, texts = self._prompts_and_texts(spec, rng, self.train and self.prompt_cfg.templates)
        masks = spec.structure_masks(labels)
        targets = np.zeros((len(prompts), self.image_size, self.image_size), dtype=np.uint8)
        for k, name in enumerate(names):
            if name:
                targets[k] = masks[spec.structure_names.index(name)]
        x = image.astype(np.float32) if multi else (image.astype(np.float32) - self.mean) / self.std
        tensors = {
            "image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            "targets": torch.from_numpy(targets),
        }
        return self._sample_dict(tensors, prompts, texts, names, spec, src, sample, i)


def _jitter_sequences(image: np.ndarray, rng: np.random.Generator, strength: str) -> np.ndarray:
    """Independent gamma and contrast jitter per present (non-zero) sequence of ``[H, W, S]`` in [0, 1]."""
    k = STRENGTH_FACTORS.get(strength, 1.0)
    if k == 0:
        return image
    out = image.copy()
    for c in range(image.shape[-1]):
        ch = out[..., c]
        if not ch.any() or rng.random() > 0.6:
            continue
        gamma = float(np.exp(rng.uniform(-0.3, 0.3) * k))
        contrast = 1.0 + rng.uniform(-0.2, 0.2) * k
        out[..., c] = np.clip(np.power(ch, gamma) * contrast, 0.0, 1.0) * (ch > 0)
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; pad per-sample targets to the longest prompt list (``prompt_mask`` marks real)."""
    import torch

    b = len(batch)
    p = max(len(s["prompts"]) for s in batch)
    size = batch[0]["image"].shape[-2:]
    targets = torch.zeros((b, p, *size), dtype=torch.uint8)
    mask = torch.zeros((b, p), dtype=torch.bool)
    for k, s in enumerate(batch):
        n = len(s["prompts"])
        targets[k, :n] = s["targets"]
        mask[k, :n] = True
    out: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in batch]),
        "targets": targets,
        "prompt_mask": mask,
    }
    for key in ("prompts", "texts", "names", "modality", "dataset", "id", "index"):
        out[key] = [s[key] for s in batch]
    return out


__all__ = ["PromptConfig", "PromptedDataset", "Source", "collate", "presize"]
