#!/usr/bin/env python3
"""Tool calls through the official `openai` client, against a coordinator serving a model
whose chat template shows it tools (tests/tests/openai_client.rs starts it: a synthetic
qwen2 model with tests/fixtures/tool-template.jinja). Prints JSON results for the Rust test.
Usage: openai_tools.py BASE_URL"""
import json
import sys

import jsonschema
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
MODEL = client.models.list().data[0].id  # requests name the served model
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
out = {}


def calls(message):
    """Each call as [name, arguments], checked against its tool's schema."""
    got = []
    for c in message.tool_calls or []:
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        assert c.type == "function" and c.id, c
        got.append([c.function.name, args])
    return got


# required: the answer is calls, each valid against its schema, finish_reason tool_calls
r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                   max_tokens=96, temperature=0, parallel_tool_calls=False)
out["required"] = {"calls": calls(r.choices[0].message), "finish": r.choices[0].finish_reason,
                   "content": r.choices[0].message.content}
# a named function: that one, whatever the model would pick
r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=96, temperature=0,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
out["named"] = calls(r.choices[0].message)
# streamed: the same calls, assembled from the deltas by index
acc, finish = {}, None
for ch in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=96, temperature=0, parallel_tool_calls=False,
                                         stream=True):
    for c in ch.choices:
        finish = c.finish_reason or finish
        for d in c.delta.tool_calls or []:
            a = acc.setdefault(d.index, {"name": "", "arguments": ""})
            a["name"] += d.function.name or ""
            a["arguments"] += d.function.arguments or ""
out["streamed"] = {"calls": [[a["name"], json.loads(a["arguments"])] for _, a in sorted(acc.items())],
                   "finish": finish}
# the conversation goes on: the call and its answer rendered back through the template
call = r.choices[0].message.tool_calls[0]
follow = client.chat.completions.create(
    model=MODEL, max_tokens=8, temperature=0, tools=TOOLS,
    messages=ASK + [{"role": "assistant", "content": None,
                     "tool_calls": [{"id": call.id, "type": "function",
                                     "function": {"name": call.function.name,
                                                  "arguments": call.function.arguments}}]},
                    {"role": "tool", "tool_call_id": call.id, "content": "-3 C"}])
out["follow_up"] = follow.choices[0].finish_reason
# auto on a random-weight model: a well-formed answer, calls or text
r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0)
out["auto"] = r.choices[0].finish_reason
# refusals name what is wrong
def refused(**kw):
    try:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)
        return None
    except Exception as e:
        return [getattr(e, "status_code", None), str(e)]
out["bad_choice"] = refused(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
out["with_format"] = refused(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
print(json.dumps(out))
