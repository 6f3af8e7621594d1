//! [`Cluster`]: the connected shard nodes, the plan they serve, and their heartbeats.

use std::path::Path;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use common::gguf::GgufFile;
use common::model::LayerRange;
use proto_types::registry::{PlanRecord, StageRecord};
use proto_types::*;
use tarpc::context::Context;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{CoordError, Result};
use crate::plan;
use crate::timeouts::TIMEOUTS;

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
    /// Its id in etcd (clusters with static membership have none).
    pub id: Option<String>,
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

/// The model every node is asked to load: the file by name and hash, and what the planner
/// needs to know of it.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// File name (no path).
    pub name: String,
    /// sha256, hex.
    pub sha256: String,
    /// Weight bytes of each layer.
    pub layer_bytes: Vec<u64>,
    /// Bytes the first stage holds besides its layers (the embedding).
    pub first_extra: u64,
    /// Bytes the last stage holds besides its layers (norm and head).
    pub last_extra: u64,
    /// Width of the activations between stages (the model's hidden size).
    pub hidden: usize,
    /// Served beside other models: its slices retire only older slices of the same model
    /// (see [`LoadSlice::beside`]).
    pub beside: bool,
}

impl ModelRef {
    /// Reads the file's descriptors and hashes it.
    pub fn inspect(model: &Path) -> Result<Self> {
        let file = GgufFile::open(model)?;
        let name = model
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CoordError::BadRequest(format!("{} has no file name", model.display())))?
            .to_string();
        let (layer_bytes, first_extra, last_extra) = layer_bytes(&file)?;
        Ok(ModelRef {
            name,
            sha256: common::gguf::sha256(model)?,
            layer_bytes,
            first_extra,
            last_extra,
            hidden: file.config()?.hidden,
            beside: false,
        })
    }

    /// Splits the layers over nodes that can hold `capacity` bytes each.
    pub fn split(&self, capacity: &[u64]) -> Result<Vec<LayerRange>> {
        plan::split(
            &self.layer_bytes,
            capacity,
            self.first_extra,
            self.last_extra,
        )
    }
}

/// A handshaken connection to a node, before it is given a stage.
#[derive(Debug)]
pub struct NodeConn {
    /// Its id in etcd, if any.
    pub id: Option<String>,
    /// Its address.
    pub addr: String,
    /// The client.
    pub client: ShardNodeClient,
    /// The coordinator's lease on it.
    pub lease: LeaseId,
    /// The heartbeat interval it asked for.
    pub heartbeat: Duration,
    /// What it is and has.
    pub desc: NodeDescription,
}

impl NodeConn {
    /// Connects, handshakes and asks the node to describe itself.
    pub async fn open(id: Option<String>, addr: &str) -> Result<Self> {
        let (client, ack) = connect(addr).await?;
        let desc =
            client
                .describe(ctx(TIMEOUTS.describe))
                .await
                .map_err(|e| CoordError::NodeDown {
                    addr: addr.to_string(),
                    detail: e.to_string(),
                })?;
        Ok(NodeConn {
            id,
            addr: addr.to_string(),
            client,
            lease: ack.lease,
            heartbeat: Duration::from_millis(ack.heartbeat_interval_ms.max(10)),
            desc,
        })
    }

    /// Renews this connection's lease until the returned guard drops (see [`keep_alive`]).
    pub fn keep_alive(&self) -> DropGuard {
        keep_alive(&self.client, self.lease, self.heartbeat)
    }

    /// What the node could hold once a new plan commits: its free bytes plus those of the
    /// slice it serves now.
    pub fn capacity(&self) -> u64 {
        self.desc.free_bytes.saturating_add(self.desc.serving_bytes)
    }

    /// The [`LoadSlice`] of `range` for `epoch`.
    pub fn load_req(
        model: &ModelRef,
        range: LayerRange,
        epoch: PlanEpoch,
        max_ctx: usize,
    ) -> LoadSlice {
        LoadSlice {
            model: model.name.clone(),
            sha256: model.sha256.clone(),
            layers: WireLayerRange {
                start: range.start(),
                end: range.end(),
            },
            epoch,
            max_ctx: max_ctx as u32,
            beside: model.beside,
        }
    }
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
    /// The model.
    pub model: Arc<ModelRef>,
    /// Prompts' KV caches kept on its stages.
    pub prefix: crate::engine::PrefixCache,
}

/// A context with a deadline `within` from now (see [`TIMEOUTS`]).
pub fn ctx(within: Duration) -> Context {
    let mut c = tarpc::context::current();
    c.deadline = Instant::now() + within;
    c
}

