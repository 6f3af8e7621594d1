//! Warming a CUDA device up before anything is loaded.
//!
//! candle 0.11.1 allocates some device memory lazily and keeps it for the life of the
//! process: its quantized matmuls keep per-device workspaces in process-wide statics
//! (`quantized/fast_mmvq.rs` `WORKSPACE`, `quantized/fast_mmq.rs` `MMQ_WORKSPACE` and a
//! fixed 16 MiB `FIXUP_WORKSPACE`), grow-only and never freed, and each family of kernels is
//! loaded into the context on first use, as is cuBLAS. Allocated during the first request,
//! the workspaces land in the memory pool's chunks next to weights and KV caches, and pin
//! those chunks after everything else is freed (measured on an H100: docs/memory.md).
//!
//! [`warm_up`] makes all of that happen first, on synthetic tensors, with the workspaces at
//! their largest size, then frees the temporaries and trims the pool. What stays is the
//! node's fixed cost, counted in its baseline, and everything a client later causes can go
//! back to the driver.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::error::Result;

/// Largest inner dimension the workspaces are sized for (the largest `k` of any matmul: the
/// feed-forward width of the models served).
pub const WARM_MAX_K: usize = 32768;

/// Most token rows of one product on candle's MMQ, whose workspaces grow with the rows: a
/// pass's products from [`crate::model::linear::GEMM_MIN_ROWS`] rows take the f16 products
/// instead, unless those are off, and then a whole pass's rows.
pub fn warm_max_rows() -> usize {
    if cfg!(feature = "cuda") && crate::cuda_options::get().gemm {
        crate::model::linear::GEMM_MIN_ROWS
    } else {
        crate::generate::GPU_MAX_PASS_ROWS
    }
}

/// Runs every kind of kernel a forward pass uses once on `device`, at the largest sizes, so
/// that candle's lazily kept device memory is allocated now. A no-op on CPU.
pub fn warm_up(device: &Device) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    exercise(device, WARM_MAX_K, warm_max_rows())
}

fn exercise(device: &Device, max_k: usize, max_rows: usize) -> Result<()> {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let w = Tensor::zeros((32, max_k), DType::F32, device)?;
        let mm = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
        // 1..=8 rows take the matrix-vector kernel, more take the matrix-matrix one; each
        // keeps a workspace that grows with the rows.
        for rows in [8, max_rows] {
            let x = Tensor::zeros((rows, max_k), DType::F32, device)?;
            mm.forward(&x)?;
        }
    }
    // cuBLAS, and the element-wise, reduction, norm and rotary kernels.
    let a = Tensor::ones((4, 8, 64), DType::F32, device)?;
    let s = a.matmul(&a.t()?)?;
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    let _ = p.matmul(&a)?;
    let n = candle_nn::ops::rms_norm(&a, &Tensor::ones(64, DType::F32, device)?, 1e-5)?;
    let cs = Tensor::ones((8, 32), DType::F32, device)?;
    let r = candle_nn::rotary_emb::rope_i(&n.unsqueeze(0)?.contiguous()?, &cs, &cs)?;
    let h = r.to_dtype(DType::F16)?;
    let c = Tensor::cat(&[&h, &h], 2)?.to_dtype(DType::F32)?;
    let _ = (candle_nn::ops::silu(&c)? * &c)?
        .affine(0.5, 1.0)?
        .max(D::Minus1)?;
    // Our own decode-attention kernels (their module is loaded on first use too).
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        crate::cuda::decode_attention::warm_up(device)?;
        crate::cuda::fused_decode::warm_up(device)?;
        crate::cuda::f16_gemm::warm_up(device)?;
    }
    device.synchronize()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_of_the_warm_up_runs() {
        // The shapes and ops are the same on any device; CPU runs them at a small size.
        exercise(&Device::Cpu, 256, 16).expect("warm-up ops");
        warm_up(&Device::Cpu).expect("CPU is a no-op");
    }
}
