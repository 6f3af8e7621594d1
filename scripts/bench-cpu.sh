#!/usr/bin/env bash
# CPU benchmark: the stage runtime against llama.cpp, same file, same machine, same run.
#   scripts/bench-cpu.sh [THREADS] [RUNS] [MODEL]
#   scripts/bench-cpu.sh 2 3 gemma3      # Gemma 3 270M Q4_K_M (fetched if missing)
# MODEL: a GGUF path (SPLIT=N sets the two-stage cut), or `gemma3`; the default model when
# left out.
# Needs: `pip install llama-cpp-python`. SHARD_NODE=path skips the release build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
threads=${1:-2}
runs=${2:-3}
case "${3:-}" in
  "") model=$(scripts/fetch-model.sh 2>/dev/null); split=15 ;;
  gemma3) model=$(scripts/fetch-model.sh gemma3 2>/dev/null); split=9 ;;
  *) model=$3; split=${SPLIT:-1} ;;
esac
if [ -n "${SHARD_NODE:-}" ]; then
  bin=$SHARD_NODE
else
  cargo build --release -q -p shard-node
  bin=${CARGO_TARGET_DIR:-$root/target}/release/shard-node
fi
text=$(mktemp)
trap 'rm -f "$text"' EXIT
# the exact text `shard-node bench` uses
sed -n '/pub const BENCH_TEXT/,/";/p' shard-node/src/bench_cmd.rs \
  | sed -e 's/^pub const BENCH_TEXT: &str = "//' -e 's/\\$//' -e 's/";$//' | tr -d '\n' > "$text"
echo "# $(date -u +%F) $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads" >&2
python3 scripts/bench_llama_cpp.py "$model" "$text" 128 128 "$threads" "$runs"
"$bin" bench --model "$model" --prompt-tokens 128 --gen-tokens 128 --threads "$threads" --runs "$runs"
"$bin" bench --model "$model" --prompt-tokens 128 --gen-tokens 128 --threads "$threads" --runs "$runs" --split "$split"
