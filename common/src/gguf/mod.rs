//! GGUF container access: the header, metadata and tensor descriptors are parsed with
//! `gguf-rs-lib`; tensor bytes are read later, one tensor at a time, with positioned reads.
//!
//! # Layout
//! - [`file`]: [`GgufFile`], an opened and validated GGUF file, and its tensor descriptors.
//! - `synth` (with the `synth` feature): synthetic llama models with random weights, for
//!   benchmarks and loaders.
//! - [`config`]: [`ModelConfig`], the typed model configuration parsed from the metadata.
//! - [`meta`]: typed getters over raw GGUF metadata values.
//! - [`digest`]: a model file's sha256.

pub mod config;
pub mod digest;
pub mod file;
pub mod meta;
#[cfg(feature = "synth")]
pub mod synth;

pub use config::{Architecture, ModelConfig, RopeStyle};
pub use digest::sha256;
pub use file::{GgufFile, TensorDesc};
