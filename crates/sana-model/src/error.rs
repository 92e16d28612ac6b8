//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid JSON or has a wrongly typed field.
    #[error("{}: invalid config: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A config asks for something this implementation does not serve.
    #[error("unsupported config: `{field}` = {value}: {reason}")]
    Unsupported {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A component folder has no weight files under any accepted name.
    #[error("no weights in {}: expected {expected}", dir.display())]
    NoWeights { dir: PathBuf, expected: String },
    /// A checkpoint cannot be read or does not match the model.
    #[error("{0}")]
    Weights(String),
    /// A sampler config or schedule request was refused.
    #[error(transparent)]
    Scheduler(#[from] crate::scheduler::SchedulerError),
    /// A tensor operation failed (includes missing tensors and shape mismatches at load).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
