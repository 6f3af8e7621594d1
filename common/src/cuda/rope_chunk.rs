//! A prompt chunk's RoPE and KV-cache write in one launch a layer (`rope_kv_write_chunk` in
//! `decode_attention.cu`: the decode steps' `rope_kv_write` body over the rows of one
//! session's chunk). Candle's ops took eleven kernels for it: the queries and the keys each
//! copied into a head-major layout, rotated and copied back, then the keys and the values each
//! converted to f16 and copied into the cache. `--cuda-rope off` (or `LLMC_CUDA_ROPE=0`) goes
//! back to them.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::decode_attention::{address, address_of, MODULE, PTX};
use super::fused_decode::{bound_stream, err};
use super::pdl::{self, arg};
use crate::error::Result;
use crate::gguf::RopeStyle;
use crate::model::attention::AttnShape;
use crate::model::kv_cache::KvCache;
use crate::model::rope::Rope;

/// Whether the kernel is on ([`crate::cuda_options::CudaOptions::rope`]).
pub fn enabled() -> bool {
    crate::cuda_options::get().rope
}

/// Rotates `q: [n, heads * hd]` and `k: [n, kv_heads * hd]` (f32 rows at positions
/// `start..start + n`, each row contiguous) and writes the rotated keys and `v` into layer
/// `layer` of `cache` as f16; returns the rotated queries, contiguous. `None` where the kernel
/// does not take the call (it is off, a tensor is not f32 on a CUDA device, the cache is not
/// f16 on the device, the chunk's rows are not its positions, as in a windowed layer's ring,
/// or the rope tables do not cover them); the caller then takes candle's ops. `on` is the
/// switch ([`enabled`] in a node; tests pass `true`).
#[allow(clippy::too_many_arguments)]
pub fn rotate_and_write(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    s: AttnShape,
    cache: &mut KvCache,
    layer: usize,
    start: usize,
    on: bool,
) -> Result<Option<Tensor>> {
    // f32 rows on the GPU, each row contiguous (the kernel takes a row stride)
    let f32_rows = |t: &Tensor| {
        t.device().is_cuda() && t.dtype() == DType::F32 && t.rank() == 2 && t.stride()[1] == 1
    };
    let (cos, sin) = rope.tables();
    if !on
        || cache.is_host()
        || ![q, k, v].iter().all(|t| f32_rows(t))
        || ![cos, sin].iter().all(|t| f32_rows(t) && t.is_contiguous())
    {
        return Ok(None);
    }
    let (n, width) = q.dims2()?;
    let kvw = s.kv_heads * s.head_dim;
    if n == 0
        || width != s.heads * s.head_dim
        || k.dims2()? != (n, kvw)
        || v.dims2()? != (n, kvw)
        || rope.head_dim() != s.head_dim
        || s.head_dim / 2 > 1024
        || start + n > rope.max_pos()
        || i32::try_from(start + n).is_err()
    {
        return Ok(None);
    }
    // the chunk's cache rows must be its positions: they lie below the layer's rows (a ring
    // that has wrapped maps them elsewhere)
    if start + n > cache.layer_rows(layer) {
        return Ok(None);
    }
    let (kc, vc) = cache.buffers(layer)?;
    let dev = q.device();
    if ![k, v, kc, vc, cos, sin]
        .iter()
        .all(|t| t.device().same_device(dev))
    {
        return Ok(None);
    }
    let layout_ok = |c: &Tensor| {
        c.dtype() == DType::F16
            && c.is_contiguous()
            && c.dims2().is_ok_and(|(r, w)| w == kvw && r >= start + n)
    };
    if !layout_ok(kc) || !layout_ok(vc) {
        return Ok(None);
    }
    let op = RopeChunk {
        k,
        v,
        kc,
        vc,
        cos,
        sin,
        start,
        shape: s,
        interleaved: rope.style() == RopeStyle::Interleaved,
    };
    Ok(Some(q.apply_op1_no_bwd(&op)?))
}

struct RopeChunk<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    kc: &'a Tensor,
    vc: &'a Tensor,
    cos: &'a Tensor,
    sin: &'a Tensor,
    start: usize,
    shape: AttnShape,
    interleaved: bool,
}

