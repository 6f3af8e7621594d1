//! The attention of one block on the CPU, for every segment of a step at once.
//!
//! Per segment it rotates the new queries and keys with RoPE, writes the keys and values into
//! the session's host cache, then runs causal grouped-query attention for all rows of all
//! segments in **one** parallel region, one task per (row, head). A step of 16 decoding
//! sessions used to run 16 regions of 9 tasks, each between a dozen candle ops, per layer.
//!
//! The rounding follows llama.cpp's CPU path (no flash attention): for an f16 cache the query
//! is rounded to f16 like the keys, and the probabilities like the values; softmax in f32 with
//! a wide sum; accumulation in f32. Tests compare it with the candle-ops version.

use std::cell::RefCell;

use candle_core::{Device, Tensor};

use super::attention::StepRows;
use super::block::Segment;
use super::host_rows::with_rows;
use super::kv_cache::{HostKv, HostKvMut};
use crate::error::{Error, Result};
use crate::kernels::pool::parallel_chunks_mut;
use crate::kernels::vec::{dots, weighted_sum, KvElem};

/// `q: [n, heads*hd]`, `k`, `v: [n, kv_heads*hd]` (before RoPE), whose rows are the
/// segments' tokens one segment after the other; every segment's cache must be a host cache
/// with room reserved. Writes the keys and values into layer `li` of each cache and returns
/// the attention output `[n, heads*hd]`.
pub fn attend(rows: StepRows<'_>, segs: &mut [Segment<'_>]) -> Result<Tensor> {
    let StepRows {
        q,
        k,
        v,
        layer: li,
        rope,
        shape: s,
        window,
    } = rows;
    let hd = s.head_dim;
    let (width, kvw) = (s.heads * hd, s.kv_heads * hd);
    let (n, qw) = q.dims2()?;
    if qw != width || k.dims2()? != (n, kvw) || v.dims2()? != (n, kvw) {
        return Err(Error::InvalidInput(format!(
            "host attention: q {:?}, k {:?}, v {:?} for {} heads and {} kv heads of {hd}",
            q.dims(),
            k.dims(),
            v.dims(),
            s.heads,
            s.kv_heads
        )));
    }
    if rope.head_dim() != hd {
        return Err(Error::InvalidInput(format!(
            "host attention: rope tables for heads of {}, not {hd}",
            rope.head_dim()
        )));
    }
    if !rope.has_host_tables() {
        return Err(Error::InvalidInput(
            "host attention needs CPU rope tables".into(),
        ));
    }
    let rows: usize = segs.iter().map(|g| g.len).sum();
    let end = segs.iter().map(|g| g.start + g.len).max().unwrap_or(0);
    if rows != n || end > rope.max_pos() {
        return Err(Error::InvalidInput(format!(
            "host attention: {n} rows for segments of {rows}, up to position {end}"
        )));
    }

    // 1. RoPE the queries into `qr`; RoPE the keys and copy the values into the caches.
    let mut qr = vec![0f32; n * width];
    with_rows(q, |rows| {
        let mut r = 0;
        for g in segs.iter() {
            for t in 0..g.len {
                let dst = &mut qr[r * width..(r + 1) * width];
                rope.rotate_row(rows.row(r), dst, s.heads, g.start + t);
                r += 1;
            }
        }
    })?;
    let mut tmp = vec![0f32; kvw];
    let mut at = 0;
    for g in segs.iter_mut() {
        // Position p of the layer lives in row p % rows (the identity until a windowed
        // layer becomes a ring).
        let rows_held = g.cache.layer_rows(li).max(1);
        let layer = g
            .cache
            .host_layer_mut(li)
            .ok_or_else(|| Error::InvalidInput("host attention needs a host cache".into()))??;
        let room = match &layer {
            HostKvMut::F16(l) => l.k.len(),
            HostKvMut::F32(l) => l.k.len(),
        };
        if (g.start + g.len).min(rows_held) * kvw > room || g.len > rows_held {
            return Err(Error::InvalidInput(format!(
                "host attention: rows up to {} but room for {} reserved",
                g.start + g.len,
                room / kvw
            )));
        }
        let (mut kd, mut vd) = match layer {
            HostKvMut::F16(l) => (KvDst::F16(&mut l.k[..]), KvDst::F16(&mut l.v[..])),
            HostKvMut::F32(l) => (KvDst::F32(&mut l.k[..]), KvDst::F32(&mut l.v[..])),
        };
        let row_of = |t: usize| (g.start + t) % rows_held * kvw;
        with_rows(k, |rows| {
            for t in 0..g.len {
                rope.rotate_row(rows.row(at + t), &mut tmp, s.kv_heads, g.start + t);
                kd.put(row_of(t), &tmp);
            }
        })?;
        with_rows(v, |rows| {
            for t in 0..g.len {
                vd.put(row_of(t), rows.row(at + t));
            }
        })?;
        at += g.len;
    }

    // 2. One parallel region over every (row, KV head) of every segment.
    struct RowAt<'a> {
        kv: HostKv<'a>,
        /// The cache rows of the positions the row attends to, in position order: one run,
        /// or two around a ring.
        runs: [std::ops::Range<usize>; 2],
    }
    let mut row_at = Vec::with_capacity(n);
    for g in segs.iter() {
        let kv = g
            .cache
            .host_layer(li)
            .ok_or_else(|| Error::InvalidInput("host attention needs a host cache".into()))??;
        for t in 0..g.len {
            let pos = g.start + t;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            row_at.push(RowAt {
                kv: match kv {
                    HostKv::F16(l) => HostKv::F16(l),
                    HostKv::F32(l) => HostKv::F32(l),
                },
                runs: g.cache.spans(li, lo, pos + 1),
            });
        }
    }
    let group = s.heads / s.kv_heads;
    let mut out = vec![0f32; n * width];
    parallel_chunks_mut(&mut out, group * hd, |idx, o| {
        let (r, kvh) = (idx / s.kv_heads, idx % s.kv_heads);
        let at = &row_at[r];
        let q0 = r * width + kvh * group * hd;
        let qg = &qr[q0..q0 + group * hd];
        let runs = &at.runs;
        match at.kv {
            HostKv::F16(l) => group_heads(qg, &l.k, &l.v, kvw, kvh * hd, hd, runs, o),
            HostKv::F32(l) => group_heads(qg, &l.k, &l.v, kvw, kvh * hd, hd, runs, o),
        }
    });
    Ok(Tensor::from_vec(out, (n, width), &Device::Cpu)?)
}

