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

/// Hands device memory that is free but cached back to the driver. On CUDA, candle's buffers
/// come from the device's stream-ordered memory pool (`cuMemAllocAsync`), and a freed buffer
/// stays in that pool (so `nvidia-smi` and `mem_get_info` still count it) until the pool is
/// trimmed: this waits for the stream, then trims the default pool to 0. A no-op on CPU.
pub fn release_device_cache(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let stream = d.cuda_stream();
        if let Err(e) = stream.synchronize() {
            tracing::warn!("synchronizing before a pool trim: {e}");
            return;
        }
        let ctx = stream.context();
        if ctx.bind_to_thread().is_err() {
            return;
        }
        #[allow(unsafe_code)]
        // SAFETY: the device handle comes from the live context; trimming a pool only returns
        // its unused reservations to the driver (memory in use is never released).
        let trimmed = unsafe {
            result::device::get_default_mem_pool(ctx.cu_device())
                .and_then(|pool| result::mem_pool::trim_to(pool, 0))
        };
        if let Err(e) = trimmed {
            tracing::warn!("trimming the CUDA memory pool: {e}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
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
