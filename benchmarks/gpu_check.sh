#!/usr/bin/env bash
# The GPU check: one prepared script for whichever session draws a GPU.
#   benchmarks/gpu_check.sh OUTDIR             # on the GPU machine (< 8 minutes on one H200)
#   benchmarks/gpu_check.sh --dry-run OUTDIR   # every step on the CPU (Triton interpreter, tiny sizes):
#                                              # CI runs this, so the script itself is tested
# Installs nothing from the network (uses the machine's torch/triton and the
# repository itself via PYTHONPATH), runs the GPU test subset, builds the CUDA
# extension (JIT), runs the benchmarks and writes JSON + markdown into OUTDIR,
# printing the summary tables last.  Exit status 0 only if every step passed.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"  # one log: the device tool brings back few files
: > "$LOG"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  # the CPU twin is built once per environment (CI's test run builds it into its TORCH_EXTENSIONS_DIR)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastsam_ext}" MAX_JOBS="${MAX_JOBS:-16}"
  unset TRITON_INTERPRET
  DEV=cuda
fi
status=0
# The whole script stays under the device tool's 600 s per command: each step's cap is cut to what
# is left of BUDGET_S (a step with under 15 s left is not started and counts as failed).
BUDGET_S=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 1200 || echo 560)}
step() {  # step NAME TIMEOUT CMD...: run, append to the log, show its tail, remember failures
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "=== $name not started: ${left}s of the ${BUDGET_S}s budget left" | tee -a "$LOG"
    echo "=== $name rc=budget" | tee -a "$LOG"; status=1; return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name ($(date +%T), cap ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" > "$OUT/.step.log" 2>&1
  local rc=$?
  cat "$OUT/.step.log" >> "$LOG"; tail -n 25 "$OUT/.step.log"; rm -f "$OUT/.step.log"
  echo "=== $name rc=$rc" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}

python - <<'PY' > "$OUT/machine.txt"
import torch, platform
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run)"
print(f"gpu={gpu} torch={torch.__version__} triton={tv} python={platform.python_version()}")
PY

# Step caps add up to 480 s; each is a cap, not an estimate.
# 1. build the CUDA extension (JIT, cached in TORCH_EXTENSIONS_DIR); the cuda backend joins the tests
#    and benchmarks below only if this succeeds.  Dry run: the CPU twin instead.
step build_extension 150 python -c "
import torch
from fastsam.backends import cpp, cuda
dev = torch.device('$DEV')
ok, why = (cuda if dev.type == 'cuda' else cpp).is_available(dev)
print('compiled backend available on', dev, ':', ok, why)
raise SystemExit(0 if ok else 1)"

# 2. every op of every backend on the device against float64 references (the contract suite), the
#    restore contract end to end (mixed copies on cuda and triton, CPU+GPU parameters), launch counts
#    (<= 6 per SAM step, every torch op counted), capture of a whole training step with a scheduler
#    across the late-phase switch, triton internals, torch.compile, >2^31 elements, the SAM family
#    on CUDA vs float64 on the CPU, with no host synchronisation in their steps
if [ "$DRY" = 1 ]; then
  step tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_triton_launches.py \
    tests/test_restore_contract.py tests/test_capturable.py -k "not 300"
else
  # the contract suite filtered to its CUDA cases (the -k applies to every file of one pytest call)
  step tests 150 python -m pytest -q -x -p no:cacheprovider tests/test_backend_ops.py -k "cuda"
  step tests_gpu 180 python -m pytest -q -p no:cacheprovider tests/test_restore_contract.py \
    tests/test_capturable.py tests/test_triton_launches.py tests/test_triton_internals.py tests/test_triton_gpu.py \
    tests/test_csrc_cuda.py tests/test_variants_gpu.py
fi

# 3. host cost of a SAM step vs torch's fused SGD step (161 and 1,000 tensors)
if [ "$DRY" = 1 ]; then
  step host_cost 60 python benchmarks/host_cost.py --device cpu --sizes 20 --repeats 2 --block 2 \
    --backends foreach --out-dir "$OUT" --tag dryrun
else
  step host_cost 60 python benchmarks/host_cost.py --device cuda --out-dir "$OUT"
fi

# 4. optimizer-side benchmark, every backend vs the reference (ResNet-18 / ResNet-50 parameter sets)
if [ "$DRY" = 1 ]; then
  step optimizer_step 90 python benchmarks/optimizer_step.py --device cpu --param-sets resnet18_cifar \
    --repeats 2 --warmup 1 --out-dir "$OUT" --tag dryrun
else
  step optimizer_step 60 python benchmarks/optimizer_step.py --device cuda --repeats 50 --out-dir "$OUT"
fi

# 5. training throughput (the README's main job), CIFAR models at batch 128, fp32, with the SAM
#    family's rows (issue 11's cost targets: interval, LookSAM, MomentumSAM, GSAM, FriendlySAM)
if [ "$DRY" = 1 ]; then
  step train_throughput 120 python benchmarks/train_throughput.py --device cpu --quick --family --out-dir "$OUT"
else
  step train_throughput 150 python benchmarks/train_throughput.py --device cuda --models resnet18,wrn16_8 \
    --family --steps 30 --warmup 5 --out-dir "$OUT"
fi

echo
cat "$OUT/machine.txt" >> "$LOG"
echo "=== summary ($(cat "$OUT/machine.txt"))"
rm -f "$OUT/machine.txt"
cat "$OUT"/host_cost_*.md "$OUT"/train_throughput_*.md "$OUT"/optimizer_step_*.md 2>/dev/null
exit $status
