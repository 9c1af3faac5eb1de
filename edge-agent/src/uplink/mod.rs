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

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketRead, WebSocketWrite};
use hub_client::{Connected, DialOptions, Dialer, HubSocket, close_code};
use hub_protocol::rate::TokenBucket;
use hub_protocol::{ClientFrame, CloseCode, ErrorCode, Retry, ServerFrame};
use tokio::io::{BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use backoff::Backoff;

use crate::config::HubSettings;
use crate::store::Log;

type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
type Writer = WebSocketWrite<BufWriter<WriteHalf<Upgraded>>>;

/// The fewest readings sent at once while the rate paces a backlog.
const CATCH_UP_WINDOW: usize = 8;

/// What the write buffer holds before it writes through: a window of typical readings.
const WRITE_BUFFER: usize = 64 * 1024;

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

/// How a connection attempt ended, which decides how long to wait before the next
/// ([`retry_delay`]).
#[derive(Debug, PartialEq)]
enum End {
    Shutdown,
    /// The token source failed.
    NoToken(String),
    /// The hub refused the token (401/403): a new one must be provisioned.
    TokenRefused(String),
    /// No connection: the hub is unreachable or refused the upgrade for another reason.
    Unreachable(String),
    /// The hub refused the upgrade because it is shutting down: another one is up.
    Draining,
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
        let options = DialOptions {
            ca_file: settings.ca_file.clone(),
            timeout: Some(settings.connect_timeout),
            user_agent: Some(concat!("edge-agent/", env!("CARGO_PKG_VERSION")).to_owned()),
            ..DialOptions::default()
        };
        let dialer = Dialer::new(&settings.url, options).context("hub.url")?;
        let marker = storage_dir.join(SYNCED_MARKER);
        note_numbering_lost(&log.lock().unwrap_or_else(|p| p.into_inner()), &marker)
            .with_context(|| format!("cannot write {}", marker.display()))?;
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
            let end = self.attempt(&shutdown, &mut backoff).await;
            let Some(delay) = retry_delay(&end, &mut backoff, self.settings.auth_backoff) else {
                return;
            };
            report(&end, delay);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection, from getting the token to the end of the link.
    async fn attempt(&self, shutdown: &CancellationToken, backoff: &mut Backoff) -> End {
        let token = match (self.token)() {
            Ok(token) => token,
            Err(e) => return End::NoToken(format!("{e:#}")),
        };
        match self.dialer.connect(&token).await {
            Err(e) if e.is_auth_refusal() => End::TokenRefused(e.to_string()),
            Err(e) if e.is_draining() => End::Draining,
            Err(e) => End::Unreachable(e.to_string()),
            Ok(Connected { socket, node }) => {
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                info!(hub = node.as_deref().unwrap_or("?"), "connected");
                let started = Instant::now();
                let end = self.link(socket, token, shutdown).await;
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                end
            }
        }
    }

    async fn link(&self, ws: HubSocket, token: String, shutdown: &CancellationToken) -> End {
        // Frames are written into a buffer and flushed once per window, so a window reaches
        // the hub in one segment and is stored as one publication.
        let (mut reader, mut writer): (WebSocketRead<ReadHalf<Upgraded>>, Writer) =
            ws.split(|stream| {
                let (read, write) = tokio::io::split(stream);
                (read, BufWriter::with_capacity(WRITE_BUFFER, write))
            });
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
        let end = Link::new(self, &mut writer, token)
            .run(&mut rx, shutdown)
            .await;
        if matches!(end, End::Shutdown) {
            let _ = writer
                .write_frame(Frame::close(CloseCode::Normal.as_u16(), b"agent stopping"))
                .await;
            let _ = writer.flush().await;
        }
        read_task.abort();
        end
    }

    /// First frame of a connection: see [`reconcile`].
    fn on_hello(&self, last_seq: Option<u64>) -> Result<(), HelloError> {
        let marker = self.storage_dir.join(SYNCED_MARKER);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        reconcile(&mut log, &marker, last_seq)
    }
}

/// Why the agent cannot go on after the hub's `hello`; it reconnects later.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error(
        "the hub did not say which seq it has from this device, and this log never met a hub: \
         its readings cannot be numbered safely yet"
    )]
    NoLastSeq,
    #[error("the hub reports last_seq {0}: no seq is left above it for a reading")]
    ImpossibleLastSeq(u64),
    #[error("cannot apply the hub's last_seq: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What the `hub-synced` marker says about the log's seqs: absent, the log never met a hub;
