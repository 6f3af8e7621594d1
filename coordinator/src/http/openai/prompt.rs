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
