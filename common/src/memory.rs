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
