"""Framing robustness on source-domain data: disc / cup Dice when the crop is tighter than in training.

    python benchmarks/bench_crop_framing.py [--model CKPT ...] [--ratios 1.35,1.7,2.14] [--reframe]

Optic-nerve-head crops differ in how much of the crop the disc fills: the Drishti-GS1 training
crops have side / disc diameter 2.14 (disc ~18 % of the area), RIM-ONE DL crops ~1.3 (the disc
fills 70-78 % of the width). This benchmark measures the effect of framing alone, on the
*source* camera, so it can inform training choices without touching the unseen domains: from
each whole Drishti-GS1 photograph of the official **test** split (``fundus_full/drishti_gs``,
51 eyes, never trained on) it cuts a square of side ``ratio x`` the true disc's equivalent
diameter around the true disc centre (jittered by up to 8 % of the side, seeded), resizes it to
512 px (as the ROI folders are) and segments it with :func:`emclip.segment`'s default call (the
fundus coarse-to-fine path, which returns the plain result for a crop).

``--reframe`` adds a variant that re-crops around the *located* disc at the training ratio
(``segment_fundus(..., whole_photograph=True)``), padding with the image's darkest value where
the new square leaves the crop. Several ``--model`` arguments are evaluated on identical crops.
Prints a Markdown table; ``--json`` writes it with per-image rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fundus_full import DEFAULT_DATA, dice, load, test_items  # noqa: E402

PROMPTS = ("optic disc", "optic cup")
SIDE = 512
JITTER = 0.08


def tight_crops(folder: Path, ratios: list[float], seed: int, limit: int | None):
    """Yield ``(id, ratio, image uint8 [512, 512, 3], labels uint8 [512, 512])`` (0 / 1 rim / 2 cup)."""
    import cv2

    from emclip import fundus

    ds, idx = test_items(folder, "test")
    rng = np.random.default_rng(seed)
    for i in idx[:limit] if limit else idx:
        sample = ds[i]
        masks = dict(zip(ds.spec.structure_names, sample.structure_masks()))
        disc, cup = masks["optic disc"], masks["optic cup"]
        ys, xs = np.nonzero(disc)
        diameter = 2 * math.sqrt(disc.sum() / math.pi)
        labels = (disc.astype(np.uint8) + cup.astype(np.uint8))[..., None]
        for ratio in ratios:
            side = round(ratio * diameter)
            jy, jx = rng.uniform(-JITTER, JITTER, 2) * side
            where = fundus.DiscLocation(
                center=(ys.mean() + jy, xs.mean() + jx), diameter=diameter, bbox=(0, 0, 1, 1),
                area=float(disc.sum()), confidence=1.0, max_probability=1.0, image_shape=disc.shape,
            )
            box = fundus.crop_box(where, ratio=ratio)
            image = fundus.extract_square(sample.image, box)
            lab = fundus.extract_square(labels, box)[..., 0]
            shrink = box.side > SIDE
            image = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
            lab = cv2.resize(lab, (SIDE, SIDE), interpolation=cv2.INTER_NEAREST)
            yield sample.id, ratio, image, lab


def run(models: list[tuple[str, Any]], folder: Path, ratios: list[float], reframe: bool, seed: int,
        limit: int | None) -> dict[str, Any]:
    from emclip import fundus

    variants: dict[str, dict[str, Any]] = {"default": {}}
    if reframe:
        variants["reframe"] = {"whole_photograph": True}
    rows = []
    for ident, ratio, image, lab in tight_crops(folder, ratios, seed, limit):
        for name, net in models:
            for variant, kwargs in variants.items():
                out = fundus.segment_fundus(image, list(PROMPTS), net, modality="fundus", **kwargs)
                disc = out.info["coarse_to_fine"]["disc"]
                rows.append({
                    "id": ident, "ratio": ratio, "model": name, "variant": variant,
                    "optic_disc": round(dice(out.mask("optic disc"), lab >= 1), 4),
                    "optic_cup": round(dice(out.mask("optic cup"), lab == 2), 4),
                    "located_area_fraction": None if disc is None else round(disc["area_fraction"], 4),
                    "true_area_fraction": round(float((lab >= 1).mean()), 4),
                })
    table = []
    for name, _ in models:
        for ratio in ratios:
            for variant in variants:
                sel = [r for r in rows if r["model"] == name and r["ratio"] == ratio and r["variant"] == variant]
                table.append({
                    "model": name, "ratio": ratio, "variant": variant, "n": len(sel),
                    "true_disc_area_fraction": float(np.median([r["true_area_fraction"] for r in sel])),
                    "optic_disc": float(np.mean([r["optic_disc"] for r in sel])),
                    "optic_cup": float(np.mean([r["optic_cup"] for r in sel])),
                })
    return {"seed": seed, "jitter": JITTER, "side": SIDE, "table": table, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| model | crop side / disc diameter | variant | n | disc area (median) | optic disc Dice | optic cup Dice |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for t in report["table"]:
        lines.append(
            f"| {t['model']} | {t['ratio']:.2f} | {t['variant']} | {t['n']} | "
            f"{100 * t['true_disc_area_fraction']:.0f} % | {t['optic_disc']:.3f} | {t['optic_cup']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="checkpoint folder (repeat to compare; default: the bundled model)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--ratios", default="1.35,1.7,2.14", help="crop side / disc diameter values")
    p.add_argument("--reframe", action="store_true", help="also re-crop around the located disc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most N photographs (smoke tests)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    models = [(label, net) for net, label in (load(m) for m in (args.model or [None]))]
    report = run(models, args.data_root / "fundus_full" / "drishti_gs", ratios, args.reframe, args.seed, args.limit)
    text = markdown(report)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(report, markdown=text), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
