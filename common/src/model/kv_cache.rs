//! [`KvCache`]: one session's keys and values for the blocks of one stage.
//!
//! The cache belongs to the session, not to the weights, so any number of sessions share a
//! stage. It grows in fixed chunks up to the session's maximum context and never past it:
//! going further is [`Error::ContextOverflow`]. Rows are written in place; the only copies
//! are the chunk-wise regrowths. Keys and values are stored as f16 by default, as llama.cpp
//! does (half the memory of f32), or as f32 when asked.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

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

/// Keys and values of one session on one stage.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
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
        let mut c = KvCache {
            layers: Vec::new(),
            len: 0,
            capacity: 0,
            max_ctx,
            kv_dim,
            dtype: dtype.dtype(),
            device: device.clone(),
        };
        c.layers = (0..n_layers)
            .map(|_| c.alloc(0).map(|(k, v)| LayerKv { k, v }))
            .collect::<Result<_>>()?;
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
        self.layers.len() * 2 * self.capacity * self.kv_dim * self.dtype.size_in_bytes()
    }

    /// Bytes it would hold at its maximum context.
    pub fn max_nbytes(&self) -> usize {
        self.layers.len() * 2 * self.max_ctx * self.kv_dim * self.dtype.size_in_bytes()
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
        let mut grown = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (k, v) = self.alloc(cap)?;
            if self.len > 0 {
                k.slice_set(&l.k.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
                v.slice_set(&l.v.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
            }
            grown.push(LayerKv { k, v });
        }
        self.layers = grown;
        self.capacity = cap;
        Ok(())
    }

    /// Writes `k`, `v: [n, kv_dim]` of layer `i` at rows `start..start+n` (reserved before).
    pub fn write(&mut self, i: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let l = self.layer(i)?;
        l.k.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 0, start)?;
        l.v.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 0, start)?;
        Ok(())
    }

    /// The whole `[capacity, kv_dim]` buffers of layer `i`.
    pub fn buffers(&self, i: usize) -> Result<(&Tensor, &Tensor)> {
        let l = self.layer(i)?;
        Ok((&l.k, &l.v))
    }

    fn layer(&self, i: usize) -> Result<&LayerKv> {
        self.layers
            .get(i)
            .ok_or_else(|| Error::InvalidInput(format!("cache has no layer {i}")))
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
        let (k0, _) = c.buffers(0)?;
        assert_eq!(
            k0.narrow(0, 0, 10)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?,
            80.0
        );
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
