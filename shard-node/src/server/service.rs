//! The [`ShardNode`] implementation of one connection.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::gguf::GgufFile;
use common::model::Stage;
use common::sampling::Sampler;
use proto_types::*;
use tarpc::context::Context;
use tokio::sync::oneshot;

use cluster_tls::link::Peer;
use cluster_tls::Role;

use super::batch::Pending;
use super::wire::{grammar, layer_range, sampling, shard_err, wire_range};
use super::Server;
use crate::node::{lock, report, Node, NodeError, Session, SessionEntry, Slice, SliceState};

/// One connection: the server, who is calling, and the connection lease its handshake was
/// granted.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The server.
    pub server: Arc<Server>,
    /// The caller, as its certificate says (with TLS off: unauthenticated, allowed all).
    pub peer: Arc<Peer>,
    /// Set by `handshake`.
    pub lease: Arc<Mutex<Option<LeaseId>>>,
}

/// The sampler a session's sampling asks for; on the last stage with its grammar compiled
/// (building the model's grammar compiler, once, and compiling take a moment: off the async
/// workers).
async fn sampler_for(slice: &Arc<Slice>, w: &WireSampling) -> Result<Sampler, ShardError> {
    let mut sampler = Sampler::new(sampling(w)?)
        .map_err(shard_err)?
        .with_prompt(&w.prompt);
    if let (Some(g), true) = (&w.grammar, slice.stage.is_last()) {
        let (s, g) = (slice.clone(), grammar(g));
        let c = tokio::task::spawn_blocking(move || {
            s.grammar_compiler()
                .map_err(|e| err(ErrorCode::Internal, format!("grammar compiler: {e}")))?
                .compile(&g)
                .map_err(shard_err)
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, format!("grammar compiler failed: {e}")))??;
        sampler = sampler.with_constraint(c);
    }
    Ok(sampler)
}

fn err(code: ErrorCode, d: impl Into<String>) -> ShardError {
    ShardError::new(code, d)
}

impl Conn {
    fn node(&self) -> &Node {
        &self.server.node
    }

    fn lease(&self) -> Result<LeaseId, ShardError> {
        lock(&self.lease).ok_or_else(|| err(ErrorCode::VersionMismatch, "handshake first"))
    }

    /// The lease, for a call that only a coordinator may make (it changes what the node
    /// holds); checked before anything is read or allocated.
    fn coordinator_lease(&self, call: &str) -> Result<LeaseId, ShardError> {
        if !self.peer.may(Role::Coordinator) {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "{call} needs a coordinator's certificate; the caller is {}",
                    self.peer
                ),
            ));
        }
        self.lease()
    }
}

fn valid_model_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\\') && name != ".." && name != "."
}

fn info(slice: &Slice) -> SliceInfo {
    SliceInfo {
        epoch: slice.epoch,
        layers: wire_range(slice.stage.range()),
        weight_bytes: slice.stage.weight_bytes() as u64,
        first: slice.stage.is_first(),
        last: slice.stage.is_last(),
    }
}

