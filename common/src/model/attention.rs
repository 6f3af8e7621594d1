//! Causal grouped-query attention of new queries against a session's KV cache.
//!
//! CPU has a direct implementation (no `repeat_kv`, no mask tensor, no temporaries beyond one
//! score row per head); other devices use candle ops. Tests check the two agree.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::f16;

use crate::kernels::pool::parallel_chunks_mut;
use crate::kernels::vec::KvElem;

use crate::error::Result;

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
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: AttnShape,
    start: usize,
) -> Result<Tensor> {
    if q.device().is_cpu() {
        return Ok(q
            .contiguous()?
            .apply_op3_no_bwd(k, v, &AttnCpu { shape, start })?);
    }
    attention_generic(q, k, v, shape, start)
}

/// The candle-ops version, used off-CPU and as the reference in tests.
pub fn attention_generic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    start: usize,
) -> Result<Tensor> {
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

struct AttnCpu {
    shape: AttnShape,
    start: usize,
}

fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("attention: {what} is not contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

impl CustomOp3 for AttnCpu {
    fn name(&self) -> &'static str {
        "attention-cpu"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = cpu_slice::<f32>(qs, ql, "q")?;
        match (ks, vs) {
            (CpuStorage::F16(_), CpuStorage::F16(_)) => {
                let (k, v) = (
                    cpu_slice::<f16>(ks, kl, "k")?,
                    cpu_slice::<f16>(vs, vl, "v")?,
                );
                self.run(q, ql, k, v)
            }
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (k, v) = (
                    cpu_slice::<f32>(ks, kl, "k")?,
                    cpu_slice::<f32>(vs, vl, "v")?,
                );
                self.run(q, ql, k, v)
            }
            _ => candle_core::bail!("attention: the cache must be f16 or f32"),
        }
    }
}

impl AttnCpu {
    fn run<T: KvElem>(
        &self,
        q: &[f32],
        ql: &Layout,
        k: &[T],
        v: &[T],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.shape;
        let (n, width) = ql.shape().dims2()?;
        let hd = s.head_dim;
        let kvw = s.kv_heads * hd;
        let total = self.start + n;
        if width != s.heads * hd || k.len() < total * kvw || v.len() < total * kvw {
            candle_core::bail!(
                "attention: shapes do not fit ({n}x{width}, cache {} for {total})",
                k.len()
            );
        }
        let group = s.heads / s.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; n * width];
        // One task per (token, head): each writes its own hd-wide slice of `out`. The rounding
        // follows llama.cpp's CPU path (no flash attention): for an f16 cache the query is
        // rounded to f16 like the keys, and the probabilities like the values; softmax in f32
        // with a wide sum; accumulation in f32.
        parallel_chunks_mut(&mut out, hd, |idx, o| {
            let (t, h) = (idx / s.heads, idx % s.heads);
            let kvh = h / group;
            let qh: Vec<f32> = q[t * width + h * hd..t * width + (h + 1) * hd]
                .iter()
                .map(|&x| T::round(x))
                .collect();
            let upto = self.start + t + 1;
            let mut scores = vec![0f32; upto];
            let mut max = f32::NEG_INFINITY;
            for (j, sc) in scores.iter_mut().enumerate() {
                let base = j * kvw + kvh * hd;
                *sc = T::dot(&qh, &k[base..base + hd]) * scale;
                max = max.max(*sc);
            }
            let mut sum = 0f64;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += f64::from(*sc);
            }
            let inv = (1.0 / sum) as f32;
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let base = j * kvw + kvh * hd;
                T::axpy(o, T::round(p * inv), &v[base..base + hd]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }
}
