//! Builds a `tokenizers::Tokenizer` from GGUF vocabulary metadata: gpt2-style byte-level BPE,
//! or llama SentencePiece (BPE with merges derived from the piece scores, and byte fallback).

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{unicode::NFC, NormalizerWrapper, Sequence as NormSequence};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
use crate::gguf::meta::Meta;

/// llama.cpp's token types.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tk(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    Ok(Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tk)?
    .into())
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.
fn gpt2_pre_tokenizer(pre: &str) -> Result<(Option<NormalizerWrapper>, PreTokenizerWrapper)> {
    let byte_level_regex = ByteLevel::new(false, true, true);
    let byte_level_plain = ByteLevel::new(false, true, false);
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (None, byte_level_regex.into()),
        // Digits one by one, then GPT-2's regex (llama.cpp groups these pre-tokenizers).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            None,
            Sequence::new(vec![Digits::new(true).into(), byte_level_regex.into()]).into(),
        ),
        "llama3" | "llama-bpe" | "smaug-bpe" | "lfm2" => (
            None,
            Sequence::new(vec![split(REGEX_LLAMA3)?, byte_level_plain.into()]).into(),
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            Some(NFC.into()),
            Sequence::new(vec![split(REGEX_QWEN2)?, byte_level_plain.into()]).into(),
        ),
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}`"
            )))
        }
    })
}

fn gpt2_merges(meta: &Meta<'_>) -> Result<Vec<(String, String)>> {
    meta.str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("invalid merge `{m}`")))
        })
        .collect()
}

/// SentencePiece BPE: a merge (a, b) exists wherever a+b is a piece, ranked by its score.
fn spm_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, usize, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if index.contains_key(a) && index.contains_key(b) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    id,
                    a.to_string(),
                    b.to_string(),
                ));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    merges.into_iter().map(|(_, _, a, b)| (a, b)).collect()
}

/// Builds the tokenizer, marking control, user-defined and unknown tokens as added tokens
/// so that they are matched in text (llama.cpp's `parse_special`).
pub fn build(meta: &Meta<'_>) -> Result<Tokenizer> {
    let model = meta.str("tokenizer.ggml.model")?;
    let tokens = meta.str_array("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(Error::Tokenizer("the vocabulary is empty".into()));
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let types = meta.opt_i64_array("tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        if t.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "{} token types for {} tokens",
                t.len(),
                tokens.len()
            )));
        }
    }
    let unk = meta
        .opt_u64("tokenizer.ggml.unknown_token_id")?
        .and_then(|i| tokens.get(i as usize));

    let mut tokenizer = match model {
        "gpt2" => {
            let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
            let (normalizer, pre_tok) = gpt2_pre_tokenizer(pre)?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, gpt2_merges(meta)?)
                .build()
                .map_err(tk)?;
            let mut t = Tokenizer::new(bpe);
            if let Some(n) = normalizer {
                t.with_normalizer(Some(n)).map_err(tk)?;
            }
            t.with_pre_tokenizer(Some(pre_tok));
            t.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
            t
        }
        "llama" => {
            let scores = meta
                .opt_f32_array("tokenizer.ggml.scores")?
                .unwrap_or_default();
            let merges = spm_merges(&tokens, &scores);
            let mut b = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .byte_fallback(true)
                .fuse_unk(true);
            if let Some(u) = unk {
                b = b.unk_token(u.to_string());
            }
            let mut t = Tokenizer::new(b.build().map_err(tk)?);
            let add_space = meta
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let mut norms: Vec<NormalizerWrapper> = Vec::new();
            if add_space {
                norms.push(Prepend::new("▁".into()).into());
            }
            norms.push(Replace::new(" ", "▁").map_err(tk)?.into());
            t.with_normalizer(Some(NormSequence::new(norms)))
                .map_err(tk)?;
            let mut decs: Vec<DecoderWrapper> = vec![
                tokenizers::decoders::DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tk)?),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space {
                decs.push(Strip::new(' ', 1, 0).into());
            }
            t.with_decoder(Some(DecoderSequence::new(decs)));
            t
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported tokenizer model `{other}`"
            )))
        }
    };

    if let Some(types) = &types {
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(ty, _)| matches!(**ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED))
            .map(|(_, t)| AddedToken::from(t.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(tk)?;
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spm_merges_rank_by_score() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -0.5, -0.1];
        let m = spm_merges(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, vec![("a", "bc"), ("ab", "c"), ("b", "c"), ("a", "b")]);
    }
}
