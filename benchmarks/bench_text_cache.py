"""Prompt embedding cache: the second run with the same prompts skips the text tower.

On a model whose cache is empty, ``emclip.segment`` (512x512 RGB, 2 prompts, one pass) is called
twice with the same prompts, then once with a new prompt. For each call it records the time, the
text encoder's ``cache_info()`` (hits/misses/size) and how many times the text tower's forward
actually ran (a forward hook). Then, interleaved over repeats: ``model.encode_prompts`` with the
cache cleared vs cached, and whole ``segment`` calls with the cache cleared vs cached.

    python benchmarks/bench_text_cache.py
    python benchmarks/bench_text_cache.py --quick
"""

from __future__ import annotations

import time

import common


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    threads = common.setup_threads(args.threads)
    import emclip
    import torch
    from emclip.prompts import apply_templates

    facts = common.machine_facts()
    common.warn_if_contended(facts)
    image = common.fundus_like(128 if args.quick else 512)
    prompts, modality = common.FUNDUS_PROMPTS, "fundus"
    model, source = common.timing_model(args.model)
    text = model.text_encoder
    tower_calls = {"n": 0}
    text.tower.register_forward_hook(lambda *a: tower_calls.__setitem__("n", tower_calls["n"] + 1))

    # warm the image path (threads, oneDNN primitives) with a throw-away prompt, then empty the cache
    emclip.segment(image, ["vessel"], model=model, modality=modality, device="cpu")
    text.clear_cache()
    text.cache.hits = text.cache.misses = 0
    tower_calls["n"] = 0

    single = common.single_pass_kwargs()

    def call(ps):
        before_calls = tower_calls["n"]
        t0 = time.perf_counter()
        emclip.segment(image, ps, model=model, modality=modality, device="cpu", **single)
        seconds = time.perf_counter() - t0
        return {"prompts": list(ps), "seconds": seconds, "tower_forward_calls": tower_calls["n"] - before_calls,
                "cache_info": dict(text.cache_info())}

    calls = [call(prompts), call(prompts), call(prompts + ["neuroretinal rim"])]
    # encode_prompts alone: cold (cache cleared each time) vs cached
    n = args.repeats or (3 if args.quick else 15)

    def cold():
        text.clear_cache()
        with torch.inference_mode():
            model.encode_prompts(prompts, modality)

    def warm():
        with torch.inference_mode():
            model.encode_prompts(prompts, modality)

    enc = common.interleaved({"cold (cache cleared)": cold, "cached": warm}, n, warmup=1, baseline="cold (cache cleared)")

    # whole segment() calls, side by side: first call with these prompts (cache emptied) vs repeat
    def seg_cold():
        text.clear_cache()
        emclip.segment(image, prompts, model=model, modality=modality, device="cpu", **single)

    def seg_warm():
        emclip.segment(image, prompts, model=model, modality=modality, device="cpu", **single)

    seg = common.interleaved({"first call (cache empty)": seg_cold, "second call (cached)": seg_warm}, n, warmup=1,
                             baseline="first call (cache empty)")
    sentences = len(apply_templates(prompts[0], modality))
    first, second = calls[0], calls[1]
    skipped = second["tower_forward_calls"] == 0 and second["cache_info"]["hits"] > first["cache_info"]["hits"]
    payload = {
        "machine": facts,
        "threads": threads,
        "quick": args.quick,
        "model_source": source,
        "image": list(image.shape),
        "templates_per_prompt": sentences,
        "segment_calls": calls,
        "encode_prompts": enc,
        "segment_first_vs_second": seg,
        "second_call_skips_text_tower": skipped,
        "meets_target": skipped,
    }
    common.write_result("text_cache", payload, args.out)
    print(f"model: {source}; threads {threads}; {sentences} template sentences per prompt")
    for i, c in enumerate(calls, 1):
        print(f"segment call {i} {c['prompts']}: {common.ms(c['seconds'])}, text tower forwards {c['tower_forward_calls']}, "
              f"cache_info {c['cache_info']}")
    for name, s in enc["times"].items():
        print(f"encode_prompts {name:22s} median {common.ms(s['median'])} (best {common.ms(s['min'])})")
    for name, s in seg["times"].items():
        print(f"segment {name:26s} median {common.ms(s['median'])} (best {common.ms(s['min'])}), "
              f"ratio x{seg['ratios'][name]['median']:.2f}")
    print(f"second run skips the text tower: {'yes' if skipped else 'NO'}")


if __name__ == "__main__":
    main()
