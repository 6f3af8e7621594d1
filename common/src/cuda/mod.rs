//! CUDA kernels of our own, compiled to PTX by `build.rs` (with `nvcc`) when the `cuda`
//! feature is on, and loaded into candle's device on first use.
//!
//! - [`argmax`]: greedy picks where the logits are, one u32 a session to the host.
//! - [`decode_graph`]: fused decode steps replayed from CUDA graphs, one per batch size.
//! - [`decode_attention`]: RoPE, the KV-cache write and attention for every decoding session
//!   of a step, in two kernels per layer instead of ~20 candle kernels per session.
//! - [`f16_gemm`]: a prompt chunk's quantized products on f16 tensor cores (`--cuda-gemm`).
//! - [`fused_decode`]: a stage's whole decode step, nine launches a block, from raw addresses.
//! - [`gate_mul`]: a prompt chunk's `act(gate) * up` in one kernel.
//! - `fused_products` and `step_buffers`: that step's products, buffers and kernels.
//! - [`fused_head`]: the last stage's RMSNorm and output product for those steps.
//! - [`matvec`]: Q4_0 and Q8_0 matrix-vector products for those steps, in place of candle's
//!   mmvq where they apply.
//! - [`prefill_attention`]: a prompt chunk's attention on tensor cores, one launch a layer.
//! - [`rope_chunk`]: a prompt chunk's RoPE and KV-cache write, one launch a layer.
//! - [`pdl`]: launches that overlap the kernel before (programmatic dependent launch).

pub mod argmax;
pub mod decode_attention;
pub mod decode_graph;
pub mod f16_gemm;
pub mod fused_decode;
pub mod fused_head;
pub(crate) mod fused_products;
pub mod gate_mul;
pub mod matvec;
pub(crate) mod pdl;
pub mod prefill_attention;
pub mod rope_chunk;
pub(crate) mod step_buffers;
