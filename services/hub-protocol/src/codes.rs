//! Close codes and error codes. `docs/protocol.md` lists what each means for a client.

use serde::{Deserialize, Serialize};

/// WebSocket close codes the hub sends. 1000-1015 are RFC 6455 / IANA codes; 4000-4999 are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    SlowConsumer = 4008,
    RateLimited = 4029,
}

impl CloseCode {
    pub const ALL: [CloseCode; 13] = [
        CloseCode::Normal,
        CloseCode::ProtocolError,
        CloseCode::UnsupportedData,
        CloseCode::InvalidPayload,
        CloseCode::PolicyViolation,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::ServiceRestart,
        CloseCode::TryAgainLater,
        CloseCode::TokenExpired,
        CloseCode::PingTimeout,
        CloseCode::SlowConsumer,
        CloseCode::RateLimited,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<CloseCode> {
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    /// Short reason sent in the close frame and used as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::UnsupportedData => "unsupported_data",
            CloseCode::InvalidPayload => "invalid_payload",
            CloseCode::PolicyViolation => "policy_violation",
            CloseCode::MessageTooBig => "message_too_big",
            CloseCode::InternalError => "internal_error",
            CloseCode::ServiceRestart => "service_restart",
            CloseCode::TryAgainLater => "try_again_later",
            CloseCode::TokenExpired => "token_expired",
            CloseCode::PingTimeout => "ping_timeout",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::RateLimited => "rate_limited",
        }
    }

    /// Whether a client should reconnect soon (with jitter) rather than back off long.
    pub fn reconnect_soon(self) -> bool {
        matches!(
            self,
            CloseCode::ServiceRestart | CloseCode::SlowConsumer | CloseCode::PingTimeout
        )
    }
}

/// The `code` of an `error` frame. The connection stays open after every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a JSON object, a missing or mistyped field, or `data` not an object.
    BadFrame,
    /// A `type` this hub does not know.
    UnknownType,
    /// A channel name outside the grammar.
    InvalidChannel,
    /// The token's role or claims do not allow this.
    Forbidden,
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
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(CloseCode::from_u16(1001), None);
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
