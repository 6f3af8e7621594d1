//! Decode attention for all sessions of a step on CUDA (kernels in `decode_attention.cu`).
//!
//! candle's ops run attention one session at a time, about twenty small kernels per session
//! and layer, so a step of 16 sessions launched ~320 kernels per layer for attention alone and
//! batching gained little on the GPU. Here a step's decode rows take two kernels per layer
//! whatever the number of sessions: one applies RoPE and writes every session's new key and
//! value into its own cache, one attends every (session, head) to its cache. The caches stay
//! per session (each a lease-owned buffer): the kernels reach them through a small table of
//! device pointers copied up per layer.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use super::pdl::{self, arg};
use crate::error::{Error, Result};
use crate::gguf::RopeStyle;
use crate::model::attention::{attend_each, AttnShape, StepRows};
use crate::model::block::Segment;
use crate::model::rope::Rope;

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
pub(crate) const MODULE: &str = "llm_cluster_decode_attention";
/// The kernel's register arrays hold heads up to this width.
const MAX_HEAD_DIM: usize = 256;
/// Warps per attention block (`WARPS` in the kernel).
const WARPS: u32 = 16;
/// Warps per block of the grouped kernel (`GW` in the kernel).
const GROUPED_WARPS: u32 = 8;
/// Rows a warp takes per iteration (`ROWS` in the kernel).
const ROWS: usize = 4;
/// The most CTAs a head's rows are split over, unless `LLMC_CUDA_MAX_SPLITS` says otherwise.
const MAX_SPLITS: usize = 32;
/// The most `LLMC_CUDA_MAX_SPLITS` may ask for.
const MAX_SPLITS_LIMIT: usize = 256;

/// The most CTAs a head's rows are split over: [`MAX_SPLITS`], or `LLMC_CUDA_MAX_SPLITS`
/// (1 to 256, read once; a measurement knob for long contexts).
pub(crate) fn max_splits() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("LLMC_CUDA_MAX_SPLITS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(MAX_SPLITS, |v| v.clamp(1, MAX_SPLITS_LIMIT))
    })
}

/// Whether the grouped kernels do RoPE and the cache write themselves, so that a layer's
/// decode attention is one launch, not two (`LLMC_CUDA_ATTN_ROPE=1`, read once; a measurement
/// knob, off until `scripts/gpu-attn.sh` has checked and timed it on a GPU).
pub(crate) fn fused_rope() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("LLMC_CUDA_ATTN_ROPE").is_ok_and(|v| matches!(v.trim(), "1" | "on" | "true"))
    })
}

/// Whether the grouped kernels load a warp's next rows before computing its current ones
/// (`LLMC_CUDA_ATTN_PREFETCH=1`, read once; a measurement knob, off by default).
pub(crate) fn prefetch() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("LLMC_CUDA_ATTN_PREFETCH")
            .is_ok_and(|v| matches!(v.trim(), "1" | "on" | "true"))
    })
}

/// CTAs a head for a step whose longest session attends to `max_len` rows: one per 64 rows
/// (one iteration of the block's 16 warps of 4 rows), at most [`max_splits`].
pub(crate) fn splits_for(max_len: usize) -> usize {
    max_len
        .div_ceil(WARPS as usize * ROWS)
        .clamp(1, max_splits())
}

/// The split attention's scratch for a step, where it has more than one split: the partial
/// results (`[sessions, heads, splits, hd + 2]` f32) and the per-head counters
/// (`[sessions, heads]` u32, zeroed here; the kernel leaves them zero, so one pair serves
/// every layer of a step).
pub(crate) struct SplitScratch {
    splits: usize,
    part: Option<CudaSlice<f32>>,
    count: Option<CudaSlice<u32>>,
}

