//! Tool calls: whether a model's chat template shows the model its tools, the syntax in
//! which that model calls them, the grammar that makes it call one, and the calls read back
//! out of its output (whole, or while it streams).
//!
//! Two syntaxes cover most tool-calling GGUFs:
//! - [`ToolSyntax::Tagged`]: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//!   blocks (Qwen 2.5 and 3, Hermes 2 and 3, and the templates modelled on them);
//! - [`ToolSyntax::BareJson`]: the whole answer is one `{"name": ..., "parameters": {...}}`
//!   object, optionally after `<|python_tag|>` (Llama 3.1 to 3.3).

use serde_json::{json, Value};

use super::chat::{ChatMessage, ChatTemplate};

/// The name of the tool a template is shown to find out whether it renders tools.
const PROBE: &str = "probe_tool_5f3c9a";

/// The opening and closing tags of a [`ToolSyntax::Tagged`] call.
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// What Llama 3 may put before a [`ToolSyntax::BareJson`] call.
const PYTHON_TAG: &str = "<|python_tag|>";

/// How a model calls tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<tool_call>` blocks holding `{"name", "arguments"}` objects, one per call.
    Tagged,
    /// One `{"name", "parameters"}` object as the whole answer.
    BareJson,
}

/// One tool a request offers: its name and the JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    /// The function's name.
    pub name: String,
    /// The JSON schema of its arguments (`{"type": "object"}` when the request gives none).
    pub parameters: Value,
}

/// One call read out of the model's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The function called.
    pub name: String,
    /// Its arguments, as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A finished answer split into its text and its calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The text outside the calls.
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
}

impl ToolSyntax {
    /// The syntax of `template`'s model, or why it has none: the template must show the
    /// model its tools (a probe tool's name must appear in a rendering) and spell calls in a
    /// syntax this module reads.
    pub fn of(template: &ChatTemplate) -> Result<Self, String> {
        let probe = json!([{"type": "function", "function": {
            "name": PROBE, "description": "A probe.",
            "parameters": {"type": "object", "properties": {}}}}]);
        let shown = template
            .render_with_tools(&[ChatMessage::new("user", "hi")], Some(&probe), true)
            .map_err(|e| format!("the model's chat template fails when given tools: {e}"))?;
        if !shown.contains(PROBE) {
            return Err(
                "this model's chat template does not show the model any tools, so \
                        `tools` cannot be used with it (models whose templates do: Qwen 2.5 \
                        and 3, Hermes, Llama 3.1 and later)"
                    .into(),
            );
        }
        let source = template.source();
        if source.contains(OPEN) {
            Ok(ToolSyntax::Tagged)
        } else if source.contains(PYTHON_TAG) || source.contains("\"parameters\": ") {
            Ok(ToolSyntax::BareJson)
        } else {
            Err(
                "this model's chat template shows it tools, but its tool-call syntax is not \
                 one this server reads (`<tool_call>` blocks, or Llama 3's JSON calls)"
                    .into(),
            )
        }
    }

