//! Frames sent by clients.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{FrameError, MAX_PARTITIONS, MAX_REF_BYTES, MAX_SEQ};

/// A position in a channel's history: the last `offset` a client saw in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// Where a resuming `subscribe` continues: one [`Position`] for a channel that is one log, or
/// one per partition, in partition order, for a channel the hub splits into partitions (its
/// `subscribed` frames carry `part` and `parts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Since {
    One(Position),
    Partitions { partitions: Vec<Position> },
}

impl Since {
    /// What to resume partition `part` of `parts` from. `None` when this `since` was written for
    /// another number of partitions (the pool changed `broker.partitions`, or the client kept a
    /// one-log position): that partition is then answered `recovered: false`.
    pub fn part(&self, part: u32, parts: u32) -> Option<&Position> {
        match self {
            Since::One(position) => (parts == 1 && part == 0).then_some(position),
            Since::Partitions { partitions } => (partitions.len() == parts as usize)
                .then(|| partitions.get(part as usize))
                .flatten(),
        }
    }
}

impl From<Position> for Since {
    fn from(position: Position) -> Self {
        Since::One(position)
    }
}

/// A client → hub frame. `reference` is the optional `ref` field, echoed in `error` frames.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
        /// Start with a `snapshot`: the latest message of every device on the channel, then
        /// the live stream after it (`since` is then not used: a resume is a new snapshot).
        #[serde(default, skip_serializing_if = "is_false")]
        snapshot: bool,
        /// Conflated: each device's latest message at most this many times a second (from
        /// [`MIN_RATE`] to [`MAX_RATE`]), never cut off for falling behind.
        #[serde(skip_serializing_if = "Option::is_none")]
        max_rate: Option<f64>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    /// A new token for this connection: same `sub`, role and grants, verified like a new
    /// connection's; the hub answers `refreshed` with the new expiry, or an `error`.
    Refresh {
        token: Cow<'a, str>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Publish {
        seq: u64,
        data: &'a RawValue,
        /// Optional; when present it must be the token's own `sub`.
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<Cow<'a, str>>,
        /// Optional W3C trace context: the hub's spans for this reading join the agent's trace.
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<Cow<'a, str>>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
}

/// What an `error` frame can echo of a frame that did not decode (see [`ClientFrame::echo`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo<'a> {
    pub seq: Option<u64>,
    pub reference: Option<&'a RawValue>,
}

/// Flat view of any client frame. serde cannot borrow a `RawValue` through an internally tagged
/// enum, so frames are decoded into this struct and then checked field by field.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    since: Option<Since>,
    #[serde(default)]
    snapshot: bool,
    max_rate: Option<f64>,
    seq: Option<u64>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    device: Option<Cow<'a, str>>,
    /// Kept raw: a `traceparent` that is not a plain string is ignored, never an error.
    #[serde(borrow)]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

/// The slowest conflated rate a subscribe may ask for: one message per device a minute.
pub const MIN_RATE: f64 = 1.0 / 60.0;
/// The fastest: above it a conflated stream is hardly different from the exact one.
pub const MAX_RATE: f64 = 100.0;

fn is_false(b: &bool) -> bool {
    !*b
}

