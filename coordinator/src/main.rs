//! `coordinator`: plans a model over shard nodes and serves the OpenAI API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use common::gguf::GgufFile;
use common::tokenizer::TextTokenizer;
use coordinator::cluster::Cluster;
use coordinator::http::{router, AppState};
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
    Serve {
        /// HTTP listen address; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// GGUF model file (the nodes must have the same file in their models directory).
        #[arg(long)]
        model: PathBuf,
        /// Shard node addresses, first stage first.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Context bound of each session.
        #[arg(long, default_value_t = 2048)]
        max_ctx: usize,
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
        Command::Serve {
            http,
            model,
            nodes,
            max_ctx,
        } => serve(http, model, nodes, max_ctx).await,
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
            let r = serve(http, model, local.addrs.clone(), max_ctx).await;
            drop(local);
            r
        }
    }
}

async fn serve(
    http: SocketAddr,
    model: PathBuf,
    nodes: Vec<String>,
    max_ctx: usize,
) -> anyhow::Result<()> {
    let file = GgufFile::open(&model)?;
    let tok = Arc::new(TextTokenizer::from_gguf(&file)?);
    let max_ctx = max_ctx.min(file.config()?.context_length);
    let cluster = Arc::new(Cluster::start(&nodes, &model, max_ctx, PlanEpoch(1)).await?);
    let shutdown = CancellationToken::new();
    cluster.spawn_heartbeats(shutdown.clone());
    let model_id = model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let state = Arc::new(AppState {
        cluster,
        tok,
        model_id,
        admission: Arc::new(tokio::sync::Semaphore::new(coordinator::MAX_IN_FLIGHT)),
        requests: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(http).await?;
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
