//! Chat messages and the chat request.

use serde::Deserialize;

use common::tokenizer::tools::ToolSyntax;

use super::{Checked, Common, Endpoint};

/// A message's `content`: a string, or an array of parts (text parts are joined).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts, as many clients send them.
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// `text`, `image_url`, `input_audio`, `file`...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One chat message as it comes in.
#[derive(Debug, Clone, Deserialize)]
pub struct WireMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (`null` is allowed on assistant turns with tool calls, taken as empty).
    pub content: Option<Content>,
    /// The speaker's name, handed to the template.
    pub name: Option<String>,
    /// An assistant turn's calls (OpenAI's shape, `arguments` as JSON text).
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

/// The roles OpenAI defines.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

impl WireMessage {
    /// The message for the chat template: text parts joined, any other part refused.
    pub fn to_chat(&self) -> Result<common::tokenizer::ChatMessage, String> {
        if !ROLES.contains(&self.role.as_str()) {
            return Err(format!(
                "unknown message role `{}` (use one of {})",
                self.role,
                ROLES.join(", ")
            ));
        }
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => return Err("a `text` part has no `text`".into()),
                        (other, _) => {
                            return Err(format!(
                                "content parts of type `{other}` are not supported: this \
                                 model reads text only"
                            ))
                        }
                    }
                }
                text
            }
        };
        let mut m = common::tokenizer::ChatMessage::new(self.role.clone(), content);
        m.name = self.name.clone();
        m.tool_calls = match &self.tool_calls {
            None | Some(serde_json::Value::Null) => None,
            Some(calls) => Some(super::tools::for_template(calls)?),
        };
        m.tool_call_id = self.tool_call_id.clone();
        Ok(m)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<WireMessage>,
    /// Functions the model may call.
    pub tools: Option<serde_json::Value>,
    /// `none`, `auto` (the default), `required`, or a named function.
    pub tool_choice: Option<serde_json::Value>,
    /// Whether a required answer may hold several calls (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 512;

impl ChatRequest {
    /// The messages for the chat template (see [`WireMessage::to_chat`]).
    pub fn chat_messages(&self) -> Result<Vec<common::tokenizer::ChatMessage>, String> {
        self.messages.iter().map(WireMessage::to_chat).collect()
    }

    /// The tools offered, checked; `None` when there are none.
    pub fn tools(&self) -> Result<Option<super::Tools>, String> {
        super::tools::checked(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )
    }

    /// Checks the conversation's size and messages, its tools, and the common fields.
    pub fn checked(&self) -> Result<Checked, String> {
        if self.messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        if self.messages.len() > MAX_MESSAGES {
            return Err(format!(
                "`messages` has {} entries; at most {MAX_MESSAGES}",
                self.messages.len()
            ));
        }
        self.chat_messages()?;
        let tools = self.tools()?;
        let checked = self.common.checked(Endpoint::Chat)?;
        if checked.grammar.is_some()
            && tools
                .as_ref()
                .is_some_and(|t| t.grammar(ToolSyntax::Tagged).is_some())
        {
            return Err(
                "`response_format` and a `tool_choice` that requires a call both constrain \
                 the answer; give one of them"
                    .into(),
            );
        }
        Ok(checked)
    }
}
