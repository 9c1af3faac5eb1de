//! The client side of the hub's WebSocket protocol, shared by every Rust client: the edge
//! agent, the load generators and the hub's own integration tests.
//!
//! - [`Dialer`]: TCP (optionally from a chosen source address, with a chosen receive buffer),
//!   TLS for `wss://` (rustls with the system roots or a configured CA), and the upgrade over
//!   hyper with the token in `Authorization` or wherever the caller puts it. A refused upgrade
//!   comes back as [`ConnectError::Refused`] with the hub's status and JSON body.
//! - [`receive`]: the next [`Received`], a text frame (decoded with [`Received::frame`] into a
//!   `ServerFrame`) or the close code, parsed once ([`close_code`]).
//!
//! Frames themselves come from `hub-protocol`: [`hub_protocol::ServerFrame::parse`] for what the
//! hub sends, [`hub_protocol::client`] for what a client sends.

mod dial;
mod received;
mod tls;

pub use dial::{ConnectError, Connected, DialError, DialOptions, Dialer, HubSocket};
pub use received::{Received, close_code, receive};
pub use tls::TlsSetupError;
