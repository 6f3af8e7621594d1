//! Requests and replies of the [`crate::ShardNode`] calls.

use serde::{Deserialize, Serialize};

use crate::error::ShardError;
use crate::ids::{LeaseId, PlanEpoch, ReplyKey, SessionId, WireLayerRange};
use crate::tensor::WireTensor;

/// First call of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Who is calling (for logs), e.g. `coordinator@host`.
    pub client: String,
}

/// The node's answer to [`Hello`]: the lease every buffer of this client will belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The node's protocol version.
    pub protocol_version: u32,
    /// The client's lease.
    pub lease: LeaseId,
    /// Renew at least this often, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The lease expires after this long without a heartbeat, in milliseconds.
    pub lease_ttl_ms: u64,
}

/// What a node is and has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDescription {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Bytes the node may still use (its limit minus what it holds).
    pub free_bytes: u64,
    /// Bytes the node may use in all.
    pub total_bytes: u64,
    /// Feature words, e.g. `f16-activations`.
    pub capabilities: Vec<String>,
    /// Model files (names) available in its models directory.
    pub models: Vec<String>,
    /// Bytes of its served and retiring slices: what a re-plan frees once it commits (the
    /// planner counts them as free; PREPARE needs them beside the new slice).
    pub serving_bytes: u64,
}

/// Load a slice of a model for a plan epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSlice {
    /// File name inside the node's models directory (no path).
    pub model: String,
    /// Expected sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Blocks to hold.
    pub layers: WireLayerRange,
    /// The plan epoch this slice serves.
    pub epoch: PlanEpoch,
    /// Most tokens any session may hold.
    pub max_ctx: u32,
    /// Served beside the slices of other models: its commit retires only older slices of
    /// the same model (a coordinator serving several models). Otherwise its commit retires
    /// every slice served before it.
    pub beside: bool,
}

/// A loaded slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceInfo {
    /// The epoch it serves.
    pub epoch: PlanEpoch,
    /// Blocks held.
    pub layers: WireLayerRange,
    /// Bytes held by its weights.
    pub weight_bytes: u64,
    /// Whether it embeds tokens.
    pub first: bool,
    /// Whether it produces logits.
    pub last: bool,
}

/// Sampling parameters, for the last stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireSampling {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// Random seed.
    pub seed: u64,
    /// 0: off.
    pub min_p: f32,
    /// 0: off.
    pub presence_penalty: f32,
    /// 0: off.
    pub frequency_penalty: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    /// Added to these tokens' logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// Send back the chosen token's log-probability and this many alternatives'.
    pub logprobs: Option<u32>,
    /// The prompt's ids, sent only where the repetition penalty counts them.
    pub prompt: Vec<u32>,
    /// What the output must match, if anything.
    pub grammar: Option<WireGrammar>,
}

/// A grammar the last stage holds the output to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireGrammar {
    /// Any JSON object.
    JsonObject,
    /// A JSON schema (its JSON text).
    JsonSchema(String),
    /// A regular expression.
    Regex(String),
    /// A Lark grammar.
    Lark(String),
}

impl Default for WireSampling {
    /// Greedy, nothing adjusted, no log-probabilities.
    fn default() -> Self {
        WireSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
            prompt: Vec::new(),
            grammar: None,
        }
    }
}

/// Open a session on this node's slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenSession {
    /// The session.
    pub session: SessionId,
    /// The slice's epoch.
    pub epoch: PlanEpoch,
    /// The session's context bound.
    pub max_ctx: u32,
    /// Where this stage sends its activations; `None` on the last stage.
    pub next: Option<String>,
    /// How the last stage picks tokens.
    pub sampling: WireSampling,
}

/// Open a session that starts where another of the same lease stands: a copy of its KV cache
/// (its own memory, reserved as `open_session` reserves), its next stage and context bound,
/// and a sampler of its own. Choices of one prompt share the prompt's prefill this way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkSession {
    /// The session copied; no step of it may be running.
    pub from: SessionId,
    /// The new session.
    pub to: SessionId,
    /// How the new session's last stage picks tokens.
    pub sampling: WireSampling,
    /// Positions of `from` the copy keeps (`None`: all); a prefix-cache hit keeps the prefix
    /// it shares. A windowed layer that has wrapped into a ring is only copied whole.
    pub keep: Option<u32>,
    /// The copy's context bound (`None`: `from`'s). A prefix-cache entry is bounded by what
    /// it keeps: it holds exactly those positions and never grows.
    pub max_ctx: Option<u32>,
    /// The copy is a prefix-cache entry: it never runs a step, the idle reaper leaves it to
    /// its owner, and the memory accounting counts it as `prefix_cache`.
    pub prefix_cache: bool,
}

/// Input of one session's forward step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StageInput {
    /// Token ids, for the first stage.
    Tokens(Vec<u32>),
    /// Hidden states `[n, hidden]`, for the others.
    Hidden(WireTensor),
}

