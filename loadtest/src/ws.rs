//! A minimal client of the hub's protocol for the load generators: connect with a token (the
//! dialing is `hub-client`'s), send frames, read frames.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use fastwebsockets::{Frame, Payload};
use hub_client::{DialOptions, Dialer, HubSocket};

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
