//! Faults a production server meets, each with its handling: a backend that panics mid-batch, a
//! worker that hangs, an out-of-memory batch, a `url` image the store cannot keep, a client that
//! sends its headers slowly, a client that leaves a stream mid-generation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use sana_engine::testing::{Failure, FakeBackend, Gate, Latency, Outcome};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::common::*;

/// The retry headers of an answer: `Retry-After` and `x-should-retry`.
fn retry_headers(answer: &Answer) -> (Option<&str>, Option<&str>) {
    (
        answer.header("retry-after"),
        answer.header("x-should-retry"),
    )
}

/// Polls `/ready` until it answers 200 (at most 5 s) and returns its body.
async fn wait_ready(server: &TestServer) -> serde_json::Value {
    for _ in 0..500 {
        let ready = call(&server.app, get("/ready")).await;
        if ready.status == StatusCode::OK {
            return ready.json();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never ready again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_panic_fails_its_batch_with_500_and_the_worker_is_rebuilt() {
    let gate = Gate::closed();
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_gate(gate.clone())
        .fail_on("boom", Failure::Panic);
    let server = server_with(&[], fake).await;
    let spawn = |body: serde_json::Value| {
        let app = server.app.clone();
        tokio::spawn(async move { generate(&app, body).await })
    };
    // One batch runs (held by the gate), one waits in the prefetch slot, so that `boom` and its
    // batch mate queue together and share the next batch.
    let running = spawn(json!({"prompt": "a", "size": "32x32"}));
    let log = server.log.clone();
    wait_until("the first batch runs", || log.served().len() == 1).await;
    let prefetched = spawn(json!({"prompt": "b", "size": "64x32"}));
    let engine = server.engine.clone();
    wait_until("the second is admitted", || engine.in_flight() == 2).await;
    let boom = spawn(json!({"prompt": "boom", "seed": 1}));
    let mate = spawn(json!({"prompt": "mate", "seed": 2}));
    wait_until("both are admitted", || engine.in_flight() == 4).await;
    gate.open();
    for task in [running, prefetched] {
        assert_eq!(task.await.expect("no panic").status, StatusCode::OK);
    }
    for task in [boom, mate] {
        let answer = task.await.expect("no panic");
        let err = answer.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "backend", None);
        assert!(!err.message.contains("injected"), "detail leaked: {err:?}");
    }
    let batches = server.log.served();
    let last = batches.last().expect("batches");
    assert_eq!(last.outcome, Outcome::Panicked);
    assert_eq!(last.items.len(), 2, "boom and its mate shared the batch");
    // Rebuilt (not ready meanwhile), ready, serving.
    let ready = wait_ready(&server).await;
    assert_eq!(ready["workers"][0]["restarts"], 1);
    let after = generate(&server.app, json!({"prompt": "after"})).await;
    assert_eq!(after.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_answered_503_replaced_and_ready_says_so() {
    let rebuild = Gate::closed();
    let fake = FakeBackend::new()
        .with_info(model_info())
        .fail_on("stuck", Failure::Hang);
    let log = fake.log();
    let builds = Arc::new(AtomicUsize::new(0));
    let factory = {
        let (builds, rebuild, make) = (Arc::clone(&builds), rebuild.clone(), fake.factory());
        move |device: &str| {
            if builds.fetch_add(1, Ordering::SeqCst) > 0 {
                rebuild.wait();
            }
            make(device)
        }
    };
    let server = server_from(&["--watchdog-timeout", "300ms"], factory, log).await;
    let started = Instant::now();
    let answer = generate(&server.app, json!({"prompt": "stuck"})).await;
    let err = answer.expect_error(StatusCode::SERVICE_UNAVAILABLE, "worker_hung", None);
    assert!(err.message.contains("retry"), "{err:?}");
    assert_eq!(retry_headers(&answer), (Some("1"), Some("true")));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered by the watchdog, not the request timeout"
    );
    // Not ready while the replacement builds, and it says why.
    let ready = call(&server.app, get("/ready")).await;
    let err = ready.expect_error(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", None);
    assert!(err.message.contains("fake:0: restarting"), "{err:?}");
    assert_eq!(ready.header("retry-after"), Some("1"));
    rebuild.open();
    let ready = wait_ready(&server).await;
    assert_eq!(ready["workers"][0]["restarts"], 1);
    let after = generate(&server.app, json!({"prompt": "after"})).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failures_that_repeat_say_do_not_retry() {
    let fake = FakeBackend::new()
        .with_info(model_info())
        .fail_on("huge", Failure::OutOfMemory)
        .fail_on("flaky", Failure::Error);
    let server = server_with(&[], fake).await;
    let answer = generate(&server.app, json!({"prompt": "huge"})).await;
    let err = answer.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "out_of_memory", None);
    assert!(err.message.contains("smaller"), "{err:?}");
    assert_eq!(retry_headers(&answer), (None, Some("false")));
    // A failure that may pass leaves the choice to the client.
    let answer = generate(&server.app, json!({"prompt": "flaky"})).await;
    answer.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "backend", None);
    assert_eq!(retry_headers(&answer), (None, None));
    // Overload: 429 with both.
    let overloaded = server_with(
        &["--max-concurrent-requests", "1"],
        FakeBackend::new()
            .with_info(model_info())
            .with_gate(Gate::closed()),
    )
    .await;
    let app = overloaded.app.clone();
    let _held = tokio::spawn(async move { generate(&app, json!({"prompt": "held"})).await });
    let engine = overloaded.engine.clone();
    wait_until("the first is admitted", || engine.in_flight() == 1).await;
    let answer = generate(&overloaded.app, json!({"prompt": "second"})).await;
    answer.expect_error(StatusCode::TOO_MANY_REQUESTS, "overloaded", None);
    assert_eq!(retry_headers(&answer), (Some("1"), Some("true")));
}

#[tokio::test]
async fn a_url_image_the_store_cannot_keep_is_a_clear_500_and_b64_json_still_works() {
    // No PNG fits in 64 bytes (its signature and header chunks alone take 45).
    let server = server(&["--url-store-bytes", "64"]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "response_format": "url"}),
    )
    .await;
    let err = answer.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "url_store", None);
    assert_eq!(err.code.as_deref(), Some("url_store_full"));
    for words in ["--url-store-bytes", "64 bytes", "b64_json"] {
        assert!(err.message.contains(words), "{words}: {err:?}");
    }
    assert_eq!(retry_headers(&answer), (None, Some("false")));
    let answer = generate(&server.app, json!({"prompt": "a"})).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.json()["data"][0]["b64_json"].is_string());
}

