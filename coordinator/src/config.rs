//! `coordinator serve`'s configuration: [`RawServeConfig`] as given (flags), checked by
//! [`RawServeConfig::validate`] into a typed [`ServeConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{CoordError, Result};
use crate::twopc::Failpoint;

/// The configuration as given.
#[derive(Debug, Clone)]
pub struct RawServeConfig {
    /// HTTP listen address.
    pub http: SocketAddr,
    /// GGUF model file (the default model).
    pub model: PathBuf,
    /// More models served beside it (static membership only).
    pub more_models: Vec<PathBuf>,
    /// Static membership: node addresses, first stage first.
    pub nodes: Vec<String>,
    /// Context bound of each session.
    pub max_ctx: usize,
    /// etcd endpoint(s).
    pub etcd: Option<String>,
    /// The cluster's name in etcd.
    pub cluster: String,
    /// With etcd: plan once this many nodes are registered.
    pub min_nodes: usize,
    /// The name in the leader election and in decisions.
    pub id: Option<String>,
    /// TTL of the leader lease, in seconds.
    pub etcd_ttl_secs: i64,
    /// How long in-flight requests may run on after ctrl-c or SIGTERM, in seconds.
    pub drain_secs: u64,
    /// Bytes of prompts' KV caches kept on each stage for prompts to come (0: none).
    pub prefix_cache_bytes: u64,
    /// How each step's token comes back from the last stage.
    pub replies: Replies,
    /// Testing only: stop the 2PC driver at this point.
    pub failpoint: Option<Failpoint>,
    /// API keys given on the command line.
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` comments and blank lines skipped).
    pub api_key_file: Option<PathBuf>,
    /// The key `/metrics` needs (none: open).
    pub metrics_key: Option<String>,
    /// The key `/admin/*` needs (none: the admin API is off).
    pub admin_key: Option<String>,
    /// The API's certificate (PEM): HTTPS with `http_tls_key`.
    pub http_tls_cert: Option<PathBuf>,
    /// Its key (PEM).
    pub http_tls_key: Option<PathBuf>,
}

/// How a step's sampled token reaches the coordinator from the last stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Replies {
    /// Straight from the last stage: the coordinator awaits it there (`collect`) while the
    /// step goes down the chain, one hop instead of one per stage. Faster for one stream
    /// (5–10 % on two nodes sharing an H100); with 16 streams on 3 CPU stages it cost a third
    /// of the throughput (docs/benchmarks.md), so it is not the default yet.
    Direct,
    /// Back along the chain, through every stage.
    #[default]
    Chain,
}

/// Where the nodes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// A fixed list, first stage first.
    Static(Vec<String>),
    /// Nodes registered in etcd; plans applied by two-phase commit.
    Etcd {
        /// etcd endpoint(s), comma-separated.
        url: String,
        /// The cluster's name.
        cluster: String,
        /// Plan once this many nodes are registered.
        min_nodes: usize,
        /// This coordinator's name in the election and in decisions.
        id: String,
        /// TTL of the leader lease.
        ttl_secs: i64,
    },
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTP listen address.
    pub http: SocketAddr,
    /// GGUF model file (the default model).
    pub model: PathBuf,
    /// More models served beside it, each on a plan of its own over the same nodes.
    pub more_models: Vec<PathBuf>,
    /// Context bound of each session (at most the model's, applied at start).
    pub max_ctx: usize,
    /// Where the nodes come from.
    pub membership: Membership,
    /// Bytes of prompts' KV caches kept on each stage (0: no prefix cache).
    pub prefix_cache_bytes: u64,
    /// How each step's token comes back from the last stage.
    pub replies: Replies,
    /// How long in-flight requests may run on after a shutdown signal.
    pub drain: Duration,
    /// Testing only.
    pub failpoint: Option<Failpoint>,
    /// The keys `/v1/*` accepts (empty: open).
    pub api_keys: Vec<String>,
    /// The keys `/metrics` accepts (empty: open).
    pub metrics_keys: Vec<String>,
    /// The key `/admin/*` needs (none: the admin API is off).
    pub admin_key: Option<String>,
    /// HTTPS, when configured.
    pub http_tls: Option<std::sync::Arc<cluster_tls::tokio_rustls::rustls::ServerConfig>>,
}

fn bad(msg: String) -> CoordError {
    CoordError::Config(msg)
}

impl RawServeConfig {
    /// Static membership over `nodes`, every other value its default (what `coordinator up`
    /// serves).
    pub fn over_nodes(
        http: SocketAddr,
        model: PathBuf,
        nodes: Vec<String>,
        max_ctx: usize,
    ) -> Self {
        RawServeConfig {
            http,
            model,
            more_models: Vec::new(),
            nodes,
            max_ctx,
            etcd: None,
            cluster: "llm".into(),
            min_nodes: 1,
            id: None,
            etcd_ttl_secs: 5,
            drain_secs: 30,
            prefix_cache_bytes: crate::engine::prefix::DEFAULT_BUDGET,
            replies: Replies::Chain,
            failpoint: None,
            api_keys: Vec::new(),
            api_key_file: None,
            metrics_key: None,
            admin_key: None,
            http_tls_cert: None,
            http_tls_key: None,
        }
    }

    /// Checks every value.
    pub fn validate(self) -> Result<ServeConfig> {
        if self.max_ctx == 0 {
            return Err(bad("--max-ctx must be at least 1".into()));
        }
        let membership = match self.etcd {
            None => {
                if self.nodes.is_empty() || self.nodes.iter().any(|n| n.trim().is_empty()) {
                    return Err(bad(
                        "--nodes needs at least one address (HOST:PORT,...), or use --etcd".into(),
                    ));
                }
                Membership::Static(self.nodes)
            }
            Some(url) => {
                if !self.nodes.is_empty() {
                    return Err(bad("--nodes and --etcd exclude each other".into()));
                }
                if !cluster_registry::valid_name(&self.cluster) {
                    return Err(bad(format!(
                        "--cluster `{}`: use letters, digits, '-', '_', '.' or ':'",
                        self.cluster
                    )));
                }
                if self.min_nodes == 0 {
                    return Err(bad("--min-nodes must be at least 1".into()));
                }
                if self.etcd_ttl_secs < cluster_registry::MIN_TTL_SECS {
                    return Err(bad(format!(
                        "--etcd-ttl-secs must be at least {}",
                        cluster_registry::MIN_TTL_SECS
                    )));
                }
                let id = self
                    .id
                    .unwrap_or_else(|| format!("coordinator-{}@{}", std::process::id(), self.http));
                Membership::Etcd {
                    url,
                    cluster: self.cluster,
                    min_nodes: self.min_nodes,
                    id,
                    ttl_secs: self.etcd_ttl_secs,
                }
            }
        };
        let mut api_keys = self.api_keys;
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("--api-key-file {}: {e}", path.display())))?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if api_keys.is_empty() {
                return Err(bad(format!(
                    "--api-key-file {}: no keys in it (one per line)",
                    path.display()
                )));
            }
        }
        for k in api_keys
            .iter()
            .chain(&self.metrics_key)
            .chain(&self.admin_key)
        {
            check_key(k)?;
        }
        let http_tls = match (&self.http_tls_cert, &self.http_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                Some(cluster_tls::http_server(cert, key).map_err(|e| bad(format!("HTTPS: {e}")))?)
            }
            _ => {
                return Err(bad(
                    "HTTPS needs --http-tls-cert and --http-tls-key together".into(),
                ))
            }
        };
        let id = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned());
        let mut ids = vec![id(&self.model)];
        for m in &self.more_models {
            if matches!(membership, Membership::Etcd { .. }) {
                return Err(bad(
                    "several models are served with static membership (--nodes) only, so far"
                        .into(),
                ));
            }
            if ids.contains(&id(m)) {
                return Err(bad(format!(
                    "--model {} is given twice (models are named by their file name)",
                    m.display()
                )));
            }
            ids.push(id(m));
        }
        Ok(ServeConfig {
            http: self.http,
            model: self.model,
            more_models: self.more_models,
            max_ctx: self.max_ctx,
            membership,
            drain: Duration::from_secs(self.drain_secs),
            prefix_cache_bytes: self.prefix_cache_bytes,
            replies: self.replies,
            failpoint: self.failpoint,
            api_keys,
            metrics_keys: self.metrics_key.into_iter().collect(),
            admin_key: self.admin_key,
            http_tls,
        })
    }
}

/// A key must be usable in an `Authorization: Bearer` header and long enough not to guess.
fn check_key(k: &str) -> Result<()> {
    if k.len() < 16 || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "an API key needs at least 16 characters, printable ASCII without spaces".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawServeConfig {
        RawServeConfig::over_nodes(
            "127.0.0.1:0".parse().expect("addr"),
            "m.gguf".into(),
            vec!["127.0.0.1:7001".into()],
            2048,
        )
    }

    fn etcd() -> RawServeConfig {
        RawServeConfig {
            nodes: vec![],
            etcd: Some("http://127.0.0.1:2379".into()),
            id: Some("c1".into()),
            ..raw()
        }
    }

    #[test]
    fn api_keys_from_flags_and_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys");
        std::fs::write(
            &file,
            "# team keys\nsk-file-key-0000001\n\n  sk-file-key-0000002  \n",
        )
        .expect("write");
        let c = RawServeConfig {
            api_keys: vec!["sk-flag-key-000000".into()],
            api_key_file: Some(file.clone()),
            metrics_key: Some("metrics-key-000001".into()),
            ..raw()
        }
        .validate()
        .expect("valid");
        assert_eq!(
            c.api_keys,
            [
                "sk-flag-key-000000",
                "sk-file-key-0000001",
                "sk-file-key-0000002"
            ]
        );
        assert_eq!(c.metrics_keys, ["metrics-key-000001"]);
        refused(
            RawServeConfig {
                api_keys: vec!["short".into()],
                ..raw()
            },
            "16 characters",
        );
        std::fs::write(&file, "# nothing\n").expect("write");
        refused(
            RawServeConfig {
                api_key_file: Some(file),
                ..raw()
            },
            "no keys",
        );
        refused(
            RawServeConfig {
                api_key_file: Some(dir.path().join("missing")),
                ..raw()
            },
            "--api-key-file",
        );
    }

    fn refused(r: RawServeConfig, what: &str) {
        match r.validate() {
            Err(CoordError::Config(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a refusal naming {what}, got {other:?}"),
        }
    }

    #[test]
    fn valid_configs_become_typed() {
        let c = raw().validate().expect("static");
        assert_eq!(
            c.membership,
            Membership::Static(vec!["127.0.0.1:7001".into()])
        );
        assert_eq!(c.drain, Duration::from_secs(30));
        let c = etcd().validate().expect("etcd");
        assert!(matches!(c.membership, Membership::Etcd { ttl_secs: 5, ref id, .. } if id == "c1"));
    }

    #[test]
    fn invalid_values_are_refused_with_the_flag_to_fix() {
        refused(
            RawServeConfig {
                max_ctx: 0,
                ..raw()
            },
            "--max-ctx",
        );
        refused(
            RawServeConfig {
                nodes: vec![],
                ..raw()
            },
            "--nodes",
        );
        refused(
            RawServeConfig {
                nodes: vec![" ".into()],
                ..raw()
            },
            "--nodes",
        );
        refused(
            RawServeConfig {
                nodes: vec!["a:1".into()],
                ..etcd()
            },
            "exclude",
        );
        refused(
            RawServeConfig {
                min_nodes: 0,
                ..etcd()
            },
            "--min-nodes",
        );
        refused(
            RawServeConfig {
                cluster: "a/b".into(),
                ..etcd()
            },
            "--cluster",
        );
        // the same floor as the shard node's --etcd-ttl-secs
        refused(
            RawServeConfig {
                etcd_ttl_secs: cluster_registry::MIN_TTL_SECS - 1,
                ..etcd()
            },
            "--etcd-ttl-secs",
        );
    }
}
