//! Presence: the channel that says which devices are connected, one message per change.
//!
//! A message on [`CHANNEL`] is an ordinary `message` frame (it has an epoch and an offset, and
//! `since` resumes it) whose `from` is the device and whose `data` is a [`Presence`]. A device is
//! online from its first connection to any hub until its last one ends: two connections of one
//! device (a flapping link, the old socket not yet timed out) make one online period.

use serde::{Deserialize, Serialize};

/// The channel presence changes are published on. Viewers need it in their token's `channels`.
pub const CHANNEL: &str = "presence";

/// `reason` of an online message.
pub const CONNECTED: &str = "connected";

/// `reason` of an offline message sent for a hub that stopped renewing its lease (killed, cut
/// off from the broker): its devices are offline, whatever their sockets still do.
pub const HUB_GONE: &str = "hub_gone";

/// The `data` of one presence message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub device: String,
    pub online: bool,
    /// The hub (node id) whose connection started or ended the online period.
    pub hub: String,
    /// When it changed, ms since the Unix epoch.
    pub at: u64,
    /// [`CONNECTED`] when online; when offline, why the last connection ended: the close
    /// reason of the code the hub closed with (`ping_timeout`, `token_expired`, ...),
    /// `peer_closed`, `connection_lost`, or [`HUB_GONE`].
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presence_message_has_the_documented_fields() {
        let p = Presence {
            device: "pi-01".into(),
            online: false,
            hub: "hub-a".into(),
            at: 1_700_000_000_000,
            reason: HUB_GONE.into(),
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"device":"pi-01","online":false,"hub":"hub-a","at":1700000000000,"reason":"hub_gone"}"#
        );
        assert_eq!(serde_json::from_str::<Presence>(&json).unwrap(), p);
    }
}
