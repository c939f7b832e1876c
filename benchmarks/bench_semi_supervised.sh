#!/usr/bin/env bash
# Semi-supervised vs supervised-only with 1 %, 5 % and 100 % of the ACDC training patients
# labelled (issue 8). Five training runs (each: train, then evaluate best/ on ACDC test + MS-CMR LGE),
# two at a time at most through /work/coord/heavy (one thread each) when it exists.
# Usage: benchmarks/bench_semi_supervised.sh [OUT_ROOT=/work/runs/semi] [DATA_ROOT=../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/work/runs/semi}
DATA=${2:-$(cd .. && pwd)/shared/data}
mkdir -p "$OUT"
source .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HEAVY=()
[ -x /work/coord/heavy ] && HEAVY=(/work/coord/heavy)
pids=()
for preset in cardiac_acdc_semi_1pct cardiac_acdc_semi_5pct cardiac_acdc_sup_100pct cardiac_acdc_sup_1pct cardiac_acdc_sup_5pct; do
  "${HEAVY[@]}" python benchmarks/bench_semi_supervised.py run "$preset" --out-root "$OUT" --data-root "$DATA" \
    > "$OUT/$preset.log" 2>&1 &
  pids+=($!)
  [ ${#HEAVY[@]} -eq 0 ] && [ $(( ${#pids[@]} % 2 )) -eq 0 ] && wait   # without the queue: two at a time
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
python benchmarks/bench_semi_supervised.py summary --out-root "$OUT"
exit $status
