#!/usr/bin/env bash
# The GPU check: one prepared script for whichever session draws a GPU.
#   benchmarks/gpu_check.sh OUTDIR             # on the GPU machine: at most BUDGET_S (460 s) of steps
#   benchmarks/gpu_check.sh --dry-run OUTDIR   # every step on the CPU (Triton interpreter, tiny sizes),
#                                              # no time caps: CI runs this, so the script itself is tested
# Installs nothing from the network: the machine's torch/triton and this repository (PYTHONPATH).
# Writes OUTDIR/gpu_check.log (every step's whole output), the benchmarks' JSON + markdown, and
# OUTDIR/summary.md: one row per step, passed / failed (with its first error line) / not run.
# Exit status 0 only if every step passed.
#
# Environment: PYTHON (interpreter, default python3), GPU_CHECK_BUDGET_S (the GPU run's budget),
# GPU_CHECK_STEPS (space-separated names: run only these; the others are reported as not run).
#
# A step is one statement: `step NAME CAP_S "GPU command" "dry-run command"`, run in order; the
# most informative steps come first, and each test step has its own cap, so that one timing out
# leaves the others' reports.  Its cap is a wall-clock limit on the GPU only (timeout), cut to
# what is left of the budget; a step with under 15 s left is not started.  The extension build
# runs in the background from the start (`start_step`/`finish_step`), alongside the triton
# contract cases, which do not need it; if it fails, every later step runs with FASTSAM_NO_JIT=1,
# so that no test collection or benchmark tries the build again.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"  # one log: the device tool brings back few files
SUMMARY="$OUT/summary.md"
: > "$LOG"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PYTEST="$PY -m pytest -v -p no:cacheprovider"
if [ "$DRY" = 1 ]; then
  # the CPU twin is built once per environment (CI's test run builds it into its TORCH_EXTENSIONS_DIR)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastsam_ext}" MAX_JOBS="${MAX_JOBS:-16}"
  # the CPU cases of the test files: no build of their own (the extension is built by build_extension)
  export FASTSAM_CPU_BACKENDS=foreach,cpp
  unset TRITON_INTERPRET
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
SELECTED=${GPU_CHECK_STEPS:-}
status=0
printf '| step | status | seconds | first error line |\n|---|---|---|---|\n' > "$SUMMARY"

first_error() {  # the most telling line of a failed step's output
  local f=$1 line
  for pat in '^(FAILED|ERROR) ' '^E +[^ ]' ' (FAILED|ERROR)( |$)' '(Error|error:|Traceback|No such file)'; do
    line=$(grep -m1 -E "$pat" "$f" 2>/dev/null) && { echo "${line:0:200}" | tr '|' '/'; return; }
  done
  tail -n 1 "$f" 2>/dev/null | cut -c1-200 | tr '|' '/'
}

record() {  # record NAME STATUS SECONDS DETAIL: a summary row, a log line
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  local when=""
  [ "$3" = - ] || when=" after ${3}s"
  echo "=== $1: $2$when $4" | tee -a "$LOG"
  [ "$2" = passed ] || status=1
}

# cap_for NAME CAP: CAP cut to the budget in $CAP (0: no cap, the dry run: a loaded CI machine is
# slow, not wrong), or a "not run" row and status 1
cap_for() {
  local name=$1 left=$((BUDGET_S - SECONDS))
  CAP=$2
  if [ -n "$SELECTED" ] && [[ " $SELECTED " != *" $name "* ]]; then
    record "$name" "not run" - "not selected (GPU_CHECK_STEPS)"; return 1
  fi
  if [ "$DRY" = 1 ]; then CAP=0; return 0; fi
  if [ "$left" -lt 15 ]; then record "$name" "not run" - "budget: ${left}s of ${BUDGET_S}s left"; return 1; fi
  [ "$CAP" -le "$left" ] || CAP=$left
}

