//! A prompt chunk's quantized products on f16 tensor cores (`--cuda-gemm`): the weight
//! dequantized to f16 rows by our kernels (`dequant_f16.cu`), the chunk's activations cast
//! to f16, and one cuBLAS `GemmEx` with f32 accumulation writing the f32 result, where
//! candle's `forward_via_f16` casts the output back in a kernel of its own. The f16 copies
//! are stream-ordered buffers from the device's pool, freed as soon as the product is queued,
//! like every other intermediate of the chunk. F16 weights skip the dequantization.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as blas_sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::fused_decode::{bound_stream, input_address};
use super::pdl::{self, arg};
use crate::error::Result;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequant_f16.ptx"));
const MODULE: &str = "llm_cluster_dequant_f16";
const THREADS: u32 = 256;

/// The quantized types our kernels dequantize.
const QUANTIZED: [GgmlDType; 6] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Our dequantization kernel for `dtype`: its name and how many values one thread writes.
fn kernel_for(dtype: GgmlDType) -> Option<(&'static str, usize)> {
    Some(match dtype {
        GgmlDType::Q4_0 => ("dequant_q4_0_f16", 32),
        GgmlDType::Q4_1 => ("dequant_q4_1_f16", 32),
        GgmlDType::Q8_0 => ("dequant_q8_0_f16", 32),
        GgmlDType::Q4K => ("dequant_q4_k_f16", 64),
        GgmlDType::Q5K => ("dequant_q5_k_f16", 64),
        GgmlDType::Q6K => ("dequant_q6_k_f16", 32),
        _ => return None,
    })
}

/// Whether [`product`] takes weights of `dtype`.
pub fn supports(dtype: GgmlDType) -> bool {
    dtype == GgmlDType::F16 || kernel_for(dtype).is_some()
}

/// `x: [n, k]` (f32, CUDA) times `w: [rows, k]` transposed, as `[n, rows]` f32; `None` where
/// this path does not apply (not CUDA f32, a weight type without a kernel here, `k` not a
/// multiple of 8).
pub fn product(w: &QTensor, rows: usize, k: usize, x: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cuda()
        || x.dtype() != candle_core::DType::F32
        || !supports(w.dtype())
        || !k.is_multiple_of(8)
        || x.dims().last() != Some(&k)
        || w.shape().elem_count() != rows * k
    {
        return Ok(None);
    }
    let op = F16Product { w, rows, k };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

/// Loads our kernels and runs a small cuBLAS f16 product once on `device` when the products
/// are on ([`crate::cuda_options::CudaOptions::gemm`]). The kernels cuBLAS picks for a
/// prompt's larger shapes still load on their first use.
pub fn warm_up(device: &candle_core::Device) -> Result<()> {
    if !device.is_cuda() || !crate::cuda_options::get().gemm {
        return Ok(());
    }
    let w = Tensor::zeros((256, 256), candle_core::DType::F32, device)?;
    let x = Tensor::zeros((128, 256), candle_core::DType::F32, device)?;
    for dtype in QUANTIZED {
        let q = QTensor::quantize(&w, dtype)?;
        product(&q, 256, 256, &x)?;
    }
    Ok(())
}

struct F16Product<'a> {
    w: &'a QTensor,
    rows: usize,
    k: usize,
}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("f16 product: {what}: {e:?}"))
}

fn int(what: &str, v: usize) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| err(what, v))
}

/// Launches kernel `name` of `dequant_f16.cu` (arguments: source, destination, thread
/// count) over `threads` threads.
///
/// # Safety
/// `src` and `dst` must hold what the kernel reads and writes for `threads` threads.
unsafe fn launch(
    dev: &candle_core::cuda_backend::CudaDevice,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    name: &str,
    src: u64,
    dst: u64,
    threads: usize,
) -> candle_core::Result<()> {
    let f = dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function();
    let blocks =
        u32::try_from(threads.div_ceil(THREADS as usize)).map_err(|_| err("grid", threads))?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mut src, mut dst, mut count) = (src, dst, threads as u64);
    let mut params = [arg(&mut src), arg(&mut dst), arg(&mut count)];
    // SAFETY: the three arguments match the kernel's signature; the caller vouches for the
    // buffers. The kernels do not wait for their predecessor, so no overlap.
    unsafe { pdl::launch(stream, &f, cfg, &mut params, false) }
}

