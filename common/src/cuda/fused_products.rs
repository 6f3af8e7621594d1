//! The quantized products of a fused decode step ([`super::fused_decode`]): a weight's
//! addresses and kernels, and how a step's products run. Up to [`MMVQ_MAX_BATCH`] rows go
//! through a matrix-vector kernel (ours from `matvec.rs` where the weight's type and width
//! take it, else candle's mmvq, called through `candle_kernels::ffi`) reading Q8_1 rows the
//! step's other kernels wrote; more rows go through candle's mmq, which quantizes f32 rows
//! itself.
#![allow(unsafe_code)]

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::quantized::GgmlDType;

use super::fused_decode::padded;
use super::matvec::{MatvecFuncs, MatvecType, Q8_1_BYTES};
use crate::error::{Error, Result};

/// The most rows one mmvq launch takes; larger steps launch it per chunk.
pub(crate) const MMVQ_MAX_BATCH: usize = 8;

/// candle's launcher of an mmvq kernel with f32 output.
type Mmvq = unsafe extern "C" fn(
    *const c_void,
    *const c_void,
    *mut c_void,
    i32,
    i32,
    i32,
    i32,
    i32,
    *mut c_void,
);

fn mmvq_for(t: GgmlDType) -> Option<Mmvq> {
    use candle_core::cuda_backend::kernels::ffi;
    let f: Mmvq = match t {
        GgmlDType::Q4_0 => ffi::launch_mmvq_gguf_q4_0_f32_plain,
        GgmlDType::Q4_1 => ffi::launch_mmvq_gguf_q4_1_f32_plain,
        GgmlDType::Q5_0 => ffi::launch_mmvq_gguf_q5_0_f32_plain,
        GgmlDType::Q5_1 => ffi::launch_mmvq_gguf_q5_1_f32_plain,
        GgmlDType::Q8_0 => ffi::launch_mmvq_gguf_q8_0_f32_plain,
        GgmlDType::Q2K => ffi::launch_mmvq_gguf_q2_k_f32_plain,
        GgmlDType::Q3K => ffi::launch_mmvq_gguf_q3_k_f32_plain,
        GgmlDType::Q4K => ffi::launch_mmvq_gguf_q4_k_f32_plain,
        GgmlDType::Q5K => ffi::launch_mmvq_gguf_q5_k_f32_plain,
        GgmlDType::Q6K => ffi::launch_mmvq_gguf_q6_k_f32_plain,
        _ => return None,
    };
    Some(f)
}

/// candle's launcher of mmq's activation quantizer.
type MmqQuantize = unsafe extern "C" fn(
    *const c_void,
    *const i32,
    *mut c_void,
    i32,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    *mut c_void,
);

/// candle's launcher of an mmq kernel.
type MmqLaunch = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    *const c_void,
    *mut c_void,
    i64,
    i64,
    i64,
    i64,
    i64,
    i32,
    i32,
    i64,
    i32,
    *mut c_void,
);

/// The mmq kernel of a weight type, the quantizer of the layout it reads, and its block size.
#[derive(Clone, Copy)]
struct Mmq {
    quantize: MmqQuantize,
    launch: MmqLaunch,
    qk: usize,
}

fn mmq_for(t: GgmlDType) -> Option<Mmq> {
    use candle_core::cuda_backend::kernels::ffi;
    // The activation layouts and block sizes candle's `fast_mmq` pairs with each type.
    let (d4, ds4, d2s6): (MmqQuantize, MmqQuantize, MmqQuantize) = (
        ffi::launch_mmq_quantize_q8_1_D4,
        ffi::launch_mmq_quantize_q8_1_DS4,
        ffi::launch_mmq_quantize_q8_1_D2S6,
    );
    let (quantize, launch, qk): (MmqQuantize, MmqLaunch, usize) = match t {
        GgmlDType::Q4_0 => (ds4, ffi::launch_mmq_gguf_q4_0, 32),
        GgmlDType::Q4_1 => (ds4, ffi::launch_mmq_gguf_q4_1, 32),
        GgmlDType::Q5_0 => (d4, ffi::launch_mmq_gguf_q5_0, 32),
        GgmlDType::Q5_1 => (ds4, ffi::launch_mmq_gguf_q5_1, 32),
        GgmlDType::Q8_0 => (d4, ffi::launch_mmq_gguf_q8_0, 32),
        GgmlDType::Q2K => (d2s6, ffi::launch_mmq_gguf_q2_k, 256),
        GgmlDType::Q3K => (d4, ffi::launch_mmq_gguf_q3_k, 256),
        GgmlDType::Q4K => (ds4, ffi::launch_mmq_gguf_q4_k, 256),
        GgmlDType::Q5K => (ds4, ffi::launch_mmq_gguf_q5_k, 256),
        GgmlDType::Q6K => (d4, ffi::launch_mmq_gguf_q6_k, 256),
        _ => return None,
    };
    Some(Mmq {
        quantize,
        launch,
        qk,
    })
}

