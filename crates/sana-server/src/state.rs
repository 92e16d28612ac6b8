//! What every handler shares: the engine, the validated configuration, the key set, the rate
//! limiter, the url store and the metrics handle. A cheap `Clone` handle.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use sana_engine::Engine;

use crate::auth::RateLimiter;
use crate::config::{read_key_file, ApiKeys, ConfigError, ServerConfig};
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
    /// The keys in force: `--api-key` plus the key file as last read.
    api_keys: RwLock<Arc<ApiKeys>>,
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
                served_model_name,
                store,
                limiter,
                metrics: crate::metrics::handle(),
                started_unix: unix_now(),
                api_keys: RwLock::new(Arc::new(config.api_keys.clone())),
                config,
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

    /// The keys in force.
    pub fn api_keys(&self) -> Arc<ApiKeys> {
        Arc::clone(
            &self
                .inner
                .api_keys
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Reads `--api-key-file` again (on SIGHUP) and puts its keys, with `--api-key`'s, in force
    /// for the next request; returns how many keys are in force. When the file cannot be read or
    /// holds no key, the keys in force stay and the error says why: a bad edit never turns
    /// authentication off or locks everyone out.
    pub fn reload_api_keys(&self) -> Result<usize, ConfigError> {
        let config = &self.inner.config;
        let Some(path) = &config.api_key_file else {
            return Ok(self.api_keys().len());
        };
        let keys = config.flag_keys.merged(&read_key_file(path)?);
        let count = keys.len();
        *self
            .inner
            .api_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(count)
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
