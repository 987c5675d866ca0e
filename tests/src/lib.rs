//! Helpers for the end-to-end, fault and load tests: real `nats-server` and `redis-server`
//! processes ([`nats`], [`redis`]), optionally with per-role users ([`auth`]), the workspace binaries as child processes ([`proc`]), a
//! small Socket.IO client ([`sio`]), the official JavaScript client ([`js`]), headless
//! Chromium for the web UI ([`browser`]), and a whole deployment per test ([`cluster`]).
//!
//! Every helper polls for readiness with a generous deadline (a loaded 2-core machine is the
//! target), never a fixed sleep, and kills its processes on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod auth;
pub mod browser;
pub mod check;
pub mod cluster;
pub mod history;
pub mod js;
pub mod llm;
pub mod load;
pub mod nats;
pub mod netcluster;
pub mod netns;
pub mod otlp;
pub mod proc;
pub mod redis;
pub mod sio;

/// An HTTP client for tests and tools. The workspace's reqwest is built without a default TLS
/// crypto provider (the worker configures its own), so the process-wide one is installed
/// here first: ring, already in the build.
pub fn http_client() -> reqwest::Client {
    ensure_tls_provider();
    reqwest::Client::builder()
        .build()
        .expect("an HTTP client with the ring provider installed")
}

/// Installs the process-wide TLS crypto provider (ring) once; call before building any
/// `reqwest::Client` (see [`http_client`]).
pub fn ensure_tls_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Fails only if another provider is already installed, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
