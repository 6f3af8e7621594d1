//! [`KvCache`]: one session's keys and values for the blocks of one stage.
//!
//! The cache belongs to the session, not to the weights, so any number of sessions share a
//! stage. It grows in fixed chunks up to the session's maximum context and never past it:
//! going further is [`Error::ContextOverflow`]. Rows are written in place; the only copies
//! are the chunk-wise regrowths. Keys and values are stored as f16 by default, as llama.cpp
//! does (half the memory of f32), or as f32 when asked.
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

/// Grows every layer to exactly `elems` elements (not `Vec`'s doubling, so that the bytes
/// held are the bytes counted); an allocation failure is an error, not an abort.
fn grow_host<T: KvElem>(layers: &mut [HostLayer<T>], elems: usize) -> Result<()> {
    for l in layers {
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

    /// Bytes held on the device.
    pub fn nbytes(&self) -> usize {
        self.store.n_layers() * 2 * self.capacity * self.kv_dim * self.dtype.size_in_bytes()
    }

    /// Bytes it would hold at its maximum context.
    pub fn max_nbytes(&self) -> usize {
        self.store.n_layers() * 2 * self.max_ctx * self.kv_dim * self.dtype.size_in_bytes()
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
        if needed <= self.capacity {
            return Ok(());
        }
        let cap = needed
            .div_ceil(CHUNK)
            .saturating_mul(CHUNK)
            .min(self.max_ctx);
        match &mut self.store {
            Store::HostF16(l) => grow_host(l, cap * self.kv_dim)?,
            Store::HostF32(l) => grow_host(l, cap * self.kv_dim)?,
            Store::Device(layers) => {
                let mut grown = Vec::with_capacity(layers.len());
                for l in layers.iter() {
                    let z = || Tensor::zeros((cap, self.kv_dim), self.dtype, &self.device);
                    let (k, v) = (z()?, z()?);
                    if self.len > 0 {
                        k.slice_set(&l.k.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
                        v.slice_set(&l.v.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
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
        let span = start * w..(start + n) * w;
        match self.host_layer_mut(i) {
            Some(Ok(HostKvMut::F16(l))) => {
                put(&mut l.k[span.clone()], &rows(k)?);
                put(&mut l.v[span], &rows(v)?);
            }
            Some(Ok(HostKvMut::F32(l))) => {
                put(&mut l.k[span.clone()], &rows(k)?);
                put(&mut l.v[span], &rows(v)?);
            }
            Some(Err(e)) => return Err(e),
            None => {
                let l = self.device_layer(i)?;
                l.k.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 0, start)?;
                l.v.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 0, start)?;
            }
        }
        Ok(())
    }

    /// Whether the rows live in host memory (a CPU cache).
    pub fn is_host(&self) -> bool {
        !matches!(self.store, Store::Device(_))
    }

    /// The whole `[capacity, kv_dim]` buffers of layer `i` of a device cache.
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

    /// Forgets everything after the first `len` tokens (kept capacity is reused).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
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
mod tests {
    use super::*;

    #[test]
    fn grows_in_chunks_and_refuses_past_max() -> Result<()> {
        let mut c = KvCache::new(2, 8, 300, KvDtype::F16, &Device::Cpu)?;
        assert_eq!(c.nbytes(), 0);
        c.reserve(10)?;
        assert_eq!(c.nbytes(), 2 * 2 * CHUNK * 8 * 2);
        let k = Tensor::ones((10, 8), DType::F32, &Device::Cpu)?;
        c.write(0, 0, &k, &k)?;
        c.write(1, 0, &k, &k)?;
        c.advance(10);
        c.reserve(250)?; // regrows to the bound, 300, keeping the rows
        assert_eq!(c.nbytes(), 2 * 2 * 300 * 8 * 2);
        let Some(Ok(HostKv::F16(l))) = c.host_layer(1) else {
            panic!("a CPU cache of f16 lives in host memory");
        };
        // what is counted is what is held
        assert_eq!((l.k.capacity(), l.v.capacity()), (300 * 8, 300 * 8));
        let wrong = Tensor::ones((2, 7), DType::F32, &Device::Cpu)?;
        assert!(c.write(0, 10, &wrong, &wrong).is_err());
        let Some(Ok(HostKv::F16(l))) = c.host_layer(0) else {
            panic!("a CPU cache of f16 lives in host memory");
        };
        let kept: f32 = l.k[..10 * 8].iter().map(|x| x.to_f32()).sum();
        assert_eq!(kept, 80.0);
        assert!(matches!(
            c.reserve(291),
            Err(Error::ContextOverflow {
                needed: 301,
                max: 300
            })
        ));
        assert_eq!(c.len(), 10);
        Ok(())
    }
}
