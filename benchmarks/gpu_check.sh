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
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastsam_ext}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET
status=0
step() {  # step NAME TIMEOUT CMD...: run, log to OUTDIR/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc"
  [ "$rc" = 0 ] || status=1
}

python - <<'PY' | tee "$OUT/machine.txt"
import torch, platform
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(f"gpu={torch.cuda.get_device_name(0)} torch={torch.__version__} triton={tv} python={platform.python_version()}")
PY

# 1. build the CUDA extension (JIT, cached in TORCH_EXTENSIONS_DIR)
step build_cuda 240 python -c "
import torch
from fastsam.backends import cuda
ok, why = cuda.is_available(torch.device('cuda'))
print('cuda backend available:', ok, why)
raise SystemExit(0 if ok else 1)"

# 2. GPU tests: everything marked gpu, plus the op-level and FusedSAM parity suites on CUDA
step tests_gpu 180 python -m pytest tests -q -x -m gpu -p no:cacheprovider

# 3. optimizer-side benchmark, every backend vs the reference (ResNet-18 / ResNet-50 parameter sets)
step optimizer_step 90 python benchmarks/optimizer_step.py --device cuda --repeats 50 --out-dir "$OUT"

# 4. training throughput (the README's main job) at full size
if [ -f benchmarks/train_throughput.py ]; then
  step train_throughput 150 python benchmarks/train_throughput.py --device cuda --out-dir "$OUT"
fi

echo
echo "=== summary ($(cat "$OUT/machine.txt"))"
cat "$OUT"/train_throughput_*.md 2>/dev/null
cat "$OUT"/optimizer_step_*.md 2>/dev/null
exit $status