_cap_text() { if [ "$1" = 0 ]; then echo none; else echo "${1}s"; fi; }

declare -A BG_PID BG_T0 BG_CAP
start_step() {  # start_step NAME CAP GPU_CMD DRY_CMD: run in the background
  local name=$1 cmd=$3
  cap_for "$name" "$2" || return 0
  local cap=$CAP
  [ "$DRY" = 1 ] && cmd=$4
  echo "=== $name started in the background ($(date +%T), cap $(_cap_text "$cap"))" | tee -a "$LOG"
  timeout "$cap" bash -c "$cmd" > "$OUT/.$name.log" 2>&1 &
  BG_PID[$name]=$! BG_T0[$name]=$SECONDS BG_CAP[$name]=$cap
}

finish_step() {  # finish_step NAME: wait for a background step and record it
  local name=$1
  [ -n "${BG_PID[$name]:-}" ] || return 1
  wait "${BG_PID[$name]}"
  _finish "$name" $? "${BG_T0[$name]}" "${BG_CAP[$name]}"
}

_finish() {
  local name=$1 rc=$2 t0=$3 cap=$4 f="$OUT/.$1.log" detail=""
  { echo "--- $name output"; cat "$f"; } >> "$LOG"
  tail -n 15 "$f"
  if [ "$rc" = 0 ]; then
    record "$name" passed $((SECONDS - t0)) ""
  else
    [ "$rc" = 124 ] && detail="timeout after ${cap}s; "
    record "$name" failed $((SECONDS - t0)) "${detail}rc=$rc: $(first_error "$f")"
  fi
  rm -f "$f"
  [ "$rc" = 0 ]
}

step() {  # step NAME CAP GPU_CMD DRY_CMD
  local name=$1 cmd=$3
  cap_for "$name" "$2" || return 0
  local cap=$CAP
  [ "$DRY" = 1 ] && cmd=$4
  echo "=== $name ($(date +%T), cap $(_cap_text "$cap"))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$cap" bash -c "$cmd" > "$OUT/.$name.log" 2>&1
  _finish "$name" $? "$t0" "$cap"
}

$PY - <<'PY' > "$OUT/machine.txt" 2>&1
import platform

import torch

try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run)"
print(f"gpu={gpu} torch={torch.__version__} triton={tv} python={platform.python_version()}")
PY

# The CUDA extension (JIT, cached in TORCH_EXTENSIONS_DIR; dry run: the CPU twin), built in the
# background while the triton cases run.
start_step build_extension 160 \
  "$PY -c \"import torch; from fastsam.backends import cuda; ok, why = cuda.is_available(torch.device('cuda')); print('cuda backend:', ok, why); raise SystemExit(0 if ok else 1)\"" \
  "$PY -c \"import torch; from fastsam.backends import cpp; ok, why = cpp.is_available(torch.device('cpu')); print('cpp backend:', ok, why); raise SystemExit(0 if ok else 1)\""

# Every op of the triton backend on the device against float64 references (the contract suite);
# FASTSAM_NO_JIT: this step must not start a second build of the extension.
step contract_triton 110 \
  "FASTSAM_NO_JIT=1 $PYTEST tests/test_backend_ops.py -k 'triton-cuda'" \
  "FASTSAM_NO_JIT=1 FASTSAM_CPU_BACKENDS=foreach,triton $PYTEST tests/test_backend_ops.py -k 'triton and (axpby_rounds or restore_sgd_step) and dtype1'"

if ! finish_step build_extension && [ -n "${BG_PID[build_extension]:-}" ]; then
  export FASTSAM_NO_JIT=1
  echo "=== later steps run with FASTSAM_NO_JIT=1 (no second build)" | tee -a "$LOG"
fi

# The same suite on the cuda backend (dry run: the CPU twin, whose conftest would build it).
step contract_cuda 25 \
  "$PYTEST tests/test_backend_ops.py -k 'cuda-cuda'" \
  "$PYTEST tests/test_backend_ops.py -k 'cpp and axpby_rounds'"

