#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_80 and sm_90 (nvcc -c, objects thrown away)
# with the flags of the real build; no GPU and no torch CUDA headers needed.
# The flags live in fastsam/_build.py (one description of the extension).
# Usage: csrc/nvcc_check.sh  [PYTHON=/path/to/python3] [CUDA_HOME=/usr/local/cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" fastsam/_build.py nvcc-check
