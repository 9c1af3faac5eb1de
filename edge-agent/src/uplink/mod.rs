//! The link to the hub: connect, send what the log holds from the oldest unacknowledged reading
//! on, delete what the hub acknowledges, and reconnect when anything goes wrong.
//!
//! One task owns the connection. A reader task turns incoming frames into [`Incoming`] events,
//! so the loop here can wait on the hub, on new readings and on its timers at once without
//! cancelling a half-read frame.
//!
//! Ordering is what makes "never lost, never duplicated" hold: the hub acknowledges a device's
//! readings only in `seq` order and answers a resend of an accepted `seq` with
//! `duplicate: true`, so the agent always resends from its oldest unacknowledged reading, and
//! after a refusal (`rate_limited`, `unavailable`) stops, lets what is in flight be answered,
//! waits, and resends from the refused one.

mod backoff;
mod connect;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketRead, WebSocketWrite};
use hub_protocol::{CloseCode, ErrorCode, ServerFrame};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};

pub use backoff::Backoff;
pub use connect::{ConnectError, Dialer};

use crate::config::HubSettings;
use crate::store::Log;

type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// File in `storage.dir` that says this log has met the hub once (see [`Uplink::on_hello`]).
pub const SYNCED_MARKER: &str = "hub-synced";

/// Counters the agent reports about its link (logs now; metrics endpoint later).
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connects: AtomicU64,
    pub acked: AtomicU64,
    /// Unix milliseconds of the last ack, 0 before the first.
    pub last_ack_ms: AtomicU64,
}

pub struct Uplink {
    settings: HubSettings,
    dialer: Dialer,
    token: Box<dyn Fn() -> anyhow::Result<String> + Send + Sync>,
    log: Arc<Mutex<Log>>,
    appended: Arc<Notify>,
    storage_dir: std::path::PathBuf,
    stats: Arc<LinkStats>,
    /// Which batches are traced (their `traceparent` goes with each reading).
    roots: observability::RootSampler,
}

/// How a connection ended, which decides how long to wait before the next.
#[derive(Debug)]
enum End {
    Shutdown,
    /// The hub closed with this code.
    Closed(u16),
    /// Nothing heard for `dead_after`, or the socket failed.
    Lost(String),
    /// A protocol surprise (no hello, undecodable frame).
    Protocol(String),
    /// The token may connect but not publish these readings.
    Forbidden(String),
}

/// What the reader task saw.
enum Incoming {
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Closed(u16),
    Failed(String),
}