impl CustomOp1 for F16Product<'_> {
    fn name(&self) -> &'static str {
        "f16-product"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the f16 product runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &xs.device;
        let stream = bound_stream(dev)?;
        let (rows, k) = (self.rows, self.k);
        let n = xl.shape().elem_count() / k;
        let x = input_address(xs, xl, &stream, "f16 product")?;
        // SAFETY (the three allocations): each is written in full by its kernel or by cuBLAS,
        // queued on the same stream, before anything reads it.
        let xh = unsafe { stream.alloc::<u16>(n * k) }.map_err(|e| err("alloc", e))?;
        let out = unsafe { stream.alloc::<f32>(n * rows) }.map_err(|e| err("alloc", e))?;
        // SAFETY: `x` holds `n k` f32 and `xh` (a pool allocation, 16-byte aligned) room for
        // as many f16, 8 a thread; `n k` is a multiple of 8, as `k` is.
        unsafe {
            launch(
                dev,
                &stream,
                "f32_to_f16_x8",
                x,
                xh.device_ptr(&stream).0,
                n * k / 8,
            )
        }?;
        let dequantized = match kernel_for(self.w.dtype()) {
            None => None,
            Some((name, per_thread)) => {
                // SAFETY: see above.
                let wh = unsafe { stream.alloc::<u16>(rows * k) }.map_err(|e| err("alloc", e))?;
                let (src, _g) = self.w.device_ptr_with_guard(&stream)?;
                // SAFETY: `src` holds the weight's `rows k` values in blocks of its type (a
                // whole number of blocks: the element count is checked in `product` and the
                // tensor's own shape is whole blocks), `wh` room for `rows k` f16.
                unsafe {
                    launch(
                        dev,
                        &stream,
                        name,
                        src as u64,
                        wh.device_ptr(&stream).0,
                        rows * k / per_thread,
                    )
                }?;
                Some(wh)
            }
        };
        let w = match &dequantized {
            Some(wh) => wh.device_ptr(&stream).0,
            None => self.w.device_ptr_with_guard(&stream)?.0 as u64,
        };
        let blas = dev.cublas_handle();
        let (alpha, beta) = (1f32, 0f32);
        let o = out.device_ptr(&stream).0;
        let xh_at = xh.device_ptr(&stream).0;
        // Row-major `out[n, rows] = xh[n, k] · w[rows, k]ᵀ` is column-major
        // `out[rows, n] = wᵀ · xh`, with `w` read as a column-major `[k, rows]`.
        // SAFETY: the handle is bound to this device's stream, the one every buffer here is
        // ordered on; the pointers hold the sizes the dimensions say; alpha and beta live
        // across the call.
        unsafe {
            blas::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                int("rows", rows)?,
                int("rows", n)?,
                int("width", k)?,
                (&alpha as *const f32).cast(),
                w as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                int("width", k)?,
                xh_at as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                int("width", k)?,
                (&beta as *const f32).cast(),
                o as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                int("rows", rows)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| err("cuBLAS", e))?;
        // `xh` and the dequantized weight are freed here, ordered after the product
        drop((xh, dequantized));
        let mut shape = xl.shape().dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = rows;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(shape),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    /// Each weight type's f16 product against the same weight dequantized to f32 on the CPU
    /// and multiplied there: the difference is f16 rounding of the activations and weights.
    #[test]
    fn products_match_dequantized_f32() -> Result<()> {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return Ok(());
        };
        let (n, rows, k) = (133, 96, 512);
        let wv: Vec<f32> = (0..rows * k)
            .map(|i| ((i as f32 * 0.731).sin() * 43758.547).fract() * 2.0 - 1.0)
            .collect();
        let xv: Vec<f32> = (0..n * k)
            .map(|i| ((i as f32 * 0.377).sin() * 12345.678).fract() * 4.0 - 2.0)
            .collect();
        let w32 = Tensor::from_vec(wv, (rows, k), &Device::Cpu)?;
        let x_cpu = Tensor::from_vec(xv, (n, k), &Device::Cpu)?;
        let x = x_cpu.to_device(&dev)?;
        for dtype in QUANTIZED.into_iter().chain([GgmlDType::F16]) {
            let q_cpu = QTensor::quantize(&w32, dtype)?;
            let reference = x_cpu.matmul(&q_cpu.dequantize(&Device::Cpu)?.t()?)?;
            let q = QTensor::quantize_onto(&w32, dtype, &dev)?;
            let ours = product(&q, rows, k, &x)?
                .ok_or_else(|| crate::Error::Config(format!("{dtype:?} not taken")))?
                .to_device(&Device::Cpu)?;
            let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = (ours - &reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            eprintln!("{dtype:?}: max difference {diff:.2e} of {scale:.2}");
            assert!(diff <= 2e-3 * scale, "{dtype:?}: {diff} of {scale}");
        }
        // an activation past f16's range is clamped, not made infinite
        let mut big = vec![0f32; n * k];
        big[0] = 1e6;
        let big = Tensor::from_vec(big, (n, k), &dev)?;
        let q = QTensor::quantize_onto(&w32, GgmlDType::Q8_0, &dev)?;
        let y = product(&q, rows, k, &big)?
            .ok_or_else(|| crate::Error::Config("Q8_0 not taken".into()))?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(y.iter().all(|v| v.is_finite()), "an infinite product");
        assert!(
            y[..rows].iter().any(|v| v.abs() > 1000.0),
            "the large row got lost"
        );
        Ok(())
    }
}
