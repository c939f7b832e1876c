"""Efficiency: counted forward FLOPs / time, over the dense matmul FLOP/s measured in the same run.

For each model (the default EM-CLIP, the U-Net baseline, ViT-B/16 at the same 256 px input) the
forward FLOPs of one 256 px image with 2 prompts are counted with
``torch.utils.flop_counter.FlopCounterMode`` and the forward is timed (interleaved rounds, text
embeddings cached as at inference). The machine's fp32 matmul peak is measured before and after
and the better value is used; besides, a 2048 x 2048 matmul (the size that gives the peak here)
is timed in every round next to the models, and each forward's FLOP/s over that round's matmul
FLOP/s gives the *paired* fraction (median over rounds), which slow phases of a shared machine
leave alone. For the default model it also reports: encoder / decoder split,
FLOPs and time of depthwise vs dense convolutions, a torch.profiler table of the top operators,
and variants side by side (BatchNorms not folded = eager before bn_folding, bfloat16 autocast,
batch of 4; optional torch.compile and TorchScript freeze).

    python benchmarks/bench_efficiency.py                 # full run, ~4 min with --compile
    python benchmarks/bench_efficiency.py --compile       # + torch.compile variant (slow start)
    python benchmarks/bench_efficiency.py --freeze        # + torch.jit.freeze/optimize_for_inference
    python benchmarks/bench_efficiency.py --towers resnet18 resnet10t   # + dense-convolution towers
    python benchmarks/bench_efficiency.py --quick         # smoke test
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import common

TARGET_RATIO = 0.5
PROBE = "fp32 matmul (peak probe)"
MIRROR_PAIR = "mirror pair, batch 2 (per image; segment's default for the bundled model)"
TOP_OPS = 15


def matmul_probe(n: int):
    """``(fn, flops)``: one ``n x n`` fp32 matmul into a preallocated output, timed in every round
    next to the models so each forward is compared with the peak measured at the same moment."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


def paired(seconds: list[float], res: dict, flops: float, probe_flops: float) -> dict:
    """Per round: (``flops`` / that round's ``seconds``) / (the probe's FLOP/s in the same round);
    :func:`common.summary` of those ratios. Slow phases of a shared machine slow the probe too,
    so they cancel out."""
    probes = res["times"][PROBE]["samples"]
    return common.summary([(flops / t) / (probe_flops / tp) for t, tp in zip(seconds, probes)])


def paired_fraction(res: dict, name: str, flops: float, probe_flops: float, per_call: float = 1.0) -> dict:
    """:func:`paired` for the variant ``name`` of ``res``, whose calls each do ``per_call`` forwards."""
    return paired(res["times"][name]["samples"], res, flops * per_call, probe_flops)


def parts_together(res: dict, names: list[str], flops: float, probe_flops: float, peak: float) -> dict:
    """The parts of the forward, each timed alone in its own steady state, summed per round.
    Beside the whole forward it shows what running them one after the other costs (caches,
    allocation, the calls between them)."""
    sums = [sum(r) for r in zip(*(res["times"][n]["samples"] for n in names))]
    seconds = common.summary(sums)
    return {"gflops": flops / 1e9, "seconds": seconds, "fraction_of_peak": flops / seconds["median"] / peak,
            "fraction_of_peak_paired": paired(sums, res, flops, probe_flops)}


