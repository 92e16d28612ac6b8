//! The engine's errors. `error_type()` is the stable string used as the metric label
//! (`sana_request_failure{err=…}`) and as the `type` of the HTTP error envelope.

use std::time::Duration;

use sana_backend::BackendError;

/// A request field the engine cannot serve, with a message that names the field, the limit and
/// the value given, and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// The request field at fault (`prompt`, `n`, `width`, …), when there is one.
    pub param: Option<&'static str>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ValidationError {
    pub(crate) fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            message: message.into(),
        }
    }
}

/// Why a request got no images. Each variant has a stable [`EngineError::error_type`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The request is invalid (HTTP 400).
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// Too many requests in flight; retry later (HTTP 429).
    #[error("the server is overloaded: {max_concurrent_requests} requests are already in flight; retry later")]
    Overloaded {
        /// The admission limit that was reached.
        max_concurrent_requests: usize,
    },
    /// The request did not finish within its deadline (HTTP 504 or 503).
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    /// The generation was stopped before it finished.
    #[error("the request was cancelled")]
    Cancelled,
    /// The backend failed on this request's batch (HTTP 500). The message is for logs; a server
    /// shows a generic text.
    #[error("generation failed: {0}")]
    Backend(String),
    /// The device ran out of memory for the request's batch (HTTP 500, not worth retrying as
    /// is). The message is for logs.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The model as loaded cannot run the request (HTTP 500, not worth retrying). The message is
    /// for logs.
    #[error("the model cannot run this request: {0}")]
    Model(String),
    /// No worker is able to serve (HTTP 503).
    #[error("no healthy worker is available")]
    Unhealthy,
    /// The worker running the request's batch made no progress for `silent` and was replaced
    /// (HTTP 503); a retry runs on its replacement.
    #[error("the worker on `{device}` made no progress for {silent:?} and is being replaced; retry the request")]
    WorkerHung {
        /// The worker's device.
        device: String,
        /// The watchdog timeout it exceeded.
        silent: Duration,
    },
    /// The engine is shutting down and takes no more work (HTTP 503).
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl EngineError {
    /// A stable snake_case name of the variant, for metric labels and error envelopes.
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::Validation(_) => "validation",
            EngineError::Overloaded { .. } => "overloaded",
            EngineError::Timeout(_) => "timeout",
            EngineError::Cancelled => "cancelled",
            EngineError::Backend(_) => "backend",
            EngineError::OutOfMemory(_) => "out_of_memory",
            EngineError::Model(_) => "model",
            EngineError::Unhealthy => "unhealthy",
            EngineError::WorkerHung { .. } => "worker_hung",
            EngineError::ShuttingDown => "shutting_down",
        }
    }
}

impl From<BackendError> for EngineError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::InvalidInput(message) => EngineError::Validation(ValidationError {
                param: None,
                message,
            }),
            BackendError::Cancelled => EngineError::Cancelled,
            BackendError::OutOfMemory(message) => EngineError::OutOfMemory(message),
            BackendError::Model(message) => EngineError::Model(message),
            other => EngineError::Backend(other.to_string()),
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is inconsistent by itself or with the model.
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// A worker could not build or warm up its backend.
    #[error("worker for device `{device}` failed to start: {source}")]
    Worker {
        /// The device of the worker.
        device: String,
        /// What went wrong.
        source: BackendError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_stable() {
        let cases = [
            (
                EngineError::Validation(ValidationError::new("n", "x")),
                "validation",
            ),
            (
                EngineError::Overloaded {
                    max_concurrent_requests: 1,
                },
                "overloaded",
            ),
            (EngineError::Timeout(Duration::from_secs(1)), "timeout"),
            (EngineError::Cancelled, "cancelled"),
            (EngineError::Backend("x".into()), "backend"),
            (EngineError::OutOfMemory("x".into()), "out_of_memory"),
            (EngineError::Model("x".into()), "model"),
            (EngineError::Unhealthy, "unhealthy"),
            (
                EngineError::WorkerHung {
                    device: "cpu".into(),
                    silent: Duration::from_secs(1),
                },
                "worker_hung",
            ),
            (EngineError::ShuttingDown, "shutting_down"),
        ];
        for (err, expected) in cases {
            assert_eq!(err.error_type(), expected, "{err:?}");
        }
    }

    #[test]
    fn backend_errors_lift_to_the_right_variant() {
        assert_eq!(
            EngineError::from(BackendError::InvalidInput("bad size".into())),
            EngineError::Validation(ValidationError {
                param: None,
                message: "bad size".into()
            })
        );
        assert_eq!(
            EngineError::from(BackendError::Cancelled),
            EngineError::Cancelled
        );
        assert!(matches!(
            EngineError::from(BackendError::Internal("lost".into())),
            EngineError::Backend(msg) if msg.contains("lost")
        ));
        assert_eq!(
            EngineError::from(BackendError::OutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into())),
            EngineError::OutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into())
        );
        assert_eq!(
            EngineError::from(BackendError::Model("shape mismatch".into())),
            EngineError::Model("shape mismatch".into())
        );
    }
}
