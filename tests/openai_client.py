#!/usr/bin/env python3
"""Drive the coordinator with the official `openai` client; print JSON results for the Rust
test (tests/tests/openai_client.rs) to check. Usage: openai_client.py BASE_URL"""
import json
import sys
import urllib.request

import jsonschema
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
MODEL = client.models.list().data[0].id  # requests name the served model
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                       temperature=0, stream=True))
plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
chat = "".join(
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                            max_tokens=16, temperature=0, stream=True))
try:
    client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    bad = None
except Exception as e:  # openai.BadRequestError
    bad = getattr(e, "status_code", None)
# content as an array of text parts, as frameworks send it: the same answer as the string
parts = client.chat.completions.create(
    model=MODEL, max_tokens=16, temperature=0,
    messages=[{"role": "user", "content": [{"type": "text", "text": "What is "},
                                           {"type": "text", "text": "2+2?"}]}])
# a field this server does not implement yet is refused by name, not ignored
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                   functions=[{"name": "f", "parameters": {"type": "object"}}])
    refused = None
except Exception as e:
    refused = [getattr(e, "status_code", None), str(e)]
# n choices: reproducible with a seed, different from each other; several prompts, one
# choice each (index order); echo; a suffix on a model without fill-in-the-middle tokens
def texts(r):
    return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
sampled = [texts(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                           temperature=1.0, seed=42, n=3)) for _ in range(2)]
prompts = texts(client.completions.create(model=MODEL, prompt=["The capital of France is", "One plus one is"],
                                          max_tokens=12, temperature=0))
streamed_n = {}
for c in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                   n=2, stream=True):
    for ch in c.choices:
        streamed_n[ch.index] = streamed_n.get(ch.index, "") + ch.text
echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                   echo=True).choices[0].text
try:
    client.completions.create(model=MODEL, prompt="def f(", suffix="return x", max_tokens=4)
    suffix = None
except Exception as e:
    suffix = [getattr(e, "status_code", None), str(e)]
# tools on a model whose template shows no tools (SmolLM2's): 400 saying so
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                   tools=[{"type": "function", "function": {"name": "f"}}])
    no_tools = None
except Exception as e:
    no_tools = [getattr(e, "status_code", None), str(e)]
# best_of: the n of best_of candidates whose tokens are likeliest on average; the candidates
# are the n=4 choices of the same seed, ranked here from their log-probabilities
cand = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                 seed=7, n=4, logprobs=0)
ranked = sorted(((sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs), c.text)
                 for c in sorted(cand.choices, key=lambda c: c.index)), key=lambda x: -x[0])
r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                              seed=7, n=2, best_of=4)
best_of = {"want": [t for _, t in ranked[:2]], "got": texts(r),
           "no_logprobs": all(c.logprobs is None for c in r.choices), "usage": r.usage.completion_tokens}
served = client.models.list().data[0].id
retrieved = client.models.retrieve(served).id
try:
    client.models.retrieve("no-such-model")
    missing = None
except Exception as e:  # openai.NotFoundError
    missing = [getattr(e, "status_code", None), getattr(e, "code", None)]


def post(path, body):
    req = urllib.request.Request(sys.argv[1] + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


# /tokenize then /detokenize gives each string back (the BOS the model adds aside)
strings = ["Hello world", " leading space", "two  spaces", "tabs\tand\ttabs", "a\nb\n\nc",
           "naïve café", "日本語のテキスト", "emoji 🙂🚀", "Привет", "مرحبا", "def f(x):\n    return x",
           "{\"k\": [1, 2]}", "https://example.com/?q=1", "3.14159", "MiXeD CaSe", "a" * 40,
           "trailing   ", "<|im_start|>user", "x", "The end."]
round_trip = []
for text in strings:
    ids = post("/tokenize", {"content": text})["tokens"]
    round_trip.append(post("/detokenize", {"tokens": ids})["content"] == text)
# a prompt as token ids gives what its text gives
ids = post("/tokenize", {"content": "The capital of France is"})["tokens"]
by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
# stream_options.include_usage: only then a last chunk with usage and no choices
chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
with_usage = [len(chunks[-1].choices), chunks[-1].usage.completion_tokens,
              sum(1 for c in chunks[:-1] if c.usage is not None)]
plain_chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                              temperature=0, stream=True))
without_usage = sum(1 for c in plain_chunks if getattr(c, "usage", None) is not None)
# log-probabilities: at temperature 0 the chosen token is the top one; streamed as whole
lp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                    max_tokens=16, temperature=0, logprobs=True, top_logprobs=3)
entries = lp.choices[0].logprobs.content
lp_check = {
    "count": len(entries), "tokens": lp.usage.completion_tokens,
    "top_is_chosen": all(e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5
                         and len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries),
    "text": "".join(e.token for e in entries) == lp.choices[0].message.content,
}
lp_stream = []
for c in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                        max_tokens=16, temperature=0, logprobs=True, top_logprobs=3,
                                        stream=True):
    if c.choices and c.choices[0].logprobs:
        lp_stream += [(e.token, round(e.logprob, 4)) for e in c.choices[0].logprobs.content]
