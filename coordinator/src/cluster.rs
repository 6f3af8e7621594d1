//! [`Cluster`]: the connected shard nodes, the plan they serve, and their heartbeats.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::gguf::GgufFile;
use common::model::LayerRange;
use proto_types::*;
use tarpc::context::Context;
use tokio_util::sync::CancellationToken;

use crate::error::{CoordError, Result};
use crate::plan;

/// A live connection to a node: the client and the coordinator's lease on it.
#[derive(Debug, Clone)]
struct Link {
    client: ShardNodeClient,
    lease: LeaseId,
}

/// One node of the plan. Its link is dropped when the node stops answering and restored,
/// slice reloaded, once it is back.
#[derive(Debug)]
pub struct StageNode {
    /// Its address.
    pub addr: String,
    /// Its device.
    pub device: String,
    /// Blocks it holds.
    pub range: LayerRange,
    /// Bytes of its weights.
    pub weight_bytes: u64,
    link: RwLock<Option<Link>>,
}

impl StageNode {
    /// The client, or `NodeDown` while the node is away.
    pub fn client(&self) -> Result<ShardNodeClient> {
        self.link()
            .map(|l| l.client)
            .ok_or_else(|| CoordError::NodeDown {
                addr: self.addr.clone(),
                detail: "not connected; reconnecting".into(),
            })
    }

    /// Whether the node is connected.
    pub fn is_up(&self) -> bool {
        self.link().is_some()
    }

    fn link(&self) -> Option<Link> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_link(&self, l: Option<Link>) {
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = l;
    }
}

/// What every node is asked to load: the model file by name and hash.
#[derive(Debug, Clone)]
struct ModelRef {
    name: String,
    sha256: String,
}

/// The nodes serving one plan epoch, first stage first.
#[derive(Debug)]
pub struct Cluster {
    /// The stages.
    pub nodes: Vec<StageNode>,
    /// The plan epoch.
    pub epoch: PlanEpoch,
    /// Context bound of every session.
    pub max_ctx: usize,
    /// How often leases are renewed: the shortest interval the nodes asked for.
    pub heartbeat: Duration,
    model: ModelRef,
}

/// A context with a deadline `secs` from now.
pub fn ctx(secs: u64) -> Context {
    let mut c = tarpc::context::current();
    c.deadline = Instant::now() + Duration::from_secs(secs);
    c
}

/// Connects and handshakes.
pub async fn connect(addr: &str) -> Result<(ShardNodeClient, HelloAck)> {
    proto_types::connect(addr, "coordinator", Duration::from_secs(5))
        .await
        .map_err(|e| match e {
            ConnectError::Refused(err) => CoordError::Shard {
                addr: addr.to_string(),
                err,
            },
            ConnectError::Transport(detail) => CoordError::NodeDown {
                addr: addr.to_string(),
                detail,
            },
        })
}

/// Maps an RPC outcome to the coordinator's error.
pub fn rpc<T>(
    addr: &str,
    r: std::result::Result<std::result::Result<T, ShardError>, tarpc::client::RpcError>,
) -> Result<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(CoordError::Shard {
            addr: addr.to_string(),
            err,
        }),
        Err(e) => Err(CoordError::NodeDown {
            addr: addr.to_string(),
            detail: e.to_string(),
        }),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Per-layer weight bytes, and the embedding and head bytes, from the file's descriptors.
fn layer_bytes(file: &GgufFile) -> Result<(Vec<u64>, u64, u64)> {
    let n = file.config()?.n_layers;
    let mut layers = vec![0u64; n];
    for t in file.tensors() {
        if let Some(i) = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            if let Some(l) = layers.get_mut(i) {
                *l += t.nbytes;
            }
        }
    }
    let size = |name: &str| file.tensor(name).map_or(0, |t| t.nbytes);
    let embd = size("token_embd.weight");
    let head = size("output_norm.weight") + file.tensor("output.weight").map_or(embd, |t| t.nbytes);
    Ok((layers, embd, head))
}

