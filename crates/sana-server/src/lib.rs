//! The HTTP server of Sana: OpenAI's Images API (`POST /v1/images/generations` and
//! `POST /v1/images/edits`, JSON or server-sent events), `/v1/models`, `/health`, `/ready`, `/info`, `/metrics` and
//! `/openapi.json`, and the web playground at `/` ([`playground`]), with API keys, a per-key rate limit, body and time limits, CORS on request,
//! and graceful shutdown through the engine's drain.
//!
//! ```text
//! request ─► access log (x-request-id) ─► CORS ─► timeout ─► body limit ─► API key ─► rate limit
//!         ─► handler ─► sana_engine::Engine::submit ─► JSON / SSE / url store
//! ```
//!
//! [`app`] builds the router from an [`AppState`] (tests drive it with `oneshot` and the
//! engine's `FakeBackend`); [`run`] binds, serves and shuts down. The server depends on the
//! engine only: the `sana` binary builds the model backend and passes its factory in.

#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod edits;
pub mod encode;
pub mod error;
pub mod images;
pub mod listener;
pub mod meta;
pub mod metrics;
pub mod openapi;
pub mod playground;
pub mod state;
pub mod store;
pub mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sana_engine::sana_backend::{Backend, BackendError};
use sana_engine::{Engine, ShutdownReport, StartError};
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::{info, info_span, warn, Instrument};

pub use config::{ServeArgs, ServerConfig};
pub use error::{ApiError, ErrorResponse};
pub use state::AppState;

/// The router of the whole API over `state`.
pub fn app(state: AppState) -> Router {
    let config = state.config().clone();
    // With a ControlNet loaded, a generation may carry a control image: the upload limit.
    let generation_limit = if state.engine().info().controlnets.is_empty() {
        config.max_body_bytes
    } else {
        config.max_upload_bytes
    };
    let generations = post(images::generations)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::rate_limit,
        ))
        .layer(DefaultBodyLimit::max(generation_limit));
    let edits = post(edits::edits)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::rate_limit,
        ))
        .layer(DefaultBodyLimit::max(config.max_upload_bytes));
    let router = Router::new()
        .route("/v1/images/generations", generations)
        .route("/v1/images/edits", edits)
        .route("/v1/models", get(meta::models))
        .route("/v1/models/{*model}", get(meta::model_by_name))
        .route("/ready", get(meta::ready))
        .route("/info", get(meta::info))
        .route("/metrics", get(meta::metrics))
        .route("/openapi.json", get(meta::openapi))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .route("/health", get(meta::health))
        .route(
            &format!("{}/{{file}}", images::FILES_PATH),
            get(images::file),
        )
        .merge(if config.playground {
            playground::routes()
        } else {
            Router::new()
        })
        .method_not_allowed_fallback(meta::method_not_allowed)
        .fallback(meta::not_found)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ));
    let router = match cors_layer(&config.cors) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

fn cors_layer(cors: &config::Cors) -> Option<CorsLayer> {
    let origins = match cors {
        config::Cors::Off => return None,
        config::Cors::Any => AllowOrigin::any(),
        config::Cors::Origins(origins) => AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                HeaderName::from_static("x-queue-time"),
                HeaderName::from_static("x-inference-time"),
                HeaderName::from_static("x-total-time"),
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-should-retry"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// Answers 504 when a request has no response within `--request-timeout` (for a stream: until
/// its headers; the engine's own deadline bounds the rest).
async fn request_timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config().request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(limit).into_response(),
    }
}

/// One span per request (method, path, request id), one log line per answer, and the
/// `x-request-id` header (the client's when it sent a sane one).
async fn access_log(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|id| id.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
    let span = info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %request_id,
    );
    let start = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| {
        info!(
            status,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "answered"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address is taken or not ours.
    #[error("cannot listen on {addr} (--host/--port): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The engine did not start.
    #[error(transparent)]
    Engine(#[from] StartError),
    /// Serving failed.
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Binds `config.addr`, starts the engine with `factory` (one backend per device), serves until
/// SIGINT or SIGTERM, then drains (see [`serve`]).
pub async fn run<F>(config: ServerConfig, factory: F) -> Result<ShutdownReport, ServeError>
where
    F: Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static,
{
    info!(?config, "starting");
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.addr,
            source,
        })?;
    serve(listener, config, factory, shutdown_signal()).await
}

/// Serves on `listener` until `shutdown` completes. Then, together: the listener closes and idle
/// connections end, while the engine refuses new work (503), lets in-flight requests finish for
/// `--shutdown-grace` and cancels what is left; the call returns once every connection is done.
pub async fn serve<F, S>(
    listener: TcpListener,
    config: ServerConfig,
    factory: F,
    shutdown: S,
) -> Result<ShutdownReport, ServeError>
where
    F: Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    // Before the engine starts, so its metric descriptions reach the recorder.
    let handle = metrics::handle();
    let engine = Engine::start(config.engine.clone(), factory).await?;
    let grace = config.shutdown_grace;
    let state = AppState::new(engine.clone(), config);
    let upkeep = handle.map(|handle| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    });
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, model = %state.served_model_name(), "listening");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = {
        let engine = engine.clone();
        tokio::spawn(async move {
            // A dropped sender (the server ended on its own) drains too.
            let _ = stop_rx.await;
            engine.shutdown(grace).await
        })
    };
    let reloads = tokio::spawn(reload_keys_on_hangup(state.clone()));
    let header_timeout = state.config().header_timeout;
    let served = listener::serve_http(listener, app(state), header_timeout, async move {
        shutdown.await;
        info!(
            grace_secs = grace.as_secs_f64(),
            "shutdown signal; draining"
        );
        let _ = stop_tx.send(());
    })
    .await;
    let report = drain.await.unwrap_or_else(|err| {
        warn!(%err, "the drain task failed");
        ShutdownReport {
            drained: false,
            cancelled: engine.in_flight(),
            workers_stopped: false,
        }
    });
    if let Some(upkeep) = upkeep {
        upkeep.abort();
    }
    reloads.abort();
    served?;
    info!(?report, "stopped");
    Ok(report)
}

/// Reads `--api-key-file` again on every SIGHUP (without a file, SIGHUP changes nothing, and
/// does not stop the server as it would by default).
async fn reload_keys_on_hangup(state: AppState) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(err) => {
                warn!(%err, "cannot listen for SIGHUP; the API key file is read at start only");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match (&state.config().api_key_file, state.reload_api_keys()) {
                (None, _) => info!("SIGHUP: no --api-key-file to reload"),
                (Some(path), Ok(keys)) => {
                    info!(file = %path.display(), keys, "SIGHUP: API keys reloaded")
                }
                (Some(_), Err(err)) => {
                    tracing::error!(%err, "SIGHUP: API keys not reloaded; the previous keys stay")
                }
            }
        }
    }
    #[cfg(not(unix))]
    drop(state);
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
