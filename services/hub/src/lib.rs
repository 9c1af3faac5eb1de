//! The telemetry hub.
//!
//! A hub authenticates WebSocket clients with a JWT, takes readings published by edge agents and
//! fans each one out to every subscribed dashboard. It keeps no state of its own that a restart
//! would lose a client's place in: channels have an epoch and gapless offsets, and a client that
//! reconnects resumes with `since`.
//!
//! How it is built (see `docs/architecture.md` for the whole picture):
//!
//! - [`server`]: accept loop, routes (`/ws`, `/healthz`, `/readyz`, `/metrics`), the upgrade with
//!   its admission checks, and the drain on shutdown.
//! - [`auth`]: token verification into an [`auth::Identity`]; [`token`] mints tokens.
//! - [`connection`]: one task per connection reads frames and hands text to its [`session`],
//!   which applies the protocol; a [`writer`] task per connection writes.
//! - [`outbox`]: the bounded queue between everything that sends to a connection and its writer;
//!   a full queue marks a slow consumer, which is closed rather than waited for.
//! - [`broker`]: offsets, history, deduplication and fan-out behind the [`broker::Broker`] trait;
//!   [`broker::MemoryBroker`] is the embedded one. [`fanout`] is the per-channel subscriber list.
//! - [`frame`]: outbound WebSocket framing. A publication is encoded once, header and all, and
//!   the same bytes go to every subscriber.
//! - [`limits`], [`metrics`], [`config`], [`shutdown`]: admission control, Prometheus metrics,
//!   settings, signals.

pub mod assets;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod demo;
pub mod fanout;
pub mod frame;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod token;
pub mod writer;

pub use config::Settings;
pub use server::Server;
