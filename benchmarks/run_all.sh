#!/usr/bin/env bash
# Run every performance benchmark with one command; results go to benchmarks/results/*.json and
# a Markdown summary is printed (python benchmarks/report.py). Extra arguments are passed to
# every script, e.g. `benchmarks/run_all.sh --quick` for a smoke test (numbers meaningless).
# The napari benchmark runs under `xvfb-run -a` unless a display is already set.
# Takes ~15 minutes on the 2-core reference machine; run it when nothing else is running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

COMPILE=(--compile)
for a in "$@"; do [[ "$a" == "--quick" ]] && COMPILE=(); done

run() { echo; echo "=== $*"; "$@"; }

run "$PY" benchmarks/bench_latency.py "$@"
run "$PY" benchmarks/bench_efficiency.py "${COMPILE[@]}" "$@"
run "$PY" benchmarks/bench_stack.py "$@"
run "$PY" benchmarks/bench_tiled_memory.py "$@"
run "$PY" benchmarks/bench_text_cache.py "$@"
if [[ -n "${DISPLAY:-}" ]]; then
    run "$PY" benchmarks/bench_widget.py --profile "$@"
else
    run xvfb-run -a "$PY" benchmarks/bench_widget.py --profile "$@"
fi
run "$PY" benchmarks/report.py
