//! No API key is ever logged: every event of the server (TRACE and up) goes to one global
//! subscriber while requests present good, wrong, malformed and rate-limited keys. Its own test
//! binary, so that no other test's thread registers the log call sites first without a
//! subscriber (tracing caches that per call site).

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{header, Request};
use clap::Parser;
use http_body_util::BodyExt;
use sana_engine::testing::FakeBackend;
use sana_engine::Engine;
use sana_server::{app, AppState, ServeArgs, ServerConfig};
use tower::ServiceExt;

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn send(app: &axum::Router, req: Request<Body>) -> Bytes {
    let response = app.clone().oneshot(req).await.expect("infallible");
    response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes()
}

#[tokio::test]
async fn no_key_is_ever_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let dir = std::env::temp_dir().join(format!("sana-no-key-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let file = dir.join("keys");
    std::fs::write(&file, "sk-secret-file\n").expect("written");
    let args = ServeArgs::try_parse_from([
        "sana serve",
        "--model",
        "fake/sana",
        "--devices",
        "fake:0",
        "--warmup-steps",
        "0",
        "--api-key",
        "sk-secret-flag",
        "--api-key-file",
        file.to_str().expect("utf-8"),
        "--rate-limit",
        "1",
    ])
    .expect("flags parse");
    tracing::info!(?args, "parsed");
    let config = ServerConfig::try_from(args).expect("valid");
    tracing::info!(?config, "starting");
    let engine = Engine::start(config.engine.clone(), FakeBackend::new().factory())
        .await
        .expect("starts");
    let state = AppState::new(engine, config);
    let app = app(state.clone());
    for value in [
        "Bearer sk-secret-flag",
        "Bearer sk-secret-file",
        "Bearer sk-secret-wrong",
        "Basic sk-secret-basic",
        "sk-secret-bare",
    ] {
        let with_key = |req: Request<Body>| {
            let (mut parts, body) = req.into_parts();
            parts
                .headers
                .insert(header::AUTHORIZATION, value.parse().expect("a value"));
            Request::from_parts(parts, body)
        };
        let get = |path: &str| Request::get(path).body(Body::empty()).expect("a request");
        send(&app, with_key(get("/ready"))).await;
        for _ in 0..2 {
            // The second is over the rate limit.
            let post = Request::post("/v1/images/generations")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"prompt": "a", "size": "32x32"}"#))
                .expect("a request");
            send(&app, with_key(post)).await;
        }
    }
    state.reload_api_keys().expect("reloaded");
    std::fs::write(&file, "\n").expect("emptied");
    state.reload_api_keys().expect_err("no key in the file");
    let log = String::from_utf8(captured.0.lock().expect("not poisoned").clone()).expect("utf-8");
    for expected in [
        "starting",
        "answered",
        "status=200",
        "status=401",
        "status=429",
    ] {
        assert!(log.contains(expected), "{expected} was not logged:\n{log}");
    }
    assert!(!log.contains("sk-secret"), "a key was logged:\n{log}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
