#!/usr/bin/env python3
"""Regenerate tests/fixtures/llama_cpp_reference.json with llama.cpp (llama-cpp-python).

For each prompt: the exact prompt token ids llama.cpp makes (special tokens parsed, BOS as the
model asks), then greedy decode step by step, recording each chosen id and the top-2 logit
margin at that step. Chat prompts are rendered with the model's own template (jinja2, as
llama-cpp-python does), or, for a file without one (Gemma 3 270M), with llama.cpp's built-in
format for its architecture; the rendered text is stored so the Rust side can compare it.
The `tokenize` list holds llama.cpp's ids for strings that probe the tokenizer alone.

    pip install llama-cpp-python jinja2
    scripts/llama-reference.py [MODEL] [OUT]
    scripts/llama-reference.py models/gemma-3-270m-q4_k_m.gguf tests/fixtures/gemma3_reference.json
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


# Strings for the tokenizer alone: Unicode, runs of spaces and newlines, code, special tokens.
TOKENIZE = [
    "Hello world",
    " leading space",
    "two  spaces and   three",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nafter three newlines",
    "trailing spaces   ",
    "\n\n",
    "naïve café, Zürich, São Paulo",
    "日本語のテキストと中文文本",
    "Emoji: 🙂🚀👍🏽 and ❤️",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "{\"key\": [1, 2.5, -3e10], \"nested\": {\"a\": null}}",
    "https://example.com/path?q=1&r=two#frag",
    "1234567890 3.14159 1,000,000",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a bos",
    "unknown <unused0> token and <end_of_turn> inside",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "a" * 64,
    "    indented with four spaces",
]


def builtin_chat(llm, text):
    """llama.cpp's own turn format for the architecture, for a file without a template."""
    arch = llm.metadata["general.architecture"]
    name = {"gemma3": b"gemma", "gemma2": b"gemma", "gemma": b"gemma"}[arch]
    msgs = (llama_cpp.llama_chat_message * 1)()
    msgs[0].role = b"user"
    msgs[0].content = text.encode()
    buf = llama_cpp.ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(name, msgs, 1, True, buf, len(buf))
    assert 0 < n < len(buf), n
    return buf.raw[:n].decode()


def render_chat(llm, text):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    if template is None:
        return builtin_chat(llm, text)
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
    out["tokenize"] = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=add_bos, special=True)}
                       for t in TOKENIZE]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
