"""Text prompts: parsing user input, templates per modality, synonyms and presets.

A *prompt* is the name of a structure ("optic cup"). The text tower never sees it bare: it is
wrapped in templates ("a fundus photograph showing the optic cup") chosen by the image
*modality*. Training draws one template (and synonym) at random; inference averages the
embeddings of all templates of the modality.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Iterable, Sequence

from .errors import InvalidArgumentError, InvalidPromptError

MAX_PROMPTS = 64
"""At most this many prompts in one call."""

MAX_PROMPT_CHARS = 200
"""A prompt longer than this (after cleaning) is refused."""

#: Canonical modality names and the words that select them.
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "fundus": ("fundus", "colour fundus photograph", "color fundus photograph", "retina", "fundus photograph"),
    "cardiac_mri": ("cardiac_mri", "cardiac mri", "cardiac cine mri (bssfp)", "cardiac late gadolinium enhancement mri",
                    "cardiac", "heart mri", "cmr"),
    "brain_mri": ("brain_mri", "brain mri", "brain", "neuro mri"),
}

#: Templates per modality; ``{}`` is replaced by the structure name.
TEMPLATES: dict[str | None, tuple[str, ...]] = {
    None: (
        "{}",
        "a medical image of the {}",
        "the {} in a medical image",
        "a segmentation of the {}",
    ),
    "fundus": (
        "a fundus photograph of the {}",
        "the {} in a colour fundus photograph",
        "a retinal image showing the {}",
        "{} of the eye",
    ),
    "cardiac_mri": (
        "a cardiac MRI of the {}",
        "the {} in a short-axis cardiac MR image",
        "a heart MRI slice showing the {}",
        "{} of the heart",
    ),
    "brain_mri": (
        "a brain MRI of the {}",
        "the {} in a brain MR image",
        "an MRI slice of the brain showing the {}",
        "{} in the brain",
    ),
}

#: Presets offered in the widget, per modality.
PRESETS: dict[str, tuple[str, ...]] = {
    "fundus": ("optic disc", "optic cup"),
    "cardiac_mri": ("left ventricle", "myocardium", "right ventricle"),
    "brain_mri": ("whole tumour", "tumour core", "enhancing tumour", "edema", "necrotic tumour core"),
}

#: Built-in synonyms (canonical name -> other names); datasets add their own from dataset.yaml.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "optic disc": ("optic nerve head", "OD", "optic disk"),
    "optic cup": ("OC", "cup"),
    "neuroretinal rim": ("rim",),
    "left ventricle": ("LV", "left ventricular cavity", "left ventricle blood pool"),
    "myocardium": ("MYO", "left ventricular myocardium", "heart muscle"),
    "right ventricle": ("RV", "right ventricular cavity"),
    "whole tumour": ("brain tumour", "glioma", "WT", "whole tumor"),
    "tumour core": ("TC", "tumor core"),
    "enhancing tumour": ("ET", "contrast-enhancing tumour", "enhancing tumor"),
    "edema": ("oedema", "peritumoural edema"),
    "necrotic tumour core": ("necrosis", "NCR", "necrotic core", "necrotic tumor core"),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
"""Terminal escape sequences (colours, cursor moves, titles) pasted along with text."""
_INVISIBLE = frozenset(("Cf", "Cs", "Co", "Cn"))
"""Unicode categories removed from prompts: format (zero-width, bidi overrides, BOM), lone
surrogates (undecodable bytes of a command line), private use and unassigned code points."""
_SPLIT = re.compile(r"[,;\n]+")


def canonical_modality(modality: str | None) -> str | None:
    """Map a free-text modality ("colour fundus photograph", "cardiac MRI") to a canonical key.

    Returns None for None/empty input and for modalities we have no templates for (the generic
    templates are used then).
    """
    if modality is not None and not isinstance(modality, str):
        raise InvalidArgumentError(
            f"modality must be text such as 'fundus' or 'cardiac MRI', got {type(modality).__name__}"
        )
    if not modality:
        return None
    text = modality.strip().lower()
    for key, aliases in MODALITY_ALIASES.items():
        if text == key or text in aliases:
            return key
    for key, aliases in MODALITY_ALIASES.items():
        if any(a in text for a in aliases if len(a) > 4):
            return key
    if "fundus" in text or "retina" in text:
        return "fundus"
    if ("cardiac" in text or "heart" in text) and "mri" in text.replace(" ", ""):
        return "cardiac_mri"
    if "brain" in text:
        return "brain_mri"
    return None


def clean_prompt(text: str) -> str:
    """Normalise one prompt: NFKC, terminal escapes and control characters replaced by spaces,
    invisible characters (zero-width, bidi controls, lone surrogates, unassigned) removed,
    whitespace collapsed."""
    if not isinstance(text, str):
        raise InvalidPromptError(f"a prompt must be a string, got {type(text).__name__}")
    text = _ANSI.sub(" ", text)
    text = _CONTROL.sub(" ", text)
    if any(unicodedata.category(c) in _INVISIBLE for c in text):
        text = "".join(c for c in text if unicodedata.category(c) not in _INVISIBLE)
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub(" ", text)
    return " ".join(text.split())


def parse_prompts(prompts: str | Iterable[str], *, max_prompts: int = MAX_PROMPTS) -> list[str]:
    """Turn user input into a clean list of prompts.

    ``prompts`` is a string (comma, semicolon or newline separated) or an iterable of strings.
    Whitespace and control characters are cleaned, empty entries dropped, duplicates removed
    (case-insensitively, first spelling kept). Raises :class:`InvalidPromptError` when nothing
    is left, when there are more than ``max_prompts`` (default 64) or when one is longer than
    ``MAX_PROMPT_CHARS`` (200) characters.
    """
    if prompts is None:
        raise InvalidPromptError("no prompt given: type one or more structure names, e.g. 'optic disc, optic cup'")
    if isinstance(prompts, (bytes, bytearray, memoryview)):
        raise InvalidPromptError(
            f"prompts must be text, got {type(prompts).__name__}; decode it first, e.g. prompts.decode('utf-8')"
        )
    if isinstance(prompts, str):
        items = _SPLIT.split(_ANSI.sub(" ", prompts))  # escapes first: they contain ';'
    else:
        try:
            items = list(prompts)
        except TypeError as exc:
            raise InvalidPromptError(
                f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
            ) from exc
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        text = clean_prompt(item)
        if not text:
            continue
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidPromptError(
                f"prompt of {len(text)} characters is too long (at most {MAX_PROMPT_CHARS}); "
                f"name the structure in a few words, e.g. 'optic cup'"
            )
        key = text.casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(text)
    if not out:
        raise InvalidPromptError("the prompt is empty: type one or more structure names, e.g. 'optic disc, optic cup'")
    if len(out) > max_prompts:
        raise InvalidPromptError(
            f"{len(out)} different prompts given, at most {max_prompts} are allowed in one run; "
            "split them over several runs"
        )
    return out


def templates_for(modality: str | None) -> tuple[str, ...]:
    """Templates for a (free-text or canonical) modality; generic ones when unknown."""
    return TEMPLATES.get(canonical_modality(modality), TEMPLATES[None])


def apply_templates(prompt: str, modality: str | None = None) -> list[str]:
    """All template sentences for one prompt (used for the inference ensemble)."""
    return [t.format(prompt) for t in templates_for(modality)]


def random_template(prompt: str, modality: str | None = None, rng: random.Random | None = None) -> str:
    """One template sentence drawn at random (training-time prompt augmentation)."""
    rng = rng or random
    return rng.choice(templates_for(modality)).format(prompt)


def synonyms_of(name: str, extra: dict[str, Sequence[str]] | None = None) -> tuple[str, ...]:
    """Other names of a canonical structure (built-in plus ``extra``, e.g. from dataset.yaml)."""
    found: list[str] = list(SYNONYMS.get(name, ()))
    if extra:
        found += [s for s in extra.get(name, ()) if s not in found]
    return tuple(found)


def canonical_name(prompt: str, extra: dict[str, Sequence[str]] | None = None) -> str | None:
    """The canonical structure a prompt names (itself or a synonym), or None if unknown."""
    key = clean_prompt(prompt).casefold()
    table: dict[str, Sequence[str]] = dict(SYNONYMS)
    for k, v in (extra or {}).items():
        table[k] = tuple(table.get(k, ())) + tuple(v)
    for name, syns in table.items():
        if key == name.casefold() or key in (s.casefold() for s in syns):
            return name
    return None
