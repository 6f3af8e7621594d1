//! Generation over a chain of stages in one process: what `shard-node generate` runs, and
//! the reference the cluster is tested against. It drives exactly the [`Stage`] code that
//! shard nodes run, one stage after the other.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::{KvCache, KvDtype, LayerRange, Segment, Stage};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::TextTokenizer;

/// Prompt tokens per prefill chunk.
pub const PREFILL_CHUNK: usize = 256;

/// Stages chained in one process.
#[derive(Debug)]
pub struct LocalPipeline {
    stages: Vec<Stage>,
    kv_dtype: KvDtype,
}

/// One session's caches, one per stage.
#[derive(Debug)]
pub struct LocalSession {
    caches: Vec<KvCache>,
}

impl LocalSession {
    /// Tokens processed so far.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    /// Whether nothing was processed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LocalPipeline {
    /// Loads one stage per range; the ranges must cover the model in order.
    pub fn load(
        file: &GgufFile,
        ranges: &[LayerRange],
        device: &Device,
        max_ctx: usize,
    ) -> Result<Self> {
        let n_layers = file.config()?.n_layers;
        let mut next = 0;
        for r in ranges {
            if r.start() != next {
                return Err(Error::BadLayerRange(format!(
                    "{r} does not start at layer {next}"
                )));
            }
            next = r.end();
        }
        if next as usize != n_layers {
            return Err(Error::BadLayerRange(format!(
                "ranges end at {next}, the model has {n_layers} layers"
            )));
        }
        let stages = ranges
            .iter()
            .map(|r| Stage::load(file, *r, device, max_ctx))
            .collect::<Result<_>>()?;
        Ok(LocalPipeline {
            stages,
            kv_dtype: KvDtype::default(),
        })
    }

    /// Wraps stages already loaded (first to last).
    pub fn from_stages(stages: Vec<Stage>) -> Self {
        LocalPipeline {
            stages,
            kv_dtype: KvDtype::default(),
        }
    }

