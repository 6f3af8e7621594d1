//! The buffers and kernels of a fused decode step ([`super::fused_decode`]): allocated for
//! one step, or kept with a captured graph ([`super::decode_graph`]) and reused by every
//! replay, in which case they must not move.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream};
use candle_core::cuda_backend::CudaDevice;

use super::decode_attention::{AttnFuncs, SplitScratch};
use super::fused_decode::{err, padded, ptr, Dims, MODULE, PTX};
use super::fused_products::{mmq_scratch_bytes, DeviceInfo, Products, MMVQ_MAX_BATCH};
use super::matvec::{MatvecFuncs, Q8_1_BYTES};
use crate::model::attention::AttnShape;

/// The addresses a step's launches take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepPtrs {
    /// The residual stream, in two buffers: each norm reads one and writes the other.
    pub xa: u64,
    pub xb: u64,
    pub qkv: u64,
    pub q_rot: u64,
    /// The attention output in f32, only for mmq (0 for mmvq: the attention kernel writes
    /// the output projection's Q8_1 input itself).
    pub attn: u64,
    pub delta: u64,
    pub gu: u64,
    /// Per layer: the sessions' key-cache addresses, then their value-cache addresses.
    pub table: u64,
    pub pos: u64,
    /// The split attention's partial results and counters (0 where it has one split).
    pub part: u64,
    pub count: u64,
    /// The step's input buffer, where the buffers have one (graphs), else 0.
    pub input: u64,
}

/// A step's scratch buffers for `n` rows, and their addresses.
pub(crate) struct StepBuffers {
    pub n: usize,
    pub products: Products,
    pub p: StepPtrs,
    /// The step's input, where a graph reads it (graphs only).
    pub input: Option<CudaSlice<f32>>,
    xa: CudaSlice<f32>,
    xb: CudaSlice<f32>,
    /// The table of cache addresses, then the positions (i32), uploaded in one copy.
    meta: CudaSlice<u8>,
    /// Every other buffer, kept alive while the addresses above are in use.
    held_f32: Vec<CudaSlice<f32>>,
    held_u8: Vec<CudaSlice<u8>>,
    split: SplitScratch,
}