/// Where one segment's new keys or values go, by element type.
enum KvDst<'a> {
    F16(&'a mut [half::f16]),
    F32(&'a mut [f32]),
}

impl KvDst<'_> {
    fn put(&mut self, at: usize, src: &[f32]) {
        fn conv<T: KvElem>(d: &mut [T], s: &[f32]) {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = T::from_f32(s));
        }
        match self {
            KvDst::F16(d) => conv(&mut d[at..at + src.len()], src),
            KvDst::F32(d) => conv(&mut d[at..at + src.len()], src),
        }
    }
}

thread_local! {
    /// Per-thread scratch: one KV head's keys (then values) widened to f32, the rounded query,
    /// and the weights of every head of the group.
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { rows: Vec::new(), qh: Vec::new(), weights: Vec::new() })
    };
}

struct Scratch {
    rows: Vec<f32>,
    qh: Vec<f32>,
    weights: Vec<f32>,
}

/// The query heads of one KV head for one row: attends each head of `q` (`o.len() / hd`
/// heads of `hd`) to the cache rows of `runs`, in order (each `kvw` wide, this KV head's
/// columns starting at `col`), writing the weighted values into `o`. The keys and values are widened to f32
/// once for the whole group; every head's scores, softmax and sums are formed exactly as
/// attending it alone forms them (see [`dots`] and [`weighted_sum`]).
#[allow(clippy::too_many_arguments)]
fn group_heads<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    kvw: usize,
    col: usize,
    hd: usize,
    runs: &[std::ops::Range<usize>; 2],
    o: &mut [f32],
) {
    let scale = 1.0 / (hd as f32).sqrt();
    let heads = o.len() / hd;
    let upto = runs[0].len() + runs[1].len();
    let widen = |src: &[T], rows: &mut [f32]| {
        let mut at = 0;
        for r in runs.iter().filter(|r| !r.is_empty()) {
            let dst = &mut rows[at * hd..(at + r.len()) * hd];
            T::widen_rows(&src[r.start * kvw + col..], kvw, hd, dst);
            at += r.len();
        }
    };
    SCRATCH.with(|s| {
        let Scratch { rows, qh, weights } = &mut *s.borrow_mut();
        rows.resize(upto * hd, 0.0);
        weights.resize(heads * upto, 0.0);
        widen(k, rows);
        for (h, sc) in weights.chunks_exact_mut(upto).enumerate() {
            qh.clear();
            qh.extend(q[h * hd..(h + 1) * hd].iter().map(|&x| T::round(x)));
            dots(qh, rows, sc);
            let mut max = f32::NEG_INFINITY;
            for x in sc.iter_mut() {
                *x *= scale;
                max = max.max(*x);
            }
            let mut sum = 0f64;
            for x in sc.iter_mut() {
                *x = (*x - max).exp();
                sum += f64::from(*x);
            }
            let inv = (1.0 / sum) as f32;
            for x in sc.iter_mut() {
                *x = T::round(*x * inv);
            }
        }
        widen(v, rows);
        for (oh, w) in o.chunks_exact_mut(hd).zip(weights.chunks_exact(upto)) {
            weighted_sum(oh, w, rows);
        }
    });
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// One head alone, with the per-row primitives: the way the attention was formed before
    /// heads were grouped by KV head.
    #[allow(clippy::too_many_arguments)]
    fn head_alone<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        kvw: usize,
        col: usize,
        upto: usize,
        o: &mut [f32],
    ) {
        let hd = q.len();
        let scale = 1.0 / (hd as f32).sqrt();
        let qh: Vec<f32> = q.iter().map(|&x| T::round(x)).collect();
        let mut scores: Vec<f32> = (0..upto)
            .map(|j| T::dot(&qh, &k[j * kvw + col..j * kvw + col + hd]) * scale)
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f64;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += f64::from(*sc);
        }
        let inv = (1.0 / sum) as f32;
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            T::axpy(o, T::round(p * inv), &v[j * kvw + col..j * kvw + col + hd]);
        }
    }

    #[test]
    fn grouped_heads_equal_heads_alone_bit_for_bit() {
        for (hd, group, kv_heads, upto) in [
            (64usize, 3usize, 3usize, 37usize),
            (12, 2, 2, 5),
            (128, 4, 2, 9),
        ] {
            let kvw = kv_heads * hd;
            let gen = |n: usize, salt: f32| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i as f32) * 0.173 + salt).sin() * 2.0)
                    .collect()
            };
            let q = gen(group * hd, 0.3);
            let k32 = gen(upto * kvw, 1.1);
            let v32 = gen(upto * kvw, 2.9);
            let k16: Vec<half::f16> = k32.iter().map(|&x| half::f16::from_f32(x)).collect();
            let v16: Vec<half::f16> = v32.iter().map(|&x| half::f16::from_f32(x)).collect();
            for kvh in 0..kv_heads {
                let col = kvh * hd;
                let mut got16 = vec![0f32; group * hd];
                let mut got32 = vec![0f32; group * hd];
                group_heads(&q, &k16, &v16, kvw, col, hd, &[0..upto, 0..0], &mut got16);
                group_heads(&q, &k32, &v32, kvw, col, hd, &[0..upto, 0..0], &mut got32);
                for h in 0..group {
                    let qh = &q[h * hd..(h + 1) * hd];
                    let mut want = vec![0f32; hd];
                    head_alone(qh, &k16, &v16, kvw, col, upto, &mut want);
                    let got = &got16[h * hd..(h + 1) * hd];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "f16 hd {hd} head {h}"
                    );
                    head_alone(qh, &k32, &v32, kvw, col, upto, &mut want);
                    let got = &got32[h * hd..(h + 1) * hd];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "f32 hd {hd} head {h}"
                    );
                }
            }
        }
    }
    use crate::gguf::RopeStyle;
    use crate::model::attention::attention;
    use crate::model::attention::AttnShape;
    use crate::model::kv_cache::{KvCache, KvDtype};
    use crate::model::rope::Rope;

    /// Segments mixing a prefill, decodes at different depths and a mid-prompt chunk give, row
    /// for row, what rotating and attending each session alone with candle ops gives.
    #[test]
    fn batched_host_attention_matches_candle_ops_per_session() -> Result<()> {
        let s = AttnShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
        };
        let (width, kvw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let dev = Device::Cpu;
        for (dtype, tol) in [(KvDtype::F32, 1e-5f32), (KvDtype::F16, 2e-3)] {
            let rope = Rope::new(RopeStyle::Halves, s.head_dim, 10000.0, 64, &dev)?;
            // (cached before, new rows) per session
            let plan = [(0usize, 5usize), (7, 1), (0, 1), (12, 3), (30, 1)];
            let mut caches = Vec::new();
            let mut reference = Vec::new();
            let mut history = Vec::new();
            let mut salt = 0.0f32;
            let mut rand = |rows: usize, w: usize| -> Result<Tensor> {
                salt += 1.0;
                let d: Vec<f32> = (0..rows * w)
                    .map(|i| (i as f32 * 0.37 + salt * 1.7).sin() * 1.3)
                    .collect();
                Ok(Tensor::from_vec(d, (rows, w), &dev)?)
            };
            // fill each cache with its history through the host path, one session at a time
            for &(before, _) in &plan {
                let mut c = KvCache::new(1, kvw, 64, dtype, &dev)?;
                let (hq, hk, hv) = (
                    rand(before.max(1), width)?,
                    rand(before.max(1), kvw)?,
                    rand(before.max(1), kvw)?,
                );
                if before > 0 {
                    c.reserve(before)?;
                    let mut seg = [Segment {
                        cache: &mut c,
                        start: 0,
                        len: before,
                    }];
                    attend(
                        StepRows {
                            q: &hq,
                            k: &hk,
                            v: &hv,
                            layer: 0,
                            rope: &rope,
                            shape: s,
                            window: None,
                        },
                        &mut seg,
                    )?;
                    c.advance(before);
                }
                history.push((hk, hv));
                caches.push(c);
            }
            let total: usize = plan.iter().map(|p| p.1).sum();
            let (q, k, v) = (rand(total, width)?, rand(total, kvw)?, rand(total, kvw)?);
            // reference: candle rope + candle attention on each session's full f32 history
            let mut at = 0;
            for (i, &(before, len)) in plan.iter().enumerate() {
                let rows = |t: &Tensor| t.narrow(0, at, len);
                let qs = rope.apply(&rows(&q)?, s.heads, before)?;
                let mut ks = Vec::new();
                let mut vs = Vec::new();
                if before > 0 {
                    ks.push(rope.apply(&history[i].0, s.kv_heads, 0)?);
                    vs.push(history[i].1.clone());
                }
                ks.push(rope.apply(&rows(&k)?, s.kv_heads, before)?);
                vs.push(rows(&v)?);
                let round = |t: Tensor| -> Result<Tensor> {
                    Ok(t.to_dtype(dtype.dtype())?.to_dtype(DType::F32)?)
                };
                let kc = round(Tensor::cat(&ks, 0)?)?;
                let vc = round(Tensor::cat(&vs, 0)?)?;
                let qs = if dtype == KvDtype::F16 {
                    round(qs)?
                } else {
                    qs
                };
                reference.push(attention(&qs, &kc, &vc, s, before)?);
                at += len;
            }
            let reference = Tensor::cat(&reference, 0)?;
            for (c, &(_, len)) in caches.iter_mut().zip(&plan) {
                c.reserve(len)?;
            }
            let mut segs: Vec<Segment<'_>> = caches
                .iter_mut()
                .zip(&plan)
                .map(|(c, &(start, len))| Segment {
                    cache: c,
                    start,
                    len,
                })
                .collect();
            let got = attend(
                StepRows {
                    q: &q,
                    k: &k,
                    v: &v,
                    layer: 0,
                    rope: &rope,
                    shape: s,
                    window: None,
                },
                &mut segs,
            )?;
            let diff = (got - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < tol, "{dtype:?}: max difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn refuses_mismatched_rows_and_positions_past_the_table() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(RopeStyle::Halves, 8, 10000.0, 8, &dev)?;
        let mut c = KvCache::new(1, 8, 8, KvDtype::F16, &dev)?;
        c.reserve(2)?;
        let q = Tensor::zeros((3, 16), DType::F32, &dev)?;
        let k = Tensor::zeros((3, 8), DType::F32, &dev)?;
        let rows = StepRows {
            q: &q,
            k: &k,
            v: &k,
            layer: 0,
            rope: &rope,
            shape: AttnShape {
                heads: 2,
                kv_heads: 1,
                head_dim: 8,
            },
            window: None,
        };
        // three rows for a segment of two
        let mut segs = [Segment {
            cache: &mut c,
            start: 0,
            len: 2,
        }];
        assert!(attend(rows, &mut segs).is_err());
        // past the rope table (and the reserved rows)
        let mut segs = [Segment {
            cache: &mut c,
            start: 7,
            len: 3,
        }];
        assert!(attend(rows, &mut segs).is_err());
        Ok(())
    }
}
