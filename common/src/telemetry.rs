//! Logging set-up shared by the binaries.

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
///
/// A closed stderr (the process that started us is gone, say) must not disturb the process:
/// tracing-subscriber would otherwise report the failed write with `eprintln!`, which panics
/// on a broken pipe and takes down whatever task was logging.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
}
