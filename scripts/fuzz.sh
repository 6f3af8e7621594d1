#!/usr/bin/env bash
# Runs every fuzz target (cargo-fuzz, libFuzzer, nightly) for MINUTES each (default 10):
#   scripts/fuzz.sh [MINUTES]            all targets
#   TARGETS="gguf chat_template" scripts/fuzz.sh 2
# Targets (tests/fuzz/fuzz_targets/): gguf, rpc_decode, http_body, chat_template. Corpora
# grow under tests/fuzz/corpus/TARGET (seeded from tests/fuzz/seeds/TARGET), crashes land
# in tests/fuzz/artifacts/TARGET; both are ignored by git. A crash found is fixed and its
# input kept as a regular unit test. Prints one summary line per target at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
minutes=${1:-10}
case "$minutes" in ''|*[!0-9]*) echo "fuzz: MINUTES must be a whole number" >&2; exit 2;; esac
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=${TARGETS:-"gguf rpc_decode http_body chat_template"}
python3 tests/fuzz/seeds.py tests/fuzz/seeds
summary=()
for t in $targets; do
  corpus=tests/fuzz/corpus/$t
  mkdir -p "$corpus" "tests/fuzz/artifacts/$t"
  cp -n tests/fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  echo "fuzz: $t for $minutes min"
  log=$(mktemp)
  # -rss_limit_mb: a target that allocates without bound fails; -timeout: one that hangs
  if cargo +nightly fuzz run --fuzz-dir tests/fuzz "$t" "$corpus" -- \
      -max_total_time=$((minutes * 60)) -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
      -print_final_stats=1 2>&1 | tee "$log" | grep -E '^(#[0-9]+[[:space:]]+(pulse|DONE)|==|SUMMARY|artifact_prefix|Test unit written)'; then
    :
  fi
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)
  crashes=$(ls "tests/fuzz/artifacts/$t" | wc -l)
  summary+=("$t: ${execs:-?} executions (a run stops at its first crash; at most $minutes min), $crashes crash inputs in tests/fuzz/artifacts/$t")
  rm -f "$log"
done
printf 'fuzz: %s\n' "${summary[@]}"
