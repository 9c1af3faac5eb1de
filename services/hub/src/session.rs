//! What a connection may do, frame by frame: the protocol logic between the reader and the
//! broker. Refusals the client can fix are `error` frames; `Err(code)` ends the connection.

use std::sync::Arc;
use std::time::Instant;

use hub_protocol::channel::{self, publication_channels};
use hub_protocol::{ClientFrame, CloseCode, ErrorCode, Role, ServerFrame, Since};
use observability::in_span;
use observability::propagation::{self, Remote};
use serde_json::value::RawValue;
use tracing::field::Empty;
use tracing::{Span, debug, info_span, warn};

use crate::auth::Identity;
use crate::broker::{BrokerError, Publication, PublishOutcome, Reading};
use crate::conflate::Conflation;
use crate::frame;
use crate::limits::{Share, TokenBucket};
use crate::outbox::{Outbound, Outbox};
use crate::state::AppState;
use crate::writer::{self, Expiry};

/// Where a subscription starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// Live, or resumed from `since`.
    Since(Option<&'a Since>),
    /// With a snapshot of the channel's latest messages, then live.
    Snapshot,
}

pub struct Session {
    identity: Identity,
    expiry: Arc<Expiry>,
    /// The hub's shared parts (broker, metrics, limits, auth): one for every session.
    hub: Arc<AppState>,
    outbox: Outbox,
    /// Each subscribed channel, with its conflation when it has a `max_rate`. A list sized to
    /// fit, not a map: most connections hold one or two (a map's smallest table is 4 entries and
    /// its control bytes, per connection), and at most `limits.max_subscriptions`.
    subscriptions: Vec<(Box<str>, Option<Conflation>)>,
    /// Subscribes: each can make the broker create channel state.
    changes: TokenBucket,
    changes_refused_in_row: u32,
    publisher: Option<Publisher>,
    /// Publishes admitted and not yet stored (see [`Session::flush`]).
    batch: Vec<Admitted>,
    batch_bytes: usize,
}

/// At most this many readings go to the broker in one publication.
pub const MAX_BATCH_READINGS: usize = 128;
/// A publication stops taking readings once their data passes this many bytes.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A publish that passed every check, waiting in the batch for the broker.
struct Admitted {
    seq: u64,
    data: Box<RawValue>,
    /// The reading's `publish` span; it ends once the reading is answered.
    span: Span,
    received_at: Instant,
    /// The frame's `ref`, echoed by an error.
    reference: Option<Box<RawValue>>,
}

/// Publishing state of an agent connection.
struct Publisher {
    channels: Vec<String>,
    /// The device's budget, shared with its other connections to this hub.
    share: Arc<Share>,
    refused_in_row: u32,
    /// The first refused `seq` not yet sent again, and why it was refused. Later seqs are refused
    /// until it comes back: accepting one would make the refused reading a "duplicate" forever.
    awaiting_resend: Option<(u64, ErrorCode)>,
}

/// What a publish may do, by the device's budget and its earlier refusals.
#[derive(Debug, PartialEq)]
enum Admission {
    Accept,
    /// An `error` frame with this code and message; the reading was not stored.
    Refuse(ErrorCode, String),
    /// Refused more than `limits.publish_burst` times in a row: the connection closes with 4029.
    Close,
}

impl Publisher {
    /// The refusal bookkeeping of one publish: until the first refused `seq` comes back every
    /// later one is refused too, the shared rate is charged, and an agent that keeps going after
    /// `burst` refusals in a row is cut off.
    fn admit(&mut self, seq: u64, now: Instant, burst: u32) -> Admission {
        let refusal = match self.awaiting_resend {
            Some((first, code)) if seq > first => {
                Some((code, format!("publish {first} was refused; resend from it")))
            }
            Some(_) | None => {
                self.awaiting_resend = None;
                let allowed = self
                    .share
                    .publish
                    .lock()
                    .map_or(true, |mut bucket| bucket.try_take(now));
                (!allowed).then(|| {
                    self.awaiting_resend = Some((seq, ErrorCode::RateLimited));
                    (
                        ErrorCode::RateLimited,
                        "publish rate exceeded; retry later".to_owned(),
                    )
                })
            }
        };
        let Some((code, message)) = refusal else {
            self.refused_in_row = 0;
            return Admission::Accept;
        };
        self.refused_in_row += 1;
        if self.refused_in_row > burst {
            Admission::Close
        } else {
            Admission::Refuse(code, message)
        }
    }

