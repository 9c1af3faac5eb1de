//! What the hub sent, as a client sees it.

use fastwebsockets::{Frame, OpCode, WebSocketError};
use hub_protocol::{FrameError, ServerFrame};

/// A text or close frame from the hub; other frames (pings, pongs) are not events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A protocol frame's text: [`Received::frame`] decodes it.
    Text(Vec<u8>),
    /// The hub closed with this code (1005 when its close frame had none).
    Closed(u16),
}

impl Received {
    /// The event a frame makes, if any.
    pub fn from_frame(frame: &Frame<'_>) -> Option<Received> {
        match frame.opcode {
            OpCode::Text => Some(Received::Text(frame.payload.to_vec())),
            OpCode::Close => Some(Received::Closed(close_code(&frame.payload))),
            _ => None,
        }
    }

    /// The server frame in a text event; `None` for a close.
    pub fn frame(&self) -> Option<Result<ServerFrame<'_>, FrameError>> {
        match self {
            Received::Text(text) => Some(ServerFrame::parse(text)),
            Received::Closed(_) => None,
        }
    }
}

/// The next text or close frame from the hub; pings are answered and skipped on the way.
pub async fn receive(ws: &mut crate::HubSocket) -> Result<Received, WebSocketError> {
    loop {
        let frame = ws.read_frame().await?;
        if let Some(received) = Received::from_frame(&frame) {
            return Ok(received);
        }
    }
}

/// The code of a close frame's payload: its first two bytes, or 1005 ("no status received",
/// RFC 6455 §7.1.5) when there are fewer.
pub fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Payload;

    #[test]
    fn a_close_frame_gives_its_code_or_1005() {
        assert_eq!(close_code(&[0x0f, 0xa8, b'x']), 4008);
        assert_eq!(close_code(&[0x03]), 1005);
        assert_eq!(close_code(&[]), 1005);
        let close = Frame::close(4001, b"token_expired");
        assert_eq!(Received::from_frame(&close), Some(Received::Closed(4001)));
    }

    #[test]
    fn text_is_an_event_and_pings_are_not() {
        let text = Frame::text(Payload::Borrowed(
            br#"{"type":"ack","seq":3,"duplicate":false}"#,
        ));
        let received = Received::from_frame(&text).unwrap();
        assert!(matches!(
            received.frame(),
            Some(Ok(ServerFrame::Ack {
                seq: 3,
                duplicate: false
            }))
        ));
        let ping = Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""));
        assert_eq!(Received::from_frame(&ping), None);
    }
}
