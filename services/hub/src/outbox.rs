//! The bounded outbound queue of one connection and the handle others use to close it.
//!
//! Everything a connection sends goes through its [`Outbox`]: fan-out, replays, replies and
//! pongs. The queue is bounded in items and in bytes; whoever finds it full closes the connection
//! as a slow consumer instead of waiting, so a stalled client never slows a publisher or another
//! subscriber and never grows memory (a replay packs many frames into one item, so the item bound
//! alone would let a client that stops reading pin hundreds of MiB).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hub_protocol::CloseCode;
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

/// What an [`Outbox`]'s clones and its [`Queue`] share.
struct Shared {
    reason: OnceLock<CloseReason>,
    token: CancellationToken,
    queue: Mutex<Items>,
    /// The queue's reader, waiting for an item (or for the last sender to go).
    reader: AtomicWaker,
    /// Live `Outbox` clones: the queue ends when the last one goes.
    senders: AtomicUsize,
    max_items: usize,
    max_bytes: usize,
    /// The most bytes a replay or snapshot for this subscriber may take.
    replay_bytes: usize,
}

/// The queued items: a plain deque under a lock, so that a connection with nothing queued holds
/// no buffer. A channel allocates its first block of slots up front (1.8 KiB for 32 items), most
/// of what an idle viewer cost after its read buffer.
#[derive(Default)]
struct Items {
    items: VecDeque<Outbound>,
    /// Bytes of `items`' frames.
    bytes: usize,
    /// The reader is gone: nothing will take what is pushed.
    unread: bool,
}

/// The room a queue keeps once it has emptied after a large burst (more than 8 times this): a few
/// items' worth, so that a steady stream of deliveries does not allocate for each. The writer
/// gives back the rest once a ping interval ([`Queue::release_buffer`]).
const ITEMS_KEPT: usize = 8;

/// Sending side of a connection's queue. Cloning it is cheap (two reference counts).
pub struct Outbox {
    id: u64,
    shared: Arc<Shared>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Outbox {
            id: self.id,
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.reader.wake();
        }
    }
}

/// The writer's end of an [`Outbox`]: takes what was queued, in order.
pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// The next item; `None` once every `Outbox` is gone and the queue is empty. Cancel-safe:
    /// an item is taken only when this returns it.
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| {
            if let Some(item) = self.try_recv() {
                return Poll::Ready(Some(item));
            }
            self.shared.reader.register(cx.waker());
            // Pushed or dropped between the first look and the registration.
            if let Some(item) = self.try_recv() {
                return Poll::Ready(Some(item));
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let mut queue = lock(&self.shared.queue);
        let item = queue.items.pop_front()?;
        queue.bytes = queue.bytes.saturating_sub(item.frames.len());
        // Not for every burst: a subscriber whose bursts pass the kept room would reallocate
        // twice per burst under the lock the publishers push under.
        if queue.items.is_empty() && queue.items.capacity() > ITEMS_KEPT * 8 {
            queue.items.shrink_to(ITEMS_KEPT);
        }
        Some(item)
    }

    /// Gives back the queue's buffer if nothing is queued.
    pub fn release_buffer(&mut self) {
        let mut queue = lock(&self.shared.queue);
        if queue.items.is_empty() {
            queue.items = VecDeque::new();
        }
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        lock(&self.shared.queue).items.len()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let mut queue = lock(&self.shared.queue);
        queue.unread = true;
        // Freed now, not when the last sender goes.
        queue.items = VecDeque::new();
        queue.bytes = 0;
    }
}

