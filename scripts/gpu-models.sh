#!/usr/bin/env bash
# On the GPU machine, one call: the model families and K-quants on CUDA, against llama.cpp
# built for CUDA in the same run.
#   bash scripts/gpu-models.sh PACK OUT        (QUANTS="q4_k_m" times only that 8B file;
#                                               ONLY_LLAMA=1 compares only the llama model;
#                                               CANDLE=0 skips the runs with candle's mmvq)
# PACK holds bins.tar.xz (shard-node built by scripts/build-cuda.sh, and optionally
# common-tests, the `common` crate's CUDA test binary), tok.gguf (a tokenizer: any small GGUF
# with one) and llama-src.tar.xz (llama.cpp's sources, as vendored by llama-cpp-python).
# Writes logs and JSON lines under OUT:
#   kernels.log       the CUDA unit tests (`cuda::`), when common-tests was packed
#   llama-build.log   llama.cpp's CUDA build (sm_90, llama-bench only), run in the background
#   compare-*.jsonl   `shard-node compare` CPU against cuda:0, per step, for small synthetic
#                     gemma3 (window 64, prompts past it), qwen3 and llama Q4_K_M models
#   bench-*.jsonl     `shard-node bench` on 8B-shaped models (Q4_K_M, Q5_K_M, Q4_0), and
#                     bench-*-candle.jsonl the K-quant ones with candle's mmvq instead of ours
#   llama-bench.jsonl llama.cpp's llama-bench on the same files
set -uo pipefail
pack=$(cd "${1:?pack folder}" && pwd)
out=${2:?output folder}
mkdir -p "$out" /tmp/gm
here=$(cd "$(dirname "$0")/.." && pwd)
run() { bash "$here/scripts/on-device.sh" "$@"; }

tar xJf "$pack/bins.tar.xz" -C /tmp/gm
bin=/tmp/gm/shard-node
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"

# llama.cpp for CUDA, in the background while ours runs
bash "$here/scripts/build-llama-bench.sh" "$pack/llama-src.tar.xz" /tmp/gm \
  > "$out/llama-build.log" 2>&1 &
llama_build=$!

# 0. The kernels' unit tests.
if [ -x /tmp/gm/common-tests ]; then
  run /tmp/gm/common-tests cuda:: --nocapture --test-threads 1 > "$out/kernels.log" 2>&1
  echo "kernels rc=$? ($(grep -c '^test .* ok$' "$out/kernels.log") ok)"
fi

# 1. Correctness on cuda:0 against the CPU, small synthetic models of each new family.
prompt=$(for i in $(seq 1 50); do printf 'item %d is %d. ' "$i" $((i * 7 % 13)); done)
small="--layers 6 --hidden 512 --ffn 1024 --heads 4 --kv-heads 2 --context 2048 --seed 7"
specs=("gemma3 q4_k_m --sliding-window 64" "qwen3 q4_k_m" "llama q4_k_m --rope-freqs" "qwen2 q8_0")
[ -n "${ONLY_LLAMA:-}" ] && specs=("llama q4_k_m --rope-freqs")
for spec in "${specs[@]}"; do
  set -- $spec
  name="$1-$2"
  arch=$1; quant=$2; shift 2
  run "$bin" synth-model --arch "$arch" --quant "$quant" $small "$@" \
    --tokenizer-from "$pack/tok.gguf" --out "/tmp/gm/$name.gguf" > /dev/null
  run "$bin" compare --model "/tmp/gm/$name.gguf" --device cuda:0 --prompt "$prompt" \
    --max-tokens 24 > "$out/compare-$name.jsonl" 2> "$out/compare-$name.log"
  echo "compare $name rc=$?"
done

# 2. Speed: 8B-shaped files, ours then llama.cpp's.
for quant in ${QUANTS:-q4_k_m q5_k_m q4_0}; do
  run "$bin" synth-model --quant "$quant" --tokenizer-from "$pack/tok.gguf" \
    --out "/tmp/gm/8b-$quant.gguf" > /dev/null
  run "$bin" bench --model "/tmp/gm/8b-$quant.gguf" --device cuda:0 --prompt-tokens 512 \
    --gen-tokens 128 --runs 2 > "$out/bench-$quant.jsonl" 2> "$out/bench-$quant.log"
  echo "bench $quant rc=$?"
  case ${CANDLE:-1}$quant in 1*_k*)
    LLMC_CUDA_MATVEC=0 run "$bin" bench --model "/tmp/gm/8b-$quant.gguf" --device cuda:0 \
      --prompt-tokens 512 --gen-tokens 128 --runs 1 > "$out/bench-$quant-candle.jsonl" \
      2> "$out/bench-$quant-candle.log"
    echo "bench $quant (candle's mmvq) rc=$?" ;;
  esac
done
wait "$llama_build"
echo "llama.cpp build rc=$?"
lb=/tmp/gm/llama.cpp/build/bin/llama-bench
if [ -x "$lb" ]; then
  for quant in ${QUANTS:-q4_k_m q5_k_m q4_0}; do
    run "$lb" -m "/tmp/gm/8b-$quant.gguf" -p 512 -n 128 -r 2 -ngl 99 -o jsonl \
      >> "$out/llama-bench.jsonl" 2>> "$out/llama-bench.log"
    echo "llama-bench $quant rc=$?"
  done
fi

# A summary on stdout (the device tool brings back only a few files).
for f in "$out"/compare-*.jsonl; do
  echo "$(basename "$f" .jsonl): $(tail -1 "$f")"
done
for f in "$out"/bench-*.jsonl; do
  echo "$(basename "$f" .jsonl): $(python3 -c "import json,sys; print([(round(json.loads(l)['prompt_tok_s']), round(json.loads(l)['decode_tok_s'],1)) for l in open(sys.argv[1]) if 'decode_tok_s' in l])" "$f")"
done
[ -f "$out/llama-bench.jsonl" ] && python3 -c "
import json, sys
for l in open(sys.argv[1]):
    if l.strip():
        j = json.loads(l)
        print('llama-bench', j['model_filename'].split('/')[-1], 'p', j['n_prompt'], 'n', j['n_gen'], round(j['avg_ts'], 1))
" "$out/llama-bench.jsonl"
