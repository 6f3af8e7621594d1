//! OpenAI request and response shapes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    /// OpenAI's newer name of `max_tokens`; both may be given only when they agree.
    pub max_completion_tokens: Option<u32>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Every other field: OpenAI fields this server does not implement yet are refused unless
    /// they ask for their default (see [`NOT_YET`]); other fields are ignored and logged.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// A last chunk with the token counts and no choices (every chunk carries `usage`,
    /// `null` but in that one).
    #[serde(default)]
    pub include_usage: bool,
}

impl Common {
    /// Whether a stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// Whether a field's value asks for the field's default.
pub type IsDefault = fn(&Value) -> bool;

/// OpenAI request fields not implemented yet, each with the test for "asks for the default",
/// which is accepted: a request that asks for more is refused with a 400 naming the field,
/// rather than answered as if the field were not there.
pub const NOT_YET: &[(&str, IsDefault)] = &[
    ("n", |v| v.as_u64() == Some(1)),
    ("best_of", |v| v.as_u64() == Some(1)),
    ("logprobs", |v| v.as_bool() == Some(false)),
    ("top_logprobs", |v| v.as_u64() == Some(0)),
    ("echo", |v| v.as_bool() == Some(false)),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("repetition_penalty", |v| v.as_f64() == Some(1.0)),
    ("min_p", |v| v.as_f64() == Some(0.0)),
    ("logit_bias", |v| v.as_object().is_some_and(Map::is_empty)),
    ("suffix", |v| v.as_str() == Some("")),
    ("response_format", |v| v["type"].as_str() == Some("text")),
    ("tools", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("tool_choice", |v| v.as_str() == Some("none")),
    ("functions", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("function_call", |v| v.as_str() == Some("none")),
    ("stream_options", |v| {
        v["include_usage"].as_bool() != Some(true)
    }),
    ("audio", |_| false),
    ("modalities", |v| {
        v.as_array()
            .is_some_and(|m| m.iter().all(|x| x.as_str() == Some("text")))
    }),
    ("prediction", |_| false),
    ("web_search_options", |_| false),
];

/// OpenAI fields that do not change the output, accepted and ignored.
pub const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "reasoning_effort",
    "safety_identifier",
    "prompt_cache_key",
    "parallel_tool_calls",
];

/// A completion's `prompt`, in each of OpenAI's four forms.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Several texts (one choice each).
    Texts(Vec<String>),
    /// Token ids.
    Ids(Vec<u32>),
    /// Several lists of token ids.
    IdLists(Vec<Vec<u32>>),
}

/// One prompt, as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum OnePrompt {
    /// Text, tokenized by the server.
    Text(String),
    /// Token ids, taken as they are.
    Ids(Vec<u32>),
}

impl Prompt {
    /// The one prompt of the request: several in one request are not served yet.
    pub fn single(&self) -> Result<OnePrompt, String> {
        let several = |n: usize| {
            Err(format!(
                "`prompt` holds {n} prompts; one request serves one prompt for now"
            ))
        };
        match self {
            Prompt::Text(t) => Ok(OnePrompt::Text(t.clone())),
            Prompt::Ids(ids) => Ok(OnePrompt::Ids(ids.clone())),
            Prompt::Texts(v) if v.len() == 1 => Ok(OnePrompt::Text(v[0].clone())),
            Prompt::IdLists(v) if v.len() == 1 => Ok(OnePrompt::Ids(v[0].clone())),
            Prompt::Texts(v) if v.is_empty() => Err("`prompt` is an empty list".into()),
            Prompt::Texts(v) => several(v.len()),
            Prompt::IdLists(v) => several(v.len()),
        }
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

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
    /// The fields of [`Common::rest`] that are not OpenAI's and so are ignored.
    pub fn ignored_fields(&self) -> Vec<&str> {
        self.rest
            .keys()
            .map(String::as_str)
            .filter(|k| !IGNORED.contains(k) && !NOT_YET.iter().any(|(n, _)| n == k))
            .collect()
    }

    /// Checks every field: sampling ranges, the stop strings' count and lengths, and that no
    /// field asks for something this server does not do.
    pub fn checked(&self) -> Result<Checked, String> {
        for (name, is_default) in NOT_YET {
            if let Some(v) = self.rest.get(*name) {
                if !v.is_null() && !is_default(v) {
                    return Err(format!(
                        "`{name}` is not supported by this server yet (value {v}); leave it \
                         out or at its default"
                    ));
                }
            }
        }
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "`max_tokens` ({a}) and `max_completion_tokens` ({b}) disagree; give one"
                ))
            }
            (a, b) => a.or(b).unwrap_or(16),
        };
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
            max_tokens: max_tokens as usize,
            sampling,
            stop,
        })
    }
}

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
        self.common.checked()
    }
}

