"""What a model knows, and which modality an image is: the basis of prompt-free segmentation.

- ``ModelConfig.known_structures`` maps a modality to the structures the model was trained on
  (the trainer fills it from the training datasets' ``dataset.yaml``), e.g.
  ``{"fundus": ["optic disc", "optic cup", "neuroretinal rim"], "cardiac_mri": [...]}``.
  Keys are canonical modality keys (:func:`emclip.prompts.canonical_modality`) when the
  dataset's modality text maps to one, else the text itself.
- :class:`ModalityHead`: a multinomial logistic regression on the image encoder's
  global-average-pooled deepest feature map (the encoder stays frozen; fitted post hoc with
  :func:`fit_modality_head`). It is stored next to a checkpoint's weights as
  ``modality_head.safetensors`` (tensors) + ``modality_head.json`` (classes, threshold,
  provenance), listed in ``checksums.json``; ``model.safetensors`` is untouched, so adding a
  head never changes the segmentation weights. :func:`emclip.checkpoint.load_checkpoint`
  attaches it as ``model.modality_head`` (a plain attribute, not a submodule: it is not in the
  model's state dict).
- :func:`recognise_modality` runs one image (or a few slices) through the encoder and the head;
  a best probability below the head's ``min_confidence`` (default 0.6) means "not recognised".
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, InvalidArgumentError
from .prompts import canonical_modality

HEAD_WEIGHTS = "modality_head.safetensors"
HEAD_CONFIG = "modality_head.json"
HEAD_FORMAT = 1
DEFAULT_MIN_CONFIDENCE = 0.6
"""A recognition whose best class probability is below this is rejected ("unknown")."""

DISPLAY_NAMES = {"fundus": "fundus", "cardiac_mri": "cardiac MRI", "brain_mri": "brain MRI"}


def modality_key(modality: str | None) -> str | None:
    """Canonical key of a modality text ("colour fundus photograph" -> "fundus"); texts without
    a canonical key are kept (stripped, lower case); None/empty -> None."""
    if modality is None or not str(modality).strip():
        return None
    return canonical_modality(modality) or " ".join(str(modality).lower().split())


def display_name(key: str | None) -> str:
    """Human-readable name of a modality key ("cardiac_mri" -> "cardiac MRI")."""
    return DISPLAY_NAMES.get(key or "", key or "unknown")


# ------------------------------------------------------------------------------ known structures


def merge_known_structures(
    existing: Mapping[str, Sequence[str]] | None, additions: Iterable[tuple[str | None, Sequence[str]]]
) -> dict[str, list[str]]:
    """``existing`` plus ``(modality, structure names)`` pairs, keyed by :func:`modality_key`;
    order of first appearance kept, duplicates (case-insensitive) dropped. Pairs without a
    modality are skipped (prompt-free mode needs to know the modality)."""
    out: dict[str, list[str]] = {}
    pairs = [(k, v) for k, v in (existing or {}).items()] + list(additions)
    for modality, names in pairs:
        key = modality_key(modality)
        if key is None:
            continue
        row = out.setdefault(key, [])
        seen = {n.casefold() for n in row}
        for name in names:
            if name.casefold() not in seen:
                seen.add(name.casefold())
                row.append(name)
    return out


def known_structures(model: Any) -> dict[str, list[str]]:
    """``model.config.known_structures`` (empty for models trained before it existed)."""
    config = getattr(model, "config", None)
    return {k: list(v) for k, v in (getattr(config, "known_structures", None) or {}).items()}


def structures_for(model: Any, modality: str | None) -> list[str]:
    """The structures ``model`` was trained on for ``modality`` (any spelling); [] if none."""
    key = modality_key(modality)
    for name, structures in known_structures(model).items():
        if modality_key(name) == key:
            return list(structures)
    return []


# ------------------------------------------------------------------------------ the head


@dataclass
class ModalityHead:
    """Logistic regression over ``modalities`` on standardised pooled encoder features.

    ``weight [M, C]``, ``bias [M]``, ``mean [C]``, ``std [C]`` (float32, CPU). Probabilities are
    ``softmax(((f - mean) / std) @ weight.T + bias)``; ``min_confidence`` rejects unsure calls.
    """

    modalities: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m, c = self.weight.shape
        if len(self.modalities) != m or tuple(self.bias.shape) != (m,) or tuple(self.mean.shape) != (c,) \
                or tuple(self.std.shape) != (c,):
            raise CheckpointError(
                f"modality head shapes do not agree: {len(self.modalities)} modalities, weight "
                f"{tuple(self.weight.shape)}, bias {tuple(self.bias.shape)}, mean {tuple(self.mean.shape)}, "
                f"std {tuple(self.std.shape)}"
            )
        if not 0.0 <= float(self.min_confidence) < 1.0:
            raise CheckpointError(f"modality head min_confidence must be in [0, 1), got {self.min_confidence}")

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, C]`` -> logits ``[N, M]``."""
        f = features.detach().to("cpu", torch.float32)
        if f.ndim != 2 or f.shape[1] != self.num_features:
            raise InvalidArgumentError(
                f"the modality head expects [N, {self.num_features}] features, got {tuple(f.shape)}: "
                "it was fitted on another image encoder"
            )
        return ((f - self.mean) / self.std) @ self.weight.T + self.bias

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, C]`` -> class probabilities ``[N, M]`` (rows sum to 1)."""
        return torch.softmax(self.logits(features), dim=1)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().to("cpu", torch.float32).contiguous()
                for k in ("weight", "bias", "mean", "std")}


def image_features(model: Any, images: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled deepest encoder feature map of ``images [B, 3, S, S]`` (already
    normalised as for the network) -> ``float32 [B, C]`` on the CPU. No gradients."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        raise InvalidArgumentError(
            f"{type(model).__name__} has no image_encoder, so it cannot recognise modalities; pass modality=..."
        )
    with torch.inference_mode():
        feats = encoder(images)
        deepest = feats[-1]
        return deepest.float().mean(dim=(2, 3)).cpu()


def network_input(model: Any, image: np.ndarray, channel_axis: int | None = None,
                  window: tuple[float, float] | None = None) -> torch.Tensor:
    """One 2D image -> ``[1, 3, S, S]`` network input, preprocessed exactly as in
    :func:`emclip.segment` (robust intensity window, RGB, letterbox, pixel mean/std). Big
    images are subsampled to about twice the network side first."""
    from .preprocess import MIN_SIDE, check_image, intensity_range, letterbox, to_float_rgb

    arr = check_image(image, channel_axis)
    size = int(model.image_size)
    if window is None:
        window = intensity_range(arr)
    step = max(1, max(arr.shape[:2]) // (2 * size))
    sy, sx = (max(1, min(step, n // MIN_SIDE)) for n in arr.shape[:2])
    boxed, _ = letterbox(to_float_rgb(arr[::sy, ::sx], intensity_range=window), size)
    x = torch.from_numpy(np.ascontiguousarray(boxed)).permute(2, 0, 1)[None].float()
    mean = torch.tensor(model.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def fit_modality_head(
    features: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    modalities: Sequence[str],
    *,
    weight_decay: float = 1e-2,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    max_iter: int = 200,
    info: Mapping[str, Any] | None = None,
) -> ModalityHead:
    """Fit a class-balanced, L2-regularised multinomial logistic regression (L-BFGS, full batch).

    ``features [N, C]``, ``labels [N]`` indices into ``modalities`` (each class needs at least one
    sample). ``weight_decay`` (default 0.01) is the L2 strength on the weights. Deterministic.
    """
    x = torch.as_tensor(features, dtype=torch.float32).cpu()
    y = torch.as_tensor(labels, dtype=torch.long).cpu()
    m = len(modalities)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise InvalidArgumentError(f"need features [N, C] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    counts = torch.bincount(y, minlength=m)
    if len(counts) > m or bool((counts == 0).any()):
        raise InvalidArgumentError(f"every modality needs training samples; counts per class: {counts.tolist()}")
    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / std
    class_weight = (len(y) / (m * counts.float()))
    w = torch.zeros(m, x.shape[1], requires_grad=True)
    b = torch.zeros(m, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y, weight=class_weight) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return ModalityHead(
        modalities=[str(k) for k in modalities], weight=w.detach().clone(), bias=b.detach().clone(),
        mean=mean, std=std, min_confidence=float(min_confidence),
        info={"n_train": len(y), "per_class": {str(k): int(c) for k, c in zip(modalities, counts)},
              "weight_decay": float(weight_decay), **dict(info or {})},
    )


# ------------------------------------------------------------------------------ recognition


@dataclass
class Recognition:
    """Result of :func:`recognise_modality`: the best ``modality`` key (None when rejected),
    its ``confidence``, all class ``probabilities`` and ``best`` (the best class even if rejected)."""

    modality: str | None
    confidence: float
    probabilities: dict[str, float]
    best: str
    min_confidence: float


def recognise_modality(
    images: np.ndarray | Sequence[np.ndarray],
    model: Any,
    *,
    channel_axis: int | None = None,
    window: tuple[float, float] | None = None,
    min_confidence: float | None = None,
) -> Recognition:
    """Recognise the modality of one 2D image, or of several (e.g. slices of one volume: their
    class probabilities are averaged). Needs a model with a ``modality_head``; ``min_confidence``
    overrides the head's threshold."""
    head = getattr(model, "modality_head", None)
    if head is None:
        raise InvalidArgumentError(
            "this model has no modality recogniser (modality_head.safetensors in its folder), so the modality "
            "must be given: pass modality='fundus' (or 'cardiac MRI', ...) or name the prompts"
        )
    items = [images] if isinstance(images, np.ndarray) else list(images)
    if not items:
        raise InvalidArgumentError("no image given to recognise the modality of")
    device = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else torch.device("cpu")
    dtype = next(iter(model.parameters())).dtype if any(True for _ in model.parameters()) else torch.float32
    x = torch.cat([network_input(model, im, channel_axis, window) for im in items]).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        probs = head.probabilities(image_features(model, x)).mean(dim=0)
    finally:
        model.train(was_training)
    best = int(torch.argmax(probs))
    confidence = float(probs[best])
    threshold = head.min_confidence if min_confidence is None else float(min_confidence)
    return Recognition(
        modality=head.modalities[best] if confidence >= threshold else None,
        confidence=confidence,
        probabilities={k: float(p) for k, p in zip(head.modalities, probs)},
        best=head.modalities[best],
        min_confidence=threshold,
    )


