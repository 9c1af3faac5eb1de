//! Dialing the hub: TCP, TLS for `wss://`, then the WebSocket upgrade over hyper.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::tls::{TlsSetupError, client_config};

pub type HubSocket = WebSocket<TokioIo<Upgraded>>;

/// The most of a refused upgrade's body that is read.
const MAX_REFUSAL_BODY: usize = 16 * 1024;

/// A dialer that cannot be made from its URL and options.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Url(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {host}:{port}: {source}")]
    Dial {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the hub refused the connection: HTTP {status} {body}")]
    Refused { status: u16, body: String },
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
}

impl ConnectError {
    /// The hub is draining for shutdown (503 `draining`): another hub takes the connection at
    /// once.
    pub fn is_draining(&self) -> bool {
        matches!(self, ConnectError::Refused { status: 503, body } if body.contains("\"draining\""))
    }

    /// The token itself was refused (401/403): retrying with the same token cannot succeed.
    pub fn is_auth_refusal(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused {
                status: 401 | 403,
                ..
            }
        )
    }
}

/// How to dial, besides where.
#[derive(Debug, Clone, Default)]
pub struct DialOptions {
    /// For `wss://`: trust only the CA certificates in this PEM file instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A bound on TCP connect, TLS and upgrade together; `None`: none.
    pub timeout: Option<Duration>,
    /// The local address to connect from: each loopback source address has its own ephemeral
    /// ports, so a load generator on 127.0.0.0/8 can open more connections than one allows.
    pub source: Option<IpAddr>,
    /// `SO_RCVBUF` of the socket: a small one makes a client that stops reading stall the hub's
    /// writes after a few kilobytes.
    pub recv_buffer: Option<u32>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
}

/// A successful upgrade.
pub struct Connected {
    pub socket: HubSocket,
    /// The hub node that answered (`X-Hub-Node`).
    pub node: Option<String>,
}

/// Where and how to connect, parsed once from a `ws://` or `wss://` URL.
#[derive(Clone)]
pub struct Dialer {
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    options: DialOptions,
}

impl Dialer {
    pub fn new(url: &str, options: DialOptions) -> Result<Dialer, DialError> {
        let bad = |why: &str| DialError::Url(format!("{url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("not ws:// or wss://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let config = client_config(options.ca_file.as_deref())?;
            Some(TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Dialer {
            uri,
            host,
            port,
            tls,
            options,
        })
    }

    /// A dialer for `ws://addr/ws`, as tests and load generators on loopback use.
    pub fn plain(addr: SocketAddr, options: DialOptions) -> Dialer {
        Dialer {
            uri: Uri::from_static("/ws"),
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: None,
            options,
        }
    }

    /// Connects to the URL's path with `Authorization: Bearer <token>`.
    pub async fn connect(&self, token: &str) -> Result<Connected, ConnectError> {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        self.upgrade(path, Some(&format!("Bearer {token}"))).await
    }

    /// Connects and upgrades at `path_and_query` (a token may ride in the query), with the
    /// `Authorization` header set to `authorization` as given, if any.
    pub async fn upgrade(
        &self,
        path_and_query: &str,
        authorization: Option<&str>,
    ) -> Result<Connected, ConnectError> {
        let attempt = self.attempt(path_and_query, authorization);
        match self.options.timeout {
            None => attempt.await,
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .map_err(|_| ConnectError::Timeout(limit))?,
        }
    }

    async fn attempt(
        &self,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<Connected, ConnectError> {
        let tcp = self.tcp().await.map_err(|source| ConnectError::Dial {
            host: self.host.clone(),
            port: self.port,
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return self.handshake(tcp, path, authorization).await;
        };
        let tls_error = |source| ConnectError::Tls {
            host: self.host.clone(),
            source,
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| tls_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let stream = tls.connect(name, tcp).await.map_err(tls_error)?;
        self.handshake(stream, path, authorization).await
    }

    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let (source, recv_buffer) = (self.options.source, self.options.recv_buffer);
        if source.is_none() && recv_buffer.is_none() {
            return TcpStream::connect((self.host.as_str(), self.port)).await;
        }
        let mut last = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            // A source address can only reach addresses of its own family.
            if source.is_some_and(|ip| ip.is_ipv4() != addr.is_ipv4()) {
                continue;
            }
            let attempt = async {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(size) = recv_buffer {
                    socket.set_recv_buffer_size(size)?;
                }
                if let Some(ip) = source {
                    socket.bind(SocketAddr::new(ip, 0))?;
                }
                socket.connect(addr).await
            };
            match attempt.await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address of the source's family")))
    }

    async fn handshake<S>(
        &self,
        stream: S,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<Connected, ConnectError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let failed = |e: &dyn std::fmt::Display| ConnectError::Handshake(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(&e))?;
        tokio::spawn(async move {
            // Ends when the connection is upgraded or dropped; errors surface on the request.
            let _ = conn.with_upgrades().await;
        });
        let authority = match self.uri.authority() {
            Some(a) => a.to_string(),
            None => SocketAddr::new(
                self.host.parse().unwrap_or(IpAddr::from([127, 0, 0, 1])),
                self.port,
            )
            .to_string(),
        };
        let mut request = hyper::Request::get(path)
            .header("host", authority)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13");
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        if let Some(agent) = &self.options.user_agent {
            request = request.header("user-agent", agent.as_str());
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(&e))?;
        let mut response = sender.send_request(request).await.map_err(|e| failed(&e))?;
        let status = response.status().as_u16();
        if status != 101 {
            // The hub's refusals are one line of JSON; whatever else answers is not read whole.
            let body = Limited::new(response.into_body(), MAX_REFUSAL_BODY)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(ConnectError::Refused { status, body });
        }
        let node = response
            .headers()
            .get("x-hub-node")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| failed(&e))?;
        let socket = WebSocket::after_handshake(TokioIo::new(upgraded), Role::Client);
        Ok(Connected { socket, node })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_other_than_ws_and_wss_are_refused_with_the_reason() {
        let err = |url| match Dialer::new(url, DialOptions::default()) {
            Err(DialError::Url(why)) => why,
            Err(other) => panic!("{url}: {other}"),
            Ok(_) => panic!("{url} accepted"),
        };
        assert!(err("http://hub/ws").contains("not ws:// or wss://"));
        assert!(err("ws:///ws").contains("no host") || err("ws:///ws").contains("invalid"));
        let ok = Dialer::new("ws://[::1]:9000/ws?x=1", DialOptions::default()).unwrap();
        assert_eq!((ok.host.as_str(), ok.port), ("::1", 9000));
        let secure = Dialer::new("wss://hub.example.com/ws", DialOptions::default()).unwrap();
        assert_eq!(secure.port, 443);
    }

    #[test]
    fn a_draining_refusal_is_told_apart_from_a_full_hub() {
        let refused = |status, error: &str| ConnectError::Refused {
            status,
            body: format!(r#"{{"error":"{error}","message":"…"}}"#),
        };
        assert!(refused(503, "draining").is_draining());
        assert!(!refused(503, "max_connections").is_draining());
        assert!(refused(401, "expired").is_auth_refusal());
        assert!(!refused(429, "connect_rate").is_auth_refusal());
    }

    #[tokio::test]
    async fn nothing_listening_is_a_dial_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dialer = Dialer::plain(addr, DialOptions::default());
        match dialer.connect("t").await {
            Err(ConnectError::Dial { port, .. }) => assert_eq!(port, addr.port()),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("connected to nothing"),
        }
    }
}