impl SplitScratch {
    /// Scratch for `sessions` at positions `pos` (0-based, so each attends to `pos + 1` rows).
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        s: AttnShape,
        pos: &[i32],
    ) -> candle_core::Result<Self> {
        let max_len = pos
            .iter()
            .map(|&p| p.max(0) as usize + 1)
            .max()
            .unwrap_or(1);
        Self::with_splits(stream, s, pos.len(), splits_for(max_len))
    }

    /// Scratch for `n` sessions and up to `splits` CTAs a head.
    pub(crate) fn with_splits(
        stream: &Arc<CudaStream>,
        s: AttnShape,
        n: usize,
        splits: usize,
    ) -> candle_core::Result<Self> {
        if splits <= 1 {
            return Ok(SplitScratch {
                splits: 1,
                part: None,
                count: None,
            });
        }
        // SAFETY: every CTA writes its partials before the combining CTA reads them.
        let part = unsafe { stream.alloc::<f32>(n * s.heads * splits * (s.head_dim + 2)) }
            .map_err(|e| err("alloc", e))?;
        let count = stream
            .alloc_zeros::<u32>(n * s.heads)
            .map_err(|e| err("alloc", e))?;
        Ok(SplitScratch {
            splits,
            part: Some(part),
            count: Some(count),
        })
    }

    /// Device bytes of the scratch.
    pub(crate) fn bytes(&self) -> usize {
        self.part.as_ref().map_or(0, |p| p.len() * 4)
            + self.count.as_ref().map_or(0, |c| c.len() * 4)
    }

    /// The addresses [`RawAttn`] takes: (splits, part, count).
    pub(crate) fn raw(&self, stream: &CudaStream) -> (usize, u64, u64) {
        (
            self.splits,
            self.part.as_ref().map_or(0, |p| p.device_ptr(stream).0),
            self.count.as_ref().map_or(0, |c| c.device_ptr(stream).0),
        )
    }
}

