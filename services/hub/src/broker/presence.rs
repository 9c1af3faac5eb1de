//! Which devices have a connection to this hub, and the presence messages their changes make.
//!
//! Both brokers count connections per device here. The embedded broker publishes a change as
//! soon as a device's count leaves or reaches zero; the Redis broker writes it to the pool's
//! shared state, which publishes it once no hub holds the device any more (see
//! `redis::presence`).

use std::collections::HashMap;

use hub_protocol::presence::{CONNECTED, Presence};
use serde_json::value::RawValue;

/// What happened to one connection of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// An agent's session started (after its `hello`).
    Connected,
    /// An agent's connection ended; `reason` is its close label.
    Disconnected { reason: &'static str },
}

/// A device going online or offline on this hub: its first connection here started, or its
/// last one ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub online: bool,
    pub reason: &'static str,
    /// ms since the Unix epoch.
    pub at: u64,
}

/// Open connections per device on this hub; a device with none is not held.
#[derive(Debug, Default)]
pub struct LocalPresence {
    connections: HashMap<Box<str>, u32>,
}

impl LocalPresence {
    /// Counts the change; returns the transition when the device's count left or reached zero.
    /// A disconnect of a device with no connection counted (cannot happen) changes nothing.
    pub fn change(&mut self, device: &str, change: PresenceChange, at: u64) -> Option<Transition> {
        match change {
            PresenceChange::Connected => {
                let count = match self.connections.get_mut(device) {
                    Some(count) => count,
                    None => self.connections.entry(device.into()).or_insert(0),
                };
                *count = count.saturating_add(1);
                (*count == 1).then_some(Transition {
                    online: true,
                    reason: CONNECTED,
                    at,
                })
            }
            PresenceChange::Disconnected { reason } => {
                let count = self.connections.get_mut(device)?;
                *count = count.saturating_sub(1);
                if *count > 0 {
                    return None;
                }
                self.connections.remove(device);
                Some(Transition {
                    online: false,
                    reason,
                    at,
                })
            }
        }
    }

    /// The devices held now.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.connections.keys().map(|d| &**d)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.connections.len()
    }
}

/// The `data` of the presence message for `device`'s transition, seen on hub `hub`.
pub fn presence_data(device: &str, hub: &str, t: &Transition) -> Box<RawValue> {
    let presence = Presence {
        device: device.into(),
        online: t.online,
        hub: hub.into(),
        at: t.at,
        reason: t.reason.into(),
    };
    serde_json::value::to_raw_value(&presence).expect("strings, a bool and a number serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use PresenceChange::{Connected, Disconnected};

    const GONE: PresenceChange = Disconnected {
        reason: "connection_lost",
    };

    #[test]
    fn a_device_is_online_from_its_first_connection_to_the_end_of_its_last() {
        let mut p = LocalPresence::default();
        let online = p.change("pi-1", Connected, 1).unwrap();
        assert!(online.online && online.reason == CONNECTED);
        assert_eq!(p.change("pi-1", Connected, 2), None, "a second connection");
        assert_eq!(p.change("pi-1", GONE, 3), None, "one of two ended");
        let offline = p.change("pi-1", GONE, 4).unwrap();
        assert_eq!(
            (offline.online, offline.reason, offline.at),
            (false, "connection_lost", 4)
        );
        assert_eq!(p.len(), 0, "an offline device is not kept");
    }

    #[test]
    fn a_disconnect_without_a_connection_changes_nothing() {
        let mut p = LocalPresence::default();
        assert_eq!(p.change("pi-1", GONE, 1), None);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn the_data_names_the_device_hub_and_reason() {
        let t = Transition {
            online: false,
            reason: "ping_timeout",
            at: 7,
        };
        assert_eq!(
            presence_data("pi-1", "hub-a", &t).get(),
            r#"{"device":"pi-1","online":false,"hub":"hub-a","at":7,"reason":"ping_timeout"}"#
        );
    }
}
