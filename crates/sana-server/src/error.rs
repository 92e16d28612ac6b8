//! The one place errors become HTTP: [`ApiError`] → status + OpenAI error envelope
//! `{"error":{"message","type","param","code"}}`, plus [`ApiJson`], the body extractor that turns
//! malformed JSON, wrong types and unknown fields into that envelope too.
//!
//! Status policy:
//! - **400** `invalid_request`: the body is not a request of this API: malformed JSON, a wrong type,
//!   an unknown field, a value outside a field's enumeration or format, a combination the API never
//!   accepts (`background: "transparent"`, `stream` with `url`);
//! - **400** `validation`: a well-formed request beyond this model's or server's limits (size, `n`,
//!   steps, prompt length), from the engine's validation. OpenAI answers every invalid parameter
//!   with 400, and its SDKs raise `BadRequestError` for it, so both kinds share the status and
//!   differ in `type`;
//! - 401 `authentication`, 404 `not_found`, 405 `method_not_allowed`, 413 `payload_too_large`,
//!   415 `unsupported_media_type`, 429 `rate_limited` (per-key limit) or `overloaded` (admission),
//!   both with `Retry-After`;
//! - 5xx: 503 `unhealthy`/`worker_hung`/`shutting_down`/`cancelled` with `Retry-After`, 504 `timeout`, 500
//!   `backend`/`internal`, and 500 `out_of_memory`/`model`/`url_store` for failures the same
//!   request meets again. 5xx messages say no more than that; the detail goes to the log.
//!
//! Retries: every 429 and 503 carries `Retry-After` and `x-should-retry: true`; the failures that
//! repeat carry `x-should-retry: false`, which OpenAI's SDKs obey over their default of retrying
//! every 5xx; other 5xx leave the choice to the client.
//!
//! `type` is the engine's `EngineError::error_type()` where the engine is the source, so the
//! envelope and the `sana_request_failure{err=…}` metric use the same words.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sana_engine::EngineError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// Seconds a client should wait before retrying after `overloaded` or a 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The OpenAI error envelope.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
#[schema(example = json!({"error": {"message": "`n` must be between 1 and 4, got 9; ask for fewer images per request", "type": "validation", "param": "n", "code": "invalid_value"}}))]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The body of [`ErrorResponse`]; all four keys are always present.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// What is wrong and how to fix it; names the field, the limit and the value given.
    pub message: String,
    /// The error class (`invalid_request`, `validation`, `authentication`, `overloaded`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A finer machine-readable code (`invalid_value`, `unknown_parameter`, …), when there is one.
    pub code: Option<String>,
}

/// An error answer. Build it with the constructors; `IntoResponse` writes the envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
    /// `x-should-retry`: OpenAI's SDKs obey it over their own rules (which retry every 5xx).
    should_retry: Option<bool>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self.should_retry = Some(true);
        self
    }

    /// A failure the same request meets again: clients should not retry it as is.
    fn final_failure(mut self) -> Self {
        self.should_retry = Some(false);
        self
    }

    /// 503 from `/ready`, naming each worker's state.
    pub fn not_ready(shutting_down: bool, workers: &str) -> Self {
        let err = if shutting_down {
            EngineError::ShuttingDown
        } else {
            EngineError::Unhealthy
        };
        let mut api = Self::from(err);
        api.message = format!("not ready: {} (workers: {workers})", api.message);
        api
    }

    /// 500: a `url` image does not fit the image store.
    pub fn url_store_full(err: &crate::store::TooLarge) -> Self {
        tracing::error!(%err, "url store refused an image");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "url_store",
            format!(
                "this server cannot keep the image for a link: {err}; ask for \
                 `response_format: \"b64_json\"` to get the image in the answer"
            ),
        )
        .code("url_store_full")
        .final_failure()
    }

    /// 400: a field holds a value the API never accepts.
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
            .param(param)
            .code("invalid_value")
    }

    /// 400: the body is not a request of this API, with a finer `code`.
    pub fn invalid_request(
        param: Option<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        let mut err = Self::new(StatusCode::BAD_REQUEST, "invalid_request", message).code(code);
        err.param = param;
        err
    }

    /// 415: the body is not of the content type the route takes.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
        .code("unsupported_media_type")
    }

    /// 401: no key, or an unknown one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication", message).code("invalid_api_key")
    }

    /// 404 with a finer `code`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message).code(code)
    }

    /// 404 for `model`.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self::not_found("model_not_found", message).param("model")
    }

    /// 405 for a known path with another method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}; see the `Allow` header for the methods it takes"),
        )
        .code("method_not_allowed")
    }

    /// 413 for a body over `limit` bytes.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request body is larger than this server's limit of {limit} bytes \
                 (--max-body-bytes); send a smaller body"
            ),
        )
        .code("payload_too_large")
    }

    /// 429 from the per-key rate limit.
    pub fn rate_limited(per_minute: u32, retry_after: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "rate limit of {per_minute} image generations per minute reached for this API \
                 key; retry after {retry_after} s"
            ),
        )
        .code("rate_limit_exceeded")
        .retry_after(retry_after)
    }

    /// 504: the request outlived `--request-timeout`.
    pub fn timeout(limit: std::time::Duration) -> Self {
        Self::from(EngineError::Timeout(limit))
    }

    /// 500 with a generic message; `detail` goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to answer this request; see the server log",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The envelope's `type`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The envelope.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