/// One session's tokens at positions `start..start+n`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardItem {
    /// The session.
    pub session: SessionId,
    /// Position of the first row.
    pub start: u32,
    /// The rows.
    pub input: StageInput,
    /// Pick a token after the last row (the last chunk of a prompt, and every decode step);
    /// a prompt's earlier chunks skip the head.
    pub pick: bool,
    /// Return the last row's logits too (they are large: only when asked).
    pub want_logits: bool,
    /// Where the last stage's outcome goes.
    pub reply: ReplyRoute,
}

/// Where the last stage sends a step's outcome (its picked token, or its error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyRoute {
    /// Back along the chain: each stage's `forward` returns it to the stage before.
    Chain,
    /// To whoever awaits it with `collect` on the last stage (the coordinator, one hop away)
    /// with the same key; the chain's replies carry an empty output and only say the step
    /// was handed on. No logits go this way: an item that asks for them takes the chain.
    Collect(ReplyKey),
}

/// A forward step for one or more sessions (decode steps of many sessions batch together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// The plan epoch the caller believes in; a mismatch is refused.
    pub epoch: PlanEpoch,
    /// One item per session.
    pub items: Vec<ForwardItem>,
}

/// What the last stage returns for one item, passed back along the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardOutput {
    /// The session.
    pub session: SessionId,
    /// The token picked after the item's last row, if the item asked for one.
    pub pick: Option<WirePick>,
    /// The last row's logits, when asked for.
    pub logits: Option<WireTensor>,
}

/// A token the last stage picked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WirePick {
    /// The token.
    pub token: u32,
    /// Its log-probability and the most likely tokens' (ids, most likely first), when asked.
    pub logprobs: Option<(f32, Vec<(u32, f32)>)>,
}

/// Reply to [`ForwardRequest`], one output per item, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardReply {
    /// One outcome per item, in the request's order. An item fails alone (its session's
    /// context is full, say) without failing the others it was batched with.
    pub outputs: Vec<Result<ForwardOutput, ShardError>>,
    /// Microseconds the node spent on the request, from its arrival to this reply (its
    /// relay to the stages after it included). The stage before subtracts it from its own
    /// round trip to measure the hop between them.
    pub handled_micros: u64,
}

/// Reply to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// The lease.
    pub lease: LeaseId,
    /// Milliseconds until it expires without another heartbeat.
    pub expires_in_ms: u64,
}

/// Bytes one lease holds, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaseBytes {
    /// The lease (`None`: held outside every lease, which should never be more than 0).
    pub lease: Option<LeaseId>,
    /// The client that holds it.
    pub client: String,
    /// Weights of committed slices.
    pub weights: u64,
    /// KV caches.
    pub kv_cache: u64,
    /// Activations queued, computing or on their way to the next stage.
    pub activations: u64,
    /// Slices prepared but not committed.
    pub prepared: u64,
    /// Prefix-cache entries (KV caches kept for prompts to come).
    pub prefix_cache: u64,
}

/// Where a held slice is in the two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireSliceState {
    /// Loaded by PREPARE, waiting for the decision.
    Prepared,
    /// New sessions open on it.
    Serving,
    /// Replaced; its sessions finish on it, then it is freed.
    Retiring,
}

/// One slice a node holds: which model and plan it belongs to, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceStatus {
    /// Its plan epoch.
    pub epoch: PlanEpoch,
    /// The model file.
    pub model: String,
    /// Its blocks.
    pub layers: WireLayerRange,
    /// Where it is in the two-phase commit.
    pub state: WireSliceState,
    /// Its weight bytes.
    pub bytes: u64,
}

/// A node's state and memory, from its own accounting and from outside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The epoch served.
    pub epoch: Option<PlanEpoch>,
    /// Blocks held.
    pub layers: Option<WireLayerRange>,
    /// Epochs with a prepared slice waiting for a decision.
    pub prepared_epochs: Vec<PlanEpoch>,
    /// Older epochs still held because sessions on them have not finished.
    pub retiring_epochs: Vec<PlanEpoch>,
    /// The node's id in etcd, when it has joined a cluster.
    pub node_id: Option<String>,
    /// Open sessions.
    pub sessions: u32,
    /// Live leases and what each holds.
    pub leases: Vec<LeaseBytes>,
    /// Every slice held, in any state, with its model and bytes.
    pub slices: Vec<SliceStatus>,
    /// Sum of every lease's bytes.
    pub attributed_bytes: u64,
    /// The node's memory limit, if any.
    pub memory_limit: Option<u64>,
    /// Device total bytes (CUDA: the driver's; CPU: the host's).
    pub device_total_bytes: u64,
    /// Device free bytes (CUDA: the driver's; CPU: the host's available memory).
    pub device_free_bytes: u64,
    /// The process's resident set.
    pub process_rss_bytes: u64,
    /// The runtime's own bytes, measured at start-up before any slice (CPU: resident set;
    /// CUDA: device bytes in use).
    pub baseline_bytes: u64,
    /// In use minus attributed minus baseline (CPU: resident set; CUDA: device bytes in use).
    /// Near 0 when every buffer is accounted for; it may dip below 0 by what the runtime
    /// gave back after start-up.
    pub unattributed_bytes: i64,
}
