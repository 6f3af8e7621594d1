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

/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 512;
/// Most stop strings in one request.
pub const MAX_STOP: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// What a request asks for, checked (the prompt aside: it is tokenized later).
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling, validated.
    pub sampling: common::sampling::SamplingParams,
    /// Stop strings, within the limits.
    pub stop: Vec<String>,
}

impl Common {
    /// Checks every field: sampling ranges, the stop strings' count and lengths.
    pub fn checked(&self) -> Result<Checked, String> {
        let sampling = common::sampling::SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed.unwrap_or(0),
        }
        .validate()
        .map_err(|e| e.to_string())?;
        let stop = self.stop.clone().map(Stop::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP {
            return Err(format!(
                "`stop` has {} strings; at most {MAX_STOP}",
                stop.len()
            ));
        }
        if let Some(s) = stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(format!(
                "a stop string must have 1 to {MAX_STOP_BYTES} bytes (one has {})",
                s.len()
            ));
        }
        Ok(Checked {
            max_tokens: self.max_tokens.unwrap_or(16) as usize,
            sampling,
            stop,
        })
    }
}

impl ChatRequest {
    /// Checks the conversation's size and the common fields.
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
        self.common.checked()
    }
}

/// A `/v1/completions` body as the handler checks it (for the fuzzer and the tests).
pub fn validate_completion(body: &[u8]) -> Result<Checked, String> {
    let r: CompletionRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    r.common.checked()
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
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked() {
        let ok = validate_chat(br#"{"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"], "temperature": 0}"#)
            .expect("valid");
        assert_eq!((ok.max_tokens, ok.stop.len()), (16, 1));
        let many: Vec<String> = (0..MAX_STOP + 1).map(|i| format!("s{i}")).collect();
        let body = serde_json::json!({"prompt": "x", "stop": many}).to_string();
        assert!(matches!(validate_completion(body.as_bytes()), Err(e) if e.contains("at most")));
        let body = serde_json::json!({"prompt": "x", "stop": ""}).to_string();
        assert!(validate_completion(body.as_bytes()).is_err());
        let msgs: Vec<_> = (0..MAX_MESSAGES + 1)
            .map(|_| serde_json::json!({"role": "user", "content": "a"}))
            .collect();
        let body = serde_json::json!({ "messages": msgs }).to_string();
        assert!(matches!(validate_chat(body.as_bytes()), Err(e) if e.contains("messages")));
        assert!(validate_chat(br#"{"messages": []}"#).is_err());
        assert!(validate_completion(br#"{"prompt": "x", "temperature": -1}"#).is_err());
        assert!(validate_completion(b"\xff").is_err());
    }
}
