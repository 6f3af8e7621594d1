#!/usr/bin/env python3
"""Cluster benchmark on loopback: real shard-node and coordinator processes, driven over HTTP.

  python3 scripts/bench_cluster.py --bin-dir target/release --model models/X.gguf \
      [--threads 2] [--runs 3] [--tokens 128] [--streams 1,4,16] [--stages 1,2,3] \
      [--aggregate-stages 1] [--devices cpu | cuda:0,cuda:1,...]

All the clusters (one per stage count) start first. Then it measures single-stream decode
tok/s (time between the first and last streamed token, so prefill is excluded), --runs times
per stage count, going round the stage counts. For the stage counts in --aggregate-stages it
also measures aggregate tok/s with 1, 4 and 16 concurrent streams (completion tokens over
wall time), --runs times each, interleaved. Node i runs on device i mod len(--devices). Prints
JSON lines.
`ignore_eos` keeps every stream generating exactly --tokens tokens.
"""
import argparse, json, os, subprocess, sys, threading, time, urllib.error, urllib.request

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."


def spawn(cmd):
    err = open(os.path.join(os.environ.get("OUT", "/tmp"), os.path.basename(cmd[0]) + ".err"), "a")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                         env={**os.environ, "RUST_LOG": "warn"})
    for line in p.stdout:
        if line.startswith("listening on "):
            return p, line.split(" on ", 1)[1].strip()
    raise RuntimeError(f"{cmd[0]} did not start")


def post(url, body, stream):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def stream_times(url, tokens):
    """Streams one completion; returns (chunk arrival times, completion tokens)."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times = []
    with post(url + "/v1/completions", body, True) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev.get("error"):
                    raise RuntimeError(f"stream failed: {ev['error']}")
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.perf_counter())
    if len(times) < 2:
        raise RuntimeError(f"stream gave {len(times)} text chunks for {tokens} tokens")
    return times


def complete(url, tokens, out, i):
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    try:
        with post(url + "/v1/completions", body, False) as r:
            out[i] = json.loads(r.read())["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        out[i] = 0
        print(json.dumps({"error": e.code, "body": e.read().decode()[:500]}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--aggregate-stages", default="1",
                    help="comma-separated stage counts at which to measure aggregate tok/s")
    ap.add_argument("--devices", default="cpu",
                    help="comma-separated; node i runs on device i mod len (e.g. cuda:0,cuda:1)")
    a = ap.parse_args()
    devices = a.devices.split(",")
    shard = os.path.join(a.bin_dir, "shard-node")
    coord = os.path.join(a.bin_dir, "coordinator")
    models_dir = os.path.dirname(os.path.abspath(a.model))
    stage_counts = [int(s) for s in a.stages.split(",")]
    procs = []

    def start(stages):
        addrs = []
        for i in range(stages):
            p, addr = spawn([shard, "serve", "--listen", "127.0.0.1:0", "--threads",
                             str(a.threads), "--models-dir", models_dir,
                             "--device", devices[i % len(devices)]])
            procs.append(p)
            addrs.append(addr)
        p, http = spawn([coord, "serve", "--http", "127.0.0.1:0", "--max-ctx", "2048",
                         "--model", a.model, "--nodes", ",".join(addrs)])
        procs.append(p)
        url = "http://" + http
        stream_times(url, 16)  # warm-up
        return url

    try:
        # Every cluster is up before any is timed (an idle node's threads sleep), and the
        # decode runs go round the stage counts (1, 2, 3, 1, 2, 3, ...), so a slow spell of
        # the machine does not land on one stage count only.
        urls = {n: start(n) for n in stage_counts}
        rates = {n: [] for n in stage_counts}
        for _ in range(a.runs):
            for n in stage_counts:
                t = stream_times(urls[n], a.tokens)
                rates[n].append((len(t) - 1) / (t[-1] - t[0]))
        base = sum(rates[stage_counts[0]]) / a.runs
        for n in stage_counts:
            mean = sum(rates[n]) / a.runs
            print(json.dumps({"bench": "decode", "stages": n, "threads": a.threads,
                              "devices": devices[:n], "tokens": a.tokens, "tok_s": rates[n],
                              "mean": mean, f"vs_{stage_counts[0]}_stages": mean / base}),
                  flush=True)
        for stages in [int(x) for x in a.aggregate_stages.split(",")]:
            url = urls.get(stages) or start(stages)
            # Each stream count --runs times, interleaved (1, 4, 16, 1, 4, 16, ...).
            counts = [int(s) for s in a.streams.split(",")]
            agg = {n: [] for n in counts}
            for _ in range(a.runs):
                for n in counts:
                    out = [0] * n
                    th = [threading.Thread(target=complete, args=(url, a.tokens, out, i))
                          for i in range(n)]
                    t0 = time.perf_counter()
                    for x in th:
                        x.start()
                    for x in th:
                        x.join()
                    agg[n].append(sum(out) / (time.perf_counter() - t0))
            for n in counts:
                mean = sum(agg[n]) / len(agg[n])
                base = sum(agg[counts[0]]) / len(agg[counts[0]])
                print(json.dumps({"bench": "aggregate", "streams": n, "stages": stages,
                                  "threads": a.threads, "tokens_per_stream": a.tokens,
                                  "tok_s": agg[n], "mean": mean,
                                  f"vs_{counts[0]}_stream": mean / base}), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
