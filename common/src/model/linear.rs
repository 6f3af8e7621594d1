//! [`QLinear`]: a linear layer over a quantized GGUF weight.
//!
//! On CUDA (and for formats without a fast CPU path) it is candle's `QMatMul`. On CPU, for
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K, Q5_K and Q6_K, it runs
//! [`crate::kernels`] directly over the `QTensor`'s raw blocks.

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Shape, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::kernels::{self, QuantKind};

thread_local! {
    /// The output of [`QLinear::with_host_product`], kept between calls up to
    /// [`kernels::matmul::SCRATCH_KEEP`] floats; it only grows.
    static PRODUCT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees the scratch held by the calling thread (a node's compute thread, once its last
/// session is gone), so that an idle process holds none of it: the CPU products' buffers,
/// and on CUDA the decode graphs with their buffers.
pub fn release_thread_scratch() {
    PRODUCT.with(|p| *p.borrow_mut() = Vec::new());
    kernels::matmul::release_scratch();
    #[cfg(feature = "cuda")]
    crate::cuda::decode_graph::release();
}

/// A quantized `y = x · Wᵀ (+ b)` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Arc<QTensor>,
    generic: QMatMul,
    fast: Option<QuantKind>,
    out_features: usize,
    in_features: usize,
    bias: Option<Tensor>,
}

/// Reads one tensor of the file onto `device` as a `QTensor`.
pub fn load_qtensor(file: &GgufFile, name: &str, device: &Device) -> Result<QTensor> {
    let desc = file.require(name)?;
    let dtype = desc.ggml_dtype()?;
    let bytes = file.read_bytes(desc)?;
    qtensor_from_bytes(name, dtype, &bytes, desc.dims.clone(), device)
}

fn qtensor_from_bytes(
    name: &str,
    dtype: candle_core::quantized::GgmlDType,
    bytes: &[u8],
    dims: Vec<usize>,
    device: &Device,
) -> Result<QTensor> {
    let elems: usize = dims.iter().product();
    let bs = dtype.block_size();
    if !elems.is_multiple_of(bs) || bytes.len() != elems / bs * dtype.type_size() {
        return Err(Error::BadTensor {
            tensor: name.to_string(),
            reason: format!("{} bytes do not hold {dims:?} of {dtype:?}", bytes.len()),
        });
    }
    Ok(qtensor_from_ggml(dtype, bytes, dims, device)?)
}

/// Reads a 1-D f32 tensor (norm weights, biases) onto `device`.
pub fn load_vector(file: &GgufFile, name: &str, len: usize, device: &Device) -> Result<Tensor> {
    let q = load_qtensor(file, name, device)?;
    if q.shape().dims() != [len] {
        return Err(Error::BadTensor {
            tensor: name.into(),
            reason: format!("shape {:?}, expected [{len}]", q.shape().dims()),
        });
    }
    Ok(q.dequantize(device)?)
}

impl QLinear {
    /// Wraps a `[out, in]` quantized weight.
    pub fn new(name: &str, weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2().map_err(|_| Error::BadTensor {
            tensor: name.into(),
            reason: format!("expected a matrix, found shape {:?}", weight.shape().dims()),
        })?;
        let fast = match weight.device() {
            Device::Cpu => QuantKind::from_ggml(weight.dtype()),
            _ => None,
        };
        let generic = QMatMul::from_arc(weight.clone())?;
        Ok(QLinear {
            weight,
            generic,
            fast,
            out_features,
            in_features,
            bias,
        })
    }

    /// Loads `name` from the file, checking it is `[out, in]`.
    pub fn load(
        file: &GgufFile,
        name: &str,
        out: usize,
        inp: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::load_fused(file, &[name], &[out], inp, device)?.ok_or_else(|| Error::BadTensor {
            tensor: name.into(),
            reason: "cannot be loaded".into(),
        })
    }

    /// Loads several `[out_i, in]` weights as one `[Σ out_i, in]` matrix, so that one product
    /// (and one activation quantization) serves them all. `None` when their types differ.
    pub fn load_fused(
        file: &GgufFile,
        names: &[&str],
        outs: &[usize],
        inp: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        let mut dtype = None;
        let mut bytes = Vec::new();
        for (name, &out) in names.iter().zip(outs) {
            let desc = file.require(name)?;
            if desc.dims != [out, inp] {
                return Err(Error::BadTensor {
                    tensor: name.to_string(),
                    reason: format!("shape {:?}, expected [{out}, {inp}]", desc.dims),
                });
            }
            let dt = desc.ggml_dtype()?;
            if dtype.is_some_and(|d| d != dt) {
                return Ok(None);
            }
            dtype = Some(dt);
            if names.len() == 1 {
                bytes = file.read_bytes(desc)?;
            } else {
                bytes.extend_from_slice(&file.read_bytes(desc)?);
            }
        }
        let Some(dtype) = dtype else { return Ok(None) };
        let total: usize = outs.iter().sum();
        let label = names.join("+");
        let q = qtensor_from_bytes(&label, dtype, &bytes, vec![total, inp], device)?;
        drop(bytes);
        Ok(Some(Self::new(&label, Arc::new(q), None)?))
    }

    /// Adds a bias `[out]`.
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Whether a bias is added.
    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// Bytes held by the weight (and bias).
    pub fn nbytes(&self) -> usize {
        self.weight.storage_size_in_bytes() + self.bias.as_ref().map_or(0, |b| b.elem_count() * 4)
    }

    /// The shared weight (for tied embeddings).
    pub fn weight(&self) -> &Arc<QTensor> {
        &self.weight
    }

    /// On the CPU's fast path (no bias), runs `x: [n, in]` through the product into a
    /// scratch buffer this thread keeps, and hands the `[n, out]` rows (row-major) to `f`;
    /// `Ok(None)` elsewhere. The node fixes glibc's mmap threshold at 128 KiB (see
    /// `shard-node`'s `trim`), so a larger output allocated afresh for each product was
    /// mapped, faulted in and unmapped again every step.
    pub fn with_host_product<R>(
        &self,
        x: &Tensor,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<Option<R>> {
        let Some(kind) = self.fast else {
            return Ok(None);
        };
        if self.bias.is_some() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (n, k) = x.dims2()?;
        if k != self.in_features {
            return Err(Error::InvalidInput(format!(
                "input rows of {k} for a product over {}",
                self.in_features
            )));
        }
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::InvalidInput("product input not contiguous".into()))?;
        let xs = &cpu.as_slice::<f32>()?[a..b];
        let w = self.weight.data()?;
        let len = n * self.out_features;
        let mut buf = PRODUCT.with(|p| std::mem::take(&mut *p.borrow_mut()));
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        kernels::matmul(kind, &w, self.out_features, k, xs, &mut buf[..len]);
        let r = f(&buf[..len]);
        if buf.capacity() <= kernels::matmul::SCRATCH_KEEP {
            PRODUCT.with(|p| *p.borrow_mut() = buf);
        }
        Ok(Some(r))
    }

    /// `x: [n, in]` -> `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.fast {
            Some(kind) => x.contiguous()?.apply_op1_no_bwd(&FastMatMul {
                weight: &self.weight,
                kind,
                rows: self.out_features,
                k: self.in_features,
            })?,
            None if f16_gemm(x) => self.forward_f16(x)?,
            None => self.generic.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The product on f16 tensor cores ([`crate::cuda::f16_gemm`]); for quantized types
    /// without a dequantization kernel of ours, candle's `forward_via_f16`; full-precision
    /// weights it does not take keep their own product (an f16 copy would round F32 weights
    /// and could overflow BF16 ones).
    fn forward_f16(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::quantized::GgmlDType;
        #[cfg(feature = "cuda")]
        if let Some(y) =
            crate::cuda::f16_gemm::product(&self.weight, self.out_features, self.in_features, x)?
        {
            return Ok(y);
        }
        Ok(match self.weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => self.generic.forward(x)?,
            _ => self.generic.forward_via_f16(x)?,
        })
    }
}

