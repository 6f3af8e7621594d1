//! Grammars against the default model's vocabulary: greedy picks from made-up logits under
//! the constraint always spell text the grammar accepts.

use super::*;
use crate::gguf::GgufFile;
use crate::testing::default_model;

fn compiler() -> (TextTokenizer, GrammarCompiler) {
    let file = GgufFile::open(default_model()).expect("the default model opens");
    let tok = TextTokenizer::from_gguf(&file).expect("its tokenizer");
    let c = GrammarCompiler::new(&tok, tok.eos()).expect("compiles the vocabulary");
    (tok, c)
}

/// Picks, each step, the allowed token scored highest by a fixed pseudo-random scoring,
/// until the end-of-sequence token; returns the text.
fn walk(tok: &TextTokenizer, c: &GrammarCompiler, g: &Grammar, seed: u64) -> String {
    let mut k = c.compile(g).expect("compiles");
    let eos = tok.eos();
    let vocab = tok.vocab_size();
    let mut out = Vec::new();
    let mut x = seed;
    for _ in 0..200 {
        let mut logits: Vec<f32> = (0..vocab)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        // make the end likely, so that walks end once the grammar allows it
        logits[eos as usize] = 0.9;
        k.mask(&mut logits).expect("mask");
        let t = crate::sampling::argmax(&logits);
        assert!(
            logits[t as usize] > f32::NEG_INFINITY,
            "some token is allowed"
        );
        if t == eos {
            break;
        }
        k.commit(t).expect("commit");
        out.push(t);
    }
    tok.decode_all(&out).expect("decode")
}

#[test]
fn outputs_match_their_grammars() {
    let (tok, c) = compiler();
    let schema = r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
        "maximum": 99}, "tag": {"enum": ["a", "b"]}}, "required": ["n", "tag"],
        "additionalProperties": false}"#;
    for seed in 1..4 {
        let s = walk(&tok, &c, &Grammar::JsonSchema(schema.into()), seed);
        let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{s}");
        assert!(["a", "b"].contains(&v["tag"].as_str().unwrap_or("")), "{s}");
        let r = walk(&tok, &c, &Grammar::Regex("[0-9]{3}-[a-z]{2}".into()), seed);
        assert!(r.len() == 6 && r.as_bytes()[3] == b'-', "{r}");
        let l = walk(
            &tok,
            &c,
            &Grammar::Lark(r#"start: "yes" | "no""#.into()),
            seed,
        );
        assert!(l == "yes" || l == "no", "{l}");
    }
}

#[test]
fn bad_grammars_are_refused_with_the_reason() {
    let (_, c) = compiler();
    for g in [
        Grammar::JsonSchema("{not json".into()),
        Grammar::JsonSchema(r#"{"type": "no-such-type"}"#.into()),
        Grammar::Regex("(unclosed".into()),
        Grammar::Lark("start: undefined_rule".into()),
    ] {
        let e = c.compile(&g).expect_err("refused").to_string();
        assert!(e.contains("does not compile"), "{g:?}: {e}");
    }
}

/// Whether each token of `text` is allowed in turn, and the end after them.
fn follows(tok: &TextTokenizer, c: &GrammarCompiler, g: &Grammar, text: &str) -> bool {
    let mut k = c.compile(g).expect("compiles");
    let vocab = tok.vocab_size();
    for t in tok.encode_with(text, false).expect("encode") {
        let mut logits = vec![0.0f32; vocab];
        k.mask(&mut logits).expect("mask");
        if logits[t as usize] == f32::NEG_INFINITY {
            return false;
        }
        k.commit(t).expect("commit");
    }
    let mut logits = vec![0.0f32; vocab];
    k.mask(&mut logits).expect("mask");
    logits[tok.eos() as usize] > f32::NEG_INFINITY
}

#[test]
fn json_objects_are_compact_objects() {
    let (tok, c) = compiler();
    let g = Grammar::JsonObject;
    assert!(follows(&tok, &c, &g, r#"{"a": 1, "b": [true, null]}"#));
    assert!(!follows(&tok, &c, &g, "[1]"), "an array is not an object");
    assert!(
        !follows(&tok, &c, &g, r#"{"a": 1"#),
        "not finished: no end yet"
    );
    assert!(!follows(&tok, &c, &g, "{\n\"a\": 1}"), "no free whitespace");
}

#[test]
fn tool_call_grammars_produce_calls_that_parse() {
    use crate::tokenizer::tools::{ToolDef, ToolSyntax};
    let (tok, c) = compiler();
    let tools = [
        ToolDef {
            name: "get_weather".into(),
            parameters: serde_json::json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false}),
        },
        ToolDef {
            name: "get_time".into(),
            parameters: serde_json::json!({"type": "object", "properties": {
                "zone": {"type": "integer", "minimum": -12, "maximum": 14}},
                "required": ["zone"], "additionalProperties": false}),
        },
    ];
    for syntax in [ToolSyntax::Tagged, ToolSyntax::BareJson] {
        let g = Grammar::Lark(syntax.grammar(&tools, false));
        for seed in 1..4 {
            let text = walk(&tok, &c, &g, seed);
            let p = syntax.parse(&text);
            assert_eq!(p.calls.len(), 1, "{syntax:?}: {text}");
            assert_eq!(p.content, "", "{text}");
            let args: Value = serde_json::from_str(&p.calls[0].arguments).expect("JSON");
            match p.calls[0].name.as_str() {
                "get_weather" => {
                    assert!(
                        ["c", "f"].contains(&args["unit"].as_str().unwrap_or("")),
                        "{text}"
                    )
                }
                "get_time" => assert!(
                    args["zone"]
                        .as_i64()
                        .is_some_and(|z| (-12..=14).contains(&z)),
                    "{text}"
                ),
                other => panic!("unknown tool {other}: {text}"),
            }
        }
    }
}
