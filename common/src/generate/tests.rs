//! The decode loop against a scripted chain, with the default model's tokenizer (fetched by
//! `scripts/fetch-model.sh`).

use super::*;
use crate::gguf::GgufFile;
use crate::testing::default_model;

fn tokenizer() -> TextTokenizer {
    let file = GgufFile::open(default_model()).expect("the default model opens");
    TextTokenizer::from_gguf(&file).expect("its tokenizer")
}

/// Answers each step that picks with the next scripted token (its log-probability minus its
/// id, when `logprobs`), and records the positions and picks it is given.
struct Scripted {
    tokens: Vec<u32>,
    steps: Vec<(usize, usize)>,
    picks: Vec<bool>,
    logprobs: bool,
    /// Its prefill chunk (`None`: the trait's default).
    chunk: Option<usize>,
}

impl Scripted {
    fn new(tokens: Vec<u32>) -> Self {
        Scripted {
            tokens,
            steps: Vec::new(),
            picks: Vec::new(),
            logprobs: false,
            chunk: None,
        }
    }
}

impl StageChain for Scripted {
    type Error = crate::Error;

    async fn step(&mut self, start: usize, ids: &[u32], pick: bool) -> Result<Option<Pick>> {
        self.steps.push((start, ids.len()));
        self.picks.push(pick);
        if !pick {
            return Ok(None);
        }
        let token = self.tokens.remove(0);
        let logprobs = self.logprobs.then(|| TokenLogprobs {
            logprob: -(token as f32),
            top: vec![(token, -(token as f32))],
        });
        Ok(Some(Pick { token, logprobs }))
    }

    fn prefill_chunk(&self) -> usize {
        self.chunk.unwrap_or(PREFILL_CHUNK)
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
    let (g, pieces, chain) = run_chain(tok, prompt, Scripted::new(script), p);
    (g, pieces.into_iter().map(|p| p.text).collect(), chain.steps)
}

fn run_chain(
    tok: &TextTokenizer,
    prompt: &[u32],
    mut chain: Scripted,
    p: &GenerateParams,
) -> (Generation, Vec<Piece>, Scripted) {
    let mut pieces = Vec::new();
    let g = futures::executor::block_on(generate(&mut chain, tok, prompt, p, |t| {
        pieces.push(t);
        std::future::ready(true)
    }))
    .expect("generates");
    (g, pieces, chain)
}

#[test]
fn a_cached_prefix_is_not_prefilled_again() {
    let tok = tokenizer();
    let ids = tok.encode(" one two").expect("encode");
    let prompt = vec![1u32; PREFILL_CHUNK + 10];
    let cached = GenerateParams {
        cached: PREFILL_CHUNK + 4,
        ..params(2, &[])
    };
    let (g, _, chain) = run_chain(&tok, &prompt, Scripted::new(ids.clone()), &cached);
    // the 6 uncached prompt tokens in one step at their positions, then the decode
    assert_eq!(chain.steps[0], (PREFILL_CHUNK + 4, 6));
    assert_eq!(chain.picks, [true, true]);
    assert_eq!(g.prompt_tokens, prompt.len());
    assert_eq!(g.tokens, ids[..2]);
    // all of it cached: the last prompt token still runs, for the first pick
    let all = GenerateParams {
        cached: prompt.len(),
        ..params(1, &[])
    };
    let (_, _, chain) = run_chain(&tok, &prompt, Scripted::new(ids), &all);
    assert_eq!(chain.steps, [(prompt.len() - 1, 1)]);
}

#[test]
fn max_tokens_ends_with_length_and_positions_follow_the_prompt() {
    let tok = tokenizer();
    let ids = tok.encode(" one two three four").expect("encode");
    let prompt = vec![1u32; PREFILL_CHUNK + 3];
    // the first chunk picks no token: only the last chunk does
    let (g, pieces, chain) = run_chain(&tok, &prompt, Scripted::new(ids.clone()), &params(3, &[]));
    assert_eq!(chain.picks, [false, true, true, true]);
    let steps = chain.steps;
    let pieces: Vec<String> = pieces.into_iter().map(|p| p.text).collect();
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
    let mut chain = Scripted::new(script);
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
    let mut chain = Scripted::new(vec![]);
    let r = futures::executor::block_on(generate(&mut chain, &tok, &[], &params(2, &[]), |_| {
        std::future::ready(true)
    }));
    assert!(matches!(r, Err(crate::Error::InvalidInput(_))));
}

/// Each output token's log-probabilities come out once, in order, with the pieces; the
/// end-of-generation token's do not.
#[test]
fn log_probabilities_follow_the_output_tokens() {
    let tok = tokenizer();
    let eog = *tok.eog_ids().iter().next().expect("an eog id");
    let word = tok.encode(" hello wonderful world").expect("encode");
    let mut chain = Scripted::new([word.clone(), vec![eog]].concat());
    chain.logprobs = true;
    let (g, pieces, _) = run_chain(&tok, &[1], chain, &params(10, &[]));
    assert_eq!(g.finish, Some(FinishReason::Stop));
    let ids: Vec<u32> = g.logprobs.iter().map(|(t, _)| *t).collect();
    assert_eq!(ids, word);
    assert!(g.logprobs.iter().all(|(t, l)| l.logprob == -(*t as f32)));
    let streamed: Vec<(u32, TokenLogprobs)> =
        pieces.iter().flat_map(|p| p.logprobs.clone()).collect();
    assert_eq!(streamed, g.logprobs);
    let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(text, g.text);
}

#[test]
fn gpu_stages_get_longer_prefill_chunks() {
    assert_eq!(prefill_chunk([]), PREFILL_CHUNK);
    assert_eq!(prefill_chunk([true]), GPU_PREFILL_CHUNK);
    assert_eq!(prefill_chunk([true, true, true]), GPU_PREFILL_CHUNK);
    assert_eq!(prefill_chunk([true, false]), PREFILL_CHUNK);
    assert_eq!(prefill_chunk([false]), PREFILL_CHUNK);
    // a pass has room for a whole chunk and 256 decode steps beside it
    assert!(max_pass_rows(true) >= GPU_PREFILL_CHUNK + 256);
    assert!(max_pass_rows(false) >= PREFILL_CHUNK + 256);
    assert!(max_pass_rows(false) < max_pass_rows(true));
}

#[test]
fn the_prompt_goes_in_the_chains_chunks() {
    let tok = tokenizer();
    let ids = tok.encode(" one two").expect("encode");
    let c = GPU_PREFILL_CHUNK;
    let prompt = vec![1u32; 2 * c + 76];
    let mut chain = Scripted::new(ids);
    chain.chunk = Some(c);
    let (_, _, chain) = run_chain(&tok, &prompt, chain, &params(1, &[]));
    assert_eq!(chain.steps, [(0, c), (c, c), (2 * c, 76)]);
    assert_eq!(chain.picks, [false, false, true]);
}
