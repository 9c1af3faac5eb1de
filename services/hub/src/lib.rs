//! The telemetry hub.
//!
//! A hub authenticates WebSocket clients with a JWT, takes readings published by edge agents and
//! fans each one out to every subscribed dashboard. It keeps no state of its own that a restart
//! would lose a client's place in: channels have an epoch and gapless offsets, and a client that
//! reconnects resumes with `since`.
//!
//! How it is built (see `docs/architecture.md` for the whole picture), in the order data flows:
//!
//! - [`server`]: the composition root. It builds the shared [`state::AppState`] (settings,
//!   authenticator, broker, metrics, admission gate) and runs the accept loop and the drain on
//!   shutdown. Nothing imports it back.
//! - `routes`: `/ws` (the upgrade with its admission checks), `/healthz`, `/readyz`, `/metrics`
//!   and the dashboard's files; every refusal is a `rejection::Rejection`, mapped to its
//!   response in one place.
//! - [`auth`]: token verification into an [`auth::Identity`]; [`token`] mints tokens.
//! - `connection`: one task per connection reads frames and hands text to its `session`, which
//!   applies the protocol; a `writer` task per connection writes.
//! - `outbox`: the bounded queue between everything that sends to a connection and its writer;
//!   a full queue marks a slow consumer, which is closed rather than waited for.
//! - `broker`: offsets, history, deduplication and fan-out behind one `Broker` trait, embedded
//!   in memory or on Redis for a pool; `fanout` is the per-channel subscriber list;
//!   `conflate` turns a subscription with `max_rate` into each device's latest value at that
//!   rate.
//! - `frame`: outbound WebSocket framing. A publication is encoded once, header and all, and
//!   the same bytes go to every subscriber.
//! - `limits`, `metrics`, [`config`], [`shutdown`]: admission control, Prometheus metrics,
//!   settings, signals.
//!
//! Modules are private to the crate unless the binary, a test or another crate uses them.

mod admin;
mod assets;
pub mod auth;
mod broker;
pub mod config;
mod conflate;
mod connection;
mod demo;
mod fanout;
mod frame;
mod limits;
mod live_tokens;
mod metrics;
mod outbox;
mod rejection;
pub mod revocation;
mod routes;
pub mod server;
mod session;
pub mod shutdown;
mod state;
pub mod token;
mod writer;

pub use config::Settings;
pub use server::{OtelExport, Server};
