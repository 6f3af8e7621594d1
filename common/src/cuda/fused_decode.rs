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

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::decode_attention::{self, address, checked_caches, RawAttn};
use super::fused_products::{Products, Weight, MMVQ_MAX_BATCH};
use super::matvec::MatvecFuncs;
use super::pdl::{self, arg};
use super::step_buffers::{StepBuffers, StepKernels};
use crate::error::{Error, Result};
use crate::gguf::RopeStyle;
use crate::model::attention::AttnShape;
use crate::model::block::{Block, FusedParts, Segment};
use crate::model::rope::Rope;

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_decode.ptx"));
pub(crate) const MODULE: &str = "llm_cluster_fused_decode";
/// Rows of Q8_1 activations are padded to this many values (candle's `MATRIX_ROW_PADDING`).
const ROW_PADDING: usize = 512;

/// Whether the fused path is on ([`crate::cuda_options::CudaOptions::fused_step`]): off too
/// with our attention kernels off, so that switch still selects candle's ops throughout.
pub fn enabled() -> bool {
    crate::cuda_options::get().fused_step()
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
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub hidden: usize,
    pub q: usize,
    pub kv: usize,
    pub ffn: usize,
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
    forward_with(blocks, x, segs, rope, crate::cuda_options::get().graphs)
}

