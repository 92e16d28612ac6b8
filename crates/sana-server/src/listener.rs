//! The HTTP/1.1 accept loop: hyper's connection builder with a header read timeout (which
//! `axum::serve` does not expose), and graceful shutdown.
//!
//! A client that opens a connection and sends its headers slowly, a byte at a time, would hold
//! a connection and its task for as long as it likes; with `--header-timeout` hyper closes the
//! connection when a request's headers are not complete in time. On shutdown the listener
//! closes at once (new connections are refused), idle connections close, and the loop waits for
//! every request in flight to be answered.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for the
/// open connections' requests to finish.
pub async fn serve_http<S>(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: S,
) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send,
{
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors or a connection reset before accept: not fatal, and
                    // retrying at once would spin.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "cannot set TCP_NODELAY");
        }
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%remote, %err, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
