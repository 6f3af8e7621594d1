#!/usr/bin/env bash
# On the GPU machine, one call: the cost of trace export on one CUDA node, with export to an
# otlp-sink against export off, interleaved (scripts/bench_cluster.py --traces).
#   bash scripts/gpu-traces.sh PACK OUT
# PACK holds bins.tar.xz (shard-node, coordinator and otlp-sink built by
# scripts/build-cuda.sh) and tok.gguf (a tokenizer: any small GGUF with one). The model is
# SmolLM2-shaped (30 blocks of width 576) with random Q8_0 weights. JSON lines on stdout and
# in OUT/traces.jsonl.
set -uo pipefail
pack=$(cd "${1:?pack folder}" && pwd)
out=${2:?output folder}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" /tmp/gt/models
tar xJf "$pack/bins.tar.xz" -C /tmp/gt
run() { bash "$here/scripts/on-device.sh" "$@"; }
run /tmp/gt/shard-node synth-model --layers 30 --hidden 576 --ffn 1536 --heads 9 --kv-heads 3 \
  --quant q8_0 --context 2048 --tokenizer-from "$pack/tok.gguf" \
  --out /tmp/gt/models/smol-q8.gguf > /dev/null || exit 1
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
python3 "$here/scripts/bench_cluster.py" --bin-dir /tmp/gt --model /tmp/gt/models/smol-q8.gguf \
  --stages 1 --aggregate-stages 1 --streams 1,16 --runs ${RUNS:-16} --tokens 128 --traces \
  --devices cuda:0 | tee "$out/traces.jsonl"
