"""Modality recognition (fundus / cardiac MRI / brain MRI) from the frozen image encoder, in one command.

    python benchmarks/bench_modality.py [--model CHECKPOINT] [--data-root ../shared/data]
                                        [--out /work/runs/modality] [--install FOLDER]

Fits :class:`emclip.modality.ModalityHead` (logistic regression on the global-average-pooled
deepest encoder features; encoder frozen) on the source domains' *training* images only:

- fundus: ``fundus/drishti_gs`` and ``fundus_full/drishti_gs``, train + val parts of the split
  the default model used (official Drishti train eyes);
- cardiac MRI: ``cardiac/acdc``, train + val parts (patient-grouped, seed 0, as in training);
- brain MRI: axial slices of the 4 ``brain/brats2015_deepmedic`` cases of DeepMedic's train and
  validation split (FLAIR and T1c, each slice a grey image).

Then reports how often the held-out images are recognised (argmax, and accepted at the head's
``min_confidence``): in-domain test parts (Drishti official test, ACDC test patients, the 2
DeepMedic test cases) and the **unseen** domains RIM-ONE r1/r2, MS-CMR LGE and BraTS 2018
(FLAIR + T1, a sequence the head never saw). For brain volumes also per volume, through the
stack path of :func:`emclip.segment_stack` (5 central slices, probabilities averaged). Also
scikit-image's bundled ``retina.jpg`` (a whole macula-centred fundus photograph) and 17 of its
bundled natural/microscopy images (out of scope: the share rejected at ``min_confidence``).
Preprocessing is :func:`emclip.segment`'s (per-image robust window, RGB, letterbox).

Writes ``<out>/modality.json`` (every number + the command) and the head to ``<out>/head/``;
``--install FOLDER`` also writes it into that checkpoint folder (checksums.json updated).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

MODALITIES = ["fundus", "cardiac_mri", "brain_mri"]
SPLIT = {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}  # the default_combined preset's split
#: scikit-image sample images bundled with the package (no download): not medical, should be rejected
NATURAL_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "horse", "rocket",
                  "immunohistochemistry", "hubble_deep_field", "clock", "text", "grass", "gravel", "brick",
                  "colorwheel")
BRAIN_SEQUENCES = {"brats2015_deepmedic": ("flair", "t1ce"), "brats2018_dvn2": ("flair", "t1")}


def folder_images(root: Path, rel: str, parts: tuple[str, ...]) -> list[np.ndarray]:
    """Images of the given split parts ("all" = every image) of a 2D dataset folder."""
    from emclip.data import open_dataset, split_dataset
    from emclip.io import read_image

    ds = open_dataset(root / rel)
    if parts == ("all",):
        idx = list(range(len(ds)))
    else:
        split = split_dataset(ds, **SPLIT)
        idx = sorted(i for p in parts for i in split.part(p))
    return [read_image(ds.image_path(i)) for i in idx]


def brain_cases(root: Path, source: str, parts: tuple[str, ...]) -> list[str]:
    folder = root / "brain" / source
    with open(folder / "meta.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if parts == ("all",):
        return [r["case"] for r in rows]
    return [r["case"] for r in rows if r.get("deepmedic_split") in parts]


def brain_volumes(root: Path, source: str, cases: list[str]) -> list[tuple[str, np.ndarray]]:
    """``(case/sequence, volume with the axial axis first)`` for every case and sequence."""
    import nibabel as nib

    out = []
    for case in cases:
        for seq in BRAIN_SEQUENCES[source]:
            vol = np.asarray(nib.load(str(root / "brain" / source / case / f"{case}_{seq}.nii.gz")).get_fdata(),
                             dtype=np.float32)
            out.append((f"{case}/{seq}", np.moveaxis(vol, 2, 0)))
    return out


def brain_slices(volumes: list[tuple[str, np.ndarray]], step: int, min_fraction: float = 0.2) -> list[np.ndarray]:
    """Every ``step``-th axial slice whose tissue (values differing from the corner, i.e. the
    background) covers at least ``min_fraction`` of the slice."""
    out = []
    for _, vol in volumes:
        for z in range(0, vol.shape[0], step):
            s = vol[z]
            if np.mean(s != s[0, 0]) >= min_fraction:
                out.append(s)
    return out


def features(model: Any, images: list[np.ndarray], batch: int = 16) -> torch.Tensor:
    from emclip.modality import image_features, network_input

    rows = []
    for i in range(0, len(images), batch):
        x = torch.cat([network_input(model, im) for im in images[i: i + batch]])
        rows.append(image_features(model, x))
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def score(head: Any, feats: torch.Tensor, truth: str) -> dict[str, Any]:
    probs = head.probabilities(feats)
    conf, best = probs.max(dim=1)
    predicted = [head.modalities[int(b)] for b in best]
    accepted = conf >= head.min_confidence
    correct = torch.tensor([p == truth for p in predicted])
    n = len(predicted)
    return {
        "truth": truth,
        "n": n,
        "accuracy_argmax": float(correct.float().mean()),
        "accuracy_accepted": float((correct & accepted).float().mean()),
        "rejected": float((~accepted).float().mean()),
        "wrong_accepted": float((~correct & accepted).float().mean()),
        "mean_confidence": float(conf.mean()),
        "min_confidence": float(conf.min()),
        "predicted": {m: int(sum(p == m for p in predicted)) for m in head.modalities},
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The per-dataset accuracy table of BENCHMARKS.md, from a report."""
    header = ("| held-out data | kind | n | recognised (accepted) | argmax correct | rejected | wrong & accepted |"
              " mean confidence |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["held_out"].items():
        if r.get("truth") is None:
            lines.append(f"| {name} | {r['kind']} | {r['n']} | | | {r['rejected']:.1%} | | {r['mean_confidence']:.3f} |")
            continue
        lines.append(f"| {name} | {r['kind']} | {r['n']} | {r['accuracy_accepted']:.1%} | {r['accuracy_argmax']:.1%} | "
                     f"{r['rejected']:.1%} | {r['wrong_accepted']:.1%} | {r['mean_confidence']:.3f} |")
    for name, r in report["stacks"].items():
        lines.append(f"| {name}, whole volumes (stack path) | {r['kind']} | {r['n']} | {r['accuracy_accepted']:.1%} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="/work/runs/modality")
    parser.add_argument("--brain-step", type=int, default=4, help="take every N-th axial brain slice (default 4)")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--min-confidence", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--install", default=None, metavar="FOLDER",
                        help="also write the fitted head into this checkpoint folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import emclip
    from emclip.inference.prompt_free import recognition_slices
    from emclip.modality import fit_modality_head, recognise_modality, save_modality_head

    root = Path(args.data_root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = emclip.load_model(args.model, "cpu", cache=False)
    model.eval()

    train_sets = {
        "fundus/drishti_gs (train+val)": ("fundus", folder_images(root, "fundus/drishti_gs", ("train", "val"))),
        "fundus_full/drishti_gs (train+val)": ("fundus", folder_images(root, "fundus_full/drishti_gs", ("train", "val"))),
        "cardiac/acdc (train+val)": ("cardiac_mri", folder_images(root, "cardiac/acdc", ("train", "val"))),
    }
    brain_train_cases = brain_cases(root, "brats2015_deepmedic", ("train", "validation"))
    brain_train = brain_volumes(root, "brats2015_deepmedic", brain_train_cases)
    train_sets[f"brain/brats2015_deepmedic (train+validation cases {len(brain_train_cases)}, flair+t1ce slices)"] = (
        "brain_mri", brain_slices(brain_train, args.brain_step))
    feats, labels, counts = [], [], {}
    for name, (truth, images) in train_sets.items():
        f = features(model, images)
        feats.append(f)
        labels += [MODALITIES.index(truth)] * len(f)
        counts[name] = len(f)
        print(f"train {name}: {len(f)} images", flush=True)
    head = fit_modality_head(torch.cat(feats), labels, MODALITIES, weight_decay=args.weight_decay,
                             min_confidence=args.min_confidence,
                             info={"train_sets": counts, "fitted_by": "benchmarks/bench_modality.py",
                                   "model": str(args.model or "bundled default")})
    save_modality_head_dir = out / "head"
    save_modality_head_dir.mkdir(exist_ok=True)
    save_modality_head(head, save_modality_head_dir)

    test_cases = brain_cases(root, "brats2015_deepmedic", ("test",))
    brain_test = brain_volumes(root, "brats2015_deepmedic", test_cases)
    brain_unseen = brain_volumes(root, "brats2018_dvn2", brain_cases(root, "brats2018_dvn2", ("all",)))
    held_out = {
        "fundus/drishti_gs test": ("fundus", "in-domain", folder_images(root, "fundus/drishti_gs", ("test",))),
        "fundus_full/drishti_gs test": ("fundus", "in-domain", folder_images(root, "fundus_full/drishti_gs", ("test",))),
        "cardiac/acdc test": ("cardiac_mri", "in-domain", folder_images(root, "cardiac/acdc", ("test",))),
        "brain/brats2015_deepmedic test cases (flair+t1ce)": ("brain_mri", "in-domain", brain_slices(brain_test, args.brain_step)),
        "fundus/rimone_dl_r1": ("fundus", "unseen", folder_images(root, "fundus/rimone_dl_r1", ("all",))),
        "fundus/rimone_dl_r2": ("fundus", "unseen", folder_images(root, "fundus/rimone_dl_r2", ("all",))),
        "cardiac/mscmr_lge": ("cardiac_mri", "unseen", folder_images(root, "cardiac/mscmr_lge", ("all",))),
        "brain/brats2018_dvn2 (flair+t1)": ("brain_mri", "unseen", brain_slices(brain_unseen, args.brain_step)),
    }
    results: dict[str, Any] = {}
    for name, (truth, kind, images) in held_out.items():
        results[name] = {"kind": kind, **score(head, features(model, images), truth)}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    from skimage import data as skdata

    # scikit-image's bundled retina.jpg: one whole macula-centred fundus photograph (unseen camera)
    results["scikit-image retina.jpg"] = {"kind": "unseen", **score(head, features(model, [skdata.retina()]), "fundus")}
    natural = [getattr(skdata, n)() for n in NATURAL_IMAGES]
    probs = head.probabilities(features(model, natural))
    conf, best = probs.max(dim=1)
    results["scikit-image natural images (out of scope)"] = {
        "kind": "out-of-scope", "truth": None, "n": len(natural),
        "rejected": float((conf < head.min_confidence).float().mean()),
        "mean_confidence": float(conf.mean()),
        "images": {n: {"best": head.modalities[int(b)], "confidence": round(float(c), 4)}
                   for n, b, c in zip(NATURAL_IMAGES, best, conf)},
    }
    print(f"natural: {json.dumps(results['scikit-image natural images (out of scope)'])}", flush=True)

    from emclip.modality import attach_modality_head

    attach_modality_head(model, head)
    stacks: dict[str, Any] = {}
    for name, vols, kind in (("brain/brats2015_deepmedic test cases", brain_test, "in-domain"),
                             ("brain/brats2018_dvn2", brain_unseen, "unseen")):
        rows = []
        for vid, vol in vols:
            picked = [vol[i] for i in recognition_slices(vol)]
            rec = recognise_modality(picked, model)
            rows.append({"volume": vid, "recognised": rec.modality, "best": rec.best,
                         "confidence": round(rec.confidence, 4)})
        stacks[name] = {"kind": kind, "n": len(rows),
                        "accuracy_accepted": float(np.mean([r["recognised"] == "brain_mri" for r in rows])),
                        "volumes": rows}
        print(f"stack {name}: {stacks[name]['accuracy_accepted']:.3f}", flush=True)

    report = {
        "command": "python benchmarks/bench_modality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model or "bundled default"),
        "modalities": MODALITIES,
        "head": {"features": "global average pool of the deepest encoder map", "num_features": head.num_features,
                 "min_confidence": head.min_confidence, "weight_decay": args.weight_decay,
                 "train_counts": counts},
        "held_out": results,
        "stacks": stacks,
        "seconds": round(time.time() - t0, 1),
        "torch_threads": args.threads,
        "platform": platform.platform(),
    }
    target = out / "modality.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, target)
    print(markdown_table(report))
    print(f"wrote {target} and {save_modality_head_dir}")
    if args.install:
        save_modality_head(head, args.install)
        print(f"installed the head into {args.install}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
