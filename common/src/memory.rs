//! Memory figures from outside the allocator's bookkeeping: the device's free and total bytes
//! and the process's resident set.

use candle_core::Device;

/// `(free, total)` bytes of `device`: the driver's `mem_get_info` on CUDA; on CPU the host's
/// `MemAvailable` and `MemTotal`. `None` if they cannot be read.
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64)),
        _ => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            Some((kib(&info, "MemAvailable:")?, kib(&info, "MemTotal:")?))
        }
    }
}

/// The device's stream-ordered memory pool: bytes it holds from the driver, and bytes of
/// those that back live buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`.
    pub reserved: u64,
    /// `CU_MEMPOOL_ATTR_USED_MEM_CURRENT`.
    pub used: u64,
}

/// The pool that candle's buffers come from (`cuMemAllocAsync` takes the device's current
/// pool), as `(reserved, used)`. `None` on CPU, or if the driver cannot say.
pub fn pool_usage(device: &Device) -> Option<PoolUsage> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let read = |pool, attr| {
            let mut v: u64 = 0;
            #[allow(unsafe_code)]
            // SAFETY: both attributes are `cuuint64_t`, and `v` is one.
            unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
                .ok()
                .map(|()| v)
        };
        #[allow(unsafe_code)]
        // SAFETY: the device handle comes from the live context.
        let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }.ok()?;
        return Some(PoolUsage {
            reserved: read(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            )?,
            used: read(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            )?,
        });
    }
    let _ = device;
    None
}

/// Hands device memory that is free but cached back to the driver, and returns the pool's
/// usage before and after. A no-op on CPU (`None`).
///
/// On CUDA, candle's buffers come from the device's stream-ordered memory pool
/// (`cuMemAllocAsync`), and a freed buffer stays reserved in that pool (so `nvidia-smi` and
/// `mem_get_info` still count it) until the pool is trimmed. A trim only releases memory
/// whose asynchronous free the host has *observed* complete. candle runs each thread on its
/// own per-thread default stream, so buffers freed on a tokio worker or the compute thread
/// were freed on those threads' streams: synchronizing the calling thread's stream alone
/// observes none of them (measured on an H100: VRAM stayed at its peak). So this
/// synchronizes the whole context, then trims the pool to 0.
pub fn release_device_cache(device: &Device) -> Option<(PoolUsage, PoolUsage)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let ctx = d.cuda_stream().context().clone();
        if let Err(e) = ctx.synchronize() {
            tracing::warn!("synchronizing the device before a pool trim: {e}");
            return None;
        }
        let before = pool_usage(device).unwrap_or_default();
        #[allow(unsafe_code)]
        // SAFETY: the device handle comes from the live context; trimming a pool only returns
        // its unused reservations to the driver (memory in use is never released).
        let trimmed = unsafe {
            result::device::get_mem_pool(ctx.cu_device())
                .and_then(|pool| result::mem_pool::trim_to(pool, 0))
        };
        if let Err(e) = trimmed {
            tracing::warn!("trimming the CUDA memory pool: {e}");
        }
        let after = pool_usage(device).unwrap_or_default();
        if before != after {
            tracing::debug!(
                reserved_before = before.reserved,
                used_before = before.used,
                reserved_after = after.reserved,
                used_after = after.used,
                "device pool trimmed"
            );
        }
        return Some((before, after));
    }
    let _ = device;
    None
}

/// The process's resident set in bytes (`VmRSS`), if it can be read.
pub fn process_rss() -> Option<u64> {
    kib(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmRSS:",
    )
}

/// Bytes in use that this process is answerable for: device bytes in use on CUDA (total
/// less free), the resident set on CPU. 0 if unreadable.
pub fn in_use(device: &Device) -> u64 {
    if device.is_cpu() {
        process_rss().unwrap_or(0)
    } else {
        device_memory(device).map_or(0, |(free, total)| total.saturating_sub(free))
    }
}

/// Device bytes this process keeps between steps outside any session: the buffers of the
/// CUDA decode graphs (`cuda::decode_graph`), which a node frees once no session is left.
/// 0 on CPU and without the `cuda` feature.
pub fn step_scratch_bytes() -> u64 {
    #[cfg(feature = "cuda")]
    return crate::cuda::decode_graph::held_bytes();
    #[cfg(not(feature = "cuda"))]
    0
}

/// A `NAME: N kB` line of a /proc file, in bytes.
fn kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_host() {
        let rss = process_rss().expect("VmRSS");
        assert!(rss > 1 << 20, "{rss}");
        let (free, total) = device_memory(&Device::Cpu).expect("meminfo");
        assert!(free <= total && total > 1 << 30);
        assert_eq!(kib("X:   12 kB\n", "X:"), Some(12 * 1024));
    }
}
