#!/usr/bin/env bash
# On the GPU machine: llama.cpp's llama-bench built for CUDA (sm_90) from the sources
# llama-cpp-python vendors (see docs/benchmarks.md for how the tarball is made), the peer of
# every GPU figure. The scripts run it in the background while ours runs (about 5 minutes on
# 16 cores; a second run in the same folder only checks the build).
#   bash scripts/build-llama-bench.sh LLAMA_SRC_TAR_XZ DIR   -> DIR/llama.cpp/build/bin/llama-bench
set -euo pipefail
src=${1:?llama-src.tar.xz}
dir=${2:?build folder}
mkdir -p "$dir"
cd "$dir"
[ -d llama.cpp ] || tar xJf "$src"
cd llama.cpp
# the tarball leaves out app/, which the top-level CMakeLists.txt adds
[ -d app ] || { mkdir app && : > app/CMakeLists.txt; }
cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release
cmake --build build --target llama-bench -j 16