impl Conn {
    /// Loads the slice `req` names (off the async workers and off the compute thread, so that
    /// serving goes on) and installs it, committed or prepared. A slice of the same epoch,
    /// model and range already held is reused.
    async fn install(
        &self,
        lease: LeaseId,
        req: LoadSlice,
        committed: bool,
    ) -> Result<SliceInfo, ShardError> {
        if !valid_model_name(&req.model) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("model name `{}` is not a plain file name", req.model),
            ));
        }
        if self.node().has_left() {
            return Err(NodeError::Left.into());
        }
        let range = layer_range(req.layers)?;
        if let Some(s) = self.node().held_slice(req.epoch, &req.model, range)? {
            return Ok(info(&s));
        }
        let path = self.node().cfg.models_dir.join(&req.model);
        let device = self.node().device.clone();
        let limit = self.node().cfg.memory_limit;
        let max_ctx = req.max_ctx as usize;
        let want_sha = req.sha256.to_lowercase();
        let model = req.model.clone();
        let stage = tokio::task::spawn_blocking(move || -> Result<Stage, ShardError> {
            let sha = common::gguf::sha256(&path).map_err(shard_err)?;
            if sha != want_sha {
                return Err(err(
                    ErrorCode::ModelUnavailable,
                    format!("{model}: sha256 is {sha}, not {want_sha}"),
                ));
            }
            let file = GgufFile::open(&path).map_err(shard_err)?;
            let stage = Stage::load(&file, range, &device, max_ctx).map_err(shard_err)?;
            if let Some(limit) = limit {
                if stage.weight_bytes() as u64 > limit {
                    return Err(err(
                        ErrorCode::ResourceExhausted,
                        format!(
                            "slice {range} needs {} bytes, the limit is {limit}",
                            stage.weight_bytes()
                        ),
                    ));
                }
            }
            Ok(stage)
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, format!("slice loader failed: {e}")))??;
        let beside = req.beside;
        let slice = Slice {
            epoch: req.epoch,
            path: self.node().cfg.models_dir.join(&req.model),
            model: req.model,
            stage,
            grammar: Default::default(),
        };
        let out = info(&slice);
        self.node().put_slice(lease, slice, committed, beside)?;
        tracing::info!(epoch = %out.epoch, layers = %range, bytes = out.weight_bytes, committed, "slice loaded");
        Ok(out)
    }
}