impl CustomOp1 for RopeChunk<'_> {
    fn name(&self) -> &'static str {
        "rope-kv-write-chunk"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("rope_kv_write_chunk runs on CUDA only")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &qs.device;
        // bound before the first driver call (the pointer lookups make some)
        let stream = bound_stream(dev)?;
        let s = self.shape;
        let (n, width) = ql.shape().dims2()?;
        let (q, q_stride) = address_of::<f32>(qs, ql, &stream)?;
        let (k, k_stride) = address::<f32>(self.k, &stream)?;
        let (v, v_stride) = address::<f32>(self.v, &stream)?;
        let (kc, _) = address::<half::f16>(self.kc, &stream)?;
        let (vc, _) = address::<half::f16>(self.vc, &stream)?;
        let (cos, _) = address::<f32>(self.cos, &stream)?;
        let (sin, _) = address::<f32>(self.sin, &stream)?;
        // SAFETY: the kernel writes every value of it before anything reads it.
        let out = unsafe { stream.alloc::<f32>(n * width) }.map_err(|e| err("alloc", e))?;
        let f = dev
            .get_or_load_custom_func("rope_kv_write_chunk", MODULE, PTX)?
            .into_cuda_function();
        let cfg = LaunchConfig {
            grid_dim: (n as u32, (s.heads + s.kv_heads) as u32, 1),
            block_dim: ((s.head_dim / 2) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let (o, _g) = out.device_ptr(&stream);
            let (mut q, mut q_stride, mut k, mut k_stride, mut v, mut v_stride) =
                (q, q_stride, k, k_stride, v, v_stride);
            let (mut o, mut kc, mut vc, mut cos, mut sin) = (o, kc, vc, cos, sin);
            // `rotate_and_write` checked that these fit an i32
            let mut start = self.start as i32;
            let (mut heads, mut kv_heads, mut hd) =
                (s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
            let mut interleaved = i32::from(self.interleaved);
            let mut params = [
                arg(&mut q),
                arg(&mut q_stride),
                arg(&mut k),
                arg(&mut k_stride),
                arg(&mut v),
                arg(&mut v_stride),
                arg(&mut o),
                arg(&mut kc),
                arg(&mut vc),
                arg(&mut start),
                arg(&mut cos),
                arg(&mut sin),
                arg(&mut heads),
                arg(&mut kv_heads),
                arg(&mut hd),
                arg(&mut interleaved),
            ];
            // SAFETY: the arguments match the kernel's signature; q, k and v hold `n` rows of
            // their widths; the caches are contiguous `[rows, kvw]` f16 with rows
            // `start..start + n` inside them, and the rope tables cover those positions (all
            // checked in `rotate_and_write`); `out` holds `n` rows of `width`. The caches are
            // written without a write event, sound because candle runs every kernel of a
            // device on its one stream. The kernel does not wait for its predecessor, so it
            // is launched without overlap.
            unsafe { pdl::launch(&stream, &f, cfg, &mut params, false) }
                .map_err(|e| err("launch rope_kv_write_chunk", e))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, width)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::kv_cache::KvDtype;

    fn noise(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.7310 + seed).sin() * 43758.547).rem_euclid(1.0) * 4.0 - 2.0)
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
        Ok(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// The kernel against candle's ops (`Rope::apply` and `KvCache::write`) on strided rows
    /// of a fused q/k/v product, for both pairings, a chunk that starts further on, and a
    /// windowed layer's ring, which it leaves to candle's ops.
    #[test]
    fn chunk_matches_candle_ops() -> Result<()> {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return Ok(());
        };
        let s = AttnShape {
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
        };
        let (qw, kvw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        for (style, start, n) in [
            (RopeStyle::Interleaved, 0, 37),
            (RopeStyle::Halves, 0, 64),
            (RopeStyle::Interleaved, 21, 50),
            (RopeStyle::Halves, 9, 1),
        ] {
            let rope = Rope::new(style, s.head_dim, 10000.0, 256, &dev)?;
            let y = Tensor::from_vec(
                noise(n * (qw + 2 * kvw), start as f32),
                (n, qw + 2 * kvw),
                &dev,
            )?;
            let (q, k, v) = (
                y.narrow(1, 0, qw)?,
                y.narrow(1, qw, kvw)?,
                y.narrow(1, qw + kvw, kvw)?,
            );
            let mut ours = KvCache::new(2, kvw, 256, KvDtype::F16, &dev)?;
            let mut theirs = KvCache::new(2, kvw, 256, KvDtype::F16, &dev)?;
            ours.reserve(start + n)?;
            theirs.reserve(start + n)?;
            let got = rotate_and_write(&q, &k, &v, &rope, s, &mut ours, 1, start, true)?
                .ok_or_else(|| crate::Error::Config("the kernel did not take the chunk".into()))?;
            let want = rope.apply(&q, s.heads, start)?;
            theirs.write(1, start, &rope.apply(&k, s.kv_heads, start)?, &v)?;
            let dq = max_diff(&got, &want)?;
            let (ok_, ov) = ours.buffers(1)?;
            let (tk, tv) = theirs.buffers(1)?;
            let rows = |t: &Tensor| t.narrow(0, start, n);
            let (dk, dv) = (
                max_diff(&rows(ok_)?, &rows(tk)?)?,
                max_diff(&rows(ov)?, &rows(tv)?)?,
            );
            eprintln!("{style:?} start {start} rows {n}: q {dq:.2e}, k {dk:.2e}, v {dv:.2e}");
            // the same f32 arithmetic on values in [-2, 2), so rotated ones below 2.9; keys and
            // values rounded to f16 alike (a last-bit difference in a rotated key may round
            // across one f16 step, 2^-9 below 4)
            assert!(dq <= 1e-6, "{style:?}: queries differ by {dq}");
            assert!(dk <= 2e-3, "{style:?}: keys differ by {dk}");
            assert!(dv == 0.0, "{style:?}: values differ by {dv}");
            // the other layer is untouched
            let (k0, _) = ours.buffers(0)?;
            assert_eq!(
                k0.abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<half::f16>()?
                    .to_f32(),
                0.0
            );
        }
        // a windowed layer whose ring wraps: rows are not positions, so candle's ops take it
        // (window 8: a ring of 8 - 1 + STEP_ROWS = 263 rows)
        let rope = Rope::new(RopeStyle::Halves, s.head_dim, 10000.0, 600, &dev)?;
        let mut ring = KvCache::windowed(&[Some(8)], kvw, 600, KvDtype::F16, &dev)?;
        ring.reserve(200)?;
        ring.advance(200);
        ring.reserve(100)?;
        let t = |w| Tensor::zeros((100, w), DType::F32, &dev);
        let taken = rotate_and_write(
            &t(qw)?,
            &t(kvw)?,
            &t(kvw)?,
            &rope,
            s,
            &mut ring,
            0,
            200,
            true,
        )?;
        assert!(
            taken.is_none(),
            "a wrapped ring must be left to candle's ops"
        );
        Ok(())
    }
}
