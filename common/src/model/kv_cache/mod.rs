//! [`KvCache`]: one session's keys and values for the blocks of one stage.
//!
//! The cache belongs to the session, not to the weights, so any number of sessions share a
//! stage. It grows in fixed chunks up to the session's maximum context and never past it:
//! going further is [`Error::ContextOverflow`]. Rows are written in place; the only copies
//! are the chunk-wise regrowths. Keys and values are stored as f16 by default, as llama.cpp
//! does (half the memory of f32), or as f32 when asked.
//!
//! Layers that attend through a sliding window keep only the rows the window can still reach:
//! once a session passes [`KvCache::ring_rows`] tokens, such a layer is a ring whose row for
//! position `p` is `p % ring_rows`; [`KvCache::spans`] turns a range of positions into the
//! (at most two) row ranges that hold them. A step may then write at most [`STEP_ROWS`] rows
//! ([`crate::model::Stage`] splits longer ones).
//!
//! On the CPU the rows live in plain vectors ([`HostKv`]), which the batched host attention
//! reads and writes directly for every session of a step at once; on other devices they are
//! tensors that candle ops write and read.

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{Error, Result};
use crate::kernels::vec::KvElem;

/// Rows added per regrowth.
pub const CHUNK: usize = 256;

/// The most rows one step may write into a cache with windowed layers: a windowed layer
/// keeps `window - 1 + STEP_ROWS` rows, the keys the step's first query still sees plus the
/// step's own.
pub const STEP_ROWS: usize = 256;

/// Storage type of cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Half precision: half the memory; llama.cpp's default.
    #[default]
    F16,
    /// Single precision.
    F32,
}

impl KvDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            KvDtype::F16 => DType::F16,
            KvDtype::F32 => DType::F32,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            _ => Err(Error::Config(format!(
                "KV cache type `{s}` is not f16 or f32"
            ))),
        }
    }
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Keys and values of one layer in host memory: `[capacity, kv_dim]` rows each.
#[derive(Debug, Default)]
pub struct HostLayer<T> {
    /// Keys.
    pub k: Vec<T>,
    /// Values.
    pub v: Vec<T>,
}

/// One layer of a host cache, by element type.
#[derive(Debug)]
pub enum HostKv<'a> {
    /// f16 rows.
    F16(&'a HostLayer<f16>),
    /// f32 rows.
    F32(&'a HostLayer<f32>),
}

/// One layer of a host cache, writable.
#[derive(Debug)]
pub enum HostKvMut<'a> {
    /// f16 rows.
    F16(&'a mut HostLayer<f16>),
    /// f32 rows.
    F32(&'a mut HostLayer<f32>),
}

#[derive(Debug)]
enum Store {
    Device(Vec<LayerKv>),
    HostF16(Vec<HostLayer<f16>>),
    HostF32(Vec<HostLayer<f32>>),
}

impl Store {
    fn n_layers(&self) -> usize {
        match self {
            Store::Device(l) => l.len(),
            Store::HostF16(l) => l.len(),
            Store::HostF32(l) => l.len(),
        }
    }
}

/// Grows layer `i` to exactly `elems(i)` elements (not `Vec`'s doubling, so that the bytes
/// held are the bytes counted), keeping its rows where they are; an allocation failure is
/// an error, not an abort.
fn grow_host<T: KvElem>(layers: &mut [HostLayer<T>], elems: impl Fn(usize) -> usize) -> Result<()> {
    for (i, l) in layers.iter_mut().enumerate() {
        let elems = elems(i);
        for buf in [&mut l.k, &mut l.v] {
            buf.try_reserve_exact(elems.saturating_sub(buf.len()))
                .map_err(|e| {
                    Error::InvalidInput(format!("KV cache of {elems} elements per layer: {e}"))
                })?;
            buf.resize(elems, T::from_f32(0.0));
        }
    }
    Ok(())
}

/// A copy of the first `elems(i)` elements of each host layer, in memory of its own (exactly
/// that much); an allocation failure is an error.
fn host_copy<T: Clone>(
    layers: &[HostLayer<T>],
    elems: impl Fn(usize) -> usize,
) -> Result<Vec<HostLayer<T>>> {
    let copy = |src: &[T]| -> Result<Vec<T>> {
        let mut v = Vec::new();
        v.try_reserve_exact(src.len()).map_err(|e| {
            Error::InvalidInput(format!("copying a KV cache of {} elements: {e}", src.len()))
        })?;
        v.extend_from_slice(src);
        Ok(v)
    };
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let n = elems(i);
            Ok(HostLayer {
                k: copy(&l.k[..n])?,
                v: copy(&l.v[..n])?,
            })
        })
        .collect()
}

