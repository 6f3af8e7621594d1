#!/usr/bin/env python3
"""Time to the first token of a long prompt, computed in full and with its prefix reused:
ours (a 2-node CPU cluster, the prefix cache on) against llama.cpp (llama-cpp-python in one
process, which reuses the common prefix of the prompt it evaluated last), in the same run.

    python3 scripts/bench_prefix.py --bin-dir target/release --model MODEL [--runs 3]
        [--prefix-tokens 1000] [--threads 2] [--device cpu | cuda:0] [--no-peer]

Each run takes a prefix of its own (about PREFIX_TOKENS tokens) and asks two questions
after it, with one new token each: the first computes the whole prompt ("cold"), the second
shares the prefix ("warm"). Then the second prompt's 16 greedy tokens, from the cache, are
checked against a coordinator without one on the same nodes ("same_output"). One JSON line
per engine and run; llama.cpp's only when `llama_cpp` imports.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import spawn  # noqa: E402


def prefix(tag, tokens):
    # about 25 tokens a sentence with the default tokenizers
    s = f"Notes {tag}. "
    for i in range(max(1, tokens // 25)):
        s += f"Item {i} of list {tag}: the quick brown fox jumps over the lazy dog near river {i}. "
    return s


QUESTIONS = ["Question: which animal jumps?", "Question: which river is named last?"]


def ours(a, runs):
    models_dir = os.path.dirname(os.path.abspath(a.model))
    procs, addrs = [], []
    try:
        for _ in range(a.nodes):
            p, addr = spawn([os.path.join(a.bin_dir, "shard-node"), "serve", "--listen",
                             "127.0.0.1:0", "--threads", str(a.threads), "--models-dir",
                             models_dir, "--device", a.device])
            procs.append(p)
            addrs.append(addr)
        p, http = spawn([os.path.join(a.bin_dir, "coordinator"), "serve", "--http",
                         "127.0.0.1:0", "--max-ctx", "8192", "--model", a.model, "--nodes",
                         ",".join(addrs)] + (["--prefix-cache-bytes", str(a.cache_bytes)]
                                             if a.cache_bytes is not None else []))
        procs.append(p)
        url = f"http://{http}/v1/completions"
        p, plain = spawn([os.path.join(a.bin_dir, "coordinator"), "serve", "--http",
                          "127.0.0.1:0", "--max-ctx", "8192", "--model", a.model, "--nodes",
                          ",".join(addrs), "--prefix-cache-bytes", "0"])
        procs.append(p)
        plain = f"http://{plain}/v1/completions"

        def ask(prompt, n=1, at=url):
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
            req = urllib.request.Request(at, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                out = json.loads(r.read())
            return time.perf_counter() - t, out["usage"], out["choices"][0]["text"]

        ask("Warm up.")
        for run in range(runs):
            p = prefix(f"ours-{run}", a.prefix_tokens)
            cold, u, _ = ask(p + QUESTIONS[0])
            time.sleep(0.5)  # the entry is kept once the answer is out
            warm, w, _ = ask(p + QUESTIONS[1])
            time.sleep(0.5)
            _, c, cached_text = ask(p + QUESTIONS[1], 16)
            _, _, full_text = ask(p + QUESTIONS[1], 16, plain)
            print(json.dumps({"engine": f"ours, {a.nodes} node(s) on {a.device}", "run": run,
                              "prompt_tokens": u["prompt_tokens"],
                              "cold_s": round(cold, 4), "warm_s": round(warm, 4),
                              "cached_tokens": w["prompt_tokens_details"]["cached_tokens"],
                              "speedup": round(cold / warm, 1),
                              "same_output": cached_text == full_text,
                              "checked_with_cached": c["prompt_tokens_details"]["cached_tokens"]}),
                  flush=True)
    finally:
        for p in procs:
            p.kill()


def peer(a, runs):
    try:
        from llama_cpp import Llama
    except ImportError:
        print(json.dumps({"engine": "llama.cpp", "skipped": "llama_cpp does not import"}))
        return
    llm = Llama(a.model, n_ctx=8192, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=512, verbose=False, n_gpu_layers=0 if a.device == "cpu" else -1)
    llm.create_completion("Warm up.", max_tokens=1, temperature=0)
    for run in range(runs):
        p = prefix(f"peer-{run}", a.prefix_tokens)
        llm.reset()
        t = time.perf_counter()
        llm.create_completion(p + QUESTIONS[0], max_tokens=1, temperature=0)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        llm.create_completion(p + QUESTIONS[1], max_tokens=1, temperature=0)
        warm = time.perf_counter() - t
        n = len(llm.tokenize((p + QUESTIONS[0]).encode()))
        print(json.dumps({"engine": "llama.cpp (llama-cpp-python, one process)", "run": run,
                          "prompt_tokens": n, "cold_s": round(cold, 4),
                          "warm_s": round(warm, 4), "speedup": round(cold / warm, 1)}),
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--cache-bytes", type=int, default=None,
                    help="the coordinator's --prefix-cache-bytes (default: its own default)")
    a = ap.parse_args()
    ours(a, a.runs)
    if not a.no_peer:
        peer(a, a.runs)


if __name__ == "__main__":
    sys.exit(main())
