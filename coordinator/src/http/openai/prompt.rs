//! A completion's prompt and its request.

use serde::Deserialize;

use super::Common;

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
    /// Every prompt of the request, in order (each gets its own choices).
    pub fn all(&self) -> Result<Vec<OnePrompt>, String> {
        let v = match self {
            Prompt::Text(t) => vec![OnePrompt::Text(t.clone())],
            Prompt::Ids(ids) => vec![OnePrompt::Ids(ids.clone())],
            Prompt::Texts(v) => v.iter().cloned().map(OnePrompt::Text).collect(),
            Prompt::IdLists(v) => v.iter().cloned().map(OnePrompt::Ids).collect(),
        };
        if v.is_empty() {
            return Err("`prompt` is an empty list".into());
        }
        Ok(v)
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Put the prompt's text before each choice's.
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion: the prompt is then completed in the middle, with the
    /// model's fill-in-the-middle tokens.
    pub suffix: Option<String>,
    /// Candidates generated per prompt, of which the `n` likeliest are answered.
    pub best_of: Option<u32>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

impl CompletionRequest {
    /// `best_of`, checked against `n`: the candidates per prompt (`n` when not given). Not
    /// streamed: the best are known only at the end.
    pub fn best_of(&self, n: usize) -> Result<usize, String> {
        let Some(b) = self.best_of else {
            return Ok(n);
        };
        let b = b as usize;
        if b < n || b > super::request::MAX_N as usize {
            return Err(format!(
                "`best_of` is {b}; it must be at least `n` ({n}) and at most {}",
                super::request::MAX_N
            ));
        }
        if b > n && self.common.stream {
            return Err(
                "`best_of` above `n` cannot be streamed: the best candidates are \
                        known only at the end"
                    .into(),
            );
        }
        Ok(b)
    }

    /// The text `echo` puts before a choice: the prompt's (its ids decoded, special tokens
    /// rendered). `echo` with log-probabilities (`logprobs`) would need the prompt's own:
    /// refused.
    pub fn echo_text(
        &self,
        prompt: &OnePrompt,
        tok: &common::tokenizer::TextTokenizer,
        logprobs: bool,
    ) -> Result<Option<String>, String> {
        if !self.echo {
            return Ok(None);
        }
        if logprobs {
            return Err(
                "`echo` with `logprobs` (the prompt's own log-probabilities) is not supported; \
                 ask for one of them"
                    .into(),
            );
        }
        Ok(Some(match prompt {
            OnePrompt::Text(t) => t.clone(),
            OnePrompt::Ids(ids) => tok.decode_all(ids).map_err(|e| e.to_string())?,
        }))
    }
}