/// Whether [`attend`] takes these segments: every one a single decode row on an f16 CUDA
/// cache, and heads the kernel can hold.
pub fn applies(segs: &[Segment<'_>], li: usize, s: AttnShape) -> bool {
    s.head_dim <= MAX_HEAD_DIM
        && s.head_dim.is_multiple_of(2)
        && s.kv_heads > 0
        && s.heads.is_multiple_of(s.kv_heads)
        && !segs.is_empty()
        && segs.iter().all(|g| {
            g.len == 1
                && g.cache
                    .buffers(li)
                    .is_ok_and(|(k, _)| k.device().is_cuda() && k.dtype() == DType::F16)
        })
}

/// `q: [n, heads*hd]`, `k`, `v: [n, kv_heads*hd]` (before RoPE), one row per segment, each
/// segment one decode step whose cache has room reserved (see [`applies`]). Writes the keys
/// and values into layer `li` of each cache; returns the attention output `[n, heads*hd]`.
pub fn attend(rows: StepRows<'_>, segs: &mut [Segment<'_>]) -> Result<Tensor> {
    let StepRows {
        q,
        k,
        v,
        layer: li,
        rope,
        shape: s,
        ..
    } = rows;
    let n = segs.len();
    let (width, kvw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    if q.dims2()? != (n, width) || k.dims2()? != (n, kvw) || v.dims2()? != (n, kvw) {
        return Err(Error::InvalidInput(format!(
            "decode attention: q {:?}, k {:?}, v {:?} for {n} sessions",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let (cos, sin) = rope.tables();
    if rope.head_dim() != s.head_dim || cos.dims2()?.1 != s.head_dim / 2 {
        return Err(Error::InvalidInput(format!(
            "decode attention: rope tables for heads of {}, not {}",
            rope.head_dim(),
            s.head_dim
        )));
    }
    let mut caches = Vec::with_capacity(n);
    let mut pos = Vec::with_capacity(n);
    for g in segs.iter() {
        let (kc, vc) = checked_caches(g, li, kvw, rope)?;
        caches.push((kc, vc));
        pos.push(
            i32::try_from(g.start)
                .map_err(|_| Error::InvalidInput(format!("position {} is too large", g.start)))?,
        );
    }
    let op = DecodeAttn {
        k,
        v,
        caches,
        pos,
        cos,
        sin,
        shape: s,
        interleaved: rope.style() == RopeStyle::Interleaved,
    };
    Ok(q.apply_op1_no_bwd(&op)?)
}

/// Layer `li` of the segment's cache, checked for the kernels: contiguous `[rows, kvw]` f16
/// with row `start` reserved and inside the rope tables.
pub(crate) fn checked_caches<'c>(
    g: &'c Segment<'_>,
    li: usize,
    kvw: usize,
    rope: &Rope,
) -> Result<(&'c Tensor, &'c Tensor)> {
    let (kc, vc) = g.cache.buffers(li)?;
    let rows = kc.dims2()?.0;
    // The kernels index the caches as contiguous `[rows, kvw]` f16 rows.
    for c in [kc, vc] {
        if c.dims2()? != (rows, kvw) || !c.is_contiguous() || c.dtype() != DType::F16 {
            return Err(Error::InvalidInput(format!(
                "decode attention: a cache of {:?} {:?}, expected contiguous [{rows}, {kvw}] f16",
                c.dims(),
                c.dtype()
            )));
        }
    }
    if g.start >= rows || g.start >= rope.max_pos() {
        return Err(Error::InvalidInput(format!(
            "decode attention: position {} past the reserved {rows} rows",
            g.start
        )));
    }
    Ok((kc, vc))
}

/// Attention for a step that may mix decode rows and prefill chunks: the decode rows (one-row
/// segments on f16 CUDA caches) through the kernels, all of them at once, the other segments
/// through candle's ops ([`attend_each`]); the rows come back in the step's order. `None`
/// when no segment is a decode row the kernels take.
pub fn attend_mixed(rows: StepRows<'_>, segs: &mut [Segment<'_>]) -> Result<Option<Tensor>> {
    if applies(segs, rows.layer, rows.shape) {
        return attend(rows, segs).map(Some);
    }
    let fast = |g: &Segment<'_>| applies(std::slice::from_ref(g), rows.layer, rows.shape);
    if !segs.iter().any(fast) {
        return Ok(None);
    }
    let (mut dec, mut other) = (Vec::new(), Vec::new());
    let (mut dec_rows, mut other_rows) = (Vec::<u32>::new(), Vec::<u32>::new());
    let mut at = 0u32;
    for g in segs.iter_mut() {
        let (start, len) = (g.start, g.len);
        let take = fast(g);
        let part = Segment {
            cache: &mut *g.cache,
            start,
            len,
        };
        let n = u32::try_from(len).map_err(|_| Error::InvalidInput("segment too long".into()))?;
        if take {
            dec_rows.push(at);
            dec.push(part);
        } else {
            other_rows.extend(at..at + n);
            other.push(part);
        }
        at += n;
    }
    let dev = rows.q.device();
    let pick = |t: &Tensor, ids: &[u32]| -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), dev)?;
        Ok(t.contiguous()?.index_select(&ids, 0)?)
    };
    let part_rows = |ids: &[u32]| -> Result<(Tensor, Tensor, Tensor)> {
        Ok((pick(rows.q, ids)?, pick(rows.k, ids)?, pick(rows.v, ids)?))
    };
    let (dq, dk, dv) = part_rows(&dec_rows)?;
    let d_out = attend(rows.with_qkv(&dq, &dk, &dv), &mut dec)?;
    let (oq, ok, ov) = part_rows(&other_rows)?;
    let o_out = attend_each(rows.with_qkv(&oq, &ok, &ov), &mut other)?;
    // Row r of the step sits at `back[r]` of [decode rows; other rows].
    let mut back = vec![0u32; at as usize];
    for (i, &r) in dec_rows.iter().chain(&other_rows).enumerate() {
        back[r as usize] = i as u32;
    }
    let both = Tensor::cat(&[&d_out, &o_out], 0)?;
    Ok(Some(pick(&both, &back)?))
}

/// Runs both kernels once on a one-row cache, so that their module is loaded at start-up.
pub fn warm_up(device: &candle_core::Device) -> Result<()> {
    use crate::model::kv_cache::{KvCache, KvDtype};
    let s = AttnShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    let rope = Rope::new(RopeStyle::Halves, 64, 10000.0, 1, device)?;
    let mut cache = KvCache::new(1, 64, 1, KvDtype::F16, device)?;
    cache.reserve(1)?;
    let q = Tensor::zeros((1, 128), DType::F32, device)?;
    let kv = Tensor::zeros((1, 64), DType::F32, device)?;
    let mut segs = [Segment {
        cache: &mut cache,
        start: 0,
        len: 1,
    }];
    attend(
        StepRows {
            q: &q,
            k: &kv,
            v: &kv,
            layer: 0,
            rope: &rope,
            shape: s,
            window: None,
        },
        &mut segs,
    )?;
    Ok(())
}

