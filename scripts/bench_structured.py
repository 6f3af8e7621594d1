#!/usr/bin/env python3
"""Constrained decoding against unconstrained, same cluster, same run.

  python3 scripts/bench_structured.py --bin-dir target/release --model models/X.gguf \
      [--stages 1] [--threads 2] [--runs 5] [--tokens 200]

Starts a cluster of --stages shard nodes and a coordinator on loopback, then streams the
same chat request with a `json_schema` response_format (a list of records: strings, an
integer range, an enum) and without one, alternating, --runs times each. Decode tok/s is
(completion tokens - 1) over the time from the first streamed chunk to the last, so the
prompt's pass is excluded; the unconstrained run generates --tokens tokens (`ignore_eos`),
the constrained one until its grammar is complete or --tokens. Prints one JSON line per
mode and the ratio.
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import post, spawn  # noqa: E402

PROMPT = "List people with their city, age and role, as JSON."
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "minItems": 12, "maxItems": 12,
          "items": {"type": "object", "properties": {
              "name": {"type": "string", "maxLength": 24},
              "city": {"type": "string", "maxLength": 24},
              "age": {"type": "integer", "minimum": 18, "maximum": 99},
              "role": {"enum": ["engineer", "doctor", "teacher", "artist", "other"]}},
              "required": ["name", "city", "age", "role"], "additionalProperties": False}}},
          "required": ["people"], "additionalProperties": False}


def run(url, tokens, constrained):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "people", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    times, used, text = [], None, []
    with post(url + "/v1/chat/completions", body, True) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                used = ev["usage"]["completion_tokens"]
            if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                text.append(ev["choices"][0]["delta"]["content"])
    if constrained:
        json.loads("".join(text)) if used < tokens else None  # a finished answer parses
    return (used - 1) / (times[-1] - times[0]), used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    a = ap.parse_args()
    models = os.path.dirname(os.path.abspath(a.model))
    procs, addrs = [], []
    try:
        for _ in range(a.stages):
            p, addr = spawn([os.path.join(a.bin_dir, "shard-node"), "serve", "--listen",
                             "127.0.0.1:0", "--threads", str(a.threads), "--models-dir", models,
                             "--metrics-listen", "127.0.0.1:0"])
            procs.append(p)
            addrs.append(addr)
        p, http = spawn([os.path.join(a.bin_dir, "coordinator"), "serve", "--http", "127.0.0.1:0",
                         "--max-ctx", "2048", "--model", a.model, "--nodes", ",".join(addrs)])
        procs.append(p)
        url = "http://" + http
        run(url, 16, True)  # warm-up: builds the grammar compilers
        run(url, 16, False)
        rates = {True: [], False: []}
        tokens = {True: [], False: []}
        for _ in range(a.runs):
            for c in (False, True):
                r, n = run(url, a.tokens, c)
                rates[c].append(r)
                tokens[c].append(n)
        mean = {c: sum(v) / len(v) for c, v in rates.items()}
        for c in (False, True):
            print(json.dumps({"bench": "structured", "constrained": c, "stages": a.stages,
                              "threads": a.threads, "tok_s": rates[c], "mean": mean[c],
                              "tokens": tokens[c]}), flush=True)
        print(json.dumps({"bench": "structured", "ratio": mean[True] / mean[False]}), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
