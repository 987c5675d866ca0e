//! What the gateway and the worker agree on.
//!
//! Layout:
//! - [`event`]: the OpenHands event model (wire JSON). The only module that knows that shape.
//! - [`id`]: validated identifiers ([`id::SessionId`], [`id::UserId`]); parse once at the boundary.
//! - [`names`]: every NATS subject, stream, bucket and Redis key, derived from the namespace.
//! - [`config`]: command-line/env configuration shared by both binaries.
//! - [`creds`]: broker URLs with credentials (never shown with their password) and the NATS
//!   connect options they become.
//! - [`wire`]: the messages that cross NATS between gateway and worker (start requests, headers).
//! - [`store`]: JetStream setup and reads of a session's event log (replay seek, ranges, blobs).
//! - [`ownership`]: the Redis lease protocol (acquire, renew, release by compare-and-set).
//! - [`presence`]: which gateways have sockets on a session (gateways write, workers read).
//! - [`queue`]: the work queues (user actions per session, start requests), both sides.
//! - [`msg_id`]: the `Nats-Msg-Id`s of user actions and the guard on a client's own `msg_id`.
//! - [`snapshot`]: workspace snapshots in JetStream (heads fenced like the log, chunks by hash).
//! - [`journal`]: the fenced append to a session's log (the other half of ownership).
//! - [`status`]: the live session status hash in Redis.
//! - [`quota`]: per-user rate limits and caps, exact across gateways (one Redis script each).
//! - [`telemetry`]: tracing and Prometheus metrics setup.
//!
//! `shared` depends on neither binary; both depend on it.

pub mod config;
pub mod creds;
pub mod event;
pub mod files;
pub mod id;
pub mod journal;
pub mod msg_id;
pub mod names;
pub mod ownership;
pub mod presence;
pub mod queue;
pub mod quota;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod wire;