struct DecodeAttn<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    caches: Vec<(&'a Tensor, &'a Tensor)>,
    pos: Vec<i32>,
    cos: &'a Tensor,
    sin: &'a Tensor,
    shape: AttnShape,
    interleaved: bool,
}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("decode attention: {what}: {e:?}"))
}

/// The device address of element `l.start_offset()` of a CUDA tensor of `T`, and its row
/// stride in elements (rows must be contiguous).
pub(crate) fn address<T: candle_core::cuda_backend::CudaDType>(
    t: &Tensor,
    stream: &CudaStream,
) -> candle_core::Result<(u64, i64)> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*st else {
        candle_core::bail!("decode attention: a tensor is not on the GPU");
    };
    address_of::<T>(c, l, stream)
}

pub(crate) fn address_of<T: candle_core::cuda_backend::CudaDType>(
    c: &CudaStorage,
    l: &Layout,
    stream: &CudaStream,
) -> candle_core::Result<(u64, i64)> {
    let stride = l.stride();
    if l.dims().len() != 2 || stride[1] != 1 {
        candle_core::bail!(
            "decode attention: rows of {:?} are not contiguous",
            l.dims()
        );
    }
    let slice = c.as_cuda_slice::<T>()?;
    let (base, _sync) = slice.device_ptr(stream);
    let at = base + (l.start_offset() * std::mem::size_of::<T>()) as u64;
    Ok((at, stride[0] as i64))
}

impl CustomOp1 for DecodeAttn<'_> {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("decode attention runs on CUDA only")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &qs.device;
        // bound before the first driver call (the pointer lookups below make some, and cudarc
        // only records their errors for later)
        let stream = super::fused_decode::bound_stream(dev)?;
        let s = self.shape;
        let n = self.pos.len();
        let width = s.heads * s.head_dim;
        let (q, q_stride) = address_of::<f32>(qs, ql, &stream)?;
        let (k, k_stride) = address::<f32>(self.k, &stream)?;
        let (v, v_stride) = address::<f32>(self.v, &stream)?;
        let (cos, _) = address::<f32>(self.cos, &stream)?;
        let (sin, _) = address::<f32>(self.sin, &stream)?;
        let mut table = vec![0u64; 2 * n];
        for (i, (kc, vc)) in self.caches.iter().enumerate() {
            table[i] = address::<half::f16>(kc, &stream)?.0;
            table[n + i] = address::<half::f16>(vc, &stream)?.0;
        }
        let table = stream.clone_htod(&table).map_err(|e| err("copy", e))?;
        let pos = stream.clone_htod(&self.pos).map_err(|e| err("copy", e))?;
        // SAFETY: both are written in full by the kernels below before anything reads them.
        let q_rot = unsafe { stream.alloc::<f32>(n * width) }.map_err(|e| err("alloc", e))?;
        let out = unsafe { stream.alloc::<f32>(n * width) }.map_err(|e| err("alloc", e))?;
        let split = SplitScratch::new(&stream, s, &self.pos)?;
        let (splits, part, count) = split.raw(&stream);
        {
            let (table, _t) = table.device_ptr(&stream);
            let (pos, _p) = pos.device_ptr(&stream);
            let (q_rot, _r) = q_rot.device_ptr(&stream);
            let (out, _o) = out.device_ptr(&stream);
            let raw = RawAttn {
                q,
                q_stride,
                k,
                k_stride,
                v,
                v_stride,
                q_rot,
                out,
                out_q8: 0,
                out_q8_stride: 0,
                splits,
                part,
                count,
                table,
                pos,
                cos,
                sin,
                sessions: n,
                shape: s,
                interleaved: self.interleaved,
            };
            // SAFETY: every address lies inside a live buffer: the caches are contiguous
            // `[rows, kvw]` f16 with room at `pos`, q/k/v hold `n` rows of their widths, the
            // rope tables are `[max_pos, hd / 2]` and cover `pos` (all checked in `attend`);
            // `q_rot` and `out` hold `n` rows of `width`.
            unsafe { launch(&stream, &AttnFuncs::load(dev)?, &raw)? };
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, width)),
        ))
    }
}