impl StepBuffers {
    /// Buffers for a step of `n` rows through blocks of `shape` (widths, heads, and how
    /// many blocks), with room for `splits` CTAs a head in attention; `own` where some weight takes our matrix-vector kernels, and
    /// `input` to keep an input buffer too.
    pub(crate) fn new(
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        shape: (Dims, AttnShape, usize),
        n: usize,
        splits: usize,
        own: bool,
        input: bool,
    ) -> candle_core::Result<Self> {
        let (d, s, layers) = shape;
        let kmax = [d.hidden, d.q, d.ffn].into_iter().max().unwrap_or(0);
        // SAFETY (all buffers): each is written by a kernel or a copy before it is read.
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
            let info = DeviceInfo::of(stream);
            let act = alloc(n * kmax)?;
            let scratch = alloc_bytes(mmq_scratch_bytes(n, kmax))?;
            // Stream-k: up to one 128 x 128 f32 tile per multiprocessor.
            let fixup = alloc_bytes(info.nsm.max(1) as usize * 128 * 128 * 4)?;
            let p = Products::Mmq {
                act: ptr(&act, stream),
                scratch: ptr(&scratch, stream),
                fixup: ptr(&fixup, stream),
                info,
            };
            held_f32.push(act);
            held_u8.extend([scratch, fixup]);
            p
        } else {
            let xq = alloc_bytes(n * padded(kmax) / 32 * Q8_1_BYTES)?;
            let p = Products::Mmvq {
                xq: ptr(&xq, stream),
                own: if own {
                    Some(MatvecFuncs::load(dev, n)?)
                } else {
                    None
                },
            };
            held_u8.push(xq);
            p
        };
        let xa = alloc(n * d.hidden)?;
        let xb = alloc(n * d.hidden)?;
        let qkv = alloc(n * (d.q + 2 * d.kv))?;
        let q_rot = alloc(n * d.q)?;
        let attn = if wide { Some(alloc(n * d.q)?) } else { None };
        let delta = alloc(n * d.hidden)?;
        let gu = alloc(n * 2 * d.ffn)?;
        let table_bytes = layers * 2 * n * 8;
        let meta = alloc_bytes(table_bytes + n * 4)?;
        let split = SplitScratch::with_splits(stream, s, n, splits)?;
        let (_, part, count) = split.raw(stream);
        let input = if input {
            Some(alloc(n * d.hidden)?)
        } else {
            None
        };
        let p = StepPtrs {
            xa: ptr(&xa, stream),
            xb: ptr(&xb, stream),
            qkv: ptr(&qkv, stream),
            q_rot: ptr(&q_rot, stream),
            attn: attn.as_ref().map_or(0, |a| ptr(a, stream)),
            delta: ptr(&delta, stream),
            gu: ptr(&gu, stream),
            table: ptr(&meta, stream),
            pos: ptr(&meta, stream) + table_bytes as u64,
            part,
            count,
            input: input.as_ref().map_or(0, |i| ptr(i, stream)),
        };
        held_f32.extend([qkv, q_rot, delta, gu]);
        held_f32.extend(attn);
        Ok(StepBuffers {
            n,
            products,
            p,
            input,
            xa,
            xb,
            meta,
            held_f32,
            held_u8,
            split,
        })
    }

    /// Copies a step's cache-address table and positions in, ordered on `stream` after the
    /// kernels before (a graph's last replay among them).
    pub(crate) fn upload(
        &mut self,
        stream: &Arc<CudaStream>,
        table: &[u64],
        pos: &[i32],
    ) -> candle_core::Result<()> {
        let mut bytes = Vec::with_capacity(table.len() * 8 + pos.len() * 4);
        for t in table {
            bytes.extend_from_slice(&t.to_ne_bytes());
        }
        for p in pos {
            bytes.extend_from_slice(&p.to_ne_bytes());
        }
        if bytes.len() != self.meta.len() {
            candle_core::bail!(
                "fused decode: {} bytes of table and positions for a buffer of {}",
                bytes.len(),
                self.meta.len()
            );
        }
        stream
            .memcpy_htod(&bytes, &mut self.meta)
            .map_err(|e| err("copy", e))
    }

    /// The residual-stream buffer at `at` (one of [`StepPtrs::xa`] and [`StepPtrs::xb`]).
    pub(crate) fn residual(&self, at: u64) -> &CudaSlice<f32> {
        if at == self.p.xb {
            &self.xb
        } else {
            &self.xa
        }
    }

    /// The buffer at `at`, taken out as the step's output; the others are freed
    /// stream-ordered, after the kernels that use them.
    pub(crate) fn into_output(self, at: u64) -> CudaSlice<f32> {
        if at == self.p.xb {
            self.xb
        } else {
            self.xa
        }
    }

    /// Device bytes these buffers hold.
    pub(crate) fn bytes(&self) -> usize {
        let f32s: usize = self.held_f32.iter().map(CudaSlice::len).sum::<usize>()
            + self.xa.len()
            + self.xb.len()
            + self.input.as_ref().map_or(0, CudaSlice::len);
        f32s * 4
            + self.held_u8.iter().map(CudaSlice::len).sum::<usize>()
            + self.meta.len()
            + self.split.bytes()
    }
}

/// The kernels of a step other than the products, loaded before any launch (a graph's
/// capture loads nothing).
pub(crate) struct StepKernels {
    pub norm: CudaFunction,
    pub silu: CudaFunction,
    pub add: CudaFunction,
    pub attn: AttnFuncs,
}

impl StepKernels {
    /// The kernels for `wide` steps (f32 product inputs for mmq) or not (Q8_1 for mmvq).
    pub(crate) fn load(dev: &CudaDevice, wide: bool) -> candle_core::Result<Self> {
        let func = |name| {
            dev.get_or_load_custom_func(name, MODULE, PTX)
                .map(|f| f.into_cuda_function())
        };
        let (norm, silu) = if wide {
            (func("add_rmsnorm_f32")?, func("silu_mul_f32")?)
        } else {
            (func("add_rmsnorm_q8_1")?, func("silu_mul_q8_1")?)
        };
        Ok(StepKernels {
            norm,
            silu,
            add: func("add_into")?,
            attn: AttnFuncs::load(dev)?,
        })
    }
}
