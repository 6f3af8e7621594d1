//! A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, and the tool calls of
//! its answer in OpenAI's shapes.

use common::tokenizer::tools::{Parsed, ToolCall, ToolDef, ToolSyntax};
use serde_json::{json, Value};

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are not shown and nothing is read out of the answer.
    None,
    /// The model decides; calls in its answer are read out.
    Auto,
    /// The answer is one or more calls (the grammar allows nothing else).
    Required,
    /// The answer is a call of this function.
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The definitions as the request gave them, for the chat template.
    pub list: Value,
    /// Each tool's name and argument schema.
    pub defs: Vec<ToolDef>,
    /// `tool_choice` (default `auto`).
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): a required answer may hold several calls.
    pub parallel: bool,
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One entry of `tools`.
fn definition(i: usize, t: &Value) -> Result<ToolDef, String> {
    if t["type"].as_str() != Some("function") {
        return Err(format!(
            "`tools[{i}].type` must be \"function\" (got {})",
            t["type"]
        ));
    }
    let f = &t["function"];
    let name = f["name"]
        .as_str()
        .ok_or_else(|| format!("`tools[{i}].function.name` is missing"))?;
    if !valid_name(name) {
        return Err(format!(
            "`tools[{i}].function.name` `{name}` must be 1 to 64 letters, digits, `_` or `-`"
        ));
    }
    let parameters = match &f["parameters"] {
        Value::Null => json!({"type": "object"}),
        p @ Value::Object(_) => p.clone(),
        other => {
            return Err(format!(
                "`tools[{i}].function.parameters` must be a JSON schema object (got {other})"
            ))
        }
    };
    Ok(ToolDef {
        name: name.to_string(),
        parameters,
    })
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tool is offered.
pub fn checked(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, String> {
    let list = match tools {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(other) => return Err(format!("`tools` must be a list (got {other})")),
    };
    if list.len() > MAX_TOOLS {
        return Err(format!(
            "`tools` has {} entries; at most {MAX_TOOLS}",
            list.len()
        ));
    }
    let defs = list
        .iter()
        .enumerate()
        .map(|(i, t)| definition(i, t))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, d) in defs.iter().enumerate() {
        if defs[..i].iter().any(|e| e.name == d.name) {
            return Err(format!("two tools are named `{}`", d.name));
        }
    }
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(format!(
                    "`tool_choice` `{other}` is not one of none, auto, required, or \
                     {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                ))
            }
        },
        Some(v) => {
            let name = v["function"]["name"]
                .as_str()
                .filter(|_| v["type"].as_str() == Some("function"))
                .ok_or_else(|| {
                    format!(
                        "`tool_choice` must be none, auto, required, or {{\"type\": \
                         \"function\", \"function\": {{\"name\": ...}}}} (got {v})"
                    )
                })?;
            if !defs.iter().any(|d| d.name == name) {
                return Err(format!(
                    "`tool_choice` names `{name}`, which is not one of `tools`"
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if defs.is_empty() {
        return match choice {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            _ => Err("`tool_choice` asks for a call, but `tools` offers none".into()),
        };
    }
    Ok(Some(Tools {
        list: Value::Array(list.to_vec()),
        defs,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

impl Tools {
    /// Whether the model is shown the tools and its answer read for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar a `required` or named choice puts on the answer (Lark), `None` for
    /// `auto` and `none`.
    pub fn grammar(&self, syntax: ToolSyntax) -> Option<String> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => None,
            ToolChoice::Required => {
                Some(syntax.grammar(&self.defs, self.parallel && syntax == ToolSyntax::Tagged))
            }
            ToolChoice::Named(n) => {
                let one: Vec<ToolDef> =
                    self.defs.iter().filter(|d| &d.name == n).cloned().collect();
                Some(syntax.grammar(&one, false))
            }
        }
    }
}

/// A call as OpenAI's `tool_calls` entry; `id` names it for the `tool` turn that answers it.
pub fn call_json(id: &str, c: &ToolCall) -> Value {
    json!({"id": id, "type": "function",
           "function": {"name": c.name, "arguments": c.arguments}})
}

/// The id of call `k` of choice `choice` of response `response`.
pub fn call_id(response: &str, choice: usize, k: usize) -> String {
    format!("call_{response}_{choice}_{k}")
}

/// A whole answer's `message`: its text (`null` when it is all calls) and calls.
pub fn message(p: &Parsed, response: &str, choice: usize) -> Value {
    if p.calls.is_empty() {
        return json!({"role": "assistant", "content": p.content});
    }
    let calls: Vec<Value> = p
        .calls
        .iter()
        .enumerate()
        .map(|(k, c)| call_json(&call_id(response, choice, k), c))
        .collect();
    let content = (!p.content.is_empty()).then_some(&p.content);
    json!({"role": "assistant", "content": content, "tool_calls": calls})
}

/// The streamed deltas of the calls at an answer's end, one per call (each carries its
/// `index` among the calls, as OpenAI streams them).
pub fn deltas(p: &Parsed, response: &str, choice: usize) -> Vec<Value> {
    p.calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut call = call_json(&call_id(response, choice, k), c);
            call["index"] = json!(k);
            json!({"role": "assistant", "tool_calls": [call]})
        })
        .collect()
}

/// A message's `tool_calls` for the chat template: OpenAI's list, each call's `arguments`
/// (JSON text on the wire) as the object it spells, which is what templates render.
pub fn for_template(calls: &Value) -> Result<Value, String> {
    let list = calls
        .as_array()
        .ok_or_else(|| format!("a message's `tool_calls` must be a list (got {calls})"))?;
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        let mut c = c.clone();
        if c["function"]["name"].as_str().is_none() {
            return Err("each of a message's `tool_calls` needs `function.name`".into());
        }
        if let Some(text) = c["function"]["arguments"].as_str() {
            let v: Value = serde_json::from_str(text).map_err(|e| {
                format!("a tool call's `function.arguments` is not JSON ({e}): {text}")
            })?;
            c["function"]["arguments"] = v;
        }
        out.push(c);
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name,
               "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}})
    }

    #[test]
    fn checks_tools_and_the_choice() {
        let tools = json!([tool("a"), tool("b")]);
        let t = checked(Some(&tools), None, None)
            .expect("ok")
            .expect("some");
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel && t.active());
        let named = json!({"type": "function", "function": {"name": "b"}});
        let t = checked(Some(&tools), Some(&named), Some(false))
            .expect("ok")
            .expect("some");
        assert_eq!(t.choice, ToolChoice::Named("b".into()));
        let g = t.grammar(ToolSyntax::Tagged).expect("a grammar");
        assert!(
            g.contains(r#"{"const":"b"}"#) && !g.contains(r#"{"const":"a"}"#),
            "{g}"
        );
        assert!(checked(None, Some(&json!("none")), None)
            .expect("ok")
            .is_none());

        let refusals = [
            (json!("x"), None, "must be a list"),
            (json!([{"type": "code"}]), None, "`tools[0].type`"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                None,
                "letters",
            ),
            (json!([tool("a"), tool("a")]), None, "two tools"),
            (tools.clone(), Some(json!("maybe")), "`tool_choice` `maybe`"),
            (
                tools.clone(),
                Some(json!({"type": "function", "function": {"name": "c"}})),
                "not one of `tools`",
            ),
            (json!([]), Some(json!("required")), "offers none"),
        ];
        for (t, c, want) in refusals {
            let e = checked(Some(&t), c.as_ref(), None).expect_err(want);
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn answers_in_openai_shapes() {
        let p = Parsed {
            content: String::new(),
            calls: vec![ToolCall {
                name: "a".into(),
                arguments: "{\"x\":1}".into(),
            }],
        };
        let m = message(&p, "chatcmpl-1", 0);
        assert!(m["content"].is_null());
        assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(m["tool_calls"][0]["id"], "call_chatcmpl-1_0_0");
        assert_eq!(deltas(&p, "r", 2)[0]["tool_calls"][0]["index"], 0);
        let history = json!([{"id": "c", "type": "function",
                               "function": {"name": "a", "arguments": "{\"x\": 1}"}}]);
        assert_eq!(
            for_template(&history).expect("ok")[0]["function"]["arguments"]["x"],
            1
        );
        let e = for_template(&json!([{"function": {"name": "a", "arguments": "{"}}]));
        assert!(e.is_err());
    }
}
