//! The tokenizer, built from GGUF metadata, with the end-of-generation set and the chat
//! template of the model.
//!
//! # Layout
//! - [`build`]: vocabulary metadata to a `tokenizers::Tokenizer` (gpt2 BPE, llama SPM).
//! - [`chat`]: [`ChatTemplate`], `tokenizer.chat_template` rendered with minijinja.
//! - [`stream`]: [`TextStream`], incremental detokenization that never splits a character.
//! - [`tools`]: how a model's template calls tools: the grammar of a call, and calls parsed
//!   out of its output.

pub mod build;
pub mod chat;
pub mod stream;
pub mod tools;

use std::collections::BTreeSet;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::TextStream;

use crate::error::{Error, Result};
use crate::gguf::meta::Meta;
use crate::gguf::GgufFile;

/// Token texts llama.cpp treats as end of generation when the vocabulary has them.
/// Fill-in-the-middle tokens as StarCoder-style and Qwen-style vocabularies spell them.
const FIM_TEXTS: &[[&str; 3]] = &[
    ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
];

const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "</s>",
    "<end_of_utterance>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<PAD>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// Metadata keys whose ids end generation.
const EOG_KEYS: &[&str] = &[
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
];

/// The model's tokenizer and everything about text that comes with it.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eog: BTreeSet<u32>,
    eos: Option<u32>,
    fim: Option<(u32, u32, u32)>,
    chat: Option<ChatTemplate>,
    vocab_size: usize,
}

impl TextTokenizer {
    /// Builds the tokenizer described by the file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_meta(&file.meta())
    }

    /// Builds the tokenizer from raw metadata.
    pub fn from_meta(meta: &Meta<'_>) -> Result<Self> {
        let inner = build::build(meta)?;
        let tokens = meta.str_array("tokenizer.ggml.tokens")?;
        let vocab_size = tokens.len();
        let id = |key: &str| -> Result<Option<u32>> {
            Ok(match meta.opt_u64(key)? {
                Some(v) if (v as usize) < vocab_size => Some(v as u32),
                Some(v) => {
                    return Err(Error::BadKey {
                        key: key.into(),
                        reason: format!("id {v} is outside the vocabulary"),
                    })
                }
                None => None,
            })
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let add_bos = meta
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false)
            && bos.is_some();
        let mut eog = BTreeSet::new();
        for k in EOG_KEYS {
            eog.extend(id(k)?);
        }
        for (i, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(t) {
                eog.insert(i as u32);
            }
        }
        let text = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize)).map_or("", |s| *s);
        let arch = meta.opt_str("general.architecture")?;
        let source = match meta.opt_str("tokenizer.chat_template")? {
            Some(src) => Some(src),
            None => {
                let fallback = chat::builtin_for(arch.unwrap_or(""));
                if fallback.is_some() {
                    tracing::info!(
                        architecture = arch.unwrap_or(""),
                        "the model file has no tokenizer.chat_template; using the \
                         architecture's own turn format"
                    );
                }
                fallback
            }
        };
        let eos = id("tokenizer.ggml.eos_token_id")?;
        // Fill-in-the-middle tokens: the file's ids, else the usual spellings.
        let by_text = |t: &str| tokens.iter().position(|x| *x == t).map(|i| i as u32);
        let fim = match (
            id("tokenizer.ggml.fim_pre_token_id")?,
            id("tokenizer.ggml.fim_suf_token_id")?,
            id("tokenizer.ggml.fim_mid_token_id")?,
        ) {
            (Some(p), Some(s), Some(m)) => Some((p, s, m)),
            _ => FIM_TEXTS
                .iter()
                .find_map(|[p, s, m]| Some((by_text(p)?, by_text(s)?, by_text(m)?))),
        };
        let chat = match source {
            Some(src) => Some(ChatTemplate::new(src, text(bos), text(eos))?),
            None => None,
        };
        Ok(TextTokenizer {
            inner,
            bos,
            add_bos,
            eog,
            eos,
            fim,
            chat,
            vocab_size,
        })
    }

    /// The fill-in-the-middle tokens (prefix, suffix, middle), if the model has them.
    pub fn fim_tokens(&self) -> Option<(u32, u32, u32)> {
        self.fim
    }

    /// The end-of-sequence token: the file's `eos_token_id`, else the first
    /// end-of-generation token, else 0.
    pub fn eos(&self) -> u32 {
        self.eos
            .or_else(|| self.eog.iter().next().copied())
            .unwrap_or(0)
    }

    /// Each token's bytes, as a grammar matches them (special tokens behind a 0xFF marker,
    /// so that no text matches them), read from the tokenizer's own description.
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        let json: serde_json::Value = serde_json::from_str(
            &self
                .inner
                .to_string(false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| Error::Tokenizer(format!("token bytes: {e}")))?;
        words.resize(self.vocab_size, Vec::new());
        Ok(words)
    }

    /// Text to ids, with BOS when the model asks for it, special tokens parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Text to ids, special tokens parsed; BOS (when the model asks for it) only with
    /// `add_special`.
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos && add_special {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Ids to text, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Ids to text with every token rendered, special ones included (`/detokenize`).
    pub fn decode_all(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The end-of-generation ids.
    pub fn eog_ids(&self) -> &BTreeSet<u32> {
        &self.eog
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The chat template, when the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders `messages` with the model's template, ready for generation.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.chat
            .as_ref()
            .ok_or_else(|| Error::Template("the model has no chat template".into()))?
            .render(messages, true)
    }

    /// A fresh incremental decoder.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream::new(self)
    }
}