    /// The key a call's arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolSyntax::Tagged => "arguments",
            ToolSyntax::BareJson => "parameters",
        }
    }

    /// A Lark grammar (llguidance's dialect) that admits only calls of `tools`: one, or with
    /// `parallel` one or more (tagged syntax only). Arguments follow each tool's schema,
    /// compactly spaced.
    pub fn grammar(self, tools: &[ToolDef], parallel: bool) -> String {
        let key = self.arguments_key();
        let alternatives: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({"type": "object",
                       "properties": {"name": {"const": t.name}, key: t.parameters},
                       "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        let schema = json!({"anyOf": alternatives,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ",
                           "key_separator": ": "}});
        match self {
            ToolSyntax::Tagged => {
                let start = if parallel {
                    "start: call (\"\\n\" call)*"
                } else {
                    "start: call"
                };
                format!("{start}\ncall: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {schema}\n")
            }
            ToolSyntax::BareJson => format!("start: body\nbody: %json {schema}\n"),
        }
    }

    /// The call in `body` (a JSON object with a string `name`), if it is one.
    fn call(self, body: &str) -> Option<ToolCall> {
        let v: Value = serde_json::from_str(body.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let args = v
            .get(self.arguments_key())
            .or_else(|| v.get("arguments"))
            .or_else(|| v.get("parameters"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        // some models send the arguments as JSON text already
        let arguments = match args {
            Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
            other => other.to_string(),
        };
        Some(ToolCall { name, arguments })
    }

    /// Splits a finished answer into its text and its calls. What looks like a call but does
    /// not parse stays in the text.
    pub fn parse(self, text: &str) -> Parsed {
        match self {
            ToolSyntax::Tagged => {
                let (mut content, mut calls) = (String::new(), Vec::new());
                let mut rest = text;
                while let Some(at) = rest.find(OPEN) {
                    content.push_str(&rest[..at]);
                    let after = &rest[at + OPEN.len()..];
                    let (body, next) = match after.find(CLOSE) {
                        Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
                        None => (after, ""),
                    };
                    match self.call(body) {
                        Some(c) => calls.push(c),
                        None => content.push_str(&rest[at..rest.len() - next.len()]),
                    }
                    rest = next;
                }
                content.push_str(rest);
                Parsed {
                    content: content.trim().to_string(),
                    calls,
                }
            }
            ToolSyntax::BareJson => {
                let t = text.trim_start();
                let body = t.strip_prefix(PYTHON_TAG).unwrap_or(t);
                match self.call(body) {
                    Some(c) => Parsed {
                        content: String::new(),
                        calls: vec![c],
                    },
                    None => Parsed {
                        content: text.trim().to_string(),
                        calls: Vec::new(),
                    },
                }
            }
        }
    }
}

/// Reads calls out of a streamed answer: text is passed on as it comes, except what may be
/// the start of a call, which is held until it is known; from the first call on, everything
/// is held and read at the end.
#[derive(Debug, Clone)]
pub struct ToolStream {
    syntax: ToolSyntax,
    text: String,
    /// Bytes of `text` passed on.
    sent: usize,
    /// A call has started (or, bare JSON, the answer may be one): hold the rest.
    holding: bool,
    /// Bare JSON: the answer is known not to be a call.
    plain: bool,
}

impl ToolStream {
    /// A stream of `syntax`.
    pub fn new(syntax: ToolSyntax) -> Self {
        ToolStream {
            syntax,
            text: String::new(),
            sent: 0,
            holding: false,
            plain: false,
        }
    }

    /// Takes the next piece of the answer; returns the text that can be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.holding {
            return String::new();
        }
        let upto = match self.syntax {
            ToolSyntax::Tagged => {
                let unsent = &self.text[self.sent..];
                match unsent.find(OPEN) {
                    Some(at) => {
                        self.holding = true;
                        self.sent + at
                    }
                    // hold a tail that may be the start of the tag
                    None => self.text.len() - partial_tag(unsent, OPEN),
                }
            }
            ToolSyntax::BareJson if self.plain => self.text.len(),
            ToolSyntax::BareJson => {
                let t = self.text.trim_start();
                if t.is_empty() {
                    self.sent
                } else if t.starts_with('{')
                    || t.starts_with(PYTHON_TAG)
                    || PYTHON_TAG.starts_with(t)
                {
                    if !PYTHON_TAG.starts_with(t) {
                        self.holding = true;
                    }
                    self.sent
                } else {
                    self.plain = true;
                    self.text.len()
                }
            }
        };
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }

    /// The end of the answer: the text not yet shown that is not part of a call, and the
    /// calls.
    pub fn finish(self) -> Parsed {
        let rest = &self.text[self.sent..];
        if !self.holding {
            return Parsed {
                content: rest.to_string(),
                calls: Vec::new(),
            };
        }
        let mut p = self.syntax.parse(rest);
        if p.calls.is_empty() {
            // nothing parsed: show what was held as it was
            p.content = rest.to_string();
        }
        p
    }
}

/// The length of the longest tail of `text` that is a proper start of `tag`.
fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
