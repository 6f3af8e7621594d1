#!/usr/bin/env bash
# On the GPU machine: point the loader at the CUDA 13 libraries that cudarc dlopens
# (libcuda from the driver; libcublas, libcublasLt, libcurand from the toolkit), then run.
#   bash scripts/on-device.sh .gpu/bin/shard-node --help
# (it is a tracked file, so it reaches the GPU machine with the working tree)
set -euo pipefail
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
exec "$@"