/// Rows from which a product on CUDA takes cuBLAS on the weight dequantized to f16
/// (`--cuda-gemm`). On an H100 (ncu, 8B Q4_0) dequantizing every weight takes about 10.6 ms,
/// and a row costs about 0.070 ms on candle's MMQ against 0.019 on f16 tensor cores, so the
/// dequantization pays for itself from about 210 rows; fewer stay on the MMQ.
pub const GEMM_MIN_ROWS: usize = 256;

/// Whether the product of `x` takes cuBLAS on an f16 copy of the weight.
fn f16_gemm(x: &Tensor) -> bool {
    let rows: usize = x.dims().iter().rev().skip(1).product();
    x.device().is_cuda() && rows >= GEMM_MIN_ROWS && crate::cuda_options::get().gemm
}

struct FastMatMul<'a> {
    weight: &'a QTensor,
    kind: QuantKind,
    rows: usize,
    k: usize,
}

impl CustomOp1 for FastMatMul<'_> {
    fn name(&self) -> &'static str {
        "fast-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fast-qmatmul needs a contiguous input".into())
        })?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("fast-qmatmul: input {dims:?} does not end in {}", self.k);
        }
        let n = x.len() / self.k;
        let w = self.weight.data()?;
        let mut out = vec![0f32; n * self.rows];
        kernels::matmul(self.kind, &w, self.rows, self.k, x, &mut out);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.rows;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Several projections of the same input (q/k/v, or gate/up): one fused product when the
