#!/usr/bin/env bash
# On the GPU machine, one call: where a long prompt's time goes, ours against llama.cpp,
# kernel by kernel at the GPU's own clocks (nsys; ncu would lock them at base and serialize).
#   bash scripts/gpu-prompt-profile.sh PACK OUT
# PACK as for gpu-quants.sh. For each file of QUANTS (default "q4_0"), 8B-shaped with a
# context of 8,192: `shard-node bench --prompt-tokens P --gen-tokens 1` and `llama-bench -p P
# -n 0 -r 1 --no-warmup` (P = PROMPT, default 4,096) under `nsys profile --trace=cuda`, each
# summed per kernel and per CUDA API call (scripts/ncu_summary.py): the kernels' sum against
# the wall time says how long the GPU waited on the host. Without nsys, ncu at the GPU's own
# clocks (`--clock-control none`) and a PROMPT of 1,024 by default, ncu being slow. Ours also
# runs its 16-token warm-up, a few milliseconds.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" "$@"
gpu_start /tmp/gf
nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1 || true)
gpu_models /tmp/gf
p=${PROMPT:-$([ -n "$nsys" ] && echo 4096 || echo 1024)}
for q in ${QUANTS:-q4_0}; do
  f=/tmp/gf/models/8b-$q.gguf
  [ -f "$f" ] || run /tmp/gf/shard-node synth-model --quant "$q" --context 8192 \
    --tokenizer-from "$pack/tok.gguf" --out "$f" > /dev/null || exit 1
done
llama_wait
lb=/tmp/gf/llama.cpp/build/bin/llama-bench
kern() {
  local name=$1
  shift
  if [ -z "$nsys" ]; then
    # without nsys: ncu at the GPU's own clocks, kernels serialized, no gaps seen
    [ -n "$ncu" ] || { echo "neither nsys nor ncu found"; return; }
    run "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv "$@" \
      > "$out/$name.csv" 2> "$out/$name.log"
    python3 "$here/scripts/ncu_summary.py" "$out/$name.csv"
    return
  fi
  run "$nsys" profile -o "/tmp/gf/$name" --force-overwrite=true --trace=cuda --sample=none \
    --cpuctxsw=none "$@" > "$out/$name.log" 2>&1
  "$nsys" stats -q --report cuda_gpu_kern_sum,cuda_api_sum --format csv -o "$out/$name" \
    "/tmp/gf/$name.nsys-rep" > /dev/null 2>> "$out/$name.log"
  python3 "$here/scripts/ncu_summary.py" "$out/${name}_cuda_gpu_kern_sum.csv"
  python3 "$here/scripts/ncu_summary.py" "$out/${name}_cuda_api_sum.csv"
}
for q in ${QUANTS:-q4_0}; do
  f=/tmp/gf/models/8b-$q.gguf
  echo "ours, 8B $q, prompt $p:"
  kern "ours-$q" /tmp/gf/shard-node bench --model "$f" --device cuda:0 --prompt-tokens "$p" \
    --gen-tokens 1 --runs 1
  grep -E "tok/s" "$out/ours-$q.log" | tail -2
  if [ -x "$lb" ]; then
    echo "llama.cpp, 8B $q, prompt $p:"
    kern "llama-$q" "$lb" -m "$f" -p "$p" -n 0 -r 1 --no-warmup -ngl 99
    grep -E "pp$p" "$out/llama-$q.log" | tail -1
  fi
done
