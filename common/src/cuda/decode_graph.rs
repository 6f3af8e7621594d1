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
//!   most 32 by default), so a bucket keeps a graph per split count it has met (up to
//!   [`MAX_GRAPHS`], the least recently used dropped first). A split count is launched
//!   directly the first time it is met and captured the second, so that a count a batch only
//!   passes through costs no capture, and every kernel has run once before any capture.
//!
//! Captures run on the steps' own stream, in thread-local mode. candle gives each thread
//! its own stream (the per-thread default stream), so another thread's work, such as a
//! session's cache freed stream-ordered on the thread that drops it, never lands in a
//! capture.
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
use super::fused_decode::{err, FusedDecode};
use super::step_buffers::{StepBuffers, StepKernels};

/// The most buckets a thread keeps (one per batch size and stage; a node may serve a stage
/// of several models).
pub const MAX_BUCKETS: usize = 24;
/// The most graphs a bucket keeps (one per attention split count).
pub const MAX_GRAPHS: usize = 8;

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
    /// When it was last replayed, on [`Graphs::clock`].
    used: u64,
}

struct Bucket {
    signature: Vec<u64>,
    buffers: StepBuffers,
    kernels: StepKernels,
    graphs: Vec<Captured>,
    /// Split counts launched directly once, not captured yet.
    seen: Vec<usize>,
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
            graphs: Vec::new(),
            seen: Vec::new(),
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
    clock: u64,
    stats: GraphStats,
}

/// What the calling thread's graphs did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured.
    pub captures: u64,
    /// Steps replayed from a graph.
    pub replays: u64,
    /// Steps launched directly on a bucket (the first of a split count).
    pub direct: u64,
    /// Buckets held now.
    pub buckets: usize,
    /// Device bytes of their buffers.
    pub bytes: usize,
}

/// Runs `op` on `x` through a bucket: `Some(output)`, or `None` where graphs are off for
/// good (the caller launches the step itself).
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
    GRAPHS.with(|g| g.borrow_mut().buckets.clear());
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

/// The index of the least recently used of `items`.
fn oldest<T>(items: &[T], used: impl Fn(&T) -> u64) -> Option<usize> {
    (0..items.len()).min_by_key(|&i| used(&items[i]))
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
        let clock = self.clock;
        let at = match self.buckets.iter().position(|b| b.signature == signature) {
            Some(at) => at,
            None => {
                if self.buckets.len() >= MAX_BUCKETS {
                    if let Some(i) = oldest(&self.buckets, |b| b.used) {
                        self.buckets.swap_remove(i);
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
        b.used = clock;
        let splits = op.splits();
        // The inputs, ordered on the stream after the bucket's last step.
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
        // Taken once, when the buffers were made: taking an address records an event (with
        // event tracking on), which a capture must not contain.
        let input = b.buffers.p.input;
        let out = match b.graphs.iter().position(|c| c.splits == splits) {
            None if !b.seen.contains(&splits) => {
                // The first step of this split count: launched directly, on the same buffers.
                b.seen.push(splits);
                self.stats.direct += 1;
                op.launch_step(stream, &b.kernels, &b.buffers, input, splits)?
            }
            found => {
                let i = match found {
                    Some(i) => i,
                    None => {
                        b.seen.retain(|&s| s != splits);
                        let c = match capture(op, stream, b, input, splits) {
                            Ok(c) => c,
                            Err(e) => {
                                BROKEN.store(true, Ordering::Relaxed);
                                tracing::warn!(
                                    error = %e,
                                    "capturing a decode step in a CUDA graph failed; launching \
                                     steps kernel by kernel from now on"
                                );
                                self.buckets.clear();
                                return Ok(None);
                            }
                        };
                        self.stats.captures += 1;
                        tracing::debug!(rows = op.rows(), splits, "captured a decode step's graph");
                        if b.graphs.len() >= MAX_GRAPHS {
                            if let Some(old) = oldest(&b.graphs, |c| c.used) {
                                b.graphs.swap_remove(old);
                            }
                        }
                        b.graphs.push(c);
                        b.graphs.len() - 1
                    }
                };
                let c = &mut b.graphs[i];
                c.used = clock;
                // SAFETY: a live graph, on the stream it was captured on, after the copies of
                // its inputs.
                unsafe { result::graph::launch(c.graph.cu_graph_exec(), stream.cu_stream()) }
                    .map_err(|e| err("graph launch", e))?;
                self.stats.replays += 1;
                c.out
            }
        };
        // SAFETY: written by the copy below before anything reads it.
        let mut y = unsafe { stream.alloc::<f32>(x.len()) }.map_err(|e| err("alloc", e))?;
        stream
            .memcpy_dtod(b.buffers.residual(out), &mut y)
            .map_err(|e| err("copy", e))?;
        Ok(Some(y))
    }
}

/// Ends a capture that is still open when dropped (a panic while capturing), so that the
/// stream is not left capturing.
struct Capturing<'a> {
    stream: &'a Arc<CudaStream>,
    open: bool,
}

impl Capturing<'_> {
    fn end(mut self) -> candle_core::Result<CudaGraph> {
        self.open = false;
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| err("end capture", e))?
            .ok_or_else(|| err("end capture", "an empty graph"))
    }
}

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        }
    }
}

/// Captures `op`'s launches on `b`'s buffers, reading its input at `input`, for `splits`
/// attention CTAs a head. The capture is always ended, so the stream is left as it was
/// whatever fails.
fn capture(
    op: &FusedDecode,
    stream: &Arc<CudaStream>,
    b: &Bucket,
    input: u64,
    splits: usize,
) -> candle_core::Result<Captured> {
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| err("begin capture", e))?;
    let capturing = Capturing { stream, open: true };
    let launched = op.launch_step(stream, &b.kernels, &b.buffers, input, splits);
    let graph = capturing.end();
    let out = launched?;
    Ok(Captured {
        splits,
        out,
        graph: graph?,
        used: 0,
    })
}