/// Keys and values of one session on one stage.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    len: usize,
    capacity: usize,
    max_ctx: usize,
    kv_dim: usize,
    dtype: DType,
    device: Device,
    /// Per layer: whether it attends through a window (and so may become a ring).
    windowed: Vec<bool>,
    /// Rows a windowed layer keeps at most; `usize::MAX` when no layer is windowed.
    ring_rows: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` blocks of width `kv_dim`, bounded by `max_ctx` tokens.
    pub fn new(
        n_layers: usize,
        kv_dim: usize,
        max_ctx: usize,
        dtype: KvDtype,
        device: &Device,
    ) -> Result<Self> {
        Self::windowed(&vec![None; n_layers], kv_dim, max_ctx, dtype, device)
    }

    /// An empty cache for blocks that attend through `windows[i]` (`None`: the whole
    /// context). Windowed layers keep at most `window - 1 + STEP_ROWS` rows (the largest
    /// window sets the bound).
    pub fn windowed(
        windows: &[Option<usize>],
        kv_dim: usize,
        max_ctx: usize,
        dtype: KvDtype,
        device: &Device,
    ) -> Result<Self> {
        let n_layers = windows.len();
        if max_ctx == 0 {
            return Err(Error::Config("max context must be at least 1".into()));
        }
        let store = match (device.is_cpu(), dtype) {
            (true, KvDtype::F16) => {
                Store::HostF16((0..n_layers).map(|_| HostLayer::default()).collect())
            }
            (true, KvDtype::F32) => {
                Store::HostF32((0..n_layers).map(|_| HostLayer::default()).collect())
            }
            (false, _) => Store::Device(Vec::new()),
        };
        let mut c = KvCache {
            store,
            len: 0,
            capacity: 0,
            max_ctx,
            kv_dim,
            dtype: dtype.dtype(),
            device: device.clone(),
            windowed: windows.iter().map(Option::is_some).collect(),
            ring_rows: windows.iter().flatten().max().map_or(usize::MAX, |w| {
                w.saturating_sub(1).saturating_add(STEP_ROWS)
            }),
        };
        if matches!(c.store, Store::Device(_)) {
            c.store = Store::Device(
                (0..n_layers)
                    .map(|_| c.alloc(0).map(|(k, v)| LayerKv { k, v }))
                    .collect::<Result<_>>()?,
            );
        }
        Ok(c)
    }

    fn alloc(&self, rows: usize) -> Result<(Tensor, Tensor)> {
        let z = || Tensor::zeros((rows, self.kv_dim), self.dtype, &self.device);
        Ok((z()?, z()?))
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The session's bound.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Rows layer `i` holds when the cache holds `capacity` positions.
    fn rows_at(&self, i: usize, capacity: usize) -> usize {
        match self.windowed.get(i) {
            Some(true) => capacity.min(self.ring_rows),
            _ => capacity,
        }
    }

    /// Rows layer `i` holds now: a windowed layer past [`KvCache::ring_rows`] positions is a
    /// ring of that many rows.
    pub fn layer_rows(&self, i: usize) -> usize {
        self.rows_at(i, self.capacity)
    }

    /// The most rows a windowed layer keeps (`usize::MAX` when no layer is windowed).
    pub fn ring_rows(&self) -> usize {
        self.ring_rows
    }

    /// The row ranges of layer `i` holding positions `a..b`, in position order: one range,
    /// or two when they wrap around a ring (the second empty otherwise). The positions must
    /// be within the layer's reach (`b - a` at most its rows).
    pub fn spans(&self, i: usize, a: usize, b: usize) -> [std::ops::Range<usize>; 2] {
        let rows = self.layer_rows(i).max(1);
        debug_assert!(
            b - a <= rows,
            "positions {a}..{b} past the {rows} rows of layer {i}"
        );
        let (ra, n) = (a % rows, b - a);
        if ra + n <= rows {
            [ra..ra + n, 0..0]
        } else {
            [ra..rows, 0..ra + n - rows]
        }
    }

    fn bytes_for(&self, capacity: usize) -> usize {
        let rows: usize = (0..self.store.n_layers())
            .map(|i| self.rows_at(i, capacity))
            .sum();
        2 * rows * self.kv_dim * self.dtype.size_in_bytes()
    }

    /// Bytes held on the device.
    pub fn nbytes(&self) -> usize {
        self.bytes_for(self.capacity)
    }

    /// Bytes it would hold at its maximum context.
    pub fn max_nbytes(&self) -> usize {
        self.bytes_for(self.max_ctx)
    }

    /// Bytes it would hold at `positions` positions.
    pub fn bytes_at(&self, positions: usize) -> usize {
        self.bytes_for(positions)
    }

    /// A copy of this cache (its rows, length and capacity) whose memory is its own: a
    /// session that goes on from the same prefix, such as another choice of the same prompt.
    pub fn fork(&self) -> Result<KvCache> {
        let store = match &self.store {
            Store::Device(layers) => Store::Device(
                layers
                    .iter()
                    .map(|l| {
                        Ok(LayerKv {
                            k: l.k.copy()?,
                            v: l.v.copy()?,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Store::HostF16(l) => Store::HostF16(host_copy(l, |i| l[i].k.len())?),
            Store::HostF32(l) => Store::HostF32(host_copy(l, |i| l[i].k.len())?),
        };
        Ok(KvCache {
            store,
            len: self.len,
            capacity: self.capacity,
            max_ctx: self.max_ctx,
            kv_dim: self.kv_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            windowed: self.windowed.clone(),
            ring_rows: self.ring_rows,
        })
    }

    /// A copy of this cache's first `keep` positions, bounded by `max_ctx` tokens, whose
    /// memory is its own and holds exactly those positions: a prefix-cache entry (`max_ctx`
    /// = `keep`: it never grows), or a request that goes on from a cached prefix. A windowed
    /// layer that has wrapped into a ring is only copied whole (`keep` = [`KvCache::len`]).
    pub fn fork_prefix(&self, keep: usize, max_ctx: usize) -> Result<KvCache> {
        if keep > self.len || keep > max_ctx || max_ctx == 0 {
            return Err(Error::InvalidInput(format!(
                "a copy of {keep} of {} positions, bounded by {max_ctx}",
                self.len
            )));
        }
        let n = self.store.n_layers();
        if keep < self.len {
            if let Some(i) = (0..n).find(|&i| self.len > self.layer_rows(i)) {
                return Err(Error::InvalidInput(format!(
                    "layer {i} holds a ring of {} rows past {} positions: only the whole cache can be copied",
                    self.layer_rows(i),
                    self.len
                )));
            }
        }
        let kv_dim = self.kv_dim;
        let rows: Vec<usize> = (0..n).map(|i| self.rows_at(i, keep)).collect();
        let store = match &self.store {
            Store::HostF16(l) => Store::HostF16(host_copy(l, |i| rows[i] * kv_dim)?),
            Store::HostF32(l) => Store::HostF32(host_copy(l, |i| rows[i] * kv_dim)?),
            Store::Device(layers) => Store::Device(
                layers
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let (k, v) = self.alloc(rows[i])?;
                        if rows[i] > 0 {
                            k.slice_set(&l.k.narrow(0, 0, rows[i])?.contiguous()?, 0, 0)?;
                            v.slice_set(&l.v.narrow(0, 0, rows[i])?.contiguous()?, 0, 0)?;
                        }
                        Ok(LayerKv { k, v })
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        Ok(KvCache {
            store,
            len: keep,
            capacity: keep,
            max_ctx,
            kv_dim: self.kv_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            windowed: self.windowed.clone(),
            ring_rows: self.ring_rows,
        })
    }

    /// Makes room for `n` more tokens, or fails without changing anything.
    pub fn reserve(&mut self, n: usize) -> Result<()> {
        let needed = self.len + n;
        if needed > self.max_ctx {
            return Err(Error::ContextOverflow {
                needed,
                max: self.max_ctx,
            });
        }
        if n > STEP_ROWS && self.ring_rows != usize::MAX {
            return Err(Error::InvalidInput(format!(
                "a step of {n} rows on a cache with windowed layers (at most {STEP_ROWS})"
            )));
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let cap = needed
            .div_ceil(CHUNK)
            .saturating_mul(CHUNK)
            .min(self.max_ctx);
        // A layer only grows while it holds every position so far (a ring never regrows),
        // so its rows stay where they are.
        let kv_dim = self.kv_dim;
        let rows: Vec<usize> = (0..self.store.n_layers())
            .map(|i| self.rows_at(i, cap))
            .collect();
        let old: Vec<usize> = (0..self.store.n_layers())
            .map(|i| self.layer_rows(i))
            .collect();
        match &mut self.store {
            Store::HostF16(l) => grow_host(l, |i| rows[i] * kv_dim)?,
            Store::HostF32(l) => grow_host(l, |i| rows[i] * kv_dim)?,
            Store::Device(layers) => {
                let mut grown = Vec::with_capacity(layers.len());
                for (i, l) in layers.iter().enumerate() {
                    if rows[i] == old[i] {
                        grown.push(LayerKv {
                            k: l.k.clone(),
                            v: l.v.clone(),
                        });
                        continue;
                    }
                    let z = || Tensor::zeros((rows[i], kv_dim), self.dtype, &self.device);
                    let (k, v) = (z()?, z()?);
                    let kept = self.len.min(old[i]);
                    if kept > 0 {
                        k.slice_set(&l.k.narrow(0, 0, kept)?.contiguous()?, 0, 0)?;
                        v.slice_set(&l.v.narrow(0, 0, kept)?.contiguous()?, 0, 0)?;
                    }
                    grown.push(LayerKv { k, v });
                }
                *layers = grown;
            }
        }
        self.capacity = cap;
        Ok(())
    }

    /// Writes `k`, `v: [n, kv_dim]` of layer `i` at rows `start..start+n` (reserved before).
    pub fn write(&mut self, i: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (n, w) = k.dims2()?;
        if w != self.kv_dim || v.dims() != k.dims() {
            return Err(Error::InvalidInput(format!(
                "cache write of keys {:?} and values {:?}, expected [n, {}] each",
                k.dims(),
                v.dims(),
                self.kv_dim
            )));
        }
        if start + n > self.capacity {
            return Err(Error::InvalidInput(format!(
                "cache write of rows {start}..{} past the reserved {}",
                start + n,
                self.capacity
            )));
        }
        let w = self.kv_dim;
        let rows = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        fn put<T: KvElem>(dst: &mut [T], src: &[f32]) {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = T::from_f32(s));
        }
        let spans = self.spans(i, start, start + n);
        // Host caches take the rows as f32 on the host; device caches are written in place
        // with candle's ops, with no copy through the host.
        let (kr, vr) = match self.is_host() {
            true => (rows(k)?, rows(v)?),
            false => (Vec::new(), Vec::new()),
        };
        let mut at = 0;
        for span in spans.into_iter().filter(|s| !s.is_empty()) {
            let (len, rs) = (span.len(), span.start);
            let src = at * w..(at + len) * w;
            let dst = rs * w..(rs + len) * w;
            match self.host_layer_mut(i) {
                Some(Ok(HostKvMut::F16(l))) => {
                    put(&mut l.k[dst.clone()], &kr[src.clone()]);
                    put(&mut l.v[dst], &vr[src]);
                }
                Some(Ok(HostKvMut::F32(l))) => {
                    put(&mut l.k[dst.clone()], &kr[src.clone()]);
                    put(&mut l.v[dst], &vr[src]);
                }
                Some(Err(e)) => return Err(e),
                None => {
                    let l = self.device_layer(i)?;
                    let part = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.narrow(0, at, len)?.to_dtype(self.dtype)?.contiguous()?)
                    };
                    l.k.slice_set(&part(k)?, 0, rs)?;
                    l.v.slice_set(&part(v)?, 0, rs)?;
                }
            }
            at += len;
        }
        Ok(())
    }

    /// Whether the rows live in host memory (a CPU cache).
    pub fn is_host(&self) -> bool {
        !matches!(self.store, Store::Device(_))
    }

    /// The whole `[rows, kv_dim]` buffers of layer `i` of a device cache (see
    /// [`KvCache::spans`] for which row holds which position).
    pub fn buffers(&self, i: usize) -> Result<(&Tensor, &Tensor)> {
        let l = self.device_layer(i)?;
        Ok((&l.k, &l.v))
    }

    /// Layer `i` of a host cache (`None` for a device cache).
    pub fn host_layer(&self, i: usize) -> Option<Result<HostKv<'_>>> {
        let missing = || Error::InvalidInput(format!("cache has no layer {i}"));
        match &self.store {
            Store::Device(_) => None,
            Store::HostF16(l) => Some(l.get(i).map(HostKv::F16).ok_or_else(missing)),
            Store::HostF32(l) => Some(l.get(i).map(HostKv::F32).ok_or_else(missing)),
        }
    }

    /// Layer `i` of a host cache, writable (`None` for a device cache).
    pub fn host_layer_mut(&mut self, i: usize) -> Option<Result<HostKvMut<'_>>> {
        let missing = || Error::InvalidInput(format!("cache has no layer {i}"));
        match &mut self.store {
            Store::Device(_) => None,
            Store::HostF16(l) => Some(l.get_mut(i).map(HostKvMut::F16).ok_or_else(missing)),
            Store::HostF32(l) => Some(l.get_mut(i).map(HostKvMut::F32).ok_or_else(missing)),
        }
    }

    fn device_layer(&self, i: usize) -> Result<&LayerKv> {
        match &self.store {
            Store::Device(l) => l
                .get(i)
                .ok_or_else(|| Error::InvalidInput(format!("cache has no layer {i}"))),
            _ => Err(Error::InvalidInput(
                "a host cache has no device buffers".into(),
            )),
        }
    }

    /// Marks `n` more tokens as cached, after every layer wrote them.
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        // The buffers are freed right after this, possibly on a thread that never ran a
        // kernel: see `bind_thread`.
        if matches!(self.store, Store::Device(_)) {
            crate::device::bind_thread(&self.device);
        }
    }
}

#[cfg(test)]
mod tests;
