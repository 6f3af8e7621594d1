//! Causal grouped-query attention of new queries against one session's KV cache, with
//! candle ops: the path for device caches. The CPU runs every session of a step at once in
//! [`super::host_attention`], whose tests compare it with this one.

use candle_core::{DType, Tensor};

use super::rope::Rope;
use crate::error::Result;

/// One layer's new rows for attention: the projections before RoPE, one row per token of the
/// step's segments (one segment after the other), and what to rotate and cache them with.
#[derive(Debug, Clone, Copy)]
pub struct StepRows<'a> {
    /// Queries `[n, heads * hd]`.
    pub q: &'a Tensor,
    /// Keys `[n, kv_heads * hd]`.
    pub k: &'a Tensor,
    /// Values `[n, kv_heads * hd]`.
    pub v: &'a Tensor,
    /// The layer of the stage (its slot in each session's cache).
    pub layer: usize,
    /// The rotary tables.
    pub rope: &'a Rope,
    /// Heads and widths.
    pub shape: AttnShape,
}

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// `q: [n, heads * hd]` at positions `start..start+n`; `k`, `v`: cache `[cap, kv_heads * hd]`
/// whose first `start + n` rows are filled. Returns `[n, heads * hd]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, s: AttnShape, start: usize) -> Result<Tensor> {
    let (n, _) = q.dims2()?;
    let total = start + n;
    let group = s.heads / s.kv_heads;
    let hd = s.head_dim;
    // [n, heads, hd] -> [kv, group * n, hd]
    let q = q
        .reshape((n, s.kv_heads, group, hd))?
        .permute((1, 2, 0, 3))?
        .contiguous()?;
    let q = q.reshape((s.kv_heads, group * n, hd))?;
    let kv = |t: &Tensor| -> Result<Tensor> {
        Ok(t.narrow(0, 0, total)?
            .to_dtype(DType::F32)?
            .reshape((total, s.kv_heads, hd))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let (k, v) = (kv(k)?, kv(v)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?; // [kv, group*n, total]
    let scores = if n > 1 {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, total), q.device())?;
        scores
            .reshape((s.kv_heads, group, n, total))?
            .broadcast_add(&mask)?
            .reshape((s.kv_heads, group * n, total))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
    let out = probs.matmul(&v)?; // [kv, group*n, hd]
    let out = out
        .reshape((s.kv_heads, group, n, hd))?
        .permute((2, 0, 1, 3))?
        .contiguous()?;
    Ok(out.reshape((n, s.heads * hd))?)
}
