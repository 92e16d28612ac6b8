//! A client that goes away cancels its generation: the model stops between steps and the
//! admission slot comes back.

use std::time::Duration;

use axum::http::StatusCode;
use sana_engine::testing::{FakeBackend, Gate, Latency, Outcome};
use serde_json::json;
use tower::ServiceExt;

use crate::common::*;

/// A fake that waits for `gate`, then takes 5 ms a step: 1000 steps would take 5 s, so a batch
/// that ends early was cancelled.
async fn slow_server(gate: &Gate) -> TestServer {
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_gate(gate.clone())
        .with_latency(Latency {
            per_step: Duration::from_millis(5),
            ..Latency::default()
        });
    server_with(&["--max-steps", "1000"], fake).await
}

fn long_request(stream: bool) -> serde_json::Value {
    json!({"prompt": "long", "size": "32x32", "num_inference_steps": 1000, "stream": stream})
}

async fn assert_cancelled(server: &TestServer) {
    let log = server.log.clone();
    wait_until("the batch ends", || {
        log.served()
            .first()
            .is_some_and(|b| b.outcome != Outcome::Running)
    })
    .await;
    let batch = &log.served()[0];
    assert_eq!(batch.outcome, Outcome::Cancelled, "{batch:?}");
    assert!(batch.steps_run < 1000, "{} steps ran", batch.steps_run);
    let engine = server.engine.clone();
    wait_until("the admission slot returns", || engine.in_flight() == 0).await;
}

#[tokio::test]
async fn leaving_a_stream_cancels_the_generation() {
    let gate = Gate::closed();
    let server = slow_server(&gate).await;
    let response = server
        .app
        .clone()
        .oneshot(post("/v1/images/generations", &long_request(true)))
        .await
        .expect("the router is infallible");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "SSE headers come at once"
    );
    let log = server.log.clone();
    wait_until("the batch starts", || !log.served().is_empty()).await;
    drop(response);
    gate.open();
    assert_cancelled(&server).await;
}

#[tokio::test]
async fn leaving_a_plain_request_cancels_the_generation() {
    let gate = Gate::closed();
    let server = slow_server(&gate).await;
    let app = server.app.clone();
    let client = tokio::spawn(async move { generate(&app, long_request(false)).await });
    let log = server.log.clone();
    wait_until("the batch starts", || !log.served().is_empty()).await;
    client.abort();
    assert!(client.await.is_err_and(|err| err.is_cancelled()));
    gate.open();
    assert_cancelled(&server).await;
}
