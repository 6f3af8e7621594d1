# Shared set-up of the one-call GPU scripts (gpu-prefill.sh, gpu-gemm.sh, gpu-depth.sh,
# gpu-graphs.sh, gpu-quants.sh), sourced with their arguments:
#   . "$(dirname "$0")/gpu-lib.sh" "$@"
# sets `pack` (the pack folder, $1), `out` (the output folder, $2), `here` (the repository
# root), `prompt` (a 60-sentence prompt) and `ncu` (ncu's path, empty without it), and defines
#   gpu_start DIR         unpacks PACK/bins.tar.xz into DIR; starts llama.cpp's build there in
#                         the background (PACK/llama-src.tar.xz; PEER=0 skips it), its pid in
#                         $llama_build; prints the GPU
#   gpu_models DIR        the 8B-shaped Q4_0 file ($m, context 8,192) and the SmolLM2-shaped
#                         Q8_0 one ($s) under /tmp/gf/models, made with DIR/shard-node if missing
#   gpu_tests FILTER...   the `common` crate's CUDA unit tests (PACK's common-tests) matching
#                         the filters, one at a time, into OUT/tests.log; prints their results
#                         (tests that read a model take $s: models/ is not carried)
#   gpu_same_text WHAT A B  says whether two greedy outputs are equal
#   llama_wait            waits for the build and says how it went
#   gpu_text_on_off WHAT TOKENS FLAG...  greedy text of $s and $m (TOKENS new tokens after
#                         $prompt) with each FLAG on, then off; says whether they are equal
pack=$(cd "${1:?pack folder}" && pwd)
out=${2:?output folder}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prompt=$(python3 -c "print(' '.join(f'Sentence {i} says that the number {i} is {i*i % 97}.' for i in range(60)))")
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
run() { bash "$here/scripts/on-device.sh" "$@"; }
gpu_start() {
  mkdir -p "$out" "$1" /tmp/gf/models
  tar xJf "$pack/bins.tar.xz" -C "$1"
  llama_build=
  if [ -f "$pack/llama-src.tar.xz" ] && [ "${PEER:-1}" != 0 ]; then
    bash "$here/scripts/build-llama-bench.sh" "$pack/llama-src.tar.xz" /tmp/gf \
      > "$out/llama-build.log" 2>&1 &
    llama_build=$!
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
gpu_models() {
  m=/tmp/gf/models/8b-q4_0.gguf
  s=/tmp/gf/models/smol-q8_0.gguf
  [ -f "$m" ] || run "$1/shard-node" synth-model --quant q4_0 --context 8192 \
    --tokenizer-from "$pack/tok.gguf" --out "$m" > /dev/null || exit 1
  [ -f "$s" ] || run "$1/shard-node" synth-model --layers 30 --hidden 576 --ffn 1536 --heads 9 \
    --kv-heads 3 --quant q8_0 --context 2048 --tokenizer-from "$pack/tok.gguf" --out "$s" \
    > /dev/null || exit 1
}
gpu_tests() {
  [ -x /tmp/gf/common-tests ] || { echo "no common-tests in the pack"; return 0; }
  LLMC_TEST_MODEL=$s run /tmp/gf/common-tests "$@" --test-threads 1 --nocapture \
    > "$out/tests.log" 2>&1
  grep -E "^test |test result|values differ|graphs:|start .* rows" "$out/tests.log" | tail -30
}
gpu_same_text() {
  if cmp -s "$2" "$3"; then
    echo "greedy text $1: equal"
  else
    echo "greedy text $1: DIFFERS"; head -c 300 "$2" "$3"
  fi
}
gpu_text_on_off() {
  local what=$1 tokens=$2 f v flags
  shift 2
  for f in "$s" "$m"; do
    for v in on off; do
      flags=()
      for flag in "$@"; do flags+=("$flag" "$v"); done
      run /tmp/gf/shard-node generate --model "$f" --device cuda:0 "${flags[@]}" \
        --prompt "$prompt" --max-tokens "$tokens" 2>/dev/null > "$out/gen-$(basename "$f")-$v.txt"
    done
    gpu_same_text "$(basename "$f"), $what on and off" "$out/gen-$(basename "$f")-"{on,off}.txt
  done
}
llama_wait() {
  if [ -n "$llama_build" ]; then
    wait "$llama_build"
    echo "llama.cpp build rc=$?"
  fi
}
# llama_bench ARGS...: llama.cpp's llama-bench (once built) on the GPU with ARGS, one line a
# test: prompt, generated tokens and depth, and tok/s of each repetition
llama_bench() {
  local lb=/tmp/gf/llama.cpp/build/bin/llama-bench
  [ -x "$lb" ] || return 0
  run "$lb" "$@" -ngl 99 -o jsonl 2>> "$out/llama-bench.log" | python3 -c "
import json, sys
for l in sys.stdin:
    if l.strip():
        j = json.loads(l)
        print('llama-bench prompt', j['n_prompt'], 'gen', j['n_gen'], 'depth', j.get('n_depth', 0),
              [round(x, 1) for x in j['samples_ts']], 'tok/s')
"
}
