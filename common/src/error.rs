//! The one error type of the `common` crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF parser refused the file (bad magic, truncated, absurd counts...), or could
    /// not write one.
    #[error("malformed GGUF file {path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: gguf_rs_lib::error::GGUFError,
    },
    /// The GGUF container parses but is unusable (a tensor past the end of the file...).
    #[error("malformed GGUF file: {0}")]
    BadGguf(String),
    /// A metadata key that the architecture needs is missing.
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    /// A metadata key has the wrong type or an unusable value.
    #[error("GGUF metadata key `{key}` is invalid: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model's architecture is not one this runtime implements.
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2, qwen3, gemma3)")]
    UnsupportedArchitecture(String),
    /// A tensor uses a quantization this runtime does not implement.
    #[error("tensor `{tensor}` uses unsupported type {dtype}")]
    UnsupportedQuant {
        /// The tensor name.
        tensor: String,
        /// The GGUF type name.
        dtype: String,
    },
    /// A tensor the stage needs is absent, or has the wrong shape.
    #[error("tensor `{tensor}`: {reason}")]
    BadTensor {
        /// The tensor name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer range that does not fit the model.
    #[error("invalid layer range {0}")]
    BadLayerRange(String),
    /// A session tried to go past its maximum context.
    #[error("context overflow: {needed} tokens needed, the session allows {max}")]
    ContextOverflow {
        /// Tokens the request would reach.
        needed: usize,
        /// The session's maximum context.
        max: usize,
    },
    /// Positions fed to a stage do not follow the session's cache.
    #[error("position mismatch: the session holds {cached} tokens, input starts at {start}")]
    PositionMismatch {
        /// Tokens in the cache.
        cached: usize,
        /// Where the input claims to start.
        start: usize,
    },
    /// The input to a stage call is unusable (empty, wrong shape, bad token id...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The tokenizer could not be built or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A health probe found the service down.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
    /// Invalid configuration or sampling parameters.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An error from candle's tensor runtime.
    #[error("tensor runtime: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
