"""Print a Markdown summary of benchmarks/results/*.json (the tables of BENCHMARKS.md).

    python benchmarks/report.py [results_dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common


def load(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"<!-- skipped {path}: {exc} -->")
    return out


def ms(s: float | None) -> str:
    return "—" if s is None else f"{1000 * s:.0f} ms"


def iqr(stat: dict) -> str:
    text = f"{ms(stat['median'])} (IQR {ms(stat['iqr'])}, best {ms(stat['min'])})"
    if CONTENDED and "cpu" in stat:
        text += f", CPU {ms(stat['cpu']['median'])}"
    return text


CONTENDED = False


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def best_verdict(x: dict) -> str:
    """`` (best-of-N: met)`` when the median misses but the best call meets the target."""
    if x.get("meets_target") or "meets_target_best_of_n" not in x:
        return ""
    return f" (best-of-N: {verdict(x['meets_target_best_of_n'])})"


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else common.RESULTS_DIR
    r = load(folder)
    if not r:
        raise SystemExit(f"no results in {folder}; run benchmarks/run_all.sh first")
    global CONTENDED
    CONTENDED = any(v.get("machine", {}).get("training_running") for v in r.values())
    if CONTENDED:
        print("> Measured while `emclip train` jobs loaded the machine: wall times are inflated; "
              "CPU seconds (process, all threads) are shown too.\n")
    if "text_cache" in r and r["text_cache"].get("segment_first_vs_second"):
        pass
    rows = []
    if "latency" in r:
        x = r["latency"]
        s = x["segment"]["times"]["emclip (cpu-default)"]
        rows.append(("`emclip.segment`, 512x512 RGB, 2 prompts, warm, 2 threads (one pass; the mirrored pair where the model mirrors)",
                     iqr(s), "<= 300 ms", verdict(x["meets_target"]) + best_verdict(x)))
        p = x["segment"]["times"].get("emclip mirror=False")
        if p is not None:
            rows.append(("same, `mirror=False` (one plain pass)", iqr(p), "<= 300 ms", verdict(p["median"] <= 0.3)))
        d = x["segment"]["times"].get("emclip default (auto coarse-to-fine)")
        if d is not None:
            rows.append(("same, default call (fundus coarse-to-fine: locate + crop pass)", iqr(d), "<= 300 ms",
                         verdict(d["median"] <= 0.3) + ("" if d["median"] <= 0.3 else f" (best: {verdict(d['min'] <= 0.3)})")))
        c = x["cuda"]
        rows.append(("same on CUDA", c.get("skipped") or iqr(c["times"]["emclip (cpu-default)"]), "—", "—"))
    if "widget" in r:
        x = r["widget"]
        rows.append(("napari: press Run -> new Labels layers drawn", (f"{ms(x['press_to_new_layers_drawn_s'])} "
                     f"(best {ms(x.get('press_to_new_layers_drawn_best_s'))})"), "<= 300 ms", verdict(x["meets_target"]) + best_verdict(x)))
        rows.append(("napari: press Run -> layers updated in place, drawn", ms(x["press_to_updated_layers_drawn_s"]), "—", "—"))
        gap = x["press_to_layers"]["new"]["max_event_loop_gap_s"]["median"]
        rows.append(("napari: longest event-loop stall during a run (median)", ms(gap), "—", "—"))
    if "efficiency" in r:
        x = r["efficiency"]
        m = x["models"]["emclip (cpu-default)"]
        rows.append(("forward FLOP/s / measured fp32 matmul peak, batch 1", (f"{m['fraction_of_peak']:.2f} by medians "
                     f"({m['achieved_gflop_per_s']:.1f} of {x['matmul_peak']['peak_flop_per_s'] / 1e9:.0f} GFLOP/s); "
                     f"{m.get('fraction_of_peak_best', float('nan')):.2f} best-of-N"
                     + (f"; {m['fraction_of_peak_paired']['median']:.2f} paired per round"
                        if "fraction_of_peak_paired" in m else "")), ">= 0.5",
                     verdict(x["meets_target"]) + best_verdict(x)
                     + (f" (paired: {verdict(x['meets_target_paired'])})" if "meets_target_paired" in x else "")))
        v = (x.get("emclip_variants") or {}).get("times", {})
        if "batch 4 (per image)" in v:
            b = v["batch 4 (per image)"]
            rows.append(("same, batch of 4 (stacks, tiles)", (f"{b['fraction_of_peak']:.2f} by medians; "
                         f"{b.get('fraction_of_peak_best', float('nan')):.2f} best-of-N"), ">= 0.5",
                         verdict(b["fraction_of_peak"] >= 0.5) + ("" if b["fraction_of_peak"] >= 0.5 else
                         f" (best-of-N: {verdict(b.get('fraction_of_peak_best', 0) >= 0.5)})")))
        mp = next((k for k in v if k.startswith("mirror pair")), None)
        if mp is not None:
            b = v[mp]
            rows.append(("same, the mirrored pair segment() runs for the bundled model (batch 2)",
                         (f"{b['fraction_of_peak']:.2f} by medians; {b.get('fraction_of_peak_best', float('nan')):.2f} best-of-N"),
                         ">= 0.5", verdict(b["fraction_of_peak"] >= 0.5)))
    if "stack" in r:
        x = r["stack"]
        s = x["results"]["times"]["emclip batch 4 (default)"]
        rows.append(("`emclip.segment_stack`, 20 x 256x256, 3 prompts", (f"{s['median']:.2f} s (IQR {s['iqr']:.2f} s, best "
                     f"{s['min']:.2f} s)"), "<= 3 s", verdict(x["meets_target"]) + best_verdict(x)))
    if "tiled_memory" in r:
        x = r["tiled_memory"]
        seg_peak = x.get("peak_rss_segment_bytes")
        rows.append(("8192x8192 RGB, tiled: peak RSS (fresh process)",
                     (f"{seg_peak / 2**30:.2f} GiB through `segment`, " if seg_peak else "")
                     + f"{x['peak_rss_bytes'] / 2**30:.2f} GiB incl. `label_image()`", "<= 3 GB", verdict(x["meets_target"])))
        rows.append(("8192x8192 RGB, tiled: time", f"{x['segment_s']['median']:.1f} s (IQR {x['segment_s']['iqr']:.1f} s)", "—", "—"))
    if "text_cache" in r:
        x = r["text_cache"]
        a, b = x["segment_calls"][0], x["segment_calls"][1]
        fs = x.get("segment_first_vs_second")
        timing = (f"{ms(fs['times']['first call (cache empty)']['median'])} vs "
                  f"{ms(fs['times']['second call (cached)']['median'])} (medians of {fs['rounds']} interleaved rounds)"
                  if fs else f"{ms(a['seconds'])} vs {ms(b['seconds'])}")
        rows.append(("prompt cache: 1st vs 2nd `segment` call, same prompts",
                     (f"{timing}; text tower ran {a['tower_forward_calls']}x then {b['tower_forward_calls']}x; "
                     f"cache_info after 2nd: {b['cache_info']}"), "2nd skips text tower", verdict(x["meets_target"])))
    print("| Measurement | Result | Target | |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    if "latency" in r:
        x = r["latency"]
        print("\nSide by side (interleaved rounds, same process; ratio = median of per-round ratios to EM-CLIP):\n")
        print("| Model | `segment` 512x512 | ratio | network alone (256 px) | ratio | GFLOP | fraction of peak (median; best) |")
        print("|---|---|---|---|---|---|---|")
        eff = dict(r.get("efficiency", {}).get("models", {}))
        variants = (r.get("efficiency", {}).get("emclip_variants") or {}).get("times", {})
        pair = next((v for k, v in variants.items() if k.startswith("mirror pair")), None)
        if "emclip mirror=False" in x["segment"]["times"] and "emclip (cpu-default)" in eff:
            # the default EM-CLIP call runs the mirrored pair; its plain pass is the batch-1 forward
            plain = eff.pop("emclip (cpu-default)")
            eff["emclip mirror=False"] = plain
            if pair is not None:
                eff["emclip (cpu-default)"] = {"gflops": 2 * plain["gflops"], "fraction_of_peak": pair["fraction_of_peak"],
                                               "fraction_of_peak_best": pair.get("fraction_of_peak_best", float("nan"))}
        for name, s in x["segment"]["times"].items():
            n = x["network_only"]["times"].get(name)
            e = eff.get(name, {})
            net = (f"{ms(n['median'])} (best {ms(n['min'])}) | x{x['network_only']['ratios'][name]['median']:.2f}"
                   if n else "— | —")
            frac = (f"{e['fraction_of_peak']:.2f}; {e.get('fraction_of_peak_best', float('nan')):.2f}" if e else "—")
            print(f"| {name} | {iqr(s)} | x{x['segment']['ratios'][name]['median']:.2f} | {net} | "
                  f"{e.get('gflops', float('nan')):.2f} | {frac} |")
        st = x["stages_emclip"]
        print("\nStages of one EM-CLIP call: " + ", ".join(f"{k} {ms(v)}" for k, v in st.items())
              + f"; cold first call {ms(x['cold_first_call_s'])}.")
    if "efficiency" in r:
        x = r["efficiency"]
        print(f"\nMatmul peak (fp32, 2 threads): {x['matmul_peak']['peak_flop_per_s'] / 1e9:.0f} GFLOP/s by medians, "
              f"{x['matmul_peak'].get('peak_flop_per_s_best', 0) / 1e9:.0f} GFLOP/s best call.")
        print("\nEM-CLIP parts: " + "; ".join(
            f"{k} {v['gflops']:.2f} GFLOP in {ms(v['median_s'])} (best {ms(v.get('best_s'))}; "
            f"{v['fraction_of_peak']:.2f} / {v.get('fraction_of_peak_best', float('nan')):.2f} of peak)"
            for k, v in x["emclip_parts"].items()))
        towers = {k: v for k, v in x["models"].items() if k.endswith("tower (random)")}  # --towers
        if towers:
            print("\nOther image towers (random weights, timing only; one image, 256 px):\n")
            print("| Model | GFLOP | forward | fraction of peak (median; paired) |")
            print("|---|---|---|---|")
            for k, v in {"emclip (cpu-default)": x["models"]["emclip (cpu-default)"], **towers}.items():
                paired = v.get("fraction_of_peak_paired", {}).get("median", float("nan"))
                print(f"| {k} | {v['gflops']:.2f} | {ms(v['seconds']['median'])} | {v['fraction_of_peak']:.2f}; {paired:.2f} |")
        if "emclip_parts_together" in x:  # since session 9
            t = x["emclip_parts_together"]
            print(f"Parts timed alone, summed: {ms(t['seconds']['median'])}, "
                  f"{t['fraction_of_peak']:.2f} of peak (paired {t['fraction_of_peak_paired']['median']:.2f}).")
        cf, ct = x["emclip_conv_flops"], x["emclip_conv_ms"]
        print(f"Convolutions: dense {cf.get('dense', 0) / 1e9:.2f} GFLOP in {ct.get('dense', 0):.1f} ms, "
              f"depthwise {cf.get('depthwise', 0) / 1e9:.3f} GFLOP in {ct.get('depthwise', 0):.1f} ms "
              f"(profiled forward: {ct.get('all_ops', 0):.1f} ms of operator time).")
        print("\nTop operators of the EM-CLIP forward (torch.profiler, self CPU time per forward):\n")
        print("| Operator | ms / forward | share | calls / forward |")
        print("|---|---|---|---|")
        for row in x["emclip_profile_top_ops"]:
            print(f"| `{row['op']}` | {row['self_ms_per_forward']:.2f} | {100 * row['share']:.1f}% | {row['calls_per_forward']:.0f} |")
        if x.get("emclip_variants"):
            print("\nVariants of the EM-CLIP forward (interleaved):\n")
            print("| Variant | time per image (median; best) | ratio | fraction of peak (median; best; paired) |")
            print("|---|---|---|---|")
            for name, s in x["emclip_variants"]["times"].items():
                if "fraction_of_peak" not in s:  # the matmul timed in every round (the paired peak)
                    continue
                ratio = x["emclip_variants"]["ratios"][name]["median"]
                paired = s.get("fraction_of_peak_paired", {}).get("median", float("nan"))
                print(f"| {name} | {ms(s['median'])}; {ms(s['min'])} | x{ratio:.2f} | {s['fraction_of_peak']:.2f}; "
                      f"{s.get('fraction_of_peak_best', float('nan')):.2f}; {paired:.2f} |")
            if x.get("compile"):
                print(f"\ntorch.compile first call (compilation): {x['compile']['first_call_s']:.0f} s.")
    if "stack" in r:
        x = r["stack"]
        print("\nStack variants: " + "; ".join(
            f"{k} {v['median']:.2f} s" for k, v in x["results"]["times"].items()) + f"; cold first call {x['cold_first_call_s']:.2f} s.")
    if "widget" in r:
        x = r["widget"]
        print("\nWidget timeline (median): " + "; ".join(
            f"{mode}: " + ", ".join(f"{k} {ms(v['median'])}" for k, v in st.items() if v.get('n'))
            for mode, st in x["press_to_layers"].items())
              + f"; `emclip.segment` alone in the same process {ms(x['segment_alone_same_process']['median'])}.")
    m = next(iter(r.values())).get("machine", {})
    print(f"\nMachine: {m.get('nproc')} x {m.get('cpu')}, torch {m.get('torch')} ({m.get('cpu_capability')}), "
          f"{m.get('intra_op_threads')} intra-op / {m.get('inter_op_threads')} inter-op threads, CUDA: {m.get('cuda')}; "
          f"training running during measurement: {any(v.get('machine', {}).get('training_running') for v in r.values())}; "
          "1-min load average at the start of each script: "
          + ", ".join(f"{k} {v.get('machine', {}).get('loadavg_1min', float('nan')):.1f}" for k, v in r.items()) + ".")
    print("\nCommands: " + "; ".join(f"`{v.get('command')}`" for v in r.values()))


if __name__ == "__main__":
    main()
