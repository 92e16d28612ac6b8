//! Metric names (`sana_<noun>_<measure>`, durations in seconds) and their descriptions.
//!
//! The engine only records through the `metrics` facade; the server installs an exporter.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Requests admitted by `Engine::submit` (counter).
pub const REQUEST_COUNT: &str = "sana_request_count";
/// Requests answered with images (counter).
pub const REQUEST_SUCCESS: &str = "sana_request_success";
/// Requests that failed, labelled `err` = `EngineError::error_type()`, or `cancelled` when the
/// client went away (counter).
pub const REQUEST_FAILURE: &str = "sana_request_failure";
/// Time from admission to the start of the request's batch (histogram, seconds).
pub const REQUEST_QUEUE_DURATION: &str = "sana_request_queue_duration";
/// Time the request's batch spent in the backend (histogram, seconds).
pub const REQUEST_INFERENCE_DURATION: &str = "sana_request_inference_duration";
/// Time from admission to the answer (histogram, seconds).
pub const REQUEST_DURATION: &str = "sana_request_duration";
/// Requests waiting in the queue, not yet batched (gauge).
pub const QUEUE_SIZE: &str = "sana_queue_size";
/// Images per batch (histogram).
pub const BATCH_SIZE: &str = "sana_batch_size";
/// Latent tokens per batch, CFG rows counted (histogram).
pub const BATCH_LATENT_TOKENS: &str = "sana_batch_latent_tokens";
/// Backend time per batch (histogram, seconds).
pub const BATCH_INFERENCE_DURATION: &str = "sana_batch_inference_duration";
/// Worker backends rebuilt after a panic or replaced after a hang (counter).
pub const WORKER_RESTART: &str = "sana_worker_restart";
/// Workers the watchdog found hung and replaced (counter).
pub const WORKER_HUNG: &str = "sana_worker_hung";

/// Registers descriptions and units with the installed recorder. Called by `Engine::start`;
/// harmless without a recorder.
pub fn describe() {
    describe_counter!(REQUEST_COUNT, "Requests admitted");
    describe_counter!(REQUEST_SUCCESS, "Requests answered with images");
    describe_counter!(REQUEST_FAILURE, "Requests failed, by error type");
    describe_histogram!(
        REQUEST_QUEUE_DURATION,
        Unit::Seconds,
        "Time from admission to batch start"
    );
    describe_histogram!(
        REQUEST_INFERENCE_DURATION,
        Unit::Seconds,
        "Backend time of the request's batch"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from admission to answer"
    );
    describe_gauge!(QUEUE_SIZE, "Requests waiting to be batched");
    describe_histogram!(BATCH_SIZE, "Images per batch");
    describe_histogram!(BATCH_LATENT_TOKENS, "Latent tokens per batch");
    describe_histogram!(
        BATCH_INFERENCE_DURATION,
        Unit::Seconds,
        "Backend time per batch"
    );
    describe_counter!(
        WORKER_RESTART,
        "Worker backends rebuilt after a panic or replaced after a hang"
    );
    describe_counter!(
        WORKER_HUNG,
        "Workers found hung by the watchdog and replaced"
    );
}

/// Counts one failed request under its error type.
pub(crate) fn failure(err: &'static str) {
    metrics::counter!(REQUEST_FAILURE, "err" => err).increment(1);
}
