//! [`DeviceSpec`]: where a stage runs, as given on the command line (`cpu`, `cuda:N`).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// A device name, parsed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| Error::Config(format!("device `{s}` is not `cpu` or `cuda:N`"))),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Config(format!(
                        "device cuda:{n}: this binary was built without the `cuda` feature"
                    )));
                }
                Ok(Device::new_cuda(n)?)
            }
        }
    }
}

/// Stops candle from recording CUDA events on each buffer it creates from now on (a no-op on
/// CPU). Each buffer otherwise carries two events that every kernel launch records and every
/// use waits on.
///
/// # Safety
/// Buffers created afterwards carry no cross-stream ordering. candle runs each thread on its
/// own per-thread stream, so the caller must create, use and free them on one thread (or
/// synchronize between threads itself).
#[allow(unsafe_code)]
pub unsafe fn disable_event_tracking(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: passed on to the caller (see above).
        unsafe { d.disable_event_tracking() }
    }
    let _ = device;
}

/// Makes `device`'s CUDA context current on the calling thread (a no-op on CPU or if it
/// already is). cudarc frees a buffer and records its events without binding the context
/// first, and a driver call on a thread with no current context fails with
/// `CUDA_ERROR_INVALID_CONTEXT`; cudarc keeps that error in the context and hands it to the
/// next caller on any thread, so one session dropped on an unbound tokio thread failed some
/// other request's forward pass. Threads that may drop device buffers call this first.
pub fn bind_thread(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let ctx = d.cuda_stream().context().cu_ctx();
        if result::ctx::get_current().ok().flatten() != Some(ctx) {
            #[allow(unsafe_code)]
            // SAFETY: the context is alive: `d` holds it. Not `bind_to_thread`, which would
            // first take (and clear) an error recorded elsewhere.
            let _ = unsafe { result::ctx::set_current(ctx) };
        }
    }
    let _ = device;
}

/// How many handles refer to `device`'s CUDA stream: every clone of the device, every buffer
/// on it, and the BLAS and RNG handles candle keeps. `None` on CPU. Two readings equal
/// means nothing was created or dropped on the device in between.
pub fn cuda_handles(device: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // `cuda_stream` hands out one more clone, which is not counted.
        return Some(std::sync::Arc::strong_count(&d.cuda_stream()) - 1);
    }
    let _ = device;
    None
}

/// Sets the size of the CPU thread pool used by the kernels (call once, early).
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 {
        return Err(Error::Config("threads must be at least 1".into()));
    }
    // An error here means rayon's pool (used by candle's own CPU ops) was already built.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(crate::kernels::pool::init(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cpu));
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>().ok(),
            Some(DeviceSpec::Cuda(3))
        );
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
