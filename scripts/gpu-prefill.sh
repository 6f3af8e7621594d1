#!/usr/bin/env bash
# On the GPU machine, one call: prompt processing with our prefill kernels (attention on
# tensor cores, the fused gate) against candle's ops (`--cuda-prefill` and `--cuda-gate` on
# or off together), and with
# 512- against 256-token chunks (`bench --prefill-chunk`), in the same call.
#   bash scripts/gpu-prefill.sh PACK OUT
# PACK holds bins.tar.xz (shard-node and coordinator from scripts/build-cuda.sh, and
# common-tests, the `common` crate's CUDA test binary), tok.gguf (a tokenizer) and, for the
# peer, llama-src.tar.xz (llama.cpp's sources, see docs/benchmarks.md). Steps:
#   1. the kernels' unit tests against candle's ops (`common-tests cuda::prefill_attention
#      cuda::gate_mul`);
#   2. greedy text of an 8B-shaped Q4_0 file and of a SmolLM2-shaped one with the kernels on
#      and off (a 60-sentence prompt, 32 new tokens);
#   3. `shard-node bench` at 512 and 4,096 prompt tokens, 2 runs each: the kernels on with
#      512-token chunks (the GPU default) and with 256, and off with 256 (as before both);
#   4. (PROFILE=1, the default) ncu's time per kernel of a 512-token prompt, kernels on;
#   5. (PEER=1, the default) llama.cpp's `llama-bench -p 512,4096` on the same file (built
#      during steps 1-4).
# Output on stdout; logs and ncu's CSV under OUT.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
if [ -x /tmp/gf/common-tests ]; then
  run /tmp/gf/common-tests cuda::prefill_attention cuda::gate_mul --nocapture --test-threads 1 2>&1 | tail -12
fi
gpu_models /tmp/gf
gpu_text_on_off kernels 32 --cuda-prefill --cuda-gate
for p in 512 4096; do
  for v in "on 512" "on 256" "off 256"; do
    set -- $v
    echo "bench prompt $p, kernels $1, chunk $2:"
    run /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-prefill $1 --cuda-gate $1 \
      --prefill-chunk $2 --prompt-tokens $p --gen-tokens 16 --runs 2 2>> "$out/bench.log" | tail -4
  done
done
# Where a prefill goes: ncu's duration of every kernel of a 512-token prompt (kernel on;
# the load's, the warm-up's and the run's kernels; ncu serializes kernels).
if [ "${PROFILE:-1}" != 0 ] && [ -n "$ncu" ]; then
  run "$ncu" --metrics gpu__time_duration.sum --csv --launch-count ${NCU_KERNELS:-4000} \
    /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-gate on --prompt-tokens 512 --gen-tokens 1 \
    --runs 1 > "$out/ncu-512.csv" 2> "$out/ncu-512.log"
  python3 "$here/scripts/ncu_summary.py" "$out/ncu-512.csv"
fi
llama_wait
llama_bench -m "$m" -p 512,4096 -n 0 -r 2