def count_flops(fn) -> tuple[float, dict[str, float]]:
    """Total FLOPs of ``fn()`` and FLOPs per aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    per_op = {str(k): float(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op


def conv_flops_by_kind(model, fn) -> dict[str, float]:
    """FLOPs of depthwise (groups == in channels > 1) vs dense convolutions in ``fn()``."""
    import torch

    totals: dict[str, float] = defaultdict(float)

    def hook(mod, inp, out):
        w = mod.weight
        kind = "depthwise" if mod.groups > 1 and mod.groups == mod.in_channels else "dense"
        kernel = w.shape[1] * w.shape[2] * w.shape[3]  # per output value: in/groups * kh * kw
        totals[kind] += 2.0 * out.numel() * kernel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return dict(totals)


def profile_table(fn, calls: int) -> tuple[list[dict], dict[str, float]]:
    """Top operators by self CPU time per forward, and conv time split depthwise / dense."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    table = [
        {
            "op": e.key,
            "calls_per_forward": e.count / calls,
            "self_ms_per_forward": e.self_cpu_time_total / 1000.0 / calls,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows
    ]
    conv_ms: dict[str, float] = defaultdict(float)
    conv_ops = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::_convolution_depthwise",
                "aten::thnn_conv2d", "aten::_nnpack_spatial_convolution", "aten::_mkldnn_convolution",
                "mkldnn::_convolution_pointwise")  # the last: the prepacked tower (emclip/nn/conv_prepacking.py)
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in conv_ops or not e.input_shapes or len(e.input_shapes) < 2:
            continue
        x, w = e.input_shapes[0], e.input_shapes[1]
        depthwise = len(w) == 4 and w[1] == 1 and len(x) == 4 and x[1] > 1
        conv_ms["depthwise" if depthwise else "dense"] += e.self_cpu_time_total / 1000.0 / calls
    conv_ms["all_ops"] = total / 1000.0 / calls
    del torch
    return table, dict(conv_ms)


@contextmanager
def switched_off(flag: str, *models):
    """Set the boolean attribute ``flag`` to False on every submodule of ``models`` that has it, and
    back afterwards. ``fold_batchnorm``: the tower itself runs instead of its BatchNorm-folded copy
    (emclip/nn/bn_folding.py). ``prepack_convolutions``: the folded copy runs plain convolutions
    (emclip/nn/conv_prepacking.py); FLOPs are counted that way, since FlopCounterMode does not count
    oneDNN's fused convolution op and the arithmetic is the same."""
    owners = [m for model in models for m in model.modules() if hasattr(m, flag)]
    before = [getattr(m, flag) for m in owners]
    for m in owners:
        setattr(m, flag, False)
    try:
        yield
    finally:
        for m, value in zip(owners, before):
            setattr(m, flag, value)


