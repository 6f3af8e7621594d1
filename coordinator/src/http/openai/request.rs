//! The fields both endpoints share, and their checks.

use serde::Deserialize;
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
    /// Not an OpenAI field (vLLM and llama.cpp have it): keep only tokens at least this
    /// likely relative to the most likely one.
    pub min_p: Option<f32>,
    /// In [-2, 2].
    pub presence_penalty: Option<f32>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// Not an OpenAI field (vLLM has it): in (0, 2], 1 is off.
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<Map<String, Value>>,
    /// Chat: `true` to get log-probabilities; completions: how many alternatives with them.
    pub logprobs: Option<Value>,
    /// Chat: how many alternatives with each token's log-probability (needs `logprobs`).
    pub top_logprobs: Option<u32>,
    /// Choices per prompt, default 1.
    pub n: Option<u32>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`, and this server's extensions
    /// `{"type": "regex", "regex": "..."}` and `{"type": "grammar", "grammar": "<Lark>"}`.
    pub response_format: Option<Value>,
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
];

/// Completion fields a chat request may carry only at their default (the completion request
/// takes them itself).
pub const COMPLETION_ONLY: &[(&str, IsDefault)] = &[
    ("best_of", |v| v.as_u64() == Some(1)),
    ("echo", |v| v.as_bool() == Some(false)),
    ("suffix", |v| v.as_str() == Some("")),
];

/// Chat fields a completion request may carry only at a value that asks for nothing (the
/// chat request takes them itself).
pub const CHAT_ONLY: &[(&str, IsDefault)] = &[
    ("tools", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("tool_choice", |v| {
        matches!(v.as_str(), Some("none" | "auto"))
    }),
    ("parallel_tool_calls", Value::is_boolean),
];

/// Most choices per prompt (`n`).
pub const MAX_N: u32 = 16;

/// Most entries of `logit_bias` (OpenAI's limit is not documented; vLLM takes any).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Which endpoint a request came to: some fields differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

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
    /// What the output must match (`response_format`), not compiled yet.
    pub grammar: Option<common::grammar::Grammar>,
}

impl Common {
    /// The fields of [`Common::rest`] that are not OpenAI's and so are ignored.
    pub fn ignored_fields(&self) -> Vec<&str> {
        self.rest
            .keys()
            .map(String::as_str)
            .filter(|k| {
                !IGNORED.contains(k)
                    && !CHAT_ONLY.iter().any(|(n, _)| n == k)
                    && !COMPLETION_ONLY.iter().any(|(n, _)| n == k)
                    && !NOT_YET.iter().any(|(n, _)| n == k)
            })
            .collect()
    }

    /// The log-probabilities asked for: chat's `logprobs: true` with `top_logprobs`,
    /// completions' `logprobs: k`.
    fn logprobs(&self, at: Endpoint) -> Result<Option<u32>, String> {
        let v = self.logprobs.as_ref().filter(|v| !v.is_null());
        match at {
            Endpoint::Chat => {
                let on = match v {
                    None => false,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        format!("`logprobs` is true or false in a chat request (got {v})")
                    })?,
                };
                match (on, self.top_logprobs) {
                    (false, Some(k)) if k > 0 => {
                        Err("`top_logprobs` needs `logprobs: true`".to_string())
                    }
                    (false, _) => Ok(None),
                    (true, k) => Ok(Some(k.unwrap_or(0))),
                }
            }
            Endpoint::Completion => {
                if self.top_logprobs.is_some() {
                    return Err(
                        "`top_logprobs` is a chat field; completions take `logprobs: k`".into(),
                    );
                }
                match v {
                    None => Ok(None),
                    Some(Value::Bool(false)) => Ok(None),
                    Some(v) => v
                        .as_u64()
                        .map(|k| Some(k.min(u64::from(u32::MAX)) as u32))
                        .ok_or_else(|| {
                            format!("`logprobs` is a count in a completion request (got {v})")
                        }),
                }
            }
        }
    }

    /// `n`, checked: 1 to [`MAX_N`].
    pub fn n(&self) -> Result<usize, String> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_N => Ok(n as usize),
            n => Err(format!("`n` is {n}; it must be 1 to {MAX_N}")),
        }
    }

    /// The grammar `response_format` asks for.
    fn grammar(&self) -> Result<Option<common::grammar::Grammar>, String> {
        use common::grammar::Grammar;
        let Some(f) = self.response_format.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let text = |key: &str| {
            f[key].as_str().map(str::to_string).ok_or_else(|| {
                format!(
                    "`response_format` of type `{}` needs a string `{key}`",
                    f["type"]
                )
            })
        };
        match f["type"].as_str() {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Grammar::JsonObject)),
            Some("json_schema") => {
                let schema = &f["json_schema"]["schema"];
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(
                        "`response_format.json_schema.schema` must be a JSON schema object".into(),
                    );
                }
                Ok(Some(Grammar::JsonSchema(schema.to_string())))
            }
            Some("regex") => Ok(Some(Grammar::Regex(text("regex")?))),
            Some("grammar") => Ok(Some(Grammar::Lark(text("grammar")?))),
            other => Err(format!(
                "`response_format` type {} is not one of text, json_object, json_schema, regex, \
                 grammar",
                other.map_or_else(|| "(missing)".to_string(), |t| format!("`{t}`"))
            )),
        }
    }

    /// `logit_bias` as (token, bias) pairs; ids are checked against the vocabulary later.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, String> {
        let Some(m) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        if m.len() > MAX_LOGIT_BIAS {
            return Err(format!(
                "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS}",
                m.len()
            ));
        }
        m.iter()
            .map(|(k, v)| {
                let id = k
                    .parse::<u32>()
                    .map_err(|_| format!("`logit_bias` keys are token ids; `{k}` is not one"))?;
                let b = v
                    .as_f64()
                    .ok_or_else(|| format!("`logit_bias` of token {id} is not a number: {v}"))?;
                Ok((id, b as f32))
            })
            .collect()
    }

    /// Checks every field: sampling ranges, the stop strings' count and lengths, and that no
    /// field asks for something this server does not do.
    pub fn checked(&self, at: Endpoint) -> Result<Checked, String> {
        let (other, fields) = match at {
            Endpoint::Completion => ("/v1/chat/completions", CHAT_ONLY),
            Endpoint::Chat => ("/v1/completions", COMPLETION_ONLY),
        };
        for (name, is_default) in fields {
            if let Some(v) = self.rest.get(*name) {
                if !v.is_null() && !is_default(v) {
                    return Err(format!(
                        "`{name}` is not a field of this endpoint: send it to {other}"
                    ));
                }
            }
        }
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
            min_p: self.min_p.unwrap_or(0.0),
            seed: self.seed.unwrap_or(0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            logit_bias: self.logit_bias()?,
            logprobs: self.logprobs(at)?,
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
            grammar: self.grammar()?,
        })
    }
}
