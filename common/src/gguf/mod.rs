//! GGUF container access: the header, metadata and tensor descriptors are parsed with
//! `gguf-rs-lib`; tensor bytes are read later, one tensor at a time, with positioned reads.
//!
//! # Layout
//! - [`file`]: [`GgufFile`], an opened and validated GGUF file, and its tensor descriptors.
//! - `synth` (with the `synth` feature): synthetic models of every supported architecture
//!   with random weights, for benchmarks, loaders and checks against llama.cpp;
//!   `synth_blocks` their random weights, block format by block format.
//! - [`config`]: [`ModelConfig`], the typed model configuration parsed from the metadata.
//! - [`meta`]: typed getters over raw GGUF metadata values.
//! - [`digest`]: a model file's sha256.

pub mod config;
pub mod digest;
pub mod file;
pub mod meta;
#[cfg(feature = "synth")]
pub mod synth;
#[cfg(feature = "synth")]
mod synth_blocks;

pub use config::{Activation, Architecture, ModelConfig, RopeStyle, SlidingWindow};
pub use digest::sha256;
pub use file::{GgufFile, TensorDesc};
