#!/usr/bin/env bash
# On the GPU machine, one call: prompt chunks' quantized products through cuBLAS on the
# weight dequantized to f16 (`--cuda-gemm on`) against candle's MMQ (`off`), with llama.cpp
# in the same call.
#   bash scripts/gpu-gemm.sh PACK OUT
# PACK holds bins.tar.xz (shard-node from scripts/build-cuda.sh), tok.gguf (a tokenizer) and
# llama-src.tar.xz (llama.cpp's sources, see docs/benchmarks.md; PEER=0 skips the peer).
# Steps:
#   1. greedy text of an 8B-shaped Q4_0 file and of a SmolLM2-shaped Q8_0 one with the f16
#      products on and off (a 60-sentence prompt, 32 new tokens);
#   2. ROUNDS (2) rounds of `shard-node bench --prompt-tokens 512` and `4096` with them on and
#      off, then `llama-bench -p 512,4096 -n 0` (built in the background meanwhile);
#   3. (PROFILE=1) ncu's time per kernel of a 4,096-token prompt with them on.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
gpu_models /tmp/gf
gpu_text_on_off "f16 products" 32 --cuda-gemm
llama_wait
for r in $(seq "${ROUNDS:-2}"); do
  for p in 512 4096; do
    for g in on off; do
      echo -n "round $r, prompt $p, f16 products $g: "
      run /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-gemm $g \
        --prompt-tokens $p --gen-tokens 16 --runs 1 2>> "$out/bench.log" | tail -1
    done
  done
  llama_bench -m "$m" -p 512,4096 -n 0 -r 1
done
if [ "${PROFILE:-0}" != 0 ] && [ -n "$ncu" ]; then
  run "$ncu" --metrics gpu__time_duration.sum --csv --launch-skip 600 --launch-count 3000 \
    /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-gemm on --prompt-tokens 4096 \
    --gen-tokens 1 --runs 1 > "$out/ncu-4096.csv" 2> "$out/ncu-4096.log"
  python3 "$here/scripts/ncu_summary.py" "$out/ncu-4096.csv"
fi