/// A context like [`ctx`] for a call that no trace records (a lease heartbeat, a decode step
/// left out); make the call inside [`untraced`].
pub fn untraced_ctx(within: Duration) -> Context {
    common::telemetry::untraced(ctx(within))
}

pub use common::telemetry::unrecorded as untraced;

/// Connects and handshakes.
pub async fn connect(addr: &str) -> Result<(ShardNodeClient, HelloAck)> {
    cluster_tls::Dialer::global()
        .connect(addr, "coordinator", TIMEOUTS.connect)
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

/// Renews `lease` every `every` until the returned guard drops. A lease is only renewed by
/// the cluster's heartbeats once its slice is loaded, and loading a large model (hashing and
/// uploading gigabytes) outlasts the node's lease TTL by far: without this, the node released
/// the lease, with the half-loaded slice, before the load returned.
pub fn keep_alive(client: &ShardNodeClient, lease: LeaseId, every: Duration) -> DropGuard {
    let stop = CancellationToken::new();
    let (client, done) = (client.clone(), stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the handshake just renewed it
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = tick.tick() => {}
            }
            // A failure here shows up as the load's own error; nothing to do but try again.
            let _ = untraced(client.heartbeat(untraced_ctx(TIMEOUTS.heartbeat), lease)).await;
        }
    });
    stop.drop_guard()
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

/// `chunk`, cut so that a pass of it and 256 decode rows of `hidden`-wide activations fits a
/// frame between stages ([`proto_types::rows_per_frame`]).
fn frame_capped(chunk: usize, hidden: usize) -> usize {
    chunk
        .min(proto_types::rows_per_frame(hidden).saturating_sub(256))
        .max(1)
}

impl Cluster {
    /// Prompt tokens a prefill step takes: longer chunks when every stage is on a GPU
    /// ([`common::generate::prefill_chunk`]), short enough that a node's pass (the chunk and
    /// 256 decode steps beside it) goes on to the next stage in one frame.
    pub fn prefill_chunk(&self) -> usize {
        let chunk = common::generate::prefill_chunk(
            self.nodes.iter().map(|n| n.device.starts_with("cuda")),
        );
        frame_capped(chunk, self.model.hidden)
    }

    /// The cluster of connected nodes given their stages (their slices loaded or committed).
    pub fn assemble(
        stages: Vec<(NodeConn, LayerRange, SliceInfo)>,
        model: Arc<ModelRef>,
        max_ctx: usize,
        epoch: PlanEpoch,
    ) -> Self {
        let heartbeat = stages
            .iter()
            .map(|s| s.0.heartbeat)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let nodes = stages
            .into_iter()
            .map(|(c, range, info)| StageNode {
                id: c.id,
                addr: c.addr,
                device: c.desc.device,
                range,
                weight_bytes: info.weight_bytes,
                link: RwLock::new(Some(Link {
                    client: c.client,
                    lease: c.lease,
                })),
            })
            .collect();
        Cluster {
            nodes,
            epoch,
            max_ctx,
            heartbeat,
            model,
            prefix: Default::default(),
        }
    }

    /// Static membership: connects to `addrs`, plans the model over them by free memory, and
    /// loads the slices.
    pub async fn start(
        addrs: &[String],
        model: Arc<ModelRef>,
        max_ctx: usize,
        epoch: PlanEpoch,
    ) -> Result<Self> {
        let mut conns = Vec::new();
        for addr in addrs {
            conns.push(NodeConn::open(None, addr).await?);
        }
        let _alive: Vec<DropGuard> = conns.iter().map(NodeConn::keep_alive).collect();
        let free: Vec<u64> = conns.iter().map(|c| c.desc.free_bytes).collect();
        let ranges = model.split(&free)?;
        tracing::info!(?ranges, "plan");
        let mut stages = Vec::new();
        for (c, range) in conns.into_iter().zip(ranges) {
            let info = load(&c.addr, &c.client, &model, range, epoch, max_ctx).await?;
            stages.push((c, range, info));
        }
        Ok(Self::assemble(stages, model, max_ctx, epoch))
    }

