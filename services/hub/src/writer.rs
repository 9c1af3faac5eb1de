//! The writing half of a connection.
//!
//! Drains the outbox into the socket: everything queued since the last write goes out in one
//! `writev` of the shared frame buffers (no copy, few syscalls under load). It also sends pings,
//! enforces the liveness and token-expiry deadlines, and ends the connection with the close frame
//! for whatever reason was given first.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use hub_protocol::CloseCode;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use crate::frame;
use crate::metrics::Metrics;
use crate::outbox::{CloseReason, Outbound, Outbox, Queue};

const MAX_BATCH_ITEMS: usize = 64;
const MAX_BATCH_BYTES: usize = 256 * 1024;
const MAX_IOVECS: usize = 64;
/// Time left to flush what is queued and the close frame once a connection is closing.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// When the peer was last heard from; written by the reader, read by the writer.
pub struct Liveness {
    start: Instant,
    last_heard_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    pub fn heard(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_heard_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(heard)
    }
}

pub struct WriterSettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// When the token expires: the connection is closed with 4001 then. A `refresh` moves it.
    pub expiry: Arc<Expiry>,
}

/// When the connection's token expires (plus leeway), in Unix milliseconds; `u64::MAX`: beyond
/// what the clock can represent, so never. The session moves it on a `refresh`; the writer
/// looks when its timer fires, so a refresh costs the writer no wake-up and no watcher.
#[derive(Debug)]
pub struct Expiry(AtomicU64);

impl Expiry {
    pub fn new(at: Option<SystemTime>) -> Self {
        Expiry(AtomicU64::new(Self::ms(at)))
    }

    pub fn set(&self, at: Option<SystemTime>) {
        self.0.store(Self::ms(at), Ordering::Release);
    }

    fn ms(at: Option<SystemTime>) -> u64 {
        at.and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            })
    }

    /// Time left; `None`: never expires.
    fn left(&self) -> Option<Duration> {
        let at = self.0.load(Ordering::Acquire);
        (at != u64::MAX).then(|| {
            Duration::from_millis(at).saturating_sub(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default(),
            )
        })
    }
}