impl Uplink {
    pub fn new(
        settings: HubSettings,
        token: Box<dyn Fn() -> anyhow::Result<String> + Send + Sync>,
        log: Arc<Mutex<Log>>,
        appended: Arc<Notify>,
        storage_dir: std::path::PathBuf,
        stats: Arc<LinkStats>,
        roots: observability::RootSampler,
    ) -> anyhow::Result<Uplink> {
        let dialer = Dialer::new(
            &settings.url,
            settings.ca_file.as_deref(),
            settings.connect_timeout,
        )?;
        Ok(Uplink {
            settings,
            dialer,
            token,
            log,
            appended,
            storage_dir,
            stats,
            roots,
        })
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.settings.backoff_base, self.settings.backoff_cap);
        loop {
            let delay = match (self.token)() {
                Err(e) => {
                    error!(error = %e, "no token; retrying");
                    self.settings.auth_backoff
                }
                Ok(token) => match self.dialer.connect(&token).await {
                    Err(e) if e.is_auth_refusal() => {
                        error!(error = %e, retry_in = ?self.settings.auth_backoff,
                            "the hub refused this device's token; provision a new one");
                        self.settings.auth_backoff
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        warn!(error = %e, retry_in = ?delay, "cannot connect to the hub");
                        delay
                    }
                    Ok((ws, node)) => {
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        info!(hub = node.as_deref().unwrap_or("?"), "connected");
                        let started = Instant::now();
                        let end = self.session(ws, &shutdown).await;
                        if started.elapsed() > Duration::from_secs(30) {
                            backoff.reset();
                        }
                        match end {
                            End::Shutdown => return,
                            End::Closed(code) => {
                                let known = CloseCode::from_u16(code);
                                if known.is_some_and(CloseCode::reconnect_soon)
                                    || known == Some(CloseCode::TokenExpired)
                                {
                                    let delay = backoff::soon();
                                    info!(code, retry_in = ?delay, "the hub closed the link");
                                    delay
                                } else {
                                    let delay = backoff.next_delay();
                                    warn!(code, retry_in = ?delay, "the hub closed the link");
                                    delay
                                }
                            }
                            End::Forbidden(why) => {
                                error!(reason = %why, retry_in = ?self.settings.auth_backoff,
                                    "the hub does not accept readings with this token");
                                self.settings.auth_backoff
                            }
                            End::Lost(why) | End::Protocol(why) => {
                                let delay = backoff.next_delay();
                                warn!(reason = %why, retry_in = ?delay, "link lost");
                                delay
                            }
                        }
                    }
                },
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&self, ws: connect::HubSocket, shutdown: &CancellationToken) -> End {
        let (mut reader, mut writer): (
            WebSocketRead<ReadHalf<Upgraded>>,
            WebSocketWrite<WriteHalf<Upgraded>>,
        ) = ws.split(tokio::io::split);
        reader.set_auto_pong(false);
        reader.set_auto_close(false);
        reader.set_max_message_size(1 << 20);
        let (tx, mut rx) = mpsc::channel(64);
        let read_task = tokio::spawn(async move {
            let mut nothing = |_: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
            loop {
                let event = match reader.read_frame(&mut nothing).await {
                    Ok(frame) => match frame.opcode {
                        OpCode::Text => Incoming::Text(frame.payload.to_vec()),
                        OpCode::Ping => Incoming::Ping(frame.payload.to_vec()),
                        OpCode::Close => Incoming::Closed(close_code(&frame.payload)),
                        _ => continue,
                    },
                    Err(e) => Incoming::Failed(e.to_string()),
                };
                let last = matches!(event, Incoming::Closed(_) | Incoming::Failed(_));
                if tx.send(event).await.is_err() || last {
                    return;
                }
            }
        });
        let end = Session::new(self, &mut writer).run(&mut rx, shutdown).await;
        if matches!(end, End::Shutdown) {
            let _ = writer
                .write_frame(Frame::close(CloseCode::Normal.as_u16(), b"agent stopping"))
                .await;
        }
        read_task.abort();
        end
    }

    /// First frame of a connection. Two facts from the hub adjust the log:
    /// - readings up to `last_seq` were accepted (their acks were lost with a connection): they
    ///   are acknowledged here instead of being sent again;
    /// - a log that never met the hub (new device, or a wiped disk) numbered its readings from
    ///   1 while the hub may already know higher seqs from this device: those readings get new
    ///   seqs above `last_seq`, or the hub would take them for duplicates.
    fn on_hello(&self, last_seq: u64) -> Result<(), crate::store::StoreError> {
        let marker = self.storage_dir.join(SYNCED_MARKER);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if !marker.exists() && last_seq > log.acked_seq() && log.stats().pending_records > 0 {
            let pending = log.read_after(log.acked_seq(), usize::MAX, usize::MAX)?;
            let old_last = log.last_seq();
            log.raise_seq_floor(last_seq.max(old_last))?;
            // Copies first, then forget the originals: a crash in between resends originals
            // the hub calls duplicates, never loses one.
            for record in &pending {
                let seq = log.last_seq() + 1;
                log.append(seq, &record.payload)?;
            }
            log.ack(old_last)?;
            log.sync()?;
            warn!(
                readings = pending.len(),
                hub_last_seq = last_seq,
                "this log never met the hub and the hub knows later seqs: renumbered"
            );
        }
        log.raise_seq_floor(last_seq)?;
        let accepted = last_seq.min(log.last_seq());
        if accepted > log.acked_seq() {
            log.ack(accepted)?;
        }
        drop(log);
        if !marker.exists()
            && let Err(e) = std::fs::write(&marker, b"")
        {
            warn!(error = %e, path = %marker.display(), "cannot write the hub-synced marker");
        }
        Ok(())
    }
}

/// One connection's sending state.
struct Session<'a> {
    uplink: &'a Uplink,
    writer: &'a mut WebSocketWrite<WriteHalf<Upgraded>>,
    /// Highest seq sent on this connection.
    cursor: u64,
    in_flight: VecDeque<u64>,
    /// The first refused seq, why, and when to resend from it.
    refused: Option<(u64, ErrorCode)>,
    retry_at: Option<tokio::time::Instant>,
    retry_backoff: Backoff,
    bucket: Bucket,
    last_heard: tokio::time::Instant,
}

