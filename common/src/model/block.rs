//! One transformer block: RMSNorm, grouped-query attention with RoPE, RMSNorm, a gated
//! feed-forward network; with the parts some families add: RMS norms on each head's query
//! and key (qwen3, gemma 3), norms after attention and after the FFN (gemma 3), GELU gating
//! (gemma 3) and a sliding attention window (gemma 3's local layers).

use candle_core::{Device, Tensor};

use super::attention::{attend_each, AttnShape, StepRows};
use super::kv_cache::KvCache;
use super::linear::{load_vector, MultiLinear, QLinear};
use super::rope::Rope;
use super::{host_attention, host_rows};
use crate::error::{Error, Result};
use crate::gguf::{Activation, GgufFile, ModelConfig};

/// Weights of one block.
#[derive(Debug)]
pub struct Block {
    attn_norm: Tensor,
    qkv: MultiLinear,
    o: QLinear,
    ffn_norm: Tensor,
    gate_up: MultiLinear,
    down: QLinear,
    shape: AttnShape,
    eps: f32,
    /// Per-head RMS norms of the queries and keys, before RoPE.
    qk_norm: Option<(Tensor, Tensor)>,
    /// Norms of the attention output and of the FFN output, before each residual add.
    post_norms: Option<(Tensor, Tensor)>,
    activation: Activation,
    /// Keys a query sees on this layer, itself included (`None`: all).
    window: Option<usize>,
}

/// The optional per-block tensors, by GGUF suffix.
const OPTIONAL: [&str; 7] = [
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
    "post_attention_norm.weight",
    "post_ffw_norm.weight",
];

impl Block {
    /// The GGUF tensor names of block `i` (biases included when present).
    pub fn tensor_names(file: &GgufFile, i: u32) -> Vec<String> {
        let p = format!("blk.{i}.");
        let mut names: Vec<String> = [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ]
        .iter()
        .map(|s| format!("{p}{s}"))
        .collect();
        for b in OPTIONAL {
            let n = format!("{p}{b}");
            if file.tensor(&n).is_some() {
                names.push(n);
            }
        }
        names
    }

    /// Loads block `i` onto `device`.
    pub fn load(file: &GgufFile, cfg: &ModelConfig, i: u32, device: &Device) -> Result<Self> {
        let n = |s: &str| format!("blk.{i}.{s}");
        let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        let (qn, kn, vn) = (n("attn_q.weight"), n("attn_k.weight"), n("attn_v.weight"));
        let (qb, kb, vb) = (n("attn_q.bias"), n("attn_k.bias"), n("attn_v.bias"));
        let qkv = MultiLinear::load(
            file,
            &[&qn, &kn, &vn],
            &[q, kv, kv],
            h,
            Some(&[&qb, &kb, &vb]),
            device,
        )?;
        let (gn, un) = (n("ffn_gate.weight"), n("ffn_up.weight"));
        // Norm pairs: both or neither (one alone is a broken file).
        let pair = |a: &str, b: &str, len: usize| -> Result<Option<(Tensor, Tensor)>> {
            match (file.tensor(&n(a)).is_some(), file.tensor(&n(b)).is_some()) {
                (false, false) => Ok(None),
                (true, true) => Ok(Some((
                    load_vector(file, &n(a), len, device)?,
                    load_vector(file, &n(b), len, device)?,
                ))),
                _ => Err(Error::BadTensor {
                    tensor: n(a),
                    reason: format!("{a} and {b} come in pairs; this block has one"),
                }),
            }
        };
        Ok(Block {
            qk_norm: pair("attn_q_norm.weight", "attn_k_norm.weight", cfg.head_dim)?,
            post_norms: pair("post_attention_norm.weight", "post_ffw_norm.weight", h)?,
            activation: cfg.activation,
            window: cfg.window_of(i as usize),
            attn_norm: load_vector(file, &n("attn_norm.weight"), h, device)?,
            qkv,
            o: QLinear::load(file, &n("attn_output.weight"), h, q, device)?,
            ffn_norm: load_vector(file, &n("ffn_norm.weight"), h, device)?,
            gate_up: MultiLinear::load(file, &[&gn, &un], &[f, f], h, None, device)?,
            down: QLinear::load(file, &n("ffn_down.weight"), h, f, device)?,
            shape: AttnShape {
                heads: cfg.n_heads,
                kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
            },
            eps: cfg.rms_eps as f32,
        })
    }

    /// Bytes held by the block's weights.
    pub fn nbytes(&self) -> usize {
        let pair = |p: &Option<(Tensor, Tensor)>| {
            p.as_ref()
                .map_or(0, |(a, b)| (a.elem_count() + b.elem_count()) * 4)
        };
        (self.attn_norm.elem_count() + self.ffn_norm.elem_count()) * 4
            + pair(&self.qk_norm)
            + pair(&self.post_norms)
            + self.qkv.nbytes()
            + self.o.nbytes()
            + self.gate_up.nbytes()
            + self.down.nbytes()
    }

