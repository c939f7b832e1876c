"""An 8192x8192 RGB image through the tiled path: peak RSS (target <= 3 GB) and time.

Each measurement runs in a *fresh* Python subprocess, so the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that call alone: interpreter, torch,
the model, the uint8 input image (192 MiB) and everything ``emclip.segment`` allocates. A
background thread also samples the RSS (psutil) to show when the peak happens. The automatic
tiling rule applies (tiles of 4x the network side, batches of 4 tiles; the fundus
coarse-to-fine path is switched off so the call is the tiled pass alone). The peak is read
after ``segment`` returns and again after ``result.label_image()`` (one combined uint8 map, what
the napari widget's "combined" option builds).

    python benchmarks/bench_tiled_memory.py
    python benchmarks/bench_tiled_memory.py --quick      # 2048x2048 with 512 px tiles
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import common

TARGET_BYTES = 3 * 1024**3


def child(side: int, tile: int | None, threads: int, model_source: str | None, prompts: list[str]) -> dict:
    """Runs inside the fresh subprocess; returns the measurements."""
    common.setup_threads(threads)
    import numpy as np

    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t_start = time.perf_counter()

    def sampler():
        while not stop.is_set():
            samples.append((time.perf_counter() - t_start, common.current_rss_bytes()))
            stop.wait(0.05)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    import emclip

    model, source = common.timing_model(model_source)
    rss_model = common.current_rss_bytes()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    rss_image = common.current_rss_bytes()
    peak_before = common.peak_rss_bytes()
    ticks: list[tuple[float, int, int]] = []
    t0 = time.perf_counter()
    result = emclip.segment(
        image, prompts, model=model, modality="fundus", device="cpu", tile_size=tile,
        progress=lambda d, t: ticks.append((time.perf_counter() - t0, d, t)), **common.single_pass_kwargs(),
    )
    seconds = time.perf_counter() - t0
    peak_segment = common.peak_rss_bytes()
    labels_t0 = time.perf_counter()
    labels = result.label_image()
    labels_s = time.perf_counter() - labels_t0
    stop.set()
    thread.join()
    peak = common.peak_rss_bytes()
    top = max(samples, key=lambda s: s[1]) if samples else (0.0, 0)
    return {
        "model_source": source,
        "image_shape": list(image.shape),
        "tiled": bool(result.tiled),
        "tile_size": result.info.get("tile_size"),
        "progress_steps": ticks[-1][2] if ticks else None,
        "segment_s": seconds,
        "label_image_s": labels_s,
        "label_dtype": str(labels.dtype),
        "rss_after_model_load": rss_model,
        "rss_after_image": rss_image,
        "peak_rss_before_segment": peak_before,
        "peak_rss_segment": peak_segment,
        "peak_rss": peak,
        "peak_rss_sampled": top[1],
        "peak_rss_sampled_at_s": top[0],
        "segment_started_at_s": t0 - t_start,
        "result_bytes": int(result.probabilities.nbytes + result.masks.nbytes + result.cluster_map.nbytes),
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse_hidden())
    args = p.parse_args()
    prompts = common.FUNDUS_PROMPTS
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["side"], spec["tile"], args.threads, args.model, prompts)))
        return
    common.setup_threads(args.threads)
    facts = common.machine_facts()
    common.warn_if_contended(facts)
    side, tile = (2048, 512) if args.quick else (8192, None)
    runs = args.repeats or (1 if args.quick else 3)
    results = []
    for i in range(runs):
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", json.dumps({"side": side, "tile": tile})]
        if args.model:
            cmd += ["--model", args.model]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"child {i} failed with code {proc.returncode}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["process_wall_s"] = wall
        results.append(res)
        print(f"run {i}: segment {res['segment_s']:.1f} s, peak RSS {res['peak_rss_segment'] / 2**30:.2f} GiB after "
              f"segment, {res['peak_rss'] / 2**30:.2f} GiB after label_image() "
              f"(sampled peak at {res['peak_rss_sampled_at_s']:.1f} s; segment started at {res['segment_started_at_s']:.1f} s)")
    peak = max(r["peak_rss"] for r in results)
    peak_segment = max(r["peak_rss_segment"] for r in results)
    times = common.summary([r["segment_s"] for r in results])
    payload = {
        "machine": facts,
        "threads": args.threads,
        "quick": args.quick,
        "image": [side, side, 3],
        "prompts": prompts,
        "target_peak_rss_bytes": TARGET_BYTES,
        "runs": results,
        "segment_s": times,
        "peak_rss_bytes": peak,
        "peak_rss_segment_bytes": peak_segment,
        "meets_target": peak <= TARGET_BYTES,
    }
    common.write_result("tiled_memory", payload, args.out)
    r0 = results[0]
    print(f"model: {r0['model_source']}; image {side}x{side}x3 uint8; tiled={r0['tiled']} tile={r0['tile_size']} "
          f"steps={r0['progress_steps']}")
    print(f"segment median {times['median']:.1f} s (IQR {times['iqr']:.1f} s); label_image {r0['label_image_s']:.2f} s")
    print(f"RSS: after model {r0['rss_after_model_load'] / 2**20:.0f} MiB, after image {r0['rss_after_image'] / 2**20:.0f} MiB, "
          f"result arrays {r0['result_bytes'] / 2**20:.0f} MiB")
    print(f"peak RSS {peak_segment / 2**30:.2f} GiB through segment(), {peak / 2**30:.2f} GiB with label_image(); "
          f"target <= 3 GiB: {'met' if peak <= TARGET_BYTES else 'MISSED'}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
