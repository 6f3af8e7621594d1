//! The model stage runtime: the llama-family forward pass, split by layer range.
//!
//! # Layout
//! - [`layer_range`]: [`LayerRange`], which blocks a stage owns.
//! - [`stage`]: [`Stage`], a loaded slice with `embed`, `forward` (its blocks) and `head`.
//! - [`block`]: one transformer block.
//! - [`linear`]: quantized linear layers, fused where the weights allow.
//! - [`attention`]: causal grouped-query attention against a KV cache, with candle ops.
//! - [`host_attention`]: the CPU's attention for every session of a step in one region.
//! - [`host_rows`]: row-wise CPU RMSNorm and SiLU-times-up, on the kernel pool.
//! - [`rope`]: rotary position embeddings.
//! - [`kv_cache`]: [`KvCache`], one session's keys and values on one stage, bounded.

pub mod attention;
pub mod block;
pub mod host_attention;
pub mod host_rows;
pub mod kv_cache;
pub mod layer_range;
pub mod linear;
pub mod rope;
pub mod stage;

pub use block::Segment;
pub use kv_cache::{KvCache, KvDtype};
pub use layer_range::LayerRange;
pub use stage::Stage;
