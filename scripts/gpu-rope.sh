#!/usr/bin/env bash
# On the GPU machine, one call: a prompt chunk's RoPE and KV-cache write in one kernel
# (`--cuda-rope on`) against candle's ops (`off`), and the decode graphs' bit-for-bit test.
#   bash scripts/gpu-rope.sh PACK OUT
# PACK as for gpu-graphs.sh. Steps:
#   1. unit tests: `cuda::rope_chunk` (the kernel against candle's ops) and
#      `cuda::fused_decode` (the graph replays against plain launches), the tests that read a
#      model on the SmolLM2-shaped file, while llama.cpp builds;
#   2. greedy text of the 8B-shaped Q4_0 file and the SmolLM2-shaped one, rope kernel on and
#      off;
#   3. ROUNDS (2) rounds of `shard-node bench --gen-tokens 16` after prompts of 512 and 4,096
#      tokens on the 8B file, kernel on then off; then `llama-bench -p 512,4096 -n 0`;
#   4. (PROFILE=1, the default) ncu at the GPU's own clocks of a 1,024-token prompt, kernel on.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
gpu_models /tmp/gf
gpu_tests cuda::rope_chunk cuda::fused_decode
gpu_text_on_off "rope kernel" 32 --cuda-rope
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
