//! Per-socket send buffers bounded in bytes (`OH_SOCKET_BUFFER_MIB`).
//!
//! socketioxide bounds a socket's send queue in packets only (`OH_SOCKET_BUFFER`), and one
//! packet can be an event of megabytes: a large history replayed to clients that never read
//! once held gigabytes. It does not say how much of a socket's queue has left, so the gateway
//! measures what its own transport delivered instead:
//! - every TCP connection is wrapped in [`Counted`], which counts the bytes handed to the
//!   kernel ([`ConnBytes`], a request extension of every request on that connection);
//! - a socket's [`Drain`] adds up what reached its client: the bytes written on its websocket
//!   connection since it was attached (a direct websocket connect, or the upgrade request of a
//!   polling socket, seen by [`track`]), plus the bodies of its long-polling responses
//!   (counted by [`track`] as hyper takes them).
//!
//! The forwarding task ([`crate::replay`]) keeps a [`Budget`]: bytes it queued minus bytes
//! delivered since, never below zero. While that is at the limit it does not queue more, so a
//! socket holds at most the limit plus one event; a client that stays there for
//! `OH_SLOW_CLIENT_TIMEOUT_MS` is disconnected as a slow client (it resumes by replay with its
//! cursor). Everything the count misses (pings, acks, framing beyond the packet text) makes
//! deliveries look larger, never smaller, so a client that reads is never taken for a slow
//! one; and the budget floors at zero whenever the queue is drained, so such errors do not
//! accumulate. A socket whose transport cannot be measured (a router served without
//! [`crate::serve`], as in unit tests; a polling socket whose websocket upgrade raced ahead of
//! its connect) is bounded in packets only.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a connection has handed to the kernel.
#[derive(Debug, Default)]
pub(crate) struct ConnBytes(AtomicU64);

impl ConnBytes {
    fn written(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A connection that counts the bytes written to it.
pub(crate) struct Counted<T> {
    inner: T,
    bytes: Arc<ConnBytes>,
}

impl<T> Counted<T> {
    /// Wraps `inner`; the count is shared with every request of the connection.
    pub(crate) fn new(inner: T) -> (Self, Arc<ConnBytes>) {
        let bytes = Arc::new(ConnBytes::default());
        (
            Self {
                inner,
                bytes: Arc::clone(&bytes),
            },
            bytes,
        )
    }

    fn count(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.bytes.0.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What has reached one socket's client.
#[derive(Debug)]
pub(crate) struct Drain {
    /// Bytes of its long-polling response bodies.
    polled: AtomicU64,
    /// Its websocket connection and that connection's count when it was attached.
    ws: OnceLock<(Arc<ConnBytes>, u64)>,
    /// Whether deliveries can be measured at all.
    measured: bool,
}

impl Drain {
    /// The drain of a socket whose first request (`req`) opened it: a websocket on a counted
    /// connection is attached at once; a polling socket is measured through its polls (and its
    /// websocket, if it upgrades).
    pub(crate) fn for_socket(req: &axum::http::request::Parts) -> Self {
        let conn = req.extensions.get::<Arc<ConnBytes>>();
        let transport = transport(req.uri.query());
        let ws = OnceLock::new();
        let measured = match (transport.as_deref(), conn) {
            (Some("websocket"), Some(conn)) => {
                let _ = ws.set((Arc::clone(conn), conn.written())); // fresh: always set
                true
            }
            (Some("polling"), _) => true,
            _ => false,
        };
        Self {
            polled: AtomicU64::new(0),
            ws,
            measured,
        }
    }

    fn delivered(&self) -> u64 {
        let ws = self
            .ws
            .get()
            .map_or(0, |(c, base)| c.written().saturating_sub(*base));
        self.polled.load(Ordering::Relaxed).saturating_add(ws)
    }
}

/// The drains of this gateway's sockets, by socket id (Socket.IO's id is Engine.IO's `sid`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Drains(Arc<Mutex<HashMap<String, Arc<Drain>>>>);

impl Drains {
    pub(crate) fn insert(&self, sid: String, drain: Arc<Drain>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(sid, drain);
        }
    }

    pub(crate) fn remove(&self, sid: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(sid);
        }
    }

    fn get(&self, sid: &str) -> Option<Arc<Drain>> {
        self.0.lock().ok().and_then(|map| map.get(sid).cloned())
    }
}

fn transport(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "transport")
        .map(|(_, v)| v.into_owned())
}

/// Middleware around the Socket.IO layer: attaches a polling socket's websocket upgrade to
/// its drain, and counts its long-polling response bodies.
pub(crate) async fn track(drains: Drains, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/socket.io") {
        return next.run(req).await;
    }
    let mut transport = None;
    let mut sid = None;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "transport" => transport = Some(v.into_owned()),
            "sid" => sid = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(drain) = sid.as_deref().and_then(|s| drains.get(s)) else {
        return next.run(req).await;
    };
    match transport.as_deref() {
        Some("websocket") => {
            if let Some(conn) = req.extensions().get::<Arc<ConnBytes>>() {
                let _ = drain.ws.set((Arc::clone(conn), conn.written())); // first upgrade wins
            }
            next.run(req).await
        }
        Some("polling") if req.method() == axum::http::Method::GET => {
            let resp = next.run(req).await;
            resp.map(|body| Body::new(CountedBody { body, drain }))
        }
        _ => next.run(req).await,
    }
}

