//! Load generators and benchmarks for the hub. Every run talks to processes it starts itself on
//! loopback and bounds its loops in count and time.
//!
//! - [`pool`]: a private pool (redis-server and hub processes) in a temp dir.
//! - [`ws`]: a minimal WebSocket client for the hub's protocol.
//! - [`procstat`]: CPU time and RSS of a process, from `/proc`.
//! - [`raw`]: the fan-out ceiling server (pre-encoded frames, no other logic).
//! - [`otlp_sink`]: an OTLP/HTTP endpoint that counts exported spans (tracing-on benchmarks).

pub mod otlp_sink;
pub mod pool;
pub mod procstat;
pub mod raw;
pub mod ws;
