//! A minimal client of the hub's protocol for the load generators: connect with a token (the
//! dialing is `hub-client`'s), send frames, read frames.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketRead, WebSocketWrite};
use hub_client::{DialOptions, Dialer, HubSocket};
use hyper_util::rt::TokioIo;
use tokio::io::{BufWriter, ReadHalf, WriteHalf};

pub use hub_client::Received as Incoming;

pub struct Client {
    ws: HubSocket,
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
        from: Option<IpAddr>,
        token: &str,
    ) -> anyhow::Result<Client> {
        let options = DialOptions {
            source: from,
            ..DialOptions::default()
        };
        let connected = Dialer::plain(addr, options)
            .upgrade(&format!("/ws?token={token}"), None)
            .await?;
        let mut client = Client {
            ws: connected.socket,
        };
        match client.next().await? {
            Incoming::Text(hello) if hello.starts_with(br#"{"type":"hello""#) => Ok(client),
            _ => bail!("no hello"),
        }
    }

    /// Connects as a socket.io 4 client over its WebSocket transport, from the loopback address
    /// `from`: Engine.IO's open packet (`0{…}`), then the default namespace (`40` answered by
    /// `40{…}`). Events are then text frames `42["name",payload]`, and the server's Engine.IO
    /// pings (`2`) want a pong (`3`).
    pub async fn connect_socketio_from(
        addr: SocketAddr,
        from: Option<IpAddr>,
    ) -> anyhow::Result<Client> {
        let options = DialOptions {
            source: from,
            ..DialOptions::default()
        };
        let connected = Dialer::plain(addr, options)
            .upgrade("/socket.io/?EIO=4&transport=websocket", None)
            .await?;
        let mut client = Client {
            ws: connected.socket,
        };
        match client.next().await? {
            Incoming::Text(open) if open.starts_with(b"0{") => {}
            _ => bail!("no Engine.IO open packet"),
        }
        client.send("40").await?;
        match client.next().await? {
            Incoming::Text(connect) if connect.starts_with(b"40") => Ok(client),
            _ => bail!("socket.io did not connect the default namespace"),
        }
    }

    /// The WebSocket, for callers that read frames themselves (no copy per frame).
    pub fn into_inner(self) -> HubSocket {
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
        Ok(hub_client::receive(&mut self.ws).await?)
    }
}

type Io = TokioIo<hyper::upgrade::Upgraded>;

/// An agent's connection that sends a window of publishes in one write, as the edge agent does:
/// the hub stores what arrives together as one publication.
pub struct Publisher {
    read: WebSocketRead<ReadHalf<Io>>,
    write: WebSocketWrite<BufWriter<WriteHalf<Io>>>,
}

impl Publisher {
    pub fn new(client: Client) -> Publisher {
        let (mut read, write) = client.ws.split(|stream| {
            let (read, write) = tokio::io::split(stream);
            (read, BufWriter::with_capacity(64 * 1024, write))
        });
        read.set_auto_pong(false);
        Publisher { read, write }
    }

    /// Sends `texts` as text frames in one write.
    pub async fn send_together(&mut self, texts: &[String]) -> anyhow::Result<()> {
        for text in texts {
            self.write
                .write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
                .await
                .context("send")?;
        }
        self.write.flush().await.context("send")
    }

    /// The next text frame or the close code; pings are answered on the way.
    pub async fn next(&mut self) -> anyhow::Result<Incoming> {
        let mut nothing = |_: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
        loop {
            let frame = self.read.read_frame(&mut nothing).await.context("read")?;
            if frame.opcode == OpCode::Ping {
                let pong = Frame::pong(Payload::Owned(frame.payload.to_vec()));
                self.write.write_frame(pong).await.context("pong")?;
                self.write.flush().await.context("pong")?;
                continue;
            }
            if let Some(received) = Incoming::from_frame(&frame) {
                return Ok(received);
            }
        }
    }
}
