"""Prompts for structures that are not in the image must come back "not found".

    python benchmarks/bench_absent_prompts.py [--model CHECKPOINT] [--data-root ../shared/data]
                                              [--step 10] [--json OUT.json]

Asks every ``step``-th image of one modality for the structures of the other: fundus prompts
("optic disc", "optic cup", "neuroretinal rim") on the unseen MS-CMR LGE slices and cardiac prompts
("left ventricle", "myocardium", "right ventricle") on the unseen RIM-ONE r2 crops, through
:func:`emclip.segment` with the right ``modality`` of the image. Counts the (image, prompt) pairs
reported found (a false mask) and the largest false area.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = (
    ("cardiac/mscmr_lge", "cardiac MRI", ["optic disc", "optic cup", "neuroretinal rim"]),
    ("fundus/rimone_dl_r2", "fundus", ["left ventricle", "myocardium", "right ventricle"]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--step", type=int, default=10, help="every N-th image (default 10)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import emclip
    from emclip.data.folder import open_dataset

    net = emclip.load_model(args.model) if args.model else emclip.load_model()
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "model": args.model or "bundled default", "cases": {}}
    for folder, modality, prompts in CASES:
        ds = open_dataset(Path(args.data_root) / folder)
        found = {p: 0 for p in prompts}
        largest = 0.0
        n = 0
        for i in range(0, len(ds), args.step):
            res = emclip.segment(ds[i].image, prompts, net, modality=modality)
            n += 1
            for p, f, mask in zip(prompts, res.found, res.masks):
                if f:
                    found[p] += 1
                    largest = max(largest, float(mask.mean()))
        pairs = n * len(prompts)
        report["cases"][folder] = {"modality": modality, "images": n, "pairs": pairs,
                                   "found_pairs": sum(found.values()), "found_by_prompt": found,
                                   "largest_false_area_fraction": largest}
        print(f"{folder}: {sum(found.values())} of {pairs} absent (image, prompt) pairs reported found "
              f"{found}; largest false area {100 * largest:.2f} % of the image")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
