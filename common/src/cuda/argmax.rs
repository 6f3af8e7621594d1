//! Greedy picks on the GPU (kernel in `argmax.cu`): the first largest logit of each row, so
//! that a greedy decode step copies one u32 a session to the host instead of its row of
//! logits, and the host scans nothing. [`crate::sampling::argmax`] is the same pick on the
//! host, for rows already there.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::fused_decode::{bound_stream, err, input_address};
use super::pdl::{self, arg};
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"));
const MODULE: &str = "llm_cluster_argmax";

/// The index of the first largest value of each row of `logits: [n, vocab]` f32, computed
/// where the logits are: `None` unless they are on a CUDA device. A row holding a NaN is an
/// error, as [`crate::sampling::Sampler::sample`] makes it.
pub fn rows(logits: &Tensor) -> Result<Option<Vec<u32>>> {
    if !matches!(logits.device(), Device::Cuda(_)) || logits.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, vocab) = logits.dims2()?;
    if n == 0 || vocab == 0 || i32::try_from(vocab).is_err() {
        return Err(Error::InvalidInput(format!(
            "argmax of {n} rows of {vocab} logits"
        )));
    }
    let picks = logits
        .contiguous()?
        .apply_op1_no_bwd(&ArgmaxRows)?
        .to_vec1::<u32>()?;
    if picks.contains(&u32::MAX) {
        return Err(Error::InvalidInput("logits contain NaN".into()));
    }
    Ok(Some(picks))
}

struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("argmax rows: CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &xs.device;
        let stream = bound_stream(dev)?;
        let (n, vocab) = xl.shape().dims2()?;
        let mut x = input_address(xs, xl, &stream, "argmax rows")?;
        // SAFETY: the kernel writes every entry.
        let out = unsafe { stream.alloc::<u32>(n) }.map_err(|e| err("alloc", e))?;
        let mut outp = out.device_ptr(&stream).0;
        let mut vocab_i = vocab as i32;
        let f = dev
            .get_or_load_custom_func("argmax_rows", MODULE, PTX)?
            .into_cuda_function();
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x holds n contiguous rows of vocab f32 (checked by the caller and the
        // layout above), out n u32; launched the ordinary way (the kernel does not wait).
        unsafe {
            pdl::launch(
                &stream,
                &f,
                cfg,
                &mut [arg(&mut x), arg(&mut outp), arg(&mut vocab_i)],
                false,
            )
        }
        .map_err(|e| err("argmax_rows", e))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(n),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::argmax;

    /// The GPU's picks equal the host's on rows with a unique largest value, ties (the first
    /// wins), a row of -inf, values only at the end; a row with a NaN is an error. Needs a GPU:
    /// run the test binary of a `cuda` build on the GPU machine.
    #[test]
    fn matches_host_argmax() -> Result<()> {
        let dev = Device::new_cuda(0)?;
        let vocab = 49152;
        let mut data: Vec<Vec<f32>> = (0..5)
            .map(|r| {
                (0..vocab)
                    .map(|i| ((i as f32) * 0.731 + r as f32).sin() * 10.0)
                    .collect()
            })
            .collect();
        data[1][17] = 50.0;
        data[1][40000] = 50.0;
        data[1][3] = 50.0;
        data[2].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        data[3].iter_mut().for_each(|v| *v = -1.0);
        data[3][vocab - 1] = 0.0;
        data[4][1025] = 20.0;
        data[4][2049] = 20.0;
        let flat: Vec<f32> = data.concat();
        let t = Tensor::from_vec(flat, (data.len(), vocab), &dev)?;
        let got = rows_of(&t)?;
        let want: Vec<u32> = data.iter().map(|r| argmax(r)).collect();
        assert_eq!(got, want);
        assert_eq!(want[1], 3);
        let mut bad = data[0].clone();
        bad[99] = f32::NAN;
        let t = Tensor::from_vec(bad, (1, vocab), &dev)?;
        assert!(rows(&t).is_err(), "a NaN row is an error");
        Ok(())
    }

    fn rows_of(t: &Tensor) -> Result<Vec<u32>> {
        rows(t)?.ok_or_else(|| Error::InvalidInput("not taken on CUDA".into()))
    }
}