# The restore contract end to end, launch counts (<= 6 per SAM step, every torch op counted),
# capture of whole training steps (a scheduler across the late-phase switch; a step over thousands
# of tensors), triton internals (a bucket of mixed alignment), >2^31 elements, no host
# synchronisation in a steady step.  The dry run takes the cheap cases: the CPU suite runs the rest
# under the interpreter already, and the dry run only has to show that the step runs.
step tests_triton 55 \
  "$PYTEST tests/test_restore_contract.py tests/test_capturable.py tests/test_triton_launches.py tests/test_triton_internals.py tests/test_triton_gpu.py -k 'not inductor'" \
  "$PYTEST tests/test_triton_launches.py tests/test_restore_contract.py tests/test_capturable.py -k 'not 300 and not independent_of_the_tensor_count and not fixed_number'"

# The cuda kernels against foreach, the CPU twin and triton: chunk and launch boundaries,
# misaligned views, skips, capture, >2^31 elements.
step tests_cuda 25 "$PYTEST tests/test_csrc_cuda.py" "$PYTEST tests/test_csrc_cuda.py"

# The SAM family on every CUDA backend against float64 on the CPU, and without host synchronisation.
step tests_variants 25 "$PYTEST tests/test_variants_gpu.py" "$PYTEST tests/test_variants_gpu.py"

# Host cost of a SAM step vs torch's fused SGD step (161 and 1,000 tensors).
step host_cost 20 \
  "$PY benchmarks/host_cost.py --device cuda --out-dir '$OUT'" \
  "$PY benchmarks/host_cost.py --device cpu --sizes 20 --repeats 2 --block 2 --backends foreach --out-dir '$OUT' --tag dryrun"

# Training throughput (the README's main job), CIFAR models at batch 128, fp32, with the SAM
# family's rows (interval, LookSAM, MomentumSAM, GSAM, FriendlySAM).
step train_throughput 40 \
  "$PY benchmarks/train_throughput.py --device cuda --models resnet18,wrn16_8 --family --steps 30 --warmup 5 --out-dir '$OUT'" \
  "$PY benchmarks/train_throughput.py --device cpu --quick --family --out-dir '$OUT'"

# Optimizer side of a SAM step against what a user would write instead: the SAM step in foreach ops
# under torch.compile and plain torch's best (fused SGD), checked equal to FusedSAM before timing;
# every backend, the triton step captured in a CUDA graph, torch's fused SGD step and a copy as the
# attainable bytes/s; ResNet-18 and ResNet-50 shapes, fp32 and bf16.  The compile (a cold inductor
# cache: four graphs) is part of the cap, not of the timings.
step optimizer_step 75 \
  "$PY benchmarks/optimizer_step.py --device cuda --peers --param-sets resnet18_cifar resnet50 --dtypes fp32 bf16 --repeats 20 --out-dir '$OUT'" \
  "$PY benchmarks/optimizer_step.py --device cpu --param-sets tiny --peers --dtypes bf16 --repeats 2 --warmup 1 --out-dir '$OUT' --tag dryrun"

# torch.compile (inductor) of the ops and of a training step: a cold inductor cache compiles for a
# while, so these run last, in a step of their own.
step inductor 20 \
  "$PYTEST tests/test_triton_gpu.py -k inductor" \
  "$PYTEST tests/test_triton_gpu.py -k inductor"

echo
cat "$OUT/machine.txt" >> "$LOG"
cat "$OUT"/host_cost_*.md "$OUT"/train_throughput_*.md "$OUT"/optimizer_step_*.md 2>/dev/null
echo "=== summary ($(cat "$OUT/machine.txt"); ${SECONDS}s)"
cat "$SUMMARY" | tee -a "$LOG"
rm -f "$OUT/machine.txt"
exit $status
