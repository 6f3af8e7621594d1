#!/usr/bin/env python3
"""Time llama.cpp (llama-cpp-python) exactly as `shard-node bench` times our runtime:
the same text, its first N ids as the prompt (one batch), then N greedy single-token evals.
Prints one JSON line per run.

    scripts/bench_llama_cpp.py MODEL TEXT_FILE [PROMPT_TOKENS] [GEN_TOKENS] [THREADS] [RUNS]
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama

model, text_file = sys.argv[1], sys.argv[2]
n_prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 128
n_gen = int(sys.argv[4]) if len(sys.argv) > 4 else 128
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
runs = int(sys.argv[6]) if len(sys.argv) > 6 else 3

text = open(text_file, encoding="utf-8").read()
llm = Llama(model, n_ctx=n_prompt + n_gen + 16, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=True)
while len(ids) < n_prompt:
    ids += llm.tokenize(text.encode(), add_bos=False, special=True)
ids = ids[:n_prompt]

llm.reset(); llm.eval(ids[:16]); llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])  # warm-up
for run in range(runs):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(n_gen):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    decode = time.perf_counter() - t1
    print(json.dumps({"engine": "llama.cpp", "run": run, "threads": threads, "prompt_tokens": len(ids),
                      "prompt_tok_s": round(len(ids) / prefill, 2), "gen_tokens": n_gen,
                      "decode_tok_s": round(n_gen / decode, 2)}), flush=True)
