//! Causal grouped-query attention of new queries against one session's KV cache, with
//! candle ops: the path for device caches. The CPU runs every session of a step at once in
//! [`super::host_attention`], whose tests compare it with this one.

use candle_core::{DType, Tensor};

use super::block::Segment;
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
    /// The layer's sliding window (keys a query sees, itself included); `None`: all.
    pub window: Option<usize>,
}

impl<'a> StepRows<'a> {
    /// The same layer, rope and shape for other rows (a subset of the step's).
    pub fn with_qkv(self, q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        StepRows { q, k, v, ..self }
    }
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
    let n = q.dims2()?.0;
    let keys = |t: &Tensor| t.narrow(0, 0, start + n);
    windowed(q, &keys(k)?, &keys(v)?, s, start, 0, None)
}

/// `q: [n, heads * hd]` at positions `start..start+n` against keys and values
/// `[start + n - lo, kv_heads * hd]` of positions `lo..start+n`: each query sees the keys at
/// or before its position and, with a `window`, the `window` latest of them. On an f16 CUDA
/// cache, through the tensor-core kernel where it applies
/// ([`crate::cuda::prefill_attention`]), else with candle's ops.
fn windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    start: usize,
    lo: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::prefill_attention::attention(q, k, v, s, start, lo, window)? {
        return Ok(out);
    }
    windowed_ops(q, k, v, s, start, lo, window)
}

/// Query rows [`windowed_ops`] takes at once: its scores are `[kv, group · rows, keys]` f32,
/// with a scaled and a normalized copy, so a GPU's 2,048-row chunk over 8,192 keys of a
/// 32-head model would hold 2 GiB in each.
const OPS_QUERY_ROWS: usize = 512;

/// [`windowed`] with candle's ops, [`OPS_QUERY_ROWS`] queries at a time (each against the
/// keys it may see).
pub(crate) fn windowed_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    start: usize,
    lo: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, _) = q.dims2()?;
    if n <= OPS_QUERY_ROWS {
        return windowed_rows(q, k, v, s, start, lo, window);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(OPS_QUERY_ROWS));
    for at in (0..n).step_by(OPS_QUERY_ROWS) {
        let rows = OPS_QUERY_ROWS.min(n - at);
        // the last of these queries is at position start + at + rows - 1
        let keys = start + at + rows - lo;
        outs.push(windowed_rows(
            &q.narrow(0, at, rows)?,
            &k.narrow(0, 0, keys)?,
            &v.narrow(0, 0, keys)?,
            s,
            start + at,
            lo,
            window,
        )?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// [`windowed_ops`] for queries at `start..start + n` against the keys at `lo..start + n`.
fn windowed_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    start: usize,
    lo: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, _) = q.dims2()?;
    let total = start + n - lo;
    let group = s.heads / s.kv_heads;
    let hd = s.head_dim;
    // [n, heads, hd] -> [kv, group * n, hd]
    let q = q
        .reshape((n, s.kv_heads, group, hd))?
        .permute((1, 2, 0, 3))?
        .contiguous()?;
    let q = q.reshape((s.kv_heads, group * n, hd))?;
    let kv = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?
            .reshape((total, s.kv_heads, hd))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let (k, v) = (kv(k)?, kv(v)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?; // [kv, group*n, total]
    let reach = window.unwrap_or(usize::MAX);
    // One query sees exactly the keys given; several need the causal (and window) mask.
    let scores = if n > 1 {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    let (key, query) = (lo + j, start + i);
                    if key <= query && query - key < reach {
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

/// RoPE of a segment's queries and keys and its cache write in one CUDA kernel
/// ([`crate::cuda::rope_chunk`]); the rotated queries, or `None` where it does not apply.
fn rope_and_write(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    s: AttnShape,
    seg: &mut Segment<'_>,
    li: usize,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::rope_chunk::{enabled, rotate_and_write};
        rotate_and_write(q, k, v, rope, s, seg.cache, li, seg.start, enabled())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, rope, s, seg, li);
        Ok(None)
    }
}

/// Attention on device caches with candle ops, one segment after the other: RoPE, the cache
/// write (both one CUDA kernel where it applies), then [`attention`] against the segment's
/// cache. `rows` holds the segments' rows one segment after the other.
pub fn attend_each(rows: StepRows<'_>, segs: &mut [Segment<'_>]) -> Result<Tensor> {
    let StepRows {
        q,
        k,
        v,
        layer: li,
        rope,
        shape: s,
        window,
    } = rows;
    let mut outs = Vec::with_capacity(segs.len());
    let mut at = 0;
    for seg in segs.iter_mut() {
        let rows = |t: &Tensor| t.narrow(0, at, seg.len);
        let (qr, kr, vr) = (rows(q)?, rows(k)?, rows(v)?);
        let q = match rope_and_write(&qr, &kr, &vr, rope, s, seg, li)? {
            Some(q) => q,
            None => {
                let k = rope.apply(&kr, s.kv_heads, seg.start)?;
                seg.cache.write(li, seg.start, &k, &vr)?;
                rope.apply(&qr, s.heads, seg.start)?
            }
        };
        let (kc, vc) = seg.cache.buffers(li)?;
        let end = seg.start + seg.len;
        // The keys the first query still sees; a ring holds them in at most two runs.
        let lo = window.map_or(0, |w| (seg.start + 1).saturating_sub(w));
        let spans = seg.cache.spans(li, lo, end);
        let gather = |t: &Tensor| -> Result<Tensor> {
            let parts = spans
                .iter()
                .filter(|r| !r.is_empty())
                .map(|r| t.narrow(0, r.start, r.len()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(match parts.len() {
                1 => parts[0].clone(),
                _ => Tensor::cat(&parts, 0)?,
            })
        };
        outs.push(windowed(
            &q,
            &gather(kc)?,
            &gather(vc)?,
            s,
            seg.start,
            lo,
            window,
        )?);
        at += seg.len;
    }
    Ok(match outs.len() {
        1 => outs.remove(0),
        _ => Tensor::cat(&outs, 0)?,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn values(n: usize, w: usize, seed: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..n * w)
            .map(|i| ((i as f32 * 0.377 + seed).sin() * 4375.85).fract() * 2.0 - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, (n, w), &Device::Cpu)?)
    }

    /// A long chunk through candle's ops, taken 512 queries at a time, equals it in one go,
    /// causal and windowed.
    #[test]
    fn long_chunks_go_in_slices_of_queries() -> Result<()> {
        let s = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let (n, start) = (1100, 30);
        for (lo, window) in [(0, None), (10, Some(300))] {
            let keys = start + n - lo;
            let q = values(n, s.heads * s.head_dim, 1.0)?;
            let k = values(keys, s.kv_heads * s.head_dim, 2.0)?;
            let v = values(keys, s.kv_heads * s.head_dim, 3.0)?;
            let sliced = windowed_ops(&q, &k, &v, s, start, lo, window)?;
            let whole = windowed_rows(&q, &k, &v, s, start, lo, window)?;
            assert_eq!(sliced.dims(), whole.dims());
            let diff = (sliced - whole)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff <= 1e-5, "window {window:?}: {diff}");
        }
        Ok(())
    }
}
