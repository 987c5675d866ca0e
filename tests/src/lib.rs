//! Helpers for the end-to-end, fault and load tests: real `nats-server` and `redis-server`
//! processes ([`nats`], [`redis`]), the workspace binaries as child processes ([`proc`]), a
//! small Socket.IO client ([`sio`]), the official JavaScript client ([`js`]), and a whole
//! deployment per test ([`cluster`]).
//!
//! Every helper polls for readiness with a generous deadline (a loaded 2-core machine is the
//! target), never a fixed sleep, and kills its processes on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod check;
pub mod cluster;
pub mod js;
pub mod nats;
pub mod proc;
pub mod redis;
pub mod sio;
