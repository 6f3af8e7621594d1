#!/usr/bin/env bash
# Build CUDA-enabled binaries of a cargo workspace on a machine with no GPU, no driver and no
# CUDA toolkit, for carrying to a CUDA 13.0 machine (driver 580, H100/H200, compute cap 9.0).
#
#   scripts/build-cuda.sh [cargo build args...]
#   e.g. scripts/build-cuda.sh --release --features cuda --bins
#   CARGO_CMD=clippy scripts/build-cuda.sh --release --features cuda --workspace --all-targets
#   (any cargo command that builds, with the same set-up; the default is `build`)
#
# Run it from the workspace root. Binaries land in .gpu/bin/ (add /.gpu/ to .git/info/exclude
# and copy .gpu to the GPU machine). A clean build takes about 16 minutes on 2 cores;
# most of it is nvcc compiling candle-kernels once.
#
# What it works around, all at build time, nothing committed:
# 1. nvcc: PyPI's CUDA 13.0 wheels (nvidia-cuda-nvcc etc.) in a venv under $GPU_TOOLS.
# 2. candle-core turns on cudarc's "dynamic-linking", which needs libcuda.so at link time.
#    A copy of the locked candle-core version from crates.io, with that word changed to
#    "dynamic-loading" (cudarc dlopens the CUDA libraries at run time), is patched in with
#    `cargo --config patch...`; the project's own Cargo.toml stays untouched.
# 3. candle-kernels asks the linker for -lcudart: the wheel's libcudart_static.a is offered
#    under that name, so the binary carries cudart and needs no libcudart.so at run time.
set -euo pipefail
root=$(pwd)
[ -f Cargo.toml ] || { echo "build-cuda: run from the workspace root" >&2; exit 2; }
tools=${GPU_TOOLS:-$HOME/.cache/gpu-tools}
mkdir -p "$tools"
if [ ! -x "$tools/venv/bin/nvcc-ok" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
      nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  touch "$tools/venv/bin/nvcc-ok" && chmod +x "$tools/venv/bin/nvcc-ok"
fi
cu=$(echo "$tools"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "build-cuda: nvcc not found under $cu" >&2; exit 1; }

# the candle-core version that Cargo.lock picked
[ -f Cargo.lock ] || cargo generate-lockfile
ver=$(awk '/^name = "candle-core"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)
[ -n "$ver" ] || { echo "build-cuda: candle-core not in Cargo.lock" >&2; exit 1; }
vendor="$tools/candle-core-$ver"
if [ ! -f "$vendor/Cargo.toml" ]; then
  cargo fetch -q
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$ver" | head -1)
  cp -r "$src" "$vendor"
  rm -f "$vendor/.cargo-ok" "$vendor/.cargo_vcs_info.json" "$vendor/Cargo.lock"
  sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$vendor/Cargo.toml"
fi
grep -q '"dynamic-loading"' "$vendor/Cargo.toml" || { echo "build-cuda: patch did not apply to $vendor" >&2; exit 1; }

link="$tools/link"
mkdir -p "$link"
ln -sf "$cu/lib/libcudart_static.a" "$link/libcudart.a"

export PATH="$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu"
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda}
cargo "${CARGO_CMD:-build}" --config "patch.crates-io.candle-core.path=\"$vendor\"" "$@"

profile=debug
for a in "$@"; do [ "$a" = --release ] && profile=release; done
mkdir -p .gpu/bin
find "$CARGO_TARGET_DIR/$profile" -maxdepth 1 -type f -executable -exec cp {} .gpu/bin/ \;
strip .gpu/bin/* 2>/dev/null || true
ls -l .gpu/bin
