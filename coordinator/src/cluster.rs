//! [`Cluster`]: the connected shard nodes, the plan they serve, and their heartbeats.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gguf::GgufFile;
use common::model::LayerRange;
use proto_types::*;
use tarpc::context::Context;
use tokio_util::sync::CancellationToken;

use crate::error::{CoordError, Result};
use crate::plan;

/// One node of the plan.
#[derive(Debug, Clone)]
pub struct StageNode {
    /// Its address.
    pub addr: String,
    /// The client.
    pub client: ShardNodeClient,
    /// The coordinator's lease on it.
    pub lease: LeaseId,
    /// Its device.
    pub device: String,
    /// Blocks it holds.
    pub range: LayerRange,
    /// Bytes of its weights.
    pub weight_bytes: u64,
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
        for addr in addrs {
            let (client, ack) = connect(addr).await?;
            let d = client
                .describe(ctx(10))
                .await
                .map_err(|e| CoordError::NodeDown {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
            conns.push((addr.clone(), client, ack.lease, d));
        }
        let (layers, embd, head) = layer_bytes(&file)?;
        let free: Vec<u64> = conns.iter().map(|c| c.3.free_bytes).collect();
        let ranges = plan::split(&layers, &free, embd, head)?;
        tracing::info!(?ranges, n_layers = cfg.n_layers, "plan");
        let mut nodes = Vec::new();
        for ((addr, client, lease, d), range) in conns.into_iter().zip(ranges) {
            let req = LoadSlice {
                model: name.clone(),
                sha256: sha.clone(),
                layers: WireLayerRange {
                    start: range.start(),
                    end: range.end(),
                },
                epoch,
                max_ctx: max_ctx as u32,
            };
            let info = rpc(&addr, client.load_slice(ctx(600), req).await)?;
            nodes.push(StageNode {
                addr,
                client,
                lease,
                device: d.device,
                range,
                weight_bytes: info.weight_bytes,
            });
        }
        Ok(Cluster {
            nodes,
            epoch,
            max_ctx,
        })
    }

    /// Renews every lease each `interval` until `stop`.
    pub fn spawn_heartbeats(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for n in &c.nodes {
                    if let Err(e) = rpc(&n.addr, n.client.heartbeat(ctx(2), n.lease).await) {
                        tracing::warn!("heartbeat: {e}");
                    }
                }
            }
        });
    }
}
