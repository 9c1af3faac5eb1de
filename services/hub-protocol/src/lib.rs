//! Wire protocol v1 of the telemetry hub.
//!
//! `docs/protocol.md` is the normative description; this crate is its executable form, shared by
//! the hub, the edge agent, the load generator and the tests so that none of them re-invents a
//! frame.
//!
//! - [`client`]: frames a client sends (`subscribe`, `unsubscribe`, `publish`), and
//!   [`client::publish_frame`], which wraps a stored reading without parsing it.
//! - [`server`]: frames the hub sends (`hello`, `subscribed`, `unsubscribed`, `message`, `ack`,
//!   `error`).
//! - [`channel`]: channel names, the channels a publication is routed to, and subscribe patterns.
//! - [`codes`]: WebSocket close codes and `error` frame codes.
//! - [`claims`]: the JWT claims the hub accepts.
//! - [`presence`]: the `presence` channel's messages: which devices are connected.
//! - [`rate`]: the token bucket behind the publish and subscribe limits, for the hub that
//!   enforces them and the clients that pace themselves below them.
//!
//! Decoding borrows from the input buffer: `data` payloads stay as raw JSON text
//! ([`serde_json::value::RawValue`]) and are never parsed into a tree, because the hub only relays
//! them.

pub mod channel;
pub mod claims;
pub mod client;
pub mod codes;
pub mod presence;
pub mod rate;
pub mod server;

pub use channel::{ChannelError, ChannelPattern};
pub use claims::{Claims, Role};
pub use client::{ClientFrame, Position, Since};
pub use codes::{CloseCode, ErrorCode, Retry};
pub use server::ServerFrame;

/// The largest `seq` a publication may carry: 2^53 - 1, the largest integer every JSON client
/// (JavaScript's numbers included) reads exactly. `seq` 0 is not a reading either.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The longest `ref` a client frame may carry, in bytes of JSON: errors echo it, so it is
/// bounded like everything else a client can make the hub queue.
pub const MAX_REF_BYTES: usize = 256;

/// The most partitions a channel may be split into (`broker.partitions`), and so the longest
/// partitioned `since` a hub reads.
pub const MAX_PARTITIONS: u32 = 256;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not a JSON object: {0}")]
    Malformed(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
    #[error("`data` must be a JSON object")]
    DataNotObject,
    #[error("`seq` must be from 1 to {MAX_SEQ}")]
    SeqOutOfRange,
    #[error("`ref` must be at most {MAX_REF_BYTES} bytes of JSON")]
    RefTooLong,
    #[error("`since.partitions` may list at most {MAX_PARTITIONS} positions")]
    TooManyPartitions,
    #[error("`max_rate` must be from 1/60 to 100 messages per second per device")]
    MaxRateOutOfRange,
}

impl FrameError {
    /// The `error` frame code a hub answers this failure with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::UnknownType(_) => ErrorCode::UnknownType,
            _ => ErrorCode::BadFrame,
        }
    }
}
