#!/usr/bin/env bash
# On the GPU machine, one call: the hop between two stages on one GPU (two nodes sharing
# cuda:0), one stage against two, with the activations sent at f32 and at f16, and the
# tokens collected from the last stage (the default) against sent back along the chain, for
# the 8B-shaped Q4_0 file and a SmolLM2-shaped Q8_0 one (scripts/bench_cluster.py --stages 1,2
# --activations f16 --replies chain --devices cuda:0).
#   bash scripts/gpu-hop.sh PACK OUT
# PACK holds bins.tar.xz (shard-node and coordinator from scripts/build-cuda.sh) and tok.gguf
# (a tokenizer). JSON lines on stdout and in OUT/hop-*.jsonl.
set -uo pipefail
pack=$(cd "${1:?pack folder}" && pwd)
out=${2:?output folder}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" /tmp/gh/models
tar xJf "$pack/bins.tar.xz" -C /tmp/gh
run() { bash "$here/scripts/on-device.sh" "$@"; }
m=/tmp/gh/models/8b-q4_0.gguf
s=/tmp/gh/models/smol-q8_0.gguf
[ -f "$m" ] || run /tmp/gh/shard-node synth-model --quant q4_0 --context 4096 \
  --tokenizer-from "$pack/tok.gguf" --out "$m" > /dev/null || exit 1
[ -f "$s" ] || run /tmp/gh/shard-node synth-model --layers 30 --hidden 576 --ffn 1536 --heads 9 \
  --kv-heads 3 --quant q8_0 --context 2048 --tokenizer-from "$pack/tok.gguf" --out "$s" \
  > /dev/null || exit 1
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
for f in "$s" "$m"; do
  python3 "$here/scripts/bench_cluster.py" --bin-dir /tmp/gh --model "$f" --stages 1,2 \
    --aggregate-stages "" --runs ${RUNS:-6} --tokens 128 --activations f16 --replies chain \
    --devices cuda:0 \
    | tee "$out/hop-$(basename "$f" .gguf).jsonl"
done
