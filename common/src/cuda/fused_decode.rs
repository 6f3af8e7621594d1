//! Decode steps on CUDA with each block in nine kernel launches, launched straight from raw
//! device addresses (kernels in `fused_decode.cu`).
//!
//! Through candle's ops a decode step of one block costs 16 tensor ops, each with its own
//! allocation, bookkeeping and launch; on an H100 the 135M model's step took as long as the
//! 8B model's, so the host side, not the GPU, set the pace. Here a stage runs all its blocks
//! in one candle op: per block, a fused residual add + RMSNorm + Q8_1 quantization,
//! quantized matrix-vector products for q/k/v, the output projection, gate/up and down (ours,
//! `matvec.rs`, for Q4_0 and Q8_0 rows of whole 256-value groups; else candle's own `mmvq`,
//! called through `candle_kernels::ffi`), the decode-attention kernels (the second of which
//! writes its output as Q8_1), and a fused SiLU · up + quantization. Residual
//! adds are folded into the next norm. Scratch buffers are allocated once per step. Steps of
//! more than 8 rows (mmvq's limit) write f32 instead and call candle's mmq kernels, which
//! quantize their input themselves. Our kernels are launched through [`super::pdl`], each
//! overlapping the end of the one before it.
//!
//! It takes a step when every segment is one decode row on an f16 CUDA cache, the weights'
//! types have an mmvq kernel, and q/k/v and gate/up are each one matrix without biases;
//! anything else goes through [`crate::model::block::Block::forward`].
//! `--cuda-fused off` (or `LLMC_CUDA_FUSED=0`) turns it off, so one run can compare both paths.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::decode_attention::{self, address, checked_caches, AttnFuncs, RawAttn, SplitScratch};
use super::matvec::{MatvecFuncs, MatvecType, Q8_1_BYTES};
use super::pdl::{self, arg};
use crate::error::{Error, Result};
use crate::gguf::RopeStyle;
use crate::model::block::{Block, FusedParts, Segment};
use crate::model::rope::Rope;

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_decode.ptx"));
pub(crate) const MODULE: &str = "llm_cluster_fused_decode";
/// Rows of Q8_1 activations are padded to this many values (candle's `MATRIX_ROW_PADDING`).
const ROW_PADDING: usize = 512;
/// The most rows one mmvq launch takes; larger steps launch it per chunk.
const MMVQ_MAX_BATCH: usize = 8;

/// candle's launcher of an mmvq kernel with f32 output.
type Mmvq = unsafe extern "C" fn(
    *const c_void,
    *const c_void,
    *mut c_void,
    i32,
    i32,
    i32,
    i32,
    i32,
    *mut c_void,
);

fn mmvq_for(t: GgmlDType) -> Option<Mmvq> {
    use candle_core::cuda_backend::kernels::ffi;
    let f: Mmvq = match t {
        GgmlDType::Q4_0 => ffi::launch_mmvq_gguf_q4_0_f32_plain,
        GgmlDType::Q4_1 => ffi::launch_mmvq_gguf_q4_1_f32_plain,
        GgmlDType::Q5_0 => ffi::launch_mmvq_gguf_q5_0_f32_plain,
        GgmlDType::Q5_1 => ffi::launch_mmvq_gguf_q5_1_f32_plain,
        GgmlDType::Q8_0 => ffi::launch_mmvq_gguf_q8_0_f32_plain,
        GgmlDType::Q2K => ffi::launch_mmvq_gguf_q2_k_f32_plain,
        GgmlDType::Q3K => ffi::launch_mmvq_gguf_q3_k_f32_plain,
        GgmlDType::Q4K => ffi::launch_mmvq_gguf_q4_k_f32_plain,
        GgmlDType::Q5K => ffi::launch_mmvq_gguf_q5_k_f32_plain,
        GgmlDType::Q6K => ffi::launch_mmvq_gguf_q6_k_f32_plain,
        _ => return None,
    };
    Some(f)
}

/// Whether the fused path is on ([`crate::cuda_options::CudaOptions::fused_step`]): off too
/// with our attention kernels off, so that switch still selects candle's ops throughout.
pub fn enabled() -> bool {
    crate::cuda_options::get().fused_step()
}

/// candle's launcher of mmq's activation quantizer.
type MmqQuantize = unsafe extern "C" fn(
    *const c_void,
    *const i32,
    *mut c_void,
    i32,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    *mut c_void,
);

/// candle's launcher of an mmq kernel.
type MmqLaunch = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    *const c_void,
    *mut c_void,
    i64,
    i64,
    i64,
    i64,
    i64,
    i32,
    i32,
    i64,
    i32,
    *mut c_void,
);

