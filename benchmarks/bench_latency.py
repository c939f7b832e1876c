"""Latency of ``emclip.segment`` on a 512x512 RGB image with 2 prompts, warm, on 2 CPU threads.

The prompts are "optic disc, optic cup" with modality fundus. For those, ``segment`` by default
runs the fundus coarse-to-fine path (a locating pass, then, for a whole photograph, a second
pass on a crop around the disc: :mod:`emclip.fundus`); the model comparison uses one plain pass
(``coarse_to_fine=False``) and the default call is timed as its own variant. The bundled model
mirrors by default (``segment(mirror=None)``: the image and its left-right mirror in one batch of
two, see :mod:`emclip.inference.runner`); its plain pass (``mirror=False``) is timed beside it.

Side by side in one run (interleaved rounds): the default EM-CLIP (cpu-default), the same-budget
U-Net baseline and the CLIP ViT-B/16 configuration at the same 256 px input (random weights).
Also: the network alone (``predict_logits`` on a prepared tensor), a stage breakdown of the
default model's call (preprocessing / network / back to the image grid + thresholding), the cold
first call, and the same on CUDA when a GPU is present (skipped otherwise, and said so).

    python benchmarks/bench_latency.py            # full run, ~2 min
    python benchmarks/bench_latency.py --quick    # smoke test
"""

from __future__ import annotations

import inspect
import time

import common

TARGET_S = 0.3