/// The device addresses and sizes both attention kernels take (see [`launch`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawAttn {
    /// `[sessions, heads * hd]` f32 queries before RoPE, rows `q_stride` apart.
    pub q: u64,
    pub q_stride: i64,
    /// `[sessions, kv_heads * hd]` f32 keys before RoPE, rows `k_stride` apart.
    pub k: u64,
    pub k_stride: i64,
    /// `[sessions, kv_heads * hd]` f32 values, rows `v_stride` apart.
    pub v: u64,
    pub v_stride: i64,
    /// `[sessions, heads * hd]` f32 scratch for the rotated queries.
    pub q_rot: u64,
    /// `[sessions, heads * hd]` f32 output; 0 to write `out_q8` instead.
    pub out: u64,
    /// When `out` is 0: the output as Q8_1 blocks (`hd` a multiple of 32), row `b` at block
    /// `b * out_q8_stride`, as the quantized products read their input.
    pub out_q8: u64,
    pub out_q8_stride: i32,
    /// CTAs each head's rows are split over ([`splits_for`]); past one, the partial results
    /// go to `part` (`[sessions, heads, splits, hd + 2]` f32) and `count` (`[sessions, heads]`
    /// u32, zero) counts the CTAs done (see [`SplitScratch`]).
    pub splits: usize,
    pub part: u64,
    pub count: u64,
    /// `[2 * sessions]` u64 addresses: the key caches, then the value caches.
    pub table: u64,
    /// `[sessions]` i32 positions.
    pub pos: u64,
    /// `[max_pos, hd / 2]` f32 rope tables.
    pub cos: u64,
    pub sin: u64,
    pub sessions: usize,
    pub shape: AttnShape,
    pub interleaved: bool,
}

/// Both kernels, looked up once for many launches.
pub(crate) struct AttnFuncs {
    rope_kv_write: CudaFunction,
    /// Any head width up to [`MAX_HEAD_DIM`].
    decode_attention: CudaFunction,
    /// Heads of 64 and of 128 values.
    decode_attention_hd64: CudaFunction,
    decode_attention_hd128: CudaFunction,
    /// Heads of 128 values in groups of 2, 4 or 8 query heads a key/value head, one CTA a
    /// group.
    grouped_hd128: [CudaFunction; 3],
    /// The same with `rope_kv_write`'s work done inside ([`fused_rope`]).
    grouped_rope_hd128: [CudaFunction; 3],
}

impl AttnFuncs {
    /// The kernels, loaded into `dev`.
    pub(crate) fn load(dev: &CudaDevice) -> candle_core::Result<Self> {
        let f = |name| {
            dev.get_or_load_custom_func(name, MODULE, PTX)
                .map(|f| f.into_cuda_function())
        };
        Ok(AttnFuncs {
            rope_kv_write: f("rope_kv_write")?,
            decode_attention: f("decode_attention")?,
            decode_attention_hd64: f("decode_attention_hd64")?,
            decode_attention_hd128: f("decode_attention_hd128")?,
            grouped_hd128: if prefetch() {
                [
                    f("decode_attention_hd128_g2_pf")?,
                    f("decode_attention_hd128_g4_pf")?,
                    f("decode_attention_hd128_g8_pf")?,
                ]
            } else {
                [
                    f("decode_attention_hd128_g2")?,
                    f("decode_attention_hd128_g4")?,
                    f("decode_attention_hd128_g8")?,
                ]
            },
            grouped_rope_hd128: [
                f("decode_attention_rope_hd128_g2")?,
                f("decode_attention_rope_hd128_g4")?,
                f("decode_attention_rope_hd128_g8")?,
            ],
        })
    }
}