/// A `/v1/completions` body as the handler checks it (for the fuzzer and the tests).
pub fn validate_completion(body: &[u8]) -> Result<Checked, String> {
    let r: CompletionRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    r.prompt.single()?;
    r.common.checked()
}

/// `POST /tokenize` (llama.cpp's server takes `content`, vLLM's `prompt`).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    /// The text (llama.cpp's name).
    pub content: Option<String>,
    /// The text (vLLM's name).
    pub prompt: Option<String>,
    /// Add the model's BOS as generation does (llama.cpp's name; default false, as there).
    pub add_special: Option<bool>,
    /// The same, vLLM's name (default true there).
    pub add_special_tokens: Option<bool>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    /// Token ids.
    pub tokens: Vec<u32>,
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

    #[test]
    fn fields_not_done_yet_are_refused_by_name_unless_at_their_default() {
        for (field, value) in [
            ("n", "2"),
            ("logprobs", "true"),
            ("top_logprobs", "3"),
            ("echo", "true"),
            ("presence_penalty", "0.5"),
            ("frequency_penalty", "-1"),
            ("logit_bias", r#"{"50256": -100}"#),
            ("response_format", r#"{"type": "json_object"}"#),
            (
                "tools",
                r#"[{"type": "function", "function": {"name": "f"}}]"#,
            ),
            ("tool_choice", r#""required""#),
            ("suffix", r#""tail""#),
        ] {
            let body = format!(r#"{{"prompt": "x", "{field}": {value}}}"#);
            let e = validate_completion(body.as_bytes()).expect_err(field);
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
        for (field, value) in [
            ("n", "1"),
            ("logprobs", "false"),
            ("logprobs", "null"),
            ("presence_penalty", "0"),
            ("logit_bias", "{}"),
            ("response_format", r#"{"type": "text"}"#),
            ("tools", "[]"),
            ("stream_options", r#"{"include_usage": true}"#),
            ("user", r#""someone""#),
            ("my_own_extension", "42"),
        ] {
            let body = format!(r#"{{"prompt": "x", "{field}": {value}}}"#);
            assert!(
                validate_completion(body.as_bytes()).is_ok(),
                "{field}: {value}"
            );
        }
        let r: CompletionRequest =
            serde_json::from_str(r#"{"prompt": "x", "user": "u", "my_own_extension": 1}"#)
                .expect("parses");
        assert_eq!(r.common.ignored_fields(), ["my_own_extension"]);
        let c = validate_completion(br#"{"prompt": "x", "max_completion_tokens": 7}"#);
        assert_eq!(c.map(|c| c.max_tokens), Ok(7));
        assert!(validate_completion(
            br#"{"prompt": "x", "max_tokens": 7, "max_completion_tokens": 8}"#
        )
        .is_err());
    }

    #[test]
    fn prompts_come_in_four_forms_one_at_a_time() {
        let one = |body: &str| -> Result<OnePrompt, String> {
            serde_json::from_str::<CompletionRequest>(body)
                .map_err(|e| e.to_string())?
                .prompt
                .single()
        };
        assert_eq!(one(r#"{"prompt": "a"}"#), Ok(OnePrompt::Text("a".into())));
        assert_eq!(one(r#"{"prompt": ["a"]}"#), Ok(OnePrompt::Text("a".into())));
        assert_eq!(one(r#"{"prompt": [1, 2]}"#), Ok(OnePrompt::Ids(vec![1, 2])));
        assert_eq!(one(r#"{"prompt": [[3]]}"#), Ok(OnePrompt::Ids(vec![3])));
        assert!(matches!(one(r#"{"prompt": ["a", "b"]}"#), Err(e) if e.contains("2 prompts")));
        assert!(one(r#"{"prompt": []}"#).is_err());
        assert!(one(r#"{"prompt": [-1]}"#).is_err());
    }

    #[test]
    fn content_parts_are_joined_and_other_parts_and_roles_refused() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "name": "ann", "content": "hi"},
                {"role": "assistant", "content": null}]}"#,
        )
        .expect("parses");
        let m = r.chat_messages().expect("text only");
        assert_eq!(m[0].content, "Be brief.");
        assert_eq!(m[1].name.as_deref(), Some("ann"));
        assert_eq!(m[2].content, "");
        let image = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#;
        assert!(matches!(validate_chat(image.as_bytes()), Err(e) if e.contains("`image_url`")));
        let role = r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#;
        assert!(matches!(validate_chat(role.as_bytes()), Err(e) if e.contains("`wizard`")));
    }
}
