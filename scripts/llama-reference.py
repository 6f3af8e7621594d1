#!/usr/bin/env python3
"""Regenerate tests/fixtures/llama_cpp_reference.json with llama.cpp (llama-cpp-python).

For each prompt: the exact prompt token ids llama.cpp makes (special tokens parsed, BOS as the
model asks), then greedy decode step by step, recording each chosen id and the top-2 logit
margin at that step. Chat prompts are rendered with the model's own template (jinja2, as
llama-cpp-python does), and the rendered text is stored so the Rust side can compare it.

    pip install llama-cpp-python jinja2
    scripts/llama-reference.py [MODEL] [OUT]
"""
import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tests/fixtures/llama_cpp_reference.json"
MAX_TOKENS = 32

CASES = [
    {"prompt": "The capital of France is", "chat": False},
    {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "chat": False},
    {"prompt": "Once upon a time, in a small village by the sea, there lived", "chat": False},
    {"prompt": "1, 2, 3, 4, 5, 6,", "chat": False},
    {"prompt": "Les trois couleurs du drapeau français sont", "chat": False},
    {"prompt": "Photosynthesis is the process by which plants", "chat": False},
    {"prompt": "What is the boiling point of water in Celsius?", "chat": True},
    {"prompt": "Write a haiku about autumn leaves.", "chat": True},
    {"prompt": "Give me three tips for learning a new language.", "chat": True},
]


def render_chat(llm, text):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    meta = llm.metadata
    template = meta["tokenizer.chat_template"]
    vocab = llm._model.vocab

    def tok_text(key):
        i = meta.get(key)
        return llm.detokenize([int(i)], special=True).decode() if i is not None else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": text}],
        add_generation_prompt=True,
        bos_token=tok_text("tokenizer.ggml.bos_token_id"),
        eos_token=tok_text("tokenizer.ggml.eos_token_id"),
    )


def main():
    llm = Llama(str(MODEL), n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False)
    vocab = llm._model.vocab
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    out = {"model": MODEL.name, "llama_cpp_python": llama_cpp.__version__, "max_tokens": MAX_TOKENS,
           "eog_ids": eog, "cases": []}
    for case in CASES:
        text = render_chat(llm, case["prompt"]) if case["chat"] else case["prompt"]
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        llm.reset()
        llm.eval(ids)
        gen, margins = [], []
        for _ in range(MAX_TOKENS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top2 = np.argsort(-logits, kind="stable")[:2]
            tok = int(top2[0])
            gen.append(tok)
            margins.append(float(logits[top2[0]] - logits[top2[1]]))
            if tok in eog:
                break
            llm.eval([tok])
        out["cases"].append({**case, "rendered": text, "prompt_ids": ids, "generated_ids": gen,
                             "margins": [round(m, 4) for m in margins],
                             "text": llm.detokenize([t for t in gen if t not in eog]).decode("utf-8", "replace")})
        print(f"{case['prompt'][:40]!r}: {len(ids)} prompt ids, {len(gen)} generated, "
              f"min margin {min(margins):.3f}", file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