impl<'a> Session<'a> {
    fn new(uplink: &'a Uplink, writer: &'a mut WebSocketWrite<WriteHalf<Upgraded>>) -> Self {
        let s = &uplink.settings;
        Session {
            uplink,
            writer,
            cursor: 0,
            in_flight: VecDeque::new(),
            refused: None,
            retry_at: None,
            retry_backoff: Backoff::new(s.backoff_base, s.backoff_cap),
            bucket: Bucket::new(s.publish_rate, s.max_in_flight as f64),
            last_heard: tokio::time::Instant::now(),
        }
    }

    async fn run(mut self, rx: &mut mpsc::Receiver<Incoming>, shutdown: &CancellationToken) -> End {
        let dead_after = self.uplink.settings.dead_after;
        // The hub speaks first.
        let hello = tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            event = tokio::time::timeout(dead_after, rx.recv()) => event,
        };
        match hello {
            Ok(Some(Incoming::Text(text))) => match ServerFrame::parse(&text) {
                Ok(ServerFrame::Hello { last_seq, hub, .. }) => {
                    let last_seq = last_seq.unwrap_or(0);
                    debug!(%hub, last_seq, "hello");
                    if let Err(e) = self.uplink.on_hello(last_seq) {
                        return End::Protocol(format!("cannot apply the hub's last_seq: {e}"));
                    }
                }
                _ => return End::Protocol("the first frame was not hello".into()),
            },
            Ok(Some(Incoming::Closed(code))) => return End::Closed(code),
            Ok(Some(Incoming::Failed(e))) => return End::Lost(e),
            Ok(_) => return End::Protocol("no hello".into()),
            Err(_) => return End::Lost(format!("no hello within {dead_after:?}")),
        }
        self.last_heard = tokio::time::Instant::now();
        let acked = self.log().acked_seq();
        self.cursor = acked;
        let appended = self.uplink.appended.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.send_ready().await {
                return End::Lost(e);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                event = rx.recv() => {
                    self.last_heard = tokio::time::Instant::now();
                    match event {
                        Some(Incoming::Text(text)) => {
                            if let Err(end) = self.on_frame(&text) {
                                return end;
                            }
                        }
                        Some(Incoming::Ping(payload)) => {
                            let pong = Frame::pong(Payload::Owned(payload));
                            if let Err(e) = self.writer.write_frame(pong).await {
                                return End::Lost(e.to_string());
                            }
                        }
                        Some(Incoming::Closed(code)) => {
                            let _ = self.writer.write_frame(Frame::close(code, b"")).await;
                            return End::Closed(code);
                        }
                        Some(Incoming::Failed(e)) => return End::Lost(e),
                        None => return End::Lost("reader ended".into()),
                    }
                }
                _ = appended.notified() => {}
                _ = tick.tick() => {
                    if self.last_heard.elapsed() > dead_after {
                        return End::Lost(format!("nothing from the hub for {dead_after:?}"));
                    }
                }
            }
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.uplink.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_frame(&mut self, text: &[u8]) -> Result<(), End> {
        let frame = ServerFrame::parse(text)
            .map_err(|e| End::Protocol(format!("undecodable frame: {e}")))?;
        match frame {
            ServerFrame::Ack { seq, duplicate } => {
                while self.in_flight.front().is_some_and(|&s| s <= seq) {
                    self.in_flight.pop_front();
                }
                if duplicate {
                    debug!(seq, "the hub had this reading already");
                }
                self.log()
                    .ack(seq)
                    .map_err(|e| End::Lost(format!("cannot record ack {seq}: {e}")))?;
                let stats = &self.uplink.stats;
                stats.acked.fetch_add(1, Ordering::Relaxed);
                stats.last_ack_ms.store(unix_ms(), Ordering::Relaxed);
                self.retry_backoff.reset();
            }
            ServerFrame::Error {
                code,
                message,
                seq: Some(seq),
                ..
            } => {
                self.in_flight.retain(|&s| s != seq);
                match code {
                    ErrorCode::RateLimited | ErrorCode::Unavailable => {
                        if self.refused.is_none_or(|(first, _)| seq < first) {
                            debug!(seq, ?code, %message, "publish refused; will resend");
                            self.refused = Some((seq, code));
                        }
                    }
                    // The content itself can never be accepted: keeping it would block every
                    // later reading, so it is dropped, loudly.
                    ErrorCode::BadFrame => {
                        error!(seq, %message, "the hub rejected a malformed reading; dropping it");
                        if self.refused.is_none() {
                            self.log()
                                .ack(seq)
                                .map_err(|e| End::Lost(format!("cannot drop {seq}: {e}")))?;
                        }
                    }
                    // The token does not allow publishing (a viewer token, another device's
                    // id): nothing is dropped; the agent waits for a new token.
                    _ => return Err(End::Forbidden(format!("{code:?}: {message}"))),
                }
            }
            ServerFrame::Error { code, message, .. } => {
                warn!(?code, %message, "the hub reported an error");
            }
            _ => {}
        }
        Ok(())
    }

