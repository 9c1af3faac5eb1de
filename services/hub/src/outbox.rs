//! The bounded outbound queue of one connection and the handle others use to close it.
//!
//! Everything a connection sends goes through its [`Outbox`]: fan-out, replies and pongs. The
//! queue is bounded; whoever finds it full closes the connection as a slow consumer instead of
//! waiting, so a stalled client never slows a publisher or another subscriber and never grows
//! memory.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use hub_protocol::CloseCode;
use tokio::sync::mpsc;
use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

/// One queue item: one or more complete WebSocket frames.
#[derive(Debug)]
pub struct Outbound {
    pub frames: Bytes,
    /// How many frames `frames` holds (a replay packs many into one item).
    pub count: u32,
    /// When the publication was received, for the publish-to-deliver histogram.
    pub published_at: Option<Instant>,
}

impl Outbound {
    pub fn control(frame: Bytes) -> Self {
        Outbound {
            frames: frame,
            count: 1,
            published_at: None,
        }
    }
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The hub closes with this code.
    Hub(CloseCode),
    /// The peer sent a close frame; the hub echoes this code.
    Peer(u16),
    /// The transport ended without a close handshake.
    Gone,
}

impl CloseReason {
    /// Metric label (see [`DISCONNECT_REASONS`]).
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Hub(code) => code.reason(),
            CloseReason::Peer(_) => "peer_closed",
            CloseReason::Gone => "connection_lost",
        }
    }
}

/// Label values of the disconnect counter.
pub const DISCONNECT_REASONS: &[&str] = &[
    "normal",
    "protocol_error",
    "unsupported_data",
    "invalid_payload",
    "policy_violation",
    "message_too_big",
    "internal_error",
    "service_restart",
    "try_again_later",
    "token_expired",
    "ping_timeout",
    "slow_consumer",
    "rate_limited",
    "peer_closed",
    "connection_lost",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("outbound queue full: closed as a slow consumer")]
    SlowConsumer,
    #[error("connection is closing")]
    Closed,
}

struct Closer {
    reason: OnceLock<CloseReason>,
    token: CancellationToken,
}

/// Sending side of a connection's queue. Cloning it is cheap (two reference counts).
#[derive(Clone)]
pub struct Outbox {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    closer: Arc<Closer>,
}

impl Outbox {
    pub fn new(id: u64, capacity: usize) -> (Outbox, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(capacity);
        let closer = Arc::new(Closer {
            reason: OnceLock::new(),
            token: CancellationToken::new(),
        });
        (Outbox { id, tx, closer }, rx)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues `item` without waiting. A full queue closes the connection as a slow consumer.
    pub fn push(&self, item: Outbound) -> Result<(), SendError> {
        // The reason is set before the token is cancelled, and reading it is one atomic load;
        // `CancellationToken::is_cancelled` takes a mutex, once per delivery per subscriber.
        if self.is_closed() {
            return Err(SendError::Closed);
        }
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseReason::Hub(CloseCode::SlowConsumer));
                Err(SendError::SlowConsumer)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Starts closing the connection; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if self.closer.reason.set(reason).is_ok() {
            self.closer.token.cancel();
        }
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closer.reason.get().copied()
    }

    pub fn is_closed(&self) -> bool {
        self.closer.reason.get().is_some()
    }

    /// Resolves once [`Outbox::close`] has been called.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.closer.token.cancelled()
    }

    /// [`Outbox::closed`] not borrowing the outbox: made once and polled on every wake-up, it
    /// registers its waiter once instead of per wake-up.
    pub fn closed_owned(&self) -> WaitForCancellationFutureOwned {
        self.closer.token.clone().cancelled_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_close_code_has_its_disconnect_label() {
        for code in CloseCode::ALL {
            assert!(DISCONNECT_REASONS.contains(&code.reason()), "{code:?}");
        }
    }

    #[test]
    fn a_full_queue_closes_as_slow_consumer() {
        let (outbox, _rx) = Outbox::new(1, 2);
        let item = || Outbound::control(Bytes::from_static(b"x"));
        assert!(outbox.push(item()).is_ok());
        assert!(outbox.push(item()).is_ok());
        assert_eq!(outbox.push(item()), Err(SendError::SlowConsumer));
        assert_eq!(
            outbox.close_reason(),
            Some(CloseReason::Hub(CloseCode::SlowConsumer))
        );
        assert_eq!(outbox.push(item()), Err(SendError::Closed));
        outbox.close(CloseReason::Gone);
        assert_eq!(
            outbox.close_reason(),
            Some(CloseReason::Hub(CloseCode::SlowConsumer)),
            "first reason wins"
        );
    }
}
