//! The HTTP server loop: axum's `serve`, plus what it does not offer, a limit on how long a
//! client may take to send a request's headers (`OH_HEADER_READ_TIMEOUT_S`). Without it a
//! client that sends headers slowly, or half a request and nothing more (slowloris), holds a
//! connection and its buffers forever. A connection idle between keep-alive requests is closed
//! after the same time. Websocket upgrades and long-polling are unaffected: their headers
//! arrive at once. Every connection counts the bytes written to it, for the per-socket send
//! budgets (`sendbuf`).
//!
//! Shutdown mirrors axum's: on `cancel` the listener closes, every connection is asked to
//! finish its request in flight and close, and the loop returns once they have (Socket.IO
//! sockets are closed by the app at the same moment).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use crate::sendbuf::Counted;

/// Serves `router` on `listener` until `cancel`, then shuts down gracefully.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    cancel: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // E.g. out of file descriptors: wait instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small Socket.IO frames must leave at once: without TCP_NODELAY, Nagle's algorithm
        // and delayed ACKs add ~40 ms to every reply (measured by the load tool).
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
        // Counted, so a socket's send budget sees what its client has read (`sendbuf`).
        let (tcp, written) = Counted::new(tcp);
        let service = router.clone().map_request(move |req: Request<Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(Arc::clone(&written));
            req
        });
        let service = TowerToHyperService::new(service);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let mut conn = pin!(conn);
            tokio::select! {
                result = conn.as_mut() => return log_end(result),
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            log_end(conn.await);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn log_end(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        debug!(error = %e, "connection ended with an error");
    }
}
