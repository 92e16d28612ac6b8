//! Everything but image generation: models, health, readiness, info, metrics, the OpenAPI
//! document, and the envelopes of unknown routes and methods.

use axum::extract::{Path, State};
use axum::http::{header, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sana_engine::WorkerHealth;

use crate::config::MAX_PARTIAL_IMAGES;
use crate::error::{ApiError, ErrorResponse};
use crate::state::AppState;
use crate::types::{
    Defaults, HealthResponse, InfoResponse, Limits, LoraAdapter, Model, ModelList, Quality,
    QualitySteps, ReadyResponse, WorkerInfo,
};

fn model(state: &AppState) -> Model {
    Model {
        id: state.served_model_name().to_owned(),
        object: "model".into(),
        created: state.started_unix(),
        owned_by: "sana-server".into(),
        lora_adapters: state
            .engine()
            .info()
            .loras
            .iter()
            .map(|l| LoraAdapter {
                name: l.name.clone(),
                source: l.source.clone(),
                modules: l.modules,
                ranks: l.ranks.clone(),
            })
            .collect(),
        controlnets: state.engine().info().controlnets.clone(),
    }
}

/// Lists the served model (OpenAI `GET /v1/models`).
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, body = ModelList), (status = 401, body = ErrorResponse)),
    security(("api_key" = [])))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![model(&state)],
    })
}

/// One model by name (OpenAI `GET /v1/models/{model}`); the loaded model's id works too, slashes
/// and all (`/v1/models/Efficient-Large-Model/Sana_1600M_1024px_diffusers`).
#[utoipa::path(get, path = "/v1/models/{model}", tag = "models",
    params(("model" = String, Path, description = "The served model name")),
    responses((status = 200, body = Model), (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse)),
    security(("api_key" = [])))]
pub async fn model_by_name(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Model>, ApiError> {
    if name == state.served_model_name() || name == state.engine().info().model_id {
        Ok(Json(model(&state)))
    } else {
        Err(ApiError::model_not_found(format!(
            "model `{name}` is not served here; this server serves `{}`",
            state.served_model_name()
        )))
    }
}

/// Liveness: the process answers. Never needs a key.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = HealthResponse)))]
pub async fn health(State(state): State<AppState>) -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        api_key_required: state.config().api_keys.is_enabled(),
    })
}

fn workers(health: &[WorkerHealth]) -> Vec<WorkerInfo> {
    health
        .iter()
        .map(|worker| WorkerInfo {
            device: worker.device.clone(),
            state: worker.state.as_str().into(),
            restarts: worker.restarts,
        })
        .collect()
}

/// Readiness: the model is loaded, a worker can serve and the server is not shutting down.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = ReadyResponse), (status = 401, body = ErrorResponse),
        (status = 503, description = "Not ready: shutting down, or no worker ready (loading, rebuilding after a panic, replacing a hung worker); the message names each worker's state", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"),
                ("x-should-retry" = String, description = "`true`")))),
    security(("api_key" = [])))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<ReadyResponse>, ApiError> {
    let health = state.engine().health();
    if health.is_ready() {
        return Ok(Json(ReadyResponse {
            status: "ready".into(),
            workers: workers(&health.workers),
        }));
    }
    let states: Vec<String> = health
        .workers
        .iter()
        .map(|w| format!("{}: {}", w.device, w.state.as_str()))
        .collect();
    let states = states.join(", ");
    tracing::warn!(workers = %states, "not ready");
    Err(ApiError::not_ready(health.shutting_down, &states))
}

/// What is served and what a request may ask for.
#[utoipa::path(get, path = "/info", tag = "operations",
    responses((status = 200, body = InfoResponse), (status = 401, body = ErrorResponse)),
    security(("api_key" = [])))]
pub async fn info(State(state): State<AppState>) -> Json<InfoResponse> {
    let engine = state.engine();
    let model = engine.info();
    let config = engine.config();
    let quality = |q: Quality| q.steps(model.default_steps, config.max_steps);
    Json(InfoResponse {
        served_model_name: state.served_model_name().to_owned(),
        model_id: model.model_id.clone(),
        dtype: model.dtype.clone(),
        device: model.device.clone(),
        workers: workers(&engine.health().workers),
        version: env!("CARGO_PKG_VERSION").into(),
        limits: Limits {
            min_width: model.min_width,
            min_height: model.min_height,
            max_width: model.max_width,
            max_height: model.max_height,
            size_multiple: model.size_multiple,
            max_n: config.max_n,
            max_steps: config.max_steps,
            max_prompt_chars: config.max_prompt_chars,
            max_partial_images: MAX_PARTIAL_IMAGES.min(config.max_previews),
            max_batch_images: engine.limits().max_images,
            max_concurrent_requests: config.max_concurrent_requests,
            max_body_bytes: state.config().max_body_bytes,
            max_upload_bytes: state.config().max_upload_bytes,
            request_timeout_secs: state.config().request_timeout.as_secs_f64(),
        },
        defaults: Defaults {
            size: format!("{}x{}", model.default_width, model.default_height),
            num_inference_steps: model.default_steps,
            guidance_scale: model.default_guidance_scale,
            sampler: model.default_sampler.as_str().into(),
        },
        quality_steps: QualitySteps {
            low: quality(Quality::Low),
            medium: quality(Quality::Medium),
            high: quality(Quality::High),
        },
    })
}

/// Prometheus metrics (`sana_*`; see the engine's `metrics` module for the names).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, body = ErrorResponse)),
    security(("api_key" = [])))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics() {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::internal("no Prometheus recorder is installed in this process")
            .into_response(),
    }
}

/// This API's OpenAPI document: the committed `openapi.yaml` narrowed to this server's model and
/// limits (sizes, `n`, steps, prompt length; no `security` without keys).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object),
        (status = 401, body = ErrorResponse)),
    security(("api_key" = [])))]
pub async fn openapi(State(state): State<AppState>) -> Json<serde_json::Value> {
    let engine = state.engine();
    let model = engine.info();
    let config = engine.config();
    Json(crate::openapi::served(&crate::openapi::ServedLimits {
        api_key_required: state.config().api_keys.is_enabled(),
        served_model_name: state.served_model_name().to_owned(),
        model_id: model.model_id.clone(),
        min_width: model.min_width,
        min_height: model.min_height,
        max_width: model.max_width,
        max_height: model.max_height,
        size_multiple: model.size_multiple,
        default_size: format!("{}x{}", model.default_width, model.default_height),
        max_n: config.max_n,
        max_steps: config.max_steps,
        max_prompt_chars: config.max_prompt_chars,
        loras: model.loras.iter().map(|l| l.name.clone()).collect(),
        transformer_layers: model.transformer_layers,
        pag_supported: model.pag_supported,
        controlnets: model.controlnets.clone(),
    }))
}

/// 404 for every unknown path.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(
        "unknown_route",
        format!(
            "no route {method} {}; see GET /openapi.json for this API",
            uri.path()
        ),
    )
}

/// 405 for a known path with a method it does not take; axum adds the `Allow` header.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
