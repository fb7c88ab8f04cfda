#!/usr/bin/env bash
# One CUDA check of the kernels and the trainer step, written up as bench/results/<date>-<device>.md
#
#   bench/gpu_check.sh                 # on a CUDA machine (refuses without one)
#   bench/gpu_check.sh --cpu-dry-run   # anywhere: same stages on CPU, report in the run folder
#
# Stages (each under `timeout`; the sum of the limits is 450 s, the whole run stays under 8 min):
#   1-gpu-tests     TRITON_INTERPRET=0 pytest -m gpu: the tests marked `gpu` (real CUDA, real
#                   block sizes, fp32 and bf16); the other kernel tests build CPU tensors and
#                   expect the interpreter, so they cannot run compiled, see stage 2
#   2-interp-tests  TRITON_INTERPRET=1 (as CI): the kernel, model and loss tests, run on the CPU
#                   in parallel with stage 1 (they need no GPU, only the same checkout)
#   3-step-bench    bench/test_step.py: whole training step, ours vs dense vs floor
#   4-encode-bench, 5-decode-bench, 6-ops-bench, 7-molt-bench: the kernel benchmarks
# then bench/gpu_check.py writes one markdown report from the junit XML, logs and benchmark JSON.
# Nothing here imports pydantic, transformer-lens, wandb or datasets: test files and benchmarks
# that do (config, data, train, bench/test_data_bench.py) are not run.
# On the device machine ($OUT set) the report, benchmark JSON and logs are copied to $OUT.
# Environment: PY (python to use), GPU_CHECK_RUN (run folder), CLT_BENCH_TF32=1 (TF32 matmuls),
# GPU_CHECK_COMMIT (commit for the report where the checkout copy has no .git).
set -u
cd "$(dirname "$0")/.." || exit 2

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac

if [ -z "${PY:-}" ]; then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
if ! "$PY" -c "import pytest, pytest_benchmark, torch, triton" 2>/dev/null; then
  echo "gpu_check: $PY lacks one of pytest, pytest-benchmark, torch, triton" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "$DRY" = 0 ]; then
    echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c \
      'import torch; print(torch.__version__)')); this script checks the GPU kernels and" \
      "only means something on one. To test the script itself: $0 --cpu-dry-run" >&2
    exit 2
  fi
fi

RUN=${GPU_CHECK_RUN:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$RUN"
if [ "$DRY" = 1 ]; then echo "cpu dry run (timings meaningless)" > "$RUN/mode"; fi
PYTEST=("$PY" -m pytest -p no:cacheprovider -q)
echo "gpu_check: run folder $RUN"

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$RUN/$name.log" 2>&1
  echo $? > "$RUN/$name.rc"
  echo $((SECONDS - t0)) > "$RUN/$name.seconds"
  echo "== $name: rc $(cat "$RUN/$name.rc") in $(cat "$RUN/$name.seconds")s:" \
    "$(grep -E 'passed|failed|error|skipped|no tests ran' "$RUN/$name.log" | tail -n 1)"
}

KERNEL_TESTS=(tests/ops tests/test_molt.py)

stage 2-interp-tests 110 env TRITON_INTERPRET=1 "${PYTEST[@]}" -m "not gpu and not slow" \
  "${KERNEL_TESTS[@]}" tests/test_compile_check.py tests/test_model.py tests/test_losses.py \
  --junitxml="$RUN/2-interp-tests.xml" &
INTERP=$!
stage 1-gpu-tests 110 env TRITON_INTERPRET=0 "${PYTEST[@]}" -m gpu "${KERNEL_TESTS[@]}" \
  --junitxml="$RUN/1-gpu-tests.xml"
wait "$INTERP"

BENCH=(env TRITON_INTERPRET=0 "${PYTEST[@]}" --benchmark-columns=min,median,max,rounds)
stage 3-step-bench 140 "${BENCH[@]}" bench/test_step.py \
  --benchmark-json="$RUN/3-step-bench.json" --junitxml="$RUN/3-step-bench.xml"
stage 4-encode-bench 80 "${BENCH[@]}" bench/test_encode_bench.py \
  --benchmark-json="$RUN/4-encode-bench.json" --junitxml="$RUN/4-encode-bench.xml"
stage 5-decode-bench 70 "${BENCH[@]}" bench/test_decode_bench.py \
  --benchmark-json="$RUN/5-decode-bench.json" --junitxml="$RUN/5-decode-bench.xml"
stage 6-ops-bench 40 "${BENCH[@]}" bench/test_ops_bench.py \
  --benchmark-json="$RUN/6-ops-bench.json" --junitxml="$RUN/6-ops-bench.xml"
stage 7-molt-bench 30 "${BENCH[@]}" bench/test_molt_bench.py \
  --benchmark-json="$RUN/7-molt-bench.json" --junitxml="$RUN/7-molt-bench.xml"

DEVICE=$("$PY" -c "import platform, torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu-dry-run')")
NAME="$(date -u +%Y-%m-%d)-$("$PY" bench/gpu_check.py slug "$DEVICE").md"
if [ "$DRY" = 1 ]; then MD="$RUN/$NAME"; else MD="bench/results/$NAME"; fi
"$PY" bench/gpu_check.py report "$RUN" "$MD" > /dev/null
REPORT_RC=$?
echo "gpu_check: report $MD (rc $REPORT_RC)"
cat "$MD" 2>/dev/null

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$MD" "$OUT/" 2>/dev/null
  cp "$RUN"/*.json "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$RUN" . 2>/dev/null
fi

# fail when a stage failed or timed out (rc 5 "no tests collected" counts as a failure too)
FAILED=0
for rc in "$RUN"/*.rc; do [ "$(cat "$rc")" = 0 ] || FAILED=1; done
exit $(( FAILED || REPORT_RC ))