/// weights share a type, separate ones otherwise.
#[derive(Debug, Clone)]
pub enum MultiLinear {
    /// One `[Σ out_i, in]` matrix whose output is split by width.
    Fused(QLinear, Vec<usize>),
    /// One matrix per output.
    Split(Vec<QLinear>),
}

impl MultiLinear {
    /// Loads `names` (each `[out_i, in]`), with optional biases named by `bias_names`.
    pub fn load(
        file: &GgufFile,
        names: &[&str],
        outs: &[usize],
        inp: usize,
        bias_names: Option<&[&str]>,
        device: &Device,
    ) -> Result<Self> {
        let biases = match bias_names {
            Some(bn) if bn.iter().all(|b| file.tensor(b).is_some()) => Some(
                bn.iter()
                    .zip(outs)
                    .map(|(b, &o)| load_vector(file, b, o, device))
                    .collect::<Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        if let Some(fused) = QLinear::load_fused(file, names, outs, inp, device)? {
            let fused = match &biases {
                Some(b) => fused.with_bias(Tensor::cat(b, 0)?),
                None => fused,
            };
            return Ok(MultiLinear::Fused(fused, outs.to_vec()));
        }
        let mut parts = Vec::with_capacity(names.len());
        for (i, (name, &out)) in names.iter().zip(outs).enumerate() {
            let l = QLinear::load(file, name, out, inp, device)?;
            parts.push(match &biases {
                Some(b) => l.with_bias(b[i].clone()),
                None => l,
            });
        }
        Ok(MultiLinear::Split(parts))
    }

    /// `x: [n, in]` -> one `[n, out_i]` per projection.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            MultiLinear::Fused(l, outs) => {
                let y = l.forward(x)?;
                let mut at = 0;
                let mut parts = Vec::with_capacity(outs.len());
                for &o in outs {
                    parts.push(y.narrow(1, at, o)?);
                    at += o;
                }
                Ok(parts)
            }
            MultiLinear::Split(ls) => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// `act(gate) * up` of a fused `[gate; up]` projection on the CPU's fast path, the
    /// product itself held in scratch ([`QLinear::with_host_product`]); `Ok(None)` elsewhere.
    pub fn gate_mul_host(
        &self,
        x: &Tensor,
        act: crate::gguf::Activation,
    ) -> Result<Option<Tensor>> {
        match self {
            MultiLinear::Fused(l, outs) if outs.len() == 2 && outs[0] == outs[1] => l
                .with_host_product(x, |y| super::host_rows::gate_mul_halves(y, outs[0], act))?
                .transpose(),
            _ => Ok(None),
        }
    }

    /// `act(gate) * up` of a fused `[gate; up]` projection on a GPU, in one kernel after the
    /// product ([`crate::cuda::gate_mul`]); `Ok(None)` elsewhere.
    pub fn gate_mul_device(
        &self,
        x: &Tensor,
        act: crate::gguf::Activation,
    ) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let MultiLinear::Fused(l, outs) = self {
            if outs.len() == 2
                && outs[0] == outs[1]
                && x.device().is_cuda()
                && crate::cuda::gate_mul::enabled()
            {
                return crate::cuda::gate_mul::gate_mul(&l.forward(x)?, outs[0], act);
            }
        }
        let _ = (x, act);
        Ok(None)
    }

    /// The one matrix of a fused projection without biases; `None` when split.
    pub fn single(&self) -> Option<&QLinear> {
        match self.parts_without_bias()?.as_slice() {
            [l] => Some(*l),
            _ => None,
        }
    }

    /// Its matrices, one (fused) or one per part (types differ), when none has a bias: their
    /// outputs side by side are this projection's.
    pub fn parts_without_bias(&self) -> Option<Vec<&QLinear>> {
        match self {
            MultiLinear::Fused(l, _) if !l.has_bias() => Some(vec![l]),
            MultiLinear::Split(ls) if ls.iter().all(|l| !l.has_bias()) => Some(ls.iter().collect()),
            _ => None,
        }
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            MultiLinear::Fused(l, _) => l.nbytes(),
            MultiLinear::Split(ls) => ls.iter().map(QLinear::nbytes).sum(),
        }
    }
}