/// The text of a JSON string without escapes (what a `traceparent` is), else `None`.
fn plain_string(raw: &RawValue) -> Option<&str> {
    let inner = raw.get().strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

impl<'a> ClientFrame<'a> {
    /// Decodes one text frame.
    pub fn parse(text: &'a [u8]) -> Result<Self, FrameError> {
        let wire: Wire<'a> =
            serde_json::from_slice(text).map_err(|e| FrameError::Malformed(e.to_string()))?;
        let kind = wire.kind.ok_or(FrameError::MissingField("type"))?;
        let reference = wire.reference;
        if reference.is_some_and(|r| r.get().len() > MAX_REF_BYTES) {
            return Err(FrameError::RefTooLong);
        }
        match &*kind {
            "subscribe" => {
                if let Some(Since::Partitions { partitions }) = &wire.since
                    && partitions.len() > MAX_PARTITIONS as usize
                {
                    return Err(FrameError::TooManyPartitions);
                }
                if wire
                    .max_rate
                    .is_some_and(|r| !(MIN_RATE..=MAX_RATE).contains(&r))
                {
                    return Err(FrameError::MaxRateOutOfRange);
                }
                Ok(ClientFrame::Subscribe {
                    channel: wire.channel.ok_or(FrameError::MissingField("channel"))?,
                    since: wire.since,
                    snapshot: wire.snapshot,
                    max_rate: wire.max_rate,
                    reference,
                })
            }
            "refresh" => Ok(ClientFrame::Refresh {
                token: wire.token.ok_or(FrameError::MissingField("token"))?,
                reference,
            }),
            "unsubscribe" => Ok(ClientFrame::Unsubscribe {
                channel: wire.channel.ok_or(FrameError::MissingField("channel"))?,
                reference,
            }),
            "publish" => {
                let data = wire.data.ok_or(FrameError::MissingField("data"))?;
                if !data.get().starts_with('{') {
                    return Err(FrameError::DataNotObject);
                }
                let seq = wire.seq.ok_or(FrameError::MissingField("seq"))?;
                if !(1..=MAX_SEQ).contains(&seq) {
                    return Err(FrameError::SeqOutOfRange);
                }
                Ok(ClientFrame::Publish {
                    seq,
                    data,
                    device: wire.device,
                    traceparent: wire.traceparent.and_then(plain_string).map(Cow::Borrowed),
                    reference,
                })
            }
            other => Err(FrameError::UnknownType(other.to_owned())),
        }
    }

    /// What an `error` answering an undecodable frame can still echo: its `seq` when it is an
    /// integer, and its `ref` when it fits [`MAX_REF_BYTES`]. Reads only what it can, so any
    /// JSON object yields what it has; anything else yields nothing.
    pub fn echo(text: &'a [u8]) -> Echo<'a> {
        #[derive(Deserialize)]
        struct Loose<'a> {
            #[serde(borrow)]
            seq: Option<&'a RawValue>,
            #[serde(rename = "ref", borrow)]
            reference: Option<&'a RawValue>,
        }
        // serde would read a JSON array into the struct by position; only objects have fields.
        let is_object = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let Some(loose) = is_object
            .then(|| serde_json::from_slice::<Loose<'a>>(text).ok())
            .flatten()
        else {
            return Echo::default();
        };
        Echo {
            seq: loose.seq.and_then(|s| s.get().parse().ok()),
            reference: loose.reference.filter(|r| r.get().len() <= MAX_REF_BYTES),
        }
    }

    /// The `ref` the client attached, if any.
    pub fn reference(&self) -> Option<&'a RawValue> {
        match self {
            ClientFrame::Subscribe { reference, .. }
            | ClientFrame::Unsubscribe { reference, .. }
            | ClientFrame::Refresh { reference, .. }
            | ClientFrame::Publish { reference, .. } => *reference,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("client frames always serialise")
    }
}

/// A `publish` frame around `data`, the text of a JSON object (a reading as an agent stored it),
/// which is written in as it is, never parsed: a reading that is not valid JSON reaches the
/// hub, which refuses it with `bad_frame`, and the agent drops it loudly.
pub fn publish_frame(seq: u64, data: &[u8], traceparent: Option<&str>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(data.len() + 48 + traceparent.map_or(0, |t| t.len() + 16));
    frame.extend_from_slice(b"{\"type\":\"publish\",\"seq\":");
    frame.extend_from_slice(seq.to_string().as_bytes());
    if let Some(tp) = traceparent {
        frame.extend_from_slice(b",\"traceparent\":");
        // A string always serialises.
        let _ = serde_json::to_writer(&mut frame, tp);
    }
    frame.extend_from_slice(b",\"data\":");
    frame.extend_from_slice(data);
    frame.push(b'}');
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_keeps_data_as_raw_text() {
        let text = br#"{"type":"publish","seq":7,"data":{"t": 21.5,"u":"C"}}"#;
        match ClientFrame::parse(text).unwrap() {
            ClientFrame::Publish {
                seq, data, device, ..
            } => {
                assert_eq!(seq, 7);
                assert_eq!(data.get(), r#"{"t": 21.5,"u":"C"}"#);
                assert!(device.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn publish_may_carry_a_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let text = format!(r#"{{"type":"publish","seq":1,"data":{{}},"traceparent":"{tp}"}}"#);
        match ClientFrame::parse(text.as_bytes()).unwrap() {
            ClientFrame::Publish { traceparent, .. } => {
                assert_eq!(traceparent.as_deref(), Some(tp))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn subscribe_with_since_and_ref() {
        let text =
            br#"{"type":"subscribe","channel":"fleet","since":{"epoch":"ab","offset":3},"ref":12}"#;
        let frame = ClientFrame::parse(text).unwrap();
        assert_eq!(frame.reference().map(|r| r.get()), Some("12"));
        match frame {
            ClientFrame::Subscribe { channel, since, .. } => {
                assert_eq!(channel, "fleet");
                assert_eq!(
                    since,
                    Some(Since::One(Position {
                        epoch: "ab".into(),
                        offset: 3
                    }))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_partitioned_since_gives_one_position_per_partition() {
        let text = br#"{"type":"subscribe","channel":"fleet","since":{"partitions":[{"epoch":"a","offset":1},{"epoch":"b","offset":0}]}}"#;
        let ClientFrame::Subscribe {
            since: Some(since), ..
        } = ClientFrame::parse(text).unwrap()
        else {
            panic!("no since");
        };
        let b = Position {
            epoch: "b".into(),
            offset: 0,
        };
        assert_eq!(since.part(1, 2), Some(&b));
        assert_eq!(since.part(2, 2), None, "no such partition");
        assert_eq!(since.part(0, 3), None, "written for 2 partitions, not 3");
        assert_eq!(since.part(0, 1), None);
    }

    #[test]
    fn a_one_log_since_resumes_only_a_one_log_channel() {
        let since = Since::from(Position {
            epoch: "e".into(),
            offset: 4,
        });
        assert_eq!(since.part(0, 1).map(|p| p.offset), Some(4));
        assert_eq!(since.part(0, 16), None);
        assert_eq!(
            serde_json::to_string(&since).unwrap(),
            r#"{"epoch":"e","offset":4}"#,
            "the one-log form is the v1 form"
        );
    }

    #[test]
    fn a_since_with_more_partitions_than_any_pool_has_is_refused() {
        let parts = vec![r#"{"epoch":"e","offset":0}"#; MAX_PARTITIONS as usize + 1].join(",");
        let text = format!(
            r#"{{"type":"subscribe","channel":"fleet","since":{{"partitions":[{parts}]}}}}"#
        );
        assert!(matches!(
            ClientFrame::parse(text.as_bytes()),
            Err(FrameError::TooManyPartitions)
        ));
        assert!(matches!(
            ClientFrame::parse(br#"{"type":"subscribe","channel":"fleet","since":{"offset":1}}"#),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn bad_frames_are_told_apart() {
        assert!(matches!(
            ClientFrame::parse(b"{not json"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            ClientFrame::parse(b"[1,2]"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            ClientFrame::parse(b"{}"),
            Err(FrameError::MissingField("type"))
        ));
        assert!(matches!(
            ClientFrame::parse(br#"{"type":"dance"}"#),
            Err(FrameError::UnknownType(t)) if t == "dance"
        ));
        assert!(matches!(
            ClientFrame::parse(br#"{"type":"publish","seq":1,"data":[1]}"#),
            Err(FrameError::DataNotObject)
        ));
        assert!(matches!(
            ClientFrame::parse(br#"{"type":"publish","seq":-1,"data":{}}"#),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn seq_is_from_1_to_max_seq() {
        let publish = |seq: u64| format!(r#"{{"type":"publish","seq":{seq},"data":{{}}}}"#);
        for bad in [0, MAX_SEQ + 1, u64::MAX] {
            assert!(
                matches!(
                    ClientFrame::parse(publish(bad).as_bytes()),
                    Err(FrameError::SeqOutOfRange)
                ),
                "{bad}"
            );
        }
        for good in [1, MAX_SEQ] {
            assert!(
                ClientFrame::parse(publish(good).as_bytes()).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn a_ref_longer_than_the_bound_is_refused_and_never_echoed() {
        let long = format!(
            r#"{{"type":"subscribe","channel":"fleet","ref":"{}"}}"#,
            "x".repeat(300)
        );
        assert!(matches!(
            ClientFrame::parse(long.as_bytes()),
            Err(FrameError::RefTooLong)
        ));
        assert!(ClientFrame::echo(long.as_bytes()).reference.is_none());
    }

    #[test]
    fn undecodable_frames_still_echo_their_seq_and_ref() {
        let echo = ClientFrame::echo(br#"{"type":"publish","seq":5,"data":[1],"ref":"a"}"#);
        assert_eq!(
            (echo.seq, echo.reference.map(|r| r.get())),
            (Some(5), Some(r#""a""#))
        );
        let echo = ClientFrame::echo(br#"{"type":"dance","ref":{"n":1}}"#);
        assert_eq!(echo.reference.map(|r| r.get()), Some(r#"{"n":1}"#));
        let echo = ClientFrame::echo(br#"{"type":"publish","seq":"five","ref":7}"#);
        assert_eq!(
            (echo.seq, echo.reference.map(|r| r.get())),
            (None, Some("7"))
        );
        let echo = ClientFrame::echo(b"[1,2]");
        assert!(echo.seq.is_none() && echo.reference.is_none());
    }

    #[test]
    fn encoding_round_trips() {
        let data = RawValue::from_string(r#"{"v":1}"#.into()).unwrap();
        let frame = ClientFrame::Publish {
            seq: 9,
            data: &data,
            device: None,
            traceparent: None,
            reference: None,
        };
        let json = frame.to_json();
        assert_eq!(json, r#"{"type":"publish","seq":9,"data":{"v":1}}"#);
        assert!(matches!(
            ClientFrame::parse(json.as_bytes()),
            Ok(ClientFrame::Publish { seq: 9, .. })
        ));
    }

    #[test]
    fn a_publish_frame_wraps_stored_json_and_decodes_as_written() {
        let text = publish_frame(7, br#"{"t":1}"#, Some("00-ab-cd-01"));
        match ClientFrame::parse(&text).unwrap() {
            ClientFrame::Publish {
                seq,
                data,
                traceparent,
                ..
            } => {
                assert_eq!((seq, data.get()), (7, r#"{"t":1}"#));
                assert_eq!(traceparent.as_deref(), Some("00-ab-cd-01"));
            }
            other => panic!("{other:?}"),
        }
        let quoted = publish_frame(1, b"{}", Some("a\"b"));
        assert!(
            ClientFrame::parse(&quoted).is_ok(),
            "a traceparent is escaped"
        );
    }
}
