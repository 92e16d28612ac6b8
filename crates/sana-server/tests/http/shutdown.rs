//! `serve` over a loopback socket: a shutdown signal lets in-flight requests finish through the
//! engine's drain, refuses new work, and returns once every connection is answered.

use std::time::Duration;

use clap::Parser;
use sana_engine::testing::{FakeBackend, Gate};
use sana_server::{serve, ServeArgs, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// One HTTP/1.1 exchange on a fresh connection; returns the raw response.
async fn exchange(addr: std::net::SocketAddr, request: String) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("the server accepts");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("the request is sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("the response is read");
    response
}

fn generation(body: &str) -> String {
    format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: sana.test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_requests_then_stops() {
    let args = ServeArgs::try_parse_from([
        "sana serve",
        "--model",
        "fake/sana",
        "--devices",
        "fake:0",
        "--warmup-steps",
        "0",
        "--shutdown-grace",
        "10s",
    ])
    .expect("flags");
    let config = ServerConfig::try_from(args).expect("valid");
    let gate = Gate::closed();
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_gate(gate.clone());
    let log = fake.log();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("an address");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, config, fake.factory(), async move {
        let _ = stop_rx.await;
    }));

    let in_flight = tokio::spawn(exchange(
        addr,
        generation(r#"{"prompt": "in flight", "size": "32x32"}"#),
    ));
    wait_until("the request reaches the model", || !log.served().is_empty()).await;
    stop_tx.send(()).expect("the server listens for the signal");
    gate.open();
    let response = in_flight.await.expect("the client task");
    assert!(
        response.starts_with("HTTP/1.1 200 OK"),
        "in-flight request answered: {response}"
    );
    assert!(response.contains("\"b64_json\""), "{response}");

    let report = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("serve returns after the drain")
        .expect("the server task")
        .expect("serve succeeds");
    assert!(report.drained, "{report:?}");
    assert_eq!(report.cancelled, 0);
    assert!(report.workers_stopped, "{report:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
