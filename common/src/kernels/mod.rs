//! CPU kernels for quantized matrix-vector and matrix-matrix products.
//!
//! candle 0.11's CPU dot products for Q4_1 are scalar, and its prefill is one dot product per
//! row and column. These kernels follow llama.cpp's scheme instead: activations are quantized
//! once per call to 8-bit blocks of 32, then each weight row is dotted with AVX2 integer
//! arithmetic (`maddubs`), chosen at run time, with a scalar fallback that tests compare with.
//! Work is split over [`pool`], a small spinning pool: by output rows for one token, by
//! tokens for many.
//!
//! # Layout
//! - [`blocks`]: the GGUF block formats and activation quantization.
//! - [`dot`]: per-format dot products, scalar, AVX2 and AVX-VNNI.
//! - [`avx512`]: AVX-512 tile kernels (two weight rows per register) for batched paths.
//! - [`matmul`]: the threaded product `y = x · Wᵀ` over raw GGUF bytes.
//! - [`pool`]: the thread pool.
//! - [`vec`]: f16/f32 `dot` and `axpy` for attention.

pub mod avx512;
pub mod blocks;
pub mod dot;
pub mod matmul;
pub mod pool;
#[cfg(test)]
mod test_data;
pub mod vec;

pub use blocks::{QuantKind, BLOCK};
pub use matmul::{matmul, QuantizedActs};