    /// The broker could not store `seq`: it must come back before anything after it.
    fn not_stored(&mut self, seq: u64) {
        self.awaiting_resend = Some((seq, ErrorCode::Unavailable));
    }
}

type Outcome = Result<(), CloseCode>;

impl Session {
    /// `expiry` is when the connection's writer closes it (4001); a `refresh` moves it.
    pub fn new(
        identity: Identity,
        expiry: Arc<Expiry>,
        outbox: Outbox,
        share: Arc<Share>,
        hub: Arc<AppState>,
    ) -> Self {
        let publisher = (identity.role == Role::Agent).then(|| Publisher {
            channels: publication_channels(&identity.sub, &identity.groups),
            share,
            refused_in_row: 0,
            awaiting_resend: None,
        });
        let limits = &hub.settings.limits;
        let changes = TokenBucket::new(limits.subscribe_rate, limits.subscribe_burst);
        Session {
            identity,
            expiry,
            hub,
            outbox,
            subscriptions: Vec::new(),
            changes,
            changes_refused_in_row: 0,
            publisher,
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    /// Sends `hello`. An agent's hello must say the device's last accepted seq: an agent that
    /// lost its log numbers its readings above it, and one told nothing (or 0) would have them
    /// taken for duplicates. So when the broker cannot say, the connection closes with 1013 and
    /// the agent comes back later.
    pub async fn start(&mut self) -> Outcome {
        let last_seq = match self.identity.role {
            Role::Agent => match self.hub.broker.last_seq(&self.identity.sub).await {
                Ok(seq) => Some(seq),
                Err(e) => {
                    warn!(sub = %self.identity.sub, error = %e,
                        "the device's last seq is unknown; closing with 1013");
                    return Err(CloseCode::TryAgainLater);
                }
            },
            Role::Viewer | Role::Admin => None,
        };
        self.send(&ServerFrame::Hello {
            hub: (*self.hub.node_id).into(),
            sub: self.identity.sub.as_str().into(),
            role: self.identity.role.as_str().into(),
            last_seq,
            expires_at: self.identity.expires_at,
        })
    }

    /// Handles one client message. A publish that passes its checks joins the batch and is
    /// answered by [`Session::flush`]; anything else is answered at once, after the batch, so
    /// the client gets its answers in the order it sent its frames.
    pub async fn handle_text(&mut self, text: &[u8]) -> Outcome {
        let frame = match ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.flush().await?;
                let echo = ClientFrame::echo(text);
                return self.error(e.code(), &e.to_string(), echo.seq, echo.reference);
            }
        };
        if !matches!(frame, ClientFrame::Publish { .. }) {
            self.flush().await?;
        }
        // Subscribes only: an unsubscribe frees what a subscribe took, and refusing it would
        // leave a client believing it had left.
        // A refresh too: it costs a signature check.
        let limited = matches!(
            frame,
            ClientFrame::Subscribe { .. } | ClientFrame::Refresh { .. }
        );
        if limited && !self.changes.try_take(Instant::now()) {
            self.changes_refused_in_row += 1;
            // A client that keeps churning after being told is cut off.
            if self.changes_refused_in_row > self.hub.settings.limits.subscribe_burst {
                return Err(CloseCode::RateLimited);
            }
            let message = "subscribes and refreshes above limits.subscribe_rate; retry later";
            return self.error(ErrorCode::RateLimited, message, None, frame.reference());
        }
        self.changes_refused_in_row = 0;
        match frame {
            ClientFrame::Subscribe {
                channel,
                since,
                snapshot,
                max_rate,
                reference,
            } => {
                let span = self.hub.roots.child_span(|| {
                    info_span!(
                        "subscribe",
                        channel = %channel,
                        resume = since.is_some(),
                        snapshot,
                        max_rate,
                        recovered = Empty,
                        replayed = Empty,
                    )
                });
                // A snapshot stands in for a replay: a resume with one is a new snapshot, and
                // so is a conflated one's (a conflated stream skips values anyway).
                let start = match snapshot || (max_rate.is_some() && since.is_some()) {
                    true => Start::Snapshot,
                    false => Start::Since(since.as_ref()),
                };
                let subscribe = self.subscribe(&channel, start, max_rate, reference);
                in_span(span, subscribe).await
            }
            ClientFrame::Unsubscribe { channel, reference } => {
                self.unsubscribe(&channel, reference)
            }
            ClientFrame::Refresh { token, reference } => self.refresh(&token, reference),
            ClientFrame::Publish {
                seq,
                data,
                device,
                traceparent,
                reference,
            } => {
                let make = || {
                    info_span!(
                        parent: None,
                        "publish",
                        device = %self.identity.sub,
                        seq,
                        outcome = Empty,
                    )
                };
                // The agent's trace if it sent a recorded one; none if it sent an unrecorded one;
                // else, or for an unreadable one, maybe a trace of our own.
                let span = match traceparent.as_deref().map(propagation::remote_parent) {
                    Some(Remote::Recorded(parent)) => {
                        let span = self.hub.roots.remote_child_span(make);
                        propagation::adopt(&span, parent);
                        span
                    }
                    Some(Remote::NotRecorded) => Span::none(),
                    Some(Remote::Invalid) | None => self.hub.roots.root_span(make),
                };
                self.publish(seq, data, device.as_deref(), reference, span)
                    .await
            }
        }
    }