/// The mmq kernel of a weight type, the quantizer of the layout it reads, and its block size.
#[derive(Clone, Copy)]
struct Mmq {
    quantize: MmqQuantize,
    launch: MmqLaunch,
    qk: usize,
}

fn mmq_for(t: GgmlDType) -> Option<Mmq> {
    use candle_core::cuda_backend::kernels::ffi;
    // The activation layouts and block sizes candle's `fast_mmq` pairs with each type.
    let (d4, ds4, d2s6): (MmqQuantize, MmqQuantize, MmqQuantize) = (
        ffi::launch_mmq_quantize_q8_1_D4,
        ffi::launch_mmq_quantize_q8_1_DS4,
        ffi::launch_mmq_quantize_q8_1_D2S6,
    );
    let (quantize, launch, qk): (MmqQuantize, MmqLaunch, usize) = match t {
        GgmlDType::Q4_0 => (ds4, ffi::launch_mmq_gguf_q4_0, 32),
        GgmlDType::Q4_1 => (ds4, ffi::launch_mmq_gguf_q4_1, 32),
        GgmlDType::Q5_0 => (d4, ffi::launch_mmq_gguf_q5_0, 32),
        GgmlDType::Q5_1 => (ds4, ffi::launch_mmq_gguf_q5_1, 32),
        GgmlDType::Q8_0 => (d4, ffi::launch_mmq_gguf_q8_0, 32),
        GgmlDType::Q2K => (d2s6, ffi::launch_mmq_gguf_q2_k, 256),
        GgmlDType::Q3K => (d4, ffi::launch_mmq_gguf_q3_k, 256),
        GgmlDType::Q4K => (ds4, ffi::launch_mmq_gguf_q4_k, 256),
        GgmlDType::Q5K => (ds4, ffi::launch_mmq_gguf_q5_k, 256),
        GgmlDType::Q6K => (d4, ffi::launch_mmq_gguf_q6_k, 256),
        _ => return None,
    };
    Some(Mmq {
        quantize,
        launch,
        qk,
    })
}

/// A quantized weight as the kernels take it.
#[derive(Clone, Copy)]
struct Weight {
    ptr: u64,
    mmvq: Mmvq,
    mmq: Mmq,
    /// Our matrix-vector kernels' type, where they take this weight (else candle's mmvq).
    own: Option<MatvecType>,
    rows: usize,
    cols: usize,
}

impl Weight {
    fn of(l: &crate::model::linear::QLinear, rows: usize, cols: usize) -> Result<Option<Self>> {
        let w = l.weight();
        let (Some(mmvq), Some(mmq)) = (mmvq_for(w.dtype()), mmq_for(w.dtype())) else {
            return Ok(None);
        };
        if l.out_features() != rows || l.in_features() != cols {
            return Err(Error::InvalidInput(format!(
                "fused decode: a weight of [{}, {}], expected [{rows}, {cols}]",
                l.out_features(),
                l.in_features()
            )));
        }
        let ptr = w.device_ptr()? as u64;
        Ok(Some(Weight {
            ptr,
            mmvq,
            mmq,
            own: MatvecType::of(w.dtype(), cols, ptr),
            rows,
            cols,
        }))
    }
}

/// One block's addresses.
struct LayerPtrs {
    attn_norm: u64,
    /// One matrix, or the query, key and value matrices, whose outputs sit side by side.
    qkv: Vec<Weight>,
    o: Weight,
    ffn_norm: u64,
    gate_up: Weight,
    down: Weight,
    eps: f32,
}

/// Widths of a stage's blocks.
#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    q: usize,
    kv: usize,
    ffn: usize,
}

