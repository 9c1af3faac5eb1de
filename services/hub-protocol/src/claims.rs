//! JWT claims the hub reads. Signing and verification live in the hub; the claims are part of the
//! protocol because every client has to be issued a token that carries them.

use serde::{Deserialize, Serialize};

/// The role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum Role {
    /// A device: publishes its own readings.
    Agent,
    /// A dashboard: subscribes to channels.
    Viewer,
    /// An operator's tool: the hub's `/admin` endpoints (revocations), never a WebSocket.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "viewer" => Some(Role::Viewer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Every role's name, as [`Role::as_str`] gives it.
    pub const NAMES: &'static [&'static str] = <Role as strum::VariantNames>::VARIANTS;

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Claims of a hub token. `role` stays a string so that a token with an unknown role decodes and
/// is refused with 403 rather than looking malformed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Identity: the device id for agents, a user or dashboard name for viewers.
    pub sub: String,
    pub role: String,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The token's own id: `hub revoke --jti` voids this one token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Agents: the groups whose `groups.<g>` channels also receive the device's readings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// Viewers: the channel patterns the token may subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
}