/// empty, every seq is the log's own; a number, the seqs up to it are (the state file was lost
/// later, and seqs above it may have been handed out before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    NeverMet,
    Own,
    OwnUpTo(u64),
}

impl Numbering {
    fn read(marker: &Path) -> Numbering {
        match std::fs::read_to_string(marker) {
            Ok(text) if text.trim().is_empty() => Numbering::Own,
            // Unreadable counts as never met: renumbering may resend, never loses.
            Ok(text) => text
                .trim()
                .parse()
                .map_or(Numbering::NeverMet, Numbering::OwnUpTo),
            Err(_) => Numbering::NeverMet,
        }
    }

    /// Seqs up to this are known to be the log's own.
    fn own_up_to(self) -> u64 {
        match self {
            Numbering::NeverMet => 0,
            Numbering::Own => u64::MAX,
            Numbering::OwnUpTo(seq) => seq,
        }
    }
}

/// Writes the marker durably (temp file, fsync, rename).
fn write_marker(marker: &Path, text: &str) -> std::io::Result<()> {
    let tmp = marker.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, marker)
}

/// A log that lost its state file lost its seq floor: its records keep their own seqs, but seqs
/// above the last one on disk may be handed out again while the hub knows them. The marker then
/// says up to which seq the numbering is the log's own, for the next hello to renumber the rest.
pub fn note_numbering_lost(log: &Log, marker: &Path) -> std::io::Result<()> {
    let (Some(up_to), true) = (log.numbering_lost(), marker.exists()) else {
        return Ok(());
    };
    let bound = Numbering::read(marker).own_up_to().min(up_to);
    warn!(
        own_up_to = bound,
        "the log lost its state file: seqs above it are renumbered at the next hello"
    );
    write_marker(marker, &bound.to_string())
}

