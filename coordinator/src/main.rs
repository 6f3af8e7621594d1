//! `coordinator`: plans a model over shard nodes and serves the OpenAI API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cluster_registry::EtcdTlsArgs;
use cluster_tls::{Dialer, TlsArgs};
use common::telemetry::{Telemetry, TelemetryOptions};
use coordinator::certs_cmd::{self, CertsCommand};
use coordinator::config::{RawServeConfig, Replies};
use coordinator::serve_cmd::{self, cancel_on_signal};
use coordinator::twopc::Failpoint;
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
    Serve(Box<ServeArgs>),
    /// Print the cluster registered in etcd: nodes, addresses, devices, layers, memory per
    /// lease kind, and the epoch.
    Status {
        /// etcd endpoint(s).
        #[arg(long)]
        etcd: String,
        /// The cluster's name.
        #[arg(long, default_value = "llm")]
        cluster: String,
        /// etcd over TLS.
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
        /// Mutual TLS to the nodes (to ask each for its status).
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// List, load, unload or switch the models a coordinator serves (its admin API).
    Models(coordinator::models_cmd::ModelsArgs),
    /// Certificates for mutual TLS: a cluster CA, and certificates for coordinators and nodes.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Probe a coordinator: exit 0 when it answers (the container image's HEALTHCHECK).
    ///
    /// Example: coordinator health http://127.0.0.1:8080/health
    ///          coordinator health tcp://127.0.0.1:8443   (an HTTPS port accepts)
    Health(common::health::HealthArgs),
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
    #[allow(dead_code)] // read by common::config_file::parse, before this struct is made
    /// Read flags from this TOML file: each key is a flag's name without the dashes
    /// (`http = "0.0.0.0:8080"`, `nodes = ["10.0.0.2:7070", "10.0.0.3:7070"]`, `tls-ca = ...`);
    /// a flag given on the command line wins over its key. Examples in cluster-configs/.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// HTTP listen address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// GGUF model file (the nodes must have the same file in their models directory). Give
    /// it more than once to serve several models at once, each on a plan of its own over the
    /// same nodes; requests choose one by `model` (its file name without `.gguf`), and name
    /// none for the first.
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
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
    /// This coordinator's name in the leader election and in decisions.
    #[arg(long)]
    id: Option<String>,
    /// TTL of the leader lease (the election of the coordinator that drives re-plans), in
    /// seconds; at least 2.
    #[arg(long, default_value_t = 5)]
    etcd_ttl_secs: i64,
    /// On ctrl-c or SIGTERM, how long in-flight requests may run on, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Bytes of prompts' keys and values kept on each stage, so that a prompt that begins
    /// like an earlier one (a system prompt, a chat history) reuses them instead of computing
    /// them again; least recently used first out; 0 turns the prefix cache off.
    #[arg(long, default_value_t = coordinator::engine::prefix::DEFAULT_BUDGET)]
    prefix_cache_bytes: u64,
    /// How each step's token comes back from the last stage: `chain` (back through every
    /// stage) or `direct` (the coordinator awaits it on the last stage, one hop: faster for
    /// a single stream, slower so far under many concurrent streams).
    #[arg(long, value_enum, default_value_t = Replies::Chain)]
    replies: Replies,
    /// Export traces over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317` (Jaeger);
    /// wins over `OTEL_EXPORTER_OTLP_ENDPOINT`. Without either, nothing is exported.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Require this API key on `/v1/*` (`Authorization: Bearer KEY`; 401 without it).
    /// Repeat for several.
    #[arg(long, env = "LLMC_API_KEY", value_name = "KEY", hide_env_values = true)]
    api_key: Vec<String>,
    /// Require one of the keys in this file (one per line, `#` comments) on `/v1/*`.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Require this key on `/metrics` (open without it; `/health` is always open).
    #[arg(
        long,
        env = "LLMC_METRICS_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    metrics_key: Option<String>,
    /// Turn the admin API on (`/admin/models`: list, load and unload models at run time;
    /// static membership only), behind this key (`Authorization: Bearer KEY`). Without it the
    /// admin routes do not exist.
    #[arg(
        long,
        env = "LLMC_ADMIN_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    admin_key: Option<String>,
    /// Serve the API over HTTPS with this certificate (PEM; with --http-tls-key).
    #[arg(long, value_name = "FILE")]
    http_tls_cert: Option<PathBuf>,
    /// The HTTPS certificate's key (PEM).
    #[arg(long, value_name = "FILE")]
    http_tls_key: Option<PathBuf>,
    /// Mutual TLS to the nodes.
    #[command(flatten)]
    tls: TlsArgs,
    /// etcd over TLS.
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// Testing only: stop the 2PC driver at this point.
    #[arg(long, hide = true)]
    failpoint: Option<Failpoint>,
}

