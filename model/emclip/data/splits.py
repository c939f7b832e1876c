"""Train/val/test splits: the official one when meta.csv has it, else a seeded grouped random split.

Samples are split by *group*, never individually: a group is the meta.csv ``patient`` (cardiac
slices), the ``case`` (brain volumes) or the image id. So no patient or case ever appears on
both sides of a split.

- Official (meta.csv ``official_split`` present for every sample): values containing "test" go
  to test, "val" to val, "train" to train (so ``random_train``/``random_test`` of RIM-ONE DL work).
  When there is no official validation part, ``val_fraction`` of the official training groups
  are held out for validation (seeded).
- Random: the sorted groups are shuffled with ``random.Random(seed)``; the first
  ``round(test_fraction * n_groups)`` go to test, the next ``round(val_fraction * n_groups)`` to
  val, the rest to train (at least one group each when the fraction is > 0 and 3+ groups exist).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import DatasetError

PARTS = ("train", "val", "test")


class Splittable(Protocol):
    def __len__(self) -> int: ...
    def group_of(self, i: int) -> str: ...
    def official_split_of(self, i: int) -> str | None: ...


@dataclass(frozen=True)
class Split:
    """Sample indices of each part and where the split came from ("official" or "random")."""

    train: list[int]
    val: list[int]
    test: list[int]
    source: str

    def part(self, name: str) -> list[int]:
        """Indices of ``name`` in "train", "val", "test", "trainval" or "all" (sorted)."""
        if name == "all":
            return sorted(self.train + self.val + self.test)
        if name == "trainval":
            return sorted(self.train + self.val)
        if name not in PARTS:
            raise DatasetError(f"unknown split {name!r}; use one of {PARTS + ('trainval', 'all')}")
        return list(getattr(self, name))


def _normalise_official(value: str) -> str:
    v = value.strip().lower()
    for part, words in (("test", ("test",)), ("val", ("val",)), ("train", ("train",))):
        if any(w in v for w in words):
            return part
    raise DatasetError(f"meta.csv official_split value {value!r} is not train/val/test (or random_train/random_test)")


def _take_groups(groups: list[str], fraction: float, rng: random.Random, n_total: int) -> list[str]:
    if fraction <= 0 or not groups:
        return []
    n = round(fraction * n_total)
    if n == 0 and n_total >= 3:
        n = 1
    n = min(n, max(len(groups) - 1, 0))
    pool = list(groups)
    rng.shuffle(pool)
    return pool[:n]


def grouped_split(
    groups: Sequence[str],
    official: Sequence[str | None] | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Split:
    """Split samples whose group labels are ``groups`` (see module docstring)."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DatasetError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with sum < 1")
    n = len(groups)
    rng = random.Random(seed)
    use_official = official is not None and n > 0 and all(o for o in official)
    assign: dict[str, str] = {}
    if use_official:
        for g, o in zip(groups, official):  # type: ignore[arg-type]
            part = _normalise_official(o)  # type: ignore[arg-type]
            if assign.setdefault(g, part) != part:
                raise DatasetError(f"group {g!r} appears in both the official {assign[g]} and {part} parts")
        if "val" not in assign.values():
            train_groups = sorted(g for g, p in assign.items() if p == "train")
            for g in _take_groups(train_groups, val_fraction, rng, len(train_groups)):
                assign[g] = "val"
        source = "official"
    else:
        unique = sorted(set(groups))
        test = set(_take_groups(unique, test_fraction, rng, len(unique)))
        rest = [g for g in unique if g not in test]
        val = set(_take_groups(rest, val_fraction, rng, len(unique)))
        for g in unique:
            assign[g] = "test" if g in test else "val" if g in val else "train"
        source = "random"
    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    for i, g in enumerate(groups):
        parts[assign[g]].append(i)
    return Split(train=parts["train"], val=parts["val"], test=parts["test"], source=source)


def split_dataset(ds: Splittable, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> Split:
    """:func:`grouped_split` of a :class:`FolderDataset` or :class:`VolumeDataset`."""
    groups = [ds.group_of(i) for i in range(len(ds))]
    official = [ds.official_split_of(i) for i in range(len(ds))]
    return grouped_split(groups, official, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
