//! Chat templates from `tokenizer.chat_template`, rendered with minijinja.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message, as in OpenAI's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`...
    pub role: String,
    /// The text.
    pub content: String,
    /// The speaker's name, when the client gives one (templates may render it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's tool calls, OpenAI's shape with each call's `arguments` as a JSON
    /// object (templates render them as such).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn's answer to this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// The most instructions one rendering may run: real templates take a few thousand per
/// message; a template from a hostile file that loops stops here with an error, after a few
/// milliseconds, instead of holding the request forever.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// The longest text a rendering may produce (bytes); the prompt is bounded by the context
/// anyway, far below this.
pub const MAX_RENDERED_BYTES: usize = 8 << 20;

/// Gemma's turn format, as llama.cpp applies it when a gemma file carries no template:
/// `assistant` is `model`, system messages are trimmed and put before the next user turn,
/// every message is trimmed and ends with `<end_of_turn>`.
const GEMMA_TURNS: &str = r"{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{%- set ns.system = ns.system ~ (m.content | trim) -%}
{%- else -%}
{%- set role = 'model' if m.role == 'assistant' else m.role -%}
{{- '<start_of_turn>' ~ role ~ '\n' -}}
{%- if ns.system and role != 'model' -%}
{{- ns.system ~ '\n\n' -}}
{%- set ns.system = '' -%}
{%- endif -%}
{{- (m.content | trim) ~ '<end_of_turn>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}";

/// The template an architecture falls back to when its file has none.
pub fn builtin_for(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma" | "gemma2" | "gemma3" => Some(GEMMA_TURNS),
        _ => None,
    }
}

/// A buffer that refuses to grow past [`MAX_RENDERED_BYTES`] (and remembers that it did).
#[derive(Default)]
struct Bounded {
    buf: Vec<u8>,
    full: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + buf.len() > MAX_RENDERED_BYTES {
            self.full = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
    tools: std::sync::OnceLock<std::result::Result<super::tools::ToolSyntax, String>>,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the texts of those tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(64);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(format!("cannot parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
            tools: std::sync::OnceLock::new(),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// How this template's model calls tools, or why it cannot (see
    /// [`super::tools::ToolSyntax::of`]); worked out once.
    pub fn tool_syntax(&self) -> std::result::Result<super::tools::ToolSyntax, String> {
        self.tools
            .get_or_init(|| super::tools::ToolSyntax::of(self))
            .clone()
    }

    /// Renders the conversation, ending with the assistant's prompt when asked.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders the conversation with `tools` (OpenAI's list of tool definitions), for
    /// templates that show the model its tools.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Template("no messages".into()));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        // Written through a bounded buffer: a template that renders without end fails at
        // the bound instead of first allocating all of it.
        let mut out = Bounded::default();
        // `tools` is left undefined, not null, when there are none: templates test both ways
        let tools = match tools {
            Some(t) => context! { tools => t },
            None => context! {},
        };
        tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
                ..tools
            },
            &mut out,
        )
        .map(drop)
        .map_err(|e| match out.full {
            true => Error::Template(format!(
                "the rendered prompt passes {MAX_RENDERED_BYTES} bytes"
            )),
            false => Error::Template(format!("cannot render: {e}")),
        })?;
        let text = String::from_utf8(out.buf)
            .map_err(|_| Error::Template("the rendered prompt is not UTF-8".into()))?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_that_loops_forever_is_stopped() {
        let hostile = [
            // 10^10 iterations
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            // unbounded recursion
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ];
        for source in hostile {
            let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
            let started = std::time::Instant::now();
            let r = t.render(&[ChatMessage::new("user", "hi")], true);
            assert!(matches!(r, Err(Error::Template(_))), "{source}: {r:?}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "{source}: took {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn gemma_turns_follow_llama_cpp() -> Result<()> {
        let t = ChatTemplate::new(builtin_for("gemma3").expect("gemma has one"), "<bos>", "")?;
        let out = t.render(
            &[
                ChatMessage::new("system", " Be brief. "),
                ChatMessage::new("user", "Hi\n"),
                ChatMessage::new("assistant", "Hello."),
                ChatMessage::new("user", "Why?"),
            ],
            true,
        )?;
        assert_eq!(
            out,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
        );
        assert!(builtin_for("llama").is_none());
        Ok(())
    }

    #[test]
    fn renders_and_reports_errors() -> Result<()> {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "<s>",
            "</s>",
        )?;
        let out = t.render(&[ChatMessage::new("user", " hi ")], true)?;
        assert_eq!(out, "<user>hi<assistant>");
        assert!(t.render(&[], true).is_err());
        let t = ChatTemplate::new("{{ raise_exception('nope') }}", "", "")?;
        assert!(matches!(
            t.render(&[ChatMessage::new("user", "x")], true),
            Err(Error::Template(_))
        ));
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        Ok(())
    }
}