#[tokio::test]
async fn a_client_that_sends_its_headers_slowly_is_cut_off() {
    let server = server(&[]).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(sana_server::listener::serve_http(
        listener,
        server.app.clone(),
        Duration::from_millis(300),
        std::future::pending(),
    ));
    // A whole request is answered.
    let mut client = TcpStream::connect(addr).await.expect("connects");
    client
        .write_all(b"GET /health HTTP/1.1\r\nHost: sana.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("sent");
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Headers that never end: the server closes the connection after the header timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connects");
    let started = Instant::now();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: sana.test\r\n")
        .await
        .expect("sent");
    let mut trickle = tokio::time::interval(Duration::from_millis(50));
    let mut buf = [0u8; 256];
    let closed = loop {
        tokio::select! {
            read = slow.read(&mut buf) => break read,
            _ = trickle.tick() => {
                // One more header byte now and then keeps the client "active".
                if slow.write_all(b"X").await.is_err() {
                    break Ok(0);
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slow client was never cut off"
        );
    };
    let elapsed = started.elapsed();
    // Closed (EOF or reset), possibly after a 408 answer.
    match closed {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
    assert!(
        elapsed >= Duration::from_millis(250),
        "cut after {elapsed:?}, before the timeout"
    );
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_frees_its_slot_within_one_step() {
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_latency(Latency {
            per_step: Duration::from_millis(20),
            ..Latency::default()
        });
    let server = server_with(&["--max-steps", "1000"], fake).await;
    let response = server
        .app
        .clone()
        .oneshot(post(
            "/v1/images/generations",
            &json!({"prompt": "long", "num_inference_steps": 1000, "stream": true,
                    "progress": true}),
        ))
        .await
        .expect("the router is infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // Read until a few progress events have come, then leave.
    let mut seen = String::new();
    while seen.matches("image_generation.progress").count() < 3 {
        let frame = http_body_util::BodyExt::frame(&mut body)
            .await
            .expect("a frame")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let log = server.log.clone();
    drop(body);
    // Read after leaving: the step the model had reached once the client was gone.
    let at_leave = log.served()[0].steps_run;
    wait_until("the batch ends", || {
        log.served()[0].outcome != Outcome::Running
    })
    .await;
    let batch = &log.served()[0];
    assert_eq!(batch.outcome, Outcome::Cancelled);
    assert!(
        batch.steps_run <= at_leave + 1,
        "left at step {at_leave}, the model ran to step {}",
        batch.steps_run
    );
    let engine = server.engine.clone();
    wait_until("the admission slot returns", || engine.in_flight() == 0).await;
}