    /// Sessions store keys and values as `dtype`.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// The stages.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    fn first(&self) -> Result<&Stage> {
        self.stages
            .first()
            .ok_or_else(|| Error::Config("empty pipeline".into()))
    }

    fn last(&self) -> Result<&Stage> {
        self.stages
            .last()
            .ok_or_else(|| Error::Config("empty pipeline".into()))
    }

    /// The most tokens a session may hold.
    pub fn max_ctx(&self) -> Result<usize> {
        Ok(self.first()?.max_ctx())
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> Result<usize> {
        Ok(self.last()?.vocab())
    }

    /// A new session bounded by `max_ctx` tokens.
    pub fn session(&self, max_ctx: usize) -> Result<LocalSession> {
        Ok(LocalSession {
            caches: self
                .stages
                .iter()
                .map(|s| s.new_cache(max_ctx, self.kv_dtype))
                .collect::<Result<_>>()?,
        })
    }

    /// Runs `tokens` through every stage; returns the last stage's logits for every row
    /// (`all`) or only for the last one, as `[rows, vocab]`.
    pub fn logits(&self, sess: &mut LocalSession, tokens: &[u32], all: bool) -> Result<Tensor> {
        let x = self.hidden(sess, tokens, all)?;
        self.last()?.head(&x)
    }

    /// The last stage's output rows before the head: every token's, or only the last's.
    fn hidden(&self, sess: &mut LocalSession, tokens: &[u32], all: bool) -> Result<Tensor> {
        let start = sess.len();
        let mut x = self.first()?.embed(tokens)?;
        for (stage, cache) in self.stages.iter().zip(sess.caches.iter_mut()) {
            x = stage.forward(&x, cache, start)?;
        }
        let n = tokens.len();
        Ok(if all { x } else { x.narrow(0, n - 1, 1)? })
    }

    /// Prefills `tokens` in chunks and returns the logits after the last one.
    pub fn prefill(&self, sess: &mut LocalSession, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            last = Some(self.logits(sess, chunk, false)?);
        }
        let last = last.ok_or_else(|| Error::InvalidInput("empty prompt".into()))?;
        Ok(last.squeeze(0)?.to_vec1::<f32>()?)
    }

    /// One decode step of several sessions at once, batched the way a node batches them
    /// (one forward pass per stage over every session's row): `tokens[i]` goes to
    /// `sessions[i]`. Returns `[sessions, vocab]` logits.
    pub fn decode_batch(
        &self,
        sessions: &mut [&mut LocalSession],
        tokens: &[u32],
    ) -> Result<Tensor> {
        let x = self.hidden_batch(sessions, tokens)?;
        self.last()?.head(&x)
    }

    /// [`LocalPipeline::decode_batch`] that returns each session's greedy pick, made the way
    /// a node makes it ([`Stage::greedy_head`]).
    pub fn decode_batch_greedy(
        &self,
        sessions: &mut [&mut LocalSession],
        tokens: &[u32],
    ) -> Result<Vec<u32>> {
        let x = self.hidden_batch(sessions, tokens)?;
        self.last()?.greedy_head(&x)
    }

    fn hidden_batch(&self, sessions: &mut [&mut LocalSession], tokens: &[u32]) -> Result<Tensor> {
        if sessions.len() != tokens.len() || tokens.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{} tokens for {} sessions",
                tokens.len(),
                sessions.len()
            )));
        }
        let mut x = self.first()?.embed(tokens)?;
        for (si, stage) in self.stages.iter().enumerate() {
            let mut segs = Vec::with_capacity(sessions.len());
            for sess in sessions.iter_mut() {
                let cache = sess
                    .caches
                    .get_mut(si)
                    .ok_or_else(|| Error::Config("session of another pipeline".into()))?;
                let start = cache.len();
                segs.push(Segment {
                    cache,
                    start,
                    len: 1,
                });
            }
            x = stage.forward_batch(&x, &mut segs)?;
        }
        Ok(x)
    }

    /// One decode step.
    pub fn decode(&self, sess: &mut LocalSession, token: u32) -> Result<Vec<f32>> {
        Ok(self
            .logits(sess, &[token], false)?
            .squeeze(0)?
            .to_vec1::<f32>()?)
    }

    /// One decode step that returns the greedy pick rather than the logits: on a GPU it is
    /// made there, on the CPU from scratch logits ([`Stage::greedy_head`]).
    pub fn decode_greedy(&self, sess: &mut LocalSession, token: u32) -> Result<u32> {
        let picks = self
            .last()?
            .greedy_head(&self.hidden(sess, &[token], false)?)?;
        picks
            .first()
            .copied()
            .ok_or_else(|| Error::InvalidInput("no logits to sample from".into()))
    }
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

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated ids (an end-of-generation id is not included).
    pub tokens: Vec<u32>,
    /// Generated text, stop string excluded.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Time spent on the prompt.
    pub prefill: Duration,
    /// Time spent on decode steps.
    pub decode: Duration,
}

/// Generates from `prompt` (token ids), calling `on_text` with each piece of text as it
/// becomes final.
pub fn generate(
    pipe: &LocalPipeline,
    tok: &TextTokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let max_ctx = pipe.max_ctx()?;
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    if prompt.len() + params.max_tokens > max_ctx {
        return Err(Error::ContextOverflow {
            needed: prompt.len() + params.max_tokens,
            max: max_ctx,
        });
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut stops = StopMatcher::new(&params.stop);
    let mut sess = pipe.session(max_ctx)?;
    let mut stream = tok.stream();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut finish = FinishReason::Length;

    let t0 = Instant::now();
    let mut logits = pipe.prefill(&mut sess, prompt)?;
    let prefill = t0.elapsed();
    let t1 = Instant::now();
    while tokens.len() < params.max_tokens {
        let id = sampler.sample(&logits)?;
        if tok.is_eog(id) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(id);
        if let Some(piece) = stream.push(id)? {
            let (out, hit) = stops.push(&piece);
            text.push_str(&out);
            on_text(&out);
            if hit {
                finish = FinishReason::Stop;
                break;
            }
        }
        if tokens.len() == params.max_tokens {
            break;
        }
        logits = pipe.decode(&mut sess, id)?;
    }
    if finish == FinishReason::Length || !stops.hit() {
        if let Some(piece) = stream.finish()? {
            let (out, _) = stops.push(&piece);
            text.push_str(&out);
            on_text(&out);
        }
        let rest = stops.flush();
        text.push_str(&rest);
        on_text(&rest);
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        text,
        finish,
        prefill,
        decode: t1.elapsed(),
    })
}