# ------------------------------------------------------------------------------ storage


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def head_files(head: ModalityHead) -> dict[str, bytes]:
    """The two files of a head: ``{HEAD_WEIGHTS: safetensors bytes, HEAD_CONFIG: JSON bytes}``."""
    from safetensors.torch import save

    config = {"format_version": HEAD_FORMAT, "modalities": head.modalities, "min_confidence": head.min_confidence,
              "features": "global average pool of the image encoder's deepest feature map",
              "info": head.info}
    return {HEAD_WEIGHTS: save(head.state(), metadata={"format_version": str(HEAD_FORMAT)}),
            HEAD_CONFIG: json.dumps(config, indent=2).encode("utf-8")}


def save_modality_head(head: ModalityHead, folder: str | Path) -> Path:
    """Write ``head`` into the checkpoint ``folder`` (atomically, file by file) and add both
    files to its ``checksums.json`` (if the folder has one); other files are not touched."""
    from .checkpoint import CHECKSUMS_NAME, sha256_file

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; save the model first (emclip.save_model)")
    for name, data in head_files(head).items():
        _write_atomic(folder / name, data)
    sums_path = folder / CHECKSUMS_NAME
    if sums_path.is_file():
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
        files = dict(sums["files"])
        for name in (HEAD_WEIGHTS, HEAD_CONFIG):
            files[name] = sha256_file(folder / name)
        sums["files"] = dict(sorted(files.items()))
        _write_atomic(sums_path, json.dumps(sums, indent=2).encode("utf-8"))
    return folder