fn main() -> ExitCode {
    let cli = common::config_file::parse::<Cli>();
    let started = match &cli.command {
        Command::Serve(a) => telemetry(a.id.as_deref(), a.http, a.otlp_endpoint.clone()),
        // its nodes inherit the environment: OTEL_EXPORTER_OTLP_ENDPOINT traces them all
        Command::Up { http, .. } => telemetry(None, *http, None),
        _ => {
            common::telemetry::init_logging();
            Ok(Telemetry::default())
        }
    }
    .and_then(|t| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        Ok((t, rt))
    });
    let (telemetry, rt) = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("coordinator: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(run(cli));
    // the last spans go out before the process ends
    telemetry.shutdown();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logging, and trace export when asked for: named `coordinator`, this one by its id.
fn telemetry(
    id: Option<&str>,
    http: SocketAddr,
    endpoint: Option<String>,
) -> anyhow::Result<Telemetry> {
    let instance = id.map_or_else(
        || format!("coordinator-{}@{http}", std::process::id()),
        str::to_string,
    );
    Ok(common::telemetry::init(&TelemetryOptions {
        service: "coordinator",
        instance,
        endpoint,
    })?)
}

impl From<ServeArgs> for RawServeConfig {
    fn from(a: ServeArgs) -> Self {
        let mut models = a.model.into_iter();
        RawServeConfig {
            http: a.http,
            model: models.next().unwrap_or_default(),
            more_models: models.collect(),
            nodes: a.nodes,
            max_ctx: a.max_ctx,
            etcd: a.etcd,
            cluster: a.cluster,
            min_nodes: a.min_nodes,
            id: a.id,
            etcd_ttl_secs: a.etcd_ttl_secs,
            drain_secs: a.drain_secs,
            prefix_cache_bytes: a.prefix_cache_bytes,
            replies: a.replies,
            failpoint: a.failpoint,
            api_keys: a.api_key,
            api_key_file: a.api_key_file,
            metrics_key: a.metrics_key,
            admin_key: a.admin_key,
            http_tls_cert: a.http_tls_cert,
            http_tls_key: a.http_tls_key,
        }
    }
}

async fn serve(raw: RawServeConfig) -> anyhow::Result<()> {
    let cfg = raw.validate()?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    serve_cmd::run(cfg, shutdown).await?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            // before anything dials a node
            Dialer::new(args.tls.load()?).install()?;
            args.etcd_tls.install()?;
            serve((*args).into()).await
        }
        Command::Certs(c) => {
            print!("{}", certs_cmd::run(c)?);
            Ok(())
        }
        Command::Status {
            etcd,
            cluster,
            etcd_tls,
            tls,
        } => {
            Dialer::new(tls.load()?).install()?;
            etcd_tls.install()?;
            print!("{}", coordinator::status_cmd::run(&etcd, &cluster).await?);
            Ok(())
        }
        Command::Health(h) => Ok(h.run()?),
        Command::Models(m) => {
            print!("{}", coordinator::models_cmd::run(&m)?);
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
            let r = serve(RawServeConfig::over_nodes(
                http,
                model,
                local.addrs.clone(),
                max_ctx,
            ))
            .await;
            drop(local);
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::config::Membership;
    use std::ffi::OsString;

    /// `coordinator serve --config FILE ARGS...` as main parses it.
    fn serve(file: &str, args: &[&str]) -> RawServeConfig {
        let path = format!("{}/../cluster-configs/{file}", env!("CARGO_MANIFEST_DIR"));
        let mut argv: Vec<OsString> = vec!["coordinator".into(), "serve".into(), "--config".into()];
        argv.push(path.into());
        argv.extend(args.iter().map(OsString::from));
        let cli = common::config_file::try_parse_from::<Cli>(argv)
            .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        match cli.command {
            Command::Serve(a) => {
                assert!(a.tls.tls_ca.is_some() || file.starts_with("local/"));
                (*a).into()
            }
            other => panic!("{other:?}"),
        }
    }

    /// The example files in cluster-configs/ load and validate.
    #[test]
    fn example_configs_load() {
        let local = serve("local/coordinator.toml", &[])
            .validate()
            .expect("valid");
        assert_eq!(
            local.membership,
            Membership::Static(vec!["127.0.0.1:7071".into(), "127.0.0.1:7072".into()])
        );
        let c = serve("compose/coordinator.toml", &["--id", "coordinator-2"])
            .validate()
            .expect("valid");
        match c.membership {
            Membership::Etcd {
                id,
                min_nodes,
                ttl_secs,
                ..
            } => assert_eq!((id.as_str(), min_nodes, ttl_secs), ("coordinator-2", 2, 4)),
            other => panic!("{other:?}"),
        }
        // a flag wins: static nodes on the command line conflict with the file's etcd
        let path = format!(
            "{}/../cluster-configs/compose/coordinator.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let argv: Vec<OsString> = ["coordinator", "serve", "--config", &path, "--nodes", "a:1"]
            .iter()
            .map(OsString::from)
            .collect();
        assert!(common::config_file::try_parse_from::<Cli>(argv).is_err());
    }
}
