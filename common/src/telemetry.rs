//! Logging and trace export, set up once by each binary.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). Spans are exported over OTLP
//! (gRPC) only when an endpoint is configured: `--otlp-endpoint URL` (the flag wins), else
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. Without one there is no exporter, no connection and no
//! OpenTelemetry layer at all. The exporter's layer has its own level filter (`info`, or
//! `OTEL_LOG_FILTER`), so a quiet `RUST_LOG` does not drop tarpc's spans. The standard
//! variables apply as the SDK reads them: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and its argument, `OTEL_BSP_*` (the export queue is bounded).

use crate::error::{Error, Result};

/// One decode step in this many is traced in full (the coordinator's call, every stage's
/// RPC, pass and relay); the others run unsampled, so that a long stream's trace stays
/// readable and cheap. Prefill chunks are always traced.
pub const DECODE_TRACE_EVERY: u32 = 32;

/// What a process's traces are named by.
#[derive(Debug, Clone, Default)]
pub struct TelemetryOptions {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise (`coordinator`, `shard-node`).
    pub service: &'static str,
    /// `service.instance.id`: which node or coordinator this is.
    pub instance: String,
    /// `--otlp-endpoint`, which wins over `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
}

impl TelemetryOptions {
    /// The endpoint in force: the flag, else the standard variable; `None`: export is off.
    pub fn endpoint(&self) -> Option<String> {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty())
    }
}

/// Installed telemetry; flushes and shuts the exporter down when dropped (or on
/// [`Telemetry::shutdown`]), so that the last request's spans arrive.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// The exporter's own runtime (its gRPC connection lives there), apart from the process's.
    #[cfg(feature = "otlp")]
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.provider.is_some()
        }
        #[cfg(not(feature = "otlp"))]
        false
    }

    /// Flushes what is queued and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                tracing::warn!("flushing traces at exit: {e}");
            }
            // after the flush: the last export went out through it
            if let Some(rt) = self.runtime.take() {
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

/// The stderr layer.
///
/// A closed stderr (the process that started us is gone, say) must not disturb the process:
/// tracing-subscriber would otherwise report the failed write with `eprintln!`, which panics
/// on a broken pipe and takes down whatever task was logging.
fn log_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
}

/// Logs to stderr only (commands that export no traces).
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let _ = tracing_subscriber::registry()
        .with(log_layer().with_filter(log_filter()))
        .try_init();
}

/// Logging, plus span export when an endpoint is configured (on a runtime of its own, so it
/// may be called first thing, before the process's runtime exists).
pub fn init(o: &TelemetryOptions) -> Result<Telemetry> {
    let Some(endpoint) = o.endpoint() else {
        init_logging();
        return Ok(Telemetry::default());
    };
    export(o, endpoint)
}

#[cfg(not(feature = "otlp"))]
fn export(_: &TelemetryOptions, endpoint: String) -> Result<Telemetry> {
    Err(Error::Config(format!(
        "an OTLP endpoint ({endpoint}) is set, but this build has no trace export (feature `otlp`)"
    )))
}

#[cfg(feature = "otlp")]
fn export(o: &TelemetryOptions, endpoint: String) -> Result<Telemetry> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::prelude::*;

    let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default();
    if !protocol.is_empty() && protocol != "grpc" {
        return Err(Error::Config(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: this build exports over grpc only"
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("a runtime for the trace exporter: {e}")))?;
    let _inside = runtime.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| Error::Config(format!("OTLP exporter for {endpoint}: {e}")))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(o.service);
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.instance.id", o.instance.clone()))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer(o.service);
    let otel_filter = std::env::var("OTEL_LOG_FILTER")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::registry()
        .with(log_layer().with_filter(log_filter()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(otel_filter),
        )
        .try_init()
        .map_err(|e| Error::Config(format!("installing the trace exporter: {e}")))?;
    tracing::info!(
        endpoint,
        service = o.service,
        instance = o.instance,
        "exporting traces"
    );
    drop(_inside);
    Ok(Telemetry {
        provider: Some(provider),
        runtime: Some(runtime),
    })
}
