"""Dice on an unseen domain before and after fine-tuning on n corrected images (issue 8).

Default domain: MS-CMRSeg 2019 LGE (``../shared/data/cardiac/mscmr_lge``; the bundled model never saw
it). "Corrected images" are ground-truth masks of slices from distinct patients. With a fixed
seed the patients are shuffled; the first ``max(ns)`` form the fine-tune pool (one slice each:
the middle one of the slices showing LV, MYO and RV), and *all* slices of the remaining
patients form the evaluation set, the same for every point, so no patient is on both sides.
Each point fine-tunes the same starting model with the same schedule (:func:`emclip.train.
finetune.finetune`; every image trains, final weights) after storing its images with
:func:`emclip.data.user_dataset.add_to_training_set`, then evaluates with
:func:`emclip.evaluate.evaluate` (Dice per image, mean over images).

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune_curve.py            # full curve
    python benchmarks/bench_finetune_curve.py --quick                       # smoke test
    OMP_NUM_THREADS=1 python benchmarks/bench_finetune_curve.py \
        --data ../shared/data/fundus/rimone_dl_r1 --out /work/runs/finetune/rimone_r1  # a fundus domain

Writes ``<out>/curve.json`` (default out: /work/runs/finetune) with every number, the chosen
patients and slices, wall times and the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]


def group_of(row: dict) -> str:
    return row.get("patient") or row.get("case") or row["id"]


def choose(data: Path, max_n: int, seed: int) -> tuple[list[str], list[str], dict[str, list[dict]]]:
    """(fine-tune image ids in order, evaluation groups, meta rows by group). A group is the
    meta.csv patient (cardiac) or the image itself (fundus: no patient column)."""
    with (data / "meta.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(group_of(r), []).append(r)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    pool, rest = patients[:max_n], patients[max_n:]
    if not rest:
        raise SystemExit(f"{data}: {len(patients)} patients leave none for evaluation with n={max_n}")
    picks = []
    for p in pool:
        order = (lambda r: int(r["slice_index"])) if "slice_index" in by_patient[p][0] else (lambda r: r["id"])
        full = sorted((r for r in by_patient[p] if r.get("has_lv") == r.get("has_myo") == r.get("has_rv") == "1"),
                      key=order)
        cands = full or sorted(by_patient[p], key=order)
        picks.append(cands[len(cands) // 2]["id"])
    return picks, rest, by_patient


def eval_folder(data: Path, patients: list[str], by_patient: dict[str, list[dict]], folder: Path) -> Path:
    """A dataset folder (symlinks) holding every slice of ``patients``."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    shutil.copy(data / "dataset.yaml", folder / "dataset.yaml")
    rows = [r for p in patients for r in by_patient[p]]
    for r in rows:
        for sub in ("images", "masks"):
            (src,) = [p for p in (data / sub).glob(f"{r['id']}.*")]
            (folder / sub / src.name).symlink_to(src)
    rows = [{k: v for k, v in r.items() if k != "official_split"} for r in rows]  # evaluate all of them
    with (folder / "meta.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return folder


def dice_of(result: dict, structures: list[str]) -> dict[str, float]:
    (ds,) = result["datasets"].values()
    d = {s: float(ds["structures"][s]["dice"]) for s in structures}
    d["mean"] = sum(d.values()) / len(structures)
    d["n_images"] = ds["n_images"]
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cardiac" / "mscmr_lge")
    ap.add_argument("--model", default=None, help="starting checkpoint (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=Path("/work/runs/finetune"))
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 3, 5, 10])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25, help="steps per epoch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="at most N evaluation slices (smoke tests)")
    ap.add_argument("--quick", action="store_true", help="smoke test: n=1, 2 steps, 10 evaluation slices")
    args = ap.parse_args(argv)
    if args.quick:
        args.ns, args.epochs, args.steps, args.eval_limit = [1], 1, 2, 10
        args.out = args.out / "quick"

    import torch
    from emclip.data.folder import FolderDataset
    from emclip.data.format import read_spec
    from emclip.data.user_dataset import add_to_training_set
    from emclip.evaluate import evaluate
    from emclip.train.finetune import finetune

    args.out.mkdir(parents=True, exist_ok=True)
    spec = read_spec(args.data)
    picks, rest, by_patient = choose(args.data, max(args.ns), args.seed)
    evald = eval_folder(args.data, rest, by_patient, args.out / "eval_set")
    src_ds = FolderDataset(args.data)
    index = {sid: i for i, sid in enumerate(src_ds.ids)}
    record = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "data": str(args.data), "model": args.model or "bundled default",
        "seed": args.seed, "schedule": {"epochs": args.epochs, "steps_per_epoch": args.steps,
                                        "batch_size": args.batch_size, "lr": args.lr, "selection": "final weights"},
        "finetune_slices": picks, "eval_patients": rest,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "points": [],
    }

    def run_eval(model, tag: str) -> dict:
        t = time.perf_counter()
        res = evaluate(model, [evald], split="all", device="cpu", limit=args.eval_limit, model_name=tag)
        d = dice_of(res, spec.structure_names)
        d["eval_seconds"] = round(time.perf_counter() - t, 1)
        return d

    base = run_eval(args.model, "before")
    record["points"].append({"n": 0, **base, "finetune_seconds": 0.0})
    print(f"n=0: {base}", flush=True)
    for n in sorted(args.ns):
        folder = args.out / "data" / f"n{n:02d}"
        if folder.exists():
            shutil.rmtree(folder)
        for sid in picks[:n]:
            sample = src_ds[index[sid]]
            masks = dict(zip(spec.structure_names, sample.structure_masks()))
            add_to_training_set(folder, sample.image, masks, modality=spec.modality, name=sid,
                                group=src_ds.group_of(index[sid]))
        ckpt = args.out / "checkpoints" / f"n{n:02d}"
        t, cpu = time.perf_counter(), time.process_time()
        finetune(folder, args.model, ckpt, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, device="cpu", seed=args.seed, holdout=False)
        ft_s = round(time.perf_counter() - t, 1)
        ft_cpu = round(time.process_time() - cpu, 1)
        d = run_eval(str(ckpt), f"n={n}")
        record["points"].append({"n": n, **d, "finetune_seconds": ft_s, "finetune_cpu_seconds": ft_cpu,
                                 "load_average_1min": round(os.getloadavg()[0], 2), "checkpoint": str(ckpt)})
        print(f"n={n}: {d} (fine-tune {ft_s} s wall, {ft_cpu} s CPU)", flush=True)
        (args.out / "curve.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    (args.out / "curve.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"wrote {args.out / 'curve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