/// [`forward`], replaying steps of up to 8 rows from graphs where `graphs`.
fn forward_with(
    blocks: &[Block],
    x: &Tensor,
    segs: &mut [Segment<'_>],
    rope: &Rope,
    graphs: bool,
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
        graphs,
    };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

pub(crate) fn vector_address(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    Ok(address::<f32>(&t.reshape((1, t.elem_count()))?, stream)?.0)
}

/// One fused decode step, as the kernels take it.
pub(crate) struct FusedDecode {
    layers: Vec<LayerPtrs>,
    /// Per layer: the sessions' key-cache addresses, then their value-cache addresses.
    table: Vec<u64>,
    pos: Vec<i32>,
    cos: u64,
    sin: u64,
    dims: Dims,
    shape: AttnShape,
    interleaved: bool,
    /// Whether steps of up to [`MMVQ_MAX_BATCH`] rows are replayed from captured graphs
    /// ([`super::decode_graph`]).
    graphs: bool,
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

impl FusedDecode {
    /// Everything a captured step depends on besides its buffers: the weights' and norms'
    /// addresses and kernels, the rope tables, the widths and the number of rows. Two steps
    /// with the same signature launch the same kernels with the same arguments.
    pub(crate) fn signature(&self) -> Vec<u64> {
        let d = self.dims;
        let s = self.shape;
        let mut sig = vec![
            self.pos.len() as u64,
            d.hidden as u64,
            d.q as u64,
            d.kv as u64,
            d.ffn as u64,
            s.heads as u64,
            s.kv_heads as u64,
            s.head_dim as u64,
            u64::from(self.interleaved),
            self.cos,
            self.sin,
        ];
        for l in &self.layers {
            sig.extend([l.attn_norm, l.ffn_norm, u64::from(l.eps.to_bits())]);
            for w in l.qkv.iter().chain([&l.o, &l.gate_up, &l.down]) {
                sig.extend(w.signature());
            }
        }
        sig
    }

    /// Whether some weight takes our matrix-vector kernels.
    fn own_matvec(&self) -> bool {
        self.layers.iter().any(|l| {
            l.qkv
                .iter()
                .chain([&l.o, &l.gate_up, &l.down])
                .any(|w| w.own.is_some())
        })
    }

    /// The widths and heads of the blocks, and how many there are.
    pub(crate) fn shape(&self) -> (Dims, AttnShape, usize) {
        (self.dims, self.shape, self.layers.len())
    }

    /// The step's rows.
    pub(crate) fn rows(&self) -> usize {
        self.pos.len()
    }

    /// The attention's CTAs a head for this step.
    pub(crate) fn splits(&self) -> usize {
        let max_len = self
            .pos
            .iter()
            .map(|&p| p.max(0) as usize + 1)
            .max()
            .unwrap_or(1);
        decode_attention::splits_for(max_len)
    }

    /// New buffers for this step (`input`: with an input buffer, for a graph), with room for
    /// `splits` CTAs a head.
    pub(crate) fn buffers(
        &self,
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        splits: usize,
        input: bool,
    ) -> candle_core::Result<StepBuffers> {
        StepBuffers::new(
            dev,
            stream,
            self.shape(),
            self.rows(),
            splits,
            self.own_matvec(),
            input,
        )
    }

    /// Copies this step's cache-address table and positions into `b`.
    pub(crate) fn upload(
        &self,
        stream: &Arc<CudaStream>,
        b: &mut StepBuffers,
    ) -> candle_core::Result<()> {
        b.upload(stream, &self.table, &self.pos)
    }

    /// Launches the whole step on `stream`: reads `x_in` (`[n, hidden]` f32), the table and
    /// positions in `b`, and runs attention over `splits` CTAs a head (at most what `b` has
    /// room for). Returns the address of the residual buffer of `b` that holds the output.
    /// Launches only: it allocates and loads nothing, so it can be captured in a graph.
    pub(crate) fn launch_step(
        &self,
        stream: &Arc<CudaStream>,
        k: &StepKernels,
        b: &StepBuffers,
        x_in: u64,
        splits: usize,
    ) -> candle_core::Result<u64> {
        let d = self.dims;
        let n = b.n;
        let wide = n > MMVQ_MAX_BATCH;
        let p = b.p;
        let products = &b.products;
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
        let (act_out, act_in) = match products {
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
                unsafe { pdl::launch(stream, &k.norm, norm_cfg, &mut params, true) }
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
                p.xb
            } else {
                p.xa
            }
        };
        for (li, l) in self.layers.iter().enumerate() {
            // x += delta (the previous block's down projection), then norm.
            let out = next();
            launch_norm(
                cur,
                out,
                if li == 0 { null } else { p.delta },
                l.attn_norm,
                l.eps,
            )?;
            cur = out;
            // SAFETY (the products below): the buffers were allocated for n rows of their
            // widths.
            let mut at = 0u64;
            for w in &l.qkv {
                // SAFETY: as above; each part writes its columns of the qkv rows.
                unsafe {
                    products.matvec(w, act_in, p.qkv + at * 4, qkv_stride as usize, n, stream)
                }?;
                at += w.rows as u64;
            }
            let raw = RawAttn {
                q: p.qkv,
                q_stride: qkv_stride,
                k: p.qkv + kv_off,
                k_stride: qkv_stride,
                v: p.qkv + v_off,
                v_stride: qkv_stride,
                q_rot: p.q_rot,
                out: p.attn,
                out_q8: if wide { 0 } else { act_out },
                out_q8_stride: (padded(d.q) / 32) as i32,
                splits,
                part: p.part,
                count: p.count,
                table: p.table + (li * 2 * n * 8) as u64,
                pos: p.pos,
                cos: self.cos,
                sin: self.sin,
                sessions: n,
                shape: self.shape,
                interleaved: self.interleaved,
            };
            // SAFETY: the caches were checked in `forward` (contiguous f16, room at pos, pos
            // inside the rope tables), the rest are the buffers of `b`, whose split scratch
            // has room for `splits`.
            unsafe { decode_attention::launch(stream, &k.attn, &raw)? };
            unsafe { products.matvec(&l.o, p.attn, p.delta, l.o.rows, n, stream) }?;
            let out = next();
            launch_norm(cur, out, p.delta, l.ffn_norm, l.eps)?;
            cur = out;
            unsafe { products.matvec(&l.gate_up, act_in, p.gu, l.gate_up.rows, n, stream) }?;
            let (mut f, mut fpad) = (d.ffn as i32, padded(d.ffn) as i32);
            let (mut gu_in, mut act) = (p.gu, act_out);
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
            unsafe { pdl::launch(stream, &k.silu, cfg, &mut params, true) }
                .map_err(|e| err("silu_mul", e))?;
            unsafe { products.matvec(&l.down, act_in, p.delta, l.down.rows, n, stream) }?;
        }
        let (mut x, mut dl, mut len) = (cur, p.delta, (n * d.hidden) as i64);
        let cfg = LaunchConfig {
            grid_dim: ((n * d.hidden).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: both are [n, hidden] f32; the kernel waits for its predecessor first.
        unsafe {
            pdl::launch(
                stream,
                &k.add,
                cfg,
                &mut [arg(&mut x), arg(&mut dl), arg(&mut len)],
                true,
            )
        }
        .map_err(|e| err("add_into", e))?;
        Ok(cur)
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
        let n = self.rows();
        if xl.dims() != [n, d.hidden] {
            candle_core::bail!(
                "fused decode: input {:?}, expected [{n}, {}]",
                xl.dims(),
                d.hidden
            );
        }
        let Some((o1, o2)) = xl.contiguous_offsets() else {
            candle_core::bail!("fused decode: the input is not contiguous");
        };
        let x = xs.as_cuda_slice::<f32>()?.slice(o1..o2);
        if self.graphs && n <= MMVQ_MAX_BATCH {
            if let Some(y) = super::decode_graph::step(self, dev, &stream, &x)? {
                return Ok((
                    CudaStorage::wrap_cuda_slice(y, dev.clone()),
                    Shape::from((n, d.hidden)),
                ));
            }
        }
        let x_in = x.device_ptr(&stream).0;
        let splits = self.splits();
        let kernels = StepKernels::load(dev, n > MMVQ_MAX_BATCH)?;
        let mut b = self.buffers(dev, &stream, splits, false)?;
        self.upload(&stream, &mut b)?;
        let out = self.launch_step(&stream, &kernels, &b, x_in, splits)?;
        Ok((
            CudaStorage::wrap_cuda_slice(b.into_output(out), dev.clone()),
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
mod tests;
