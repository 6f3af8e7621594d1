//! [`Stage`]: the slice of a model that one node runs, built for a [`LayerRange`].
//!
//! A stage reads and holds only its own tensors: its blocks, plus `token_embd` on the first
//! stage, plus `output_norm` and `output` (or the tied `token_embd`) on the last. Forward is
//! split into [`Stage::embed`], [`Stage::forward`] over the blocks, and [`Stage::head`].

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::block::{Block, Segment};
use super::kv_cache::STEP_ROWS;
use super::kv_cache::{KvCache, KvDtype};
use super::layer_range::LayerRange;
use super::linear::{load_qtensor, load_vector, QLinear};
use super::rope::{Rope, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, ModelConfig};

const EMBD: &str = "token_embd.weight";
const OUT: &str = "output.weight";
const OUT_NORM: &str = "output_norm.weight";
const ROPE_FREQS: &str = "rope_freqs.weight";

#[derive(Debug)]
struct Head {
    norm: Tensor,
    output: QLinear,
}

/// A loaded model slice.
#[derive(Debug)]
pub struct Stage {
    cfg: ModelConfig,
    range: LayerRange,
    device: Device,
    vocab: usize,
    max_ctx: usize,
    embedding: Option<Arc<QTensor>>,
    blocks: Vec<Block>,
    head: Option<Head>,
    rope: Rope,
    /// The tables of the sliding-window layers, when their RoPE base differs.
    rope_local: Option<Rope>,
    tensor_names: Vec<String>,
}

impl Stage {
    /// Loads the tensors of `range` from `file` onto `device`. Sessions of this stage may
    /// hold up to `max_ctx` tokens (at most the model's context length).
    pub fn load(
        file: &GgufFile,
        range: LayerRange,
        device: &Device,
        max_ctx: usize,
    ) -> Result<Self> {
        Self::load_with_progress(file, range, device, max_ctx, |_, _| {})
    }

