#!/usr/bin/env bash
# What a burst of sessions leaves resident in a shard node once its client is gone.
#   scripts/memory-burst.sh [extra shard-node serve flags, e.g. --no-malloc-trim]
# One node, one coordinator; 8 concurrent 400-token streams for 4 s; kill -9 the coordinator;
# print the node's resident set before, during and 2.5 s after.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${BIN_DIR:-target/release}
model=$(scripts/fetch-model.sh 2>/dev/null)
rss() { awk '/^Rss:/{print $2 " kB"}' "/proc/$1/smaps_rollup"; }
"$bin/shard-node" serve --listen 127.0.0.1:0 --threads 1 --models-dir "$(dirname "$model")" "$@" \
  > /tmp/mb-node.out 2>/dev/null &
node=$!
trap 'kill $node 2>/dev/null || true' EXIT
until grep -q listening /tmp/mb-node.out; do sleep 0.1; done
addr=$(sed -n 's/^listening on //p' /tmp/mb-node.out)
echo "idle:   $(rss $node)"
"$bin/coordinator" serve --http 127.0.0.1:0 --model "$model" --nodes "$addr" > /tmp/mb-coord.out 2>/dev/null &
coord=$!
until grep -q listening /tmp/mb-coord.out; do sleep 0.1; done
http=$(sed -n 's/^listening on //p' /tmp/mb-coord.out)
for _ in $(seq 8); do
  curl -sN -m 20 "http://$http/v1/completions" -H 'content-type: application/json' \
    -d '{"prompt":"Count: 1, 2,","max_tokens":400,"stream":true,"ignore_eos":true}' >/dev/null &
done
sleep 4
echo "busy:   $(rss $node)"
kill -9 $coord
sleep 2.5
echo "after:  $(rss $node)"
