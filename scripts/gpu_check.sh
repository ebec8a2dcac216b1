#!/usr/bin/env bash
# The one command a session with a GPU runs: under TOTAL_S (default 500 s, so the device call
# stays under 9 minutes), whatever fails along the way. See BENCHMARKS.md for the device call.
#   1. what the machine has (scripts/device_env.py): Python, JAX, devices, compute capability,
#      and each package present or absent; wheels carried in .whl/ are installed, offline, where
#      their modules are missing. A missing required package ends the check here, reported.
#   2. the selective-scan tests on the GPU (reference vs associative vs Pallas), if pytest and
#      torch are there;
#   3. every benchmark section in its own process under a hard limit (SIGINT: the section keeps
#      and writes what it measured); the scan 'auto' decision (Pallas probe) is in each log.
#      train_step times the Trainer's step of the configs/ training config: it needs optax and
#      ml_collections (the GPU image lacks the latter: carry its wheel, scripts/fetch_wheels.sh).
# Results: $OUT/<section>.json, $OUT/versions.txt and $OUT/check.log (every step's output; few
# files, since the device tool returns at most 8).
#   bash scripts/gpu_check.sh --lower   (or LOWER_ONLY=1): only the lowering checks, on any machine
#     (no GPU; about 2 minutes on 2 cores): the scan kernels and every variant's full-size train
#     step lowered for cuda (tests/e2e/test_cuda_lowering.py), the paper config's train and
#     evaluation steps through the CLIs (one summary line each, in $OUT/lowering.log). Run it
#     before borrowing a device: shapes, kernels, dtypes and shardings are then known good and
#     the device's minutes go to timing. On the device, step 2 re-runs the quick part (the
#     kernels' lowering, seconds) before anything is timed, and stops the check if it fails.
#   bash scripts/gpu_check.sh --smoke   (or SMOKE=1): tiny shapes, to try the whole script on a CPU.
# Knobs: OUT (default bench_results), PYTHON (default python3), TOTAL_S, LIMIT_SCALE (multiplies
#   every step's limit; 3 with --smoke), SECTIONS (comma list),
#   SCAN_BACKEND (model sections' scan backend, default auto), ATTN (xla|cudnn, every
#   attention of the model and of the attention baseline), TRAIN_CASES (batch:remat list for train_step),
#   SCAN_TESTS (pytest -k expression for step 2), BENCH_EXTRA (more benchmark.py arguments).
set -u
cd "$(dirname "$0")/.."
[ "${1:-}" = "--smoke" ] && SMOKE=1
[ "${1:-}" = "--lower" ] && LOWER_ONLY=1
SMOKE=${SMOKE:-0}
LOWER_ONLY=${LOWER_ONLY:-0}
LOWER_TESTS="lower or follows or portable"  # tests/unit/test_selective_scan.py: the kernels for cuda
[ "$SMOKE" = 1 ] && LOWER_TESTS="lower_to_triton and float32"  # one of them: the step runs
OUT=${OUT:-bench_results}
PYTHON=${PYTHON:-python3}
SCAN_BACKEND=${SCAN_BACKEND:-auto}
ATTN=${ATTN:-xla}
SECTIONS=${SECTIONS:-scan,mvfuser_vs_attention,train_step,sliding_window}
BENCH_EXTRA=${BENCH_EXTRA:-}
if [ "$SMOKE" = 1 ]; then
  # A CPU (often shared) is slower than the GPU these limits are sized for: triple them.
  LIMIT_SCALE=${LIMIT_SCALE:-3}
  TOTAL_S=${TOTAL_S:-900}
  TRAIN_CASES=${TRAIN_CASES:-2:1}
  SCAN_TESTS=${SCAN_TESTS:-auto_backend_and_unknown}  # one quick test: the step itself runs
  BENCH_EXTRA="--smoke $BENCH_EXTRA"
else
  LIMIT_SCALE=${LIMIT_SCALE:-1}
  TOTAL_S=${TOTAL_S:-500}
  TRAIN_CASES=${TRAIN_CASES:-2:0,8:1,8:0,4:0,4:1,2:1}
  SCAN_TESTS=${SCAN_TESTS:-not slow}
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Sequential host work only: keep XLA from reserving 75% of the GPU up front so that peak
# memory readings are meaningful (allocations still come from XLA's BFC allocator).
export XLA_PYTHON_CLIENT_PREALLOCATE=false

# limit CAP: the seconds a step may take, CAP at most, so that the whole check, the 15 s that
# `timeout` gives a step after its SIGINT included, ends within TOTAL_S (0: no time left).
limit() {
  local left=$((TOTAL_S - SECONDS - 20)) cap=$(($1 * LIMIT_SCALE))
  if [ "$left" -lt "$cap" ]; then echo $((left > 10 ? left : 0)); else echo "$cap"; fi
}

