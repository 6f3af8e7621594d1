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
pack=$(cd "${1:?pack folder}" && pwd)
out=${2:?output folder}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" /tmp/gf/models
run() { bash "$here/scripts/on-device.sh" "$@"; }
tar xJf "$pack/bins.tar.xz" -C /tmp/gf
# llama.cpp's llama-bench, the peer, built in the background while ours runs
llama_build=
if [ -f "$pack/llama-src.tar.xz" ] && [ "${PEER:-1}" != 0 ]; then
  bash "$here/scripts/build-llama-bench.sh" "$pack/llama-src.tar.xz" /tmp/gf \
    > "$out/llama-build.log" 2>&1 &
  llama_build=$!
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -x /tmp/gf/common-tests ]; then
  run /tmp/gf/common-tests cuda::prefill_attention cuda::gate_mul --nocapture --test-threads 1 2>&1 | tail -12
fi
m=/tmp/gf/models/8b-q4_0.gguf
s=/tmp/gf/models/smol-q8_0.gguf
[ -f "$m" ] || run /tmp/gf/shard-node synth-model --quant q4_0 --context 8192 \
  --tokenizer-from "$pack/tok.gguf" --out "$m" > /dev/null || exit 1
[ -f "$s" ] || run /tmp/gf/shard-node synth-model --layers 30 --hidden 576 --ffn 1536 --heads 9 \
  --kv-heads 3 --quant q8_0 --context 2048 --tokenizer-from "$pack/tok.gguf" --out "$s" \
  > /dev/null || exit 1
prompt=$(python3 -c "print(' '.join(f'Sentence {i} says that the number {i} is {i*i % 97}.' for i in range(60)))")
for f in "$s" "$m"; do
  for p in on off; do
    run /tmp/gf/shard-node generate --model "$f" --device cuda:0 --cuda-prefill $p --cuda-gate $p \
      --prompt "$prompt" --max-tokens 32 2>/dev/null > "$out/gen-$(basename "$f")-$p.txt"
  done
  if cmp -s "$out/gen-$(basename "$f")-on.txt" "$out/gen-$(basename "$f")-off.txt"; then
    echo "greedy text $(basename "$f"): equal with the kernel on and off"
  else
    echo "greedy text $(basename "$f"): DIFFERS"; head -c 400 "$out/gen-$(basename "$f")-"{on,off}.txt
  fi
done
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
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [ "${PROFILE:-1}" != 0 ] && [ -n "$ncu" ]; then
  run "$ncu" --metrics gpu__time_duration.sum --csv --launch-count ${NCU_KERNELS:-4000} \
    /tmp/gf/shard-node bench --model "$m" --device cuda:0 --cuda-gate on --prompt-tokens 512 --gen-tokens 1 \
    --runs 1 > "$out/ncu-512.csv" 2> "$out/ncu-512.log"
  python3 - "$out/ncu-512.csv" <<'PY'
import csv, io, sys
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
per = {}
for r in csv.DictReader(io.StringIO("".join(rows))):
    try:
        v = float(r.get("Metric Value", "0").replace(",", ""))
    except ValueError:
        continue
    ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(r.get("Metric Unit", ""), 1)
    name = r.get("Kernel Name", "?")[:100]
    c, t = per.get(name, (0, 0.0))
    per[name] = (c + 1, t + ns)
tot = sum(t for _, t in per.values())
print(f"prompt 512 under ncu: {sum(c for c, _ in per.values())} kernels, {tot/1e6:.1f} ms")
for k, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:18]:
    print(f"  {t/1e6:8.2f} ms {c:6d}x  {k}")
PY
fi
if [ -n "$llama_build" ]; then
  wait "$llama_build"
  echo "llama.cpp build rc=$?"
  lb=/tmp/gf/llama.cpp/build/bin/llama-bench
  [ -x "$lb" ] && run "$lb" -m "$m" -p 512,4096 -n 0 -r 2 -ngl 99 -o jsonl \
    2>> "$out/llama-bench.log" | python3 -c "
import json, sys
for l in sys.stdin:
    if l.strip():
        j = json.loads(l)
        print('llama-bench prompt', j['n_prompt'], [round(x, 1) for x in j['samples_ts']], 'tok/s')
"
fi