/// Launches `rope_kv_write` then `decode_attention` on `stream`, or, for heads of 128 in
/// groups (and [`fused_rope`]), one grouped kernel that does both.
///
/// # Safety
/// Every address of `a` must point into a live device buffer of the size its field names, the
/// caches must be contiguous `[rows, kv_heads * hd]` f16 with `pos < rows` for each session,
/// `pos` must lie inside the rope tables, and the heads must fit the kernels (see [`applies`]).
/// The caches are written through these addresses without a write event, which is sound
/// because candle runs every kernel of a device on its one stream.
pub(crate) unsafe fn launch(
    stream: &CudaStream,
    fs: &AttnFuncs,
    a: &RawAttn,
) -> candle_core::Result<()> {
    let s = a.shape;
    let (sessions, heads, kv_heads, hd) = (
        a.sessions as i32,
        s.heads as i32,
        s.kv_heads as i32,
        s.head_dim as i32,
    );
    let (mut sessions, mut heads, mut kv_heads, mut hd) = (sessions, heads, kv_heads, hd);
    let mut interleaved = i32::from(a.interleaved);
    let mut a = *a;
    let mut scale = 1.0 / (s.head_dim as f32).sqrt();
    // Heads of 128 in groups of 2, 4 or 8 take the grouped kernel: one CTA a key/value head.
    let group = match (s.head_dim, s.heads % s.kv_heads, s.heads / s.kv_heads) {
        (128, 0, 2) => Some(0),
        (128, 0, 4) => Some(1),
        (128, 0, 8) => Some(2),
        _ => None,
    };
    let grouped_cfg = LaunchConfig {
        grid_dim: (s.kv_heads as u32, a.sessions as u32, a.splits.max(1) as u32),
        block_dim: (32 * GROUPED_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    if let Some(g) = group.filter(|_| fused_rope()) {
        let mut params = [
            arg(&mut a.q),
            arg(&mut a.q_stride),
            arg(&mut a.k),
            arg(&mut a.k_stride),
            arg(&mut a.v),
            arg(&mut a.v_stride),
            arg(&mut a.table),
            arg(&mut a.pos),
            arg(&mut a.cos),
            arg(&mut a.sin),
            arg(&mut a.out),
            arg(&mut a.out_q8),
            arg(&mut a.out_q8_stride),
            arg(&mut a.part),
            arg(&mut a.count),
            arg(&mut sessions),
            arg(&mut heads),
            arg(&mut kv_heads),
            arg(&mut hd),
            arg(&mut scale),
            arg(&mut interleaved),
        ];
        // SAFETY: the arguments match the kernel's signature; the caller vouches for the
        // addresses; each session's cache holds rows `0..pos` and takes row `pos` here.
        return unsafe {
            pdl::launch(
                stream,
                &fs.grouped_rope_hd128[g],
                grouped_cfg,
                &mut params,
                true,
            )
        }
        .map_err(|e| err("decode_attention_rope", e));
    }
    let cfg = LaunchConfig {
        grid_dim: (a.sessions as u32, (s.heads + s.kv_heads) as u32, 1),
        block_dim: ((s.head_dim / 2) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut params = [
        arg(&mut a.q),
        arg(&mut a.q_stride),
        arg(&mut a.k),
        arg(&mut a.k_stride),
        arg(&mut a.v),
        arg(&mut a.v_stride),
        arg(&mut a.q_rot),
        arg(&mut a.table),
        arg(&mut a.pos),
        arg(&mut a.cos),
        arg(&mut a.sin),
        arg(&mut sessions),
        arg(&mut heads),
        arg(&mut kv_heads),
        arg(&mut hd),
        arg(&mut interleaved),
    ];
    // SAFETY: the arguments match the kernel's signature; the caller vouches for the
    // addresses; the kernel waits for its predecessor first.
    unsafe { pdl::launch(stream, &fs.rope_kv_write, cfg, &mut params, true) }
        .map_err(|e| err("rope_kv_write", e))?;

    let grouped = group.map(|g| &fs.grouped_hd128[g]);
    let cfg = match grouped {
        Some(_) => grouped_cfg,
        None => LaunchConfig {
            grid_dim: (s.heads as u32, a.sessions as u32, a.splits.max(1) as u32),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        },
    };
    let mut params = [
        arg(&mut a.q_rot),
        arg(&mut a.table),
        arg(&mut a.pos),
        arg(&mut a.out),
        arg(&mut a.out_q8),
        arg(&mut a.out_q8_stride),
        arg(&mut a.part),
        arg(&mut a.count),
        arg(&mut sessions),
        arg(&mut heads),
        arg(&mut kv_heads),
        arg(&mut hd),
        arg(&mut scale),
    ];
    // SAFETY: as above; each session's cache holds rows `0..=pos`.
    let attention = match (grouped, s.head_dim) {
        (Some(f), _) => f,
        (None, 64) => &fs.decode_attention_hd64,
        (None, 128) => &fs.decode_attention_hd128,
        (None, _) => &fs.decode_attention,
    };
    unsafe { pdl::launch(stream, attention, cfg, &mut params, true) }
        .map_err(|e| err("decode_attention", e))?;
    Ok(())
}

#[cfg(test)]
mod tests;