    async fn subscribe(
        &mut self,
        channel: &str,
        start: Start<'_>,
        max_rate: Option<f64>,
        reference: Option<&RawValue>,
    ) -> Outcome {
        let refuse = |code, message: &str| (code, message.to_owned());
        let refusal = if self.identity.role != Role::Viewer {
            Some(refuse(ErrorCode::Forbidden, "agents cannot subscribe"))
        } else if let Err(e) = channel::validate(channel) {
            Some(refuse(ErrorCode::InvalidChannel, &e.to_string()))
        } else if !self.identity.may_subscribe(channel) {
            Some(refuse(
                ErrorCode::Forbidden,
                &format!("token may not subscribe to `{channel}`"),
            ))
        } else if self.subscription(channel).is_some() {
            Some(refuse(
                ErrorCode::AlreadySubscribed,
                &format!("already subscribed to `{channel}`"),
            ))
        } else if self.subscriptions.len() >= self.hub.settings.limits.max_subscriptions {
            let max = self.hub.settings.limits.max_subscriptions;
            Some(refuse(
                ErrorCode::TooManySubscriptions,
                &format!("at most {max} subscriptions per connection"),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            return self.error(code, &message, None, reference);
        }
        let broker = &self.hub.broker;
        let conflation =
            max_rate.map(|rate| Conflation::start(&self.outbox, rate, self.hub.metrics.clone()));
        let subscriber = conflation.as_ref().map_or(&self.outbox, Conflation::feed);
        let subscribed = match start {
            Start::Since(since) => broker.subscribe(channel, since, subscriber).await,
            Start::Snapshot => broker.subscribe_with_snapshot(channel, subscriber).await,
        };
        if subscribed.is_err()
            && let Some(conflation) = &conflation
        {
            conflation.stop();
        }
        let since = match start {
            Start::Since(since) => since,
            Start::Snapshot => None,
        };
        match subscribed {
            Ok(outcome) => {
                let span = Span::current();
                span.record("recovered", outcome.recovered);
                span.record("replayed", outcome.replayed);
                self.subscriptions.reserve_exact(1);
                self.subscriptions.push((channel.into(), conflation));
                let metrics = &self.hub.metrics;
                metrics.subscriptions.inc();
                if let Some(size) = outcome.snapshot {
                    metrics.snapshot_devices.observe_value(size.devices as u64);
                    if size.truncated {
                        metrics.snapshots_truncated.inc();
                    }
                }
                if since.is_some() {
                    metrics.recoveries.inc(if outcome.recovered {
                        "recovered"
                    } else {
                        "not_recovered"
                    });
                }
                Ok(())
            }
            Err(BrokerError::SlowConsumer) => Err(CloseCode::SlowConsumer),
            Err(e @ (BrokerError::Unavailable(_) | BrokerError::ChannelTableFull { .. })) => {
                self.error(ErrorCode::Unavailable, &e.to_string(), None, reference)
            }
        }
    }

    /// Moves the connection's expiry (and the key it is watched by) to a new token's. The token
    /// is verified like a new connection's and must name the same `sub`, role and grants: a
    /// refresh extends a connection, it never changes what the connection may do.
    fn refresh(&mut self, token: &str, reference: Option<&RawValue>) -> Outcome {
        let metrics = &self.hub.metrics;
        let fresh = match self.hub.auth.authenticate(token) {
            Ok(fresh) => fresh,
            Err(e) => {
                metrics.token_refreshes.inc("refused");
                let message = format!("{}: {e}; the connection keeps its token", e.reason());
                return self.error(ErrorCode::BadToken, &message, None, reference);
            }
        };
        let me = &self.identity;
        let same = fresh.sub == me.sub
            && fresh.role == me.role
            && fresh.groups == me.groups
            && fresh.channels == me.channels;
        if !same {
            metrics.token_refreshes.inc("refused");
            let message = "a refresh keeps the connection's sub, role, groups and channels; \
                           connect with the new token instead";
            return self.error(ErrorCode::Forbidden, message, None, reference);
        }
        metrics.token_refreshes.inc("refreshed");
        debug!(sub = %fresh.sub, expires_at = fresh.expires_at, "token refreshed");
        self.expiry.set(writer::expiry_time(
            fresh.expires_at,
            self.hub.settings.auth.leeway,
        ));
        // What revocations and key removals now check.
        self.hub
            .live_tokens
            .replace(&fresh, &self.outbox, &self.hub.token_lists);
        let expires_at = fresh.expires_at;
        self.identity = fresh;
        self.send(&ServerFrame::Refreshed {
            expires_at,
            reference,
        })
    }

    fn unsubscribe(&mut self, channel: &str, reference: Option<&RawValue>) -> Outcome {
        let Some((_, conflation)) = self
            .subscription(channel)
            .map(|i| self.subscriptions.swap_remove(i))
        else {
            let message = format!("not subscribed to `{channel}`");
            return self.error(ErrorCode::NotSubscribed, &message, None, reference);
        };
        self.hub.broker.unsubscribe(channel, self.outbox.id());
        if let Some(conflation) = conflation {
            conflation.stop();
        }
        self.hub.metrics.subscriptions.dec();
        self.send(&ServerFrame::Unsubscribed {
            channel: channel.into(),
        })
    }

    /// Checks a publish and, when it may go on, adds it to the batch; a refusal is answered
    /// after the batch before it.
    async fn publish(
        &mut self,
        seq: u64,
        data: &RawValue,
        device: Option<&str>,
        reference: Option<&RawValue>,
        span: Span,
    ) -> Outcome {
        let now = Instant::now();
        let publish_burst = self.hub.settings.limits.publish_burst;
        let admission = match self.publisher.as_mut() {
            None => Admission::Refuse(ErrorCode::Forbidden, "only agents publish".to_owned()),
            Some(_) if device.is_some_and(|d| d != self.identity.sub) => Admission::Refuse(
                ErrorCode::Forbidden,
                format!(
                    "an agent publishes as itself only (`{}`)",
                    self.identity.sub
                ),
            ),
            Some(publisher) => publisher.admit(seq, now, publish_burst),
        };
        match admission {
            Admission::Accept => {
                self.batch_bytes += data.get().len();
                self.batch.push(Admitted {
                    seq,
                    data: data.to_owned(),
                    span,
                    received_at: now,
                    reference: reference.map(ToOwned::to_owned),
                });
                Ok(())
            }
            Admission::Close => {
                self.hub.metrics.publications.inc("refused");
                self.flush().await?;
                Err(CloseCode::RateLimited)
            }
            Admission::Refuse(code, message) => {
                self.hub.metrics.publications.inc("refused");
                span.record("outcome", "refused");
                self.flush().await?;
                self.error(code, &message, Some(seq), reference)
            }
        }
    }

    /// Whether publishes wait in the batch.
    pub fn has_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Whether the batch should go to the broker now, whatever else has arrived.
    pub fn batch_full(&self) -> bool {
        self.batch.len() >= MAX_BATCH_READINGS || self.batch_bytes >= MAX_BATCH_BYTES
    }

    /// Stores the batch with one broker call and answers each of its readings, in order: an
    /// `ack` for each one stored (or known already), an `unavailable` error for each one when
    /// the broker failed (none of them is acknowledged; the agent resends from the first).
    pub async fn flush(&mut self) -> Outcome {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let outcome = self.store_and_answer(&batch).await;
        // Kept for the next batch with its capacity: an agent that is behind sends many.
        batch.clear();
        self.batch = batch;
        outcome
    }

    async fn store_and_answer(&mut self, batch: &[Admitted]) -> Outcome {
        let Some(publisher) = self.publisher.as_mut() else {
            return Ok(());
        };
        let readings: Vec<Reading<'_>> = batch
            .iter()
            .map(|a| Reading {
                seq: a.seq,
                data: &a.data,
                span: &a.span,
            })
            .collect();
        let publication = Publication {
            device: &self.identity.sub,
            channels: &publisher.channels,
            readings: &readings,
            received_at: batch[0].received_at,
        };
        let stored = self.hub.broker.publish(&publication).await;
        drop(readings);
        let metrics = &self.hub.metrics;
        metrics
            .publish_batch_readings
            .observe_value(batch.len() as u64);
        match stored {
            Ok(outcomes) => {
                for (admitted, outcome) in batch.iter().zip(outcomes) {
                    let duplicate = outcome == PublishOutcome::Duplicate;
                    let result = if duplicate { "duplicate" } else { "accepted" };
                    admitted.span.record("outcome", result);
                    metrics.publications.inc(result);
                    self.send(&ServerFrame::Ack {
                        seq: admitted.seq,
                        duplicate,
                    })?;
                }
                Ok(())
            }
            Err(e) => {
                publisher.not_stored(batch[0].seq);
                let message = e.to_string();
                for admitted in batch {
                    metrics.publications.inc("refused");
                    admitted.span.record("outcome", "unavailable");
                    self.error(
                        ErrorCode::Unavailable,
                        &message,
                        Some(admitted.seq),
                        admitted.reference.as_deref(),
                    )?;
                }
                Ok(())
            }
        }
    }

    fn send(&self, frame: &ServerFrame<'_>) -> Outcome {
        self.outbox
            .push(Outbound::control(frame::server(frame)))
            .map_err(|_| CloseCode::SlowConsumer)
    }

    fn error(
        &self,
        code: ErrorCode,
        message: &str,
        seq: Option<u64>,
        reference: Option<&RawValue>,
    ) -> Outcome {
        self.send(&ServerFrame::Error {
            code,
            message: message.into(),
            seq,
            reference,
        })
    }

    /// Where `channel` is in `subscriptions`.
    fn subscription(&self, channel: &str) -> Option<usize> {
        self.subscriptions.iter().position(|(c, _)| **c == *channel)
    }

    /// Leaves every channel.
    pub fn finish(&mut self) {
        for (channel, conflation) in std::mem::take(&mut self.subscriptions) {
            self.hub.broker.unsubscribe(&channel, self.outbox.id());
            if let Some(conflation) = conflation {
                conflation.stop();
            }
            self.hub.metrics.subscriptions.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A publisher whose device may publish `burst` at once and one more every 100 ms.
    fn publisher(burst: u32) -> Publisher {
        Publisher {
            channels: Vec::new(),
            share: Arc::new(Share {
                publish: Mutex::new(TokenBucket::new(10.0, burst)),
            }),
            refused_in_row: 0,
            awaiting_resend: None,
        }
    }

    fn refused(code: ErrorCode) -> impl Fn(&Admission) -> bool {
        move |a| matches!(a, Admission::Refuse(c, _) if *c == code)
    }

    #[test]
    fn over_the_rate_a_seq_is_refused_and_so_is_everything_after_it_until_it_comes_back() {
        let now = Instant::now();
        let mut p = publisher(2);
        assert_eq!(p.admit(1, now, 100), Admission::Accept);
        assert_eq!(p.admit(2, now, 100), Admission::Accept);
        assert!(refused(ErrorCode::RateLimited)(&p.admit(3, now, 100)));
        let later = now + Duration::from_millis(250);
        match p.admit(4, later, 100) {
            Admission::Refuse(ErrorCode::RateLimited, message) => {
                assert!(message.contains("publish 3 was refused"), "{message}");
            }
            other => panic!("4 overtook the refused 3: {other:?}"),
        }
        assert_eq!(p.admit(3, later, 100), Admission::Accept, "the resend");
        assert_eq!(p.admit(4, later, 100), Admission::Accept);
    }

    #[test]
    fn an_unstored_seq_holds_back_later_ones_with_its_own_code() {
        let now = Instant::now();
        let mut p = publisher(10);
        p.not_stored(5);
        assert!(refused(ErrorCode::Unavailable)(&p.admit(6, now, 100)));
        assert_eq!(p.admit(5, now, 100), Admission::Accept);
    }

    #[test]
    fn refusals_past_the_burst_in_a_row_close_the_connection_and_an_accept_resets_them() {
        let now = Instant::now();
        let mut p = publisher(1);
        assert_eq!(p.admit(1, now, 3), Admission::Accept);
        for seq in 2..=4 {
            assert!(
                matches!(p.admit(seq, now, 3), Admission::Refuse(..)),
                "{seq}"
            );
        }
        assert_eq!(p.admit(5, now, 3), Admission::Close);

        let mut p = publisher(1);
        assert_eq!(p.admit(1, now, 3), Admission::Accept);
        assert!(matches!(p.admit(2, now, 3), Admission::Refuse(..)));
        let refilled = now + Duration::from_millis(150);
        assert_eq!(p.admit(2, refilled, 3), Admission::Accept);
        assert_eq!(p.refused_in_row, 0);
    }
}
