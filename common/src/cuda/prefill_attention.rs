//! Prefill attention on tensor cores (kernels in `prefill_attention.cu`): the queries of a
//! prompt chunk against one session's f16 cache, flash-attention style, in one launch a
//! layer. It replaces candle's ops on that path (an f32 score matrix of `[heads, n, keys]`, a
//! causal mask built on the host each layer, softmax and two f32 products), whose cost grows
//! with the square of the prompt. `--cuda-prefill off` (or `LLMC_CUDA_PREFILL=0`) turns it
//! off, so one run can compare both.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::decode_attention::address;
use super::pdl::{self, arg};
use crate::error::Result;
use crate::model::attention::AttnShape;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prefill_attention.ptx"));
const MODULE: &str = "llm_cluster_prefill_attention";
/// Query rows a CTA takes (`BQ` in the kernel).
const BQ: usize = 64;
/// Keys a tile (`BK`).
const BK: usize = 64;
/// Threads a CTA (`32 * PA_WARPS`).
const THREADS: u32 = 128;

/// Whether the kernel is on ([`crate::cuda_options::CudaOptions::prefill`], default on).
pub fn enabled() -> bool {
    crate::cuda_options::get().prefill
}

/// Whether heads of `d` values take the register-resident kernel (`prefill_flash_hd*`, in the
/// PTX when it is built for sm_80 or later) rather than the WMMA one.
fn flash(d: usize) -> bool {
    matches!(d, 64 | 128) && env!("LLMC_CUDA_PTX_ARCH").parse::<u32>().unwrap_or(0) >= 80
}

/// The dynamic shared memory of a CTA for heads of `d` values: two stages of key and value
/// tiles (`FaLayout<D>::BYTES`), or for the WMMA kernel `PaLayout<D>::BYTES`.
fn smem_bytes(d: usize) -> usize {
    let ldq = d + 8;
    if flash(d) {
        return 2 * 2 * BK * ldq * 2;
    }
    BQ * ldq * 2 + 2 * BK * ldq * 2 + BQ * (BK + 4) * 4 + BQ * (BK + 8) * 2 + BQ * (d + 4) * 4
}

/// Whether the kernel takes heads of this shape: widths of 64, 128 or 256 values (Llama,
/// SmolLM2, Qwen 3 and Gemma 3 all use one of them) and whole groups of query heads.
pub fn takes(s: AttnShape) -> bool {
    matches!(s.head_dim, 64 | 128 | 256) && s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads)
}

/// Causal grouped-query attention of `q: [n, heads * hd]` (f32, rotated, at positions
/// `start..start + n`) against `k`, `v`: `[total, kv_heads * hd]` f16 rows of positions
/// `lo..lo + total`, on the GPU; each query sees the keys at or before its position and, with
/// a `window`, the `window` latest of them. `None` when the kernel does not take this call
/// (it is off, the tensors are not f16 on a CUDA device, the heads do not fit [`takes`], or
/// its shared memory does not fit the device); the caller then uses candle's ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    start: usize,
    lo: usize,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    if !enabled()
        || !takes(s)
        || !q.device().is_cuda()
        || q.dtype() != DType::F32
        || k.dtype() != DType::F16
        || v.dtype() != DType::F16
    {
        return Ok(None);
    }
    let (n, width) = q.dims2()?;
    let (total, kv_width) = k.dims2()?;
    if width != s.heads * s.head_dim
        || kv_width != s.kv_heads * s.head_dim
        || v.dims2()? != (total, kv_width)
        || n == 0
        || lo + total < start + n
    {
        return Ok(None);
    }
    // The kernel reads keys and values 16 bytes at a time.
    let aligned =
        |t: &Tensor| t.layout().start_offset().is_multiple_of(8) && t.stride()[0].is_multiple_of(8);
    if !aligned(k) || !aligned(v) || k.stride() != v.stride() || k.stride()[1] != 1 {
        return Ok(None);
    }
    // A CTA's shared memory must fit the device's: the WMMA kernel's 110 KiB for heads of 128
    // do not on sm_86 and sm_89 (99 KiB), nor its 190 KiB for heads of 256 below sm_90.
    if smem_bytes(s.head_dim) as i64 > smem_limit(q.device().as_cuda_device()?) {
        return Ok(None);
    }
    let op = PrefillAttn {
        k,
        v,
        shape: s,
        total,
        start,
        lo,
        reach: window.unwrap_or(i32::MAX as usize),
    };
    Ok(Some(q.contiguous()?.apply_op1_no_bwd(&op)?))
}

struct PrefillAttn<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    shape: AttnShape,
    total: usize,
    start: usize,
    lo: usize,
    reach: usize,
}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("prefill attention: {what}: {e:?}"))
}

fn int(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| err(what, v))
}

