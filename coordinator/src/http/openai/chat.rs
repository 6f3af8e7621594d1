//! Chat messages and the chat request.

use serde::Deserialize;

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
        Ok(m)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<WireMessage>,
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

    /// Checks the conversation's size and messages, and the common fields.
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
        self.common.checked(Endpoint::Chat)
    }
}
