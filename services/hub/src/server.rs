//! The composition root and the accept loop: builds the hub's [`AppState`] from the settings,
//! accepts connections, hands each request to [`routes`](crate::routes), and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hub_protocol::CloseCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use observability::RootSampler;

use crate::auth::AuthError;
use crate::config::{ConfigError, Settings};
use crate::limits::Refusal;
use crate::metrics::{self, Labels, Metrics};
use crate::outbox::CloseReason;
use crate::routes;
use crate::state::AppState;

/// What `observability::init` turned on, for the hub to use.
#[derive(Default)]
pub struct OtelExport {
    pub roots: RootSampler,
    /// Set when metrics go over OTLP too: the hub's metrics are observed through it.
    pub meter: Option<opentelemetry::metrics::Meter>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl Server {
    /// Builds the hub from `settings` and binds its listener; nothing goes to OpenTelemetry.
    pub async fn bind(settings: Settings) -> Result<Server, ServerError> {
        Self::bind_with(settings, OtelExport::default()).await
    }

    /// As [`Server::bind`], reporting to OpenTelemetry as `export` says.
    pub async fn bind_with(settings: Settings, export: OtelExport) -> Result<Server, ServerError> {
        let listen_on = settings.listen;
        let metrics = Arc::new(Metrics::new(metric_labels()));
        if let Some(meter) = &export.meter {
            metrics::observe_with(meter, metrics.clone());
        }
        let state = Arc::new(AppState::build(settings, metrics, export.roots)?);
        let listener = listen(listen_on).map_err(|e| ServerError::Bind(listen_on, e))?;
        Ok(Server { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `signal` resolves, then drains: readiness off, new upgrades refused (probes
    /// still answered), every client closed with 1012, and returns once they are gone or the
    /// drain timeout has passed.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let Server { listener, state } = self;
        if let Ok(addr) = listener.local_addr() {
            info!(node = %state.node_id, %addr, "hub listening");
        }
        if let Some(store) = &state.revocations {
            // Upgrades wait for the first read (`Refusal::RevocationsUnknown`): a restarted hub
            // must not let a revoked token in. Tried here first so a healthy start takes none.
            let first = crate::revocation::load(store, state.auth.revocations(), &state.metrics);
            match tokio::time::timeout(state.settings.broker.timeout, first).await {
                Ok(Ok(_)) => state.revocations_loaded.store(true, Ordering::Release),
                Ok(Err(e)) => {
                    warn!(error = %e, "the revocation list cannot be read; upgrades wait for it")
                }
                Err(_) => warn!("the revocation list did not load in time; upgrades wait for it"),
            }
            tokio::spawn(crate::revocation::follow(
                store.clone(),
                state.auth.revocations().clone(),
                state.revocations_loaded.clone(),
                state.settings.auth.revocation_poll,
                state.metrics.clone(),
                state.shutdown.clone(),
            ));
        }
        tokio::spawn(crate::live_tokens::enforce(
            state.live_tokens.clone(),
            state.auth.lists(state.settings.auth.close_on_key_removal),
            state.shutdown.clone(),
        ));
        if let Some((reload, keys)) = state.auth.reloader(&state.settings.auth) {
            tokio::spawn(crate::auth::keys::watch_file(
                reload,
                keys,
                state.metrics.clone(),
                state.shutdown.clone(),
            ));
        }
        if state.settings.demo.devices > 0 {
            let demo = &state.settings.demo;
            // Tracked with the connections: its devices leave presence before the broker's
            // last presence write.
            state.connections.spawn(crate::demo::run(
                state.broker.clone(),
                state.shutdown.clone(),
                demo.devices,
                demo.interval,
            ));
        }
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                accepted = listener.accept() => accept(accepted, &state).await,
            }
        }

        state.start_draining();
        let open = state.connections.len();
        info!(open, "draining: closing every connection with 1012");
        state.shutdown.cancel();
        // Through the registry every connection is in, not a watch in each connection's writer:
        // one fewer future per connection for its whole life.
        state
            .live_tokens
            .close_all(CloseReason::Hub(CloseCode::ServiceRestart));
        state.connections.close();
        let deadline = tokio::time::sleep(state.settings.shutdown.drain_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = state.connections.wait() => break,
                _ = &mut deadline => {
                    warn!(left = state.connections.len(), "drain timeout: exiting with connections open");
                    break;
                }
                accepted = listener.accept() => accept(accepted, &state).await,
            }
        }
        // The agents' connections are closed: their devices leave the pool's presence now,
        // not when this hub's lease runs out.
        state.broker.drained().await;
        info!("hub stopped");
    }
}

/// The label values of the hub's metrics, each list derived from the enum it counts.
pub(crate) fn metric_labels() -> Labels {
    Labels {
        disconnect_reasons: CloseReason::LABELS,
        refusals: Refusal::REASONS,
        auth_failures: AuthError::REASONS,
    }
}

/// A reconnect storm arrives all at once: a deep accept queue (the kernel caps it at
/// `net.core.somaxconn`) holds it instead of dropping SYNs, which clients would only retry
/// after a second. tokio's `bind` uses 1024.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

async fn accept(accepted: std::io::Result<(TcpStream, SocketAddr)>, state: &Arc<AppState>) {
    match accepted {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            if let Some(size) = state.settings.limits.socket_send_buffer {
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(size);
            }
            tokio::spawn(serve_http(stream, state.clone()));
        }
        Err(e) => {
            // Out of file descriptors and the like: back off briefly instead of spinning.
            warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve_http(stream: TcpStream, state: Arc<AppState>) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(routes::route(req, &state).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let _ = conn.await;
}