def load_modality_head(folder: str | Path) -> ModalityHead | None:
    """The head stored in checkpoint ``folder``, or None when it has none. A half-present or
    unreadable head raises :class:`CheckpointError`."""
    folder = Path(folder)
    weights, config = folder / HEAD_WEIGHTS, folder / HEAD_CONFIG
    if not weights.is_file() and not config.is_file():
        return None
    if not (weights.is_file() and config.is_file()):
        raise CheckpointError(f"{folder} has only one of {HEAD_WEIGHTS} and {HEAD_CONFIG}; copy the folder again")
    from safetensors.torch import load_file

    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
        state = load_file(str(weights), device="cpu")
        if int(meta.get("format_version", HEAD_FORMAT)) > HEAD_FORMAT:
            raise CheckpointError(f"{config} has a newer format than this emclip reads; upgrade emclip")
        return ModalityHead(
            modalities=[str(m) for m in meta["modalities"]],
            weight=state["weight"].float(), bias=state["bias"].float(),
            mean=state["mean"].float(), std=state["std"].float(),
            min_confidence=float(meta.get("min_confidence", DEFAULT_MIN_CONFIDENCE)),
            info=dict(meta.get("info") or {}),
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"the modality head in {folder} is unreadable ({type(exc).__name__}: {exc})") from exc


def attach_modality_head(model: Any, head: ModalityHead | None) -> Any:
    """Set ``model.modality_head`` (None removes it); returns ``model``. A plain attribute, so
    the model's state dict (the segmentation weights) is unchanged."""
    object.__setattr__(model, "modality_head", head)
    return model