/// Applies what the hub's `hello` says (`last_seq`: the highest seq it has accepted from this
/// device) to the log. `marker` says the log has met a hub before: its seqs are its own, never
/// reused (the store guarantees that across power cuts).
/// - Readings up to `last_seq` were accepted (their acks were lost with a connection): they are
///   acknowledged here instead of being sent again.
/// - A log that never met a hub (new device, wiped disk, lost state file) numbered its readings
///   from wherever it stood, while the hub may know higher seqs from this device: those readings
///   get new seqs above `last_seq`, or the hub would take them for duplicates and they would be
///   deleted unsent.
/// - Without `last_seq` a log that never met a hub cannot tell which seqs are free, so nothing is
///   sent ([`HelloError::NoLastSeq`]); one that has met a hub sends as usual and lets the acks
///   speak. A missing `last_seq` is never read as 0.
pub fn reconcile(log: &mut Log, marker: &Path, last_seq: Option<u64>) -> Result<(), HelloError> {
    let numbering = Numbering::read(marker);
    let last_seq = match last_seq {
        Some(seq) if seq >= hub_protocol::MAX_SEQ => {
            return Err(HelloError::ImpossibleLastSeq(seq));
        }
        Some(seq) => seq,
        None if numbering == Numbering::Own => return Ok(()),
        None => return Err(HelloError::NoLastSeq),
    };
    let own = numbering.own_up_to();
    if last_seq > own {
        // The hub knows seqs this log may have handed out again. What it holds up to `own` is
        // the log's own and accepted; the rest gets new seqs above everything.
        let accepted = own.min(log.last_seq());
        if accepted > log.acked_seq() {
            log.ack(accepted)?;
        }
        if log.stats().pending_records > 0 {
            let pending = log.read_after(log.acked_seq(), usize::MAX, usize::MAX)?;
            let old_last = log.last_seq();
            log.raise_seq_floor(last_seq.max(old_last))?;
            // Copies first, then forget the originals: a crash in between resends originals
            // the hub calls duplicates, never loses one. The copies go above the originals, so
            // the seqs between the hub's last one and the originals' last one are passed over.
            for record in &pending {
                let seq = log.next_seq()?;
                log.append(seq, &record.payload)?;
            }
            log.ack(old_last)?;
            log.sync()?;
            warn!(
                readings = pending.len(),
                hub_last_seq = last_seq,
                skipped_seqs = old_last.saturating_sub(last_seq),
                "the hub knows seqs this log may have used: renumbered"
            );
        }
    }
    if last_seq > log.last_seq() {
        info!(
            hub_last_seq = last_seq,
            skipped_seqs = last_seq - log.last_seq(),
            "the hub knows later seqs from this device; continuing above them"
        );
    }
    log.raise_seq_floor(last_seq)?;
    let accepted = last_seq.min(log.last_seq());
    if accepted > log.acked_seq() {
        log.ack(accepted)?;
    }
    if numbering != Numbering::Own
        && let Err(e) = write_marker(marker, "")
    {
        warn!(error = %e, path = %marker.display(), "cannot write the hub-synced marker");
    }
    Ok(())
}

/// What is in flight on one connection and where sending goes on from: the bookkeeping behind
/// "resend from the oldest refused reading", apart from the socket.
#[derive(Debug, Default)]
struct Window {
    /// Highest seq sent on this connection (or the one to resend after).
    cursor: u64,
    in_flight: VecDeque<u64>,
    /// The first refused seq and why.
    refused: Option<(u64, ErrorCode)>,
}

impl Window {
    fn after(acked: u64) -> Self {
        Window {
            cursor: acked,
            ..Window::default()
        }
    }

    fn sent(&mut self, seq: u64) {
        self.cursor = seq;
        self.in_flight.push_back(seq);
    }

    /// The hub acks in order: everything up to `seq` is answered.
    fn acked(&mut self, seq: u64) {
        while self.in_flight.front().is_some_and(|&s| s <= seq) {
            self.in_flight.pop_front();
        }
    }

    /// An `error` names `seq`: false when no publish of ours with that seq is in flight, so the
    /// error is not about one of ours (a hub bug or a hostile one) and changes nothing.
    fn answered(&mut self, seq: u64) -> bool {
        let ours = self.in_flight.contains(&seq);
        self.in_flight.retain(|&s| s != seq);
        ours
    }

    /// A refusal to resend from; the lowest refused seq wins.
    fn refused(&mut self, seq: u64, code: ErrorCode) {
        if self.refused.is_none_or(|(first, _)| seq < first) {
            self.refused = Some((seq, code));
        }
    }

    /// Sends go on from the refused seq.
    fn resume(&mut self) {
        if let Some((first, _)) = self.refused.take() {
            self.cursor = first.saturating_sub(1);
        }
    }

    fn room(&self, max_in_flight: usize) -> usize {
        max_in_flight.saturating_sub(self.in_flight.len())
    }
}

/// One connection's state: what is in flight, refused, paced.
struct Link<'a> {
    uplink: &'a Uplink,
    writer: &'a mut Writer,
    window: Window,
    /// When to resend from a refused seq.
    retry_at: Option<tokio::time::Instant>,
    retry_backoff: Backoff,
    /// Client-side pacing below the hub's publish rate limit.
    bucket: TokenBucket,
    /// When the bucket holds a catch-up window again.
    paced_until: Option<tokio::time::Instant>,
    last_heard: tokio::time::Instant,
    /// The token the hub holds for this connection (at connect, or taken in a `refresh`).
    token: String,
    /// A token sent in a `refresh` and not answered yet; and the last one the hub refused for
    /// good (not sent again until the file changes once more).
    offered: Option<String>,
    refused: Option<String>,
    token_checked: tokio::time::Instant,
}

