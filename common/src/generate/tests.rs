//! The decode loop against a scripted chain, with the default model's tokenizer (fetched by
//! `scripts/fetch-model.sh`).

use super::*;
use crate::gguf::GgufFile;
use crate::testing::default_model;

fn tokenizer() -> TextTokenizer {
    let file = GgufFile::open(default_model()).expect("the default model opens");
    TextTokenizer::from_gguf(&file).expect("its tokenizer")
}

/// Answers each step with the next scripted token, and checks the positions it is given.
struct Scripted {
    tokens: Vec<u32>,
    steps: Vec<(usize, usize)>,
}

impl StageChain for Scripted {
    type Error = crate::Error;

    async fn step(&mut self, start: usize, ids: &[u32]) -> Result<u32> {
        self.steps.push((start, ids.len()));
        Ok(self.tokens.remove(0))
    }
}

fn params(max_tokens: usize, stop: &[&str]) -> GenerateParams {
    GenerateParams {
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn run(
    tok: &TextTokenizer,
    prompt: &[u32],
    script: Vec<u32>,
    p: &GenerateParams,
) -> (Generation, Vec<String>, Vec<(usize, usize)>) {
    let mut chain = Scripted {
        tokens: script,
        steps: Vec::new(),
    };
    let mut pieces = Vec::new();
    let g = futures::executor::block_on(generate(&mut chain, tok, prompt, p, |t| {
        pieces.push(t);
        std::future::ready(true)
    }))
    .expect("generates");
    (g, pieces, chain.steps)
}

#[test]
fn max_tokens_ends_with_length_and_positions_follow_the_prompt() {
    let tok = tokenizer();
    let ids = tok.encode(" one two three four").expect("encode");
    let prompt = vec![1u32; PREFILL_CHUNK + 3];
    // the first chunk's sampled token is not used: only the last chunk's is
    let script = [vec![0], ids.clone()].concat();
    let (g, pieces, steps) = run(&tok, &prompt, script, &params(3, &[]));
    assert_eq!(g.finish, Some(FinishReason::Length));
    assert_eq!(g.tokens, ids[..3]);
    assert_eq!(g.text, tok.decode(&ids[..3]).expect("decode"));
    assert_eq!(pieces.concat(), g.text);
    // two prefill chunks, then one step per token fed back (not after the last)
    let p = PREFILL_CHUNK;
    assert_eq!(steps, vec![(0, p), (p, 3), (p + 3, 1), (p + 4, 1)]);
}

#[test]
fn an_end_of_generation_token_stops_unless_ignored() {
    let tok = tokenizer();
    let eog = *tok.eog_ids().iter().next().expect("an eog id");
    let word = tok.encode(" hello").expect("encode");
    let script = [word.clone(), vec![eog], word.clone()].concat();
    let (g, ..) = run(&tok, &[1], script.clone(), &params(10, &[]));
    assert_eq!(g.finish, Some(FinishReason::Stop));
    assert_eq!(g.tokens, word);
    let ignore = GenerateParams {
        ignore_eos: true,
        ..params(word.len() * 2 + 1, &[])
    };
    let (g, ..) = run(&tok, &[1], script, &ignore);
    assert_eq!(g.finish, Some(FinishReason::Length));
    assert_eq!(g.tokens.len(), word.len() * 2 + 1);
}

#[test]
fn a_stop_string_cuts_the_text_before_it() {
    let tok = tokenizer();
    let script = tok.encode(" alpha beta gamma delta").expect("encode");
    let (g, pieces, _) = run(&tok, &[1], script, &params(20, &[" gam"]));
    assert_eq!(g.finish, Some(FinishReason::Stop));
    assert_eq!(g.text, " alpha beta");
    assert_eq!(pieces.concat(), " alpha beta");
}

#[test]
fn a_consumer_that_goes_away_stops_the_loop() {
    let tok = tokenizer();
    let script = tok.encode(" a b c d e f").expect("encode");
    let mut chain = Scripted {
        tokens: script,
        steps: Vec::new(),
    };
    let g = futures::executor::block_on(generate(&mut chain, &tok, &[1], &params(20, &[]), |_| {
        std::future::ready(false)
    }))
    .expect("generates");
    assert_eq!(g.finish, None);
    assert_eq!(chain.steps.len(), 1, "no step after the consumer left");
}

#[test]
fn an_empty_prompt_is_an_error() {
    let tok = tokenizer();
    let mut chain = Scripted {
        tokens: vec![],
        steps: Vec::new(),
    };
    let r = futures::executor::block_on(generate(&mut chain, &tok, &[], &params(2, &[]), |_| {
        std::future::ready(true)
    }));
    assert!(matches!(r, Err(crate::Error::InvalidInput(_))));
}
