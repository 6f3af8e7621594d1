//! Log-probabilities in responses, as OpenAI shapes them: chat's `logprobs.content` entries
//! (token, logprob, bytes, top_logprobs), and completions' parallel lists (tokens,
//! token_logprobs, top_logprobs, text_offset).

use common::sampling::TokenLogprobs;
use common::tokenizer::TextTokenizer;
use serde_json::{json, Map, Value};

/// A token's text as the tokenizer renders it alone (special tokens included).
fn text(tok: &TextTokenizer, id: u32) -> String {
    tok.decode_all(&[id]).unwrap_or_default()
}

fn entry(tok: &TextTokenizer, id: u32, logprob: f32) -> Value {
    let t = text(tok, id);
    json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
}

/// Chat's `logprobs` object for these tokens: `{"content": [...]}`.
pub fn chat(tok: &TextTokenizer, items: &[(u32, TokenLogprobs)]) -> Value {
    let content: Vec<Value> = items
        .iter()
        .map(|(id, l)| {
            let mut e = entry(tok, *id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(tok, t, lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` object for these tokens; `offset` is the text offset (in
/// characters) of the first one, advanced past them.
pub fn completion(
    tok: &TextTokenizer,
    items: &[(u32, TokenLogprobs)],
    offset: &mut usize,
) -> Value {
    let (mut tokens, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    for (id, l) in items {
        let t = text(tok, *id);
        offs.push(*offset);
        *offset += t.chars().count();
        tokens.push(t);
        lps.push(l.logprob);
        let top: Map<String, Value> = l
            .top
            .iter()
            .map(|&(t, lp)| (text(tok, t), json!(lp)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

/// The `logprobs` of a response or chunk: `null` when they were not asked for.
pub fn field(
    tok: &TextTokenizer,
    chat_api: bool,
    asked: bool,
    items: &[(u32, TokenLogprobs)],
    offset: &mut usize,
) -> Value {
    match (asked, chat_api) {
        (false, _) => Value::Null,
        (true, true) => chat(tok, items),
        (true, false) => completion(tok, items, offset),
    }
}