impl ShardNode for Conn {
    async fn handshake(self, _: Context, hello: Hello) -> Result<HelloAck, ShardError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(err(
                ErrorCode::VersionMismatch,
                format!(
                    "protocol {} is not this node's {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            ));
        }
        let mut slot = lock(&self.lease);
        if let Some(l) = *slot {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("this connection already holds lease {l}"),
            ));
        }
        let lease = self.node().leases.grant(hello.client);
        *slot = Some(lease);
        Ok(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            lease,
            heartbeat_interval_ms: self.node().cfg.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: self.node().cfg.lease_ttl.as_millis() as u64,
        })
    }

    async fn describe(self, _: Context) -> NodeDescription {
        let (free_bytes, total_bytes) = self.node().free_bytes();
        let models = std::fs::read_dir(&self.node().cfg.models_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.ends_with(".gguf"))
                    .collect()
            })
            .unwrap_or_default();
        NodeDescription {
            device: self.node().cfg.device.to_string(),
            free_bytes,
            total_bytes,
            capabilities: vec![
                "f32-activations".into(),
                "f16-activations".into(),
                "bf16-activations".into(),
            ],
            models,
            serving_bytes: self.node().serving_bytes(),
        }
    }

    async fn load_slice(self, _: Context, req: LoadSlice) -> Result<SliceInfo, ShardError> {
        let lease = self.coordinator_lease("load_slice")?;
        let epoch = req.epoch;
        let info = self.install(lease, req, true).await?;
        self.node().commit(epoch)?;
        Ok(info)
    }

    async fn unload_slice(self, _: Context, epoch: PlanEpoch) -> Result<(), ShardError> {
        self.coordinator_lease("unload_slice")?;
        let bytes = self.node().drop_slice(epoch)?;
        tracing::info!(%epoch, bytes, "slice unloaded");
        Ok(())
    }

    async fn open_session(self, _: Context, req: OpenSession) -> Result<(), ShardError> {
        let lease = self.coordinator_lease("open_session")?;
        let slice = self.node().slice_for(req.epoch)?;
        let sampler = sampler_for(&slice, &req.sampling).await?;
        let cache = slice
            .stage
            .new_cache(req.max_ctx as usize, Default::default())
            .map_err(shard_err)?;
        let next = match (&req.next, slice.stage.is_last()) {
            (Some(addr), false) => {
                // Fail now, not at the first step, if the next stage cannot be reached.
                self.server.peers.get(addr).await?;
                Some(addr.clone())
            }
            (None, true) => None,
            (Some(_), true) => {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    "the last stage has no next stage",
                ))
            }
            (None, false) => {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    "this stage needs a next stage",
                ))
            }
        };
        let session = Session {
            slice,
            cache,
            next,
            sampler,
        };
        self.node()
            .open_session(req.session, SessionEntry::new(lease, session))?;
        Ok(())
    }

    async fn fork_session(self, _: Context, req: ForkSession) -> Result<u64, ShardError> {
        let lease = self.coordinator_lease("fork_session")?;
        let from = self.node().session(req.from)?;
        if from.lease != lease {
            return Err(NodeError::UnknownSession {
                id: req.from,
                owner: Some(lease),
                left: false,
            }
            .into());
        }
        // (its slice by epoch, not from its state: a step of `from` may hold that lock)
        let slice = self.node().slice_for(from.epoch)?;
        let sampler = sampler_for(&slice, &req.sampling).await?;
        let node = self.server.node.clone();
        // Copying the cache (a device copy, or megabytes of host rows) blocks: off the async
        // workers. It waits for a step of `from` that is still running. A copy that cannot be
        // kept (the memory limit) is not made.
        let (cache, next) = tokio::task::spawn_blocking(move || {
            let s = lock(&from.state);
            let keep = req.keep.map_or(s.cache.len(), |k| k as usize);
            let max_ctx = req.max_ctx.map_or(s.cache.max_ctx(), |m| m as usize);
            node.session_fits(s.cache.bytes_at(max_ctx) as u64)?;
            let cache = if keep == s.cache.len() && max_ctx == s.cache.max_ctx() {
                s.cache.fork()
            } else {
                s.cache.fork_prefix(keep, max_ctx)
            };
            Ok::<_, ShardError>((cache.map_err(shard_err)?, s.next.clone()))
        })
        .await
        .map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("copying the KV cache failed: {e}"),
            )
        })??;
        let bytes = cache.nbytes() as u64;
        let session = Session {
            slice,
            cache,
            next,
            sampler,
        };
        let mut entry = SessionEntry::new(lease, session);
        entry.prefix_cache = req.prefix_cache;
        let entry = self.node().open_session(req.to, entry)?;
        entry
            .kv_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(bytes)
    }

    async fn close_session(self, _: Context, session: SessionId) -> Result<(), ShardError> {
        let lease = self.coordinator_lease("close_session")?;
        let bytes = self.node().close_session(session, lease)?;
        tracing::info!(target: common::telemetry::SPAN_EVENT, %session, kind = "kv_cache", bytes, "session closed");
        Ok(())
    }

    async fn forward(self, ctx: Context, req: ForwardRequest) -> Result<ForwardReply, ShardError> {
        let began = std::time::Instant::now();
        let lease = self.lease()?;
        let slice = self.node().slice_for(req.epoch)?;
        if req.items.is_empty() {
            return Err(err(ErrorCode::InvalidArgument, "no items"));
        }
        let mut seen = HashSet::new();
        let mut waits = Vec::with_capacity(req.items.len());
        for item in req.items {
            let (reply, rx) = oneshot::channel();
            waits.push(rx);
            if !seen.insert(item.session) {
                let _ = reply.send(Err(err(
                    ErrorCode::InvalidArgument,
                    format!("session {} appears twice in one request", item.session),
                )));
                continue;
            }
            if matches!(item.reply, ReplyRoute::Collect(_)) && item.want_logits {
                let _ = reply.send(Err(err(
                    ErrorCode::InvalidArgument,
                    "logits come back along the chain: send them with ReplyRoute::Chain",
                )));
                continue;
            }
            let bytes = match &item.input {
                StageInput::Tokens(t) => t.len() as u64 * 4,
                StageInput::Hidden(w) => w.data.len() as u64,
            };
            let queued = self
                .node()
                .session(item.session)
                .and_then(|s| Ok((s, self.node().leases.charge(lease, bytes)?)));
            match queued {
                Ok((session, charge)) => self.server.compute.submit(Pending {
                    item,
                    session,
                    slice: slice.clone(),
                    ctx,
                    reply,
                    charge,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        let mut outputs = Vec::with_capacity(waits.len());
        for rx in waits {
            outputs.push(rx.await.unwrap_or_else(|_| {
                Err(err(
                    ErrorCode::Internal,
                    "the step was dropped (compute failed)",
                ))
            }));
        }
        Ok(ForwardReply {
            outputs,
            handled_micros: u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    async fn collect(
        self,
        _: Context,
        session: SessionId,
        start: u32,
        key: ReplyKey,
    ) -> Result<ForwardOutput, ShardError> {
        let lease = self.coordinator_lease("collect")?;
        let entry = self.node().session(session)?;
        if entry.lease != lease {
            return Err(NodeError::UnknownSession {
                id: session,
                owner: Some(lease),
                left: false,
            }
            .into());
        }
        let taken = lock(&entry.outbox).take(crate::node::outbox::Ticket { start, key });
        // Only the receiver waits: the session may close meanwhile, which answers it.
        drop(entry);
        match taken {
            Ok(outcome) => outcome,
            Err(rx) => rx.await.unwrap_or_else(|_| {
                Err(err(
                    ErrorCode::UnknownSession,
                    format!("session {session} closed before its step at {start} came"),
                ))
            }),
        }
    }

    async fn heartbeat(self, _: Context, lease: LeaseId) -> Result<LeaseStatus, ShardError> {
        let ttl = self.node().leases.renew(lease)?;
        Ok(LeaseStatus {
            lease,
            expires_in_ms: ttl.as_millis() as u64,
        })
    }

    async fn prepare_slice(self, _: Context, req: LoadSlice) -> Result<SliceInfo, ShardError> {
        let lease = self.coordinator_lease("prepare_slice")?;
        let epoch = req.epoch;
        let r = self.install(lease, req, false).await;
        match &r {
            Ok(i) => tracing::info!(%epoch, bytes = i.weight_bytes, "PREPARE: voted yes"),
            Err(e) => tracing::warn!(%epoch, "PREPARE: voted no: {e}"),
        }
        r
    }

    async fn commit_slice(self, _: Context, epoch: PlanEpoch) -> Result<(), ShardError> {
        self.coordinator_lease("commit_slice")?;
        self.node().commit(epoch)?;
        tracing::info!(%epoch, "COMMIT: serving epoch {epoch}");
        Ok(())
    }

    async fn abort_slice(self, _: Context, epoch: PlanEpoch) -> Result<(), ShardError> {
        self.coordinator_lease("abort_slice")?;
        let bytes = self.node().abort(epoch)?;
        tracing::info!(%epoch, bytes, "ABORT: prepared slice freed");
        Ok(())
    }

    async fn status(self, _: Context) -> NodeStatus {
        let slice = self.node().slice();
        let states = self.node().slice_states();
        let r = report(self.node());
        NodeStatus {
            epoch: slice.as_ref().map(|s| s.epoch),
            layers: slice.as_ref().map(|s| wire_range(s.stage.range())),
            prepared_epochs: states
                .iter()
                .filter(|(_, st)| st.is_prepared())
                .map(|(e, _)| *e)
                .collect(),
            retiring_epochs: states
                .iter()
                .filter(|(_, st)| *st == SliceState::Retiring)
                .map(|(e, _)| *e)
                .collect(),
            node_id: self.node().node_id(),
            sessions: self.node().session_count() as u32,
            leases: r
                .held
                .into_iter()
                .map(|h| LeaseBytes {
                    lease: h.lease,
                    client: h.client,
                    weights: h.weights,
                    kv_cache: h.kv_cache,
                    activations: h.activations,
                    prepared: h.prepared,
                    prefix_cache: h.prefix_cache,
                })
                .collect(),
            slices: self
                .node()
                .slices_held()
                .into_iter()
                .map(|(epoch, model, range, state, bytes)| SliceStatus {
                    epoch,
                    model,
                    layers: wire_range(range),
                    state: match state {
                        SliceState::Prepared(_) => WireSliceState::Prepared,
                        SliceState::Serving => WireSliceState::Serving,
                        SliceState::Retiring => WireSliceState::Retiring,
                    },
                    bytes,
                })
                .collect(),
            attributed_bytes: r.attributed,
            memory_limit: self.node().cfg.memory_limit,
            device_total_bytes: r.device_total,
            device_free_bytes: r.device_free,
            process_rss_bytes: r.rss,
            baseline_bytes: r.baseline,
            unattributed_bytes: r.unattributed,
        }
    }
}
