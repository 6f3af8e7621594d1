//! Fused decode steps ([`super::fused_decode`]) replayed from CUDA graphs.
//!
//! A step of a 32-block stage is about 300 launches; each costs the host a few microseconds
//! and leaves the GPU a gap between kernels. Here a step of up to 8 rows (the matrix-vector
//! products' batch) is captured once into a graph and replayed with one launch. A graph
//! bakes in every argument, so:
//! - each batch size has its own buffers (a *bucket*), allocated once and never moved: the
//!   step's input is copied into the bucket's input buffer and its output copied out of the
//!   bucket's residual buffer, one small device copy each;
//! - what changes from step to step lives in device memory the kernels read, uploaded
//!   before each replay in one copy: the sessions' positions and the table of their KV-cache
//!   addresses (so sessions may come, go and grow their caches between replays);
//! - the attention's grid depends on the longest context (one CTA a head per 64 rows, at
//!   most 32 by default), so a bucket is captured again when that count changes: every 64
//!   tokens up to 2,048, then never.
//!
//! Captures run on a stream of their own, never on the stream the steps run on: other
//! threads enqueue work there too (a session dropped on another thread frees its cache
//! stream-ordered), and work enqueued on a stream while it is captured would become part of
//! the graph. The graph is then replayed on the steps' stream.
//!
//! A bucket is keyed by the step's signature (the weights', norms' and rope tables' addresses
//! and kernels, the widths and the batch size), so a stage loaded at other addresses gets
//! buckets of its own. The buckets belong to the thread that runs the steps (a node's
//! compute thread): at most [`MAX_BUCKETS`], the least recently used dropped first, and all
//! of them freed by [`release`] (the node calls it once no session is left). If a capture
//! fails, graphs are off for the rest of the process and steps are launched kernel by kernel.
//! `--cuda-graphs off` (or `LLMC_CUDA_GRAPHS=0`) turns them off from the start.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaGraph, CudaSlice, CudaStream, CudaView,
};
use candle_core::cuda_backend::CudaDevice;

use super::decode_attention::max_splits;
use super::fused_decode::{err, ptr, FusedDecode};
use super::step_buffers::{StepBuffers, StepKernels};

/// The most buckets a thread keeps (one per batch size of one stage).
pub const MAX_BUCKETS: usize = 8;

/// Set once a capture failed: graphs are off for the rest of the process.
static BROKEN: AtomicBool = AtomicBool::new(false);
/// Device bytes of every thread's buckets.
static HELD: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static GRAPHS: RefCell<Graphs> = RefCell::new(Graphs::default());
}

/// A step captured for one attention split count.
struct Captured {
    splits: usize,
    /// The residual buffer that holds the step's output.
    out: u64,
    graph: CudaGraph,
}

struct Bucket {
    signature: Vec<u64>,
    buffers: StepBuffers,
    kernels: StepKernels,
    captured: Option<Captured>,
    /// When it was last used, on [`Graphs::clock`].
    used: u64,
}

impl Bucket {
    fn new(signature: Vec<u64>, buffers: StepBuffers, kernels: StepKernels) -> Self {
        HELD.fetch_add(buffers.bytes() as u64, Ordering::Relaxed);
        Bucket {
            signature,
            buffers,
            kernels,
            captured: None,
            used: 0,
        }
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        HELD.fetch_sub(self.buffers.bytes() as u64, Ordering::Relaxed);
    }
}

/// A thread's buckets, and counts of what they did.
#[derive(Default)]
struct Graphs {
    buckets: Vec<Bucket>,
    /// The stream captures run on (of the context of the steps' stream).
    capture: Option<Arc<CudaStream>>,
    clock: u64,
    stats: GraphStats,
}

/// What the calling thread's graphs did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured (a bucket's first step, or a new attention split count).
    pub captures: u64,
    /// Steps replayed from a graph.
    pub replays: u64,
    /// Buckets held now.
    pub buckets: usize,
    /// Device bytes of their buffers.
    pub bytes: usize,
}

/// Runs `op` on `x` from a graph: `Some(output)`, or `None` where graphs are off for good
/// (the caller launches the step itself).
pub(crate) fn step(
    op: &FusedDecode,
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    x: &CudaView<'_, f32>,
) -> candle_core::Result<Option<CudaSlice<f32>>> {
    if BROKEN.load(Ordering::Relaxed) {
        return Ok(None);
    }
    GRAPHS.with(|g| g.borrow_mut().step(op, dev, stream, x))
}

/// Frees the calling thread's buckets (buffers and graphs), stream-ordered after the steps
/// that use them.
pub fn release() {
    GRAPHS.with(|g| {
        let mut g = g.borrow_mut();
        g.buckets.clear();
        g.capture = None;
    });
}

