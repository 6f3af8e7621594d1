#!/usr/bin/env bash
# On the GPU machine, one call: prompt chunks' quantized products on f16 tensor cores
# (`--cuda-gemm on`: our dequantization kernels and one cuBLAS GemmEx, `cuda::f16_gemm`)
# against candle's MMQ on int8 tensor cores (`off`), with llama.cpp in the same call.
#   bash scripts/gpu-gemm.sh PACK OUT
# PACK holds bins.tar.xz (shard-node and common-tests from scripts/build-cuda.sh), tok.gguf
# (a tokenizer) and llama-src.tar.xz (llama.cpp's sources, see docs/benchmarks.md; PEER=0
# skips the peer). Steps:
#   1. the CUDA unit tests matching TESTS (default: the f16 products against the CPU's, the
#      decode graphs, the prefill kernels), while llama.cpp builds;
#   2. greedy text of an 8B-shaped Q4_0 file and of a SmolLM2-shaped Q8_0 one with the f16
#      products on and off (a 60-sentence prompt, 32 new tokens);
#   3. ROUNDS (2) rounds of `shard-node bench --prompt-tokens 512` and `4096` with them on and
#      off (and 4,096 in one chunk of 4,096, CHUNK=0 skips it), then
#      `llama-bench -p 512,4096 -n 0`;
#   4. (PROFILE=1, the default) ncu at the GPU's own clocks of a 1,024-token prompt with them
#      on: time per kernel.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
gpu_models /tmp/gf
# shellcheck disable=SC2086
gpu_tests ${TESTS:-cuda::f16_gemm cuda::fused_decode cuda::prefill_attention cuda::rope_chunk}
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
  if [ "${CHUNK:-1}" != 0 ]; then
    for g in on off; do
      echo -n "round $r, prompt 4096 in one chunk, f16 products $g: "
      run /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-gemm $g \
        --prefill-chunk 4096 --prompt-tokens 4096 --gen-tokens 16 --runs 1 \
        2>> "$out/bench.log" | tail -1
    done
  fi
  llama_bench -m "$m" -p 512,4096 -n 0 -r 1
done
if [ "${PROFILE:-1}" != 0 ] && [ -n "$ncu" ]; then
  [ "$SECONDS" -lt 480 ] || { echo "ncu skipped: ${SECONDS} s into the call"; exit 0; }
  run "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
    /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-gemm on --prompt-tokens 1024 \
    --gen-tokens 1 --runs 1 > "$out/ncu-1024.csv" 2> "$out/ncu-1024.log"
  echo "ncu at the GPU's clocks, a 1,024-token prompt, f16 products on:"
  python3 "$here/scripts/ncu_summary.py" "$out/ncu-1024.csv"
fi
