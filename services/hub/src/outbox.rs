//! The bounded outbound queue of one connection and the handle others use to close it.
//!
//! Everything a connection sends goes through its [`Outbox`]: fan-out, replays, replies and
//! pongs. The queue is bounded in items and in bytes; whoever finds it full closes the connection
//! as a slow consumer instead of waiting, so a stalled client never slows a publisher or another
//! subscriber and never grows memory (a replay packs many frames into one item, so the item bound
//! alone would let a client that stops reading pin hundreds of MiB).

use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Metric label values of [`CloseReason::label`]: every close code's reason, then the two
    /// endings the hub did not choose.
    pub const LABELS: &'static [&'static str] = &{
        const CODES: &[&str] = CloseCode::REASONS;
        let mut all = [""; CloseCode::REASONS.len() + 2];
        let mut i = 0;
        while i < CODES.len() {
            all[i] = CODES[i];
            i += 1;
        }
        all[i] = PEER_CLOSED;
        all[i + 1] = CONNECTION_LOST;
        all
    };

    /// Metric label (one of [`CloseReason::LABELS`]).
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Hub(code) => code.reason(),
            CloseReason::Peer(_) => PEER_CLOSED,
            CloseReason::Gone => CONNECTION_LOST,
        }
    }
}

const PEER_CLOSED: &str = "peer_closed";
const CONNECTION_LOST: &str = "connection_lost";

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
    /// Bytes queued and not yet taken by the writer.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// The most bytes a replay or snapshot for this subscriber may take.
    replay_bytes: usize,
}

/// Sending side of a connection's queue. Cloning it is cheap (two reference counts).
#[derive(Clone)]
pub struct Outbox {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    closer: Arc<Closer>,
}

impl Outbox {
    #[cfg(test)]
    /// A queue of at most `items` items, whatever their size.
    pub fn new(id: u64, items: usize) -> (Outbox, mpsc::Receiver<Outbound>) {
        Self::bounded(id, items, usize::MAX)
    }

    /// A queue of at most `items` items holding at most `max_bytes` bytes.
    pub fn bounded(id: u64, items: usize, max_bytes: usize) -> (Outbox, mpsc::Receiver<Outbound>) {
        Self::with_replay_budget(id, items, max_bytes, max_bytes / 2)
    }

    /// A queue that feeds `connection` through a task of its own (a conflated subscription): it
    /// has the connection's id, so the broker knows the subscriber, and the connection's replay
    /// budget, so that no replay or snapshot is larger than the connection could ever queue.
    pub fn feeding(
        connection: &Outbox,
        items: usize,
        max_bytes: usize,
    ) -> (Outbox, mpsc::Receiver<Outbound>) {
        // Half the feed at most, too: a connection allowed more than the feed holds would
        // overflow the feed with its own snapshot.
        let budget = connection.replay_budget().min(max_bytes / 2);
        Self::with_replay_budget(connection.id, items, max_bytes, budget)
    }

    fn with_replay_budget(
        id: u64,
        items: usize,
        max_bytes: usize,
        replay_bytes: usize,
    ) -> (Outbox, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(items);
        let closer = Arc::new(Closer {
            reason: OnceLock::new(),
            token: CancellationToken::new(),
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            replay_bytes,
        });
        (Outbox { id, tx, closer }, rx)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The most bytes a replay or snapshot for this subscriber may take (half of what its
    /// connection may have queued): a larger one is never attempted.
    pub fn replay_budget(&self) -> usize {
        self.closer.replay_bytes
    }

    /// Queues `item` without waiting. A full queue (in items or bytes) closes the connection as a
    /// slow consumer.
    pub fn push(&self, item: Outbound) -> Result<(), SendError> {
        self.enqueue(item, true).map_err(|(e, _)| e)
    }

    /// As [`Outbox::push`], but a full queue only refuses the item (`SendError::SlowConsumer`)
    /// and leaves the connection open: for a conflated subscription, which waits and sends newer
    /// values instead.
    /// The item comes back with the refusal, to be offered again later.
    pub fn offer(&self, item: Outbound) -> Result<(), (SendError, Outbound)> {
        self.enqueue(item, false)
    }

    fn enqueue(&self, item: Outbound, close_when_full: bool) -> Result<(), (SendError, Outbound)> {
        // The reason is set before the token is cancelled, and reading it is one atomic load;
        // `CancellationToken::is_cancelled` takes a mutex, once per delivery per subscriber.
        if self.is_closed() {
            return Err((SendError::Closed, item));
        }
        let full = |item| {
            if close_when_full {
                self.close(CloseReason::Hub(CloseCode::SlowConsumer));
            }
            Err((SendError::SlowConsumer, item))
        };
        let len = item.frames.len();
        let queued = &self.closer.queued_bytes;
        if queued.fetch_add(len, Ordering::Relaxed).saturating_add(len) > self.closer.max_bytes {
            queued.fetch_sub(len, Ordering::Relaxed);
            return full(item);
        }
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                full(item)
            }
            Err(mpsc::error::TrySendError::Closed(item)) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                Err((SendError::Closed, item))
            }
        }
    }

    /// The writer took an item of `bytes` bytes off the queue.
    pub fn taken(&self, bytes: usize) {
        self.closer.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
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

    /// Whether the queue's reader is gone (its task ended).
    #[cfg(test)]
    pub fn is_unread(&self) -> bool {
        self.tx.is_closed()
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
        for &code in CloseCode::ALL {
            let reason = CloseReason::Hub(code);
            assert!(CloseReason::LABELS.contains(&reason.label()), "{code:?}");
        }
        for reason in [CloseReason::Peer(4000), CloseReason::Gone] {
            assert!(CloseReason::LABELS.contains(&reason.label()), "{reason:?}");
        }
    }

    #[test]
    fn a_queue_over_its_bytes_closes_as_slow_consumer() {
        let (outbox, _rx) = Outbox::bounded(1, 100, 10);
        let item = |n: usize| Outbound::control(Bytes::from(vec![b'x'; n]));
        assert!(outbox.push(item(6)).is_ok());
        outbox.taken(6);
        assert!(
            outbox.push(item(10)).is_ok(),
            "what the writer took is free again"
        );
        assert_eq!(outbox.push(item(1)), Err(SendError::SlowConsumer));
        assert_eq!(
            outbox.close_reason(),
            Some(CloseReason::Hub(CloseCode::SlowConsumer))
        );
    }

    #[test]
    fn an_offer_to_a_full_queue_is_refused_and_the_connection_stays_open() {
        let (outbox, _rx) = Outbox::new(1, 1);
        let item = || Outbound::control(Bytes::from_static(b"x"));
        assert!(outbox.offer(item()).is_ok());
        assert!(matches!(
            outbox.offer(item()),
            Err((SendError::SlowConsumer, _))
        ));
        assert!(!outbox.is_closed());
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