/// A quantized weight as the kernels take it.
#[derive(Clone, Copy)]
pub(crate) struct Weight {
    ptr: u64,
    mmvq: Mmvq,
    mmq: Mmq,
    /// Our matrix-vector kernels' type, where they take this weight (else candle's mmvq).
    pub(crate) own: Option<MatvecType>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl Weight {
    /// What a captured launch of this weight's product bakes in: its address, shape and
    /// kernels.
    pub(crate) fn signature(&self) -> [u64; 5] {
        [
            self.ptr,
            self.rows as u64,
            self.cols as u64,
            self.mmvq as usize as u64,
            self.own.map_or(0, |t| t as u64 + 1),
        ]
    }

    pub(crate) fn of(
        l: &crate::model::linear::QLinear,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        let w = l.weight();
        let (Some(mmvq), Some(mmq)) = (mmvq_for(w.dtype()), mmq_for(w.dtype())) else {
            return Ok(None);
        };
        if l.out_features() != rows || l.in_features() != cols {
            return Err(Error::InvalidInput(format!(
                "fused decode: a weight of [{}, {}], expected [{rows}, {cols}]",
                l.out_features(),
                l.in_features()
            )));
        }
        let ptr = w.device_ptr()? as u64;
        Ok(Some(Weight {
            ptr,
            mmvq,
            mmq,
            own: MatvecType::of(w.dtype(), cols, ptr),
            rows,
            cols,
        }))
    }
}

/// The device's figures candle's mmq launchers take.
#[derive(Clone, Copy)]
pub(crate) struct DeviceInfo {
    pub(crate) cc: i32,
    pub(crate) nsm: i32,
    pub(crate) smpbo: i64,
    pub(crate) warp_size: i32,
}

impl DeviceInfo {
    pub(crate) fn of(stream: &CudaStream) -> Self {
        use candle_core::cuda_backend::cudarc::driver::{result, sys::CUdevice_attribute as A};
        let d = stream.context().cu_device();
        // SAFETY: plain attribute queries of a live device.
        let get = |a, or: i32| unsafe { result::device::get_attribute(d, a) }.unwrap_or(or);
        DeviceInfo {
            cc: get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 8) * 100
                + get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0) * 10,
            nsm: get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 1),
            smpbo: i64::from(get(
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                49152,
            )),
            warp_size: get(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
        }
    }
}

/// mmq's quantized activations: rows padded to a multiple of 512 (and of 128), 144 bytes per
/// 128 values, plus room for one more tile.
pub(crate) fn mmq_scratch_bytes(n: usize, k: usize) -> usize {
    (n * padded(k) / 128 + 128) * 144
}

/// How a step's products run: up to [`MMVQ_MAX_BATCH`] rows through mmvq, reading Q8_1
/// written by our kernels; more through mmq, which reads f32 and quantizes it itself.
pub(crate) enum Products {
    Mmvq {
        /// `[n, padded(kmax) / 32]` Q8_1 blocks.
        xq: u64,
        /// Our kernels for `n` rows, where some weight takes them.
        own: Option<MatvecFuncs>,
    },
    Mmq {
        /// `[n, kmax]` f32 activations.
        act: u64,
        /// mmq's quantized activations.
        scratch: u64,
        /// mmq's stream-k fixup buffer.
        fixup: u64,
        info: DeviceInfo,
    },
}

impl Products {
    /// `out = w · x` for the `n` rows produced for this product. For mmq, `x` is the f32 input
    /// (`[n, w.cols]`, contiguous); for mmvq, the Q8_1 rows already written.
    ///
    /// # Safety
    /// The buffers must hold `n` rows of their widths and `out` room for `n` rows of
    /// `out_stride` f32 (this product writes the first `w.rows` of each).
    pub(crate) unsafe fn matvec(
        &self,
        w: &Weight,
        x: u64,
        out: u64,
        out_stride: usize,
        n: usize,
        stream: &CudaStream,
    ) -> candle_core::Result<()> {
        let s = stream.cu_stream() as *mut c_void;
        match self {
            Products::Mmvq { xq, own } => {
                let blocks_per_row = padded(w.cols) / 32;
                if let (Some(t), Some(f)) = (w.own, own) {
                    // SAFETY: n <= MAX_COLS rows of padded Q8_1 (16-byte aligned, 16 blocks
                    // a padding unit), `out` as above, `t` from `MatvecType::of` for `w`.
                    return unsafe {
                        f.launch(
                            stream,
                            t,
                            w.ptr,
                            *xq,
                            out,
                            (w.rows, w.cols),
                            (blocks_per_row, out_stride),
                        )
                    };
                }
                let mut at = 0;
                while at < n {
                    let b = (n - at).min(MMVQ_MAX_BATCH);
                    let y = xq + (at * blocks_per_row * Q8_1_BYTES) as u64;
                    let dst = out + (at * out_stride * 4) as u64;
                    // SAFETY: candle's launcher, with the arguments its own fast path passes.
                    unsafe {
                        (w.mmvq)(
                            w.ptr as *const c_void,
                            y as *const c_void,
                            dst as *mut c_void,
                            w.cols as i32,
                            w.rows as i32,
                            blocks_per_row as i32,
                            out_stride as i32,
                            b as i32,
                            s,
                        );
                    }
                    at += b;
                }
            }
            Products::Mmq {
                scratch,
                fixup,
                info,
                ..
            } => {
                let k = w.cols as i64;
                // SAFETY: candle's launchers, with the arguments its own fast path passes.
                unsafe {
                    (w.mmq.quantize)(
                        x as *const c_void,
                        std::ptr::null(),
                        *scratch as *mut c_void,
                        0,
                        k,
                        k,
                        0,
                        0,
                        padded(w.cols) as i64,
                        n as i64,
                        1,
                        1,
                        s,
                    );
                    (w.mmq.launch)(
                        *fixup as *mut c_void,
                        w.ptr as *const c_void,
                        *scratch as *const c_void,
                        out as *mut c_void,
                        k,
                        w.rows as i64,
                        n as i64,
                        (w.cols / w.mmq.qk) as i64,
                        out_stride as i64,
                        info.cc,
                        info.nsm,
                        info.smpbo,
                        info.warp_size,
                        s,
                    );
                }
            }
        }
        Ok(())
    }
}
