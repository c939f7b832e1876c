"""Semi-supervised vs supervised-only training with few labelled ACDC patients (issue 8).

    python benchmarks/bench_semi_supervised.py run PRESET [--out-root /work/runs/semi] [--data-root DIR]
    python benchmarks/bench_semi_supervised.py summary [--out-root /work/runs/semi]

``run`` trains one preset (cardiac_acdc_{sup,semi}_{1,5}pct, cardiac_acdc_sup_100pct) into
``OUT_ROOT/PRESET`` without the built-in end-of-run evaluation, then evaluates ``best/`` on the
preset's test datasets (ACDC test patients, MS-CMRSeg LGE) through :func:`emclip.evaluate.evaluate`,
timing training and evaluation separately (``OUT_ROOT/PRESET/bench.json``). ``summary`` collects
every ``bench.json`` into ``OUT_ROOT/summary.md`` and ``summary.json``. The shell wrapper
bench_semi_supervised.sh runs all five presets (through /work/coord/heavy when present).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

PRESETS = [
    "cardiac_acdc_sup_1pct", "cardiac_acdc_semi_1pct",
    "cardiac_acdc_sup_5pct", "cardiac_acdc_semi_5pct",
    "cardiac_acdc_sup_100pct",
]
STRUCTURES = [("left ventricle", "LV"), ("myocardium", "MYO"), ("right ventricle", "RV")]


def run(preset: str, out_root: Path, data_root: str) -> dict:
    import torch
    from emclip.train.config import load_train_config
    from emclip.train.trainer import _evaluate_at_end, open_train_sources, train

    out = out_root / preset
    cfg = load_train_config(preset, [f"out_dir={out}", f"data_root={data_root}", "evaluate_at_end=false"])
    labelled, unlabelled = open_train_sources(cfg)
    t0 = time.perf_counter()
    result = train(cfg, resume=(out / "last.json").is_file())
    t1 = time.perf_counter()
    results = _evaluate_at_end(cfg, result.best_checkpoint, torch.device("cpu"), None)
    t2 = time.perf_counter()
    record = {
        "preset": preset,
        "labelled_fraction": cfg.train[0].labelled_fraction,
        "semi_supervised": cfg.semi_supervised.enabled,
        "labelled_patients": sorted({s.dataset.group_of(i) for s in labelled for i in s.indices}),
        "labelled_images": sum(len(s.indices) for s in labelled),
        "unlabelled_images": sum(len(s.indices) for s in unlabelled),
        "steps": result.steps_done,
        "best_val_dice": result.best_val_dice,
        "train_seconds": round(t1 - t0, 1),
        "eval_seconds": round(t2 - t1, 1),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
        "eval": {name: {s: ds["structures"][s]["dice"] for s, _ in STRUCTURES} | {"n_images": ds["n_images"]}
                 for name, ds in results["datasets"].items()},
    }
    (out / "bench.json").write_text(json.dumps(record, indent=1))
    return record


def summary(out_root: Path) -> str:
    rows = []
    for preset in PRESETS:
        path = out_root / preset / "bench.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    lines = [
        "| labelled | method | ACDC test LV | MYO | RV | mean | LGE LV | MYO | RV | mean | train s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for key in ("acdc", "mscmr_lge"):
            d = r["eval"].get(key, {})
            vals = [d.get(s) for s, _ in STRUCTURES]
            cells += [f"{v:.3f}" if v is not None else "–" for v in vals]
            ok = [v for v in vals if v is not None]
            cells.append(f"**{sum(ok) / len(ok):.3f}**" if ok else "–")
        frac = r["labelled_fraction"]
        who = f"{frac:.0%} ({len(r['labelled_patients'])} pat., {r['labelled_images']} img)"
        method = "semi-supervised (EMA teacher)" if r["semi_supervised"] else "supervised only"
        lines.append(f"| {who} | {method} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out_root / "summary.md").write_text(text)
    (out_root / "summary.json").write_text(json.dumps(rows, indent=1))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "summary"])
    p.add_argument("preset", nargs="?", choices=PRESETS)
    p.add_argument("--out-root", default="/work/runs/semi")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    a = p.parse_args()
    out_root = Path(a.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    if a.command == "run":
        if not a.preset:
            p.error("run needs a PRESET")
        print(json.dumps(run(a.preset, out_root, a.data_root), indent=1))
    else:
        print(summary(out_root))


if __name__ == "__main__":
    main()