def minor_faults_per_call(fn, calls: int) -> float | None:
    """Minor page faults per call of ``fn`` in this process (None where getrusage is missing)."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def freeze_forward(model, x, emb):
    """``model(x, emb)`` traced, frozen and optimised for inference; returns it, the build time
    and the largest difference to eager over every output tensor (all outputs are kept, so no
    head is dropped as dead code)."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("emb", emb.clone())

        def forward(self, images):
            out = self.model(images, self.emb)
            tensors = [out.logits, out.responsibilities, out.cluster_text_similarity,
                       *(v for v in out.aux.values() if isinstance(v, torch.Tensor))]
            return tuple(t for t in tensors if t is not None)

    wrapped = Outputs().eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(wrapped, x, check_trace=False)))
        frozen(x)
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(frozen(x), wrapped(x)))
    return frozen, build_s, diff


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="add a torch.compile (inductor) variant")
    p.add_argument("--freeze", action="store_true",
                   help="add a TorchScript variant: trace, torch.jit.freeze (folds BatchNorm into the "
                        "convolutions), optimize_for_inference (oneDNN layouts, fused conv+activation)")
    p.add_argument("--towers", nargs="*", default=[], metavar="TIMM_NAME",
                   help="also time EM-CLIP with these timm image towers (random weights, timing only), "
                        "e.g. resnet18 resnet10t: dense-convolution towers beside the default's depthwise one")
    p.add_argument("--no-variants", action="store_true", help="skip the bf16 / batch-4 variants")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed calls of a model right before each timed one (default 1), so each is timed in "
                        "its own steady state, not just after another model's forward (0: the session-7 method)")
    args = p.parse_args()
    threads = common.setup_threads(args.threads)
    import torch

    try:  # older checkouts (benchmarked side by side) have no mirror pass
        from emclip.inference.runner import run_mirrored
    except ImportError:
        run_mirrored = None

    facts = common.machine_facts()
    common.warn_if_contended(facts)
    rounds = args.repeats or (3 if args.quick else 30)
    warmup = 1 if args.quick else args.warmup
    mm_sizes = (256,) if args.quick else (1024, 2048)
    peak_before = common.matmul_peak(mm_sizes, repeats=3 if args.quick else 9)

    model, source = common.timing_model(args.model)
    size = model.image_size
    prompts, modality = common.FUNDUS_PROMPTS, "fundus"
    models = {"emclip (cpu-default)": model, "unet-baseline": common.unet_model()}
    if not args.quick:
        models["vit-b-16 @256"] = common.vit_b16_model(size)
    for name in args.towers:
        models[f"emclip, {name} tower (random)"] = common.tower_variant_model(name)

    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    forwards = {}
    with torch.inference_mode():
        for name, m in models.items():
            if hasattr(m, "encode_prompts"):
                emb = m.encode_prompts(prompts, modality)
                forwards[name] = (lambda m=m, emb=emb: m(x, emb))
            else:
                forwards[name] = (lambda m=m: m(x))

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    timed = {name: inference(fn) for name, fn in forwards.items()}
    # Warm the process as the app does: its forwards always follow segment()'s pre-processing,
    # whose larger buffers settle glibc's adaptive malloc thresholds. A fresh process running
    # bare forwards can instead fault in ~3,000 new pages per forward (several ms of system
    # time) that no segment() call pays; the count is recorded below.
    import emclip

    emclip.segment(common.fundus_like(512), prompts, model=model, modality=modality, device="cpu",
                   **common.single_pass_kwargs())
    for fn in timed.values():  # first calls build per-model caches (the BatchNorm-folded tower)
        fn()
    flops = {}
    with switched_off("prepack_convolutions", *models.values()):
        for name, fn in timed.items():
            fn()  # builds the plain-convolution copy of the tower outside the counter
            flops[name], _ = count_flops(fn)
    probe, probe_flops = matmul_probe(256 if args.quick else 2048)
    res = common.interleaved({**timed, PROBE: probe}, rounds, warmup, baseline="emclip (cpu-default)",
                             settle=args.settle)
    peak_after = common.matmul_peak(mm_sizes, repeats=3 if args.quick else 9)
    peak = max(peak_before["peak_flop_per_s"], peak_after["peak_flop_per_s"])
    peak_cpu = max(peak_before["peak_flop_per_cpu_s"], peak_after["peak_flop_per_cpu_s"])
    peak_best = max(peak_before["peak_flop_per_s_best"], peak_after["peak_flop_per_s_best"])

    per_model = {}
    for name in timed:
        t = res["times"][name]["median"]
        per_model[name] = {
            "gflops": flops[name] / 1e9,
            "seconds": res["times"][name],
            "achieved_gflop_per_s": flops[name] / t / 1e9,
            "fraction_of_peak": flops[name] / t / peak,
            # best-of-N on both sides: the estimate that other jobs on a shared machine disturb least
            "fraction_of_peak_best": flops[name] / res["times"][name]["min"] / peak_best,
            # the same with process CPU seconds on both sides: robust when other jobs load the machine
            "fraction_of_peak_cpu": flops[name] / res["times"][name]["cpu"]["median"] / peak_cpu,
            # side by side: each forward over the matmul timed in the same round (median of rounds)
            "fraction_of_peak_paired": paired_fraction(res, name, flops[name], probe_flops),
        }

    # --- the default model in detail
    enc, dec = model.image_encoder, model.decoder
    with torch.inference_mode():
        emb = model.encode_prompts(prompts, modality)
        text = emb[None]
        mask = torch.ones(1, len(prompts), dtype=torch.bool)
        feats = enc(x)
    parts_fn = {
        "image_encoder": inference(lambda: enc(x)),
        "decoder": inference(lambda: dec(feats, text, mask)),
    }
    parts_res = common.interleaved({**parts_fn, PROBE: probe}, rounds, warmup, settle=args.settle)
    parts = {}
    for name, fn in parts_fn.items():
        with switched_off("prepack_convolutions", model):
            f, _ = count_flops(fn)
        t = parts_res["times"][name]["median"]
        parts[name] = {"gflops": f / 1e9, "median_s": t, "fraction_of_peak": f / t / peak,
                       "best_s": parts_res["times"][name]["min"],
                       "fraction_of_peak_best": f / parts_res["times"][name]["min"] / peak_best,
                       "cpu_median_s": parts_res["times"][name]["cpu"]["median"],
                       "fraction_of_peak_cpu": f / parts_res["times"][name]["cpu"]["median"] / peak_cpu,
                       "fraction_of_peak_paired": paired_fraction(parts_res, name, f, probe_flops)}
    together = parts_together(parts_res, list(parts_fn), sum(v["gflops"] for v in parts.values()) * 1e9,
                              probe_flops, peak)
    with switched_off("prepack_convolutions", model):
        total_flops, per_op_flops = count_flops(timed["emclip (cpu-default)"])
    with switched_off("fold_batchnorm", enc):  # the hooks sit on the model's own convolutions (same FLOPs as the folded copy)
        kinds = conv_flops_by_kind(model, timed["emclip (cpu-default)"])
    table, conv_ms = profile_table(timed["emclip (cpu-default)"], calls=3 if args.quick else 20)
    faults = minor_faults_per_call(timed["emclip (cpu-default)"], calls=3 if args.quick else 20)

    # --- variants of the default model, side by side
    variants_res = None
    compile_info = None
    freeze_info = None
    if not args.no_variants:
        variants = {"eager fp32": timed["emclip (cpu-default)"]}
        emb_d = emb

        def bf16():  # plain convolutions: autocast does not cover oneDNN's prepacked op
            with switched_off("prepack_convolutions", model), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, emb_d)

        variants["bf16 autocast"] = bf16

        def unfolded():  # what eager fp32 was before the BatchNorms were folded (emclip/nn/bn_folding.py)
            with switched_off("fold_batchnorm", enc), torch.inference_mode():
                return model(x, emb_d)

        variants["BatchNorms not folded"] = unfolded
        if hasattr(enc, "prepack_convolutions"):
            def not_prepacked():  # BatchNorms folded, convolutions as plain F.conv2d (session 6)
                with switched_off("prepack_convolutions", model), torch.inference_mode():
                    return model(x, emb_d)

            variants["convolutions not prepacked"] = not_prepacked
        x4 = x.expand(4, -1, -1, -1).contiguous()

        def batch4():
            with torch.inference_mode():
                return model(x4, emb_d)

        variants["batch 4 (per image)"] = batch4
        if run_mirrored is not None:
            def mirror_pair():  # what segment() runs for the bundled model: [x, flip(x)] in one batch
                with torch.inference_mode():
                    return run_mirrored(lambda images: model(images, emb_d), x, True)

            variants[MIRROR_PAIR] = mirror_pair
        if args.compile:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(x, emb_d)
            compile_info = {"first_call_s": time.perf_counter() - t0, "backend": "inductor"}

            def comp():
                with torch.inference_mode():
                    return compiled(x, emb_d)

            variants["torch.compile"] = comp
        if args.freeze:
            frozen, freeze_s, freeze_diff = freeze_forward(model, x, emb_d)
            freeze_info = {"build_s": freeze_s, "max_abs_diff_vs_eager": freeze_diff}

            def froz():
                with torch.inference_mode():
                    return frozen(x)

            variants["jit.freeze + optimize_for_inference"] = froz
        variants_res = common.interleaved({**variants, PROBE: probe}, rounds, warmup, baseline="eager fp32",
                                          settle=args.settle)
        per_image = {"batch 4 (per image)": 4.0, MIRROR_PAIR: 2.0}
        for name in variants:
            variants_res["times"][name]["fraction_of_peak_paired"] = paired_fraction(
                variants_res, name, total_flops, probe_flops, per_image.get(name, 1.0))
        for name, per_call in per_image.items():
            if name not in variants_res["times"]:
                continue
            b = variants_res["times"][name]
            for key in ("median", "q1", "q3", "iqr", "min", "max"):
                b[key] /= per_call
                b["cpu"][key] /= per_call
            variants_res["ratios"][name]["median"] /= per_call
        for name, s in variants_res["times"].items():
            if name == PROBE:
                continue
            s["fraction_of_peak"] = total_flops / s["median"] / peak
            s["fraction_of_peak_best"] = total_flops / s["min"] / peak_best
            s["fraction_of_peak_cpu"] = total_flops / s["cpu"]["median"] / peak_cpu

    ratio = per_model["emclip (cpu-default)"]["fraction_of_peak"]
    ratio_best = per_model["emclip (cpu-default)"]["fraction_of_peak_best"]
    ratio_paired = per_model["emclip (cpu-default)"]["fraction_of_peak_paired"]["median"]
    payload = {
        "machine": facts,
        "threads": threads,
        "quick": args.quick,
        "model_source": source,
        "input": [1, 3, size, size],
        "prompts": prompts,
        "matmul_peak": {"before": peak_before, "after": peak_after, "peak_flop_per_s": peak,
                        "peak_flop_per_s_best": peak_best,
                        "peak_flop_per_cpu_s": peak_cpu},
        "target_fraction": TARGET_RATIO,
        "models": per_model,
        "ratios": res["ratios"],
        "emclip_parts": parts,
        "emclip_parts_together": together,
        "emclip_flops_by_op": per_op_flops,
        "emclip_conv_flops": kinds,
        "emclip_conv_ms": conv_ms,
        "emclip_profile_top_ops": table,
        "emclip_variants": variants_res,
        # glibc's adaptive malloc thresholds depend on the process's history: some processes
        # fault in thousands of fresh pages per forward (a few ms of system time), others none
        "emclip_minor_faults_per_forward": faults,
        "settle": args.settle,
        "compile": compile_info,
        "freeze": freeze_info,
        "meets_target": ratio >= TARGET_RATIO,
        "meets_target_best_of_n": ratio_best >= TARGET_RATIO,
        "meets_target_paired": ratio_paired >= TARGET_RATIO,
        "probe_matmul_flops": probe_flops,
    }
    common.write_result("efficiency", payload, args.out)
    print(f"model: {source}; threads {threads}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (median), "
          f"{peak_best / 1e9:.1f} GFLOP/s (best call)")
    for name, r in per_model.items():
        print(f"{name:22s} {r['gflops']:.3f} GFLOP in {common.ms(r['seconds']['median'])} -> "
              f"{r['achieved_gflop_per_s']:.1f} GFLOP/s = {r['fraction_of_peak']:.2f} of peak "
              f"(best-of-N {r['fraction_of_peak_best']:.2f}, by CPU seconds {r['fraction_of_peak_cpu']:.2f}, "
              f"paired per round {r['fraction_of_peak_paired']['median']:.2f}; "
              f"{r['seconds']['minor_faults']['median']:.0f} page faults per timed call)")
    for name, r in parts.items():
        print(f"  {name:14s} {r['gflops']:.3f} GFLOP {common.ms(r['median_s'])} -> {r['fraction_of_peak']:.2f} of peak "
              f"(best {common.ms(r['best_s'])} -> {r['fraction_of_peak_best']:.2f}; "
              f"paired {r['fraction_of_peak_paired']['median']:.2f})")
    print(f"  parts together {common.ms(together['seconds']['median'])} -> {together['fraction_of_peak']:.2f} of peak "
          f"(paired {together['fraction_of_peak_paired']['median']:.2f})")
    print(f"  conv FLOPs: {({k: round(v / 1e9, 3) for k, v in kinds.items()})} GFLOP; "
          f"conv time: {({k: round(v, 1) for k, v in conv_ms.items()})} ms")
    if faults is not None:
        print(f"minor page faults per forward (this process): {faults:.0f}")
    print("top operators (self CPU ms per forward):")
    for row in table:
        print(f"  {row['op']:45s} {row['self_ms_per_forward']:7.2f} ms {100 * row['share']:5.1f}%  x{row['calls_per_forward']:.0f}")
    if variants_res:
        for name, s in variants_res["times"].items():
            if name == PROBE:
                continue
            print(f"variant {name:20s} {common.ms(s['median'])} ({s['fraction_of_peak']:.2f} of peak; "
                  f"best {common.ms(s['min'])} -> {s['fraction_of_peak_best']:.2f}; "
                  f"paired {s['fraction_of_peak_paired']['median']:.2f})")
    if compile_info:
        print(f"torch.compile first call (compilation): {compile_info['first_call_s']:.1f} s")
    if freeze_info:
        print(f"jit.freeze build: {freeze_info['build_s']:.1f} s; max |frozen - eager| "
              f"{freeze_info['max_abs_diff_vs_eager']:.2e}")
    print(f"target >= {TARGET_RATIO} of peak: {'met' if ratio >= TARGET_RATIO else 'MISSED'} ({ratio:.2f} by medians, "
          f"{ratio_best:.2f} best-of-N); paired per round with the matmul: "
          f"{'met' if ratio_paired >= TARGET_RATIO else 'MISSED'} ({ratio_paired:.2f})")


if __name__ == "__main__":
    main()
