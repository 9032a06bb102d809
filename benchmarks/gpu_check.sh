#!/usr/bin/env bash
# The GPU check: one prepared script for whichever session draws a GPU.
#   benchmarks/gpu_check.sh OUTDIR
# Installs nothing from the network (uses the machine's torch/triton and the
# repository itself via PYTHONPATH), runs the GPU test subset, builds the CUDA
# extension (JIT), runs the benchmarks and writes JSON + markdown into OUTDIR,
# printing the summary table last. Budget: < 8 minutes on one H200.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"  # one log: the device tool brings back at most 8 files
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastsam_ext}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET
status=0
step() {  # step NAME TIMEOUT CMD...: run, append to the log, show its tail, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
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
print(f"gpu={torch.cuda.get_device_name(0)} torch={torch.__version__} triton={tv} python={platform.python_version()}")
PY

# Step time limits add up to 470 s; each is a cap, not an estimate.
# 1. build the CUDA extension (JIT, cached in TORCH_EXTENSIONS_DIR); the cuda
#    backend joins the tests and benchmarks below only if this succeeds
step build_cuda 150 python -c "
import torch
from fastsam.backends import cuda
ok, why = cuda.is_available(torch.device('cuda'))
print('cuda backend available:', ok, why)
raise SystemExit(0 if ok else 1)"

# 2. the triton kernels on the GPU against foreach and float64 references,
#    launch counts, CUDA-graph capture, torch.compile, >2^31 elements
step tests_triton 90 python -m pytest -q -x -p no:cacheprovider \
  tests/test_triton_ops.py tests/test_triton_launches.py tests/test_triton_gpu.py

# 3. optimizer-side benchmark, every backend vs the reference (ResNet-18 / ResNet-50 parameter sets)
step optimizer_step 60 python benchmarks/optimizer_step.py --device cuda --repeats 50 --out-dir "$OUT"

# 4. training throughput (the README's main job), CIFAR models at batch 128, fp32
step train_throughput 120 python benchmarks/train_throughput.py --device cuda --models resnet18,wrn16_8 \
  --steps 30 --warmup 5 --out-dir "$OUT"

# 5. the compiled CUDA kernels against foreach, triton and the CPU twin
step tests_cuda 50 python -m pytest -q -x -p no:cacheprovider tests/test_csrc_cuda.py

echo
cat "$OUT/machine.txt" >> "$LOG"
echo "=== summary ($(cat "$OUT/machine.txt"))"
rm -f "$OUT/machine.txt"
cat "$OUT"/train_throughput_*.md 2>/dev/null
cat "$OUT"/optimizer_step_*.md 2>/dev/null
exit $status
