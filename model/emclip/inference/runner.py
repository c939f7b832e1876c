"""Running batches through the network and turning its outputs into arrays on the image grid.

:class:`Runner` knows the model, its normalisation, the prompts, the device and whether to
mirror (:func:`run_mirrored`: each image and its left-right mirror in one batch, the logits
averaged; the bundled model was trained with flips, so this is its default, see BENCHMARKS.md);
:func:`inference_state` puts the model in eval mode for a call and restores it afterwards;
:class:`Steps` reports progress monotonically.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..callbacks import ProgressCallback, report
from ..nn.inference_copy import submodules
from ..preprocess import unletterbox
from .model_loading import model_device, model_dtype


class Steps:
    """Monotonic progress reporting whose total may grow (when a retry adds work)."""

    def __init__(self, progress: Optional[ProgressCallback], total: int) -> None:
        self.progress, self.done, self.total = progress, 0, max(1, int(total))
        report(progress, 0, self.total)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        report(self.progress, self.done, self.total)

    def extend(self, more: int) -> None:
        self.total += max(0, int(more))

    def finish(self) -> None:
        self.done = self.total
        report(self.progress, self.done, self.total)


@contextlib.contextmanager
def inference_state(net: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode on ``device`` for the duration; training flag and device restored afterwards."""
    was_training = net.training
    # eval()/train() walk every module (~450 in EM-CLIP, 3-10 ms per call): only when needed
    switch = any(module.training for module in submodules(net))
    original = model_device(net)
    if original != device:
        net.to(device)
    if switch:
        net.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if model_device(net) != original:
            net.to(original)
        if switch:
            net.train(was_training)


def model_mirrors(net: Any, mirror: Optional[bool] = None) -> bool:
    """Whether to mirror: ``mirror`` if given, else the model's default, its config's
    ``test_time_mirror`` (None = off)."""
    if mirror is not None:
        return bool(mirror)
    return bool(getattr(getattr(net, "config", None), "test_time_mirror", None))


def run_mirrored(call: Callable[[torch.Tensor], Any], x: torch.Tensor, mirror: bool) -> Any:
    """``call(x)`` for ``x [B, C, H, W]``; with ``mirror``, one call on ``[x, flip(x)]`` (2B images):
    the logits become the mean of the plain pass and the mirrored pass flipped back; the other
    per-image outputs (EM responsibilities, cluster similarity, aux) are the plain pass's, since
    the EM bases of two passes are not the same clusters."""
    if not mirror:
        return call(x)
    n = x.shape[0]
    out = call(torch.cat([x, x.flip(-1)]))

    def plain(t: Any) -> Any:
        return t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 2 * n else t

    return dataclasses.replace(
        out,
        logits=0.5 * (out.logits[:n] + out.logits[n:].flip(-1)),
        prompt_mask=plain(out.prompt_mask),
        responsibilities=plain(out.responsibilities),
        cluster_text_similarity=plain(out.cluster_text_similarity),
        aux={k: plain(v) for k, v in out.aux.items()},
    )


class Runner:
    """Runs batches through the network; knows the normalisation, prompts, device and mirroring."""

    def __init__(
        self,
        net: torch.nn.Module,
        device: torch.device,
        prompts: list[str],
        modality: Optional[str],
        prompt_keys: Any = None,
        mirror: bool = False,
    ):
        """``prompt_keys``: decoder-space prompts (emclip.nn.DecoderPrompts ``[P, ...]``, one per
        name in ``prompts``) used instead of encoding ``prompts`` as text (exemplars).
        ``mirror``: average every pass with its left-right mirror (:func:`run_mirrored`)."""
        self.net, self.prompts, self.modality = net, prompts, modality
        self.prompt_keys = prompt_keys
        self.mirror = bool(mirror)
        self.size = int(net.image_size)
        self.dtype = model_dtype(net)
        self.set_device(device)

    def set_device(self, device: torch.device) -> None:
        self.device = device
        if model_device(self.net) != device:
            self.net.to(device)
        self.mean = torch.tensor(self.net.pixel_mean, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )
        self.std = torch.tensor(self.net.pixel_std, dtype=torch.float32, device=device).view(
            1, 3, 1, 1
        )

    def forward(self, boxed: Sequence[np.ndarray]) -> Any:
        """``boxed``: letterboxed float RGB ``(S, S, 3)`` arrays -> the model's ModelOutput."""
        x = torch.from_numpy(np.stack(boxed)).to(self.device).permute(0, 3, 1, 2)
        # NHWC memory seen as NCHW (channels-last strides): no copy; channels-last encoders
        # keep it, others accept any strides
        x = ((x - self.mean) / self.std).to(self.dtype)
        if self.prompt_keys is not None:
            keys = self.prompt_keys.to(self.device)
            return run_mirrored(lambda images: self.net(images, keys), x, self.mirror)
        return run_mirrored(lambda images: self.net.predict_logits(images, self.prompts, modality=self.modality),
                            x, self.mirror)


def probabilities(logits: torch.Tensor, geo: Any) -> np.ndarray:
    """Logits ``[P, S, S]`` -> probabilities ``float32 [P, H, W]`` on the image grid."""
    return torch.sigmoid(unletterbox(logits.float(), geo)).cpu().numpy()


def cluster_labels(resp: Optional[torch.Tensor], geo: Any, out_hw: tuple[int, int]) -> np.ndarray:
    """Responsibilities ``[K, h, w]`` -> ``int32 [H, W]`` cluster ids 1..K (0 if ``resp`` is None)."""
    if resp is None:
        return np.zeros(out_hw, dtype=np.int32)
    size = geo.size
    nh, nw = geo.new_hw
    # channels-last: the bilinear upsample and the argmax over K both run on contiguous K-vectors
    # (same ids as NCHW, ~4x faster); the argmax only covers the letterbox's image region
    # (re-laid out from a plain contiguous copy: ``resp`` may already be K-innermost with a batch
    # stride that makes torch see the 4D view as NCHW, and then both ops run ~10x slower)
    x = resp.float().contiguous()[None].contiguous(memory_format=torch.channels_last)
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    crop = up[0, :, geo.top : geo.top + nh, geo.left : geo.left + nw]
    small = (crop.argmax(dim=0) + 1).to(torch.int32).cpu().numpy()
    rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * nh / out_hw[0]).astype(np.int64), nh - 1)
    cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * nw / out_hw[1]).astype(np.int64), nw - 1)
    return small[rows[:, None], cols[None, :]]


def similarity(out: Any, index: int, n_prompts: int) -> np.ndarray:
    """``float32 [K, P]`` cosine of the EM bases of image ``index`` with the prompts (``[0, P]``
    for models without EM)."""
    sim = getattr(out, "cluster_text_similarity", None)
    if sim is None:
        return np.zeros((0, n_prompts), dtype=np.float32)
    return sim[index, :, :n_prompts].float().cpu().numpy()


def responsibilities(out: Any, index: int) -> Optional[torch.Tensor]:
    """EM soft assignments ``[K, h, w]`` of image ``index``, or None for models without EM."""
    resp = getattr(out, "responsibilities", None)
    return None if resp is None else resp[index]
