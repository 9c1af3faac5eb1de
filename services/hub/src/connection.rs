//! One WebSocket connection: this task reads, a spawned [`writer`](crate::writer) task writes,
//! and the [`Outbox`] joins them. Whoever decides the connection ends calls `Outbox::close`; both
//! halves watch for it.

use std::borrow::Cow;
use std::sync::Arc;

use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketRead};
use hub_protocol::{CloseCode, Role};
use tokio::io::AsyncRead;
use tracing::debug;

use crate::auth::Identity;
use crate::broker::{Broker, PresenceChange};
use crate::frame;
use crate::limits::ConnectionPermit;
use crate::outbox::{CloseReason, Outbound, Outbox};
use crate::session::Session;
use crate::state::AppState;
use crate::writer::{self, Expiry, Liveness, Writer, WriterSettings};

/// Serves an upgraded connection until it closes.
///
/// Not an `async fn`: a task's state is allocated at its largest for the connection's whole
/// life, and an `async fn` keeps its arguments twice (the arguments, and the locals they move
/// into). `identity` comes boxed for the same reason: it moves into the session at the start.
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub fn serve(
    upgrade: UpgradeFut,
    identity: Box<Identity>,
    state: Arc<AppState>,
    permit: ConnectionPermit,
) -> impl Future<Output = ()> + Send {
    async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let settings = &state.settings;
        let (read, write) = tokio::io::split(ws.into_inner());
        let (mut reader, _) = fastwebsockets::after_handshake_split(
            read,
            tokio::io::sink(),
            fastwebsockets::Role::Server,
        );
        reader.set_auto_close(false);
        reader.set_auto_pong(true);
        // fastwebsockets refuses frames of `max` bytes or more; ours is inclusive.
        reader.set_max_message_size(settings.limits.max_message_bytes + 1);

        let limits = &settings.limits;
        let (outbox, rx) = Outbox::bounded(
            state.next_connection_id(),
            limits.outbound_queue,
            limits.outbound_queue_bytes,
        );
        let liveness = Arc::new(Liveness::default());
        let expiry = Arc::new(Expiry::new(writer::expiry_time(
            identity.expires_at,
            settings.auth.leeway,
        )));
        // Registered before the first frame: a revocation from now on finds the connection.
        let holding = state
            .live_tokens
            .hold(&identity, &outbox, &state.token_lists);
        let writer = Writer {
            io: write,
            queue: rx,
            outbox: outbox.clone(),
            liveness: liveness.clone(),
            settings: WriterSettings {
                ping_interval: settings.ws.ping_interval,
                pong_timeout: settings.ws.pong_timeout,
                expiry: expiry.clone(),
            },
            metrics: state.metrics.clone(),
        };
        let writer = tokio::spawn(writer.run());

        let role = identity.role;
        let metrics = &state.metrics;
        metrics.connections_opened.inc(role.as_str());
        let gauge = metrics.connections.get(role.as_str());
        gauge.inc();
        debug!(id = outbox.id(), sub = %identity.sub, role = role.as_str(), "connected");

        // Only an agent whose session started counts for presence: one refused at `hello` was
        // never online.
        let device = (role == Role::Agent).then(|| identity.sub.clone());
        let mut session = Session::new(
            *identity,
            expiry,
            outbox.clone(),
            permit.share().clone(),
            state.clone(),
        );
        let mut present = None;
        match session.start().await {
            Ok(()) => {
                present = device.map(|device| Present::arrive(&*state.broker, device, &outbox));
                read_loop(&mut reader, &mut session, &outbox, &liveness, &state).await
            }
            Err(code) => outbox.close(CloseReason::Hub(code)),
        }
        session.finish();
        outbox.close(CloseReason::Hub(CloseCode::Normal));
        let _ = writer.await;
        drop(present);
        drop(holding);

        let reason = outbox.close_reason().unwrap_or(CloseReason::Gone);
        metrics.disconnects.inc(reason.label());
        if reason == CloseReason::Hub(CloseCode::SlowConsumer) {
            metrics.slow_consumer_disconnects.inc();
        }
        gauge.dec();
        debug!(id = outbox.id(), reason = reason.label(), "disconnected");
        let span = tracing::Span::current();
        span.record("close.reason", reason.label());
        if let CloseReason::Hub(code) = reason {
            span.record("close.code", code.as_u16());
        } else if let CloseReason::Peer(code) = reason {
            span.record("close.code", code);
        }
        linger(&mut reader).await;
        drop(permit);
    }
}

