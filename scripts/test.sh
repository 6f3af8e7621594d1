#!/usr/bin/env bash
# The whole test suite, on a fresh machine: fetch the default model, then build and run every
# test in release mode (model tests need real speed). CI calls this through .ci/run.
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v cargo >/dev/null || { echo "test: cargo is needed (https://rustup.rs)" >&2; exit 1; }
scripts/fetch-model.sh >/dev/null
cargo test --release --workspace "$@"
