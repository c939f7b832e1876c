"""From pressing Run in the EM-CLIP widget to the Labels layers appearing (napari under Xvfb).

Run it with a virtual X display (do not set QT_QPA_PLATFORM=offscreen)::

    xvfb-run -a python benchmarks/bench_widget.py
    xvfb-run -a python benchmarks/bench_widget.py --quick
    xvfb-run -a python benchmarks/bench_widget.py --baseline /path/to/old/checkout

``--baseline DIR`` docks a second widget whose ``napari_emclip`` package is loaded from
``DIR/napari_emclip`` (e.g. an earlier version of the plugin) and alternates the two widgets
run by run in the same viewer and process, so a busy shared machine slows both alike; the
ratio is the median of the per-round ratios (both use the same ``emclip`` library).

A shown napari viewer holds a 512x512 RGB image; the widget is set to a checkpoint folder (the
trained default run's ``best/`` if present, else ``create_model('cpu-default', pretrained=True)``
saved to a temporary folder), the CPU, modality fundus and the prompts "optic disc, optic cup".
Each round clicks Run twice and measures on the Qt thread:

- *new layers*: the previous results were renamed and hidden, so the run adds new Labels
  layers: time to the first and the last Labels layer inserted into the viewer, to the first
  canvas draw after the last one, and to ``run_finished``;
- *update in place*: the same Run again, which rewrites the unedited result layers in place
  (undoable): time to ``run_finished`` and to the first canvas draw after it.

Each new-layers run is also split into phases from time stamps (``--profile`` adds a cProfile
of the Qt thread): press -> worker thread started (first stage report), model resolved,
``segment`` + layer data built on the worker, hand-over to the Qt thread (``result_received``),
first and last Labels layer inserted, first canvas draw after that.

(Old results are hidden and renamed rather than removed: removing a Labels layer from a shown
viewer segfaults inside Mesa's software OpenGL driver with napari 0.9.2 / vispy 0.17 here,
even without emclip.) A 10 ms QTimer records event-loop gaps during each run (the longest gap
= the worst freeze of the GUI). In the same process and rounds, ``emclip.segment`` alone is
timed for comparison.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import common

TARGET_S = 0.3


def baseline_widget_class(folder: Path) -> type:
    """``EMClipWidget`` of the ``napari_emclip`` package in ``folder``, imported as
    ``napari_emclip_baseline`` (its relative imports resolve inside that copy)."""
    import importlib
    import importlib.util
    import sys

    init = Path(folder) / "napari_emclip" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no napari_emclip package in {folder}")
    spec = importlib.util.spec_from_file_location(
        "napari_emclip_baseline", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["napari_emclip_baseline"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("napari_emclip_baseline._widget").EMClipWidget


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=None,
                   help="folder holding an older napari_emclip package to time side by side (interleaved)")
    p.add_argument("--combined", action="store_true",
                   help="tick 'one combined labels layer': one Labels layer per run instead of one per prompt")
    p.add_argument("--profile", action="store_true",
                   help="also run 3 extra 'new layers' rounds under cProfile (Qt thread) and report its top functions")
    args = p.parse_args()
    if not os.environ.get("DISPLAY"):
        raise SystemExit("no X display: run under `xvfb-run -a python benchmarks/bench_widget.py`")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import napari
    import numpy as np
    from napari.layers import Labels
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    QApplication.processEvents()
    # Mesa's libLLVM is loaded now: keep Triton's LLVM out of this process before torch imports
    from napari_emclip._worker import block_triton_if_llvm_loaded

    block_triton_if_llvm_loaded()
    threads = common.setup_threads(args.threads)
    import emclip

    facts = common.machine_facts()
    common.warn_if_contended(facts)
    rounds = args.repeats or (2 if args.quick else 15)
    warmup = 1 if args.quick else 2
    size = 128 if args.quick else 512
    image = common.fundus_like(size)
    prompts = common.FUNDUS_PROMPTS

    tmp = None
    if args.model or (common.TRAINED_CHECKPOINT / "config.json").is_file():
        folder = Path(args.model or common.TRAINED_CHECKPOINT)
        source = f"checkpoint {folder}"
    else:
        from emclip.factory import create_model

        tmp = tempfile.TemporaryDirectory(prefix="emclip-bench-")
        folder = Path(tmp.name) / "cpu-default"
        emclip.save_model(create_model("cpu-default", pretrained=True), folder)
        source = "create_model('cpu-default', pretrained=True) saved to a temporary checkpoint"
    model = emclip.load_model(str(folder), device="cpu")  # for the direct segment() timings
    # (the widget keeps its own instance, loaded during the warm-up runs)

    from napari_emclip._widget import EMClipWidget

    layer = viewer.add_image(image, name="fundus", rgb=True)
    classes = {"current": EMClipWidget}
    if args.baseline is not None:
        classes["baseline"] = baseline_widget_class(args.baseline)
    widgets = {}
    for name, cls in classes.items():
        w = cls(viewer)
        viewer.window.add_dock_widget(w, name=f"EM-CLIP {name}")
        w.set_model_source(str(folder))
        w.device_combo.setCurrentText("cpu")
        w.set_modality("fundus")
        w.set_prompts(", ".join(prompts))
        w.set_image_layer(layer)
        w.combined_check.setChecked(args.combined)
        widgets[name] = w
    QApplication.processEvents()

    marks: dict[str, list[float]] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, []).append(time.perf_counter())

    def on_inserted(event) -> None:
        if isinstance(event.value, Labels):
            mark("labels_inserted")

    viewer.layers.events.inserted.connect(on_inserted)
    from qtpy.QtCore import Qt

    # worker-thread time stamps of the run's stages (direct connection: no Qt-thread delay)
    for w in widgets.values():
        w._relay.stage.connect(lambda text: mark("stage:" + text), type=Qt.ConnectionType.DirectConnection)
        w.result_received.connect(lambda n: mark("result_received"))
    try:
        scene = viewer.window._qt_viewer.canvas._scene_canvas  # private: the vispy canvas
        scene.events.draw.connect(lambda event: mark("draw"))
        have_draw = True
    except AttributeError:
        have_draw = False

    ticks: list[float] = []
    ticker = QTimer()
    ticker.setInterval(10)
    ticker.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def one_run(mode: str, variant: str = "current") -> dict:
        """One click on Run; ``mode`` "new" (old results hidden and renamed first) or "update"."""
        widget = widgets[variant]
        if mode == "new":
            for w in widgets.values():
                for written in list(w.last_layers):
                    if written in viewer.layers:
                        written.visible = False
                        written.name = f"{written.name} (old {uuid.uuid4().hex[:6]})"
        settle(0.5)  # a user's pause: the previous run's pop-up notification has faded in
        marks.clear()
        ticks.clear()
        loop = QEventLoop()
        status: list[str] = []
        widget.run_finished.connect(loop.quit)
        widget.run_finished.connect(status.append)
        guard = QTimer()
        guard.setSingleShot(True)
        guard.timeout.connect(loop.quit)
        guard.start(120_000)
        ticker.start()
        t0 = time.perf_counter()
        widget.run_button.click()  # what pressing Run does
        loop.exec()
        t_end = time.perf_counter()
        inserted = marks.get("labels_inserted", [])
        shown_after = max(inserted) if inserted else t_end
        # let the canvas draw the result if it has not yet
        deadline = time.perf_counter() + 2.0
        while have_draw and time.perf_counter() < deadline and not any(
            d > shown_after for d in marks.get("draw", [])
        ):
            QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 10)
        ticker.stop()
        guard.stop()
        widget.run_finished.disconnect(loop.quit)
        widget.run_finished.disconnect(status.append)
        if status != ["done"]:
            raise SystemExit(f"run did not finish: {status} ({widget.last_message})")
        if mode == "new" and not inserted:
            raise SystemExit("no Labels layer was inserted")
        draws = [d for d in marks.get("draw", []) if d > shown_after]
        gaps = np.diff([t0] + [t for t in ticks if t > t0] + [t_end])

        def at(name: str) -> float | None:
            return min(marks[name]) - t0 if marks.get(name) else None

        phases = {
            "thread_started_s": at("stage:reading the image"),
            "model_resolved_s": at("stage:segmenting"),
            "layer_data_built_s": None,
            "result_on_qt_thread_s": at("result_received"),
        }
        worker_s = widget.last_outcome.seconds if widget.last_outcome else None
        if phases["thread_started_s"] is not None and worker_s is not None:
            phases["layer_data_built_s"] = phases["thread_started_s"] + worker_s
        return {
            **phases,
            "mode": mode,
            "first_labels_s": (min(inserted) - t0) if inserted else None,
            "last_labels_s": (max(inserted) - t0) if inserted else None,
            "drawn_s": (min(draws) - t0) if draws else None,
            "run_finished_s": t_end - t0,
            "worker_s": widget.last_outcome.seconds if widget.last_outcome else None,
            "n_labels_inserted": len(inserted),
            "max_event_loop_gap_s": float(gaps.max()),
            "p95_event_loop_gap_s": float(np.percentile(gaps, 95)),
        }

    def settle(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 10)

    def direct() -> float:
        t0 = time.perf_counter()
        emclip.segment(image, prompts, model=model, modality="fundus", device="cpu")
        return time.perf_counter() - t0

    for _ in range(warmup):
        for variant in widgets:
            one_run("new", variant)
            one_run("update", variant)
        direct()
    by_variant: dict[str, dict[str, list[dict]]] = {v: {"new": [], "update": []} for v in widgets}
    seg = []
    for _ in range(rounds):
        for variant in widgets:
            by_variant[variant]["new"].append(one_run("new", variant))
            by_variant[variant]["update"].append(one_run("update", variant))
        seg.append(direct())
    runs = by_variant["current"]

    qt_profile = None
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        for _ in range(3):
            prof.enable()
            one_run("new")
            prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        qt_profile = buf.getvalue()
        print(qt_profile)

    keys = ("thread_started_s", "model_resolved_s", "layer_data_built_s", "result_on_qt_thread_s",
            "first_labels_s", "last_labels_s", "drawn_s", "run_finished_s", "worker_s",
            "max_event_loop_gap_s", "p95_event_loop_gap_s")
    stats = {
        mode: {k: common.summary([r[k] for r in rs if r[k] is not None]) for k in keys}
        for mode, rs in runs.items()
    }
    seg_stats = common.summary(seg)
    side_by_side = None
    if "baseline" in widgets:
        side_by_side = {}
        for mode, key in (("new", "drawn_s"), ("new", "last_labels_s"), ("update", "drawn_s"),
                          ("new", "worker_s")):
            pairs = [(c[key], b[key]) for c, b in zip(by_variant["current"][mode], by_variant["baseline"][mode])
                     if c[key] is not None and b[key] is not None]
            side_by_side[f"{mode} {key}"] = {
                "current": common.summary([c for c, _ in pairs]),
                "baseline": common.summary([b for _, b in pairs]),
                "ratio_median_of_rounds": float(np.median([c / b for c, b in pairs])) if pairs else None,
            }
    new = stats["new"]
    appear = new["drawn_s"]["median"] if new["drawn_s"]["n"] else new["last_labels_s"]["median"]
    upd = stats["update"]
    updated = upd["drawn_s"]["median"] if upd["drawn_s"]["n"] else upd["run_finished_s"]["median"]
    payload = {
        "machine": facts,
        "threads": threads,
        "quick": args.quick,
        "model_source": source,
        "napari": napari.__version__,
        "qt_platform": QApplication.platformName(),
        "image": list(image.shape),
        "prompts": prompts,
        "combined_layer": args.combined,
        "target_s": TARGET_S,
        "press_to_layers": stats,
        "press_to_new_layers_drawn_s": appear,
        "press_to_updated_layers_drawn_s": updated,
        "segment_alone_same_process": seg_stats,
        "widget_overhead_s": appear - seg_stats["median"],
        "runs": runs,
        "baseline_folder": str(args.baseline) if args.baseline else None,
        "baseline_runs": by_variant.get("baseline"),
        "side_by_side": side_by_side,
        "qt_thread_profile_3_runs": qt_profile,
        "meets_target": appear <= TARGET_S,
        "press_to_new_layers_drawn_best_s": new["drawn_s"].get("min", new["last_labels_s"]["min"]),
        "meets_target_best_of_n": new["drawn_s"].get("min", new["last_labels_s"]["min"]) <= TARGET_S,
    }
    common.write_result("widget", payload, args.out)
    print(f"model: {source}; napari {napari.__version__} on Qt platform {QApplication.platformName()}; threads {threads}")
    for mode, st in stats.items():
        for k in keys:
            if st[k]["n"]:
                print(f"{mode:6s} {k:22s} median {common.ms(st[k]['median'])} (IQR {common.ms(st[k]['iqr'])}, "
                      f"best {common.ms(st[k]['min'])})")
    print(f"emclip.segment alone (same process) median {common.ms(seg_stats['median'])}")
    for name, entry in (side_by_side or {}).items():
        print(f"side by side {name:22s} current {common.ms(entry['current']['median'])} vs baseline "
              f"{common.ms(entry['baseline']['median'])}: ratio {entry['ratio_median_of_rounds']:.2f}")
    print(f"press Run -> new Labels layers drawn: {common.ms(appear)}; -> updated layers drawn: {common.ms(updated)}")
    print(f"target <= {TARGET_S} s: {'met' if appear <= TARGET_S else 'MISSED'} ({common.ms(appear)})")
    viewer.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
