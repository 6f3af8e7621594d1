//! CPU kernels for quantized matrix-vector and matrix-matrix products.
//!
//! candle 0.11's CPU dot products for Q4_1 and Q5_0/Q5_1 are scalar, and its prefill is one
//! dot product per row and column. These kernels follow llama.cpp's scheme instead:
//! activations are quantized once per call (to 8-bit blocks of 32 for Q4_0, Q4_1, Q5_0, Q5_1
//! and Q8_0, to Q8_K blocks of 256 for the K-quants Q4_K, Q5_K and Q6_K), then each weight
//! row is dotted with AVX2 integer arithmetic (`maddubs`), chosen at run time, with a scalar
//! fallback that tests compare with. Work is split over [`pool`], a small spinning pool: by
//! output rows for one token, by tokens for many.
//!
//! # Layout
//! - [`blocks`]: the GGUF block formats ([`QuantKind`]), the activation formats ([`Acts`])
//!   and the 32-block activation quantization.
//! - [`dot`]: the 32-block formats' dot products (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), scalar, AVX2
//!   and AVX-VNNI, one row or a tile of 4 tokens at a time.
//! - [`kquants`]: the K-quants (Q4_K, Q5_K, Q6_K): Q8_K activations, scalar reference, AVX2
//!   rows and tiles, AVX-512 8-token tiles.
//! - [`avx512`]: AVX-512 tile kernels (two weight rows per register) for the batched paths of
//!   the 32-block formats.
//! - [`matmul`](mod@matmul): the threaded product `y = x · Wᵀ` over raw GGUF bytes.
//! - [`pool`]: the thread pool.
//! - [`vec`](mod@vec): f16/f32 `dot` and `axpy` for attention.

pub mod avx512;
#[cfg(test)]
mod bench;
pub mod blocks;
pub mod dot;
pub mod kquants;
pub mod matmul;
pub mod pool;
#[cfg(test)]
mod test_data;
pub mod vec;

pub use blocks::{Acts, QuantKind, BLOCK};
pub use matmul::{matmul, QuantizedActs};