/// Runs `blocks` on `x: [n, hidden]`, one decode row per segment, when the fused path takes
/// this step (see the module docs); `None` otherwise, with nothing written. Writes each
/// segment's key and value into its cache (room already reserved); the caller advances them.
pub fn forward(
    blocks: &[Block],
    x: &Tensor,
    segs: &mut [Segment<'_>],
    rope: &Rope,
) -> Result<Option<Tensor>> {
    if !enabled() || blocks.is_empty() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let Some(parts) = blocks
        .iter()
        .map(Block::fused_parts)
        .collect::<Option<Vec<FusedParts<'_>>>>()
    else {
        return Ok(None);
    };
    let s = parts[0].shape;
    if parts.iter().any(|p| {
        p.shape.heads != s.heads || p.shape.kv_heads != s.kv_heads || p.shape.head_dim != s.head_dim
    }) || (0..parts.len()).any(|li| !decode_attention::applies(segs, li, s))
    {
        return Ok(None);
    }
    let (n, hidden) = x.dims2()?;
    if n != segs.len() {
        return Ok(None);
    }
    let d = Dims {
        hidden,
        q: s.heads * s.head_dim,
        kv: s.kv_heads * s.head_dim,
        ffn: parts[0].down.in_features(),
    };
    // Whole Q8_1 blocks: the widths, and each head (the attention kernel quantizes its heads).
    if [d.hidden, d.q, d.ffn, s.head_dim]
        .iter()
        .any(|k| k % 32 != 0)
    {
        return Ok(None);
    }
    let (cos_t, _) = rope.tables();
    if rope.head_dim() != s.head_dim || cos_t.dims2()?.1 != s.head_dim / 2 {
        return Err(Error::InvalidInput(format!(
            "fused decode: rope tables for heads of {}, not {}",
            rope.head_dim(),
            s.head_dim
        )));
    }
    let stream = dev.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| Error::InvalidInput(format!("fused decode: bind context: {e:?}")))?;
    let mut layers = Vec::with_capacity(parts.len());
    for p in &parts {
        let qkv_rows: &[usize] = match p.qkv.len() {
            1 => &[d.q + 2 * d.kv],
            _ => &[d.q, d.kv, d.kv],
        };
        if p.qkv.len() != qkv_rows.len() {
            return Ok(None);
        }
        let mut qkv = Vec::with_capacity(qkv_rows.len());
        for (l, &rows) in p.qkv.iter().zip(qkv_rows) {
            match Weight::of(l, rows, d.hidden)? {
                Some(w) => qkv.push(w),
                None => return Ok(None),
            }
        }
        let (Some(o), Some(gate_up), Some(down)) = (
            Weight::of(p.o, d.hidden, d.q)?,
            Weight::of(p.gate_up, 2 * d.ffn, d.hidden)?,
            Weight::of(p.down, d.hidden, d.ffn)?,
        ) else {
            return Ok(None);
        };
        for norm in [p.attn_norm, p.ffn_norm] {
            if norm.dims() != [d.hidden] || norm.dtype() != DType::F32 {
                return Ok(None);
            }
        }
        layers.push(LayerPtrs {
            attn_norm: vector_address(p.attn_norm, &stream)?,
            qkv,
            o,
            ffn_norm: vector_address(p.ffn_norm, &stream)?,
            gate_up,
            down,
            eps: p.eps,
        });
    }
    let mut table = vec![0u64; parts.len() * 2 * n];
    for li in 0..parts.len() {
        let at = li * 2 * n;
        for (i, g) in segs.iter().enumerate() {
            let (kc, vc) = checked_caches(g, li, d.kv, rope)?;
            table[at + i] = address::<half::f16>(kc, &stream)?.0;
            table[at + n + i] = address::<half::f16>(vc, &stream)?.0;
        }
    }
    let pos = segs
        .iter()
        .map(|g| {
            i32::try_from(g.start)
                .map_err(|_| Error::InvalidInput(format!("position {} is too large", g.start)))
        })
        .collect::<Result<Vec<_>>>()?;
    let (cos, sin) = rope.tables();
    let op = FusedDecode {
        layers,
        table,
        pos,
        cos: address::<f32>(cos, &stream)?.0,
        sin: address::<f32>(sin, &stream)?.0,
        dims: d,
        shape: s,
        interleaved: rope.style() == RopeStyle::Interleaved,
    };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

pub(crate) fn vector_address(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    Ok(address::<f32>(&t.reshape((1, t.elem_count()))?, stream)?.0)
}

struct FusedDecode {
    layers: Vec<LayerPtrs>,
    /// Per layer: the sessions' key-cache addresses, then their value-cache addresses.
    table: Vec<u64>,
    pos: Vec<i32>,
    cos: u64,
    sin: u64,
    dims: Dims,
    shape: crate::model::attention::AttnShape,
    interleaved: bool,
}

/// `dev`'s stream with its context bound to this thread: a node runs forward passes on its
/// compute thread, not the one that made the context.
pub(crate) fn bound_stream(dev: &CudaDevice) -> candle_core::Result<Arc<CudaStream>> {
    let stream = dev.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| err("bind context", e))?;
    Ok(stream)
}

/// The device address of `what`'s contiguous f32 input.
pub(crate) fn input_address(
    xs: &CudaStorage,
    xl: &Layout,
    stream: &CudaStream,
    what: &str,
) -> candle_core::Result<u64> {
    let Some((o1, o2)) = xl.contiguous_offsets() else {
        candle_core::bail!("{what}: the input is not contiguous");
    };
    let x = xs.as_cuda_slice::<f32>()?.slice(o1..o2);
    let at = x.device_ptr(stream).0;
    Ok(at)
}

