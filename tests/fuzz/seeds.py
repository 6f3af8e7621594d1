#!/usr/bin/env python3
"""Writes small seed inputs for the fuzz targets into DIR/TARGET/ (scripts/fuzz.sh calls it).

A GGUF v3 file with a llama header and one tensor, JSON bodies of both endpoints, chat
templates in the common styles. The RPC target starts from an empty corpus: libFuzzer finds
bincode's shapes quickly."""
import json, os, struct, sys

def gguf():
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    kv = [("general.architecture", 8, s("llama")),
          ("llama.block_count", 4, struct.pack("<I", 1)),
          ("llama.embedding_length", 4, struct.pack("<I", 8)),
          ("llama.attention.head_count", 4, struct.pack("<I", 2)),
          ("tokenizer.ggml.model", 8, s("gpt2")),
          ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + s("a") + s("b") + s("ab")),
          ("tokenizer.chat_template", 8, s("{% for m in messages %}{{ m.content }}{% endfor %}"))]
    out = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv))
    for k, t, v in kv:
        out += s(k) + struct.pack("<I", t) + v
    out += s("token_embd.weight") + struct.pack("<IQQIQ", 2, 8, 3, 0, 0)
    out += b"\0" * ((32 - len(out) % 32) % 32)
    return out + struct.pack("<24f", *([0.5] * 24))

SEEDS = {
    "gguf": {"llama.gguf": gguf()},
    "http_body": {
        "completion.json": json.dumps({"prompt": "Hi", "max_tokens": 8, "temperature": 0.7,
                                       "top_p": 0.9, "stop": ["\n", "END"], "stream": True}).encode(),
        "chat.json": json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "2+2?"}],
                                 "max_tokens": 4, "seed": 3, "top_k": 5}).encode(),
    },
    "chat_template": {
        "chatml.j2": b"{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "llama.j2": b"{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
        "gemma.j2": b"{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}<start_of_turn>{{ role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    },
    "rpc_decode": {},
}

def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/seeds"
    for target, files in SEEDS.items():
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)

if __name__ == "__main__":
    main()
