//! Generation: the one decode loop, for stages in this process and for a cluster's stages alike.
//!
//! The loop ([`generate`]) prefills the prompt in chunks, then feeds each sampled token back
//! until an end-of-generation token, a stop string or `max_tokens`. It reaches the stages only
//! through [`StageChain`], so where they run is not its concern; the text side (streamed
//! detokenizing, stop strings, the finish reason) is [`Decoder`], which does no I/O.
//!
//! # Layout
//! - [`StageChain`], [`Decoder`] and [`generate`]: this file.
//! - [`local`]: [`LocalPipeline`], stages chained in one process, and its [`LocalChain`]. The
//!   coordinator's chain of remote stages lives in the coordinator crate.

pub mod local;

use std::future::Future;
use std::time::{Duration, Instant};

use tracing::Instrument;

pub use local::{LocalChain, LocalPipeline, LocalSession};

use crate::error::Result;
use crate::sampling::{Pick, SamplingParams, TokenLogprobs};
use crate::stop::StopMatcher;
use crate::tokenizer::{TextStream, TextTokenizer};

/// Prompt tokens per prefill chunk where any stage runs on the CPU: a chunk holds up the
/// decode steps batched beside it, so it stays short there.
pub const PREFILL_CHUNK: usize = 256;

/// Prompt tokens per prefill chunk when every stage runs on a GPU: a chunk's products
/// dequantize every weight to f16 once ([`crate::cuda::f16_gemm`]), so longer chunks share
/// that cost among more tokens, while a chunk of an 8B model still takes about 0.1 s.
pub const GPU_PREFILL_CHUNK: usize = 2048;

/// Most token rows of one forward pass on a GPU node: the longest prefill chunk plus 256
/// decode steps, so that the decode steps queued beside a chunk run in its pass instead of
/// waiting for the next one.
pub const GPU_MAX_PASS_ROWS: usize = GPU_PREFILL_CHUNK + 256;

/// Most token rows of one forward pass on a CPU node: two chunks and 256 decode steps, what
/// every node took before GPU chunks grew. More would make the decode steps batched beside
/// them wait longer (SmolLM2 on 2 cores runs about 500 prompt tokens a second).
pub const CPU_MAX_PASS_ROWS: usize = 2 * PREFILL_CHUNK + 256;

/// [`GPU_MAX_PASS_ROWS`] or [`CPU_MAX_PASS_ROWS`].
pub fn max_pass_rows(gpu: bool) -> usize {
    if gpu {
        GPU_MAX_PASS_ROWS
    } else {
        CPU_MAX_PASS_ROWS
    }
}

/// The prefill chunk for stages whose devices are GPUs or not (`gpu`, one a stage).
pub fn prefill_chunk(gpu: impl IntoIterator<Item = bool>) -> usize {
    let mut gpu = gpu.into_iter().peekable();
    if gpu.peek().is_some() && gpu.all(|g| g) {
        GPU_PREFILL_CHUNK
    } else {
        PREFILL_CHUNK
    }
}

/// A chain of stages with one session open on it, first stage to last.
pub trait StageChain {
    /// What a step can fail with.
    type Error: From<crate::Error>;

    /// Runs `ids`, at positions from `start`, through every stage; with `pick`, returns the
    /// token the last stage sampled after the last of them (without, the last stage skips
    /// its head and returns `None`: a prompt's earlier chunks).
    fn step(
        &mut self,
        start: usize,
        ids: &[u32],
        pick: bool,
    ) -> impl Future<Output = Result<Option<Pick>, Self::Error>>;

    /// Prompt tokens a prefill step takes at most ([`prefill_chunk`] of the stages).
    fn prefill_chunk(&self) -> usize {
        PREFILL_CHUNK
    }
}

/// Text that became final, with the log-probabilities of the tokens generated since the last
/// piece (when they were asked for).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Piece {
    /// The text (never empty, except in the last piece, which may carry only log-probs).
    pub text: String,
    /// Each token's id and log-probabilities, in order.
    pub logprobs: Vec<(u32, TokenLogprobs)>,
}

/// What a generation asks for.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    /// Most new tokens.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Texts that end the generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Go on past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Prompt tokens the session's KV cache holds already (a prefix computed once for
    /// several choices): the prefill starts after them. The prompt's last token always runs,
    /// since its pick is the first output token.
    pub cached: usize,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, or the context bound.
    Length,
}

impl FinishReason {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a sampled token means for the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Go on; this text became final (it may be empty).
    Text(String),
    /// The generation is over; this text is its last.
    Done(String, FinishReason),
}

/// The text side of generation, with no I/O: sampled ids in, final text out.
#[derive(Debug)]
pub struct Decoder<'t> {
    tok: &'t TextTokenizer,
    stream: TextStream<'t>,
    stops: StopMatcher,
    max_tokens: usize,
    ignore_eos: bool,
    tokens: Vec<u32>,
}

impl<'t> Decoder<'t> {
    /// A decoder for `params`.
    pub fn new(tok: &'t TextTokenizer, params: &GenerateParams) -> Self {
        Decoder {
            tok,
            stream: tok.stream(),
            stops: StopMatcher::new(&params.stop),
            max_tokens: params.max_tokens,
            ignore_eos: params.ignore_eos,
            tokens: Vec::new(),
        }
    }

