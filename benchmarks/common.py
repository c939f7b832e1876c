"""Shared helpers of the benchmarks: threads, the model under test, timing, matmul peak, JSON.

Every benchmark script is runnable on its own (``python benchmarks/bench_*.py``) and writes
``benchmarks/results/<name>.json``. Timings are medians over repeats with the inter-quartile
range (wall clock; ``cpu`` holds the process CPU seconds of the same calls, all threads, which
stay meaningful when other jobs load the machine); when several variants are compared they run *interleaved* in one process (A B C A B C
...), and the ratio is the median of the per-round ratios, so slow phases of a noisy shared
machine hit every variant alike. ``--quick`` shrinks sizes and repeats for smoke tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = Path(os.environ.get("EMCLIP_BENCH_RESULTS", BENCH_DIR / "results"))
TRAINED_CHECKPOINT = Path(os.environ.get("EMCLIP_BENCH_CHECKPOINT", "/work/runs/default/best"))
"""Checkpoint timed when it exists (weights do not change the speed, but it is the real model)."""

DEFAULT_THREADS = 2
FUNDUS_PROMPTS = ["optic disc", "optic cup"]
CARDIAC_PROMPTS = ["left ventricle", "myocardium", "right ventricle"]


# ----------------------------------------------------------------------------- arguments


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: per benchmark)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per variant (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke test, numbers meaningless")
    p.add_argument("--model", default=None, help=f"checkpoint folder to time (default: {TRAINED_CHECKPOINT} if it "
                   "exists, else create_model('cpu-default', pretrained=True))")
    p.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/<name>.json)")
    return p


# ----------------------------------------------------------------------------- threads


def setup_threads(threads: int = DEFAULT_THREADS) -> dict[str, int]:
    """Pin torch to ``threads`` intra-op threads and 1 inter-op thread; returns what is set.

    Call before any torch work (the inter-op pool can only be sized once).
    """
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already used: keep what it is
        pass
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}


# ----------------------------------------------------------------------------- machine


def training_running() -> bool:
    """Whether an ``emclip train`` job runs on this machine (it makes timings meaningless).

    Matches processes whose argument list has an ``emclip`` executable followed by ``train``
    (not any command line that merely contains the text, such as a shell loop watching for it).
    """
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a, b in itertools.pairwise(argv):
            if (a == b"emclip" or a.endswith(b"/emclip")) and b == b"train":
                return True
    return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """nproc, CPU, torch/oneDNN versions, threads, CUDA, load and whether training runs."""
    import torch

    facts: dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onednn": getattr(torch.backends.mkldnn, "is_available", lambda: False)(),
        "mkl": torch.backends.mkl.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "training_running": training_running(),
    }
    return facts


# ----------------------------------------------------------------------------- models


def timing_model(source: str | None = None, name: str = "cpu-default"):
    """The model to time, in eval mode on the CPU, and a description of where it came from.

    ``source`` (a checkpoint folder) wins; else the trained default run's ``best/`` if present;
    else ``create_model(name, pretrained=True)``.
    """
    import emclip
    from emclip.factory import create_model

    path = Path(source) if source else TRAINED_CHECKPOINT
    if path.is_dir() and (path / "config.json").is_file():
        return emclip.load_model(str(path), device="cpu", cache=False).eval(), f"checkpoint {path}"
    if source:
        raise SystemExit(f"--model {source}: not a checkpoint folder")
    return create_model(name, pretrained=True).eval(), f"create_model({name!r}, pretrained=True)"


def _seeded_model(name: str, overrides: dict[str, Any], pretrained: bool):
    """``create_model`` of the bundled config ``name`` with ``overrides``, its random weights drawn
    from seed 0 without touching the caller's random state (timing only)."""
    import torch
    from emclip.config import load_config
    from emclip.factory import create_model

    cfg = load_config(name, overrides=overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(cfg, pretrained=pretrained).eval()


def vit_b16_model(image_size: int = 256):
    """The CLIP ViT-B/16 configuration at ``image_size`` with random weights (timing only)."""
    return _seeded_model("vit-b-16", {"image_size": image_size}, pretrained=False)


def tower_variant_model(timm_name: str):
    """The default EM-CLIP with another timm image tower, random weights (timing only; the text
    tower is seeded as in the default, which needs no network)."""
    return _seeded_model("cpu-default", {"image_encoder.vision_cfg.timm_model_name": timm_name,
                                         "image_encoder.pretrained": None, "image_encoder.frozen_stages": 0},
                         pretrained=True)


def unet_model():
    """The same-budget U-Net baseline (seeded image tower)."""
    from emclip.factory import create_model

    return create_model("unet-baseline", pretrained=True).eval()


def single_pass_kwargs() -> dict[str, Any]:
    """``{"coarse_to_fine": False}`` when ``emclip.segment`` has the fundus coarse-to-fine path
    (so a call is one plain or tiled pass), else ``{}``."""
    import inspect

    import emclip

    return {"coarse_to_fine": False} if "coarse_to_fine" in inspect.signature(emclip.segment).parameters else {}


# ----------------------------------------------------------------------------- images


def fundus_like(size: int = 512, seed: int = 0):
    """A synthetic uint8 RGB ``(size, size, 3)`` fundus-like image (content does not change speed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    r = np.hypot(yy - 0.5, xx - 0.5)
    base = np.clip(1.0 - 1.6 * r, 0, 1)
    disc = np.exp(-(((yy - 0.45) ** 2 + (xx - 0.6) ** 2) / 0.004))
    img = np.stack([0.8 * base + 0.2 * disc, 0.4 * base + 0.5 * disc, 0.15 * base + 0.3 * disc], -1)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- timing


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min, max and the raw samples (seconds)."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        return {"n": 0}
    if len(xs) >= 2:
        q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = med = q3 = xs[0]
    return {
        "n": len(xs),
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": xs[0],
        "max": xs[-1],
        "samples": [round(s, 6) for s in samples],
    }


def sync(device: Any = None) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 3, device: Any = None) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times, then time ``repeats`` calls; :func:`summary` of wall seconds,
    with ``cpu``: the summary of the process CPU seconds (all threads) of the same calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {**summary(times), "cpu": summary(cpu)}


def interleaved(
    variants: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 3,
    baseline: str | None = None,
    device: Any = None,
    settle: int = 0,
) -> dict[str, Any]:
    """Time ``variants`` side by side: each round calls every variant once (order rotated).

    ``settle`` (default 0): untimed calls of a variant right before each of its timed calls, so
    it is timed in its own steady state rather than just after another variant. It matters when
    the variants differ in memory: after a ViT-B/16 forward glibc has returned the freed memory
    to the OS, and the next EM-CLIP forward faults ~3,000 pages back in (+15 %), which no run of
    the app pays (BENCHMARKS.md, issue 6). Minor page faults of the timed calls are recorded
    (``minor_faults``).

    Returns ``{"times": {name: summary}, "ratios": {name: summary of time / baseline time per
    round}}`` (ratios when ``baseline`` names one of the variants).
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            for _ in range(settle):
                variants[name]()
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out: dict[str, Any] = {
        "times": {n: {**summary(t), "cpu": summary(cpu[n]), "minor_faults": summary(faults[n])}
                  for n, t in times.items()},
        "rounds": rounds,
        "settle": settle,
    }
    if baseline is not None:
        base = times[baseline]
        out["baseline"] = baseline
        out["ratios"] = {n: summary([a / b for a, b in zip(t, base)]) for n, t in times.items()}
    return out


# ----------------------------------------------------------------------------- matmul peak


def matmul_peak(sizes: Sequence[int] = (1024, 2048), repeats: int = 7, dtype: str = "float32") -> dict[str, Any]:
    """Measured dense matmul FLOP/s (``2 n^3`` per ``n x n`` product) on the current threads.

    The best size's median is the peak (``peak_flop_per_s``); ``peak_flop_per_s_best`` uses the
    fastest call instead (the estimate to pair with best-of-N model times on a shared machine). Uses ``torch.mm(..., out=)`` so nothing is allocated.
    """
    import torch

    dt = getattr(torch, dtype)
    per_size = {}
    best = best_cpu = best_of_best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dt)
        b = torch.randn(n, n, dtype=dt)
        c = torch.empty(n, n, dtype=dt)
        s = timeit(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), repeats=repeats, warmup=2)
        flops = 2.0 * n**3
        rate = flops / s["median"]
        best_rate = flops / s["min"]
        per_cpu = flops / max(s["cpu"]["median"], 1e-9)
        per_size[str(n)] = {"seconds": s, "flops": flops, "flop_per_s": rate, "flop_per_s_best": best_rate,
                            "flop_per_cpu_s": per_cpu}
        best = max(best, rate)
        best_of_best = max(best_of_best, best_rate)
        best_cpu = max(best_cpu, per_cpu)
    return {"dtype": dtype, "peak_flop_per_s": best, "peak_flop_per_s_best": best_of_best,
            "peak_flop_per_cpu_s": best_cpu, "per_size": per_size}


# ----------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes; Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- results


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` (+ machine facts) as JSON, atomically, and return the path."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), **payload}
    data.setdefault("machine", machine_facts())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=_jsonable)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}")
    return path


def _jsonable(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def ms(seconds: float) -> str:
    return f"{1000.0 * seconds:.1f} ms"


def warn_if_contended(facts: dict[str, Any]) -> None:
    if facts.get("training_running"):
        print("WARNING: an `emclip train` job is running: these timings are contended", file=sys.stderr)
