//! Shared runtime of the cluster: GGUF loading, the model stage runtime, the tokenizer,
//! chat templates, sampling and errors.
//!
//! # Layout
//! - [`gguf`]: parse GGUF files into a typed [`gguf::ModelConfig`] and tensor descriptors.
//! - [`model`]: [`model::Stage`], the forward pass for a [`model::LayerRange`], and the
//!   per-session [`model::KvCache`].
//! - [`kernels`]: SIMD CPU kernels for quantized products.
//! - `cuda` (with the `cuda` feature): our own CUDA kernels, for batched decode attention.
//! - [`tokenizer`]: the tokenizer from GGUF metadata, chat templates, streaming decode.
//! - [`sampling`]: greedy, temperature, top-k, top-p, min-p, seeded; penalties, biases,
//!   log-probabilities.
//! - [`grammar`]: structured output (JSON schema, JSON object, regex, Lark) with llguidance.
//! - [`stop`]: stop strings over streamed text.
//! - [`generate`]: a local chain of stages and the generation loop.
//! - [`cuda_options`]: the switches of our CUDA kernels, set once at start.
//! - [`device`]: `cpu` / `cuda:N` device names and the CPU thread pool.
//! - [`warmup`]: running every kind of CUDA kernel once at start-up, so that candle's
//!   lazily kept device memory is allocated before anything a client causes.
//! - [`config_file`]: `--config FILE`, a TOML file of a command's flags laid under its
//!   command line.
//! - [`health`]: the probe of the container images' health checks.
//! - [`error`]: [`Error`], this crate's one error type.

pub mod config_file;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_options;
pub mod device;
pub mod error;
pub mod gguf;
pub mod health;
pub mod kernels;
pub mod memory;
pub mod model;

pub use error::{Error, Result};
pub mod generate;
pub mod grammar;
pub mod sampling;
pub mod stop;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod warmup;
