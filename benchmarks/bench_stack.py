"""A 20-slice stack of 256x256 through ``emclip.segment_stack``, end to end (target <= 3 s).

Times the whole call on a warm model (one intensity window for the volume, slices batched
``batch_size`` at a time, results back in the volume's axis order), interleaved for batch sizes
1, 4 (the default) and 8, plus the same-budget U-Net baseline at the default batch size, on 2
CPU threads. The cold first call (text tower runs once) is reported too.

    python benchmarks/bench_stack.py
    python benchmarks/bench_stack.py --quick
"""

from __future__ import annotations

import time

import common

TARGET_S = 3.0


def cardiac_like_stack(z: int, size: int, seed: int = 0):
    """A synthetic uint16 ``(z, size, size)`` short-axis-MRI-like stack (content does not change speed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    vol = np.empty((z, size, size), dtype=np.uint16)
    for k in range(z):
        r = np.hypot(yy - 0.5, xx - 0.5 - 0.01 * k)
        ring = np.exp(-((r - 0.12) ** 2) / 0.0008)
        blood = (r < 0.1).astype(np.float32)
        img = 300 * ring + 900 * blood + 200 * (r < 0.4) + rng.normal(0, 30, r.shape)
        vol[k] = np.clip(img, 0, 4000).astype(np.uint16)
    return vol


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    threads = common.setup_threads(args.threads)
    import emclip

    facts = common.machine_facts()
    common.warn_if_contended(facts)
    z, size = (4, 64) if args.quick else (20, 256)
    rounds = args.repeats or (2 if args.quick else 10)
    warmup = 1 if args.quick else 2
    volume = cardiac_like_stack(z, size)
    prompts, modality = common.CARDIAC_PROMPTS, "cardiac MRI"
    model, source = common.timing_model(args.model)
    unet = common.unet_model()

    t0 = time.perf_counter()
    first = emclip.segment_stack(volume, prompts, model=model, modality=modality, device="cpu")
    cold_s = time.perf_counter() - t0
    assert first.masks.shape == (len(prompts), z, size, size), first.masks.shape

    def run(m, batch):
        return lambda: emclip.segment_stack(volume, prompts, model=m, modality=modality, device="cpu", batch_size=batch)

    variants = {
        "emclip batch 4 (default)": run(model, 4),
        "emclip batch 1": run(model, 1),
        "emclip batch 8": run(model, 8),
        "unet-baseline batch 4": run(unet, 4),
    }
    res = common.interleaved(variants, rounds, warmup, baseline="emclip batch 4 (default)")
    med = res["times"]["emclip batch 4 (default)"]["median"]
    payload = {
        "machine": facts,
        "threads": threads,
        "quick": args.quick,
        "model_source": source,
        "volume": {"shape": list(volume.shape), "dtype": str(volume.dtype)},
        "prompts": prompts,
        "modality": modality,
        "target_s": TARGET_S,
        "cold_first_call_s": cold_s,
        "results": res,
        "per_slice_s": med / z,
        "meets_target": med <= TARGET_S,
        "meets_target_best_of_n": res["times"]["emclip batch 4 (default)"]["min"] <= TARGET_S,
    }
    common.write_result("stack", payload, args.out)
    print(f"model: {source}; threads {threads}; volume {volume.shape} {volume.dtype}; prompts {prompts}")
    print(f"cold first call: {cold_s:.2f} s")
    for name, s in res["times"].items():
        print(f"{name:26s} median {s['median']:.3f} s (IQR {s['iqr']:.3f} s, best {s['min']:.3f} s), "
              f"x{res['ratios'][name]['median']:.2f}")
    print(f"target <= {TARGET_S} s: {'met' if med <= TARGET_S else 'MISSED'} ({med:.2f} s, {common.ms(med / z)} per slice)")


if __name__ == "__main__":
    main()
