//! Programmatic dependent launch (sm_90 and later): a kernel launched with [`launch`] and
//! `overlap` may start before the kernel before it on the stream has finished, once that one
//! has signalled (`pdl_trigger` in `q8_1.cuh`); it must wait (`pdl_wait`) before it reads that
//! kernel's output or writes anything. cudarc's launch builder sets no launch attributes, so
//! this calls `cuLaunchKernelEx` itself.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};

/// Whether launches may overlap the kernel before: the PTX was built for sm_90 or later, where
/// the kernels hold their waits (the driver loads such PTX only on those GPUs), and
/// [`crate::cuda_options::CudaOptions::pdl`] is on.
pub(crate) fn enabled() -> bool {
    static SM90: OnceLock<bool> = OnceLock::new();
    *SM90.get_or_init(|| env!("LLMC_CUDA_PTX_ARCH").parse::<u32>().unwrap_or(0) >= 90)
        && crate::cuda_options::get().pdl
}

/// Launches `f` on `stream` with `params` (one pointer to each argument's value), overlapping
/// the kernel before when `overlap` and [`enabled`].
///
/// # Safety
/// `params` must point at values of the kernel's argument types, in order, and the kernel must
/// be safe to run with them; with `overlap`, it must wait (`pdl_wait`) in every thread before
/// it reads the previous kernel's output or writes anything.
pub(crate) unsafe fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
    overlap: bool,
) -> candle_core::Result<()> {
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let on = overlap && enabled();
    let c = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: if on { &mut attr } else { std::ptr::null_mut() },
        numAttrs: u32::from(on),
    };
    // SAFETY: `params` points at the kernel's arguments, alive for the call (the driver copies
    // them); `c` and `attr` are alive too.
    let r = unsafe {
        sys::cuLaunchKernelEx(
            &c,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("launch: {r:?}");
    }
    Ok(())
}

/// A kernel argument as `launch` takes it.
pub(crate) fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast::<c_void>()
}