def prepared_input(model, image):
    """The network input ``emclip.segment`` builds for ``image`` (letterboxed, standardised)."""
    import torch
    from emclip.preprocess import intensity_range, letterbox, to_float_rgb

    window = intensity_range(image)
    boxed, geo = letterbox(to_float_rgb(image, intensity_range=window), model.image_size)
    x = torch.from_numpy(boxed[None]).permute(0, 3, 1, 2)
    mean = torch.tensor(model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.pixel_std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(), geo


def network_forward(model, x, prompts, modality, mirror=None):
    """The network call ``segment`` makes on the prepared input ``x``: the mirrored pair when
    ``mirror`` (None: the model's default; an older checkout without the mirror pass: one pass)."""
    import torch

    try:
        from emclip.inference.runner import model_mirrors, run_mirrored
    except ImportError:
        model_mirrors = None

    def call(images):
        return model.predict_logits(images, prompts, modality=modality)

    with torch.inference_mode():
        if model_mirrors is not None and model_mirrors(model, mirror):
            return run_mirrored(call, x, True)
        return call(x)


def stage_breakdown(model, image, prompts, modality, repeats, warmup):
    """Median seconds of the stages of one segment() call, each timed on its own."""
    import numpy as np
    import torch
    from emclip.preprocess import intensity_range, letterbox, to_float_rgb, unletterbox

    x, geo = prepared_input(model, image)

    def pre():
        window = intensity_range(image)
        letterbox(to_float_rgb(image, intensity_range=window), model.image_size)

    def net():
        return network_forward(model, x, prompts, modality)

    with torch.inference_mode():
        out = net()

    def post():
        with torch.inference_mode():
            probs = torch.sigmoid(unletterbox(out.logits[0].float(), geo)).numpy()
        masks = probs > 0.5
        for i in range(len(prompts)):
            np.count_nonzero(masks[i])
            probs[i][masks[i]].mean() if masks[i].any() else 0.0

    return {
        name: common.timeit(fn, repeats, warmup)["median"]
        for name, fn in (("preprocess", pre), ("network", net), ("postprocess", post))
    }


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    threads = common.setup_threads(args.threads)
    import emclip
    import torch

    facts = common.machine_facts()
    common.warn_if_contended(facts)
    size = 128 if args.quick else 512
    rounds = args.repeats or (3 if args.quick else 30)
    warmup = 1 if args.quick else args.warmup
    image = common.fundus_like(size)
    prompts, modality = common.FUNDUS_PROMPTS, "fundus"

    t0 = time.perf_counter()
    emclip_model, source = common.timing_model(args.model)
    load_s = time.perf_counter() - t0
    models = {"emclip (cpu-default)": emclip_model, "unet-baseline": common.unet_model()}
    if not args.quick:
        models["vit-b-16 @256"] = common.vit_b16_model(emclip_model.image_size)

    single = common.single_pass_kwargs()
    # cold: first call of a fresh process on this model (text tower runs, caches fill)
    t0 = time.perf_counter()
    emclip.segment(image, prompts, model=emclip_model, modality=modality, device="cpu", **single)
    cold_s = time.perf_counter() - t0

    # One letterboxed pass per call for every model (the network comparison); where segment()
    # has the fundus coarse-to-fine path (locate the disc, then segment a crop), it is switched
    # off here and measured separately below as the default EM-CLIP call.
    seg = {
        name: (lambda m=m: emclip.segment(image, prompts, model=m, modality=modality, device="cpu", **single))
        for name, m in models.items()
    }
    # segment() mirrors by default for models trained with flips (the bundled one): the row
    # above is that default; this one is the plain pass of the same model
    has_mirror = "mirror" in inspect.signature(emclip.segment).parameters
    if has_mirror:
        seg["emclip mirror=False"] = lambda: emclip.segment(image, prompts, model=emclip_model, modality=modality,
                                                            device="cpu", mirror=False, **single)
    default_info = None
    if single:
        try:
            res = emclip.segment(image, prompts, model=emclip_model, modality=modality, device="cpu")
            default_info = res.info.get("coarse_to_fine")
            seg["emclip default (auto coarse-to-fine)"] = lambda: emclip.segment(
                image, prompts, model=emclip_model, modality=modality, device="cpu")
        except Exception as exc:  # noqa: BLE001 - a failing default path must not stop the benchmark
            default_info = {"failed": f"{type(exc).__name__}: {exc}"}
            print(f"default (coarse-to-fine) call failed, not timed: {default_info['failed']}")
    seg_res = common.interleaved(seg, rounds, warmup, baseline="emclip (cpu-default)")

    nets = {}  # as segment() runs each network (the mirrored pair for models that mirror by default)
    for name, m in models.items():
        x, _ = prepared_input(m, image)
        nets[name] = lambda m=m, x=x: network_forward(m, x, prompts, modality)
    if has_mirror:
        x, _ = prepared_input(emclip_model, image)
        nets["emclip mirror=False"] = lambda x=x: network_forward(emclip_model, x, prompts, modality, mirror=False)
    net_res = common.interleaved(nets, rounds, warmup, baseline="emclip (cpu-default)")
    stages = stage_breakdown(emclip_model, image, prompts, modality, max(3, rounds // 2), warmup)

    cuda: dict = {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gpu_models = {name: m.to(dev) for name, m in models.items()}
        gseg = {
            name: (lambda m=m: emclip.segment(image, prompts, model=m, modality=modality, device="cuda"))
            for name, m in gpu_models.items()
        }
        cuda = {"device": torch.cuda.get_device_name(0), **common.interleaved(gseg, rounds, warmup, "emclip (cpu-default)", dev)}
        for m in gpu_models.values():
            m.to("cpu")

    med = seg_res["times"]["emclip (cpu-default)"]["median"]
    payload = {
        "machine": facts,
        "threads": threads,
        "quick": args.quick,
        "model_source": source,
        "model_load_s": load_s,
        "image": {"shape": list(image.shape), "dtype": str(image.dtype)},
        "prompts": prompts,
        "modality": modality,
        "target_s": TARGET_S,
        "cold_first_call_s": cold_s,
        "segment": seg_res,
        "single_pass_kwargs": single,
        "default_call_coarse_to_fine_info": default_info,
        "network_only": net_res,
        "stages_emclip": stages,
        "cuda": cuda,
        "meets_target": med <= TARGET_S,
        "meets_target_best_of_n": seg_res["times"]["emclip (cpu-default)"]["min"] <= TARGET_S,
        "default_call_meets_target": (seg_res["times"].get("emclip default (auto coarse-to-fine)", {}).get("median", med)
                                      <= TARGET_S),
    }
    common.write_result("latency", payload, args.out)
    print(f"model: {source}; threads {threads}; image {image.shape}; prompts {prompts}")
    print(f"cold first call: {common.ms(cold_s)}")
    for name, s in seg_res["times"].items():
        r = seg_res["ratios"][name]["median"]
        n = net_res["times"].get(name, {"median": float("nan"), "min": float("nan")})
        print(f"segment  {name:22s} median {common.ms(s['median'])} (IQR {common.ms(s['iqr'])}, best {common.ms(s['min'])}), "
              f"x{r:.2f} of emclip; network alone {common.ms(n['median'])} (best {common.ms(n['min'])})")
    print("stages (emclip): " + ", ".join(f"{k} {common.ms(v)}" for k, v in stages.items()))
    print(f"target <= {TARGET_S} s: {'met' if med <= TARGET_S else 'MISSED'} ({common.ms(med)})")
    print("cuda:", cuda.get("skipped") or {k: v["median"] for k, v in cuda["times"].items()})


if __name__ == "__main__":
    main()