pub(crate) fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused decode: {what}: {e:?}"))
}

pub(crate) fn padded(k: usize) -> usize {
    k.div_ceil(ROW_PADDING) * ROW_PADDING
}

pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// The device's figures candle's mmq launchers take.
#[derive(Clone, Copy)]
struct DeviceInfo {
    cc: i32,
    nsm: i32,
    smpbo: i64,
    warp_size: i32,
}

impl DeviceInfo {
    fn of(stream: &CudaStream) -> Self {
        use candle_core::cuda_backend::cudarc::driver::{result, sys::CUdevice_attribute as A};
        let d = stream.context().cu_device();
        // SAFETY: plain attribute queries of a live device.
        let get = |a, or: i32| unsafe { result::device::get_attribute(d, a) }.unwrap_or(or);
        DeviceInfo {
            cc: get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 8) * 100
                + get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0) * 10,
            nsm: get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 1),
            smpbo: i64::from(get(
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                49152,
            )),
            warp_size: get(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
        }
    }
}

/// mmq's quantized activations: rows padded to a multiple of 512 (and of 128), 144 bytes per
/// 128 values, plus room for one more tile.
fn mmq_scratch_bytes(n: usize, k: usize) -> usize {
    (n * padded(k) / 128 + 128) * 144
}

/// How a step's products run: up to [`MMVQ_MAX_BATCH`] rows through mmvq, reading Q8_1
/// written by our kernels; more through mmq, which reads f32 and quantizes it itself.
enum Products {
    Mmvq {
        /// `[n, padded(kmax) / 32]` Q8_1 blocks.
        xq: u64,
        /// Our kernels for `n` rows, where some weight takes them.
        own: Option<MatvecFuncs>,
    },
    Mmq {
        /// `[n, kmax]` f32 activations.
        act: u64,
        /// mmq's quantized activations.
        scratch: u64,
        /// mmq's stream-k fixup buffer.
        fixup: u64,
        info: DeviceInfo,
    },
}

impl Products {
    /// `out = w · x` for the `n` rows produced for this product. For mmq, `x` is the f32 input
    /// (`[n, w.cols]`, contiguous); for mmvq, the Q8_1 rows already written.
    ///
    /// # Safety
    /// The buffers must hold `n` rows of their widths and `out` room for `n` rows of
    /// `out_stride` f32 (this product writes the first `w.rows` of each).
    unsafe fn matvec(
        &self,
        w: &Weight,
        x: u64,
        out: u64,
        out_stride: usize,
        n: usize,
        stream: &CudaStream,
    ) -> candle_core::Result<()> {
        let s = stream.cu_stream() as *mut c_void;
        match self {
            Products::Mmvq { xq, own } => {
                let blocks_per_row = padded(w.cols) / 32;
                if let (Some(t), Some(f)) = (w.own, own) {
                    // SAFETY: n <= MAX_COLS rows of padded Q8_1 (16-byte aligned, 16 blocks
                    // a padding unit), `out` as above, `t` from `MatvecType::of` for `w`.
                    return unsafe {
                        f.launch(
                            stream,
                            t,
                            w.ptr,
                            *xq,
                            out,
                            (w.rows, w.cols),
                            (blocks_per_row, out_stride),
                        )
                    };
                }
                let mut at = 0;
                while at < n {
                    let b = (n - at).min(MMVQ_MAX_BATCH);
                    let y = xq + (at * blocks_per_row * Q8_1_BYTES) as u64;
                    let dst = out + (at * out_stride * 4) as u64;
                    // SAFETY: candle's launcher, with the arguments its own fast path passes.
                    unsafe {
                        (w.mmvq)(
                            w.ptr as *const c_void,
                            y as *const c_void,
                            dst as *mut c_void,
                            w.cols as i32,
                            w.rows as i32,
                            blocks_per_row as i32,
                            out_stride as i32,
                            b as i32,
                            s,
                        );
                    }
                    at += b;
                }
            }
            Products::Mmq {
                scratch,
                fixup,
                info,
                ..
            } => {
                let k = w.cols as i64;
                // SAFETY: candle's launchers, with the arguments its own fast path passes.
                unsafe {
                    (w.mmq.quantize)(
                        x as *const c_void,
                        std::ptr::null(),
                        *scratch as *mut c_void,
                        0,
                        k,
                        k,
                        0,
                        0,
                        padded(w.cols) as i64,
                        n as i64,
                        1,
                        1,
                        s,
                    );
                    (w.mmq.launch)(
                        *fixup as *mut c_void,
                        w.ptr as *const c_void,
                        *scratch as *const c_void,
                        out as *mut c_void,
                        k,
                        w.rows as i64,
                        n as i64,
                        (w.cols / w.mmq.qk) as i64,
                        out_stride as i64,
                        info.cc,
                        info.nsm,
                        info.smpbo,
                        info.warp_size,
                        s,
                    );
                }
            }
        }
        Ok(())
    }
}

