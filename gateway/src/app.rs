//! Shared state and the assembled router: REST under `/api`, Socket.IO at `/socket.io`,
//! `/healthz`, `/readyz`, `/metrics`, and the web UI (`web`) at `/`.
//!
//! Every task the gateway spawns goes through [`Inner::tasks`], so shutdown can wait for all
//! of them (axum's graceful-shutdown model: stop accepting, close sockets, join the tasks).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use metrics_exporter_prometheus::PrometheusHandle;
use shared::config::AuthTokens;
use shared::store::Store;
use socketioxide::SocketIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::fanout::Fanout;
use crate::origin::AllowedOrigins;

/// Largest `oh_user_action` payload accepted (OpenHands' `max_http_buffer_size`).
pub(crate) const MAX_ACTION_BYTES: usize = 4 * 1024 * 1024;
/// Largest REST request body accepted (a `replay_json` trajectory can be large).
pub(crate) const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

pub(crate) struct Inner {
    pub(crate) nats: async_nats::Client,
    pub(crate) store: Store,
    pub(crate) redis: redis::aio::ConnectionManager,
    pub(crate) auth: AuthTokens,
    pub(crate) fanout: Fanout,
    pub(crate) metrics: PrometheusHandle,
    /// How long a client may keep its send buffer full (see `replay`).
    pub(crate) slow_client_timeout: Duration,
    /// Bytes a socket may have queued for sending (see `sendbuf`).
    pub(crate) socket_buffer_bytes: usize,
    /// What each socket's client has read (see `sendbuf`).
    pub(crate) drains: crate::sendbuf::Drains,
    /// Largest `replay_json` accepted (bytes).
    pub(crate) max_replay_bytes: usize,
    /// `OH_LLM_MODELS`: the models offered to the UI.
    pub(crate) llm_models: Vec<String>,
    /// Per-user rates and caps (see `limits`).
    pub(crate) limits: crate::limits::Limits,
    /// This gateway's id (presence entries, socket entries).
    pub(crate) gateway_id: String,
    /// This gateway's sockets in the per-user socket sets.
    pub(crate) held_sockets: crate::limits::HeldSockets,
    /// Connects past the middleware not yet confirmed by `on_connect` (see `socket`).
    pub(crate) unconfirmed: crate::socket::Unconfirmed,
    /// Conversations created here moments ago (their connect reads less).
    pub(crate) recent: crate::recent::Recent,
    /// Every task the gateway spawns; `run` closes it and waits (bounded) on shutdown.
    pub(crate) tasks: TaskTracker,
}

/// State shared by every handler.
#[derive(Clone)]
pub(crate) struct AppState(pub(crate) Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// The state of one gateway: its connections, and the settings handlers read from `args`.
    pub(crate) fn new(
        (nats, store, redis): (async_nats::Client, Store, redis::aio::ConnectionManager),
        args: &crate::Args,
        metrics: PrometheusHandle,
        gateway_id: &str,
    ) -> Self {
        let tasks = TaskTracker::new();
        let fanout = Fanout::new(
            nats.clone(),
            store.clone(),
            redis.clone(),
            gateway_id,
            tasks.clone(),
        );
        Self(Arc::new(Inner {
            nats,
            store,
            redis,
            auth: args.auth_tokens.clone(),
            fanout,
            metrics,
            slow_client_timeout: args.slow_client_timeout,
            socket_buffer_bytes: args.socket_buffer_mib as usize * 1024 * 1024,
            drains: crate::sendbuf::Drains::default(),
            max_replay_bytes: args.max_replay_mib as usize * 1024 * 1024,
            llm_models: args.llm_models.clone(),
            limits: args.limits(),
            gateway_id: gateway_id.to_owned(),
            held_sockets: crate::limits::HeldSockets::default(),
            unconfirmed: crate::socket::Unconfirmed::default(),
            recent: crate::recent::Recent::default(),
            tasks,
        }))
    }
}

