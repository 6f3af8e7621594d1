//! Structured output: a grammar (a JSON schema, any JSON object, a regular expression or a
//! Lark grammar) compiled by llguidance against the model's vocabulary, and the per-session
//! [`Constraint`] that masks the logits before each pick and follows the picks.
//!
//! A [`GrammarCompiler`] is built once per model from its tokenizer (the token trie and
//! llguidance's lexer slices take a moment for a large vocabulary); each session compiles its
//! grammar into a [`Constraint`]. JSON schemas are matched compactly (`", "` and `": "`
//! between items, no other whitespace) unless the schema's own `x-guidance` options say
//! otherwise: free whitespace lets a small model pad its answer with newlines until it runs
//! out of tokens.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// What a session's output must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON value valid against this JSON schema (its text).
    JsonSchema(String),
    /// A regular expression (llguidance's syntax, anchored at both ends).
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// Longest grammar text accepted (a schema, an expression or a Lark grammar).
pub const MAX_GRAMMAR_BYTES: usize = 64 << 10;

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("the grammar does not compile: {e}"))
}

impl Grammar {
    /// llguidance's form, JSON schemas with compact separators unless they choose.
    fn top_level(&self) -> Result<TopLevelGrammar> {
        let text_len = match self {
            Grammar::JsonObject => 0,
            Grammar::JsonSchema(s) | Grammar::Regex(s) | Grammar::Lark(s) => s.len(),
        };
        if text_len > MAX_GRAMMAR_BYTES {
            return Err(Error::InvalidInput(format!(
                "the grammar has {text_len} bytes; at most {MAX_GRAMMAR_BYTES}"
            )));
        }
        let compact = |mut schema: Value| {
            if let Some(o) = schema.as_object_mut() {
                o.entry("x-guidance").or_insert_with(|| {
                    json!({"whitespace_flexible": false, "item_separator": ", ",
                           "key_separator": ": "})
                });
            }
            schema
        };
        Ok(match self {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(json!({"type": "object"})))
            }
            Grammar::JsonSchema(s) => {
                let v: Value = serde_json::from_str(s)
                    .map_err(|e| invalid(format!("the schema is not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(compact(v))
            }
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        })
    }
}

/// Compiles grammars for one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// The compiler for `tok`'s vocabulary; `eos` is the token a finished grammar allows.
    pub fn new(tok: &TextTokenizer, eos: u32) -> Result<Self> {
        let words = tok.token_bytes()?;
        let vocab = words.len();
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Tokenizer(format!("grammar engine: {e}")))?;
        factory.quiet();
        Ok(GrammarCompiler { factory, vocab })
    }

    /// A fresh constraint for `g`, or an error saying why it does not compile.
    pub fn compile(&self, g: &Grammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(g.top_level()?)
            .map_err(invalid)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
        })
    }
}

/// One session's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logits of the tokens the grammar does not allow next to -inf (when it is
    /// complete, only the end-of-sequence token is allowed).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::InvalidInput(format!("grammar: {e}")))?;
        for (i, v) in logits.iter_mut().enumerate().take(self.vocab) {
            if !allowed.is_allowed(i as u32) {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Follows a picked token.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::InvalidInput(format!("grammar: {e}")))
    }
}

#[cfg(test)]
mod tests;
