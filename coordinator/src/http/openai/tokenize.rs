//! `/tokenize` and `/detokenize` bodies.

use serde::Deserialize;

/// `POST /tokenize` (llama.cpp's server takes `content`, vLLM's `prompt`).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    /// The model whose tokenizer (default: the default model).
    pub model: Option<String>,
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
    /// The model whose tokenizer (default: the default model).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}
