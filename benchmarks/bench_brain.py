"""Brain MRI with modality fusion: train the ``brain_fusion`` preset, then Dice per structure.

One command (about 10 min on one thread; run it through the team's CPU slots)::

    OMP_NUM_THREADS=1 python benchmarks/bench_brain.py            # --out /work/runs/brain
    OMP_NUM_THREADS=1 python benchmarks/bench_brain.py --reuse    # evaluate an existing run only

1. Trains ``brain_fusion`` (cpu-default seeds + fusion over FLAIR/T1/T1ce/T2) on 4 patients of
   brats2015_deepmedic (FLAIR + T1ce), patient-level split; the other 2 patients are held out.
2. Evaluates the *same* model with ``emclip.segment_stack(..., channels=...)``, axial slices, 3D
   Dice per case then mean over cases, per structure:
   - brats2015 held-out patients with FLAIR + T1ce (all sequences it was trained with), FLAIR
     only and T1ce only (missing-sequence inference);
   - brats2018_dvn2 (other source, native intensities, all 4 cases unseen) whole tumour with
     FLAIR + T1 (T1 was never seen in training: it goes through the shared T1 stem) and FLAIR only.
Writes ``results.json``, ``results.md`` and ``train/`` under ``--out``.

``--baseline`` instead trains the same preset *without* fusion on FLAIR alone (grey input, same
data, schedule and split) and evaluates it with FLAIR (``--out /work/runs/brain/baseline_flair``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path("/work/shared/data")
SRC15 = "brain/brats2015_deepmedic"
SRC18 = "brain/brats2018_dvn2"
STRUCTURES_15 = ["whole tumour", "tumour core", "enhancing tumour", "edema", "necrotic tumour core"]


def _case_arrays(root: Path, case: str, channels: list[str]):
    import nibabel as nib
    from emclip.data.volumes import voxel_axis

    vols, affine = [], None
    for ch in channels:
        img = nib.load(str(root / case / f"{case}_{ch}.nii.gz"))
        vols.append(np.asarray(img.dataobj, dtype=np.float32))
        affine = img.affine
    seg = np.asarray(nib.load(str(root / case / f"{case}_seg.nii.gz")).dataobj).astype(np.int32)
    return np.stack(vols, axis=-1), seg, voxel_axis("axial", affine)


def evaluate_setting(model, root: Path, cases: list[str], channels: list[str], structures: list[str],
                     spec) -> dict:
    """3D Dice per case and structure, for ``channels`` fed to the fusion model."""
    import emclip
    from emclip.metrics import dice

    per_case: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for case in cases:
        vol, seg, ax = _case_arrays(root, case, channels)
        res = emclip.segment_stack(vol, structures, model, axis=ax, channel_axis=-1, channels=channels,
                                   modality="brain MRI", batch_size=8)
        per_case[case] = {}
        for i, s in enumerate(structures):
            target = np.isin(seg, spec.structures[s])
            per_case[case][s] = float(dice(res.masks[i], target))
    seconds = time.perf_counter() - t0
    mean = {s: float(np.mean([per_case[c][s] for c in cases])) for s in structures}
    return {"channels": channels, "cases": cases, "per_case": per_case, "mean_dice": mean, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/runs/brain")
    ap.add_argument("--data-root", default=str(DATA))
    ap.add_argument("--reuse", action="store_true", help="skip training if <out>/train/best exists")
    ap.add_argument("--baseline", action="store_true", help="no fusion, FLAIR only (same preset otherwise)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from emclip.checkpoint import load_checkpoint
    from emclip.data.folder import open_dataset
    from emclip.data.format import read_spec
    from emclip.data.splits import split_dataset
    from emclip.train import train
    from emclip.train.config import load_train_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_root)
    run_dir = out / "train"
    t_start = time.perf_counter()
    train_seconds = None
    if not (args.reuse and (run_dir / "best" / "model.safetensors").is_file()):
        t0 = time.perf_counter()
        overrides = {"data_root": str(data), "out_dir": str(run_dir)}
        if args.baseline:
            overrides["model_overrides"] = {"fusion.enabled": False}
            overrides["train"] = [
                {"path": SRC15, "split": "train", "channel": "flair", "only_labelled": True, "repeat": 2},
                {"path": SRC15, "split": "train", "channel": "flair"},
            ]
        result = train("brain_fusion", overrides=overrides)
        train_seconds = round(time.perf_counter() - t0, 1)
        print(f"trained in {train_seconds} s, {result.images_per_s} images/s", flush=True)
    model = load_checkpoint(run_dir / "best")
    model.eval()

    cfg = load_train_config("brain_fusion")
    ds = open_dataset(data / SRC15, only_labelled=True)
    split = split_dataset(ds, seed=cfg.split.seed, val_fraction=cfg.split.val_fraction,
                          test_fraction=cfg.split.test_fraction)
    test15 = sorted({ds.group_of(i) for i in split.part("test")})
    train15 = sorted({ds.group_of(i) for i in split.part("train")})
    spec15, spec18 = read_spec(data / SRC15), read_spec(data / SRC18)
    cases18 = sorted(p.name for p in (data / SRC18).iterdir() if p.is_dir())

    settings = {
        "brats2015 held-out, FLAIR + T1ce": (data / SRC15, test15, ["flair", "t1ce"], STRUCTURES_15, spec15),
        "brats2015 held-out, FLAIR only": (data / SRC15, test15, ["flair"], STRUCTURES_15, spec15),
        "brats2015 held-out, T1ce only": (data / SRC15, test15, ["t1ce"], STRUCTURES_15, spec15),
        "brats2018 (other source), FLAIR + T1 (T1 unseen: left out, the default)": (
            data / SRC18, cases18, ["flair", "t1"], ["whole tumour"], spec18),
        "brats2018 (other source), FLAIR + T1 (T1 unseen, fed anyway: fusion.unseen='use')": (
            data / SRC18, cases18, ["flair", "t1"], ["whole tumour"], spec18, "use"),
        "brats2018 (other source), FLAIR only": (data / SRC18, cases18, ["flair"], ["whole tumour"], spec18),
    }
    if args.baseline:
        settings = {k: v for k, v in settings.items() if v[2] == ["flair"]}
    results = {}
    for name, (root, cases, chans, structs, spec, *policy) in settings.items():
        if getattr(model, "fusion", None) is not None:
            model.fusion.unseen = policy[0] if policy else model.config.fusion.unseen
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # UnseenSequenceWarning: expected in the unseen-T1 setting
            results[name] = evaluate_setting(model, root, cases, chans, structs, spec)
        if getattr(model, "fusion", None) is not None:
            results[name]["fusion_unseen"] = model.fusion.unseen
            results[name]["sequences_seen_in_training"] = [
                s for s, k in zip(model.fusion.sequences, model.fusion.seen.tolist()) if k]
        print(name, json.dumps(results[name]["mean_dice"]), f"{results[name]['seconds']} s", flush=True)
        (out / "results.partial.json").write_text(json.dumps({"train_seconds": train_seconds, "settings": results}, indent=2))
    total = round(time.perf_counter() - t_start, 1)
    summary = {
        "preset": "brain_fusion" + (" without fusion, FLAIR only" if args.baseline else ""), "train_patients": train15, "test_patients_brats2015": test15,
        "test_cases_brats2018": cases18, "train_seconds": train_seconds, "total_seconds": total,
        "threads": torch.get_num_threads(), "settings": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    cols = STRUCTURES_15
    lines = ["| setting | cases | " + " | ".join(cols) + " | eval s |", "|---|---|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        vals = [f"{r['mean_dice'][c]:.3f}" if c in r["mean_dice"] else "–" for c in cols]
        lines.append(f"| {name} | {len(r['cases'])} | " + " | ".join(vals) + f" | {r['seconds']} |")
    md = "\n".join(lines) + f"\n\ntraining {train_seconds} s, total {total} s\n"
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
