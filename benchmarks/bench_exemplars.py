"""Reference-guided prompts on unseen domains: text only vs text + 1 exemplar vs 1 exemplar alone.

For each dataset (default: MS-CMR LGE and RIM-ONE DL r1, never seen by the bundled model) and
each of ``--choices`` exemplar choices (seeded): one patient (LGE) or one image (RIM-ONE) is
drawn; its image with the largest total foreground among those showing every structure becomes
the exemplar image, with one :class:`emclip.Exemplar` per structure (its mask, its name). Every
image of the *other* patients/images is then segmented through :func:`emclip.segment` with

- ``text``: the structure names only (the dataset's modality as templates);
- ``text+exemplar``: names + exemplars, ``exemplar_mode="combine"`` (mean of the text and visual
  logits, contrast and offset calibrated on the exemplar: the defaults);
- ``exemplar``: exemplars only (``prompts=None``), i.e. visual prompts without any text;
- ``--ablations`` adds the variants in :data:`ABLATIONS` (uncalibrated combination with the
  call's text prompt, fixed background contrast 0 or 1, no calibration).

Dice per image and structure (:func:`emclip.metrics.dice`, empty-mask convention: both empty =
1) is averaged over the evaluated images of a choice; the table gives mean ± sd over the choices.
Training-free: the model's weights are not changed. One JSON per run in ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/bench_exemplars.py                # full, both datasets
    python benchmarks/bench_exemplars.py --limit 8 --choices 1            # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("EMCLIP_DATA", "/work/shared/data"))
ABLATIONS = [  # (label, exemplar_prompts.DEFAULT_COMBINE, exemplar_prompts.ENCODE_OPTIONS changes)
    ("text+exemplar, uncalibrated mean-logit", "mean-logit", {}),
    ("text+exemplar, contrast 0", "calibrated", {"contrast": 0.0}),
    ("exemplar, contrast 0", "calibrated", {"contrast": 0.0}),
    ("exemplar, contrast 1", "calibrated", {"contrast": 1.0}),
    ("exemplar, contrast 0, not calibrated", "calibrated", {"contrast": 0.0, "calibrate": False}),
]
DATASETS = {
    "mscmr_lge": DATA / "cardiac" / "mscmr_lge",
    "rimone_dl_r1": DATA / "fundus" / "rimone_dl_r1",
}


def choose_exemplar(ds, groups: dict[str, list[int]], rng: random.Random, used: set[str]) -> tuple[str, int]:
    """A group not drawn before, and its image with every structure present and the most foreground."""
    candidates = sorted(g for g in groups if g not in used)
    rng.shuffle(candidates)
    for group in candidates:
        best, best_area = None, -1
        for i in groups[group]:
            masks = ds[i].structure_masks()
            if all(m.any() for m in masks) and int(masks.sum()) > best_area:
                best, best_area = i, int(masks.sum())
        if best is not None:
            return group, best
    raise RuntimeError("no group has an image showing every structure")


def run_dataset(name: str, root: Path, model, args) -> dict:
    import emclip
    from emclip.data import open_dataset
    from emclip.inference import exemplar_prompts
    from emclip.metrics import dice

    ds = open_dataset(root)
    structures = list(ds.spec.structure_names)
    modality = ds.spec.modality
    groups: dict[str, list[int]] = {}
    for i in range(len(ds)):
        groups.setdefault(ds.group_of(i), []).append(i)
    rng = random.Random(args.seed)
    indices = list(range(len(ds)))
    if args.limit:
        indices = sorted(random.Random(args.seed + 1).sample(indices, min(args.limit, len(indices))))

    def scores(prompts, exemplars=None, mode="combine", subset=indices) -> dict[int, list[float]]:
        out = {}
        for i in subset:
            s = ds[i]
            res = emclip.segment(s.image, prompts, model, modality=modality, exemplars=exemplars, exemplar_mode=mode)
            order = [res.prompts.index(p) for p in structures]
            targets = s.structure_masks()
            out[i] = [dice(res.masks[k], targets[j]) for j, k in enumerate(order)]
        return out

    t0 = time.perf_counter()
    text = scores(structures)
    print(f"[{name}] text only: {len(text)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    choices = []
    used: set[str] = set()
    for c in range(args.choices):
        group, idx = choose_exemplar(ds, groups, rng, used)
        used.add(group)
        sample = ds[idx]
        masks = sample.structure_masks()
        bank = emclip.TemplateBank(emclip.Exemplar(sample.image, masks[j], s, modality) for j, s in enumerate(structures))
        subset = [i for i in indices if ds.group_of(i) != group]
        conditions = {
            "text": {i: text[i] for i in subset},
            "text+exemplar": scores(structures, bank, "combine", subset),
            "exemplar": scores(None, bank, "only", subset),
        }
        if args.ablations:
            for label, combine, options in ABLATIONS:
                saved = exemplar_prompts.DEFAULT_COMBINE, dict(exemplar_prompts.ENCODE_OPTIONS)
                exemplar_prompts.DEFAULT_COMBINE = combine
                exemplar_prompts.ENCODE_OPTIONS.update(options)
                try:
                    if label.startswith("exemplar"):
                        conditions[label] = scores(None, bank, "only", subset)
                    else:
                        conditions[label] = scores(structures, bank, "combine", subset)
                finally:
                    exemplar_prompts.DEFAULT_COMBINE = saved[0]
                    exemplar_prompts.ENCODE_OPTIONS.clear()
                    exemplar_prompts.ENCODE_OPTIONS.update(saved[1])
        summary = {
            cond: {s: float(np.mean([v[j] for v in per.values()])) for j, s in enumerate(structures)}
            for cond, per in conditions.items()
        }
        choices.append({"exemplar_group": group, "exemplar_image": ds.ids[idx], "n_evaluated": len(subset), "dice": summary})
        print(f"[{name}] choice {c}: {ds.ids[idx]} -> {json.dumps(summary)}", file=sys.stderr, flush=True)
    table = {}
    for cond in choices[0]["dice"]:
        table[cond] = {}
        for s in structures:
            vals = [ch["dice"][cond][s] for ch in choices]
            table[cond][s] = {"mean": float(np.mean(vals)), "sd": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0}
        means = [float(np.mean([ch["dice"][cond][s] for s in structures])) for ch in choices]
        table[cond]["mean of structures"] = {"mean": float(np.mean(means)), "sd": float(statistics.stdev(means)) if len(means) > 1 else 0.0}
    return {
        "dataset": str(root),
        "modality": modality,
        "n_images": len(ds),
        "n_used": len(indices),
        "structures": structures,
        "choices": choices,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }


def markdown(results: dict) -> str:
    lines = ["| dataset | structure | text only | text + 1 exemplar | 1 exemplar alone |", "|---|---|---:|---:|---:|"]
    for name, res in results["datasets"].items():
        first = True
        for s in [*res["structures"], "mean of structures"]:
            cells = []
            for cond in ("text", "text+exemplar", "exemplar"):
                v = res["table"][cond][s]
                cells.append(f"{v['mean']:.3f} ± {v['sd']:.3f}")
            lines.append(f"| {name if first else ''} | {s} | " + " | ".join(cells) + " |")
            first = False
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--choices", type=int, default=3, help="exemplar choices per dataset (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="evaluate a random subset of this many images (0 = all)")
    parser.add_argument("--ablations", action="store_true", help="also text + exemplar with the mean-key combination")
    parser.add_argument("--out", default="/work/runs/exemplars")
    args = parser.parse_args(argv)

    import emclip
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = emclip.load_model(args.model, "cpu")
    results = {
        "command": "python benchmarks/bench_exemplars.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model or "bundled default",
        "torch_threads": torch.get_num_threads(),
        "datasets": {},
    }
    for name in args.datasets:
        results["datasets"][name] = run_dataset(name, DATASETS[name], model, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    tag = f"subset{args.limit}" if args.limit else "full"
    path = out / f"exemplars_{tag}_{stamp}.json"
    from emclip.io import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
