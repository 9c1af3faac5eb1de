//! This hub's view of the channels its clients subscribe to: position delivered so far and the
//! subscribers. Both the relay task and subscribing connections update it, always under one
//! mutex and always through the same rule: a message is delivered only if its offset is exactly
//! the next one, so any number of deliverers (live pub/sub, gap fills, catch-ups) compose into
//! one gapless, duplicate-free stream per channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use hub_protocol::{Position, ServerFrame};

use super::partition;
use super::store::Entry;
use crate::broker::{BrokerError, SubscribeOutcome, pack};
use crate::fanout::Subscribers;
use crate::frame;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

#[derive(Default)]
struct LocalChannel {
    /// Empty until the channel is live.
    epoch: String,
    /// Last offset delivered here.
    offset: u64,
    live: bool,
    /// Subscribe calls in flight: keep the channel even with no subscribers yet.
    joining: usize,
    subscribers: Subscribers,
}

impl LocalChannel {
    fn unused(&self) -> bool {
        self.joining == 0 && self.subscribers.is_empty()
    }

    /// Tells every subscriber that the stream restarts at `offset` of `epoch` with a hole.
    fn restart(&mut self, epoch: &str, offset: u64, name: &str, metrics: &Metrics) {
        let notice = subscribed(name, epoch, offset, false);
        self.subscribers.deliver(&notice, Instant::now());
        self.epoch = epoch.to_owned();
        self.offset = offset;
        metrics.history_misses.inc();
    }
}

/// The `subscribed` frame of the channel with internal name `name`: the public channel, and the
/// partition when it is one.
fn subscribed(name: &str, epoch: &str, offset: u64, recovered: bool) -> Bytes {
    let (channel, partition) = partition::parse(name);
    frame::server(&ServerFrame::Subscribed {
        channel: channel.into(),
        part: partition.map(|(part, _)| part),
        parts: partition.map(|(_, parts)| parts),
        epoch: epoch.into(),
        offset,
        recovered,
    })
}

/// What happened to an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Delivered,
    /// At or below the delivered position: already seen.
    Stale,
    /// Offsets after `after` are missing before this one.
    Gap {
        after: u64,
    },
    /// The channel has another epoch now.
    EpochChanged,
    /// Not a live channel here.
    Unknown,
}

/// The outcome of one attempt to attach a subscriber.
pub enum Attach {
    Done(SubscribeOutcome),
    /// The replay needs history entries in `(after, upto]`.
    NeedHistory {
        after: u64,
        upto: u64,
    },
    /// This hub has delivered less than the client has seen: catch up to `upto` first.
    Behind {
        upto: u64,
    },
}

pub struct Local {
    channels: Mutex<HashMap<String, LocalChannel>>,
    metrics: Arc<Metrics>,
}

impl Local {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Local {
            channels: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, LocalChannel>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a subscribe in flight, so the channel is kept while it joins; refused when it would
    /// be one channel more than `max`.
    pub fn register(&self, channel: &str, max: usize) -> Result<(), BrokerError> {
        let mut map = self.lock();
        if !map.contains_key(channel) && map.len() >= max {
            self.metrics.channel_table_full.inc();
            return Err(BrokerError::ChannelTableFull { max });
        }
        map.entry(channel.to_owned()).or_default().joining += 1;
        self.metrics.channels.set(map.len() as i64);
        Ok(())
    }

    /// Ends a subscribe that failed; true if the channel is now unused and was dropped.
    pub fn abandon(&self, channel: &str) -> bool {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(channel) else {
            return false;
        };
        ch.joining = ch.joining.saturating_sub(1);
        let unused = ch.unused();
        if unused {
            map.remove(channel);
            self.metrics.channels.set(map.len() as i64);
        }
        unused
    }

    /// Removes a subscriber; true if the channel is now unused and was dropped.
    pub fn remove_subscriber(&self, channel: &str, id: u64) -> bool {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(channel) else {
            return false;
        };
        ch.subscribers.remove(id);
        let unused = ch.unused();
        if unused {
            map.remove(channel);
            self.metrics.channels.set(map.len() as i64);
        }
        unused
    }

    pub fn contains(&self, channel: &str) -> bool {
        self.lock().contains_key(channel)
    }

    pub fn is_live(&self, channel: &str) -> bool {
        self.lock().get(channel).is_some_and(|c| c.live)
    }

    /// Makes a joined channel live at the position read after subscribing to it.
    pub fn set_live(&self, channel: &str, epoch: &str, offset: u64) {
        if let Some(ch) = self.lock().get_mut(channel)
            && !ch.live
        {
            ch.epoch = epoch.to_owned();
            ch.offset = offset;
            ch.live = true;
        }
    }

    /// Every channel here (live or joining).
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// `(channel, epoch, offset)` of the live channels.
    pub fn positions(&self) -> Vec<(String, String, u64)> {
        self.lock()
            .iter()
            .filter(|(_, c)| c.live)
            .map(|(n, c)| (n.clone(), c.epoch.clone(), c.offset))
            .collect()
    }

