//! A minimal client of the hub's protocol: connect with a token, send frames, read frames.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct Client {
    ws: WebSocket<TokioIo<Upgraded>>,
}

/// What the hub sent.
pub enum Incoming {
    Text(Vec<u8>),
    Closed(u16),
}

impl Client {
    /// Connects to `ws://addr/ws?token=…` and consumes `hello`.
    pub async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Client> {
        Client::connect_from(addr, None, token).await
    }

    /// Like [`Client::connect`], from the loopback address `from` (one of 127.0.0.0/8): each
    /// source address has its own 28k ephemeral ports, so many sources allow many connections.
    pub async fn connect_from(
        addr: SocketAddr,
        from: Option<std::net::IpAddr>,
        token: &str,
    ) -> anyhow::Result<Client> {
        let stream = match from {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
        };
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        let req = hyper::Request::get(format!("/ws?token={token}"))
            .header("host", addr.to_string())
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())?;
        let mut res = sender.send_request(req).await?;
        if res.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            bail!("refused with {status}: {}", String::from_utf8_lossy(&body));
        }
        let upgraded = hyper::upgrade::on(&mut res).await?;
        let mut client = Client {
            ws: WebSocket::after_handshake(TokioIo::new(upgraded), Role::Client),
        };
        match client.next().await? {
            Incoming::Text(hello) if hello.starts_with(br#"{"type":"hello""#) => Ok(client),
            _ => bail!("no hello"),
        }
    }

    /// The WebSocket, for callers that read frames themselves (no copy per frame).
    pub fn into_inner(self) -> WebSocket<TokioIo<Upgraded>> {
        self.ws
    }

    pub async fn send(&mut self, json: &str) -> anyhow::Result<()> {
        self.ws
            .write_frame(Frame::text(Payload::Borrowed(json.as_bytes())))
            .await
            .context("send")
    }

    /// The next text frame or the close code.
    pub async fn next(&mut self) -> anyhow::Result<Incoming> {
        loop {
            let frame = self.ws.read_frame().await?;
            match frame.opcode {
                OpCode::Text => return Ok(Incoming::Text(frame.payload.to_vec())),
                OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    return Ok(Incoming::Closed(code));
                }
                _ => continue,
            }
        }
    }
}