/// A timer deadline `left` from now; a token that never expires gets one decades away.
fn deadline(left: Option<Duration>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    left.and_then(|d| now.checked_add(d))
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// Frames accepted by the socket in part or not yet at all.
#[derive(Default)]
struct Pending {
    bufs: VecDeque<Bytes>,
}

impl Pending {
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.bufs.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.bufs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// Writes everything pending. Cancel-safe: `pending` always holds exactly what is left to write.
///
/// The iovec array lives only inside one poll: held across an await it would be 1 KiB of every
/// connection's writer task, for its whole life.
async fn flush<W: AsyncWrite + Unpin>(io: &mut W, pending: &mut Pending) -> io::Result<()> {
    while !pending.bufs.is_empty() {
        let written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = pending
                .bufs
                .iter()
                .zip(slices.iter_mut())
                .map(|(b, s)| *s = IoSlice::new(b))
                .count();
            std::pin::Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        pending.advance(written);
    }
    io.flush().await
}

fn close_frame(reason: CloseReason) -> Option<Bytes> {
    match reason {
        CloseReason::Hub(code) => Some(frame::close_with(code)),
        CloseReason::Peer(code) => Some(frame::close(code, "")),
        CloseReason::Gone => None,
    }
}

/// A connection's writing half and everything it watches.
pub struct Writer<W> {
    pub io: W,
    /// The receiving end of `outbox`.
    pub queue: Queue,
    pub outbox: Outbox,
    pub liveness: Arc<Liveness>,
    pub settings: WriterSettings,
    pub metrics: Arc<Metrics>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// Runs until the connection is closed (by anyone), then sends the close frame and shuts
    /// the socket down.
    ///
    /// Not an `async fn`, which would keep `self` and the fields taken out of it both in the
    /// task's state for the connection's life.
    pub fn run(self) -> impl Future<Output = ()> + Send
    where
        W: Send,
    {
        let Writer {
            mut io,
            queue: mut rx,
            outbox,
            liveness,
            settings,
            metrics,
        } = self;
        async move {
            // One timer for the next ping and the token's expiry, whichever is first: a timer is
            // 112 bytes, and an `Interval` boxes one more, per connection for its whole life.
            let mut next_ping = tokio::time::Instant::now() + settings.ping_interval;
            let mut expires = deadline(settings.expiry.left());
            let timer = tokio::time::sleep_until(next_ping.min(expires));
            tokio::pin!(timer);
            let mut token_live = true;
            let idle_limit = settings.ping_interval + settings.pong_timeout;
            let mut pending = Pending::default();
            let mut broken = false;
            // Made once: a fresh `cancelled()` per wake-up would lock the token and register a waiter
            // every time (visible in profiles of the fan-out).
            let closed = outbox.closed_owned();
            tokio::pin!(closed);

            loop {
                let mut batch = Batch::default();
                let mut ping_sent = false;
                tokio::select! {
                    biased;
                    _ = &mut closed => break,
                    _ = &mut timer => {
                        let now = tokio::time::Instant::now();
                        if token_live && now >= expires {
                            match settings.expiry.left() {
                                // A refresh moved it meanwhile.
                                Some(left) if !left.is_zero() => expires = deadline(Some(left)),
                                None => expires = deadline(None),
                                Some(_) => {
                                    token_live = false;
                                    outbox.close(CloseReason::Hub(CloseCode::TokenExpired));
                                }
                            }
                        }
                        if now >= next_ping {
                            // Counted from now, not from when it was due: a late tick does not
                            // bunch pings (an interval's `MissedTickBehavior::Delay`).
                            next_ping = now + settings.ping_interval;
                            if liveness.silent_for() > idle_limit {
                                outbox.close(CloseReason::Hub(CloseCode::PingTimeout));
                            } else {
                                pending.bufs.push_back(frame::ping());
                                ping_sent = true;
                            }
                        }
                        let next = if token_live { next_ping.min(expires) } else { next_ping };
                        timer.as_mut().reset(next);
                        if !ping_sent {
                            continue;
                        }
                    }
                    item = rx.recv() => {
                        let Some(item) = item else { break };
                        metrics.outbound_queue_depth.observe_value(1 + rx.len() as u64);
                        batch.add(item, &mut pending);
                        while batch.items < MAX_BATCH_ITEMS && batch.bytes < MAX_BATCH_BYTES {
                            match rx.try_recv() {
                                Some(item) => batch.add(item, &mut pending),
                                None => break,
                            }
                        }
                    }
                }
                tokio::select! {
                    biased;
                    result = timeout(idle_limit, flush(&mut io, &mut pending)) => match result {
                        Ok(Ok(())) => {
                            batch.record(&metrics);
                            if ping_sent {
                                // Once a ping interval, the buffers a burst made grow go back: an
                                // idle connection holds none.
                                pending.bufs = VecDeque::new();
                                rx.release_buffer();
                            }
                        }
                        Ok(Err(_)) => {
                            broken = true;
                            outbox.close(CloseReason::Gone);
                            break;
                        }
                        // The peer has not read for a whole liveness period.
                        Err(_) => outbox.close(CloseReason::Hub(CloseCode::PingTimeout)),
                    },
                    // A slow consumer or a shutdown: what is left is flushed below, within CLOSE_GRACE.
                    _ = &mut closed => {}
                }
            }

            if !broken {
                // What was queued before the close (acks, errors, messages) goes out ahead of the close
                // frame; nothing new can be queued once the outbox is closed.
                let mut rest = Batch::default();
                while let Some(item) = rx.try_recv() {
                    rest.add(item, &mut pending);
                }
                let reason = outbox
                    .close_reason()
                    .unwrap_or(CloseReason::Hub(CloseCode::Normal));
                if let Some(close) = close_frame(reason) {
                    pending.bufs.push_back(close);
                    let _ = timeout(CLOSE_GRACE, flush(&mut io, &mut pending)).await;
                }
                let _ = timeout(CLOSE_GRACE, io.shutdown()).await;
            }
        }
    }
}

/// What one write carries, for the metrics.
#[derive(Default)]
struct Batch {
    items: usize,
    frames: u64,
    bytes: usize,
    oldest: Option<Instant>,
}

impl Batch {
    /// Takes `item` off the queue into what the next write sends.
    fn add(&mut self, item: Outbound, pending: &mut Pending) {
        self.items += 1;
        self.frames += u64::from(item.count);
        self.bytes += item.frames.len();
        if self.oldest.is_none() {
            self.oldest = item.published_at;
        }
        pending.bufs.push_back(item.frames);
    }

    fn record(&self, metrics: &Metrics) {
        if self.items == 0 {
            return;
        }
        metrics.frames_sent.add(self.frames);
        metrics.bytes_sent.add(self.bytes as u64);
        if let Some(oldest) = self.oldest {
            metrics.publish_to_deliver.observe(oldest.elapsed());
        }
    }
}

/// `exp` (seconds since the epoch) as a point in time; `None` when the clock cannot represent
/// it (a token may say `exp: 2^63`).
pub fn expiry_time(exp: u64, leeway: Duration) -> Option<SystemTime> {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(exp))?
        .checked_add(leeway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_past_what_the_clock_holds_is_never() {
        assert!(expiry_time(u64::MAX, Duration::from_secs(5)).is_none());
        assert!(expiry_time(1 << 63, Duration::ZERO).is_none());
        assert_eq!(
            expiry_time(10, Duration::from_secs(5)),
            Some(UNIX_EPOCH + Duration::from_secs(15))
        );
    }

    #[test]
    fn pending_advances_across_buffers() {
        let mut p = Pending::default();
        p.bufs.push_back(Bytes::from_static(b"abc"));
        p.bufs.push_back(Bytes::from_static(b"defg"));
        p.advance(4);
        assert_eq!(p.bufs.len(), 1);
        assert_eq!(&p.bufs[0][..], b"efg");
        p.advance(3);
        assert!(p.bufs.is_empty());
    }

    #[tokio::test]
    async fn flush_writes_every_byte_in_order() {
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut p = Pending::default();
        for chunk in [&b"hello "[..], b"fan", b"-out ", b"world"] {
            p.bufs.push_back(Bytes::copy_from_slice(chunk));
        }
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut out)
                .await
                .unwrap();
            out
        });
        flush(&mut a, &mut p).await.unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), b"hello fan-out world");
    }
}
