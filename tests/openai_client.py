#!/usr/bin/env python3
"""Drive the coordinator with the official `openai` client; print JSON results for the Rust
test (tests/tests/openai_client.rs) to check. Usage: openai_client.py BASE_URL"""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model="m", prompt="The capital of France is", max_tokens=12,
                                       temperature=0, stream=True))
plain = client.completions.create(model="m", prompt="The capital of France is", max_tokens=12, temperature=0)
chat = "".join(
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is 2+2?"}],
                                            max_tokens=16, temperature=0, stream=True))
try:
    client.completions.create(model="m", prompt="x", max_tokens=100000)
    bad = None
except Exception as e:  # openai.BadRequestError
    bad = getattr(e, "status_code", None)
print(json.dumps({"streamed": streamed, "plain": plain.choices[0].text,
                  "usage": plain.usage.completion_tokens, "chat": chat, "bad_status": bad}))
