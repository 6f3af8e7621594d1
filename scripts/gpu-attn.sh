#!/usr/bin/env bash
# On the GPU machine, one call: decode attention with RoPE and the cache write folded into the
# grouped kernel (one launch a layer instead of two), checked and timed against the two-launch
# path and against llama.cpp's `llama-bench -d` in the same call.
#   bash scripts/gpu-attn.sh PACK OUT
#   e.g. MB=.gpu/mb/matvec-bench bash scripts/gpu-attn.sh .gpu/pack "$OUT/r" | tee "$OUT/run.log"
#   (carrying .gpu/pack and .gpu/mb; about 8 minutes, most of it llama.cpp's build and the
#   benches)
# PACK holds bins.tar.xz (shard-node, and common-tests, the `common` crate's CUDA test
# binary), tok.gguf (a tokenizer) and llama-src.tar.xz (PEER=0 skips llama.cpp); MB, if set,
# is the path of `.gpu/mb/matvec-bench` (scripts/cuda/build-matvec-bench.sh). Steps:
#   1. the step emulation of matvec-bench (attention variants and the folded norms, each
#      checked against the production path first);
#   2. the decode kernels' and the f16 products' unit tests, the decode ones again with the
#      folded kernel, and `shard-node compare` (GPU against CPU), with and without it, on
#      models with groups of 2, 4, 8 and 1 query heads a key/value head;
#   3. ROUNDS (2) rounds of `shard-node bench --prompt-tokens P --gen-tokens 64` for P in 512,
#      4,096 and 8,000, with the folded kernel (LLMC_CUDA_ATTN_ROPE=1) and without (the
#      default), then `llama-bench -p 0 -n 64 -d 512,4096,8000`;
#   4. if time is left, ncu's time per kernel (at the GPU's own clocks, serialized) of a few
#      decode steps.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
if [ -n "${MB:-}" ] && [ -x "$MB" ]; then
  "$MB" > "$out/mb.log" 2>&1
  grep -E "copy bandwidth|pairs|worst difference [1-9]|norms folded:|decode step|^full|^no |^products|^small|^attn|^attention only|^rope" \
    "$out/mb.log"
fi
gpu_models /tmp/gf
gpu_tests cuda::decode_attention cuda::fused_decode cuda::decode_graph cuda::f16_gemm
if [ -x /tmp/gf/common-tests ]; then
  # the same decode tests through the folded kernel (the switch is read once a process)
  LLMC_CUDA_ATTN_ROPE=1 LLMC_TEST_MODEL=$s run /tmp/gf/common-tests cuda::decode_attention \
    cuda::fused_decode cuda::decode_graph --test-threads 1 > "$out/tests-folded.log" 2>&1
  echo "with LLMC_CUDA_ATTN_ROPE=1:"
  grep -E "^test |test result|values differ|graphs:" "$out/tests-folded.log" | tail -20
fi
for kv in 4 2 1 8; do
  f=/tmp/gf/models/gqa-$kv.gguf
  [ -f "$f" ] || run /tmp/gf/shard-node synth-model --layers 4 --hidden 1024 --ffn 2816 \
    --heads 8 --kv-heads $kv --quant q8_0 --context 2048 --tokenizer-from "$pack/tok.gguf" \
    --out "$f" > /dev/null
  for v in 1 0; do
    echo -n "8 query heads over $kv, folded $v: "
    LLMC_CUDA_ATTN_ROPE=$v run /tmp/gf/shard-node compare --model "$f" --device cuda:0 \
      --prompt "$prompt" --max-tokens 24 2>/dev/null | grep summary
  done
done
llama_wait
for r in $(seq "${ROUNDS:-2}"); do
  for p in 512 4096 8000; do
    for v in 1 0; do
      echo -n "round $r, folded $v, prompt $p: "
      LLMC_CUDA_ATTN_ROPE=$v run /tmp/gf/shard-node bench --model "$m" --device cuda:0 \
        --prompt-tokens $p --gen-tokens 64 --runs 1 2>> "$out/bench.log" | tail -1
    done
  done
  llama_bench -m "$m" -p 0 -n 64 -d 512,4096,8000 -r 1
done
if [ -n "$ncu" ] && [ "$SECONDS" -lt "${NCU_BEFORE:-420}" ]; then
  # the GPU's own clocks (ncu locks them at base otherwise); kernels are serialized
  run "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
    --launch-count ${NCU_KERNELS:-3000} \
    /tmp/gf/shard-node bench --model "$m" --device cuda:0 --prompt-tokens 8 --gen-tokens 6 \
    --runs 1 > "$out/ncu-decode.csv" 2> "$out/ncu-decode.log"
  echo "ncu, 8B q4_0, 8-token prompt then 6 decode steps:"
  python3 "$here/scripts/ncu_summary.py" "$out/ncu-decode.csv" | head -16
else
  echo "ncu skipped: ${SECONDS} s into the call"
fi
