//! `shard-node serve`: builds the runtime, handles ctrl-c and SIGTERM, and serves.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::device::{init_threads, DeviceSpec};
use common::telemetry::TelemetryOptions;
use tokio_util::sync::CancellationToken;

use crate::membership::{self, JoinOptions};
use crate::node::{Activations, Node, NodeConfig};
use crate::server::{metrics, relay, serve, Admission, Server};

/// Options of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// Read flags from this TOML file: each key is a flag's name without the dashes
    /// (`listen = "0.0.0.0:7070"`, `device = "cuda:0"`, `tls-ca = "certs/ca.pem"`); a flag
    /// given on the command line wins over its key. Examples in cluster-configs/.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Directory the coordinator's model names are looked up in.
    #[arg(long, default_value = "models")]
    pub models_dir: PathBuf,
    /// Most bytes of weights and caches this node may hold.
    #[arg(long)]
    pub memory_limit: Option<u64>,
    /// Most sessions at once.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// CPU threads for the kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve Prometheus metrics over HTTP here (`GET /metrics`).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Heartbeat interval advertised to clients, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// A lease not renewed for this long is released with everything it holds.
    #[arg(long, default_value_t = 5000)]
    pub lease_ttl_ms: u64,
    /// A session with no step for this long is closed.
    #[arg(long, default_value_t = 300)]
    pub session_idle_secs: u64,
    /// Do not hand freed heap memory back to the OS (to measure what that changes).
    #[arg(long)]
    pub no_malloc_trim: bool,
    /// After a pass, the compute thread polls this long (microseconds) for the next step
    /// before it sleeps, which saves a thread wake-up per step and stage. It keeps a core
    /// busy meanwhile: right for a GPU node on a host with cores to spare, wrong for CPU
    /// stages that share a few cores. Default: 3000 on CUDA, 0 on the CPU.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// Precision of the activations sent on to the next stage: f32 (the default, the output
    /// equals one process's), f16 or bf16 (half the bytes on every hop; the output may differ
    /// slightly, see docs/benchmarks.md). Each stage decides for what it sends.
    #[arg(long, value_enum, default_value_t = Activations::F32)]
    pub activations: Activations,
    /// Shut down once this process is no longer our parent (set by `coordinator up`, so
    /// that its nodes end with it even when it is killed).
    #[arg(long, hide = true)]
    pub parent_pid: Option<u32>,
    /// Export traces over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317` (Jaeger);
    /// wins over `OTEL_EXPORTER_OTLP_ENDPOINT`. Without either, nothing is exported.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Most connections served at once; more are closed on arrival.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Most requests in flight on one connection (a coordinator sends every session's steps
    /// over one); more wait.
    #[arg(long, default_value_t = 1024)]
    pub max_requests_per_connection: usize,
    /// A connection that has not completed its TLS handshake this long after it opened is
    /// closed (milliseconds).
    #[arg(long, default_value_t = 5000)]
    pub tls_handshake_ms: u64,
    /// Mutual TLS on every connection, accepted and made.
    #[command(flatten)]
    pub tls: cluster_tls::TlsArgs,
    /// Joining an etcd cluster.
    #[command(flatten)]
    pub join: JoinOptions,
}

/// `--poll-us` on CUDA when not given: a 2-GPU pipeline's single stream measured 5–15 %
/// faster with it on 2 H200s (docs/benchmarks.md).
const DEFAULT_CUDA_POLL_US: u64 = 3000;

