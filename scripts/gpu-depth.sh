#!/usr/bin/env bash
# On the GPU machine, one call: decode at depth, one session of an 8B-shaped Q4_0 file, after
# prompts of 512, 4,096 and 8,000 tokens, against llama.cpp's `llama-bench -d` in the same
# call; optionally a second build beside it (a before/after comparison).
#   bash scripts/gpu-depth.sh PACK OUT
# PACK holds bins.tar.xz (shard-node, and common-tests, the `common` crate's CUDA test
# binary), tok.gguf (a tokenizer), llama-src.tar.xz (PEER=0 skips llama.cpp) and, optionally,
# bins-before.tar.xz (another build, measured in the same rounds). Steps:
#   1. the decode kernels' unit tests against candle's ops (`cuda::decode_attention`), and
#      `shard-node compare` (GPU against CPU) on models with groups of 2, 4, 8 and 1 query
#      heads a key/value head;
#   2. ROUNDS (2) rounds of `shard-node bench --prompt-tokens P --gen-tokens 64` for each P
#      (and each build), then `llama-bench -p 0 -n 64 -d 512,4096,8000`.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gd/now
builds=now
if [ -f "$pack/bins-before.tar.xz" ]; then
  mkdir -p /tmp/gd/before
  tar xJf "$pack/bins-before.tar.xz" -C /tmp/gd/before
  builds="before now"
fi
if [ -x /tmp/gd/now/common-tests ]; then
  run /tmp/gd/now/common-tests cuda::decode_attention --test-threads 1 2>&1 \
    | grep -E "^test |test result"
fi
gpu_models /tmp/gd/now
# the fused decode step on the GPU against the CPU, teacher-forced (`shard-node compare`), on
# small 128-wide-head models whose query heads come in groups of 2, 4, 8 and 1 (the grouped
# attention kernels and the per-head one), after a 60-sentence prompt (splits past 64 rows)
for kv in 4 2 1 8; do
  f=/tmp/gf/models/gqa-$kv.gguf
  [ -f "$f" ] || run /tmp/gd/now/shard-node synth-model --layers 4 --hidden 1024 --ffn 2816 \
    --heads 8 --kv-heads $kv --quant q8_0 --context 2048 --tokenizer-from "$pack/tok.gguf" \
    --out "$f" > /dev/null
  echo -n "8 query heads over $kv: "
  run /tmp/gd/now/shard-node compare --model "$f" --device cuda:0 --prompt "$prompt" \
    --max-tokens 24 2>/dev/null | grep summary
done
llama_wait
for r in $(seq "${ROUNDS:-2}"); do
  for p in 512 4096 8000; do
    for b in $builds; do
      echo -n "round $r, $b, prompt $p: "
      run /tmp/gd/$b/shard-node bench --model "$m" --device cuda:0 --prompt-tokens $p \
        --gen-tokens 64 --runs 1 2>> "$out/bench.log" | tail -1
    done
  done
  llama_bench -m "$m" -p 0 -n 64 -d 512,4096,8000 -r 1
done
