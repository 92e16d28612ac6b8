//! Helpers: a server over a `FakeBackend`, requests, and envelope checks.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use clap::Parser;
use http_body_util::BodyExt;
use sana_engine::sana_backend::{Backend, BackendError, Image, ModelInfo};
use sana_engine::testing::{BatchLog, FakeBackend, RecordedBatch};
use sana_engine::Engine;
use sana_server::error::ErrorDetail;
use sana_server::store::ManualClock;
use sana_server::{app, AppState, ServeArgs, ServerConfig};
use serde_json::Value;
use tower::ServiceExt;

/// Default size of the test model: small, and not square, so a swapped width and height shows.
pub const DEFAULT_WIDTH: u32 = 96;
pub const DEFAULT_HEIGHT: u32 = 64;

/// The fake's model info with a small default size.
pub fn model_info() -> ModelInfo {
    ModelInfo {
        default_width: DEFAULT_WIDTH,
        default_height: DEFAULT_HEIGHT,
        ..FakeBackend::default_info()
    }
}

/// A running engine and the router over it.
pub struct TestServer {
    pub app: Router,
    pub state: AppState,
    pub engine: Engine,
    pub log: BatchLog,
    pub clock: Arc<ManualClock>,
}

/// A server with `flags` added to `sana serve --model fake/sana --devices fake:0
/// --warmup-steps 0`, over the default fake.
pub async fn server(flags: &[&str]) -> TestServer {
    server_with(flags, FakeBackend::new().with_info(model_info())).await
}

/// A server over `fake`.
pub async fn server_with(flags: &[&str], fake: FakeBackend) -> TestServer {
    let log = fake.log();
    server_from(flags, fake.factory(), log).await
}

/// A server whose engine builds its backends with `factory`; `log` is what they record into.
pub async fn server_from<F>(flags: &[&str], factory: F, log: BatchLog) -> TestServer
where
    F: Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static,
{
    let mut argv = vec!["sana serve", "--model", "fake/sana", "--warmup-steps", "0"];
    if !flags.contains(&"--devices") {
        argv.extend(["--devices", "fake:0"]);
    }
    argv.extend_from_slice(flags);
    let args = ServeArgs::try_parse_from(argv).expect("test flags parse");
    let config = ServerConfig::try_from(args).expect("test flags are valid");
    let engine = Engine::start(config.engine.clone(), factory)
        .await
        .expect("the engine starts");
    let clock = ManualClock::new();
    let state = AppState::with_clock(engine.clone(), config, clock.clone());
    TestServer {
        app: app(state.clone()),
        state,
        engine,
        log,
        clock,
    }
}

/// An answer, body collected.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "the body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Asserts the status and the OpenAI envelope (exactly `error` with exactly its four keys)
    /// and returns the error.
    pub fn expect_error(&self, status: StatusCode, kind: &str, param: Option<&str>) -> ErrorDetail {
        let json = self.json();
        assert_eq!(self.status, status, "status of {json}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "errors are JSON: {json}"
        );
        let object = json.as_object().expect("an object");
        assert_eq!(object.len(), 1, "only `error` at the top: {json}");
        let error = object["error"].as_object().expect("`error` is an object");
        let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "message", "param", "type"], "{json}");
        let detail: ErrorDetail =
            serde_json::from_value(object["error"].clone()).expect("the envelope's fields");
        assert_eq!(detail.kind, kind, "type of {json}");
        assert_eq!(detail.param.as_deref(), param, "param of {json}");
        assert!(!detail.message.is_empty());
        detail
    }
}

/// Sends `req` to `app`.
pub async fn call(app: &Router, req: Request<Body>) -> Answer {
    let response = app
        .clone()
        .oneshot(req)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body arrives")
        .to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

/// `POST path` with a JSON body.
pub fn post(path: &str, body: &Value) -> Request<Body> {
    post_raw(path, "application/json", body.to_string())
}

/// `POST path` with any body and content type.
pub fn post_raw(path: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::HOST, "sana.test")
        .body(body.into())
        .expect("a request")
}

/// `GET path`.
pub fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header(header::HOST, "sana.test")
        .body(Body::empty())
        .expect("a request")
}

/// `POST /v1/images/generations`.
pub async fn generate(app: &Router, body: Value) -> Answer {
    call(app, post("/v1/images/generations", &body)).await
}

/// Decodes base64 image bytes.
pub fn b64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    assert!(!text.starts_with("data:"), "b64_json must be plain base64");
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("valid base64")
}

/// Decodes an image, checking its format.
pub fn decode(bytes: &[u8], format: image::ImageFormat) -> image::RgbImage {
    assert_eq!(
        image::guess_format(bytes).expect("a known image format"),
        format
    );
    image::load_from_memory_with_format(bytes, format)
        .expect("the image decodes")
        .to_rgb8()
}

/// Asserts a decoded lossless image is exactly `expected`.
pub fn assert_same_pixels(decoded: &image::RgbImage, expected: &Image, what: &str) {
    assert_eq!(
        (decoded.width(), decoded.height()),
        (expected.width, expected.height),
        "size of {what}"
    );
    assert!(
        decoded.as_raw() == &expected.rgb8,
        "{what} is not the backend's image"
    );
}

/// The batches the fake served (warm-ups excluded).
pub fn served(log: &BatchLog) -> Vec<RecordedBatch> {
    log.served()
}

/// Waits, bounded, until `condition` holds (for state that another thread changes).
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
