"""Coarse-to-fine optic disc / cup segmentation on whole fundus photographs, in one command.

    python benchmarks/bench_fundus_full.py [--model CHECKPOINT] [--data-root ../shared/data]

Measures, with a trained checkpoint (default: the bundled model, else ../runs/default/best):

(a) localisation on the whole Drishti-GS1 photographs of the official *test* split
    (``fundus_full/drishti_gs``, 51 photos, long side 1024; never the training eyes): the
    located disc centre lies inside the true disc; centre error and diameter ratio;
(b) disc / cup / rim Dice at full resolution: coarse-to-fine (:func:`emclip.fundus.segment_fundus`)
    against one plain letterboxed whole-image pass, and beside them the ROI-crop results
    (``fundus/drishti_gs`` official test, the same eyes cropped around the true disc), where
    ``segment_fundus`` must recognise the crops and return the plain result; RIM-ONE crops
    (``--rimone-limit`` per release) are checked for that recognition too;
(c) skimage's ``retina.jpg`` (macula-centred whole photo, no ground truth): where the disc is
    found; an overlay PNG (masks, crop box, disc centre) and a zoom of the crop are written.

Prints a Markdown summary; ``--json`` writes every number and per-image rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RUN_BEST = REPO.parent / "runs" / "default" / "best"


def load(model_arg: str | None) -> tuple[Any, str]:
    import emclip
    from emclip.errors import CheckpointError

    if model_arg:
        return emclip.load_model(model_arg, device="cpu"), model_arg
    try:
        return emclip.load_model(device="cpu"), "bundled default model"
    except CheckpointError:
        if (RUN_BEST / "config.json").is_file():
            return emclip.load_model(RUN_BEST, device="cpu"), str(RUN_BEST)
        raise


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    from emclip.metrics import dice as _dice

    return float(_dice(pred, truth))


def test_items(folder: Path, split: str = "test"):
    from emclip.data.folder import open_dataset
    from emclip.data.splits import split_dataset

    ds = open_dataset(folder)
    idx = split_dataset(ds).part(split) if split != "all" else list(range(len(ds)))
    return ds, idx


def by_name(result: Any, prompt: str) -> np.ndarray:
    return result.mask(prompt)


def run_whole_photos(net, data: Path, limit: int | None) -> dict[str, Any]:
    from emclip import fundus

    ds, idx = test_items(data / "fundus_full" / "drishti_gs")
    idx = idx[:limit] if limit else idx
    prompts = list(ds.spec.structure_names)
    modality = ds.spec.modality
    rows = []
    for n, i in enumerate(idx):
        sample = ds[i]
        truth = dict(zip(prompts, sample.structure_masks()))
        gt_disc = truth["optic disc"]
        t0 = time.perf_counter()
        plain = fundus._plain_segment(sample.image, prompts, net, modality=modality)
        t1 = time.perf_counter()
        fine = fundus.segment_fundus(sample.image, prompts, net, modality=modality)
        t2 = time.perf_counter()
        alone = fundus.locate_optic_disc(sample.image, net)
        info = fine.info["coarse_to_fine"]
        ys, xs = np.nonzero(gt_disc)
        gt_centre = (ys.mean(), xs.mean())
        gt_diam = 2 * math.sqrt(len(ys) / math.pi)
        row: dict[str, Any] = {
            "id": sample.id,
            "used": info["used"],
            "reason": info["reason"],
            "seconds_plain": round(t1 - t0, 3),
            "seconds_c2f": round(t2 - t1, 3),
        }
        for name, loc in (
            ("c2f", info["disc"]),
            ("alone", None if alone is None else alone.to_dict()),
        ):
            if loc is None:
                row[f"{name}_inside"] = False
                continue
            cy, cx = loc["center"]
            inside = bool(
                gt_disc[
                    min(max(round(cy), 0), gt_disc.shape[0] - 1),
                    min(max(round(cx), 0), gt_disc.shape[1] - 1),
                ]
            )
            row[f"{name}_inside"] = inside
            row[f"{name}_centre_error_rel"] = round(
                math.hypot(cy - gt_centre[0], cx - gt_centre[1]) / gt_diam, 4
            )
            row[f"{name}_diameter_ratio"] = round(loc["diameter"] / gt_diam, 4)
        for p in prompts:
            key = p.replace(" ", "_")
            row[f"plain_{key}"] = round(dice(by_name(plain, p), truth[p]), 4)
            row[f"c2f_{key}"] = round(dice(by_name(fine, p), truth[p]), 4)
        rows.append(row)
        print(
            f"  [{n + 1}/{len(idx)}] {sample.id}: disc plain {row['plain_optic_disc']:.3f} "
            f"c2f {row['c2f_optic_disc']:.3f} | cup plain {row['plain_optic_cup']:.3f} "
            f"c2f {row['c2f_optic_cup']:.3f} | inside {row['c2f_inside']}",
            file=sys.stderr,
        )
    return {"n": len(rows), "prompts": prompts, "rows": rows}


def run_crops(net, folder: Path, split: str, limit: int | None, with_dice: bool) -> dict[str, Any]:
    from emclip import fundus

    ds, idx = test_items(folder, split)
    idx = idx[:limit] if limit else idx
    prompts = list(ds.spec.structure_names)
    modality = ds.spec.modality
    rows = []
    for i in idx:
        sample = ds[i]
        auto = fundus.segment_fundus(sample.image, prompts, net, modality=modality)
        info = auto.info["coarse_to_fine"]
        row: dict[str, Any] = {
            "id": sample.id,
            "recognised_as_crop": (not info["used"]) and info["disc"] is not None,
            "disc_area_fraction": None if info["disc"] is None else info["disc"]["area_fraction"],
            "reason": info["reason"],
        }
        if with_dice:
            truth = dict(zip(prompts, sample.structure_masks()))
            plain = fundus._plain_segment(sample.image, prompts, net, modality=modality)
            for p in ("optic disc", "optic cup"):
                key = p.replace(" ", "_")
                row[f"plain_{key}"] = round(dice(by_name(plain, p), truth[p]), 4)
                row[f"auto_{key}"] = round(dice(by_name(auto, p), truth[p]), 4)
        rows.append(row)
    return {"n": len(rows), "rows": rows}


def run_retina(net, overlay: Path) -> dict[str, Any]:
    import cv2
    from emclip import fundus
    from emclip.io import atomic_path, overlay_rgb
    from PIL import Image
    from skimage import data as skdata

    img = skdata.retina()
    t0 = time.perf_counter()
    res = fundus.segment_fundus(img, ["optic disc", "optic cup"], net, modality="fundus")
    seconds = time.perf_counter() - t0
    info = res.info["coarse_to_fine"]
    rgb = overlay_rgb(img, res.masks, res.prompts)
    if info["disc"] is not None:
        cy, cx = info["disc"]["center"]
        cv2.drawMarker(rgb, (round(cx), round(cy)), (255, 255, 0), cv2.MARKER_CROSS, 40, 3)
    if info["crop"] is not None:
        y0, x0, y1, x1 = info["crop"]["box"]
        cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 0), 3)
    overlay.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(overlay) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    out: dict[str, Any] = {
        "overlay": str(overlay),
        "seconds": round(seconds, 3),
        "info": info,
        "found": res.found.tolist(),
        "areas": res.areas.tolist(),
    }
    if info["crop"] is not None:
        y0, x0, y1, x1 = info["crop"]["inside"]
        zoom = overlay.with_name(overlay.stem + "_crop.png")
        with atomic_path(zoom) as tmp:
            Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1])).save(tmp, format="PNG")
        out["zoom"] = str(zoom)
    return out


def mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else math.nan


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Model: {report['model']}", ""]
    whole = report.get("whole")
    if whole:
        rows = whole["rows"]
        n = len(rows)
        lines += [
            f"### Whole photographs: fundus_full/drishti_gs official test ({n} photos)",
            "",
            (
                f"- localisation (centre inside the true disc): segment_fundus pass "
                f"{sum(r['c2f_inside'] for r in rows)}/{n}, locate_optic_disc alone "
                f"{sum(r['alone_inside'] for r in rows)}/{n}"
            ),
            (
                f"- centre error / true diameter: mean {mean(rows, 'c2f_centre_error_rel'):.3f}; "
                f"located / true diameter: mean {mean(rows, 'c2f_diameter_ratio'):.3f}"
            ),
            f"- coarse-to-fine used on {sum(r['used'] for r in rows)}/{n}",
            (
                f"- seconds per photo: plain {mean(rows, 'seconds_plain'):.2f}, coarse-to-fine "
                f"{mean(rows, 'seconds_c2f'):.2f}"
            ),
            "",
            "| Dice (mean) | optic disc | optic cup | neuroretinal rim |",
            "|---|---|---|---|",
            "| plain whole-image pass | "
            + " | ".join(
                f"{mean(rows, 'plain_' + k):.3f}"
                for k in ("optic_disc", "optic_cup", "neuroretinal_rim")
            )
            + " |",
            "| coarse-to-fine | "
            + " | ".join(
                f"{mean(rows, 'c2f_' + k):.3f}"
                for k in ("optic_disc", "optic_cup", "neuroretinal_rim")
            )
            + " |",
        ]
    crops = report.get("crops", {})
    if crops:
        lines += [
            "",
            "### ROI crops (disc already centred): recognised as crops by segment_fundus",
            "",
            (
                "| dataset | n | recognised as crop | disc Dice plain | disc Dice auto "
                "| cup Dice plain | cup Dice auto |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for name, block in crops.items():
            rows = block["rows"]
            rec = sum(r["recognised_as_crop"] for r in rows)
            cells = [
                f"{mean(rows, k):.3f}" if any(k in r for r in rows) else "-"
                for k in (
                    "plain_optic_disc",
                    "auto_optic_disc",
                    "plain_optic_cup",
                    "auto_optic_cup",
                )
            ]
            lines.append(
                f"| {name} | {len(rows)} | {rec}/{len(rows)} | " + " | ".join(cells) + " |"
            )
    retina = report.get("retina")
    if retina:
        info = retina["info"]
        disc = info["disc"]
        lines += ["", "### skimage retina.jpg (1411x1411, macula-centred)", ""]
        if disc is None:
            lines.append("- no disc found")
        else:
            lines.append(
                f"- disc centre (row, col) {tuple(round(c) for c in disc['center'])}, diameter "
                f"{disc['diameter']:.0f} px ({100 * disc['area_fraction']:.2f} % of the image), "
                f"confidence {disc['confidence']:.2f}; coarse-to-fine used: {info['used']}"
            )
        lines.append(
            f"- overlay: {retina['overlay']}"
            + (f", crop zoom: {retina['zoom']}" if "zoom" in retina else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="checkpoint folder (default: bundled, else ../runs/default/best)"
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--limit", type=int, default=None, help="at most this many test photos / crops"
    )
    parser.add_argument(
        "--rimone-limit", type=int, default=40, help="RIM-ONE crops per release (0: skip)"
    )
    parser.add_argument("--overlay", type=Path, default=Path("/tmp/emclip_retina_overlay.png"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--skip", nargs="*", default=[], choices=["whole", "crops", "retina"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    net, name = load(args.model)
    report: dict[str, Any] = {"model": name}
    if "whole" not in args.skip:
        print("whole photographs ...", file=sys.stderr)
        report["whole"] = run_whole_photos(net, args.data_root, args.limit)
    if "crops" not in args.skip:
        print("ROI crops ...", file=sys.stderr)
        report["crops"] = {
            "drishti_gs (official test)": run_crops(
                net, args.data_root / "fundus" / "drishti_gs", "test", args.limit, True
            )
        }
        if args.rimone_limit:
            for release in ("rimone_dl_r1", "rimone_dl_r2"):
                report["crops"][release] = run_crops(
                    net, args.data_root / "fundus" / release, "all", args.rimone_limit, False
                )
    if "retina" not in args.skip:
        print("skimage retina ...", file=sys.stderr)
        report["retina"] = run_retina(net, args.overlay)
    print(markdown(report))
    if args.json:
        from emclip.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