    /// Sends what the window, the rate and any pending refusal allow.
    async fn send_ready(&mut self) -> Result<(), String> {
        if let Some((first, code)) = self.refused {
            if !self.in_flight.is_empty() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            let at = *self.retry_at.get_or_insert_with(|| {
                now + match code {
                    ErrorCode::RateLimited => Duration::from_secs(1),
                    _ => self
                        .retry_backoff
                        .next_delay()
                        .max(Duration::from_millis(100)),
                }
            });
            if now < at {
                return Ok(());
            }
            self.refused = None;
            self.retry_at = None;
            self.cursor = first - 1;
        }
        let room = self.uplink.settings.max_in_flight - self.in_flight.len();
        let allowed = self.bucket.available(Instant::now()).min(room);
        if allowed == 0 {
            return Ok(());
        }
        let records = {
            let log = self.log();
            log.read_after(self.cursor.max(log.acked_seq()), allowed, 256 * 1024)
                .map_err(|e| format!("cannot read the log: {e}"))?
        };
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        // One trace per batch: the hubs' publish spans for these readings join it.
        let span = if self.uplink.roots.sample() {
            info_span!(
                parent: None,
                "send_batch",
                readings = records.len(),
                first_seq = first.seq,
                last_seq = last.seq,
            )
        } else {
            Span::none()
        };
        let traceparent = observability::propagation::traceparent(&span);
        async {
            for record in records {
                let frame = publish_frame(record.seq, &record.payload, traceparent.as_deref());
                self.writer
                    .write_frame(Frame::text(Payload::Owned(frame)))
                    .await
                    .map_err(|e| e.to_string())?;
                self.bucket.take();
                self.cursor = record.seq;
                self.in_flight.push_back(record.seq);
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}

/// A `publish` frame around a stored reading, which is already JSON.
fn publish_frame(seq: u64, payload: &[u8], traceparent: Option<&str>) -> Vec<u8> {
    let mut frame =
        Vec::with_capacity(payload.len() + 48 + traceparent.map_or(0, |t| t.len() + 16));
    frame.extend_from_slice(b"{\"type\":\"publish\",\"seq\":");
    frame.extend_from_slice(seq.to_string().as_bytes());
    if let Some(tp) = traceparent {
        // Made by our own formatter: hex digits and dashes, nothing to escape.
        frame.extend_from_slice(b",\"traceparent\":\"");
        frame.extend_from_slice(tp.as_bytes());
        frame.push(b'"');
    }
    frame.extend_from_slice(b",\"data\":");
    frame.extend_from_slice(payload);
    frame.push(b'}');
    frame
}

/// Client-side pacing below the hub's publish rate limit.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            at: Instant::now(),
        }
    }

    fn available(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        self.tokens.floor() as usize
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
