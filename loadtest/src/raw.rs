//! The fan-out ceiling of a machine: a server that speaks just enough of the hub's protocol
//! (hello, subscribed, message) and does nothing else. A publish is framed once (WebSocket
//! header and JSON) and the same bytes are written to every socket. No auth, no history, no
//! per-channel routing, no limits: what the hub does is measured as a fraction of this.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// A server frame (FIN, text, unmasked) around `payload`, framed by fastwebsockets.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // `write` sizes the buffer for the longest header and returns the part it used.
    let used = Frame::text(Payload::Borrowed(payload))
        .write(&mut out)
        .len();
    out.truncate(used);
    out
}

struct Shared {
    tx: broadcast::Sender<Bytes>,
    offset: AtomicU64,
}

/// Serves until the process is killed. `queue` bounds what a slow socket may lag behind.
pub async fn serve(listener: TcpListener, queue: usize) -> anyhow::Result<()> {
    let (tx, _) = broadcast::channel(queue);
    let shared = Arc::new(Shared {
        tx,
        offset: AtomicU64::new(0),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { upgrade(req, shared) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
) -> anyhow::Result<Response<Empty<Bytes>>> {
    let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        if let Ok(ws) = upgrade.await {
            let _ = connection(ws.into_inner(), shared).await;
        }
    });
    Ok(response)
}

async fn connection(
    io: TokioIo<hyper::upgrade::Upgraded>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let (read, mut write) = tokio::io::split(io);
    let (mut reader, _) =
        fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    write
        .write_all(&text_frame(
            br#"{"type":"hello","hub":"raw","sub":"x","role":"viewer","expires_at":0}"#,
        ))
        .await?;
    // Started by the first subscribe: it is the only writer of this socket from then on.
    let mut write = Some(write);
    let mut writer = None;
    let mut ignore = |_| std::future::ready(Ok::<(), std::io::Error>(()));
    loop {
        let frame = reader.read_frame(&mut ignore).await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text if frame.payload.starts_with(br#"{"type":"publish""#) => {
                let data = data_of(&frame.payload);
                let offset = shared.offset.fetch_add(1, Ordering::Relaxed) + 1;
                let mut json = Vec::with_capacity(data.len() + 96);
                let _ = write!(
                    json,
                    r#"{{"type":"message","channel":"fleet","epoch":"raw","offset":{offset},"from":"raw","data":"#
                );
                json.extend_from_slice(data);
                json.push(b'}');
                let _ = shared.tx.send(Bytes::from(text_frame(&json)));
            }
            OpCode::Text if frame.payload.starts_with(br#"{"type":"subscribe""#) => {
                let Some(mut write) = write.take() else {
                    continue;
                };
                let mut rx = shared.tx.subscribe();
                let offset = shared.offset.load(Ordering::Relaxed);
                let answer = format!(
                    r#"{{"type":"subscribed","channel":"fleet","epoch":"raw","offset":{offset},"recovered":false}}"#
                );
                writer = Some(tokio::spawn(async move {
                    if write
                        .write_all(&text_frame(answer.as_bytes()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // Lagging behind the queue ends the connection, as a slow consumer would.
                    // What is queued goes out in one write, as the hub's writer does.
                    let mut batch = Vec::with_capacity(64 * 1024);
                    while let Ok(frame) = rx.recv().await {
                        batch.clear();
                        batch.extend_from_slice(&frame);
                        while batch.len() < 64 * 1024 {
                            match rx.try_recv() {
                                Ok(more) => batch.extend_from_slice(&more),
                                Err(broadcast::error::TryRecvError::Empty) => break,
                                Err(_) => return,
                            }
                        }
                        if write.write_all(&batch).await.is_err() {
                            return;
                        }
                    }
                }));
            }
            _ => {}
        }
    }
    if let Some(writer) = writer {
        writer.abort();
    }
    Ok(())
}

/// The `data` object of a publish frame the generator wrote (`..."data":{...}}`).
fn data_of(publish: &[u8]) -> &[u8] {
    let needle = br#""data":"#;
    match publish.windows(needle.len()).position(|w| w == needle) {
        Some(at) => &publish[at + needle.len()..publish.len().saturating_sub(1)],
        None => b"{}",
    }
}

/// Binds `addr` and prints `addr=<bound address>` for the parent process.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("raw server listening addr={}", listener.local_addr()?);
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_text_frame_is_header_then_payload() {
        assert_eq!(super::text_frame(b"hi"), [0x81, 2, b'h', b'i']);
        let long = super::text_frame(&[b'x'; 300]);
        assert_eq!(
            (&long[..4], long.len()),
            (&[0x81, 126, 0x01, 0x2c][..], 304)
        );
    }
}
