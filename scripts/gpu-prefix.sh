#!/usr/bin/env bash
# On the GPU machine, one call: the prefix cache on one CUDA node (an 8B-shaped Q4_0 file,
# a 4,000-token prefix: cold and warm time to the first token, and the cached answer checked
# against a coordinator without a cache), then the time to the first token of a 4,096-token
# prompt in one process, ours (`shard-node bench`) against llama.cpp's `llama-bench` built for
# CUDA in the same call.
#   bash scripts/gpu-prefix.sh PACK OUT
# PACK holds bins.tar.xz (shard-node and coordinator built by scripts/build-cuda.sh),
# tok.gguf (a tokenizer) and llama-src.tar.xz (llama.cpp's sources, see docs/benchmarks.md).
set -uo pipefail
pack=$(cd "${1:?pack folder}" && pwd)
out=${2:?output folder}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" /tmp/gp/models
run() { bash "$here/scripts/on-device.sh" "$@"; }
tar xJf "$pack/bins.tar.xz" -C /tmp/gp
bash "$here/scripts/build-llama-bench.sh" "$pack/llama-src.tar.xz" /tmp/gp \
  > "$out/llama-build.log" 2>&1 &
llama_build=$!
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
m=/tmp/gp/models/8b-q4_0.gguf
# the same file as scripts/gpu-prefill.sh's, when that ran first on this machine
[ -f /tmp/gf/models/8b-q4_0.gguf ] && m=/tmp/gf/models/8b-q4_0.gguf
[ -f "$m" ] || run /tmp/gp/shard-node synth-model --quant q4_0 --context 8192 --tokenizer-from "$pack/tok.gguf" \
  --out "$m" > /dev/null || exit 1
OUT=$out run python3 "$here/scripts/bench_prefix.py" --bin-dir /tmp/gp --model "$m" \
  --device cuda:0 --nodes 1 --prefix-tokens 4000 --runs 3 --no-peer \
  --cache-bytes $((2 << 30)) | tee "$out/prefix.jsonl"
for p in 512 4096; do
  run /tmp/gp/shard-node bench --model "$m" --device cuda:0 --prompt-tokens $p --gen-tokens 1 \
    --runs 2 2>> "$out/bench.log" | tee "$out/bench-$p.jsonl"
done
wait "$llama_build"
echo "llama.cpp build rc=$?"
lb=/tmp/gp/llama.cpp/build/bin/llama-bench
[ -x "$lb" ] && run "$lb" -m "$m" -p 512,4096 -n 0 -r 2 -ngl 99 -o jsonl 2>> "$out/llama-bench.log" |
  tee "$out/llama-bench.jsonl" | python3 -c "
import json, sys
for l in sys.stdin:
    if l.strip():
        j = json.loads(l)
        print('llama-bench p', j['n_prompt'], round(j['avg_ts'], 1), 'tok/s: first token after',
              round(j['n_prompt'] / j['avg_ts'] * 1e3, 1), 'ms')
"
