//! The gated activation of a fused `[gate | up]` projection in one kernel (`gate_mul.cu`):
//! `act(gate) * up` straight from the product's rows, where candle's ops run the activation
//! and then a product that reads `up` through a strided view. Prompt chunks take it (decode
//! steps have their own fused kernel). On by default; `--cuda-gate off` (or
//! `LLMC_CUDA_GATE=0`) goes back to candle's ops.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::decode_attention::address_of;
use super::fused_decode::bound_stream;
use super::pdl::{self, arg};
use crate::error::Result;
use crate::gguf::Activation;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gate_mul.ptx"));
const MODULE: &str = "llm_cluster_gate_mul";
const THREADS: u32 = 256;

/// Whether the kernel is on ([`crate::cuda_options::CudaOptions::gate`]).
pub fn enabled() -> bool {
    crate::cuda_options::get().gate
}

/// `act(y[:, ..w]) * y[:, w..]` of `y: [n, 2 w]` (f32 on a CUDA device), as `[n, w]`; `None`
/// where it does not apply (not CUDA f32, or not `2 w` wide). The caller asks [`enabled`]
/// first, before it computes `y`.
pub fn gate_mul(y: &Tensor, w: usize, act: Activation) -> Result<Option<Tensor>> {
    if !y.device().is_cuda() || y.dtype() != DType::F32 || y.dims2()?.1 != 2 * w || w == 0 {
        return Ok(None);
    }
    let op = GateMul { w, act };
    Ok(Some(y.contiguous()?.apply_op1_no_bwd(&op)?))
}

struct GateMul {
    w: usize,
    act: Activation,
}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("gate_mul: {what}: {e:?}"))
}

impl CustomOp1 for GateMul {
    fn name(&self) -> &'static str {
        "gate-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("gate_mul runs on CUDA only")
    }

    fn cuda_fwd(&self, ys: &CudaStorage, yl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &ys.device;
        let stream = bound_stream(dev)?;
        let (n, _) = yl.shape().dims2()?;
        let (y, y_stride) = address_of::<f32>(ys, yl, &stream)?;
        // SAFETY: the kernel writes every value of it before anything reads it.
        let out = unsafe { stream.alloc::<f32>(n * self.w) }.map_err(|e| err("alloc", e))?;
        let f = dev
            .get_or_load_custom_func("gate_mul_rows", MODULE, PTX)?
            .into_cuda_function();
        let rows = u32::try_from(n).map_err(|_| err("rows", n))?;
        let cfg = LaunchConfig {
            grid_dim: ((self.w as u32).div_ceil(THREADS), rows, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let (o, _g) = out.device_ptr(&stream);
            let (mut y, mut y_stride, mut o) = (y, y_stride, o);
            let mut w = i32::try_from(self.w).map_err(|_| err("width", self.w))?;
            let mut gelu = i32::from(self.act == Activation::GeluTanh);
            let mut params = [
                arg(&mut y),
                arg(&mut y_stride),
                arg(&mut o),
                arg(&mut w),
                arg(&mut gelu),
            ];
            // SAFETY: the arguments match the kernel's signature; `y` holds `n` rows of
            // `2 w` f32 `y_stride` apart and `out` `n` rows of `w`. The kernel does not wait
            // for its predecessor, so it is launched without overlap.
            unsafe { pdl::launch(&stream, &f, cfg, &mut params, false) }
                .map_err(|e| err("launch", e))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, self.w)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The kernel against candle's ops on the two halves, for both activations.
    #[test]
    fn kernel_matches_candle_ops() -> Result<()> {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return Ok(());
        };
        let (n, w) = (37, 1000);
        let v: Vec<f32> = (0..n * 2 * w)
            .map(|i| ((i as f32 * 0.7310).sin() * 43758.547).fract() * 8.0 - 4.0)
            .collect();
        let y = Tensor::from_vec(v, (n, 2 * w), &dev)?;
        let (g, u) = (y.narrow(1, 0, w)?, y.narrow(1, w, w)?);
        for act in [Activation::Silu, Activation::GeluTanh] {
            let ours =
                gate_mul(&y, w, act)?.ok_or_else(|| crate::Error::Config("not taken".into()))?;
            let theirs = crate::model::host_rows::gate_mul(&g, &u, act)?;
            let diff = (ours - theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            eprintln!("{act:?}: max difference {diff:.2e}");
            assert!(diff <= 1e-5, "{act:?}: {diff}");
        }
        Ok(())
    }
}