    /// Runs the block on `x: [Σ len, hidden]`, whose rows are the segments' tokens one
    /// segment after the other, writing each segment's keys and values into layer `li` of its
    /// own cache (already reserved). The projections run once over all rows; attention runs
    /// for all segments at once on the CPU, per segment elsewhere, each against its own cache.
    pub fn forward(
        &self,
        x: &Tensor,
        segs: &mut [Segment<'_>],
        li: usize,
        rope: &Rope,
    ) -> Result<Tensor> {
        let s = self.shape;
        let h = host_rows::rms_norm(x, &self.attn_norm, self.eps)?;
        let parts = self.qkv.forward(&h)?;
        let [q, k, v] = <[Tensor; 3]>::try_from(parts)
            .map_err(|_| Error::InvalidInput("qkv projection did not split in three".into()))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (
                host_rows::rms_norm_heads(&q, qn, s.head_dim, self.eps)?,
                host_rows::rms_norm_heads(&k, kn, s.head_dim, self.eps)?,
            ),
            None => (q, k),
        };
        let rows = StepRows {
            q: &q,
            k: &k,
            v: &v,
            layer: li,
            rope,
            shape: s,
            window: self.window,
        };
        let a = if segs.iter().all(|g| g.cache.is_host()) {
            host_attention::attend(rows, segs)?
        } else if let Some(a) = cuda_decode(rows, segs)? {
            a
        } else {
            attend_each(rows, segs)?
        };
        let post = |t: Tensor, which: usize| -> Result<Tensor> {
            match &self.post_norms {
                Some(p) => host_rows::rms_norm(&t, if which == 0 { &p.0 } else { &p.1 }, self.eps),
                None => Ok(t),
            }
        };
        let x = (x + post(self.o.forward(&a)?, 0)?)?;
        let h = host_rows::rms_norm(&x, &self.ffn_norm, self.eps)?;
        let fast = match self.gate_up.gate_mul_host(&h, self.activation)? {
            Some(act) => Some(act),
            None => self.gate_up.gate_mul_device(&h, self.activation)?,
        };
        let act = match fast {
            Some(act) => act,
            None => {
                let parts = self.gate_up.forward(&h)?;
                let [g, u] = <[Tensor; 2]>::try_from(parts).map_err(|_| {
                    Error::InvalidInput("gate/up projection did not split in two".into())
                })?;
                host_rows::gate_mul(&g, &u, self.activation)?
            }
        };
        Ok((x + post(self.down.forward(&act)?, 1)?)?)
    }
}

/// What the fused CUDA decode path reads of a block (see `crate::cuda::fused_decode`).
#[derive(Debug, Clone)]
pub struct FusedParts<'a> {
    /// `[hidden]` f32.
    pub attn_norm: &'a Tensor,
    /// `[q + 2 kv, hidden]`: the query, key and value rows, in one matrix or, where their
    /// types differ (Q4_K_M files keep some value matrices in Q6_K), in three.
    pub qkv: Vec<&'a QLinear>,
    /// `[hidden, q]`.
    pub o: &'a QLinear,
    /// `[hidden]` f32.
    pub ffn_norm: &'a Tensor,
    /// `[2 ffn, hidden]`: the gate rows, then the up rows.
    pub gate_up: &'a QLinear,
    /// `[hidden, ffn]`.
    pub down: &'a QLinear,
    /// Heads.
    pub shape: AttnShape,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl Block {
    /// The block's parts for the fused path: `None` when gate/up is not one matrix (their
    /// types differ) or a projection has a bias.
    pub fn fused_parts(&self) -> Option<FusedParts<'_>> {
        // The fused kernels implement the llama block only.
        let llama_block = self.qk_norm.is_none()
            && self.post_norms.is_none()
            && self.activation == Activation::Silu
            && self.window.is_none();
        if !llama_block || self.o.has_bias() || self.down.has_bias() {
            return None;
        }
        Some(FusedParts {
            attn_norm: &self.attn_norm,
            qkv: self.qkv.parts_without_bias()?,
            o: &self.o,
            ffn_norm: &self.ffn_norm,
            gate_up: self.gate_up.single()?,
            down: &self.down,
            shape: self.shape,
            eps: self.eps,
        })
    }
}

/// Attention through the CUDA decode kernels, when they take this step: every decode row on
/// an f16 CUDA cache goes through them, any prefill chunk beside them through candle's ops;
/// `None` when no segment is a decode row. [`crate::cuda_options`] turns them off, for
/// comparisons.
fn cuda_decode(rows: StepRows<'_>, segs: &mut [Segment<'_>]) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if rows.window.is_none() {
        use crate::cuda::decode_attention;
        let o = crate::cuda_options::get();
        // `mixed` off: steps that hold a prefill chunk take candle's ops throughout.
        if o.attention && (o.mixed || decode_attention::applies(segs, rows.layer, rows.shape)) {
            return decode_attention::attend_mixed(rows, segs);
        }
    }
    let _ = (rows, segs);
    Ok(None)
}

/// One session's rows in a forward pass: `len` tokens at positions `start..start+len`.
#[derive(Debug)]
pub struct Segment<'a> {
    /// The session's cache on this stage.
    pub cache: &'a mut KvCache,
    /// Position of the first row.
    pub start: usize,
    /// Rows.
    pub len: usize,
}