    pub fn offer(
        &self,
        channel: &str,
        epoch: &str,
        offset: u64,
        message: &[u8],
        published_at: Instant,
    ) -> Offer {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(channel).filter(|c| c.live) else {
            return Offer::Unknown;
        };
        if ch.epoch != epoch {
            return Offer::EpochChanged;
        }
        if offset <= ch.offset {
            return Offer::Stale;
        }
        if offset > ch.offset + 1 {
            return Offer::Gap { after: ch.offset };
        }
        let encoded = frame::text(message.len(), |buf| buf.extend_from_slice(message));
        let delivery = ch.subscribers.deliver(&encoded, published_at);
        ch.offset = offset;
        self.metrics.deliveries.add(delivery.delivered as u64);
        self.metrics.delivery_drops.add(delivery.slow as u64);
        Offer::Delivered
    }

    /// The channel now has `epoch`: subscribers are told, and delivery goes on after `offset`
    /// (0 when the new epoch's history can be delivered from its start).
    pub fn change_epoch(&self, channel: &str, epoch: &str, offset: u64) {
        if let Some(ch) = self
            .lock()
            .get_mut(channel)
            .filter(|c| c.live && c.epoch != epoch)
        {
            ch.restart(epoch, offset, channel, &self.metrics);
        }
    }

    /// History no longer holds what was missed: subscribers are told and delivery goes on after
    /// `offset`.
    pub fn skip_to(&self, channel: &str, epoch: &str, offset: u64) {
        if let Some(ch) = self
            .lock()
            .get_mut(channel)
            .filter(|c| c.live && c.epoch == epoch && c.offset < offset)
        {
            ch.restart(epoch, offset, channel, &self.metrics);
        }
    }

    /// Delivered position of a live channel.
    pub fn position(&self, channel: &str) -> Option<(String, u64)> {
        self.lock()
            .get(channel)
            .filter(|c| c.live)
            .map(|c| (c.epoch.clone(), c.offset))
    }

    /// Tries to attach `outbox` to the live channel, replaying from `history` what `since` missed.
    /// `give_up` attaches without recovery when catching up did not converge. `lead` (a
    /// snapshot as of `since`) is queued between `subscribed` and the replay.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        channel: &str,
        since: Option<&Position>,
        outbox: &Outbox,
        history: Option<&[Entry]>,
        give_up: bool,
        budget: usize,
        lead: &[Bytes],
    ) -> Result<Attach, BrokerError> {
        let mut map = self.lock();
        let Some(ch) = map.get_mut(channel).filter(|c| c.live) else {
            return Err(BrokerError::Unavailable("channel is not live".into()));
        };
        let (recovered, replay): (bool, Vec<Bytes>) = match since {
            Some(pos) if !give_up && pos.epoch == ch.epoch => {
                if pos.offset == ch.offset {
                    (true, Vec::new())
                } else if pos.offset > ch.offset {
                    return Ok(Attach::Behind { upto: pos.offset });
                } else {
                    let wanted = ch.offset - pos.offset;
                    match history {
                        None => {
                            return Ok(Attach::NeedHistory {
                                after: pos.offset,
                                upto: ch.offset,
                            });
                        }
                        Some(entries) => {
                            let usable: Vec<&Entry> = entries
                                .iter()
                                .filter(|e| e.offset > pos.offset && e.offset <= ch.offset)
                                .collect();
                            let last = entries.last().map_or(pos.offset, |e| e.offset);
                            if usable.len() as u64 == wanted {
                                let frames = usable
                                    .iter()
                                    .map(|e| {
                                        frame::text(e.message.len(), |b| {
                                            b.extend_from_slice(&e.message)
                                        })
                                    })
                                    .collect();
                                (true, frames)
                            } else if last < ch.offset
                                && usable.first().is_some_and(|e| e.offset == pos.offset + 1)
                            {
                                // Delivery moved on while history was read: read the rest.
                                return Ok(Attach::NeedHistory {
                                    after: pos.offset,
                                    upto: ch.offset,
                                });
                            } else {
                                (false, Vec::new())
                            }
                        }
                    }
                }
            }
            _ => (false, Vec::new()),
        };
        let (recovered, replay) = crate::broker::within_budget(recovered, replay, budget);
        let subscribed = subscribed(channel, &ch.epoch, ch.offset, recovered);
        let replay_refs: Vec<&Bytes> = lead.iter().chain(&replay).collect();
        for item in pack(subscribed, &replay_refs) {
            outbox.push(item).map_err(|_| BrokerError::SlowConsumer)?;
        }
        ch.subscribers.insert(outbox.clone());
        ch.joining = ch.joining.saturating_sub(1);
        Ok(Attach::Done(SubscribeOutcome {
            epoch: ch.epoch.clone(),
            offset: ch.offset,
            recovered,
            replayed: replay.len(),
            replayed_bytes: replay.iter().map(Bytes::len).sum(),
            snapshot: None,
        }))
    }
}