    /// The ids generated so far (an end-of-generation id is not counted).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Takes the next sampled id.
    pub fn push(&mut self, id: u32) -> Result<Decoded> {
        if self.tokens.len() >= self.max_tokens {
            return Ok(Decoded::Done(self.tail()?, FinishReason::Length));
        }
        if self.tok.is_eog(id) && !self.ignore_eos {
            return Ok(Decoded::Done(self.tail()?, FinishReason::Stop));
        }
        self.tokens.push(id);
        let mut out = String::new();
        if let Some(piece) = self.stream.push(id)? {
            let (text, hit) = self.stops.push(&piece);
            if hit {
                return Ok(Decoded::Done(text, FinishReason::Stop));
            }
            out = text;
        }
        if self.tokens.len() == self.max_tokens {
            out.push_str(&self.tail()?);
            return Ok(Decoded::Done(out, FinishReason::Length));
        }
        Ok(Decoded::Text(out))
    }

    /// What the stream and the stop matcher still hold back, at the end.
    fn tail(&mut self) -> Result<String> {
        let mut tail = String::new();
        if let Some(piece) = self.stream.finish()? {
            tail.push_str(&self.stops.push(&piece).0);
        }
        tail.push_str(&self.stops.flush());
        Ok(tail)
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated ids (an end-of-generation id is not included).
    pub tokens: Vec<u32>,
    /// Generated text, stop string excluded.
    pub text: String,
    /// Each generated token's log-probabilities, when they were asked for.
    pub logprobs: Vec<(u32, TokenLogprobs)>,
    /// Why it ended; `None`: whoever took the text went away first.
    pub finish: Option<FinishReason>,
    /// Time spent on the prompt.
    pub prefill: Duration,
    /// Time spent on decode steps.
    pub decode: Duration,
}

/// Generates from `prompt` (token ids) on `chain`, handing each piece of text to `emit` as
/// it becomes final (never an empty one), with the log-probabilities of the tokens since the
/// last piece; log-probabilities left when generation ends go out in a last piece of no
/// text. When `emit` answers `false` the consumer is gone and generation stops.
pub async fn generate<C, F>(
    chain: &mut C,
    tok: &TextTokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut emit: impl FnMut(Piece) -> F,
) -> Result<Generation, C::Error>
where
    C: StageChain,
    F: Future<Output = bool>,
{
    let mut out = Generation {
        prompt_tokens: prompt.len(),
        tokens: Vec::new(),
        text: String::new(),
        logprobs: Vec::new(),
        finish: None,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
    };
    // One span per phase, the chain's steps under it (a trace shows where the time went
    // without a span per token: see `crate::telemetry::DECODE_TRACE_EVERY`).
    let cached = params.cached.min(prompt.len().saturating_sub(1));
    let fresh = &prompt[cached..];
    let chunk_len = chain.prefill_chunk().max(1);
    let chunks = fresh.len().div_ceil(chunk_len);
    let prefill = tracing::info_span!("prefill", tokens = fresh.len(), cached, chunks);
    let t0 = Instant::now();
    let mut pos = cached;
    let mut next = None;
    for (i, chunk) in fresh.chunks(chunk_len).enumerate() {
        let last = i + 1 == chunks;
        next = chain
            .step(pos, chunk, last)
            .instrument(prefill.clone())
            .await?;
        pos += chunk.len();
    }
    drop(prefill);
    out.prefill = t0.elapsed();
    let decode = tracing::info_span!("decode", steps = tracing::field::Empty);
    let mut steps = 0u64;
    let t1 = Instant::now();
    let mut decoder = Decoder::new(tok, params);
    let Some(mut next) = next else {
        let what = if prompt.is_empty() {
            "the prompt is empty"
        } else {
            "the last stage picked no token"
        };
        return Err(crate::Error::InvalidInput(what.into()).into());
    };
    let mut pending: Vec<(u32, TokenLogprobs)> = Vec::new();
    loop {
        let pushed = decoder.tokens().len();
        let (text, finish) = match decoder.push(next.token)? {
            Decoded::Text(t) => (t, None),
            Decoded::Done(t, f) => (t, Some(f)),
        };
        // The token's log-probabilities, if it is part of the output.
        if let Some(l) = next.logprobs.take() {
            if decoder.tokens().len() > pushed {
                pending.push((next.token, l));
            }
        }
        if !text.is_empty() || (finish.is_some() && !pending.is_empty()) {
            out.text.push_str(&text);
            out.logprobs.extend(pending.iter().cloned());
            let piece = Piece {
                text,
                logprobs: std::mem::take(&mut pending),
            };
            if !emit(piece).await {
                break;
            }
        }
        if finish.is_some() {
            out.finish = finish;
            break;
        }
        // Only the traced steps run in the `decode` span: the others would enter and leave
        // it at every poll for nothing.
        let ids = [next.token];
        let step = chain.step(pos, &ids, true);
        let picked = if crate::telemetry::traced_step(pos) {
            step.instrument(decode.clone()).await?
        } else {
            step.await?
        };
        next = picked
            .ok_or_else(|| crate::Error::InvalidInput("the last stage picked no token".into()))?;
        pos += 1;
        steps += 1;
    }
    decode.record("steps", steps);
    out.decode = t1.elapsed();
    out.tokens = std::mem::take(&mut decoder.tokens);
    Ok(out)
}

#[cfg(test)]
mod tests;