/// The request field a client sent for an engine parameter, and the message spelled with it.
fn client_param(param: &'static str, message: String, size: Option<&str>) -> (String, String) {
    match param {
        "width" | "height" => {
            let given =
                size.map_or_else(|| "the default size".to_owned(), |size| format!("`{size}`"));
            ("size".into(), format!("`size` is {given}: {message}"))
        }
        "steps" => (
            "num_inference_steps".into(),
            message.replace("`steps`", "`num_inference_steps`"),
        ),
        "previews" => (
            "partial_images".into(),
            format!("`partial_images`: {message}"),
        ),
        other => (other.into(), message),
    }
}

impl ApiError {
    /// Maps an engine error, naming request fields as the client spelled them (`size` for the
    /// engine's width/height, `num_inference_steps` for steps, `partial_images` for previews).
    /// `size` is the `size` string of the request, if any.
    pub fn from_engine(err: EngineError, size: Option<&str>) -> Self {
        match err {
            EngineError::Validation(validation) => {
                let mut api = Self::new(
                    StatusCode::BAD_REQUEST,
                    "validation",
                    validation.message.clone(),
                )
                .code("invalid_value");
                if let Some(param) = validation.param {
                    let (param, message) = client_param(param, validation.message, size);
                    api.param = Some(param);
                    api.message = message;
                }
                api
            }
            err @ EngineError::Overloaded { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                err.error_type(),
                err.to_string(),
            )
            .code("overloaded")
            .retry_after(RETRY_AFTER_SECS),
            err @ EngineError::Timeout(_) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                err.error_type(),
                err.to_string(),
            ),
            err @ (EngineError::Unhealthy
            | EngineError::WorkerHung { .. }
            | EngineError::ShuttingDown
            | EngineError::Cancelled) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                err.error_type(),
                err.to_string(),
            )
            .retry_after(RETRY_AFTER_SECS),
            EngineError::OutOfMemory(detail) => {
                tracing::error!(error = %detail, "out of memory");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "out_of_memory",
                    "the device ran out of memory generating this request's batch; a smaller \
                     size or fewer images (`n`) may fit, the same request will fail again",
                )
                .final_failure()
            }
            EngineError::Model(detail) => {
                tracing::error!(error = %detail, "the model cannot run a request");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "model",
                    "the model as loaded cannot run this request (its config or weights are \
                     wrong; see the server log); the same request will fail again",
                )
                .final_failure()
            }
            err => {
                tracing::error!(error = %err, "generation failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    err.error_type(),
                    "image generation failed; see the server log",
                )
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        Self::from_engine(err, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!(crate::metrics::HTTP_FAILURE, "err" => self.kind).increment(1);
        let mut response = (self.status, axum::Json(self.body())).into_response();
        // Every 429 and 503 says when to come back.
        let retry_after = self.retry_after.or(matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        .then_some(RETRY_AFTER_SECS));
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(retry) = retry_after.map(|_| true).or(self.should_retry) {
            response.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A JSON body deserialized with our errors: 415 unless `Content-Type` is JSON, 413 past
/// `--max-body-bytes`, 400 naming the field for malformed JSON, wrong types, unknown or missing
/// fields.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            let given = if content_type.is_empty() {
                "none".to_owned()
            } else {
                format!("`{content_type}`")
            };
            return Err(Self::unsupported_media_type(&given));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.max_body_bytes())
            } else {
                ApiError::invalid_request(
                    None,
                    "invalid_body",
                    format!("the request body could not be read: {rejection}"),
                )
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

impl<T> ApiJson<T> {
    fn unsupported_media_type(given: &str) -> ApiError {
        ApiError::unsupported_media_type(format!(
            "the body must be JSON with `Content-Type: application/json`, got content type {given}"
        ))
    }
}

/// Deserializes `bytes`, turning serde's error into a 400 that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would also read a struct from an array of its fields in order; only objects are
    // requests.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid_request(
            None,
            "invalid_json",
            "the request body must be a JSON object, e.g. {\"prompt\": \"a fox\"}",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(json_error)?;
    deserializer.end().map_err(|err| {
        ApiError::invalid_request(
            None,
            "invalid_json",
            format!("the request body is not valid JSON: {err}"),
        )
    })?;
    Ok(value)
}