impl Cluster {
    /// Connects to `addrs`, plans the model over them by free memory, and loads the slices.
    pub async fn start(
        addrs: &[String],
        model: &Path,
        max_ctx: usize,
        epoch: PlanEpoch,
    ) -> Result<Self> {
        let file = GgufFile::open(model)?;
        let cfg = file.config()?;
        let name = model
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CoordError::BadRequest(format!("{} has no file name", model.display())))?
            .to_string();
        let sha = sha256_file(model)?;
        let mut conns = Vec::new();
        let mut heartbeat = Duration::from_secs(1);
        for addr in addrs {
            let (client, ack) = connect(addr).await?;
            let d = client
                .describe(ctx(10))
                .await
                .map_err(|e| CoordError::NodeDown {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
            heartbeat = heartbeat.min(Duration::from_millis(ack.heartbeat_interval_ms.max(10)));
            conns.push((addr.clone(), client, ack.lease, d));
        }
        let (layers, embd, head) = layer_bytes(&file)?;
        let free: Vec<u64> = conns.iter().map(|c| c.3.free_bytes).collect();
        let ranges = plan::split(&layers, &free, embd, head)?;
        tracing::info!(?ranges, n_layers = cfg.n_layers, "plan");
        let model = ModelRef { name, sha256: sha };
        let mut nodes = Vec::new();
        for ((addr, client, lease, d), range) in conns.into_iter().zip(ranges) {
            let info = load(&addr, &client, &model, range, epoch, max_ctx).await?;
            nodes.push(StageNode {
                addr,
                device: d.device,
                range,
                weight_bytes: info.weight_bytes,
                link: RwLock::new(Some(Link { client, lease })),
            });
        }
        Ok(Cluster {
            nodes,
            epoch,
            max_ctx,
            heartbeat,
            model,
        })
    }

    /// Watches every node until `stop`: renews its lease each [`Cluster::heartbeat`]; when it stops
    /// answering, marks it down (requests then fail fast with 503) and keeps trying to
    /// reconnect; once it is back, reloads its slice and marks it up.
    pub fn spawn_heartbeats(self: &Arc<Self>, stop: CancellationToken) {
        let interval = self.heartbeat;
        for i in 0..self.nodes.len() {
            let c = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    c.watch(i).await;
                }
            });
        }
    }

    async fn watch(&self, i: usize) {
        let n = &self.nodes[i];
        match n.link() {
            Some(l) => match l.client.heartbeat(ctx(2), l.lease).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.code != ErrorCode::UnknownLease => {
                    tracing::warn!(addr = %n.addr, "heartbeat: {e}")
                }
                r => {
                    let why = match r {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(addr = %n.addr, "node down: {why}");
                    n.set_link(None);
                }
            },
            None => match self.reattach(n).await {
                Ok(()) => {
                    tracing::info!(addr = %n.addr, layers = %n.range, "node back, slice reloaded")
                }
                Err(e) => tracing::debug!(addr = %n.addr, "still down: {e}"),
            },
        }
    }

    async fn reattach(&self, n: &StageNode) -> Result<()> {
        let (client, ack) = connect(&n.addr).await?;
        load(
            &n.addr,
            &client,
            &self.model,
            n.range,
            self.epoch,
            self.max_ctx,
        )
        .await?;
        n.set_link(Some(Link {
            client,
            lease: ack.lease,
        }));
        Ok(())
    }
}

async fn load(
    addr: &str,
    client: &ShardNodeClient,
    model: &ModelRef,
    range: LayerRange,
    epoch: PlanEpoch,
    max_ctx: usize,
) -> Result<SliceInfo> {
    let req = LoadSlice {
        model: model.name.clone(),
        sha256: model.sha256.clone(),
        layers: WireLayerRange {
            start: range.start(),
            end: range.end(),
        },
        epoch,
        max_ctx: max_ctx as u32,
    };
    rpc(addr, client.load_slice(ctx(600), req).await)
}
