//! Frames sent by the hub.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{ErrorCode, FrameError};

/// A hub → client frame.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame on every connection.
    Hello {
        /// Id of the hub node serving this connection.
        hub: Cow<'a, str>,
        sub: Cow<'a, str>,
        role: Cow<'a, str>,
        /// Agents: the highest `seq` the hub has accepted from this device (0 if none). An agent
        /// that lost its state continues above it.
        #[serde(skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
        /// When the token expires and the hub closes with 4001, seconds since the Unix epoch.
        expires_at: u64,
    },
    /// For a partitioned channel, one per partition (`part` of `parts`), each with the
    /// partition's own epoch and offsets; absent fields mean the channel is one log.
    Subscribed {
        channel: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        parts: Option<u32>,
        epoch: Cow<'a, str>,
        /// The channel's latest offset when the subscription took effect; the next live message
        /// has `offset + 1` (replayed messages, if any, come first).
        offset: u64,
        recovered: bool,
    },
    Unsubscribed {
        channel: Cow<'a, str>,
    },
    /// After `subscribed` when the subscribe asked for one: the latest `message` of every device
    /// on the channel (of a partition: of the partition) as of `offset`, so the live stream
    /// goes on from `offset + 1` with nothing in both and nothing missed between. A large one
    /// comes in several frames, all with `more: true` but the last.
    Snapshot {
        channel: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        epoch: Cow<'a, str>,
        offset: u64,
        /// `message` frames, as they were delivered.
        items: &'a RawValue,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
        /// Devices were left out: over the hub's snapshot limits (the oldest go first).
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    Message {
        channel: Cow<'a, str>,
        /// The partition whose epoch and offset these are; absent for a one-log channel.
        #[serde(skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        epoch: Cow<'a, str>,
        offset: u64,
        from: Cow<'a, str>,
        data: &'a RawValue,
    },
    /// Answers a `refresh` whose token was taken: the connection now closes with 4001 at this
    /// time (seconds since the Unix epoch) instead of the old token's.
    Refreshed {
        expires_at: u64,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Ack {
        seq: u64,
        /// The publication had been accepted before; it was not published again.
        #[serde(default, skip_serializing_if = "is_false")]
        duplicate: bool,
    },
    Error {
        code: ErrorCode,
        message: Cow<'a, str>,
        /// For a refused `publish`: its `seq`.
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    hub: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sub: Option<Cow<'a, str>>,
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    last_seq: Option<u64>,
    expires_at: Option<u64>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    part: Option<u32>,
    parts: Option<u32>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    offset: Option<u64>,
    recovered: Option<bool>,
    #[serde(borrow)]
    items: Option<&'a RawValue>,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    truncated: bool,
    #[serde(borrow)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    code: Option<ErrorCode>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

impl<'a> ServerFrame<'a> {
    /// Decodes one text frame from a hub (used by agents, dashboards' tests and load generators).
    pub fn parse(text: &'a [u8]) -> Result<Self, FrameError> {
        let w: Wire<'a> =
            serde_json::from_slice(text).map_err(|e| FrameError::Malformed(e.to_string()))?;
        let kind = w.kind.ok_or(FrameError::MissingField("type"))?;
        let channel = || w.channel.clone().ok_or(FrameError::MissingField("channel"));
        let epoch = || w.epoch.clone().ok_or(FrameError::MissingField("epoch"));
        let offset = || w.offset.ok_or(FrameError::MissingField("offset"));
        Ok(match &*kind {
            "hello" => ServerFrame::Hello {
                hub: w.hub.clone().ok_or(FrameError::MissingField("hub"))?,
                sub: w.sub.clone().ok_or(FrameError::MissingField("sub"))?,
                role: w.role.clone().ok_or(FrameError::MissingField("role"))?,
                last_seq: w.last_seq,
                expires_at: w.expires_at.ok_or(FrameError::MissingField("expires_at"))?,
            },
            "subscribed" => ServerFrame::Subscribed {
                channel: channel()?,
                part: w.part,
                parts: w.parts,
                epoch: epoch()?,
                offset: offset()?,
                recovered: w.recovered.ok_or(FrameError::MissingField("recovered"))?,
            },
            "unsubscribed" => ServerFrame::Unsubscribed {
                channel: channel()?,
            },
            "snapshot" => ServerFrame::Snapshot {
                channel: channel()?,
                part: w.part,
                epoch: epoch()?,
                offset: offset()?,
                items: w.items.ok_or(FrameError::MissingField("items"))?,
                more: w.more,
                truncated: w.truncated,
            },
            "message" => ServerFrame::Message {
                channel: channel()?,
                part: w.part,
                epoch: epoch()?,
                offset: offset()?,
                from: w.from.clone().ok_or(FrameError::MissingField("from"))?,
                data: w.data.ok_or(FrameError::MissingField("data"))?,
            },
            "refreshed" => ServerFrame::Refreshed {
                expires_at: w.expires_at.ok_or(FrameError::MissingField("expires_at"))?,
                reference: w.reference,
            },
            "ack" => ServerFrame::Ack {
                seq: w.seq.ok_or(FrameError::MissingField("seq"))?,
                duplicate: w.duplicate,
            },
            "error" => ServerFrame::Error {
                code: w.code.ok_or(FrameError::MissingField("code"))?,
                message: w.message.clone().unwrap_or_default(),
                seq: w.seq,
                reference: w.reference,
            },
            other => return Err(FrameError::UnknownType(other.to_owned())),
        })
    }

    /// Appends the JSON text of this frame to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("server frames always serialise");
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_with_raw_data() {
        let data = RawValue::from_string(r#"{"temp":{"v":48.2,"unit":"C"}}"#.into()).unwrap();
        let frame = ServerFrame::Message {
            channel: "fleet".into(),
            part: None,
            epoch: "e1".into(),
            offset: 42,
            from: "pi-1".into(),
            data: &data,
        };
        let json = frame.to_json();
        assert_eq!(
            json,
            r#"{"type":"message","channel":"fleet","epoch":"e1","offset":42,"from":"pi-1","data":{"temp":{"v":48.2,"unit":"C"}}}"#
        );
        match ServerFrame::parse(json.as_bytes()).unwrap() {
            ServerFrame::Message { offset, data, .. } => {
                assert_eq!(offset, 42);
                assert_eq!(data.get(), r#"{"temp":{"v":48.2,"unit":"C"}}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn partitioned_frames_name_their_partition_and_one_log_frames_do_not() {
        let one = ServerFrame::Subscribed {
            channel: "fleet".into(),
            part: None,
            parts: None,
            epoch: "e".into(),
            offset: 3,
            recovered: true,
        };
        assert_eq!(
            one.to_json(),
            r#"{"type":"subscribed","channel":"fleet","epoch":"e","offset":3,"recovered":true}"#
        );
        let part = ServerFrame::Subscribed {
            channel: "fleet".into(),
            part: Some(2),
            parts: Some(16),
            epoch: "e".into(),
            offset: 3,
            recovered: false,
        };
        let json = part.to_json();
        assert_eq!(
            json,
            r#"{"type":"subscribed","channel":"fleet","part":2,"parts":16,"epoch":"e","offset":3,"recovered":false}"#
        );
        assert!(matches!(
            ServerFrame::parse(json.as_bytes()),
            Ok(ServerFrame::Subscribed {
                part: Some(2),
                parts: Some(16),
                ..
            })
        ));
        let text = br#"{"type":"message","channel":"fleet","part":5,"epoch":"e","offset":1,"from":"d","data":{}}"#;
        assert!(matches!(
            ServerFrame::parse(text),
            Ok(ServerFrame::Message { part: Some(5), .. })
        ));
    }

    #[test]
    fn a_snapshot_holds_messages_and_says_whether_more_follow() {
        let items = RawValue::from_string(
            r#"[{"type":"message","channel":"fleet","epoch":"e","offset":7,"from":"d","data":{}}]"#
                .into(),
        )
        .unwrap();
        let frame = ServerFrame::Snapshot {
            channel: "fleet".into(),
            part: None,
            epoch: "e".into(),
            offset: 9,
            items: &items,
            more: true,
            truncated: false,
        };
        let json = frame.to_json();
        assert_eq!(
            json,
            format!(
                r#"{{"type":"snapshot","channel":"fleet","epoch":"e","offset":9,"items":{},"more":true}}"#,
                items.get()
            )
        );
        assert!(matches!(
            ServerFrame::parse(json.as_bytes()),
            Ok(ServerFrame::Snapshot {
                offset: 9,
                more: true,
                truncated: false,
                ..
            })
        ));
    }

    #[test]
    fn errors_carry_code_seq_and_ref() {
        let r = RawValue::from_string("\"abc\"".into()).unwrap();
        let frame = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            seq: Some(5),
            reference: Some(&r),
        };
        let json = frame.to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"rate_limited","message":"slow down","seq":5,"ref":"abc"}"#
        );
        assert!(matches!(
            ServerFrame::parse(json.as_bytes()),
            Ok(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                seq: Some(5),
                ..
            })
        ));
    }

    #[test]
    fn ack_marks_duplicates_only() {
        assert_eq!(
            ServerFrame::Ack {
                seq: 3,
                duplicate: false
            }
            .to_json(),
            r#"{"type":"ack","seq":3}"#
        );
        assert_eq!(
            ServerFrame::Ack {
                seq: 3,
                duplicate: true
            }
            .to_json(),
            r#"{"type":"ack","seq":3,"duplicate":true}"#
        );
    }
}
