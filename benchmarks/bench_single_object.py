"""Choose, on the source domains' validation images, which structures keep one connected object.

    python benchmarks/bench_single_object.py [--model CHECKPOINT] [--data-root ../shared/data]
                                             [--out /work/runs/single_object] [--install FOLDER]

nnU-Net-style post-processing decision (:mod:`emclip.postprocess`): for every structure the
model knows (``config.known_structures``; a U-Net's ``class_names``), the validation Dice with the model's masks as they
come (``config.single_object = []``) and with only the main connected component kept. A structure
is listed in ``single_object`` when keeping one component does not lower its mean validation
Dice. Only source-domain validation parts are used — the same parts the training run selected
its epoch on (``fundus/drishti_gs`` and ``fundus_full/drishti_gs`` val, ``cardiac/acdc`` val;
split seed 0) — never a test part or an unseen domain.

Writes ``<out>/single_object.json`` (per structure: Dice off/on, the decision, the command);
``--install FOLDER`` re-saves that checkpoint folder with the chosen list in its config.json
(weights written in the folder's own dtype, so they stay byte-identical; checksums updated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VALIDATION = ("fundus/drishti_gs", "fundus_full/drishti_gs", "cardiac/acdc")


def _mean_dice(results: dict) -> dict[str, list[float]]:
    """structure -> [mean Dice per dataset that has it]."""
    out: dict[str, list[float]] = {}
    for ds in results["datasets"].values():
        for name, summary in ds["structures"].items():
            if summary.get("n_images"):
                out.setdefault(name, []).append(float(summary["dice"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="runs/single_object")
    parser.add_argument("--install", default=None, metavar="FOLDER",
                        help="write the chosen list into this checkpoint folder's config.json")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import emclip
    from emclip.evaluate import evaluate
    from emclip.modality import known_structures

    net = emclip.load_model(args.model) if args.model else emclip.load_model()
    candidates = sorted({s for names in known_structures(net).values() for s in names}
                        or set(getattr(net.config, "class_names", None) or []))
    if not candidates:
        print("the model lists no known structures (config.known_structures or class_names); nothing to decide",
              file=sys.stderr)
        return 2
    datasets = [str(Path(args.data_root) / d) for d in VALIDATION]
    started = time.perf_counter()
    scores = {}
    for setting, listed in (("off", []), ("on", candidates)):
        net.config.single_object = list(listed)
        scores[setting] = _mean_dice(evaluate(net, datasets, split="val"))
    rows = {}
    for name in candidates:
        off, on = scores["off"].get(name), scores["on"].get(name)
        if off is None or on is None:
            rows[name] = {"decision": "not evaluated (no validation images)", "keep_one": False}
            continue
        d_off, d_on = float(np.mean(off)), float(np.mean(on))
        rows[name] = {"dice_off": d_off, "dice_on": d_on, "delta": d_on - d_off, "keep_one": d_on >= d_off}
    chosen = [name for name in candidates if rows[name]["keep_one"]]
    report = {
        "benchmark": "single_object",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model or "bundled default",
        "validation": list(VALIDATION),
        "structures": rows,
        "single_object": chosen,
        "seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "single_object.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"{'structure':<20} {'off':>7} {'on':>7} {'delta':>7}  keep one")
    for name, row in rows.items():
        if "dice_off" in row:
            print(f"{name:<20} {row['dice_off']:7.4f} {row['dice_on']:7.4f} {row['delta']:+7.4f}  {row['keep_one']}")
        else:
            print(f"{name:<20} {row['decision']}")
    print(f"single_object = {chosen}  ({report['seconds']:.0f} s) -> {out / 'single_object.json'}")
    if args.install:
        folder = Path(args.install)
        target = emclip.load_model(folder)
        target.config.single_object = chosen
        dtype = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("weights_dtype", "float32")
        emclip.save_model(target, folder, dtype=getattr(torch, dtype))
        print(f"installed single_object = {chosen} into {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
