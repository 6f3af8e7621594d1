#!/usr/bin/env bash
# The whole test suite, on a fresh machine: fetch the default model, then build and run every
# test in the `ci` profile (release optimizations without LTO: the model tests need real
# speed, and LTO linking of every test binary took most of the time). CI calls this through
# .ci/run.
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v cargo >/dev/null || { echo "test: cargo is needed (https://rustup.rs)" >&2; exit 1; }
scripts/fetch-model.sh >/dev/null
# Gemma 3 270M, the second real model (tests/tests/gemma3.rs, synthetic gemma models' tokenizer)
scripts/fetch-model.sh gemma3 >/dev/null
# etcd (the 2PC tests start a real one) and protoc (etcd-client's build compiles its protos)
scripts/setup.sh
# the official OpenAI client, which tests/tests/openai_client.rs drives, and jsonschema, which
# checks its structured outputs
python3 -c 'import openai, jsonschema' 2>/dev/null || python3 -m pip install --quiet openai jsonschema \
  || { echo "test: could not install the python openai and jsonschema packages" >&2; exit 1; }
# the cross-process tests start the real binaries: build them first (`cargo test` alone
# builds only the binaries of packages that have their own integration tests)
cargo build --profile ci --workspace --bins
cargo test --profile ci --workspace "$@"
