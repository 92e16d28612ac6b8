//! The Prometheus exporter behind `GET /metrics`: one recorder per process, installed on first
//! use, with histogram buckets fit for diffusion latencies and batch shapes.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sana_engine::metrics as names;

/// Error answers of the HTTP API, labelled `err` = the envelope's `type` (counter). Includes
/// what the engine never sees: malformed bodies, authentication, rate limits, unknown routes.
pub const HTTP_FAILURE: &str = "sana_http_failure";

/// Requests that presented a valid API key, labelled `key` = its [`crate::config::KeyId`] (the
/// first 8 hex digits of the key's SHA-256, never the key) and `status` = the HTTP status
/// (counter). A stream counts when its response starts.
pub const KEY_REQUESTS: &str = "sana_key_requests";

/// Latency buckets in seconds: a 1-step 512² image to a queued 4K batch.
const SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Images per batch.
const IMAGES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// Latent tokens per batch: one 512² image without guidance (256) to 16 CFG images at 4K.
const TOKENS: &[f64] = &[
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
];

/// The process's Prometheus handle, installing the recorder on the first call. `None` (with a
/// warning) when another recorder was installed first, e.g. by an embedding program.
pub fn handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match install() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!(%err, "cannot install the Prometheus recorder; /metrics is off");
                None
            }
        })
        .clone()
}

fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_duration".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full(names::BATCH_SIZE.into()), IMAGES)?
        .set_buckets_for_metric(Matcher::Full(names::BATCH_LATENT_TOKENS.into()), TOKENS)?
        .install_recorder()?;
    names::describe();
    metrics::describe_counter!(HTTP_FAILURE, "Error answers of the HTTP API, by type");
    metrics::describe_counter!(
        KEY_REQUESTS,
        "Requests with a valid API key, by key id (SHA-256 prefix) and status"
    );
    Ok(handle)
}
