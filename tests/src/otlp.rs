//! A real OTLP trace receiver on port 0, on a thread of its own: what the trace tests point
//! the processes at. It speaks gRPC (opentelemetry-proto's tonic service) or HTTP/protobuf
//! (`POST /v1/traces`, the same messages).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;

#[derive(Debug, Default, Clone)]
struct Store {
    resources: Arc<Mutex<Vec<ResourceSpans>>>,
    exports: Arc<AtomicUsize>,
}

impl Store {
    fn add(&self, r: ExportTraceServiceRequest) {
        self.exports.fetch_add(1, Ordering::Relaxed);
        self.resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(r.resource_spans);
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// `POST /v1/traces` of OTLP/HTTP with a protobuf body.
async fn http_export(
    axum::extract::State(store): axum::extract::State<Store>,
    body: axum::body::Bytes,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    Vec<u8>,
) {
    use prost::Message;
    let ct = [("content-type", "application/x-protobuf")];
    match ExportTraceServiceRequest::decode(body) {
        Ok(r) => {
            store.add(r);
            let reply = ExportTraceServiceResponse {
                partial_success: None,
            };
            (axum::http::StatusCode::OK, ct, reply.encode_to_vec())
        }
        Err(e) => (
            axum::http::StatusCode::BAD_REQUEST,
            ct,
            e.to_string().into_bytes(),
        ),
    }
}

/// One span as received, with the resource that sent it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of its resource.
    pub service: String,
    /// `service.instance.id` of its resource.
    pub instance: String,
    /// The span's name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root).
    pub parent_id: String,
    /// Its attributes, values as text.
    pub attributes: Vec<(String, String)>,
    /// Its events: name and attributes.
    pub events: Vec<(String, Vec<(String, String)>)>,
}

impl ReceivedSpan {
    /// The attribute `key`, as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The receiver; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint`.
    pub endpoint: String,
    store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Starts it on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0")
    }

    /// Starts it on `addr`.
    pub fn start_on(addr: &str) -> anyhow::Result<Self> {
        Self::serve(addr, false)
    }

    /// Starts an OTLP/HTTP (protobuf) receiver on a free port; its `endpoint` is the base
    /// URL (exporters post to `/v1/traces` under it).
    pub fn start_http() -> anyhow::Result<Self> {
        Self::serve("127.0.0.1:0", true)
    }

    fn serve(addr: &str, http: bool) -> anyhow::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", std_listener.local_addr()?);
        let store = Store::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = store.clone();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("otlp receiver: {e}"),
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("otlp receiver: {e}"),
                };
                let stopped = async {
                    let _ = stopped.await;
                };
                let r = if http {
                    let app = axum::Router::new()
                        .route("/v1/traces", axum::routing::post(http_export))
                        .with_state(served);
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(served))
                        .serve_with_incoming_shutdown(incoming, stopped)
                        .await
                        .map_err(|e| e.to_string())
                };
                if let Err(e) = r {
                    eprintln!("otlp receiver: {e}");
                }
            });
        });
        Ok(OtlpReceiver {
            endpoint,
            store,
            stop: Some(stop),
        })
    }

    /// Export calls received so far.
    pub fn exports(&self) -> usize {
        self.store.exports.load(Ordering::Relaxed)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let resources = self
            .store
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Vec::new();
        for r in resources {
            let attrs: Vec<KeyValue> = r.resource.map(|r| r.attributes).unwrap_or_default();
            let get = |k: &str| {
                attrs
                    .iter()
                    .find(|a| a.key == k)
                    .map(text)
                    .unwrap_or_default()
            };
            let (service, instance) = (get("service.name"), get("service.instance.id"));
            for s in r.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    instance: instance.clone(),
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: hex(&s.parent_span_id),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(a)))
                        .collect(),
                    events: s
                        .events
                        .iter()
                        .map(|e| {
                            let a = e.attributes.iter().map(|a| (a.key.clone(), text(a)));
                            (e.name.clone(), a.collect())
                        })
                        .collect(),
                });
            }
        }
        out
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
