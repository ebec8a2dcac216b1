#!/usr/bin/env bash
# The one command a session with a GPU runs (about 8 minutes in all; see BENCHMARKS.md):
#   versions and devices -> selective-scan tests on the GPU -> every benchmark section, each in
#   its own process under a hard time limit (SIGINT: the section keeps and writes what it measured).
# Results: $OUT/<section>.json, $OUT/versions.txt and $OUT/*.log. Environment knobs:
#   OUT (default bench_results), SCAN_BACKEND (model sections' scan backend, default auto),
#   TRAIN_CASES (batch:remat list for train_step), BENCH_EXTRA (more benchmark.py arguments).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results}
SCAN_BACKEND=${SCAN_BACKEND:-auto}
TRAIN_CASES=${TRAIN_CASES:-2:0,8:1,8:0,4:0,4:1,2:1}
BENCH_EXTRA=${BENCH_EXTRA:-}  # e.g. --smoke to try this script on a CPU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Sequential host work only: keep XLA from reserving 75% of the GPU up front so that peak
# memory readings are meaningful (allocations still come from XLA's BFC allocator).
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, jax, flax
print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__)
print("backend", jax.default_backend(), "devices", jax.devices())
for m in ("optax", "grain", "ml_collections", "tensorflow_datasets", "pytest"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "present"))
    except Exception as e:
        print(m, "absent:", type(e).__name__)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/versions.txt"

section() {  # name, hard limit (s), soft per-section budget (s), extra args...
  local name=$1 limit=$2 budget=$3; shift 3
  echo "=== $name (limit ${limit}s)"
  timeout -s INT -k 15 "$limit" python scripts/benchmark.py --sections "$name" --budget-s "$budget" \
    --out "$OUT" --scan-backend "$SCAN_BACKEND" "$@" $BENCH_EXTRA 2>&1 | tee "$OUT/$name.log"
}

# 1. scan correctness on the GPU: the unit tests (reference vs associative vs Pallas), if pytest is there
if python -c "import pytest" 2>/dev/null; then
  echo "=== pytest tests/test_selective_scan.py (limit 60s)"
  timeout -k 10 60 python -m pytest -q -x -m "not slow" -p no:cacheprovider tests/test_selective_scan.py 2>&1 \
    | tail -25 | tee "$OUT/test_selective_scan.log"
fi
# 2. the benchmark sections (the scan section also reports every backend's error vs lax.scan)
section scan 60 40 --measure-s 1
section mvfuser_vs_attention 70 50 --measure-s 1
section train_step 200 140 --measure-s 3 --train-cases "$TRAIN_CASES"
section sliding_window 80 60 --measure-s 5
echo "=== done; JSON in $OUT"
ls -l "$OUT"
