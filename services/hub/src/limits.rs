//! Admission control: token buckets for publish floods and reconnect storms, the cap on open
//! connections, and each identity's share of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hub_protocol::Role;
pub use hub_protocol::rate::TokenBucket;

/// Why a new connection was turned away by admission control. The snake_case names are the
/// `error` of the HTTP body and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum Refusal {
    /// The hub is draining for shutdown (the server checks this before the gate).
    Draining,
    /// The hub holds `limits.max_connections` already.
    MaxConnections,
    /// More than `limits.connect_rate` verified connections per second.
    ConnectRate,
    /// The token's identity holds its share of connections already
    /// (`limits.max_connections_per_agent` / `max_connections_per_viewer`).
    IdentityConnections,
    /// The pool's revocations have not been read yet (Redis or the file does not answer): no
    /// token can be told from a revoked one, so none is taken.
    RevocationsUnknown,
}

impl Refusal {
    /// Every [`reason`](Refusal::reason), in declaration order.
    pub const REASONS: &'static [&'static str] = <Refusal as strum::VariantNames>::VARIANTS;

    pub fn reason(self) -> &'static str {
        self.into()
    }
}

/// How much of the hub one identity (a token's `sub` in a role) may use.
#[derive(Debug, Clone, Copy)]
pub struct IdentityLimits {
    pub agent_connections: usize,
    pub viewer_connections: usize,
    /// A device's publishes per second, across all its connections to this hub.
    pub publish_rate: f64,
    pub publish_burst: u32,
}

/// What the connections of one identity on this hub share.
pub struct Share {
    /// The device's publish budget: one device over many connections gets the rate once.
    pub publish: Mutex<TokenBucket>,
}

struct Held {
    connections: usize,
    share: Arc<Share>,
}

type IdentityKey = (Role, Box<str>);

/// Admits new WebSocket connections: within `max` open, within the connect rate (charged only for
/// verified tokens, so token-less floods cannot use it up), and within each identity's share.
pub struct ConnectionGate {
    max: usize,
    open: AtomicUsize,
    rate: Mutex<TokenBucket>,
    per_identity: IdentityLimits,
    identities: Mutex<HashMap<IdentityKey, Held>>,
}

/// One reserved connection slot, before the token is known.
pub struct Slot(Arc<ConnectionGate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An admitted connection: its slot and its identity's share, held until dropped.
pub struct ConnectionPermit {
    slot: Slot,
    key: IdentityKey,
    share: Arc<Share>,
}

impl ConnectionPermit {
    pub fn share(&self) -> &Arc<Share> {
        &self.share
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut identities = lock(&self.slot.0.identities);
        if let Some(held) = identities.get_mut(&self.key) {
            held.connections = held.connections.saturating_sub(1);
            if held.connections == 0 {
                identities.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConnectionGate {
    pub fn new(max: usize, rate: f64, burst: u32, per_identity: IdentityLimits) -> Arc<Self> {
        Arc::new(ConnectionGate {
            max,
            open: AtomicUsize::new(0),
            rate: Mutex::new(TokenBucket::new(rate, burst)),
            per_identity,
            identities: Mutex::new(HashMap::new()),
        })
    }

    /// Reserves a slot under the connection cap; cheap, so it comes before the token check.
    pub fn reserve(self: &Arc<Self>) -> Result<Slot, Refusal> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map(|_| Slot(self.clone()))
            .map_err(|_| Refusal::MaxConnections)
    }

    /// Admits a verified identity: within its share of connections, then within the connect
    /// rate. A refusal leaves nothing behind.
    pub fn admit(&self, slot: Slot, role: Role, sub: &str) -> Result<ConnectionPermit, Refusal> {
        let max = match role {
            Role::Agent => self.per_identity.agent_connections,
            Role::Viewer => self.per_identity.viewer_connections,
            // Never upgraded (routes refuse it); counted like a viewer if it were.
            Role::Admin => self.per_identity.viewer_connections,
        };
        let key: IdentityKey = (role, sub.into());
        let mut identities = lock(&self.identities);
        if identities.get(&key).is_some_and(|h| h.connections >= max) {
            return Err(Refusal::IdentityConnections);
        }
        if !lock(&self.rate).try_take(Instant::now()) {
            return Err(Refusal::ConnectRate);
        }
        let limits = &self.per_identity;
        let held = identities.entry(key.clone()).or_insert_with(|| Held {
            connections: 0,
            share: Arc::new(Share {
                publish: Mutex::new(TokenBucket::new(limits.publish_rate, limits.publish_burst)),
            }),
        });
        held.connections += 1;
        let share = held.share.clone();
        drop(identities);
        Ok(ConnectionPermit { slot, key, share })
    }

    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENEROUS: IdentityLimits = IdentityLimits {
        agent_connections: 100,
        viewer_connections: 100,
        publish_rate: 10.0,
        publish_burst: 10,
    };

    fn admit(
        gate: &Arc<ConnectionGate>,
        role: Role,
        sub: &str,
    ) -> Result<ConnectionPermit, Refusal> {
        gate.admit(gate.reserve()?, role, sub)
    }

    #[test]
    fn gate_caps_open_connections_and_frees_on_drop() {
        let gate = ConnectionGate::new(2, 1000.0, 1000, GENEROUS);
        let a = admit(&gate, Role::Viewer, "a").unwrap();
        let _b = admit(&gate, Role::Viewer, "b").unwrap();
        assert_eq!(
            gate.reserve().err().map(Refusal::reason),
            Some("max_connections")
        );
        drop(a);
        assert!(gate.reserve().is_ok());
    }

    #[test]
    fn gate_limits_connect_rate() {
        let gate = ConnectionGate::new(100, 0.001, 2, GENEROUS);
        let _a = admit(&gate, Role::Viewer, "a").unwrap();
        let _b = admit(&gate, Role::Viewer, "b").unwrap();
        assert_eq!(
            admit(&gate, Role::Viewer, "c").err(),
            Some(Refusal::ConnectRate)
        );
        assert_eq!(gate.open(), 2, "a refused connection holds no slot");
    }

    #[test]
    fn an_identity_gets_its_share_of_connections_and_one_publish_budget() {
        let limits = IdentityLimits {
            agent_connections: 2,
            viewer_connections: 3,
            ..GENEROUS
        };
        let gate = ConnectionGate::new(100, 1000.0, 1000, limits);
        let first = admit(&gate, Role::Agent, "pi-1").unwrap();
        let second = admit(&gate, Role::Agent, "pi-1").unwrap();
        assert!(
            Arc::ptr_eq(first.share(), second.share()),
            "one budget per device"
        );
        assert_eq!(
            admit(&gate, Role::Agent, "pi-1").err(),
            Some(Refusal::IdentityConnections)
        );
        assert!(
            admit(&gate, Role::Agent, "pi-2").is_ok(),
            "others are not affected"
        );
        let viewers: Vec<_> = (0..3)
            .map(|_| admit(&gate, Role::Viewer, "pi-1").unwrap())
            .collect();
        assert_eq!(
            admit(&gate, Role::Viewer, "pi-1").err(),
            Some(Refusal::IdentityConnections)
        );
        drop(viewers);
        drop(first);
        assert!(
            admit(&gate, Role::Agent, "pi-1").is_ok(),
            "a closed connection frees its share"
        );
        drop(second);
        assert!(
            lock(&gate.identities).is_empty(),
            "nothing kept for identities gone"
        );
    }
}