lp_check["stream"] = lp_stream == [(e.token, round(e.logprob, 4)) for e in entries]
clp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                logprobs=2).choices[0]
lp_check["completion"] = [len(clp.logprobs.tokens), len(clp.logprobs.token_logprobs),
                          all(len(t) == 2 for t in clp.logprobs.top_logprobs),
                          clp.logprobs.text_offset == sorted(clp.logprobs.text_offset),
                          "".join(clp.logprobs.tokens) == clp.text]
# a strong negative bias keeps a token out: ban the greedy answer's first token
first = post("/tokenize", {"content": clp.logprobs.tokens[0]})["tokens"][0]
banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                   logprobs=0, logit_bias={str(first): -100}).choices[0]
bias_check = [clp.logprobs.tokens[0], banned.logprobs.tokens[0],
              clp.logprobs.tokens[0] in banned.logprobs.tokens]
# penalties change a repetitive output: fewer repeats of its most repeated token
rep_prompt = "one one one one one one one one one one one one"
def repeats(**kw):
    c = client.completions.create(model=MODEL, prompt=rep_prompt, max_tokens=24, temperature=0, logprobs=0,
                                  **kw).choices[0]
    toks = c.logprobs.tokens
    return max(toks.count(t) for t in toks), c.text
penalties = [repeats(), repeats(frequency_penalty=1.5, presence_penalty=1.0), repeats(extra_body={"repetition_penalty": 1.8})]
# structured output: every answer parses and validates against its schema, streamed too
schemas = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "address": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20},
                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                          "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["name", "address"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                 "minItems": 2, "maxItems": 4}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                      "confidence": {"type": "string", "enum": ["low", "high"]}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
                                      "done": {"type": "boolean"}},
     "required": ["id", "done"], "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["age", "score"], "additionalProperties": False},
]
structured = []
for i, schema in enumerate(schemas):
    rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=160, temperature=0, response_format=rf)
    text = r.choices[0].message.content
    streamed_text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=160, temperature=0, response_format=rf, stream=True))
    try:
        jsonschema.validate(json.loads(text), schema)
        ok = True
    except Exception as e:
        ok = f"{e}: {text!r}"
    structured.append([ok, r.choices[0].finish_reason, streamed_text == text])
# (a prompt this small model answers with a short object; others make it ramble to max_tokens)
json_object = client.chat.completions.create(model=MODEL, max_tokens=200, temperature=0,
                                             messages=[{"role": "user", "content": "Name a color, as JSON."}],
                                             response_format={"type": "json_object"}).choices[0].message.content
regex = client.completions.create(model=MODEL, prompt="The year is", max_tokens=10, temperature=0,
                                  extra_body={"response_format": {"type": "regex", "regex": "[0-9]{4}"}}).choices[0].text
try:
    client.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}],
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "bad", "schema": {"type": "no-such"}}})
    bad_schema = None
except Exception as e:
    bad_schema = [getattr(e, "status_code", None), str(e)]
print(json.dumps({"sampled": sampled, "prompts": prompts, "streamed_n": [streamed_n.get(0), streamed_n.get(1)],
                  "echoed": echoed, "suffix": suffix, "no_tools": no_tools, "best_of": best_of,
                  "structured": structured, "json_object": json_object, "regex": regex,
                  "bad_schema": bad_schema,
                  "logprobs": lp_check, "bias": bias_check, "penalties": penalties,
                  "with_usage": with_usage, "without_usage": without_usage,
                  "streamed": streamed, "plain": plain.choices[0].text,
                  "usage": plain.usage.completion_tokens, "chat": chat, "bad_status": bad,
                  "parts": parts.choices[0].message.content, "refused": refused,
                  "served": served, "retrieved": retrieved, "missing": missing,
                  "round_trip": round_trip, "by_ids": by_ids.choices[0].text}))