/// The whole router. `request_timeout` bounds each REST request (503 when exceeded); the
/// Socket.IO layer sits outside it, so websockets and long-polling are never cut.
pub(crate) fn router(
    state: AppState,
    socket_buffer: usize,
    request_timeout: Duration,
    allowed_origins: AllowedOrigins,
    web: crate::web::Web,
    cancel: CancellationToken,
) -> Router {
    let (sio_layer, io) = SocketIo::builder()
        .with_state(state.clone())
        // Polling payloads: room for a 4 MiB action plus framing; the handler refuses > 4 MiB
        // with an error event, so the connection survives.
        .max_payload(16 * 1024 * 1024)
        .ws_max_message_size(16 * 1024 * 1024)
        .ws_max_frame_size(16 * 1024 * 1024)
        .max_buffer_size(socket_buffer)
        // Read buffer per websocket, allocated (and zero-filled) at connect and kept for the
        // socket's life. Client frames are small (actions, pongs); a larger frame still gets
        // a buffer of its own size, only read in 1 KiB steps. 4 KiB (the default) × 10k
        // idle sockets was 40 MiB (heaptrack, BENCHMARKS.md `many`).
        .ws_read_buffer_size(1024)
        // From the Engine.IO open to the namespace connect, middleware included (see
        // `socket`: its reads are tried again for up to 10 s while NATS fails transiently).
        // An open that never sends CONNECT is held this long (socketioxide's default: 45 s).
        .connect_timeout(Duration::from_secs(20))
        .build_layer();
    crate::socket::register(&io, cancel.clone());
    // On shutdown, close every socket (clients reconnect to another gateway and resume by
    // replay), so the graceful HTTP shutdown is not held up by long-lived websockets.
    state.tasks.spawn(async move {
        cancel.cancelled().await;
        io.close().await;
    });
    crate::http::routes()
        .merge(crate::settings::routes())
        .merge(crate::files::routes())
        .merge(crate::web::routes(web))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                let path = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or(req.uri().path(), |p| p.as_str());
                tracing::info_span!("http", method = %req.method(), path = %path)
            }),
        )
        .with_state(state.clone())
        .layer(sio_layer)
        // Around Socket.IO: what each socket's client has read (websocket upgrades, polls).
        .layer({
            let drains = state.drains.clone();
            axum::middleware::from_fn(move |req, next| {
                crate::sendbuf::track(drains.clone(), req, next)
            })
        })
        .layer(axum::middleware::map_request(unshare_head))
        // Outermost: a foreign origin or host name reaches neither REST nor Socket.IO.
        .layer({
            // Shared, not cloned per request (every long-poll is a request).
            let allowed = Arc::new(allowed_origins);
            axum::middleware::from_fn(move |req, next| {
                crate::origin::guard(Arc::clone(&allowed), req, next)
            })
        })
}

/// Engine.IO keeps each socket's request head (`Parts`, extensions included) for the socket's
/// whole life. hyper parses header values and the URI as slices of its connection read buffer
/// (8–16 KiB), so keeping them kept that whole buffer per socket (heaptrack: ~16 KiB per idle
/// socket). Copy them into allocations of their own; nothing else (the upgrade) is touched.
async fn unshare_head(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    for v in req.headers_mut().values_mut() {
        // `from_bytes` copies; a value that was valid stays valid.
        if let Ok(mut copy) = axum::http::HeaderValue::from_bytes(v.as_bytes()) {
            copy.set_sensitive(v.is_sensitive());
            *v = copy;
        }
    }
    // Parsing a `String` takes ownership of that string's buffer. axum's router also keeps a
    // clone of the URI as `OriginalUri` in the extensions, which Engine.IO keeps too.
    if let Ok(uri) = axum::http::Uri::try_from(req.uri().to_string()) {
        if let Some(original) = req.extensions_mut().get_mut::<axum::extract::OriginalUri>()
            && let Ok(copy) = axum::http::Uri::try_from(original.0.to_string())
        {
            original.0 = copy;
        }
        *req.uri_mut() = uri;
    }
    req
}
