//! `coordinator`: plans a model over shard nodes and serves the OpenAI API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use cluster_registry::Registry;
use common::gguf::GgufFile;
use common::tokenizer::TextTokenizer;
use coordinator::cluster::{Cluster, ModelRef};
use coordinator::driver::{self, DriverConfig};
use coordinator::follow;
use coordinator::http::{router, AppState};
use coordinator::serving::Serving;
use coordinator::twopc::{Failpoint, TwoPc};
use proto_types::PlanEpoch;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "coordinator",
    version,
    about = "Coordinator of the inference cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Plan the model over the nodes and serve HTTP (prints `listening on ADDR`).
    Serve(ServeArgs),
    /// Print the cluster registered in etcd: nodes, addresses, devices, layers, memory per
    /// lease kind, and the epoch.
    Status {
        /// etcd endpoint(s).
        #[arg(long)]
        etcd: String,
        /// The cluster's name.
        #[arg(long, default_value = "llm")]
        cluster: String,
    },
    /// Start a local cluster: fetch the default model if missing, start shard nodes, serve.
    Up {
        /// Number of shard nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// GGUF model file (default: the default model under models/, fetched if missing).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Kernel threads per node.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Context bound of each session.
        #[arg(long, default_value_t = 2048)]
        max_ctx: usize,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// HTTP listen address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// GGUF model file (the nodes must have the same file in their models directory).
    #[arg(long)]
    model: PathBuf,
    /// Static membership: shard node addresses, first stage first.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    nodes: Vec<String>,
    /// Context bound of each session.
    #[arg(long, default_value_t = 2048)]
    max_ctx: usize,
    /// etcd endpoint(s): membership from etcd, plans applied by two-phase commit.
    #[arg(long)]
    etcd: Option<String>,
    /// The cluster's name in etcd.
    #[arg(long, default_value = "llm")]
    cluster: String,
    /// With etcd: make the first plan once this many nodes have registered.
    #[arg(long, default_value_t = 1)]
    min_nodes: usize,
    /// This coordinator's name in the driver election and in decisions.
    #[arg(long)]
    id: Option<String>,
    /// TTL of the driver election lease, in seconds.
    #[arg(long, default_value_t = 5)]
    etcd_ttl_secs: i64,
    /// Testing only: stop the 2PC driver at this point.
    #[arg(long, hide = true)]
    failpoint: Option<Failpoint>,
}

fn main() -> ExitCode {
    common::telemetry::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordinator: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Status { etcd, cluster } => {
            print!("{}", coordinator::status_cmd::run(&etcd, &cluster).await?);
            Ok(())
        }
        Command::Up {
            nodes,
            http,
            model,
            threads,
            max_ctx,
        } => {
            if nodes == 0 {
                anyhow::bail!("--nodes must be at least 1");
            }
            let model = coordinator::up::ensure_model(model)?;
            let dir = model
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            // Kept alive until serve returns; dropping it kills the nodes.
            let local = coordinator::up::start_nodes(nodes, &dir, threads)?;
            eprintln!(
                "coordinator: started {} shard nodes: {}",
                nodes,
                local.addrs.join(", ")
            );
            let r = serve(ServeArgs {
                http,
                model,
                nodes: local.addrs.clone(),
                max_ctx,
                etcd: None,
                cluster: "llm".into(),
                min_nodes: 1,
                id: None,
                etcd_ttl_secs: 5,
                failpoint: None,
            })
            .await;
            drop(local);
            r
        }
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let file = GgufFile::open(&a.model)?;
    let tok = Arc::new(TextTokenizer::from_gguf(&file)?);
    let max_ctx = a.max_ctx.min(file.config()?.context_length);
    let model = Arc::new(ModelRef::inspect(&a.model)?);
    let shutdown = CancellationToken::new();
    let serving = Arc::new(Serving::default());
    match &a.etcd {
        None => {
            let c = Cluster::start(&a.nodes, model, max_ctx, PlanEpoch(1)).await?;
            serving.replace(Arc::new(c), &shutdown);
        }
        Some(url) => {
            let registry = Registry::connect(url, &a.cluster).await?;
            let who =
                a.id.clone()
                    .unwrap_or_else(|| format!("coordinator-{}@{}", std::process::id(), a.http));
            tokio::spawn(follow::run(
                registry.clone(),
                model.clone(),
                serving.clone(),
                shutdown.clone(),
            ));
            let cfg = DriverConfig {
                twopc: TwoPc {
                    registry,
                    model,
                    max_ctx,
                    who,
                    failpoint: a.failpoint,
                },
                min_nodes: a.min_nodes,
                ttl_secs: a.etcd_ttl_secs.max(2),
            };
            tokio::spawn(driver::run(cfg, serving.clone(), shutdown.clone()));
        }
    }
    let model_id = a
        .model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let state = Arc::new(AppState {
        serving,
        tok,
        model_id,
        admission: Arc::new(tokio::sync::Semaphore::new(coordinator::MAX_IN_FLIGHT)),
        requests: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(a.http).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
