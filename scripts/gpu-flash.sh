#!/usr/bin/env bash
# On the GPU machine, one call: the register-resident prefill attention kernel
# (`prefill_flash_hd*`), the chunk RoPE kernel and the decode graphs.
#   bash scripts/gpu-flash.sh PACK OUT
# PACK as for gpu-graphs.sh. Steps:
#   1. unit tests: `cuda::prefill_attention` (both prefill kernels against candle's ops),
#      `cuda::rope_chunk` and `cuda::fused_decode` (graph replays against plain launches),
#      while llama.cpp builds;
#   2. greedy text of the 8B-shaped Q4_0 file and the SmolLM2-shaped one: prefill kernels on
#      and off, rope kernel on and off, graphs on and off;
#   3. ROUNDS (2) rounds of `shard-node bench --gen-tokens 16` after prompts of 512 and 4,096
#      tokens on the 8B file, rope kernel on then off; then `llama-bench -p 512,4096 -n 0`;
#   4. (PROFILE=1, the default) ncu at the GPU's own clocks of a 1,024-token prompt.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
gpu_models /tmp/gf
gpu_tests cuda::prefill_attention cuda::rope_chunk cuda::fused_decode
gpu_text_on_off "prefill kernels" 32 --cuda-prefill --cuda-gate
gpu_text_on_off "rope kernel" 32 --cuda-rope
gpu_text_on_off "graphs" 32 --cuda-graphs
llama_wait
for r in $(seq "${ROUNDS:-2}"); do
  for p in 512 4096; do
    for v in on off; do
      echo -n "round $r, 8B, prompt $p, rope kernel $v: "
      run /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-rope $v \
        --prompt-tokens $p --gen-tokens 16 --runs 1 2>> "$out/bench.log" | tail -1
    done
  done
done
llama_bench -m "$m" -p 512,4096 -n 0 -r 2
if [ "${PROFILE:-1}" != 0 ] && [ -n "$ncu" ]; then
  [ "$SECONDS" -lt 420 ] || { echo "ncu skipped: ${SECONDS} s into the call"; exit 0; }
  run "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
    /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-rope on --prompt-tokens 1024 \
    --gen-tokens 1 --runs 1 > "$out/ncu-1024.csv" 2> "$out/ncu-1024.log"
  echo "ncu at the GPU's clocks, a 1,024-token prompt, rope kernel on:"
  python3 "$here/scripts/ncu_summary.py" "$out/ncu-1024.csv"
fi