impl CustomOp1 for FusedDecode {
    fn name(&self) -> &'static str {
        "fused-decode"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused decode runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &xs.device;
        let stream = bound_stream(dev)?;
        let d = self.dims;
        let n = self.pos.len();
        if xl.dims() != [n, d.hidden] {
            candle_core::bail!(
                "fused decode: input {:?}, expected [{n}, {}]",
                xl.dims(),
                d.hidden
            );
        }
        let x_in = input_address(xs, xl, &stream, "fused decode")?;
        let kmax = [d.hidden, d.q, d.ffn].into_iter().max().unwrap_or(0);
        // SAFETY (all scratch buffers): each is written by a kernel before it is read.
        let alloc = |len: usize| -> candle_core::Result<CudaSlice<f32>> {
            unsafe { stream.alloc::<f32>(len) }.map_err(|e| err("alloc", e))
        };
        let alloc_bytes = |len: usize| -> candle_core::Result<CudaSlice<u8>> {
            unsafe { stream.alloc::<u8>(len) }.map_err(|e| err("alloc", e))
        };
        let wide = n > MMVQ_MAX_BATCH;
        let mut held_u8 = Vec::new();
        let mut held_f32 = Vec::new();
        let products = if wide {
            let info = DeviceInfo::of(&stream);
            let act = alloc(n * kmax)?;
            let scratch = alloc_bytes(mmq_scratch_bytes(n, kmax))?;
            // Stream-k: up to one 128 x 128 f32 tile per multiprocessor.
            let fixup = alloc_bytes(info.nsm.max(1) as usize * 128 * 128 * 4)?;
            let p = Products::Mmq {
                act: ptr(&act, &stream),
                scratch: ptr(&scratch, &stream),
                fixup: ptr(&fixup, &stream),
                info,
            };
            held_f32.push(act);
            held_u8.extend([scratch, fixup]);
            p
        } else {
            let xq = alloc_bytes(n * padded(kmax) / 32 * Q8_1_BYTES)?;
            let ours = self.layers.iter().any(|l| {
                l.qkv
                    .iter()
                    .chain([&l.o, &l.gate_up, &l.down])
                    .any(|w| w.own.is_some())
            });
            let p = Products::Mmvq {
                xq: ptr(&xq, &stream),
                own: if ours {
                    Some(MatvecFuncs::load(dev, n)?)
                } else {
                    None
                },
            };
            held_u8.push(xq);
            p
        };
        // The residual stream, in two buffers: each norm reads one and writes the other (its
        // CTAs all read the row it comes from).
        let xa = alloc(n * d.hidden)?;
        let xb = alloc(n * d.hidden)?;
        let qkv = alloc(n * (d.q + 2 * d.kv))?;
        let q_rot = alloc(n * d.q)?;
        // The attention output in f32, only for mmq: for mmvq the attention kernel writes the
        // output projection's Q8_1 input itself.
        let attn = if wide { Some(alloc(n * d.q)?) } else { None };
        let delta = alloc(n * d.hidden)?;
        let gu = alloc(n * 2 * d.ffn)?;
        let table = stream.clone_htod(&self.table).map_err(|e| err("copy", e))?;
        let pos = stream.clone_htod(&self.pos).map_err(|e| err("copy", e))?;
        let split = SplitScratch::new(&stream, self.shape, &self.pos)?;
        let (splits, partp, countp) = split.raw(&stream);
        let (xap, xbp, qkvp, q_rotp, attnp, deltap, gup, tablep, posp) = (
            ptr(&xa, &stream),
            ptr(&xb, &stream),
            ptr(&qkv, &stream),
            ptr(&q_rot, &stream),
            attn.as_ref().map_or(0, |a| ptr(a, &stream)),
            ptr(&delta, &stream),
            ptr(&gu, &stream),
            ptr(&table, &stream),
            ptr(&pos, &stream),
        );
        let func = |name| {
            dev.get_or_load_custom_func(name, MODULE, PTX)
                .map(|f| f.into_cuda_function())
        };
        let (norm, silu) = if wide {
            (func("add_rmsnorm_f32")?, func("silu_mul_f32")?)
        } else {
            (func("add_rmsnorm_q8_1")?, func("silu_mul_q8_1")?)
        };
        let add = func("add_into")?;
        let attn_fs = AttnFuncs::load(dev)?;
        let (hidden, hpad) = (d.hidden as i32, padded(d.hidden) as i32);
        // 1024 threads a CTA: each reads the row once (see `row_sum_sq`), then writes its
        // chunk (32 blocks of 32 Q8_1 values, or 1024 f32).
        let norm_cfg = LaunchConfig {
            grid_dim: (
                if wide {
                    d.hidden.div_ceil(1024)
                } else {
                    (padded(d.hidden) / 32).div_ceil(32)
                } as u32,
                n as u32,
                1,
            ),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // A warp per block of 32 values, 8 warps a CTA, a grid row per activation row.
        let per_block = |k: usize| LaunchConfig {
            grid_dim: ((padded(k) / 32).div_ceil(8) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Where the products' input goes: Q8_1 rows for mmvq, f32 rows for mmq.
        let (act_out, act_in) = match &products {
            Products::Mmvq { xq, .. } => (*xq, 0u64),
            Products::Mmq { act, .. } => (*act, *act),
        };
        // x_out = x_in + delta (when given), then the product input of rmsnorm(x_out) * w.
        let launch_norm =
            |x_in: u64, x_out: u64, delta: u64, w: u64, eps: f32| -> candle_core::Result<()> {
                let (mut x_in, mut x_out, mut delta, mut w, mut eps) = (x_in, x_out, delta, w, eps);
                let (mut act, mut hidden, mut hpad) = (act_out, hidden, hpad);
                let mut params = vec![
                    arg(&mut x_in),
                    arg(&mut delta),
                    arg(&mut x_out),
                    arg(&mut w),
                    arg(&mut act),
                    arg(&mut hidden),
                ];
                if !wide {
                    params.push(arg(&mut hpad));
                }
                params.push(arg(&mut eps));
                // SAFETY: x_in, x_out and delta are [n, hidden] f32 (x_out apart from x_in), w
                // [hidden] f32; the output holds n rows of kmax >= hidden values (f32, or Q8_1
                // padded); the kernel waits for its predecessor first.
                unsafe { pdl::launch(&stream, &norm, norm_cfg, &mut params, true) }
                    .map_err(|e| err("add_rmsnorm", e))
            };
        let null = 0u64;
        let kv_off = (d.q * 4) as u64;
        let v_off = ((d.q + d.kv) * 4) as u64;
        let qkv_stride = (d.q + 2 * d.kv) as i64;
        // The residual stream's current buffer (the input, until the first norm copies it).
        let (mut cur, mut in_b) = (x_in, true);
        let mut next = || {
            in_b = !in_b;
            if in_b {
                xbp
            } else {
                xap
            }
        };
        for (li, l) in self.layers.iter().enumerate() {
            // x += delta (the previous block's down projection), then norm.
            let out = next();
            launch_norm(
                cur,
                out,
                if li == 0 { null } else { deltap },
                l.attn_norm,
                l.eps,
            )?;
            cur = out;
            // SAFETY (the products below): the buffers were allocated above for n rows of
            // their widths.
            let mut at = 0u64;
            for w in &l.qkv {
                // SAFETY: as above; each part writes its columns of the qkv rows.
                unsafe {
                    products.matvec(w, act_in, qkvp + at * 4, qkv_stride as usize, n, &stream)
                }?;
                at += w.rows as u64;
            }
            let raw = RawAttn {
                q: qkvp,
                q_stride: qkv_stride,
                k: qkvp + kv_off,
                k_stride: qkv_stride,
                v: qkvp + v_off,
                v_stride: qkv_stride,
                q_rot: q_rotp,
                out: attnp,
                out_q8: if wide { 0 } else { act_out },
                out_q8_stride: (padded(d.q) / 32) as i32,
                splits,
                part: partp,
                count: countp,
                table: tablep + (li * 2 * n * 8) as u64,
                pos: posp,
                cos: self.cos,
                sin: self.sin,
                sessions: n,
                shape: self.shape,
                interleaved: self.interleaved,
            };
            // SAFETY: the caches were checked in `forward` (contiguous f16, room at pos, pos
            // inside the rope tables), the rest are the buffers above.
            unsafe { decode_attention::launch(&attn_fs, &raw)? };
            unsafe { products.matvec(&l.o, attnp, deltap, l.o.rows, n, &stream) }?;
            let out = next();
            launch_norm(cur, out, deltap, l.ffn_norm, l.eps)?;
            cur = out;
            unsafe { products.matvec(&l.gate_up, act_in, gup, l.gate_up.rows, n, &stream) }?;
            let (mut f, mut fpad) = (d.ffn as i32, padded(d.ffn) as i32);
            let (mut gu_in, mut act) = (gup, act_out);
            let mut params = vec![arg(&mut gu_in), arg(&mut act), arg(&mut f)];
            let cfg = if wide {
                LaunchConfig {
                    grid_dim: (d.ffn.div_ceil(256) as u32, n as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                }
            } else {
                params.push(arg(&mut fpad));
                per_block(d.ffn)
            };
            // SAFETY: gu is [n, 2 ffn] f32, the output n rows of kmax >= ffn values; the
            // kernel waits for its predecessor first.
            unsafe { pdl::launch(&stream, &silu, cfg, &mut params, true) }
                .map_err(|e| err("silu_mul", e))?;
            unsafe { products.matvec(&l.down, act_in, deltap, l.down.rows, n, &stream) }?;
        }
        let (mut x, mut dl, mut len) = (cur, deltap, (n * d.hidden) as i64);
        let cfg = LaunchConfig {
            grid_dim: ((n * d.hidden).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: both are [n, hidden] f32; the kernel waits for its predecessor first.
        unsafe {
            pdl::launch(
                &stream,
                &add,
                cfg,
                &mut [arg(&mut x), arg(&mut dl), arg(&mut len)],
                true,
            )
        }
        .map_err(|e| err("add_into", e))?;
        // The scratch buffers are freed stream-ordered, after the kernels that use them.
        let (x, spare) = if cur == xbp { (xb, xa) } else { (xa, xb) };
        drop((
            held_u8, held_f32, spare, qkv, q_rot, attn, delta, gu, table, pos, split,
        ));
        Ok((
            CudaStorage::wrap_cuda_slice(x, dev.clone()),
            Shape::from((n, d.hidden)),
        ))
    }
}

/// Runs the kernels once, so that their module is loaded at start-up; a no-op where the path
/// is off.
pub fn warm_up(dev: &Device) -> Result<()> {
    if !enabled() || !dev.is_cuda() {
        return Ok(());
    }
    let Device::Cuda(d) = dev else {
        return Ok(());
    };
    for f in [
        "add_rmsnorm_q8_1",
        "silu_mul_q8_1",
        "add_rmsnorm_f32",
        "silu_mul_f32",
        "add_into",
    ] {
        d.get_or_load_custom_func(f, MODULE, PTX)?;
    }
    if super::matvec::enabled() {
        MatvecFuncs::load(d, 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::gguf::GgufFile;
    use crate::model::{KvCache, KvDtype, LayerRange, Stage};

    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let n = b.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok((d / n.max(1e-30)).sqrt())
    }

    /// Decode steps through the fused path against the block-by-block path, on the default
    /// model (`LLMC_TEST_MODEL`, else `models/` of the workspace; the test fails without it):
    /// its first two blocks, 12 sessions prefilled to different depths, then steps of all 12
    /// (more rows than mmvq takes: mmq), of one and of five (mmvq). Each step's hidden states
    /// agree to within the rounding of the two paths, so the caches they wrote agree too. Needs a
    /// GPU: run the test binary of a `cuda` build on the GPU machine.
    #[test]
    fn fused_steps_match_block_forward() -> Result<()> {
        check_fused_steps(&default_model(), 1e-4)
    }

    fn default_model() -> String {
        std::env::var("LLMC_TEST_MODEL").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
            .into()
        })
    }

    /// As [`fused_steps_match_block_forward`], on synthetic Q4_0 and Q8_0 models whose widths
    /// our matrix-vector kernels take (`matvec.rs`), so their products are checked too: rows
    /// of 24 blocks (less than one pass) and of 136 (a pass and a tail).
    #[test]
    #[cfg(feature = "synth")]
    fn fused_steps_match_block_forward_with_our_matvec() -> Result<()> {
        use crate::gguf::synth::{self, SynthQuant, SynthSpec};
        let tokenizer = GgufFile::open(default_model())?;
        let dir = tempfile::tempdir().map_err(|e| Error::InvalidInput(e.to_string()))?;
        for quant in [SynthQuant::Q4_0, SynthQuant::Q8_0] {
            let spec = SynthSpec {
                context: 512,
                quant,
                seed: 7,
                ..SynthSpec::llama(2, 768, 4352, 12, 4)
            };
            let path = dir.path().join(format!("{quant:?}.gguf"));
            synth::write(&spec, &tokenizer, &path)?;
            let file = GgufFile::open(&path)?;
            let stage = Stage::load(&file, LayerRange::new(0, 2)?, &Device::new_cuda(0)?, 256)?;
            let parts = stage.parts().0[0]
                .fused_parts()
                .ok_or_else(|| Error::InvalidInput("no fused parts".into()))?;
            for l in parts
                .qkv
                .iter()
                .copied()
                .chain([parts.o, parts.gate_up, parts.down])
            {
                let w = l.weight();
                if MatvecType::of(w.dtype(), l.in_features(), w.device_ptr()? as u64).is_none() {
                    return Err(Error::InvalidInput(format!(
                        "{quant:?}: our matvec does not take a weight of {:?}, width {}",
                        w.dtype(),
                        l.in_features()
                    )));
                }
            }
            eprintln!("{quant:?}:");
            // Our kernels sum each product in another order than candle's mmvq, so every row
            // carries last-bit differences into the next quantization, and most rows see a few
            // values flip a step (on the H100: median 5.8e-4, worst 3.7e-3 relative error).
            // A wrong product moves a row by about 1.
            check_fused_steps(path.to_str().unwrap_or_default(), 5e-3)?;
        }
        Ok(())
    }

    /// Decode steps as described above; fails where the median row's relative error passes
    /// `median_limit` or any row's passes 0.1.
    fn check_fused_steps(path: &str, median_limit: f32) -> Result<()> {
        let file = GgufFile::open(path)?;
        let dev = Device::new_cuda(0)?;
        // Two blocks: a wrong kernel shows as an error near 1, while rounding differences stay
        // small (through all 30 blocks they compound to several percent of the hidden state).
        let stage = Stage::load(&file, LayerRange::new(0, 2)?, &dev, 256)?;
        let (blocks, rope) = stage.parts();
        let n = 12;
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                (0..3 + 5 * i)
                    .map(|t| ((t * 37 + i * 101) % 1000 + 10) as u32)
                    .collect()
            })
            .collect();
        let mut fused: Vec<KvCache> = Vec::new();
        let mut plain: Vec<KvCache> = Vec::new();
        for p in &prompts {
            let x = stage.embed(p)?;
            for set in [&mut fused, &mut plain] {
                let mut c = stage.new_cache(256, KvDtype::F16)?;
                stage.forward(&x, &mut c, 0)?;
                set.push(c);
            }
        }
        let mut tokens: Vec<u32> = (0..n).map(|i| (i * 53 + 7) as u32).collect();
        let schedules: Vec<Vec<usize>> = vec![
            (0..n).collect(),
            (0..n).collect(),
            (0..n).collect(),
            vec![3],
            vec![3],
            vec![0, 2, 5, 8, 11],
            (0..n).collect(),
        ];
        let mut all = Vec::new();
        for (step, who) in schedules.iter().enumerate() {
            let ids: Vec<u32> = who.iter().map(|&i| tokens[i]).collect();
            let x = stage.embed(&ids)?;
            // `who` is ascending, so the segments come in its order.
            let run = |set: &mut Vec<KvCache>, fuse: bool| -> Result<Tensor> {
                let mut segs: Vec<Segment<'_>> = set
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| who.contains(i))
                    .map(|(_, c)| {
                        let start = c.len();
                        Segment {
                            cache: c,
                            start,
                            len: 1,
                        }
                    })
                    .collect();
                for g in segs.iter_mut() {
                    g.cache.reserve(1)?;
                }
                let y = if fuse {
                    forward(blocks, &x, &mut segs, rope)?.ok_or_else(|| {
                        Error::InvalidInput("the fused path did not take a decode step".into())
                    })?
                } else {
                    let mut y = x.clone();
                    for (li, b) in blocks.iter().enumerate() {
                        y = b.forward(&y, &mut segs, li, rope)?;
                    }
                    y
                };
                for g in segs.iter_mut() {
                    g.cache.advance(1);
                }
                Ok(y)
            };
            let yf = run(&mut fused, true)?;
            let yp = run(&mut plain, false)?;
            let errs = (0..who.len())
                .map(|r| rel_err(&yf.get(r)?, &yp.get(r)?))
                .collect::<Result<Vec<f32>>>()?;
            eprintln!("step {step}, sessions {who:?}: relative errors {errs:?}");
            all.extend(errs);
            for &i in who {
                tokens[i] = (tokens[i] * 31 + 17 + step as u32) % 1000 + 5;
            }
        }
        // Both paths quantize activations to 8 bits. Where their sums round differently in
        // the last bit, a value can land on the other side of a quantization step, and that
        // flip carries on: such rows differ by up to a few percent, the others by ~1e-7. A
        // wrong kernel moves every row, by far more.
        all.sort_by(f32::total_cmp);
        let (median, worst) = (all[all.len() / 2], all[all.len() - 1]);
        eprintln!(
            "fused against block-by-block: median relative error {median:e}, worst {worst:e}"
        );
        if median > median_limit || worst > 0.1 {
            return Err(Error::InvalidInput(format!(
                "the paths differ: median relative error {median}, worst {worst}"
            )));
        }
        Ok(())
    }
}