/// The most dynamic shared memory a block of the device may ask for, queried once per device
/// (a driver call, kept off the per-layer path).
fn smem_limit(dev: &candle_core::cuda_backend::CudaDevice) -> i64 {
    use candle_core::cuda_backend::cudarc::driver::{result, sys::CUdevice_attribute as A};
    static LIMITS: std::sync::Mutex<Vec<(usize, i64)>> = std::sync::Mutex::new(Vec::new());
    let ctx = dev.cuda_stream().context().clone();
    let mut known = LIMITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(&(_, limit)) = known.iter().find(|(o, _)| *o == ctx.ordinal()) {
        return limit;
    }
    // SAFETY: a plain attribute query of a live device. The 48 KiB every block may have
    // stands in if it fails.
    let limit = unsafe {
        result::device::get_attribute(
            ctx.cu_device(),
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
    }
    .map_or(48 * 1024, i64::from);
    known.push((ctx.ordinal(), limit));
    limit
}

fn kernel_name(d: usize) -> String {
    if flash(d) {
        format!("prefill_flash_hd{d}")
    } else {
        format!("prefill_attention_hd{d}")
    }
}

impl CustomOp1 for PrefillAttn<'_> {
    fn name(&self) -> &'static str {
        "prefill-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("prefill attention runs on CUDA only")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &qs.device;
        let stream = super::fused_decode::bound_stream(dev)?;
        let s = self.shape;
        let d = s.head_dim;
        let (n, width) = ql.shape().dims2()?;
        let (q, q_stride) = super::decode_attention::address_of::<f32>(qs, ql, &stream)?;
        let (k, kv_stride) = address::<half::f16>(self.k, &stream)?;
        let (v, _) = address::<half::f16>(self.v, &stream)?;
        // SAFETY: the kernel writes every row of it below before anything reads it.
        let out = unsafe { stream.alloc::<f32>(n * width) }.map_err(|e| err("alloc", e))?;
        let f: CudaFunction = dev
            .get_or_load_custom_func(&kernel_name(d), MODULE, PTX)?
            .into_cuda_function();
        let smem = smem_bytes(d);
        // Past 48 KiB a kernel must ask for its dynamic shared memory.
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| err("shared memory", e))?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(BQ) as u32, s.heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        {
            let (out_ptr, _o) = out.device_ptr(&stream);
            let (mut q, mut q_stride, mut k, mut v, mut kv_stride) = (q, q_stride, k, v, kv_stride);
            let (mut out_ptr, mut out_stride) = (out_ptr, width as i64);
            let mut n_ = int(n, "rows")?;
            let mut total = int(self.total, "keys")?;
            let mut start = int(self.start, "position")?;
            let mut lo = int(self.lo, "first key")?;
            let mut reach = int(self.reach.min(i32::MAX as usize), "window")?;
            let mut heads = int(s.heads, "heads")?;
            let mut kv_heads = int(s.kv_heads, "kv heads")?;
            let mut scale = 1.0 / (d as f32).sqrt();
            let mut params = [
                arg(&mut q),
                arg(&mut q_stride),
                arg(&mut k),
                arg(&mut v),
                arg(&mut kv_stride),
                arg(&mut out_ptr),
                arg(&mut out_stride),
                arg(&mut n_),
                arg(&mut total),
                arg(&mut start),
                arg(&mut lo),
                arg(&mut reach),
                arg(&mut heads),
                arg(&mut kv_heads),
                arg(&mut scale),
            ];
            // SAFETY: the arguments match the kernel's signature; q holds `n` rows of
            // `heads * hd` f32 `q_stride` apart, k and v `total` rows of `kv_heads * hd` f16
            // `kv_stride` apart, 16-byte aligned (checked in `attention`), and `out` `n` rows
            // of `width`. The kernel does not wait for its predecessor, so it is launched
            // without overlap.
            unsafe { pdl::launch(&stream, &f, cfg, &mut params, false) }
                .map_err(|e| err("launch", e))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, width)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn random(rows: usize, width: usize, salt: f32, dev: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * width)
            .map(|i| ((i as f32 * 0.7310 + salt).sin() * 43758.547).fract() * 2.0 - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, (rows, width), dev)?)
    }

    /// The kernels against candle's ops on the same f16 keys and values, for every head width
    /// they take, prompt chunks that start at 0 and further on, ragged tiles, and windows.
    #[test]
    fn kernel_matches_candle_ops() -> Result<()> {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return Ok(());
        };
        let cases = [
            // (heads, kv_heads, hd, start, n, lo, window)
            (9, 3, 64, 0, 100, 0, None),
            (32, 8, 128, 0, 256, 0, None),
            (32, 8, 128, 300, 77, 0, None),
            (4, 1, 256, 0, 130, 0, None),
            (4, 1, 256, 200, 64, 200 + 1 - 96, Some(96)),
            (8, 8, 64, 500, 1, 0, None),
            // many tiles (the copy of the next overlapping this one), a first key off the
            // tile grid, and a window across tiles
            (32, 8, 128, 1500, 512, 0, None),
            (8, 2, 128, 700, 150, 37, None),
            (8, 2, 128, 1000, 200, 1000 + 1 - 300, Some(300)),
            (6, 2, 64, 90, 33, 90 + 1 - 40, Some(40)),
        ];
        for (i, &(heads, kv_heads, hd, start, n, lo, window)) in cases.iter().enumerate() {
            let s = AttnShape {
                heads,
                kv_heads,
                head_dim: hd,
            };
            let total = start + n - lo;
            let q = random(n, heads * hd, i as f32, &dev)?.affine(3.0, 0.0)?;
            let k = random(total, kv_heads * hd, 10.0 + i as f32, &dev)?
                .affine(2.0, 0.0)?
                .to_dtype(DType::F16)?;
            let v = random(total, kv_heads * hd, 20.0 + i as f32, &dev)?.to_dtype(DType::F16)?;
            let ours = attention(&q, &k, &v, s, start, lo, window)?
                .ok_or_else(|| crate::Error::InvalidInput(format!("case {i} not taken")))?;
            let theirs = crate::model::attention::windowed_ops(&q, &k, &v, s, start, lo, window)?;
            let diff = (ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = theirs.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            eprintln!(
                "case {i} ({}): max |ours - candle| {diff:.2e} (largest value {scale:.2e})",
                kernel_name(hd)
            );
            assert!(diff <= 4e-3 * scale.max(1.0), "case {i}: {diff} off");
        }
        Ok(())
    }
}
