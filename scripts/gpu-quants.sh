#!/usr/bin/env bash
# On the GPU machine, one call: prompt and decode of 8B-shaped Q4_0, Q8_0 and Q4_K_M files,
# ours against llama.cpp's `llama-bench` in the same call, and the time to the first token of
# a 4,096-token prompt through a coordinator.
#   bash scripts/gpu-quants.sh PACK OUT
# PACK holds bins.tar.xz (shard-node and coordinator from scripts/build-cuda.sh), tok.gguf (a
# tokenizer) and llama-src.tar.xz (llama.cpp's sources, see docs/benchmarks.md). Steps:
#   1. the three files (`shard-node synth-model --quant q4_0|q8_0|q4_k_m --context 8192`),
#      while llama.cpp builds, and the CUDA unit tests matching TESTS (PACK's common-tests;
#      default: the f16 products against the CPU's);
#   2. once it is built, for each file (QUANTS, default "q4_0 q8_0 q4_k_m"): `shard-node
#      bench` with prompts of 512 tokens (then 128 decoded) and 4,096 (then 16), 2 runs each,
#      then `llama-bench -p 512,4096 -n 128 -r 2` on the same file;
#      Q4_0's 4,096-token prompt also in chunks of 512 and with the f16 products off (CHUNKS=0
#      skips these);
#   3. the time to the first token of a 4,000-token prefix plus a question through a
#      coordinator and one node (Q4_0; `bench_prefix.py`, cold and with the prefix cached);
#   4. (PROFILE=1, the default) ncu's time per kernel of a 512-token prompt of the Q8_0 and
#      Q4_K_M files.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
gpu_models /tmp/gf
quants=${QUANTS:-q4_0 q8_0 q4_k_m}
for q in $quants; do
  f=/tmp/gf/models/8b-$q.gguf
  [ -f "$f" ] || run /tmp/gf/shard-node synth-model --quant $q --context 8192 \
    --tokenizer-from "$pack/tok.gguf" --out "$f" > /dev/null || exit 1
done
# shellcheck disable=SC2086
gpu_tests ${TESTS:-cuda::f16_gemm}
llama_wait
for q in $quants; do
  f=/tmp/gf/models/8b-$q.gguf
  for p in "512 128" "4096 16"; do
    set -- $p
    echo "8B $q, prompt $1, then $2:"
    run /tmp/gf/shard-node bench --model "$f" --device cuda:0 --prompt-tokens $1 \
      --gen-tokens $2 --runs 2 2>> "$out/bench.log" | tail -2
  done
  if [ "$q" = q4_0 ] && [ "${CHUNKS:-1}" != 0 ]; then
    for v in "--prefill-chunk 512" "--cuda-gemm off"; do
      echo -n "8B $q, prompt 4096, $v: "
      # shellcheck disable=SC2086
      run /tmp/gf/shard-node bench --model "$f" --device cuda:0 --prompt-tokens 4096 $v \
        --gen-tokens 16 --runs 2 2>> "$out/bench.log" | tail -1
    done
  fi
  llama_bench -m "$f" -p 512,4096 -n 128 -r 2
done
[ "$SECONDS" -lt 450 ] || { echo "the time to the first token skipped: ${SECONDS} s into the call"; exit 0; }
OUT=$out run python3 "$here/scripts/bench_prefix.py" --bin-dir /tmp/gf --model "$m" \
  --device cuda:0 --nodes 1 --prefix-tokens 4000 --runs 3 --no-peer \
  --cache-bytes $((2 << 30)) > "$out/prefix.jsonl" 2> "$out/prefix.log"
tail -4 "$out/prefix.jsonl"
if [ "${PROFILE:-1}" != 0 ] && [ -n "$ncu" ]; then
  for q in q8_0 q4_k_m; do
    [ "$SECONDS" -lt 500 ] || { echo "ncu skipped: ${SECONDS} s into the call"; break; }
    run "$ncu" --metrics gpu__time_duration.sum --csv --launch-count ${NCU_KERNELS:-4000} \
      /tmp/gf/shard-node bench --model /tmp/gf/models/8b-$q.gguf --device cuda:0 \
      --prompt-tokens 512 --gen-tokens 1 --runs 1 > "$out/ncu-$q.csv" 2> "$out/ncu-$q.log"
    echo "ncu, 8B $q, a 512-token prompt:"
    python3 "$here/scripts/ncu_summary.py" "$out/ncu-$q.csv" | head -10
  done
fi
