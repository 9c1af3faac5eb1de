//! Dialling the hub: TCP, TLS for `wss://` (rustls with the system roots or a configured CA),
//! then the WebSocket handshake over hyper with the token in `Authorization`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use http_body_util::{BodyExt, Empty};
use hyper::Uri;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

pub type HubSocket = WebSocket<TokioIo<Upgraded>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("hub.url {0}")]
    Url(String),
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
    /// The token itself was refused: retrying with the same token cannot succeed.
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

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("CA file {0} holds no usable certificate")]
    NoCertificate(String),
    #[error("TLS setup: {0}")]
    Rustls(rustls::Error),
}

/// Where and how to connect, parsed once from `hub.url`.
#[derive(Clone)]
pub struct Dialer {
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    timeout: Duration,
}

impl Dialer {
    pub fn new(url: &str, ca_file: Option<&Path>, timeout: Duration) -> anyhow::Result<Dialer> {
        let uri: Uri = url
            .parse()
            .map_err(|e| ConnectError::Url(format!("{url:?}: {e}")))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(ConnectError::Url(format!("{url:?}: not ws:// or wss://")).into()),
        };
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::Url(format!("{url:?}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            Some(TlsConnector::from(Arc::new(tls_config(ca_file)?)))
        } else {
            None
        };
        Ok(Dialer {
            uri,
            host,
            port,
            tls,
            timeout,
        })
    }

    /// Connects and upgrades; returns the socket and the hub node that answered.
    pub async fn connect(&self, token: &str) -> Result<(HubSocket, Option<String>), ConnectError> {
        tokio::time::timeout(self.timeout, self.connect_inner(token))
            .await
            .map_err(|_| ConnectError::Timeout(self.timeout))?
    }

    async fn connect_inner(
        &self,
        token: &str,
    ) -> Result<(HubSocket, Option<String>), ConnectError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Dial {
                host: self.host.clone(),
                port: self.port,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(tcp, token).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| ConnectError::Url(format!("host {}: {e}", self.host)))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|source| ConnectError::Tls {
                        host: self.host.clone(),
                        source,
                    })?;
                self.handshake(stream, token).await
            }
        }
    }

    async fn handshake<S>(
        &self,
        stream: S,
        token: &str,
    ) -> Result<(HubSocket, Option<String>), ConnectError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let handshake_error = |e: &dyn std::fmt::Display| ConnectError::Handshake(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| handshake_error(&e))?;
        tokio::spawn(async move {
            // Ends when the connection is upgraded or dropped; errors surface on the request.
            let _ = conn.with_upgrades().await;
        });
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let authority = self
            .uri
            .authority()
            .map_or(self.host.clone(), |a| a.to_string());
        let request = hyper::Request::get(path)
            .header("host", authority)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13")
            .header("authorization", format!("Bearer {token}"))
            .header(
                "user-agent",
                concat!("edge-agent/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| handshake_error(&e))?;
        let mut response = sender
            .send_request(request)
            .await
            .map_err(|e| handshake_error(&e))?;
        let status = response.status().as_u16();
        if status != 101 {
            let body = response
                .into_body()
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
            .map_err(|e| handshake_error(&e))?;
        let mut ws = WebSocket::after_handshake(TokioIo::new(upgraded), Role::Client);
        ws.set_auto_pong(true);
        ws.set_auto_close(true);
        Ok((ws, node))
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TlsSetupError::CaFile {
                path: shown.clone(),
                source,
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem).flatten();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsSetupError::NoCertificate(shown));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "skipping a system CA certificate");
            }
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
