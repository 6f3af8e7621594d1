//! Giving freed heap memory back to the OS.
//!
//! glibc's malloc keeps freed blocks below its mmap threshold (128 KiB, and it rises
//! dynamically up to 32 MiB after large frees) in its arenas. A KV cache chunk of one layer is
//! ~100 KiB, so a closed session's cache stays resident in the process even though nothing
//! uses it, the host-side twin of a caching allocator pinning its peak. `malloc_trim(0)`
//! returns the free pages of every arena to the OS; the node calls it (from its reaper, at
//! most a few times a second) after anything was freed. docs/memory.md has the measurements.
#![allow(unsafe_code)]

/// Fixes glibc's thresholds at start-up (call before any thread starts): allocations of
/// 128 KiB and more are mapped on their own and unmapped when freed, and a heap whose free
/// top grows past 512 KiB is shrunk on the spot. glibc otherwise raises both thresholds
/// after the first large free (up to 32 and 64 MiB), and `malloc_trim` never shrinks the
/// top of a thread's arena, so a burst of sessions left ~45 MiB resident for good (measured:
/// docs/memory.md). One arena: with one per thread (up to 8 per core), and even with two, a
/// model load's many small allocations landed in a different arena from one load to the
/// next, and the pages their neighbours pinned moved the resident set up and down by 5 to
/// 9 MiB between loads of the same model (measured: docs/memory.md, "Model switches"). Small
/// allocations take glibc's per-thread cache first, so the one arena's lock is rarely
/// contended.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called once, at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns free heap pages to the OS (glibc); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it has no
    // preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