/// An agent's device in presence while its connection lives. Dropped, at the end or by a panic
/// unwinding the connection's task, it takes the device off (a device left online by a panic
/// would stay online for the life of the hub, lease renewed and all) and closes the connection.
struct Present<'a> {
    broker: &'a dyn Broker,
    device: String,
    outbox: &'a Outbox,
}

impl<'a> Present<'a> {
    fn arrive(broker: &'a dyn Broker, device: String, outbox: &'a Outbox) -> Self {
        broker.presence(&device, PresenceChange::Connected);
        Present {
            broker,
            device,
            outbox,
        }
    }
}

impl Drop for Present<'_> {
    fn drop(&mut self) {
        // Closed already unless the connection's task is unwinding.
        self.outbox
            .close(CloseReason::Hub(CloseCode::InternalError));
        let reason = self.outbox.close_reason().unwrap_or(CloseReason::Gone);
        let change = PresenceChange::Disconnected {
            reason: reason.label(),
        };
        self.broker.presence(&self.device, change);
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    reader: &mut WebSocketRead<R>,
    session: &mut Session,
    outbox: &Outbox,
    liveness: &Liveness,
    state: &AppState,
) {
    let mut message = Reassembly::new(state.settings.limits.max_message_bytes);
    let pong_outbox = outbox.clone();
    // fastwebsockets answers a ping through this and never returns it: the ping is a sign of
    // life all the same.
    let mut send_pong = move |ping: Frame<'_>| {
        liveness.heard();
        std::future::ready(pong_outbox.push(Outbound::control(frame::pong(&ping.payload))))
    };
    loop {
        let frame = tokio::select! {
            biased;
            _ = outbox.closed() => return,
            frame = reader.read_frame(&mut send_pong) => frame,
        };
        liveness.heard();
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                outbox.close(read_error(&e));
                return;
            }
        };
        state.metrics.frames_received.inc();
        let result = match frame.opcode {
            OpCode::Binary => Err(CloseCode::UnsupportedData),
            OpCode::Close => {
                outbox.close(peer_close(&frame.payload));
                return;
            }
            OpCode::Ping | OpCode::Pong => Ok(()),
            OpCode::Text | OpCode::Continuation => match message.accept(&frame) {
                // Boxed: its state is the largest this loop awaits, and a viewer's task would
                // carry it for life while it sends a frame a minute.
                Ok(Some(text)) => Box::pin(session.handle_text(&text)).await,
                Ok(None) => Ok(()),
                Err(code) => Err(code),
            },
        };
        // Publishes that arrived together go to the broker as one publication: take the next
        // frame first when it is already here.
        let result = match result {
            Ok(())
                if session.has_batch()
                    && (session.batch_full() || !reader.has_buffered_frame()) =>
            {
                Box::pin(session.flush()).await
            }
            other => other,
        };
        if let Err(code) = result {
            outbox.close(CloseReason::Hub(code));
            return;
        }
    }
}

/// Reads and discards until the peer's close frame or EOF, for a short while. Dropping a socket
/// with unread input makes the kernel send RST, which can destroy our close frame before the peer
/// reads it; waiting for the peer's side of the close handshake avoids that.
async fn linger<R: AsyncRead + Unpin>(reader: &mut WebSocketRead<R>) {
    let mut ignore = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
    let _ = tokio::time::timeout(2 * writer::CLOSE_GRACE, async {
        while let Ok(frame) = reader.read_frame(&mut ignore).await {
            if frame.opcode == OpCode::Close {
                break;
            }
        }
    })
    .await;
}

fn read_error(e: &WebSocketError) -> CloseReason {
    match e {
        WebSocketError::FrameTooLarge => CloseReason::Hub(CloseCode::MessageTooBig),
        WebSocketError::InvalidUTF8 => CloseReason::Hub(CloseCode::InvalidPayload),
        WebSocketError::UnexpectedEOF
        | WebSocketError::ConnectionClosed
        | WebSocketError::IoError(_)
        | WebSocketError::HTTPError(_)
        // Our own pong could not be queued: the outbox already holds the reason.
        | WebSocketError::SendError(_) => CloseReason::Gone,
        _ => CloseReason::Hub(CloseCode::ProtocolError),
    }
}

/// The reply to a peer's close frame (RFC 6455 §5.5.1, §7.4).
fn peer_close(payload: &[u8]) -> CloseReason {
    match payload {
        [] => CloseReason::Peer(CloseCode::Normal.as_u16()),
        [_] => CloseReason::Hub(CloseCode::ProtocolError),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                CloseReason::Hub(CloseCode::ProtocolError)
            } else if std::str::from_utf8(reason).is_err() {
                CloseReason::Hub(CloseCode::InvalidPayload)
            } else {
                CloseReason::Peer(code)
            }
        }
    }
}

