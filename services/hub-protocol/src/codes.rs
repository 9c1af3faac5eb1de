//! Close codes and error codes. `docs/protocol.md` lists what each means for a client.

use serde::{Deserialize, Serialize};

/// WebSocket close codes the hub sends. 1000-1015 are RFC 6455 / IANA codes; 4000-4999 are ours.
///
/// Each code's reason (its snake_case name: the close frame's text and a metric label) and its
/// [`Retry`] advice are derived here and nowhere else: docs/protocol.md, the agent and
/// `fleet-client.js` follow [`CloseCode::retry`], and tests hold each of them to it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    strum::FromRepr,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u16)]
pub enum CloseCode {
    Normal = 1000,
    ProtocolError = 1002,
    UnsupportedData = 1003,
    InvalidPayload = 1007,
    PolicyViolation = 1008,
    MessageTooBig = 1009,
    InternalError = 1011,
    /// The hub is shutting down or restarting: reconnect (with jitter) and resume with `since`.
    ServiceRestart = 1012,
    /// The hub cannot serve this connection right now (its broker cannot say what the
    /// connection needs to start): reconnect with backoff.
    TryAgainLater = 1013,
    TokenExpired = 4001,
    PingTimeout = 4002,
    /// The token was revoked (`hub revoke`): the same token is refused from now on.
    Revoked = 4003,
    /// The key that signed the token left the hub's key set (`auth.close_on_key_removal`).
    KeyRemoved = 4004,
    SlowConsumer = 4008,
    RateLimited = 4029,
}

/// What a client does after the hub closed its connection with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Retry {
    /// Reconnect at once, after 0-1 s of jitter, and resume: the pool is healthy, this hub
    /// just went away. The backoff does not grow.
    Soon,
    /// Reconnect after the next exponential backoff delay (full jitter), and resume.
    Backoff,
    /// The token is spent: get a fresh one, then reconnect at once and resume. A client with no
    /// way to get one stops.
    NewToken,
    /// Reconnecting as it is would fail the same way: the client (or its configuration) must
    /// change first. A person is told; an unattended agent retries only after its long
    /// `auth_backoff`.
    Never,
}

impl CloseCode {
    /// Every code, in numeric order.
    pub const ALL: &'static [CloseCode] = <CloseCode as strum::VariantArray>::VARIANTS;
    /// Every code's [`reason`](CloseCode::reason), in the order of [`ALL`](CloseCode::ALL).
    pub const REASONS: &'static [&'static str] = <CloseCode as strum::VariantNames>::VARIANTS;

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<CloseCode> {
        Self::from_repr(code)
    }

    /// Short reason sent in the close frame and used as a metric label.
    pub fn reason(self) -> &'static str {
        self.into()
    }

    /// The reconnect advice: the one table every client follows.
    pub fn retry(self) -> Retry {
        match self {
            CloseCode::ServiceRestart => Retry::Soon,
            CloseCode::Normal
            | CloseCode::InternalError
            | CloseCode::TryAgainLater
            | CloseCode::PingTimeout
            // Reconnecting at once would replay into the same full queue.
            | CloseCode::SlowConsumer
            | CloseCode::RateLimited => Retry::Backoff,
            CloseCode::TokenExpired | CloseCode::KeyRemoved => Retry::NewToken,
            CloseCode::ProtocolError
            | CloseCode::UnsupportedData
            | CloseCode::InvalidPayload
            | CloseCode::PolicyViolation
            | CloseCode::MessageTooBig
            // The token is void for good: only a newly provisioned one connects.
            | CloseCode::Revoked => Retry::Never,
        }
    }
}

impl Retry {
    /// The advice for a close code the client received, known or not. Codes the hub never
    /// sends (1001 going away, 1006 no close frame, others' 4xxx) mean a lost link: backoff.
    pub fn after_close(code: u16) -> Retry {
        CloseCode::from_u16(code).map_or(Retry::Backoff, CloseCode::retry)
    }

    /// Its name in docs/protocol.md and `fleet-client.js`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The `code` of an `error` frame. The connection stays open after every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    /// Not a JSON object, a missing or mistyped field, or `data` not an object.
    BadFrame,
    /// A `type` this hub does not know.
    UnknownType,
    /// A channel name outside the grammar.
    InvalidChannel,
    /// The token's role or claims do not allow this.
    Forbidden,
    /// A `refresh` token that does not verify; the `message` says why (as a refused connection's
    /// `error`). The connection keeps its old token.
    BadToken,
    TooManySubscriptions,
    AlreadySubscribed,
    NotSubscribed,
    /// Publish refused by the rate limit: retry later, it was not stored.
    RateLimited,
    /// The broker cannot take the request now: retry, nothing was stored.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for &code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(CloseCode::from_u16(1001), None);
        assert_eq!(CloseCode::REASONS.len(), CloseCode::ALL.len());
        assert_eq!(CloseCode::TryAgainLater.reason(), "try_again_later");
        assert_eq!(CloseCode::REASONS[9], CloseCode::TokenExpired.reason());
    }

    #[test]
    fn only_a_restart_is_retried_at_once_and_unknown_codes_back_off() {
        let soon: Vec<_> = CloseCode::ALL
            .iter()
            .filter(|c| c.retry() == Retry::Soon)
            .collect();
        assert_eq!(soon, [&CloseCode::ServiceRestart]);
        assert_eq!(Retry::after_close(4001), Retry::NewToken);
        assert_eq!(Retry::after_close(1006), Retry::Backoff);
        assert_eq!(Retry::after_close(1009), Retry::Never);
    }

    #[test]
    fn error_codes_serialise_as_their_names() {
        let json = serde_json::to_string(&ErrorCode::TooManySubscriptions).unwrap();
        assert_eq!(
            json,
            format!("\"{}\"", ErrorCode::TooManySubscriptions.as_str())
        );
    }
}
