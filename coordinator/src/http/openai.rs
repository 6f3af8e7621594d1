//! OpenAI request and response shapes.

use serde::{Deserialize, Serialize};

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    /// Ignored beyond being echoed: one model is served.
    pub model: Option<String>,
    /// Default 16.
    pub max_tokens: Option<u32>,
    /// Default 1.0, as OpenAI.
    pub temperature: Option<f32>,
    /// Default 1.0.
    pub top_p: Option<f32>,
    /// Not an OpenAI field, but common: 0 is off.
    pub top_k: Option<u32>,
    /// Random seed.
    pub seed: Option<u64>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: bool,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Not an OpenAI field (vLLM has it): keep generating past end-of-generation tokens, up
    /// to `max_tokens`. For benchmarks.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: String,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<common::tokenizer::ChatMessage>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// Token counts.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Prompt.
    pub prompt_tokens: usize,
    /// Generated.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// OpenAI's error detail.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// For people.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error`, `server_error`...
    #[serde(rename = "type")]
    pub kind: String,
    /// Unused.
    pub param: Option<String>,
    /// Unused.
    pub code: Option<String>,
}
