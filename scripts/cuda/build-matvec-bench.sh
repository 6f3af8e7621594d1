#!/usr/bin/env bash
# Builds scripts/cuda/matvec_bench.cu (sm_90, cudart linked in) into .gpu/mb/matvec-bench with
# the nvcc that scripts/build-cuda.sh installs; run it there with `.gpu/mb/matvec-bench`.
set -euo pipefail
tools=${GPU_TOOLS:-$HOME/.cache/gpu-tools}
cu=$(echo "$tools"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "run scripts/build-cuda.sh once first (it installs nvcc)" >&2; exit 1; }
mkdir -p .gpu/mb
PATH="$cu/bin:$PATH" nvcc -O3 -std=c++17 -arch=sm_90 -Xptxas -v \
    -o .gpu/mb/matvec-bench scripts/cuda/matvec_bench.cu -L"$cu/lib" -lcudart_static "$@"
