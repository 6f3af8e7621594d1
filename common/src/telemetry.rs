//! Logging and trace export, set up once by each binary.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). Spans are exported over OTLP
//! (gRPC, or HTTP/protobuf when `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`) only when an endpoint is configured: `--otlp-endpoint URL` (the flag wins), else
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. Without one there is no exporter, no connection and no
//! OpenTelemetry layer at all. The exporter's layer has its own level filter (`info`, or
//! `OTEL_LOG_FILTER`), so a quiet `RUST_LOG` does not drop tarpc's spans. The standard
//! variables apply as the SDK reads them: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and its argument, `OTEL_BSP_*` (the export queue is bounded).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Set once spans are exported.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The name of the span under which the trace exporter records nothing (see
/// [`untraced_span`]).
pub const UNTRACED: &str = "untraced";

/// A span whose work the traces leave out (the decode steps between traced ones, lease
/// heartbeats): the exporter's layer takes no span or event made under it, so a tarpc call
/// made inside sends the trace context it is given as it is (the caller marks it
/// unsampled, and the processes downstream leave the work out too). The span itself is
/// the exporter's one cost, and it is dropped unsampled. Without export: no span at all.
///
/// (Running the work under `tracing`'s `NoSubscriber` instead costs far more: every poll
/// that switches the default dispatcher rebuilds the interest of every callsite.)
pub fn untraced_span() -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("untraced");
    #[cfg(feature = "otlp")]
    {
        use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
        use opentelemetry_sdk::trace::IdGenerator;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let ids = opentelemetry_sdk::trace::RandomIdGenerator::default();
        let off = SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(off));
    }
    span
}

/// Marks a tarpc call's context as one that no trace records (a lease heartbeat, a decode
/// step left out): its trace, or a fresh one outside any request, unsampled, so that no node
/// records it either. Make the call inside [`unrecorded`]. Without export, nothing changes.
#[cfg(feature = "otlp")]
pub fn untraced(mut c: tarpc::context::Context) -> tarpc::context::Context {
    use opentelemetry_sdk::trace::IdGenerator;
    if exporting() {
        let t = &mut c.trace_context;
        if t.trace_id.is_none() {
            let ids = opentelemetry_sdk::trace::RandomIdGenerator::default();
            t.trace_id = ids.new_trace_id().into();
            t.span_id = ids.new_span_id().into();
        }
        t.sampling_decision = tarpc::trace::SamplingDecision::Unsampled;
    }
    c
}

thread_local! {
    /// Whether the tarpc request a server is about to start came with a trace that left it
    /// out (see [`note_rpc`]).
    static RPC_UNSAMPLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tells the exporter's layer about the tarpc request that the server's channel is about to
/// start on this thread: `unsampled` when its caller traces the request but left this call
/// out (a decode step between traced ones, a heartbeat). tarpc makes its server span in the
/// same poll that read the request, so the layer then skips that span entirely instead of
/// building it for the sampler to drop. Call it from the server transport's stream, on
/// every request.
pub fn note_rpc(unsampled: bool) {
    RPC_UNSAMPLED.set(unsampled);
}

/// Whether `meta` is tarpc's server span of a request noted unsampled by [`note_rpc`].
#[cfg(feature = "otlp")]
fn unsampled_rpc(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span()
        && meta.name() == "RPC"
        && meta.target().starts_with("tarpc::server")
        && RPC_UNSAMPLED.get()
}

/// Awaits `f` under an [`untraced_span`]; its tarpc calls take an [`untraced`] context.
pub async fn unrecorded<F: std::future::Future>(f: F) -> F::Output {
    use tracing::Instrument;
    f.instrument(untraced_span()).await
}

/// One decode step in this many is traced in full (the coordinator's call, every stage's
/// RPC, pass and relay); the others run unsampled, so that a long stream's trace stays
/// readable and cheap. Prefill chunks are always traced.
pub const DECODE_TRACE_EVERY: u32 = 32;

/// Whether the decode step at position `start` is one traced in full (see
/// [`DECODE_TRACE_EVERY`]).
pub fn traced_step(start: usize) -> bool {
    (start as u32).is_multiple_of(DECODE_TRACE_EVERY)
}

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

/// The target of events meant for traces (what a lease freed, a session's close): the stderr
/// log leaves them out unless `RUST_LOG` names this target.
pub const SPAN_EVENT: &str = "span_event";

fn log_filter() -> tracing_subscriber::EnvFilter {
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut f =
        tracing_subscriber::EnvFilter::try_new(if env.trim().is_empty() { "info" } else { &env })
            .unwrap_or_else(|_| "info".into());
    if !env.contains(SPAN_EVENT) {
        if let Ok(d) = format!("{SPAN_EVENT}=off").parse() {
            f = f.add_directive(d);
        }
    }
    f
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

    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    let http = match protocol.trim() {
        "" | "grpc" => false,
        "http/protobuf" => true,
        other => {
            return Err(Error::Config(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other}: use grpc (the default) or http/protobuf"
            )))
        }
    };
    // gRPC's connection lives on a runtime of the exporter's own; the HTTP client (blocking,
    // called from the batch processor's thread) needs none.
    let mut runtime = None;
    let exporter = if http {
        // The base endpoint gets the signal's path; the traces-only variable is taken as is.
        let url = if o.endpoint.is_none()
            && std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_ok()
        {
            endpoint.clone()
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        };
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("a runtime for the trace exporter: {e}")))?;
        let built = {
            let _inside = rt.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
        };
        runtime = Some(rt);
        built
    }
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
    // nothing under an `untraced` span reaches the exporter (see `untraced_span`), nor the
    // server span of a call its caller left out (see `note_rpc`)
    let untraced = tracing_subscriber::filter::DynFilterFn::new(
        |meta: &tracing::Metadata<'_>, cx: &tracing_subscriber::layer::Context<'_, _>| {
            !unsampled_rpc(meta)
                && cx
                    .lookup_current()
                    .is_none_or(|s| s.scope().all(|a| a.name() != UNTRACED))
        },
    );
    let otel_filter = std::env::var("OTEL_LOG_FILTER")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| "info".into());
    // Without a hint of its own the dynamic filter would lift the process's most verbose
    // level to TRACE (a combination of filters takes the loosest hint), and every `debug!`
    // and `trace!` of every crate would then be looked up at each call instead of being
    // skipped by one comparison.
    let untraced = untraced.with_max_level_hint(
        tracing_subscriber::layer::Filter::<tracing_subscriber::Registry>::max_level_hint(
            &otel_filter,
        )
        .unwrap_or(tracing::level_filters::LevelFilter::TRACE),
    );
    tracing_subscriber::registry()
        .with(log_layer().with_filter(log_filter()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // Nothing of ours reads OpenTelemetry's thread-local current context (the
                // spans' contexts are read from the spans), and busy/idle times are not worth
                // a clock read on every poll: both off, so entering a span costs nothing.
                .with_context_activation(false)
                .with_tracked_inactivity(false)
                .with_filter(tracing_subscriber::filter::FilterExt::and(
                    otel_filter,
                    untraced,
                )),
        )
        .try_init()
        .map_err(|e| Error::Config(format!("installing the trace exporter: {e}")))?;
    tracing::info!(
        endpoint,
        protocol = if http { "http/protobuf" } else { "grpc" },
        service = o.service,
        instance = o.instance,
        "exporting traces"
    );
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
        runtime,
    })
}
