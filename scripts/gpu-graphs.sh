#!/usr/bin/env bash
# On the GPU machine, one call: decode steps replayed from CUDA graphs (`--cuda-graphs on`,
# the default) against the same steps launched kernel by kernel (`off`), and llama.cpp's
# decode in the same call.
#   bash scripts/gpu-graphs.sh PACK OUT
# PACK holds bins.tar.xz (shard-node, and common-tests, the `common` crate's CUDA test
# binary), tok.gguf (a tokenizer) and llama-src.tar.xz (PEER=0 skips llama.cpp). Steps:
#   1. the fused step's and the attention's unit tests (`cuda::fused_decode`, with the graph
#      against the launches bit for bit, and `cuda::decode_attention`), while llama.cpp builds;
#   2. greedy text of the 8B-shaped Q4_0 file and of the SmolLM2-shaped one, graphs on and off;
#   3. once llama.cpp is built (so that its compile does not share the host with our
#      launches), ROUNDS (2) rounds of `shard-node bench --gen-tokens 128` after prompts of 512,
#      4,096 and 8,000 tokens on the 8B file, of 512 on the SmolLM2 shape, and 4 sessions
#      decoded together (`--batch 4`), each graphs on then off; at 8,000 also with attention
#      split over up to 64 CTAs a head (`LLMC_CUDA_MAX_SPLITS`, default 32) and with the
#      grouped kernel's prefetch (`LLMC_CUDA_ATTN_PREFETCH=1`); then `llama-bench -p 512
#      -n 128` and `-p 0 -n 128 -d 4096,8000` on the same 8B file;
#   4. (PROFILE=1, the default) ncu of the grouped attention kernel at depth 8,000, with and
#      without the prefetch: time, bandwidth, occupancy and registers.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
gpu_models /tmp/gf
gpu_tests cuda::fused_decode cuda::decode_attention
if [ -x /tmp/gf/common-tests ]; then
  echo "the attention tests again, with the grouped kernels' prefetch:"
  LLMC_CUDA_ATTN_PREFETCH=1 run /tmp/gf/common-tests cuda::decode_attention --test-threads 1 \
    2>&1 | grep -E "^test |test result"
fi
gpu_text_on_off graphs 48 --cuda-graphs
llama_wait
bench() {
  local f=$1 g=$2
  shift 2
  run /tmp/gf/shard-node bench --model "$f" --device cuda:0 --cuda-graphs "$g" --runs 1 "$@" \
    2>> "$out/bench.log" | tail -1
}
for r in $(seq "${ROUNDS:-2}"); do
  # a round takes about 2 minutes: none is started past 6 minutes into the call
  [ "$SECONDS" -lt 360 ] || { echo "round $r skipped: ${SECONDS} s into the call"; break; }
  for p in 512 4096 8000; do
    for g in on off; do
      echo -n "round $r, 8B, prompt $p, graphs $g: "
      bench "$m" $g --prompt-tokens $p --gen-tokens 128
    done
  done
  echo -n "round $r, 8B, prompt 8000, graphs on, at most 64 splits: "
  LLMC_CUDA_MAX_SPLITS=64 bench "$m" on --prompt-tokens 8000 --gen-tokens 128
  echo -n "round $r, 8B, prompt 8000, graphs on, attention prefetch: "
  LLMC_CUDA_ATTN_PREFETCH=1 bench "$m" on --prompt-tokens 8000 --gen-tokens 128
  for g in on off; do
    echo -n "round $r, SmolLM2 shape, prompt 512, graphs $g: "
    bench "$s" $g --prompt-tokens 512 --gen-tokens 128
    echo -n "round $r, 8B, 4 sessions, graphs $g: "
    bench "$m" $g --prompt-tokens 16 --gen-tokens 128 --batch 4
  done
  llama_bench -m "$m" -p 512 -n 128 -r 1
  llama_bench -m "$m" -p 0 -n 128 -d 4096,8000 -r 1
done
# Attention at depth 8,000 under ncu: time, bandwidth and occupancy of the grouped kernel
# (graphs off, so that ncu sees plain launches).
if [ "${PROFILE:-1}" != 0 ] && [ -n "$ncu" ]; then
  for pf in 0 1; do
    [ "$SECONDS" -lt 480 ] || { echo "ncu skipped: ${SECONDS} s into the call"; break; }
    echo "ncu, attention at depth 8000, prefetch $pf:"
    LLMC_CUDA_ATTN_PREFETCH=$pf run "$ncu" --csv -k regex:decode_attention_hd128_g \
      --launch-skip 64 --launch-count 32 \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__grid_size \
      /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-graphs off \
      --prompt-tokens 8000 --gen-tokens 4 --runs 1 > "$out/ncu-attention-$pf.csv" \
      2> "$out/ncu-attention-$pf.log"
    python3 "$here/scripts/ncu_summary.py" --means "$out/ncu-attention-$pf.csv"
  done
fi
