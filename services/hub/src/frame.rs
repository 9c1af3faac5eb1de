//! Encoding of the WebSocket frames the hub sends.
//!
//! Server frames are never masked, so a frame is the same bytes for every recipient: a
//! publication is encoded once, header included, and the same [`Bytes`] is queued to each
//! subscriber and written with `writev`. fastwebsockets still handles the upgrade and everything
//! the hub reads.

use bytes::Bytes;
use hub_protocol::{CloseCode, ServerFrame};

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const MAX_HEADER: usize = 10;

/// Writes the header of a final, unmasked frame so that it ends at `head.len()`; returns where it
/// starts.
fn put_header(head: &mut [u8; MAX_HEADER], opcode: u8, len: usize) -> usize {
    let first = 0x80 | opcode;
    if len < 126 {
        head[8] = first;
        head[9] = len as u8;
        8
    } else if len <= u16::MAX as usize {
        head[6] = first;
        head[7] = 126;
        head[8..10].copy_from_slice(&(len as u16).to_be_bytes());
        6
    } else {
        head[0] = first;
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        0
    }
}

/// A text frame whose payload `write` appends; `size_hint` is the expected payload size.
pub fn text(size_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_HEADER + size_hint);
    buf.resize(MAX_HEADER, 0);
    write(&mut buf);
    let len = buf.len() - MAX_HEADER;
    let head: &mut [u8; MAX_HEADER] = (&mut buf[..MAX_HEADER]).try_into().expect("header slot");
    let start = put_header(head, OP_TEXT, len);
    Bytes::from(buf).slice(start..)
}

/// The payload of a frame made by [`text`]: the message JSON a snapshot quotes, without a copy.
pub fn payload(frame: &Bytes) -> Bytes {
    let start = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return Bytes::new(),
    };
    frame.slice(start.min(frame.len())..)
}

/// A server frame as a complete WebSocket text frame.
pub fn server(frame: &ServerFrame<'_>) -> Bytes {
    text(128, |buf| frame.write_json(buf))
}

fn control(opcode: u8, payload: &[u8]) -> Bytes {
    let payload = &payload[..payload.len().min(125)];
    let mut buf = Vec::with_capacity(2 + payload.len());
    buf.push(0x80 | opcode);
    buf.push(payload.len() as u8);
    buf.extend_from_slice(payload);
    Bytes::from(buf)
}

pub fn ping() -> Bytes {
    control(OP_PING, b"")
}

pub fn pong(payload: &[u8]) -> Bytes {
    control(OP_PONG, payload)
}

/// A close frame with `code` and a short reason.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    control(OP_CLOSE, &payload)
}

pub fn close_with(code: CloseCode) -> Bytes {
    close(code.as_u16(), code.reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_forms() {
        let small = text(0, |b| b.extend_from_slice(b"hi"));
        assert_eq!(&small[..], b"\x81\x02hi");
        let medium = text(0, |b| b.resize(b.len() + 300, b'x'));
        assert_eq!(&medium[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(medium.len(), 4 + 300);
        let large = text(0, |b| b.resize(b.len() + 70_000, b'x'));
        assert_eq!(&large[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(large[2..10].try_into().unwrap()), 70_000);
        assert_eq!(&payload(&small)[..], b"hi");
        assert_eq!(payload(&medium).len(), 300);
        assert_eq!(payload(&large).len(), 70_000);
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let f = close_with(CloseCode::SlowConsumer);
        assert_eq!(f[0], 0x88);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4008);
        assert_eq!(&f[4..], b"slow_consumer");
    }
}
