//! What every handler shares: the engine, the validated configuration, the key set, the rate
//! limiter, the url store and the metrics handle. A cheap `Clone` handle.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use sana_engine::Engine;

use crate::auth::RateLimiter;
use crate::config::{ApiKeys, ServerConfig};
use crate::store::{Clock, ImageStore, SystemClock};

/// The state of [`crate::app`].
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    config: ServerConfig,
    served_model_name: String,
    store: ImageStore,
    limiter: Option<RateLimiter>,
    metrics: Option<PrometheusHandle>,
    started_unix: u64,
}

impl AppState {
    /// State for `engine` under `config`, on the system clock. `/metrics` renders the process's
    /// Prometheus recorder, installed on first use ([`crate::metrics::handle`]).
    pub fn new(engine: Engine, config: ServerConfig) -> Self {
        Self::with_clock(engine, config, Arc::new(SystemClock))
    }

    /// State whose url store and rate limiter read `clock` (tests move it by hand).
    pub fn with_clock(engine: Engine, config: ServerConfig, clock: Arc<dyn Clock>) -> Self {
        let served_model_name = config
            .served_model_name
            .clone()
            .unwrap_or_else(|| engine.info().model_id.clone());
        let store = ImageStore::new(config.url_ttl, config.url_store_bytes, Arc::clone(&clock));
        let limiter = config
            .rate_limit
            .map(|per_minute| RateLimiter::new(per_minute, clock));
        Self {
            inner: Arc::new(Inner {
                engine,
                config,
                served_model_name,
                store,
                limiter,
                metrics: crate::metrics::handle(),
                started_unix: unix_now(),
            }),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The name clients use for the model.
    pub fn served_model_name(&self) -> &str {
        &self.inner.served_model_name
    }

    /// The url store.
    pub fn store(&self) -> &ImageStore {
        &self.inner.store
    }

    pub(crate) fn api_keys(&self) -> &ApiKeys {
        &self.inner.config.api_keys
    }

    pub(crate) fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.inner.limiter.as_ref()
    }

    pub(crate) fn metrics(&self) -> Option<&PrometheusHandle> {
        self.inner.metrics.as_ref()
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.inner.config.max_body_bytes
    }

    pub(crate) fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