    /// As [`Stage::load`], calling `progress(done, total)` after each block.
    pub fn load_with_progress(
        file: &GgufFile,
        range: LayerRange,
        device: &Device,
        max_ctx: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = file.config()?;
        let range = range.check(cfg.n_layers)?;
        if max_ctx == 0 || max_ctx > cfg.context_length {
            return Err(Error::Config(format!(
                "max context {max_ctx} must be in 1..={} (the model's context length)",
                cfg.context_length
            )));
        }
        let first = range.is_first();
        let last = range.is_last(cfg.n_layers);
        let embd_desc = file.require(EMBD)?;
        let vocab = match embd_desc.dims.as_slice() {
            [v, h] if *h == cfg.hidden => *v,
            d => {
                return Err(Error::BadTensor {
                    tensor: EMBD.into(),
                    reason: format!("shape {d:?}, expected [vocab, {}]", cfg.hidden),
                })
            }
        };
        if let Some(v) = cfg.vocab_size {
            if v != vocab {
                return Err(Error::BadTensor {
                    tensor: EMBD.into(),
                    reason: format!("{vocab} rows, but the metadata says vocab_size {v}"),
                });
            }
        }

        let mut tensor_names = Vec::new();
        let tied = file.tensor(OUT).is_none();
        let embedding = if first || (last && tied) {
            tensor_names.push(EMBD.to_string());
            Some(Arc::new(load_qtensor(file, EMBD, device)?))
        } else {
            None
        };

        let mut blocks = Vec::with_capacity(range.len());
        for (done, i) in range.iter().enumerate() {
            tensor_names.extend(Block::tensor_names(file, i));
            blocks.push(Block::load(file, &cfg, i, device)?);
            progress(done + 1, range.len());
        }

        let head = if last {
            tensor_names.push(OUT_NORM.to_string());
            let norm = load_vector(file, OUT_NORM, cfg.hidden, device)?;
            let output = match (&embedding, tied) {
                (Some(e), true) => QLinear::new(EMBD, e.clone(), None)?,
                _ => {
                    tensor_names.push(OUT.to_string());
                    QLinear::load(file, OUT, vocab, cfg.hidden, device)?
                }
            };
            Some(Head { norm, output })
        } else {
            None
        };
        // A last stage that is not first keeps the tied embedding only as its head.
        let embedding = if first { embedding } else { None };

        let freq_factors = match file.tensor(ROPE_FREQS) {
            Some(_) => {
                tensor_names.push(ROPE_FREQS.to_string());
                let f = load_vector(file, ROPE_FREQS, cfg.head_dim / 2, &Device::Cpu)?;
                Some(f.to_vec1::<f32>()?)
            }
            None => None,
        };
        let scaling = RopeScaling {
            linear: cfg.rope_linear_scale,
            freq_factors,
        };
        let rope = Rope::scaled(
            cfg.rope_style,
            cfg.head_dim,
            cfg.rope_base,
            &scaling,
            max_ctx,
            device,
        )?;
        let rope_local = match cfg.sliding_window {
            Some(w) if range.iter().any(|i| cfg.window_of(i as usize).is_some()) => Some(
                Rope::new(cfg.rope_style, cfg.head_dim, w.rope_base, max_ctx, device)?,
            ),
            _ => None,
        };
        Ok(Stage {
            cfg,
            range,
            device: device.clone(),
            vocab,
            max_ctx,
            embedding,
            blocks,
            head,
            rope,
            rope_local,
            tensor_names,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The blocks this stage runs.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The most tokens a session may hold.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Whether this stage embeds tokens.
    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether this stage produces logits.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Names of the GGUF tensors this stage read.
    pub fn tensor_names(&self) -> &[String] {
        &self.tensor_names
    }

    /// Bytes held by this stage's weights (each shared tensor once).
    pub fn weight_bytes(&self) -> usize {
        let embd = self
            .embedding
            .as_ref()
            .map_or(0, |e| e.storage_size_in_bytes());
        let blocks: usize = self.blocks.iter().map(Block::nbytes).sum();
        let head = self.head.as_ref().map_or(0, |h| {
            let tied_and_counted = self
                .embedding
                .as_ref()
                .is_some_and(|e| Arc::ptr_eq(e, h.output.weight()));
            h.norm.elem_count() * 4
                + if tied_and_counted {
                    0
                } else {
                    h.output.nbytes()
                }
        });
        embd + blocks + head
    }

    /// A new, empty KV cache for one session, bounded by `max_ctx` tokens.
    pub fn new_cache(&self, max_ctx: usize, dtype: KvDtype) -> Result<KvCache> {
        if max_ctx > self.max_ctx {
            return Err(Error::Config(format!(
                "session context {max_ctx} exceeds the stage's {}",
                self.max_ctx
            )));
        }
        let windows: Vec<Option<usize>> = self
            .range
            .iter()
            .map(|i| self.cfg.window_of(i as usize))
            .collect();
        KvCache::windowed(&windows, self.cfg.kv_dim(), max_ctx, dtype, &self.device)
    }

    /// Token ids -> `[n, hidden]` hidden states. First stage only.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let e = self
            .embedding
            .as_ref()
            .ok_or_else(|| Error::InvalidInput(format!("stage {} has no embedding", self.range)))?;
        if tokens.is_empty() {
            return Err(Error::InvalidInput("no tokens to embed".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        let x = e.embedding(&ids)?;
        Ok(match self.cfg.embed_scale {
            Some(f) => (x * f64::from(f))?,
            None => x,
        })
    }

    /// Runs this stage's blocks on `x: [n, hidden]`, whose rows are the session's tokens at
    /// positions `start..start+n`; `cache` must hold exactly `start` tokens.
    pub fn forward(&self, x: &Tensor, cache: &mut KvCache, start: usize) -> Result<Tensor> {
        let len = x.dims().first().copied().unwrap_or(0);
        self.forward_batch(x, &mut [Segment { cache, start, len }])
    }

    /// Runs this stage's blocks on several sessions at once (continuous batching): `x` holds
    /// the rows of every segment, one segment after the other. Each segment's cache must hold
    /// exactly `start` tokens. Row for row the result is the one [`Stage::forward`] gives for
    /// that session alone. On an error no cache has advanced.
    pub fn forward_batch(&self, x: &Tensor, segs: &mut [Segment<'_>]) -> Result<Tensor> {
        let (n, h) = x
            .dims2()
            .map_err(|_| Error::InvalidInput(format!("activations of shape {:?}", x.dims())))?;
        if h != self.cfg.hidden || n == 0 {
            return Err(Error::InvalidInput(format!(
                "activations [{n}, {h}], expected [n>0, {}]",
                self.cfg.hidden
            )));
        }
        let rows: usize = segs.iter().map(|s| s.len).sum();
        if rows != n || segs.iter().any(|s| s.len == 0) {
            return Err(Error::InvalidInput(format!(
                "{n} activation rows for segments of {rows}"
            )));
        }
        if self.cfg.sliding_window.is_some() && segs.iter().any(|s| s.len > STEP_ROWS) {
            return self.forward_in_steps(x, segs);
        }
        for s in segs.iter_mut() {
            if s.cache.len() != s.start {
                return Err(Error::PositionMismatch {
                    cached: s.cache.len(),
                    start: s.start,
                });
            }
            s.cache.reserve(s.len)?;
        }
        let mut x = x.to_device(&self.device)?;
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::fused_decode::forward(&self.blocks, &x, segs, &self.rope)? {
            for s in segs.iter_mut() {
                s.cache.advance(s.len);
            }
            return Ok(y);
        }
        for (li, b) in self.blocks.iter().enumerate() {
            let local = self
                .cfg
                .window_of(self.range.start() as usize + li)
                .is_some();
            let rope = match (&self.rope_local, local) {
                (Some(r), true) => r,
                _ => &self.rope,
            };
            x = b.forward(&x, segs, li, rope)?;
        }
        for s in segs.iter_mut() {
            s.cache.advance(s.len);
        }
        Ok(x)
    }

    /// [`Stage::forward_batch`] for a step with a segment longer than [`STEP_ROWS`] on a
    /// model with windowed layers (whose caches take at most that many rows a step): each
    /// segment alone, [`STEP_ROWS`] rows at a time, which causal attention makes the same.
    fn forward_in_steps(&self, x: &Tensor, segs: &mut [Segment<'_>]) -> Result<Tensor> {
        let mut outs = Vec::new();
        let mut at = 0;
        for s in segs.iter_mut() {
            let mut done = 0;
            while done < s.len {
                let len = (s.len - done).min(STEP_ROWS);
                let rows = x.narrow(0, at + done, len)?;
                let mut one = [Segment {
                    cache: &mut *s.cache,
                    start: s.start + done,
                    len,
                }];
                outs.push(self.forward_batch(&rows, &mut one)?);
                done += len;
            }
            at += s.len;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// The blocks and the rope tables, for comparing paths in tests.
    #[cfg(all(test, feature = "cuda"))]
    pub(crate) fn parts(&self) -> (&[Block], &Rope) {
        (&self.blocks, &self.rope)
    }

    /// `[n, hidden]` -> each row's greedy pick ([`crate::sampling::greedy_rows`] of
    /// [`Stage::head`]); on the CPU the logits stay in a scratch buffer rather than a tensor.
    /// Last stage only.
    pub fn greedy_head(&self, x: &Tensor) -> Result<Vec<u32>> {
        let h = self
            .head
            .as_ref()
            .ok_or_else(|| Error::InvalidInput(format!("stage {} has no head", self.range)))?;
        if x.device().is_cpu() {
            let n = x.dims().first().copied().unwrap_or(0);
            let xn = super::host_rows::rms_norm(x, &h.norm, self.cfg.rms_eps as f32)?;
            let vocab = h.output.out_features();
            return match h
                .output
                .with_host_product(&xn, |y| crate::sampling::greedy_host_rows(y, n, vocab))?
            {
                Some(picks) => picks,
                None => crate::sampling::greedy_rows(&h.output.forward(&xn)?),
            };
        }
        crate::sampling::greedy_rows(&self.head(x)?)
    }

    /// `[n, hidden]` -> `[n, vocab]` logits. Last stage only.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .head
            .as_ref()
            .ok_or_else(|| Error::InvalidInput(format!("stage {} has no head", self.range)))?;
        #[cfg(feature = "cuda")]
        if let Some(y) =
            crate::cuda::fused_head::forward(&h.norm, self.cfg.rms_eps as f32, &h.output, x)?
        {
            return Ok(y);
        }
        let x = super::host_rows::rms_norm(x, &h.norm, self.cfg.rms_eps as f32)?;
        h.output.forward(&x)
    }
}