# 0. --lower: the lowering checks alone, on this machine's CPU (JAX_PLATFORMS=cpu: no device used)
if [ "$LOWER_ONLY" = 1 ]; then
  status=0
  run_lower() { echo "=== $*" | tee -a "$OUT/lowering.log"; JAX_PLATFORMS=cpu "$@" 2>&1 | tail -25 | tee -a "$OUT/lowering.log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1; }
  run_lower "$PYTHON" -m pytest -q -p no:cacheprovider tests/unit/test_selective_scan.py -k "$LOWER_TESTS"
  run_lower "$PYTHON" -m pytest -q -p no:cacheprovider tests/e2e/test_cuda_lowering.py
  run_lower "$PYTHON" scripts/train.py --config configs/gta2cs.py --compile_only --platform=cuda
  run_lower "$PYTHON" scripts/eval.py --config configs/gta2cs.py --lower_only --platform=cuda
  echo "=== lowering checks done in ${SECONDS}s (exit $status); log in $OUT/lowering.log"
  exit "$status"
fi

# 1. the machine: versions, devices, packages; carried wheels where modules are missing
SITE=/tmp/mfuser_site
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 5 "$(limit 60)" "$PYTHON" scripts/device_env.py --wheels .whl --target "$SITE" 2>&1 | tee "$OUT/versions.txt"
status=${PIPESTATUS[0]}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null | tee -a "$OUT/versions.txt"
if [ "$status" != 0 ]; then
  echo "=== stopped: the machine lacks what the check needs (see above; exit $status)"
  exit "$status"
fi
has() { grep -q "^$1 " "$OUT/versions.txt"; }

section() {  # name, hard limit (s), soft budget (s: no new case starts after it), extra args...
  local name=$1 cap budget=$(($3 * LIMIT_SCALE)); cap=$(limit "$2"); shift 3
  if [ "$cap" -le 0 ]; then echo "=== $name skipped: TOTAL_S=${TOTAL_S} spent"; return; fi
  [ "$budget" -gt $((cap - 20)) ] && budget=$((cap > 40 ? cap - 20 : cap / 2))
  echo "=== $name (limit ${cap}s)" | tee -a "$OUT/check.log"
  timeout -s INT -k 15 "$cap" "$PYTHON" scripts/benchmark.py --sections "$name" --budget-s "$budget" \
    --out "$OUT" --scan-backend "$SCAN_BACKEND" --attn "$ATTN" "$@" $BENCH_EXTRA 2>&1 | tee -a "$OUT/check.log"
}

# 2. scan correctness on the GPU: first the kernels' lowering for cuda (seconds; the full-size
# lowerings ran before the device call, with --lower): a failure there stops the check before
# any timing. Then the unit tests, where pytest and torch (the float64 reference) exist.
if has pytest && has torch; then
  cap=$(limit 40)
  echo "=== pytest tests/unit/test_selective_scan.py -k '$LOWER_TESTS' (limit ${cap}s)" | tee -a "$OUT/check.log"
  JAX_PLATFORMS=cpu timeout -k 10 "$cap" "$PYTHON" -m pytest -q -x -k "$LOWER_TESTS" \
    -p no:cacheprovider tests/unit/test_selective_scan.py 2>&1 | tail -25 | tee -a "$OUT/check.log"
  if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "=== stopped: the scan kernels do not lower for cuda (see above)" | tee -a "$OUT/check.log"
    exit 4
  fi
fi
if has pytest && has torch; then
  cap=$(limit 60)
  echo "=== pytest tests/unit/test_selective_scan.py -k '$SCAN_TESTS' (limit ${cap}s)" | tee -a "$OUT/check.log"
  timeout -k 10 "$cap" "$PYTHON" -m pytest -q -x -m "not slow" -k "$SCAN_TESTS" -p no:cacheprovider \
    tests/unit/test_selective_scan.py 2>&1 | tail -25 | tee -a "$OUT/check.log"
else
  echo "=== scan tests skipped: pytest or torch absent"
fi

# 3. the benchmark sections (the scan section also reports every backend's error vs lax.scan)
for name in ${SECTIONS//,/ }; do
  case $name in
    scan) section scan 60 40 --measure-s 1 ;;
    mvfuser_vs_attention) section mvfuser_vs_attention 70 50 --measure-s 1 ;;
    train_step)  # the Trainer's step of the configs/ training config: optax and ml_collections
      if has optax && has ml_collections; then
        section train_step 200 140 --measure-s 3 --train-cases "$TRAIN_CASES"
      else echo "=== train_step skipped: optax or ml_collections absent (carry .whl/: scripts/fetch_wheels.sh)" | tee -a "$OUT/check.log"; fi ;;
    sliding_window) section sliding_window 80 60 --measure-s 5 ;;
    *) echo "=== unknown section $name (choose from scan, mvfuser_vs_attention, train_step, sliding_window)" ;;
  esac
done
echo "=== done in ${SECONDS}s; JSON in $OUT"
ls -l "$OUT"