/// Device bytes that every thread's buckets hold now (scratch kept between steps).
pub fn held_bytes() -> u64 {
    HELD.load(Ordering::Relaxed)
}

/// What the calling thread's graphs did, and what they hold.
pub fn stats() -> GraphStats {
    GRAPHS.with(|g| {
        let g = g.borrow();
        GraphStats {
            buckets: g.buckets.len(),
            bytes: g.buckets.iter().map(|b| b.buffers.bytes()).sum(),
            ..g.stats
        }
    })
}

impl Graphs {
    fn step(
        &mut self,
        op: &FusedDecode,
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f32>,
    ) -> candle_core::Result<Option<CudaSlice<f32>>> {
        let signature = op.signature();
        self.clock += 1;
        let at = match self.buckets.iter().position(|b| b.signature == signature) {
            Some(at) => at,
            None => {
                if self.buckets.len() >= MAX_BUCKETS {
                    if let Some(oldest) =
                        (0..self.buckets.len()).min_by_key(|&i| self.buckets[i].used)
                    {
                        self.buckets.swap_remove(oldest);
                    }
                }
                self.buckets.push(Bucket::new(
                    signature,
                    op.buffers(dev, stream, max_splits(), true)?,
                    StepKernels::load(dev, false)?,
                ));
                self.buckets.len() - 1
            }
        };
        let b = &mut self.buckets[at];
        b.used = self.clock;
        let splits = op.splits();
        // The inputs, ordered on the stream after the bucket's last replay.
        let input = b
            .buffers
            .input
            .as_mut()
            .ok_or_else(|| err("graph", "a bucket without an input buffer"))?;
        if input.len() != x.len() {
            candle_core::bail!(
                "fused decode graph: an input of {} values for a bucket of {}",
                x.len(),
                input.len()
            );
        }
        stream.memcpy_dtod(x, input).map_err(|e| err("copy", e))?;
        op.upload(stream, &mut b.buffers)?;
        if b.captured.as_ref().map(|c| c.splits) != Some(splits) {
            b.captured = None;
            let on = match &self.capture {
                Some(c) if c.context().cu_ctx() == stream.context().cu_ctx() => c.clone(),
                _ => {
                    let c = stream
                        .context()
                        .new_stream()
                        .map_err(|e| err("capture stream", e))?;
                    self.capture = Some(c.clone());
                    c
                }
            };
            match capture(op, stream, &on, b, splits) {
                Ok(c) => {
                    self.stats.captures += 1;
                    tracing::debug!(rows = op.rows(), splits, "captured a decode step's graph");
                    b.captured = Some(c);
                }
                Err(e) => {
                    BROKEN.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e,
                        "capturing a decode step in a CUDA graph failed; launching steps \
                         kernel by kernel from now on"
                    );
                    self.buckets.clear();
                    return Ok(None);
                }
            }
        }
        let Some(c) = b.captured.as_ref() else {
            return Ok(None);
        };
        // SAFETY: a live graph, on the steps' stream, after the copies of its inputs.
        unsafe { result::graph::launch(c.graph.cu_graph_exec(), stream.cu_stream()) }
            .map_err(|e| err("graph launch", e))?;
        self.stats.replays += 1;
        // SAFETY: written by the copy below before anything reads it.
        let mut y = unsafe { stream.alloc::<f32>(x.len()) }.map_err(|e| err("alloc", e))?;
        stream
            .memcpy_dtod(b.buffers.residual(c.out), &mut y)
            .map_err(|e| err("copy", e))?;
        Ok(Some(y))
    }
}

/// Captures `op`'s launches on `b`'s buffers for `splits` attention CTAs a head, on the
/// stream `on` (not the steps' `stream`). The capture is always ended, so `on` is left as it
/// was whatever fails.
fn capture(
    op: &FusedDecode,
    stream: &Arc<CudaStream>,
    on: &Arc<CudaStream>,
    b: &Bucket,
    splits: usize,
) -> candle_core::Result<Captured> {
    // Addresses are taken before the capture: with event tracking on, taking one records an
    // event on the stream, which a capture must not contain.
    let input = b
        .buffers
        .input
        .as_ref()
        .map(|i| ptr(i, stream))
        .ok_or_else(|| err("graph", "a bucket without an input buffer"))?;
    on.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| err("begin capture", e))?;
    let launched = op.launch_step(on, &b.kernels, &b.buffers, input, splits);
    let ended = on.end_capture(sys::CUgraphInstantiate_flags(0));
    let out = launched?;
    let graph = ended
        .map_err(|e| err("end capture", e))?
        .ok_or_else(|| err("end capture", "an empty graph"))?;
    Ok(Captured { splits, out, graph })
}