    /// Serves a committed plan (from etcd): connects to its nodes; a node that does not hold
    /// its slice yet loads it (one that holds it, prepared or committed, reuses it).
    pub async fn attach(plan: &PlanRecord, model: Arc<ModelRef>) -> Result<Self> {
        if plan.model != model.name || plan.sha256 != model.sha256 {
            return Err(CoordError::Plan(format!(
                "plan {} serves {} ({}), but this coordinator has {} ({})",
                plan.epoch, plan.model, plan.sha256, model.name, model.sha256
            )));
        }
        if plan.stages.last().map(|s| s.end as usize) != Some(model.layer_bytes.len()) {
            return Err(CoordError::Plan(format!(
                "plan {} does not cover the model's {} layers",
                plan.epoch,
                model.layer_bytes.len()
            )));
        }
        let max_ctx = plan.max_ctx as usize;
        let stages = futures::future::try_join_all(plan.stages.iter().map(|s| {
            let model = model.clone();
            async move {
                let range = stage_range(s)?;
                let c = NodeConn::open(Some(s.node.clone()), &s.addr).await?;
                let _alive = c.keep_alive();
                let info = load(&c.addr, &c.client, &model, range, plan.epoch, max_ctx).await?;
                Ok::<_, CoordError>((c, range, info))
            }
        }))
        .await?;
        Ok(Self::assemble(stages, model, max_ctx, plan.epoch))
    }

    /// The plan as recorded in etcd.
    pub fn record(&self) -> PlanRecord {
        PlanRecord {
            epoch: self.epoch,
            model: self.model.name.clone(),
            sha256: self.model.sha256.clone(),
            max_ctx: self.max_ctx as u32,
            stages: self
                .nodes
                .iter()
                .map(|n| StageRecord {
                    node: n.id.clone().unwrap_or_else(|| n.addr.clone()),
                    addr: n.addr.clone(),
                    start: n.range.start(),
                    end: n.range.end(),
                })
                .collect(),
        }
    }

    /// Watches every node until `stop`: renews its lease each [`Cluster::heartbeat`]; when it stops
    /// answering, marks it down (requests then fail fast with 503) and keeps trying to
    /// reconnect; once it is back, reloads its slice and marks it up.
    /// The tasks hold the cluster weakly: they end once no request uses it any more.
    pub fn spawn_heartbeats(self: &Arc<Self>, stop: CancellationToken) {
        let interval = self.heartbeat;
        for i in 0..self.nodes.len() {
            let weak: Weak<Self> = Arc::downgrade(self);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let Some(c) = weak.upgrade() else { break };
                    c.watch(i).await;
                }
            });
        }
    }

    async fn watch(&self, i: usize) {
        let n = &self.nodes[i];
        match n.link() {
            Some(l) => match untraced(
                l.client
                    .heartbeat(untraced_ctx(TIMEOUTS.heartbeat), l.lease),
            )
            .await
            {
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
                    // An event in a trace of its own, so that an operator finds it in Jaeger.
                    let span =
                        tracing::warn_span!("node down", addr = %n.addr, epoch = %self.epoch);
                    span.in_scope(|| tracing::warn!("node down: {why}"));
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
        let _alive = keep_alive(
            &client,
            ack.lease,
            Duration::from_millis(ack.heartbeat_interval_ms.max(10)),
        );
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
    let req = NodeConn::load_req(model, range, epoch, max_ctx);
    rpc(addr, client.load_slice(ctx(TIMEOUTS.load), req).await)
}

/// The checked range of a plan's stage.
pub fn stage_range(s: &StageRecord) -> Result<LayerRange> {
    LayerRange::new(s.start, s.end)
        .map_err(|e| CoordError::Plan(format!("stage on {}: {e}", s.node)))
}

#[cfg(test)]
mod tests {
    use super::frame_capped;
    use common::generate::{GPU_PREFILL_CHUNK, PREFILL_CHUNK};

    #[test]
    fn chunks_are_cut_to_fit_a_frame() {
        // an 8B model's 4,096-wide rows take whole chunks
        assert_eq!(frame_capped(GPU_PREFILL_CHUNK, 4096), GPU_PREFILL_CHUNK);
        assert_eq!(frame_capped(PREFILL_CHUNK, 4096), PREFILL_CHUNK);
        // a 70B model's 8,192-wide ones: 1,792 rows a frame, less the 256 decode rows
        assert_eq!(frame_capped(GPU_PREFILL_CHUNK, 8192), 1536);
        let c = frame_capped(GPU_PREFILL_CHUNK, 8192);
        assert!((c + 256) * 8192 * 4 < proto_types::MAX_FRAME_BYTES);
        // never nothing
        assert_eq!(frame_capped(GPU_PREFILL_CHUNK, 1 << 30), 1);
    }
}
