//! A chain of stages in one process: what `shard-node generate` runs, and the reference the
//! cluster is tested against. It drives exactly the [`Stage`] code that shard nodes run, one
//! stage after the other; [`LocalChain`] is its [`StageChain`].

use candle_core::{Device, Tensor};

use super::StageChain;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::{KvCache, KvDtype, LayerRange, Segment, Stage};
use crate::sampling::{Pick, Sampler};

/// Stages chained in one process.
#[derive(Debug)]
pub struct LocalPipeline {
    stages: Vec<Stage>,
    kv_dtype: KvDtype,
    /// Prompt tokens a prefill step takes ([`super::prefill_chunk`] of the stages' devices).
    chunk: usize,
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
        Ok(Self::from_stages(stages))
    }

    /// Wraps stages already loaded (first to last).
    pub fn from_stages(stages: Vec<Stage>) -> Self {
        let chunk = super::prefill_chunk(stages.iter().map(|s| s.device().is_cuda()));
        LocalPipeline {
            stages,
            kv_dtype: KvDtype::default(),
            chunk,
        }
    }

    /// Prefill steps take at most `chunk` prompt tokens (default: [`super::prefill_chunk`]).
    pub fn with_prefill_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// Prompt tokens a prefill step takes at most.
    pub fn prefill_chunk(&self) -> usize {
        self.chunk
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
        for chunk in tokens.chunks(self.chunk) {
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

/// One session on a [`LocalPipeline`], sampled on the host: the local [`StageChain`].
#[derive(Debug)]
pub struct LocalChain<'p> {
    pipe: &'p LocalPipeline,
    session: LocalSession,
    sampler: Sampler,
}

impl<'p> LocalChain<'p> {
    /// A session of at most `max_ctx` tokens on `pipe`, sampled by `sampler`.
    pub fn new(pipe: &'p LocalPipeline, max_ctx: usize, sampler: Sampler) -> Result<Self> {
        Ok(LocalChain {
            pipe,
            session: pipe.session(max_ctx)?,
            sampler,
        })
    }
}

impl StageChain for LocalChain<'_> {
    type Error = Error;

    async fn step(&mut self, start: usize, ids: &[u32], pick: bool) -> Result<Option<Pick>> {
        if start != self.session.len() {
            return Err(Error::PositionMismatch {
                cached: self.session.len(),
                start,
            });
        }
        if !pick {
            self.pipe.hidden(&mut self.session, ids, false)?;
            return Ok(None);
        }
        let logits = self.pipe.logits(&mut self.session, ids, false)?;
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        self.sampler.pick(&row).map(Some)
    }

    fn prefill_chunk(&self) -> usize {
        self.pipe.chunk
    }
}
