"""Predicted vs true optic disc / cup areas per fundus dataset: is an error one of size or of place?

    python benchmarks/bench_fundus_areas.py [--model CKPT] [--data-root ../shared/data] [--json out.json]

For every image of each dataset (Drishti-GS1 official test crops, RIM-ONE DL r1 and r2, all
images) it segments "optic disc, optic cup" with the default :func:`emclip.segment` call and
prints medians over images of: true cup area / true disc area, predicted cup / predicted disc,
predicted / true disc area, predicted / true cup area, and the mean Dice of both. A model whose
cup-to-disc ratio follows its training population rather than the image shows up as a predicted
cup / disc ratio that stays put while the true one changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fundus_full import DEFAULT_DATA, dice, load, test_items  # noqa: E402

DATASETS = (("drishti_gs", "test"), ("rimone_dl_r1", "all"), ("rimone_dl_r2", "all"))


def measure(net, folder: Path, split: str) -> dict[str, float]:
    import emclip

    ds, idx = test_items(folder, split)
    rows = []
    for i in idx:
        sample = ds[i]
        truth = dict(zip(ds.spec.structure_names, sample.structure_masks()))
        out = emclip.segment(sample.image, ["optic disc", "optic cup"], net, modality="fundus")
        disc, cup = out.mask("optic disc"), out.mask("optic cup")
        td, tc = truth["optic disc"], truth["optic cup"]
        rows.append((
            tc.sum() / max(td.sum(), 1), cup.sum() / max(disc.sum(), 1),
            disc.sum() / max(td.sum(), 1), cup.sum() / max(tc.sum(), 1),
            dice(disc, td), dice(cup, tc),
        ))
    a = np.asarray(rows, dtype=float)
    med = np.median(a, axis=0)
    return {
        "n": len(rows),
        "true_cup_to_disc": float(med[0]), "predicted_cup_to_disc": float(med[1]),
        "disc_predicted_to_true": float(med[2]), "cup_predicted_to_true": float(med[3]),
        "disc_dice": float(a[:, 4].mean()), "cup_dice": float(a[:, 5].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    net, label = load(args.model)
    report = {name: measure(net, args.data_root / "fundus" / name, split) for name, split in DATASETS}
    print(f"Model: {label}\n")
    print("| dataset | n | true cup/disc | predicted cup/disc | disc predicted/true | cup predicted/true | disc Dice | cup Dice |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in report.items():
        print(f"| {name} | {r['n']} | {r['true_cup_to_disc']:.2f} | {r['predicted_cup_to_disc']:.2f} | "
              f"{r['disc_predicted_to_true']:.2f} | {r['cup_predicted_to_true']:.2f} | {r['disc_dice']:.3f} | {r['cup_dice']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": label, "datasets": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