/// Joins fragmented text messages, bounded by the message size limit in total (fastwebsockets
/// bounds single frames only).
struct Reassembly {
    max: usize,
    buf: Vec<u8>,
    active: bool,
}

impl Reassembly {
    fn new(max: usize) -> Self {
        Reassembly {
            max,
            buf: Vec::new(),
            active: false,
        }
    }

    /// Takes a text or continuation frame; returns a whole message when one is complete.
    fn accept<'a>(&mut self, frame: &'a Frame<'_>) -> Result<Option<Cow<'a, [u8]>>, CloseCode> {
        match (frame.opcode, frame.fin, self.active) {
            (OpCode::Text, true, false) => Ok(Some(Cow::Borrowed(&frame.payload[..]))),
            (OpCode::Text, false, false) => {
                self.active = true;
                self.buf.clear();
                self.append(&frame.payload)?;
                Ok(None)
            }
            (OpCode::Continuation, fin, true) => {
                self.append(&frame.payload)?;
                if !fin {
                    return Ok(None);
                }
                self.active = false;
                let text = std::mem::take(&mut self.buf);
                if std::str::from_utf8(&text).is_err() {
                    return Err(CloseCode::InvalidPayload);
                }
                Ok(Some(Cow::Owned(text)))
            }
            _ => Err(CloseCode::ProtocolError),
        }
    }

    fn append(&mut self, part: &[u8]) -> Result<(), CloseCode> {
        if self.buf.len() + part.len() > self.max {
            return Err(CloseCode::MessageTooBig);
        }
        self.buf.extend_from_slice(part);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Payload;

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, Payload::Owned(payload.to_vec()))
    }

    #[test]
    fn fragments_join_within_the_limit() {
        let mut r = Reassembly::new(10);
        assert_eq!(r.accept(&frame(false, OpCode::Text, b"hel")).unwrap(), None);
        assert_eq!(
            r.accept(&frame(false, OpCode::Continuation, b"lo "))
                .unwrap(),
            None
        );
        let last = frame(true, OpCode::Continuation, b"you");
        let done = r.accept(&last).unwrap().unwrap();
        assert_eq!(&done[..], b"hello you");
        let whole = frame(true, OpCode::Text, b"x");
        assert_eq!(&r.accept(&whole).unwrap().unwrap()[..], b"x");
    }

    #[test]
    fn fragments_past_the_limit_or_out_of_order_are_refused() {
        let mut r = Reassembly::new(5);
        r.accept(&frame(false, OpCode::Text, b"abc")).unwrap();
        assert_eq!(
            r.accept(&frame(false, OpCode::Continuation, b"def")),
            Err(CloseCode::MessageTooBig)
        );
        let mut r = Reassembly::new(5);
        assert_eq!(
            r.accept(&frame(true, OpCode::Continuation, b"a")),
            Err(CloseCode::ProtocolError)
        );
        r.accept(&frame(false, OpCode::Text, b"a")).unwrap();
        assert_eq!(
            r.accept(&frame(true, OpCode::Text, b"b")),
            Err(CloseCode::ProtocolError)
        );
    }

    #[test]
    fn split_utf8_is_checked_on_the_whole_message() {
        let mut r = Reassembly::new(10);
        let euro = "€".as_bytes();
        r.accept(&frame(false, OpCode::Text, &euro[..1])).unwrap();
        assert!(
            r.accept(&frame(true, OpCode::Continuation, &euro[1..]))
                .unwrap()
                .is_some()
        );
        r.accept(&frame(false, OpCode::Text, &euro[..1])).unwrap();
        assert_eq!(
            r.accept(&frame(true, OpCode::Continuation, b"x")),
            Err(CloseCode::InvalidPayload)
        );
    }

    #[test]
    fn peer_close_codes_are_echoed_or_refused() {
        assert_eq!(peer_close(&[]), CloseReason::Peer(1000));
        assert_eq!(peer_close(&[0x0f, 0xa0]), CloseReason::Peer(4000));
        assert_eq!(
            peer_close(&[0x03, 0xed]),
            CloseReason::Hub(CloseCode::ProtocolError),
            "1005 is reserved"
        );
        assert_eq!(
            peer_close(&[0x03, 0xe8, 0xff]),
            CloseReason::Hub(CloseCode::InvalidPayload)
        );
    }
}