fn json_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    if !inner.is_data() {
        return ApiError::invalid_request(
            None,
            "invalid_json",
            format!("the request body is not valid JSON: {inner}"),
        );
    }
    // serde's message without the ` at line L column C` suffix.
    let full = inner.to_string();
    let text = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(text, _)| text);
    let quoted = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned)
    };
    if let Some(field) = quoted("unknown field `") {
        let known = text
            .split_once(", expected ")
            .map_or("", |(_, known)| known);
        return ApiError::invalid_request(
            Some(field.clone()),
            "unknown_parameter",
            format!(
                "unknown parameter `{field}`; this server accepts {known}. Remove it or check \
                 its spelling"
            ),
        );
    }
    if let Some(field) = quoted("missing field `") {
        return ApiError::invalid_request(
            Some(field.clone()),
            "missing_parameter",
            format!("`{field}` is required"),
        );
    }
    let param = (path != "." && !path.is_empty()).then_some(path);
    let message = match &param {
        Some(param) => format!("`{param}`: {text}"),
        None => format!("the request body must be a JSON object: {text}"),
    };
    let code = if text.starts_with("invalid type") {
        "invalid_type"
    } else {
        "invalid_value"
    };
    ApiError::invalid_request(param, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        prompt: String,
        n: Option<u32>,
    }

    fn parse_err(json: &str) -> ErrorDetail {
        parse_json::<Body>(json.as_bytes())
            .expect_err("an invalid body")
            .body()
            .error
    }

    #[test]
    fn json_errors_name_the_field() {
        let err = parse_err(r#"{"prompt": "a", "n": "two"}"#);
        assert_eq!(err.param.as_deref(), Some("n"));
        assert_eq!(err.code.as_deref(), Some("invalid_type"));
        assert!(
            err.message
                .starts_with("`n`: invalid type: string \"two\", expected u32"),
            "{}",
            err.message
        );
        assert!(!err.message.contains("line 1"), "{}", err.message);

        let err = parse_err(r#"{"prompt": "a", "steps": 3}"#);
        assert_eq!(err.param.as_deref(), Some("steps"));
        assert_eq!(err.code.as_deref(), Some("unknown_parameter"));
        assert!(
            err.message.contains("`prompt`"),
            "lists the known fields: {}",
            err.message
        );

        let err = parse_err(r#"{"n": 1}"#);
        assert_eq!(err.param.as_deref(), Some("prompt"));
        assert_eq!(err.code.as_deref(), Some("missing_parameter"));

        let err = parse_err(r#"{"prompt": "a""#);
        assert_eq!(
            (err.param, err.code.as_deref()),
            (None, Some("invalid_json"))
        );

        let err = parse_err(r#"{"prompt": "a"} trailing"#);
        assert_eq!(err.code.as_deref(), Some("invalid_json"));

        for body in [r#"["a fox", 1]"#, "", "  ", "null", "\"a fox\""] {
            let err = parse_err(body);
            assert_eq!(
                (err.param, err.code.as_deref()),
                (None, Some("invalid_json")),
                "{body:?}"
            );
            assert!(err.message.contains("JSON object"), "{}", err.message);
        }
    }

    #[test]
    fn engine_errors_map_to_statuses_and_client_field_names() {
        use sana_engine::ValidationError;
        let width = EngineError::Validation(ValidationError {
            param: Some("width"),
            message: "`width` must be a multiple of 32 between 32 and 2048, got 500".into(),
        });
        let err = ApiError::from_engine(width, Some("500x512"));
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let body = err.body().error;
        assert_eq!(body.param.as_deref(), Some("size"));
        assert!(
            body.message
                .starts_with("`size` is `500x512`: `width` must be"),
            "{}",
            body.message
        );

        let steps = EngineError::Validation(ValidationError {
            param: Some("steps"),
            message: "`steps` must be between 1 and 100, got 0".into(),
        });
        let body = ApiError::from(steps).body().error;
        assert_eq!(body.param.as_deref(), Some("num_inference_steps"));
        assert_eq!(
            body.message,
            "`num_inference_steps` must be between 1 and 100, got 0"
        );

        let cases = [
            (
                EngineError::Overloaded {
                    max_concurrent_requests: 2,
                },
                StatusCode::TOO_MANY_REQUESTS,
                true,
            ),
            (
                EngineError::Timeout(Duration::from_secs(1)),
                StatusCode::GATEWAY_TIMEOUT,
                false,
            ),
            (
                EngineError::Unhealthy,
                StatusCode::SERVICE_UNAVAILABLE,
                true,
            ),
            (
                EngineError::ShuttingDown,
                StatusCode::SERVICE_UNAVAILABLE,
                true,
            ),
            (
                EngineError::Cancelled,
                StatusCode::SERVICE_UNAVAILABLE,
                true,
            ),
            (
                EngineError::WorkerHung {
                    device: "cuda:0".into(),
                    silent: Duration::from_secs(300),
                },
                StatusCode::SERVICE_UNAVAILABLE,
                true,
            ),
            (
                EngineError::Backend("CUDA_ERROR_LAUNCH_FAILED at 0xdead".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                false,
            ),
            (
                EngineError::OutOfMemory("CUDA_ERROR_OUT_OF_MEMORY at 0xdead".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                false,
            ),
            (
                EngineError::Model("shape mismatch at 0xdead".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                false,
            ),
        ];
        for (engine, status, retry) in cases {
            // Retry-After and `x-should-retry: true` together; `false` where the same request
            // fails the same way; nothing where a retry may help (the SDK decides).
            let should_retry = match &engine {
                EngineError::OutOfMemory(_) | EngineError::Model(_) => Some("false"),
                _ if retry => Some("true"),
                _ => None,
            };
            let kind = engine.error_type();
            let err = ApiError::from(engine);
            assert_eq!(err.status(), status, "{kind}");
            assert_eq!(
                err.kind(),
                kind,
                "the envelope type is the engine's error type"
            );
            let response = err.clone().into_response();
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                retry,
                "{kind}"
            );
            assert_eq!(
                response
                    .headers()
                    .get("x-should-retry")
                    .and_then(|v| v.to_str().ok()),
                should_retry,
                "{kind}"
            );
            assert!(
                !err.body().error.message.contains("0xdead"),
                "5xx detail leaked: {err:?}"
            );
        }
    }
}