/// Serves until ctrl-c or SIGTERM.
pub fn run(o: ServeOptions) -> anyhow::Result<()> {
    if !o.no_malloc_trim {
        crate::server::trim::configure_allocator();
    }
    // The trace resource names this node: its id, else its advertised address, else the
    // listen address (with the process id when the port is picked at start).
    let instance = o
        .join
        .node_id
        .clone()
        .or_else(|| o.join.advertise.clone())
        .unwrap_or_else(|| match o.listen.port() {
            0 => format!("{}#{}", o.listen, std::process::id()),
            _ => o.listen.to_string(),
        });
    let telemetry = common::telemetry::init(&TelemetryOptions {
        service: "shard-node",
        instance,
        endpoint: o.otlp_endpoint.clone(),
    })?;
    // Every value is checked before the device opens or anything binds.
    let join = o.join.validate()?;
    o.join.etcd_tls.install()?;
    if o.max_connections == 0 || o.max_requests_per_connection == 0 || o.tls_handshake_ms == 0 {
        anyhow::bail!(
            "--max-connections, --max-requests-per-connection and --tls-handshake-ms must be at least 1"
        );
    }
    let identity = o.tls.load()?;
    if let Some(id) = &identity {
        if id.role != cluster_tls::Role::Node {
            anyhow::bail!(
                "--tls-cert is a {} certificate; a node needs one issued with --role node",
                id.role
            );
        }
    }
    let admission = Admission {
        acceptor: cluster_tls::Acceptor::new(
            identity.as_deref(),
            Duration::from_millis(o.tls_handshake_ms),
        ),
        max_connections: o.max_connections,
        max_requests_per_connection: o.max_requests_per_connection,
    };
    if identity.is_none() && !o.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %o.listen,
            "TLS is off on a non-loopback address: anyone who reaches this port can load models, \
             hold memory and read activations; see --tls-ca/--tls-cert/--tls-key"
        );
    }
    cluster_tls::Dialer::new(identity).install()?;
    let cfg = NodeConfig {
        models_dir: o.models_dir,
        device: o.device,
        memory_limit: o.memory_limit,
        max_sessions: o.max_sessions,
        heartbeat_interval: Duration::from_millis(o.heartbeat_ms),
        lease_ttl: Duration::from_millis(o.lease_ttl_ms),
        session_idle: Duration::from_secs(o.session_idle_secs),
        trim: !o.no_malloc_trim,
        poll: Duration::from_micros(o.poll_us.unwrap_or(match o.device {
            DeviceSpec::Cpu => 0,
            DeviceSpec::Cuda(_) => DEFAULT_CUDA_POLL_US,
        })),
        activations: o.activations,
    };
    cfg.validate()?;
    if o.device != DeviceSpec::Cpu {
        tracing::info!(options = ?common::cuda_options::get(), "CUDA kernels");
    }
    init_threads(o.threads)?;
    let device = o.device.open()?;
    // Before the baseline is measured (`Node::new`): what candle keeps for good is allocated
    // now, and counted as the node's own.
    common::warmup::warm_up(&device)?;
    common::memory::release_device_cache(&device);
    // Sessions and slices can be dropped on any runtime thread: each binds the device's
    // context first (see `bind_thread`). Cloned before `Node::new` takes its baseline.
    let bound = device.clone();
    let node = Arc::new(Node::new(cfg, device));
    let (server, onward) = Server::new(node.clone())?;
    let server = Arc::new(server);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || common::device::bind_thread(&bound))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("no SIGTERM handler: {e}");
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            signals.cancel();
        });
        tokio::spawn(relay::run(
            onward,
            server.peers.clone(),
            server.metrics.clone(),
        ));
        if let Some(pid) = o.parent_pid {
            let orphaned = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    if std::os::unix::process::parent_id() != pid {
                        orphaned.cancel();
                        tracing::warn!("parent {pid} is gone; shutting down");
                        break;
                    }
                }
            });
        }
        if let Some(addr) = o.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            tracing::info!(addr = %bound, "metrics listening");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "metrics on {bound}");
            let _ = out.flush();
            let s = server.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let s = s.clone();
                    async move { metrics::render(&s.node, &s.metrics) }
                }),
            );
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::warn!("metrics server: {e}");
                }
            });
        }
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        // Membership runs beside the server; if joining fails, the node shuts down with
        // that error.
        let joined = {
            let (node, stop, metrics) = (node.clone(), shutdown.clone(), server.metrics.clone());
            tokio::spawn(async move {
                let (Ok(bound), Some(join)) = (bound_rx.await, join) else {
                    return Ok(());
                };
                let r = membership::run(node, join, bound, stop.clone(), metrics).await;
                if let Err(e) = &r {
                    tracing::error!("joining the cluster: {e}");
                    stop.cancel();
                }
                r
            })
        };
        serve(server, o.listen, admission, shutdown, |addr| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {addr}");
            let _ = out.flush();
            tracing::info!(%addr, "listening");
            let _ = bound_tx.send(addr);
        })
        .await?;
        joined.await?
    })?;
    // the last spans go out before the process ends
    telemetry.shutdown();
    Ok(())
}
