//! The edge agent: reads a Raspberry Pi's sensors, keeps every reading on disk until a hub has
//! acknowledged it, and pushes readings to the hub over a WebSocket.
//!
//! ```text
//! sensors::* ──read at its interval──► agent (numbers it: seq) ──append──► store::Log (disk)
//!                                                                             │
//!                     hub ◄──publish (window, paced)── uplink ◄──read_after──┘
//!                      └──────────ack(seq)──────────────► uplink ──ack──► store::Log (deletes)
//! ```
//!
//! - [`sensors`]: drivers written against the `embedded-hal` 1.0 traits (rppal provides them on
//!   a Pi), sysfs and procfs parsers, and a simulated source for any Linux box.
//! - [`store`]: the on-disk log: append-only segments with a versioned header and a CRC per
//!   record, bounded in bytes (the oldest readings go first, counted), recovered after a crash
//!   or a torn write.
//! - [`uplink`]: connection, reconnect with backoff and full jitter, the publish window, acks.
//! - [`reading`]: the JSON of a reading and the clocks it is stamped with.
//! - [`config`]: settings from `agent.toml` and `AGENT_*` variables.
//! - [`health`]: the agent's own counters, in every reading and on an optional `/metrics`.
//! - [`agent`]: wires them together under one shutdown token.
//!
//! The guarantees: a reading is deleted only after the hub acknowledged it (stored in the
//! hub's broker), and a reading's `seq` is never reused, so resending after any failure cannot
//! duplicate it (the hub answers a known `seq` with `duplicate: true`). The log's size bound is
//! the one place readings can be lost, and every such loss is counted.

pub mod agent;
pub mod config;
pub mod health;
pub mod reading;
pub mod sensors;
pub mod store;
pub mod uplink;
