//! This hub's part of the pool's presence: a task that writes the hub's presence changes to
//! Redis, renews its lease and takes dead hubs' devices offline.
//!
//! Connections only count their changes here ([`Presence::change`] never waits); the writer
//! takes the changes that are pending, at once and then at least every `presence.heartbeat`,
//! and runs the store's presence script with them. The script publishes the messages, so all
//! hubs deliver them like any other channel's, with offsets.
//!
//! Each hub process has its own instance name (`<node id>/<random>`): a hub restarted under the
//! same node id never inherits the devices its predecessor held; those go offline when the old
//! lease runs out unless they have reconnected by then, in which case they stay online.
//!
//! What may fail and what then happens:
//! - A write fails (Redis away, a timeout): its changes stay pending and are written again;
//!   writes say whether a device is held, not by how much its count moves, so a write that did
//!   reach Redis and is written again changes nothing.
//! - The lease ran out while Redis was away, and another hub took this one for dead: its
//!   devices were announced offline. The next write finds the lease gone and writes every
//!   device still connected here again, which announces them online.
//! - The hub is killed: its lease runs out after `presence.hub_ttl`, and the next hub to write
//!   (each does so every heartbeat) announces its devices offline with `hub_gone`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use hub_protocol::presence::CONNECTED;
use tokio::sync::{Notify, watch};
use tracing::warn;

use super::store::{PresenceUpdate, PresenceWrite, Store};
use crate::broker::now_ms;
use crate::broker::presence::{LocalPresence, PresenceChange, Transition};
use crate::config::PresenceSettings;
use crate::metrics::Metrics;

/// Changes per script call: bounds how long one call holds Redis.
const MAX_CHANGES: usize = 1000;
/// Devices of dead hubs taken off per script call, for the same reason.
const SWEEP_BUDGET: usize = 500;

pub struct Presence {
    shared: Arc<Shared>,
    left: watch::Receiver<bool>,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    local: LocalPresence,
    /// The latest transition of each device not yet written.
    pending: HashMap<Box<str>, Transition>,
    leaving: bool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Presence {
    /// Starts the writer for the hub named `node_id` (needs a Tokio runtime).
    pub fn start(
        store: Arc<Store>,
        node_id: &str,
        settings: &PresenceSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            metrics,
        });
        let (left_tx, left) = watch::channel(false);
        let writer = Writer {
            shared: Arc::downgrade(&shared),
            store,
            instance: format!("{node_id}/{:08x}", rand::random::<u32>()),
            heartbeat: settings.heartbeat,
            lease: settings.hub_ttl,
            left: left_tx,
        };
        tokio::spawn(writer.run());
        Presence { shared, left }
    }

    /// Counts the change; a device that went online or offline here is written at once.
    pub fn change(&self, device: &str, change: PresenceChange) {
        let mut state = lock(&self.shared.state);
        let Some(transition) = state.local.change(device, change, now_ms()) else {
            return;
        };
        match state.pending.get_mut(device) {
            Some(pending) => *pending = transition,
            None => {
                state.pending.insert(device.into(), transition);
            }
        }
        self.shared
            .metrics
            .presence_pending
            .set(state.pending.len() as i64);
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Writes what is pending and gives up the lease, so this hub's devices are offline now
    /// rather than when the lease runs out; waits at most `timeout`.
    pub async fn leave(&self, timeout: Duration) {
        lock(&self.shared.state).leaving = true;
        self.shared.wake.notify_one();
        let mut left = self.left.clone();
        if tokio::time::timeout(timeout, left.wait_for(|l| *l))
            .await
            .is_err()
        {
            warn!(
                "presence: the last changes were not written before the timeout; this hub's devices go offline when its lease runs out"
            );
        }
    }
}

struct Writer {
    shared: Weak<Shared>,
    store: Arc<Store>,
    instance: String,
    heartbeat: Duration,
    lease: Duration,
    left: watch::Sender<bool>,
}

impl Writer {
    async fn run(self) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = false;
        loop {
            // Only a strong reference while working: the writer ends with its broker.
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let more = match self.write(&shared, &mut held).await {
                Ok(more) => more,
                Err(()) => {
                    drop(shared);
                    tokio::time::sleep(self.heartbeat.min(Duration::from_secs(1))).await;
                    continue;
                }
            };
            if *self.left.borrow() {
                return;
            }
            if more {
                continue;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = shared.wake.notified() => {}
            }
        }
    }

    /// One script call with up to [`MAX_CHANGES`] pending changes; `Ok(true)` when there is
    /// more to do at once (changes left, dead hubs still being swept).
    async fn write(&self, shared: &Shared, held: &mut bool) -> Result<bool, ()> {
        let (batch, leaving) = {
            let mut state = lock(&shared.state);
            let keys: Vec<Box<str>> = state.pending.keys().take(MAX_CHANGES).cloned().collect();
            let batch: Vec<(Box<str>, Transition)> = keys
                .into_iter()
                .filter_map(|k| state.pending.remove_entry(&k))
                .collect();
            // Leaving only with the last batch: the lease must outlive the changes before it.
            (batch, state.leaving && state.pending.is_empty())
        };
        let changes: Vec<PresenceUpdate<'_>> = batch
            .iter()
            .map(|(device, t)| PresenceUpdate {
                device,
                online: t.online,
                reason: t.reason,
                at: t.at,
            })
            .collect();
        let write = PresenceWrite {
            instance: &self.instance,
            lease: self.lease,
            leaving,
            sweep_budget: SWEEP_BUDGET,
            changes: &changes,
        };
        let result = self.store.presence(&write).await;
        drop(changes);
        let mut state = lock(&shared.state);
        let reply = match result {
            Ok(reply) => reply,
            Err(e) => {
                // Still pending, unless a newer change of the same device came meanwhile.
                for (device, t) in batch {
                    state.pending.entry(device).or_insert(t);
                }
                shared
                    .metrics
                    .presence_pending
                    .set(state.pending.len() as i64);
                warn!(error = %e, pending = state.pending.len(), "presence: write failed; retrying");
                return Err(());
            }
        };
        if *held && !reply.held && !leaving {
            // Taken for dead: every device still here was announced offline.
            let now = now_ms();
            let devices: Vec<Box<str>> = state.local.devices().map(Box::from).collect();
            for device in devices {
                state.pending.entry(device).or_insert(Transition {
                    online: true,
                    reason: CONNECTED,
                    at: now,
                });
            }
            warn!(
                instance = %self.instance,
                "presence: this hub was taken for dead (its lease ran out); announcing its devices again"
            );
        }
        *held = true;
        let metrics = &shared.metrics;
        metrics.presence_changes.get("online").add(reply.online);
        metrics.presence_changes.get("offline").add(reply.offline);
        metrics.presence_pending.set(state.pending.len() as i64);
        if leaving {
            let _ = self.left.send(true);
            return Ok(false);
        }
        Ok(!state.pending.is_empty() || reply.sweeping > 0)
    }
}