/// The queue's lock. Nothing panics while holding it, and its state is whole between
/// statements, so a poisoned lock's data is still good.
fn lock(queue: &Mutex<Items>) -> MutexGuard<'_, Items> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Outbox {
    #[cfg(test)]
    /// A queue of at most `items` items, whatever their size.
    pub fn new(id: u64, items: usize) -> (Outbox, Queue) {
        Self::bounded(id, items, usize::MAX)
    }

    /// A queue of at most `items` items holding at most `max_bytes` bytes.
    pub fn bounded(id: u64, items: usize, max_bytes: usize) -> (Outbox, Queue) {
        Self::with_replay_budget(id, items, max_bytes, max_bytes / 2)
    }

    /// A queue that feeds `connection` through a task of its own (a conflated subscription): it
    /// has the connection's id, so the broker knows the subscriber, and the connection's replay
    /// budget, so that no replay or snapshot is larger than the connection could ever queue.
    pub fn feeding(connection: &Outbox, items: usize, max_bytes: usize) -> (Outbox, Queue) {
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
    ) -> (Outbox, Queue) {
        let shared = Arc::new(Shared {
            reason: OnceLock::new(),
            token: CancellationToken::new(),
            queue: Mutex::new(Items::default()),
            reader: AtomicWaker::new(),
            senders: AtomicUsize::new(1),
            max_items: items,
            max_bytes,
            replay_bytes,
        });
        let queue = Queue {
            shared: shared.clone(),
        };
        (Outbox { id, shared }, queue)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The most bytes a replay or snapshot for this subscriber may take (half of what its
    /// connection may have queued): a larger one is never attempted.
    pub fn replay_budget(&self) -> usize {
        self.shared.replay_bytes
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
        let shared = &*self.shared;
        let mut queue = lock(&shared.queue);
        if queue.unread {
            return Err((SendError::Closed, item));
        }
        let bytes = queue.bytes.saturating_add(item.frames.len());
        if queue.items.len() >= shared.max_items || bytes > shared.max_bytes {
            drop(queue);
            return full(item);
        }
        let was_empty = queue.items.is_empty();
        queue.items.push_back(item);
        queue.bytes = bytes;
        drop(queue);
        // A reader finding items left never waits, so only the first one needs to wake it.
        if was_empty {
            shared.reader.wake();
        }
        Ok(())
    }

    /// Starts closing the connection; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if self.shared.reason.set(reason).is_ok() {
            self.shared.token.cancel();
        }
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason.get().copied()
    }

    pub fn is_closed(&self) -> bool {
        self.shared.reason.get().is_some()
    }

    /// Whether the queue's reader is gone (its task ended).
    #[cfg(test)]
    pub fn is_unread(&self) -> bool {
        lock(&self.shared.queue).unread
    }

    /// Resolves once [`Outbox::close`] has been called.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.shared.token.cancelled()
    }

    /// [`Outbox::closed`] not borrowing the outbox: made once and polled on every wake-up, it
    /// registers its waiter once instead of per wake-up.
    pub fn closed_owned(&self) -> WaitForCancellationFutureOwned {
        self.shared.token.clone().cancelled_owned()
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
        let (outbox, mut queue) = Outbox::bounded(1, 100, 10);
        let item = |n: usize| Outbound::control(Bytes::from(vec![b'x'; n]));
        assert!(outbox.push(item(6)).is_ok());
        assert!(queue.try_recv().is_some());
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

    fn capacity(queue: &Queue) -> usize {
        lock(&queue.shared.queue).items.capacity()
    }

    #[test]
    fn a_queue_holds_no_buffer_until_something_is_queued_and_gives_it_back_when_asked() {
        let (outbox, mut queue) = Outbox::new(1, 100);
        assert_eq!(capacity(&queue), 0, "a new connection holds no buffer");
        for _ in 0..ITEMS_KEPT * 8 + 1 {
            outbox
                .push(Outbound::control(Bytes::from_static(b"x")))
                .unwrap();
        }
        while queue.try_recv().is_some() {}
        assert!(
            capacity(&queue) <= ITEMS_KEPT,
            "a large burst's buffer goes back once the queue is empty"
        );
        queue.release_buffer();
        assert_eq!(capacity(&queue), 0);
    }

    #[tokio::test]
    async fn the_reader_wakes_for_an_item_and_ends_with_the_last_outbox() {
        let (outbox, mut queue) = Outbox::new(1, 100);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = queue.recv().await {
                got.push(item.frames);
            }
            got
        });
        let clone = outbox.clone();
        tokio::task::yield_now().await;
        outbox
            .push(Outbound::control(Bytes::from_static(b"a")))
            .unwrap();
        drop(outbox);
        tokio::task::yield_now().await;
        clone
            .push(Outbound::control(Bytes::from_static(b"b")))
            .unwrap();
        drop(clone);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the reader ends once every outbox is gone")
            .unwrap();
        assert_eq!(got, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
    }

    #[test]
    fn nothing_is_queued_once_the_reader_is_gone() {
        let (outbox, queue) = Outbox::new(1, 100);
        drop(queue);
        assert!(outbox.is_unread());
        assert_eq!(
            outbox.push(Outbound::control(Bytes::from_static(b"x"))),
            Err(SendError::Closed)
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
