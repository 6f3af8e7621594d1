#!/usr/bin/env python3
"""Regenerate tests/fixtures/synth_llama_cpp.json: llama.cpp's greedy ids on small random
models of every supported architecture and weight type, written by `shard-node synth-model`.

For each case the script writes the model with our binary, records its sha256 (the test
checks that the same command still writes the same bytes), and lets llama.cpp (through
llama-cpp-python, CPU) prefill the prompt and pick 12 tokens greedily, with the top-2 logit
margin of each pick, and the logits after the prompt at a fixed set of ids (the top 16 and
every 997th): random models have flat logits, so the test compares values, not only picks.
The gemma3 case uses a window of 8 and a prompt longer than the window
and than a window layer's ring, so sliding-window attention and the ring are both exercised.

    pip install llama-cpp-python
    cargo build --profile ci -p shard-node
    scripts/synth-reference.py [--bin target/ci/shard-node]
"""
import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import llama_cpp
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/synth_llama_cpp.json"
SMOL = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = ROOT / "models/gemma-3-270m-q4_k_m.gguf"
GEN = 12

SHORT = "The capital of France is"
# Longer than the window (8) and than a local layer's ring (8 - 1 + 256 rows).
LONG = " ".join(f"item {i} is {i * 7 % 13}." for i in range(60))

SMALL = ["--layers", "2", "--hidden", "128", "--ffn", "256", "--heads", "4", "--kv-heads", "2"]
K_SHAPE = ["--layers", "2", "--hidden", "256", "--ffn", "512", "--heads", "4", "--kv-heads", "2"]

# name -> (synth-model arguments, tokenizer file, prompt)
CASES = {
    "llama-q4_0": (["--arch", "llama", "--quant", "q4_0", *SMALL], SMOL, SHORT),
    "llama-q4_1": (["--arch", "llama", "--quant", "q4_1", *SMALL], SMOL, SHORT),
    "llama-q5_0": (["--arch", "llama", "--quant", "q5_0", *SMALL], SMOL, SHORT),
    "llama-q5_1": (["--arch", "llama", "--quant", "q5_1", *SMALL], SMOL, SHORT),
    "llama-q8_0": (["--arch", "llama", "--quant", "q8_0", *SMALL], SMOL, SHORT),
    "llama-f16": (["--arch", "llama", "--quant", "f16", *SMALL], SMOL, SHORT),
    "llama-q4_k_m": (["--arch", "llama", "--quant", "q4_k_m", *K_SHAPE], SMOL, SHORT),
    "llama-q5_k_m": (["--arch", "llama", "--quant", "q5_k_m", *K_SHAPE], SMOL, SHORT),
    "llama-q6_k": (["--arch", "llama", "--quant", "q6_k", *K_SHAPE], SMOL, SHORT),
    "llama3-rope-freqs": (["--arch", "llama", "--quant", "q8_0", "--rope-freqs", *SMALL], SMOL, LONG),
    "qwen2-q8_0": (["--arch", "qwen2", "--quant", "q8_0", *SMALL], SMOL, SHORT),
    "qwen3-q4_k_m": (["--arch", "qwen3", "--quant", "q4_k_m", *K_SHAPE], SMOL, SHORT),
    "gemma3-q4_k_m": (
        ["--arch", "gemma3", "--quant", "q4_k_m", "--layers", "7", "--hidden", "256", "--ffn", "512",
         "--heads", "4", "--kv-heads", "1", "--sliding-window", "8"],
        GEMMA,
        LONG,
    ),
}


def greedy(path, prompt):
    llm = Llama(str(path), n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False)
    vocab = llm._model.vocab
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    ids = llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    probe = sorted(set(np.argsort(-first, kind="stable")[:16].tolist()) | set(range(0, len(first), 997)))
    probes = {"ids": probe, "logits": [round(float(first[i]), 5) for i in probe],
              "scale": round(float(np.abs(first).max()), 5)}
    gen, margins = [], []
    for _ in range(GEN):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top2 = np.argsort(-logits, kind="stable")[:2]
        gen.append(int(top2[0]))
        margins.append(round(float(logits[top2[0]] - logits[top2[1]]), 4))
        llm.eval([int(top2[0])])
    return ids, gen, margins, probes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/ci/shard-node"))
    ap.add_argument("--only", nargs="*", help="case names to regenerate (others kept)")
    a = ap.parse_args()
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    cases = old.get("cases", {}) if a.only else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (args, tokenizer, prompt) in CASES.items():
            if a.only and name not in a.only:
                continue
            path = Path(tmp) / f"{name}.gguf"
            cmd = [a.bin, "synth-model", *args, "--seed", "7", "--context", "1024",
                   "--tokenizer-from", str(tokenizer), "--out", str(path)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            ids, gen, margins, probes = greedy(path, prompt)
            cases[name] = {"args": args, "tokenizer": tokenizer.name, "long_prompt": prompt == LONG,
                           "sha256": digest, "prompt_ids": ids, "ids": gen, "margins": margins,
                           "probes": probes}
            print(f"{name}: {len(ids)} prompt ids, min margin {min(margins):.3f}, "
                  f"largest logit {probes['scale']}", file=sys.stderr)
    out = {
        "made_by": f"scripts/synth-reference.py, llama-cpp-python {llama_cpp.__version__} (CPU), "
                   f"greedy, {GEN} tokens, seed 7, context 1024",
        "prompts": {"short": SHORT, "long": LONG},
        "cases": cases,
    }
    # One line per case: the id lists are long.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(out["cases"].items())]
    head = json.dumps({k: v for k, v in out.items() if k != "cases"}, indent=1)[:-2]
    OUT.write_text(head + ',\n "cases": {\n' + ",\n".join(lines) + "\n }\n}\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
