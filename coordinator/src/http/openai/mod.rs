//! OpenAI request and response shapes: the shared fields and their checks ([`request`]),
//! prompts ([`prompt`]), chat messages ([`chat`]), log-probabilities in responses
//! ([`logprobs`]), tools and tool calls ([`tools`]), and the tokenizer endpoints' bodies
//! ([`tokenize`]).

mod chat;
pub mod logprobs;
mod prompt;
mod request;
mod tokenize;
pub mod tools;

use serde::Serialize;

pub use chat::{ChatRequest, Content, Part, WireMessage, MAX_MESSAGES, ROLES};
pub use prompt::{CompletionRequest, OnePrompt, Prompt};
pub use request::{
    Checked, Common, Endpoint, IsDefault, Stop, StreamOptions, CHAT_ONLY, COMPLETION_ONLY, IGNORED,
    MAX_LOGIT_BIAS, MAX_STOP, MAX_STOP_BYTES, NOT_YET,
};
pub use tokenize::{DetokenizeRequest, TokenizeRequest};
pub use tools::{ToolChoice, Tools};

/// A `/v1/completions` body as the handler checks it (for the fuzzer and the tests).
pub fn validate_completion(body: &[u8]) -> Result<Checked, String> {
    let r: CompletionRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    r.prompt.all()?;
    r.best_of(r.common.n()?)?;
    r.common.checked(Endpoint::Completion)
}

/// A `/v1/chat/completions` body as the handler checks it.
pub fn validate_chat(body: &[u8]) -> Result<Checked, String> {
    let r: ChatRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    r.checked()
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
    /// Of the prompt's tokens, those whose keys and values came from the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens reused from the prefix cache.
    pub cached_tokens: usize,
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

#[cfg(test)]
mod tests;