/// How often a connected agent reads its token source for a new token to `refresh` with.
const TOKEN_CHECK: Duration = Duration::from_secs(1);
/// The `ref` of the agent's `refresh` frames (as JSON): its answers are told apart by it.
const REFRESH_REF: &str = "\"refresh\"";

impl<'a> Link<'a> {
    fn new(uplink: &'a Uplink, writer: &'a mut Writer, token: String) -> Self {
        let s = &uplink.settings;
        Link {
            uplink,
            writer,
            window: Window::default(),
            retry_at: None,
            retry_backoff: Backoff::new(s.backoff_base, s.backoff_cap),
            bucket: TokenBucket::new(
                s.publish_rate,
                u32::try_from(s.max_in_flight).unwrap_or(u32::MAX),
            ),
            paced_until: None,
            last_heard: tokio::time::Instant::now(),
            token,
            offered: None,
            refused: None,
            token_checked: tokio::time::Instant::now(),
        }
    }

    /// Gives the hub the token source's new token, if it has one: the connection then lives to
    /// the new token's expiry instead of being closed at the old one's (4001) and reconnecting.
    /// The hub answers `refreshed`, or an `error` (logged) and the old token stays in force.
    async fn refresh_token(&mut self) -> Result<(), End> {
        if self.token_checked.elapsed() < TOKEN_CHECK {
            return Ok(());
        }
        self.token_checked = tokio::time::Instant::now();
        let Ok(token) = (self.uplink.token)() else {
            return Ok(()); // unreadable now: the next connect says so, loudly
        };
        let known = [
            Some(&self.token),
            self.offered.as_ref(),
            self.refused.as_ref(),
        ];
        if known.contains(&Some(&token)) {
            return Ok(());
        }
        let reference = serde_json::value::RawValue::from_string(REFRESH_REF.to_owned()).ok();
        let frame = ClientFrame::Refresh {
            token: token.as_str().into(),
            reference: reference.as_deref(),
        }
        .to_json();
        self.write_now(Frame::text(Payload::Owned(frame.into_bytes())))
            .await
            .map_err(|e| End::Lost(e.to_string()))?;
        info!("the token file changed; refreshing the connection's token");
        self.offered = Some(token);
        Ok(())
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
                    debug!(%hub, ?last_seq, "hello");
                    if let Err(e) = self.uplink.on_hello(last_seq) {
                        return End::Protocol(e.to_string());
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
        self.window = Window::after(acked);
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
                    if let Err(end) = self.on_event(event).await {
                        return end;
                    }
                    // Everything already read is answered before sending again, so the
                    // room a burst of acks frees goes out as one window, not one per ack.
                    while let Ok(event) = rx.try_recv() {
                        if let Err(end) = self.on_event(Some(event)).await {
                            return end;
                        }
                    }
                }
                _ = appended.notified() => {}
                _ = wake_at(self.paced_until) => self.paced_until = None,
                _ = tick.tick() => {
                    if self.last_heard.elapsed() > dead_after {
                        return End::Lost(format!("nothing from the hub for {dead_after:?}"));
                    }
                    if let Err(end) = self.refresh_token().await {
                        return end;
                    }
                }
            }
        }
    }

    async fn on_event(&mut self, event: Option<Incoming>) -> Result<(), End> {
        self.last_heard = tokio::time::Instant::now();
        match event {
            Some(Incoming::Text(text)) => self.on_frame(&text),
            Some(Incoming::Ping(payload)) => {
                let pong = Frame::pong(Payload::Owned(payload));
                self.write_now(pong)
                    .await
                    .map_err(|e| End::Lost(e.to_string()))
            }
            Some(Incoming::Closed(code)) => {
                let _ = self.write_now(Frame::close(code, b"")).await;
                Err(End::Closed(code))
            }
            Some(Incoming::Failed(e)) => Err(End::Lost(e)),
            None => Err(End::Lost("reader ended".into())),
        }
    }

    /// Writes one frame and flushes it out of the buffer.
    async fn write_now(&mut self, frame: Frame<'_>) -> Result<(), fastwebsockets::WebSocketError> {
        self.writer.write_frame(frame).await?;
        self.writer.flush().await
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.uplink.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_frame(&mut self, text: &[u8]) -> Result<(), End> {
        let frame = ServerFrame::parse(text)
            .map_err(|e| End::Protocol(format!("undecodable frame: {e}")))?;
        match frame {
            ServerFrame::Ack { seq, duplicate } => {
                self.window.acked(seq);
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
            } if self.window.answered(seq) => {
                match code {
                    ErrorCode::RateLimited | ErrorCode::Unavailable => {
                        debug!(seq, ?code, %message, "publish refused; will resend");
                        self.window.refused(seq, code);
                    }
                    // The content itself can never be accepted: keeping it would block every
                    // later reading, so it is dropped, loudly.
                    ErrorCode::BadFrame => {
                        error!(seq, %message, "the hub rejected a malformed reading; dropping it");
                        if self.window.refused.is_none() {
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
            ServerFrame::Refreshed { expires_at, .. } => {
                info!(expires_at, "the hub took the new token");
                if let Some(token) = self.offered.take() {
                    self.token = token;
                }
            }
            ServerFrame::Error {
                code,
                message,
                reference: Some(r),
                ..
            } if r.get() == REFRESH_REF => {
                let token = self.offered.take();
                match code {
                    // Passing: offered again at the next look.
                    ErrorCode::RateLimited | ErrorCode::Unavailable => {
                        debug!(?code, "refresh refused for now; will retry");
                    }
                    _ => {
                        warn!(?code, %message,
                            "the hub refused the new token; the connection keeps its old one");
                        self.refused = token;
                    }
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
        if let Some((_, code)) = self.window.refused {
            if !self.window.in_flight.is_empty() {
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
            self.retry_at = None;
            self.window.resume();
        }
        let room = self.window.room(self.uplink.settings.max_in_flight);
        let records = {
            // Through the `&Uplink`, so the guard does not hold `self`.
            let uplink = self.uplink;
            let mut log = uplink.log.lock().unwrap_or_else(|p| p.into_inner());
            let after = self.window.cursor.max(log.acked_seq());
            let pending =
                usize::try_from(log.last_seq().saturating_sub(after)).unwrap_or(usize::MAX);
            let wanted = room.min(pending);
            if wanted == 0 {
                return Ok(());
            }
            let now = Instant::now();
            let allowed = self.bucket.available(now).min(wanted);
            // Behind, paced by the rate: tokens are saved up for a window, which the hub
            // stores as one publication, rather than spent one reading at a time.
            let window = wanted.min(CATCH_UP_WINDOW);
            if allowed < window {
                let wait = self.bucket.time_until(window, now);
                self.paced_until = Some(tokio::time::Instant::now() + wait);
                return Ok(());
            }
            log.read_after(after, allowed, 256 * 1024)
                .map_err(|e| format!("cannot read the log: {e}"))?
        };
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        // One trace per batch: the hubs' publish spans for these readings join it.
        let span = self.uplink.roots.root_span(|| {
            info_span!(
                parent: None,
                "send_batch",
                readings = records.len(),
                first_seq = first.seq,
                last_seq = last.seq,
            )
        });
        let traceparent = observability::propagation::traceparent(&span);
        async {
            for record in records {
                let frame = hub_protocol::client::publish_frame(
                    record.seq,
                    &record.payload,
                    traceparent.as_deref(),
                );
                self.writer
                    .write_frame(Frame::text(Payload::Owned(frame)))
                    .await
                    .map_err(|e| e.to_string())?;
                self.bucket.take();
                self.window.sent(record.seq);
            }
            self.writer.flush().await.map_err(|e| e.to_string())
        }
        .instrument(span)
        .await
    }
}

/// Resolves at `at`, or never.
async fn wake_at(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long to wait after `end` before connecting again; `None` after a shutdown. A close code
/// is answered as the protocol's one table says ([`Retry`]); a token the hub refuses, or
/// readings it will not take, wait the long `auth_backoff`: a person must fix them, and
/// retrying sooner only loads the hub.
fn retry_delay(end: &End, backoff: &mut Backoff, auth_backoff: Duration) -> Option<Duration> {
    Some(match end {
        End::Shutdown => return None,
        // As a restart's close: the other hubs are healthy.
        End::Draining => backoff::soon(),
        End::Closed(code) => match Retry::after_close(*code) {
            // The agent's token source is read again on every attempt: that is its new token.
            Retry::Soon | Retry::NewToken => backoff::soon(),
            Retry::Backoff => backoff.next_delay(),
            Retry::Never => auth_backoff,
        },
        End::NoToken(_) | End::TokenRefused(_) | End::Forbidden(_) => auth_backoff,
        End::Unreachable(_) | End::Lost(_) | End::Protocol(_) => backoff.next_delay(),
    })
}

/// Logs why the link ended and when it is tried again.
fn report(end: &End, retry_in: Duration) {
    match end {
        End::Shutdown => {}
        End::NoToken(e) => error!(error = %e, ?retry_in, "no token; retrying"),
        End::TokenRefused(e) => error!(error = %e, ?retry_in,
            "the hub refused this device's token; provision a new one"),
        End::Unreachable(e) => warn!(error = %e, ?retry_in, "cannot connect to the hub"),
        End::Draining => info!(?retry_in, "the hub is shutting down; connecting elsewhere"),
        End::Closed(code) => match Retry::after_close(*code) {
            Retry::Soon | Retry::NewToken => info!(code, ?retry_in, "the hub closed the link"),
            Retry::Backoff => warn!(code, ?retry_in, "the hub closed the link"),
            Retry::Never => error!(
                code,
                ?retry_in,
                "the hub closed the link for something this agent sent; it needs a fix"
            ),
        },
        End::Forbidden(why) => error!(reason = %why, ?retry_in,
            "the hub does not accept readings with this token"),
        End::Lost(why) | End::Protocol(why) => warn!(reason = %why, ?retry_in, "link lost"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{after_power_cut, synced_lengths};
    use crate::store::{FsyncPolicy, StoreConfig};

    /// The delays `retry_delay` gives for `end`, twice in a row: shows whether it grows.
    fn delays(end: End) -> (Option<Duration>, Option<Duration>, u128) {
        let auth = Duration::from_secs(300);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let first = retry_delay(&end, &mut backoff, auth);
        let second = retry_delay(&end, &mut backoff, auth);
        (first, second, backoff.ceiling().as_millis())
    }

    #[test]
    fn a_hub_restart_a_draining_refusal_and_an_expired_token_reconnect_within_a_second() {
        let ends = [
            End::Closed(CloseCode::ServiceRestart.as_u16()),
            End::Closed(CloseCode::TokenExpired.as_u16()),
            End::Draining,
        ];
        for end in ends {
            let what = format!("{end:?}");
            let (first, second, ceiling) = delays(end);
            assert!(first.unwrap() <= Duration::from_secs(1), "{what}");
            assert!(second.unwrap() <= Duration::from_secs(1), "{what}");
            assert_eq!(ceiling, 100, "{what}: the backoff did not grow");
        }
    }

    #[test]
    fn other_closes_and_lost_links_back_off_exponentially() {
        let ends = [
            End::Closed(CloseCode::SlowConsumer.as_u16()),
            End::Closed(CloseCode::PingTimeout.as_u16()),
            End::Closed(CloseCode::TryAgainLater.as_u16()),
            End::Closed(CloseCode::RateLimited.as_u16()),
            End::Closed(1006),
            End::Lost("eof".into()),
            End::Unreachable("refused".into()),
            End::Protocol("no hello".into()),
        ];
        for end in ends {
            let (first, second, ceiling) = delays(end);
            assert!(first.unwrap() <= Duration::from_millis(100));
            assert!(second.unwrap() <= Duration::from_millis(200));
            assert_eq!(ceiling, 400, "two attempts doubled the ceiling twice");
        }
    }

    #[test]
    fn what_a_person_must_fix_waits_the_auth_backoff() {
        let auth = Some(Duration::from_secs(300));
        let ends = [
            End::Closed(CloseCode::MessageTooBig.as_u16()),
            End::Closed(CloseCode::ProtocolError.as_u16()),
            End::TokenRefused("401".into()),
            End::Forbidden("publish".into()),
            End::NoToken("no file".into()),
        ];
        for end in ends {
            assert_eq!(delays(end), (auth, auth, 100));
        }
        assert_eq!(delays(End::Shutdown), (None, None, 100));
    }

    fn open(dir: &Path) -> Log {
        Log::open(StoreConfig {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 20,
            segment_bytes: 4096,
            fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
        })
        .unwrap()
    }

    fn append(log: &mut Log, payload: &str) -> u64 {
        let seq = log.next_seq().unwrap();
        log.append(seq, payload.as_bytes()).unwrap();
        seq
    }

    fn pending(log: &mut Log) -> Vec<String> {
        let acked = log.acked_seq();
        log.read_after(acked, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8(r.payload).unwrap())
            .collect()
    }

    #[test]
    fn readings_taken_after_a_power_cut_are_sent_not_taken_for_ones_the_hub_has() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(SYNCED_MARKER);
        let mut log = open(dir.path());
        reconcile(&mut log, &marker, Some(0)).unwrap();
        for n in 1..=10 {
            append(&mut log, &format!("r{n}"));
        }
        log.sync().unwrap();
        let synced = synced_lengths(dir.path());
        append(&mut log, "r11");
        append(&mut log, "r12");
        log.ack(12).unwrap(); // the hub has 11 and 12; the power goes before they are synced
        let cut = after_power_cut(dir.path(), &synced);
        drop(log);

        let marker = cut.path().join(SYNCED_MARKER);
        let mut log = open(cut.path());
        append(&mut log, "after the cut 1");
        append(&mut log, "after the cut 2");
        reconcile(&mut log, &marker, Some(12)).unwrap();
        assert_eq!(pending(&mut log), ["after the cut 1", "after the cut 2"]);
        assert_eq!(log.acked_seq(), 12);
    }

    #[test]
    fn an_error_naming_a_seq_not_in_flight_changes_nothing() {
        let mut window = Window::after(0);
        window.sent(1);
        window.sent(2);
        for seq in [0, 3, u64::MAX] {
            assert!(!window.answered(seq), "seq {seq}");
        }
        assert_eq!(window.in_flight, [1, 2]);
        assert_eq!(window.cursor, 2);
    }

    #[test]
    fn a_refusal_resends_from_the_lowest_refused_seq() {
        let mut window = Window::after(0);
        for seq in 1..=3 {
            window.sent(seq);
        }
        assert!(window.answered(2));
        window.refused(2, ErrorCode::RateLimited);
        assert!(window.answered(1));
        window.refused(1, ErrorCode::Unavailable);
        window.acked(3);
        assert!(window.in_flight.is_empty());
        window.resume();
        assert_eq!(window.cursor, 0, "resend from 1, without wrapping below it");
        assert_eq!(window.room(4), 4);
    }

    #[test]
    fn a_hello_without_last_seq_is_never_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(SYNCED_MARKER);
        let mut log = open(dir.path());
        for n in 1..=3 {
            append(&mut log, &format!("r{n}"));
        }
        assert!(matches!(
            reconcile(&mut log, &marker, None),
            Err(HelloError::NoLastSeq)
        ));
        assert!(!marker.exists(), "a log that never met a hub still has not");
        assert_eq!(log.acked_seq(), 0);

        // Once the hub can say it, the readings go above what it knows.
        reconcile(&mut log, &marker, Some(50)).unwrap();
        assert!(marker.exists());
        assert_eq!(pending(&mut log), ["r1", "r2", "r3"]);
        let first = log.read_after(log.acked_seq(), 1, usize::MAX).unwrap();
        assert_eq!(first[0].seq, 51);

        // A log that has met a hub sends as usual and lets the acks speak.
        reconcile(&mut log, &marker, None).unwrap();
        assert_eq!(pending(&mut log), ["r1", "r2", "r3"]);
    }

    #[test]
    fn an_impossible_last_seq_is_refused_and_the_log_keeps_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(SYNCED_MARKER);
        let mut log = open(dir.path());
        append(&mut log, "r1");
        for seq in [u64::MAX, hub_protocol::MAX_SEQ] {
            assert!(matches!(
                reconcile(&mut log, &marker, Some(seq)),
                Err(HelloError::ImpossibleLastSeq(s)) if s == seq
            ));
        }
        assert!(!marker.exists());
        assert_eq!(append(&mut log, "r2"), 2);
        reconcile(&mut log, &marker, Some(41)).unwrap();
        assert_eq!(
            append(&mut log, "r3"),
            44,
            "r1 and r2 renumbered to 42 and 43"
        );
    }

    /// A log that met the hub, holds r1..r5 acknowledged and r6 pending, and loses its state file.
    fn lost_state_file(dir: &Path) -> (Log, std::path::PathBuf) {
        let marker = dir.join(SYNCED_MARKER);
        let mut log = open(dir);
        reconcile(&mut log, &marker, Some(0)).unwrap();
        for n in 1..=5 {
            append(&mut log, &format!("r{n}"));
        }
        log.ack(5).unwrap();
        append(&mut log, "r6");
        drop(log);
        std::fs::remove_file(dir.join("state")).unwrap();
        let log = open(dir);
        note_numbering_lost(&log, &marker).unwrap();
        (log, marker)
    }

    fn pending_seqs(log: &mut Log) -> Vec<(u64, String)> {
        let acked = log.acked_seq();
        log.read_after(acked, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, String::from_utf8(r.payload).unwrap()))
            .collect()
    }

    #[test]
    fn a_log_that_lost_its_state_file_sends_again_nothing_the_hub_has() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, marker) = lost_state_file(dir.path());
        reconcile(&mut log, &marker, Some(5)).unwrap();
        assert_eq!(pending_seqs(&mut log), [(6, "r6".to_owned())]);
    }

    #[test]
    fn a_log_that_lost_its_state_file_renumbers_what_may_collide_with_the_hubs_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, marker) = lost_state_file(dir.path());
        // Taken after the loss, numbered 7; the hub had 7..9 from before (a power cut took them).
        append(&mut log, "new");
        reconcile(&mut log, &marker, Some(9)).unwrap();
        assert_eq!(
            pending_seqs(&mut log),
            [(10, "new".to_owned())],
            "r6 (6 <= 9) was accepted"
        );
        drop(log);
        let mut log = open(dir.path());
        assert_eq!(Numbering::read(&marker), Numbering::Own);
        reconcile(&mut log, &marker, Some(10)).unwrap();
        assert!(pending_seqs(&mut log).is_empty());
    }
}
