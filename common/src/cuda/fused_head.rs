//! The last stage's head on CUDA for decode steps: RMSNorm and Q8_1 quantization in one
//! kernel (`add_rmsnorm_q8_1` of `fused_decode.cu`), then our matrix-vector product
//! (`matvec.rs`) over the output matrix. Through candle's ops the head costs an RMSNorm, an
//! activation quantizer and candle's mmvq, which reads the 8B model's 49152-row head at about
//! 1.8 TB/s where ours reads it at about 2.8.
//!
//! It takes a step of at most [`MAX_COLS`] rows whose output weight our kernels read
//! ([`MatvecType::of`]), without a bias, on the fused path ([`fused_decode::enabled`]);
//! anything else goes through candle's ops in [`crate::model::stage::Stage::head`]. The values
//! quantized are those candle's RMSNorm gives, quantized as candle's kernel does, so logits
//! differ from candle's path only by the order of the product's sums.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::fused_decode::{
    self, bound_stream, err, input_address, padded, ptr, vector_address, MODULE, PTX,
};
use super::matvec::{MatvecFuncs, MatvecType, MAX_COLS, Q8_1_BYTES};
use super::pdl::{self, arg};
use crate::error::Result;
use crate::model::linear::QLinear;

/// `output · rmsnorm(x) * norm` for `x: [n, hidden]` f32, as `[n, vocab]` f32 logits, when
/// the fused head takes this step (see the module docs); `None` otherwise.
pub fn forward(norm: &Tensor, eps: f32, output: &QLinear, x: &Tensor) -> Result<Option<Tensor>> {
    if !fused_decode::enabled() || x.dtype() != DType::F32 || output.has_bias() {
        return Ok(None);
    }
    let Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let (n, hidden) = x.dims2()?;
    if n == 0
        || n > MAX_COLS
        || hidden != output.in_features()
        || !hidden.is_multiple_of(32)
        || norm.dims() != [hidden]
        || norm.dtype() != DType::F32
    {
        return Ok(None);
    }
    let w = output.weight();
    let stream = dev.cuda_stream();
    let wp = w.device_ptr()? as u64;
    let Some(t) = MatvecType::of(w.dtype(), hidden, wp) else {
        return Ok(None);
    };
    let op = FusedHead {
        norm: vector_address(norm, &stream)?,
        w: wp,
        t,
        vocab: output.out_features(),
        hidden,
        eps,
    };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

struct FusedHead {
    norm: u64,
    w: u64,
    t: MatvecType,
    vocab: usize,
    hidden: usize,
    eps: f32,
}

impl CustomOp1 for FusedHead {
    fn name(&self) -> &'static str {
        "fused-head"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused head: CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &xs.device;
        let stream = bound_stream(dev)?;
        let (n, hidden) = xl.shape().dims2()?;
        if hidden != self.hidden || n == 0 || n > MAX_COLS {
            candle_core::bail!("fused head: input {:?}, hidden {}", xl.dims(), self.hidden);
        }
        let mut x_in = input_address(xs, xl, &stream, "fused head")?;
        let hpad = padded(hidden);
        // SAFETY (both buffers): written by the kernels below before anything reads them.
        let x_out = unsafe { stream.alloc::<f32>(n * hidden) }.map_err(|e| err("alloc", e))?;
        let xq = unsafe { stream.alloc::<u8>(n * hpad / 32 * Q8_1_BYTES) }
            .map_err(|e| err("alloc", e))?;
        let logits = unsafe { stream.alloc::<f32>(n * self.vocab) }.map_err(|e| err("alloc", e))?;
        let norm = dev
            .get_or_load_custom_func("add_rmsnorm_q8_1", MODULE, PTX)?
            .into_cuda_function();
        let cfg = LaunchConfig {
            grid_dim: ((hpad / 32).div_ceil(32) as u32, n as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let (mut delta, mut x_outp, mut w, mut act) =
            (0u64, ptr(&x_out, &stream), self.norm, ptr(&xq, &stream));
        let (mut h, mut hp, mut eps) = (hidden as i32, hpad as i32, self.eps);
        let mut params = [
            arg(&mut x_in),
            arg(&mut delta),
            arg(&mut x_outp),
            arg(&mut w),
            arg(&mut act),
            arg(&mut h),
            arg(&mut hp),
            arg(&mut eps),
        ];
        // SAFETY: x_in is [n, hidden] f32 (checked above), x_out another buffer of that size,
        // the norm weight [hidden] f32, xq n rows of hpad / 32 Q8_1 blocks; the kernel waits
        // for its predecessor first.
        unsafe { pdl::launch(&stream, &norm, cfg, &mut params, true) }
            .map_err(|e| err("add_rmsnorm", e))?;
        let funcs = MatvecFuncs::load(dev, n)?;
        // SAFETY: `t` came from `MatvecType::of` for this weight, [vocab, hidden]; xq holds n
        // rows of hpad / 32 blocks (16-byte aligned, a multiple of 16 blocks); logits holds
        // n rows of vocab.
        unsafe {
            funcs.launch(
                &stream,
                self.t,
                self.w,
                ptr(&xq, &stream),
                ptr(&logits, &stream),
                (self.vocab, hidden),
                (hpad / 32, self.vocab),
            )
        }?;
        // The scratch buffers are freed stream-ordered, after the kernels that use them.
        drop((x_out, xq));
        Ok((
            CudaStorage::wrap_cuda_slice(logits, dev.clone()),
            Shape::from((n, self.vocab)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    /// The fused head against candle's RMSNorm and quantized matmul on the same weights: Q4_0
    /// and Q8_0 outputs of 1000 rows over 512 values, 1 to 8 rows of input, and a step of 9
    /// rows, which it leaves to candle. Needs a GPU: run the test binary of a `cuda` build on
    /// the GPU machine.
    #[test]
    fn matches_candle_ops() -> Result<()> {
        let dev = Device::new_cuda(0)?;
        let (vocab, hidden) = (1000, 512);
        let wf: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i as f32) * 0.013).sin() * 0.05)
            .collect();
        let wf = Tensor::from_vec(wf, (vocab, hidden), &dev)?;
        let norm = Tensor::from_vec(
            (0..hidden)
                .map(|i| 1.0 + (i as f32 * 0.1).cos() * 0.2)
                .collect(),
            hidden,
            &dev,
        )?;
        let eps = 1e-5f32;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let output = QLinear::new("output", Arc::new(QTensor::quantize(&wf, dtype)?), None)?;
            for n in 1..=MAX_COLS + 1 {
                let x: Vec<f32> = (0..n * hidden)
                    .map(|i| ((i as f32) * 0.37 + n as f32).sin() * 1.5)
                    .collect();
                let x = Tensor::from_vec(x, (n, hidden), &dev)?;
                let ours = forward(&norm, eps, &output, &x)?;
                if n > MAX_COLS {
                    assert!(ours.is_none(), "a step of {n} rows is candle's");
                    continue;
                }
                let ours = ours.ok_or_else(|| {
                    crate::error::Error::InvalidInput(format!("{dtype:?}: not taken"))
                })?;
                let theirs = output.forward(&candle_nn::ops::rms_norm(&x, &norm, eps)?)?;
                let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // The same quantized values summed in another order, or a norm that rounds
                // one value the other way; a wrong product would be off by about `scale`.
                assert!(
                    scale > 0.1 && diff <= 1e-3 * scale,
                    "{dtype:?}, {n} rows: logits differ by {diff} (largest {scale})"
                );
            }
        }
        Ok(())
    }
}