/// A response body that adds its bytes to a drain as hyper takes them.
struct CountedBody {
    body: Body,
    drain: Arc<Drain>,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r
            && let Some(data) = frame.data_ref()
        {
            self.drain
                .polled
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Bytes one forwarding task has queued on its socket and not yet seen delivered.
pub(crate) struct Budget {
    drain: Arc<Drain>,
    limit: u64,
    queued: u64,
    seen: u64,
}

impl Budget {
    pub(crate) fn new(drain: Arc<Drain>, limit: usize) -> Self {
        let seen = drain.delivered();
        Self {
            drain,
            limit: limit as u64,
            queued: 0,
            seen,
        }
    }

    /// Whether the socket is at its limit (nothing more may be queued now). `on_websocket`:
    /// the socket's transport now; a polling socket that upgraded before its drain existed
    /// (its upgrade request was not seen) cannot be measured any more, and is then bounded in
    /// packets only rather than taken for a slow client.
    pub(crate) fn full(&mut self, on_websocket: bool) -> bool {
        if !self.drain.measured || (on_websocket && self.drain.ws.get().is_none()) {
            return false;
        }
        let delivered = self.drain.delivered();
        let progress = delivered.saturating_sub(self.seen);
        self.seen = self.seen.max(delivered);
        self.queued = self.queued.saturating_sub(progress);
        self.queued >= self.limit
    }

    /// Records an `oh_event` whose JSON is `json_len` bytes as queued: its packet text
    /// `42["oh_event",…]` (a lower bound of what it takes on the wire).
    pub(crate) fn queued(&mut self, json_len: usize) {
        self.queued = self.queued.saturating_add(json_len as u64 + 15);
    }

    /// Bytes queued and not seen delivered.
    pub(crate) fn pending(&self) -> u64 {
        self.queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, conn: Option<Arc<ConnBytes>>) -> axum::http::request::Parts {
        let mut req = axum::http::Request::builder().uri(uri).body(()).unwrap();
        if let Some(c) = conn {
            req.extensions_mut().insert(c);
        }
        req.into_parts().0
    }

    #[test]
    fn budget_follows_deliveries_and_never_goes_negative() {
        let conn = Arc::new(ConnBytes::default());
        conn.0.store(500, Ordering::Relaxed); // the handshake, before the socket
        let drain = Arc::new(Drain::for_socket(&parts(
            "/socket.io/?EIO=4&transport=websocket",
            Some(Arc::clone(&conn)),
        )));
        let mut b = Budget::new(Arc::clone(&drain), 1000);
        assert!(!b.full(true));
        b.queued(600);
        assert!(!b.full(true));
        b.queued(600);
        assert!(b.full(true), "1230 bytes queued of 1000");
        conn.0.fetch_add(300, Ordering::Relaxed);
        assert!(!b.full(true), "930 left");
        // Deliveries the budget never saw (pings, acks) floor it at zero.
        conn.0.fetch_add(10_000, Ordering::Relaxed);
        assert!(!b.full(true));
        assert_eq!(b.pending(), 0);
        b.queued(985);
        assert!(b.full(true), "no credit carried over");
    }

    #[test]
    fn unmeasured_transports_are_not_byte_bounded() {
        let drain = Arc::new(Drain::for_socket(&parts(
            "/socket.io/?EIO=4&transport=websocket",
            None,
        )));
        let mut b = Budget::new(drain, 10);
        b.queued(1000);
        assert!(!b.full(true));
        let polling = Drain::for_socket(&parts("/socket.io/?EIO=4&transport=polling", None));
        let mut b = Budget::new(Arc::new(polling), 10);
        b.queued(1000);
        assert!(b.full(false), "polling is measured through its polls");
        assert!(
            !b.full(true),
            "an upgrade that was not seen is not measured"
        );
    }
}
