//! The HTTP side: the accept loop, routes, the WebSocket upgrade and the drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use observability::{RootSampler, in_span};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::Empty;
use tracing::{Span, info, info_span, warn};

use crate::assets;
use crate::auth::{AUTH_FAILURE_REASONS, AuthError, Authenticator};
use crate::broker::{Broker, MemoryBroker, RedisBroker};
use crate::config::{ConfigError, Settings};
use crate::connection;
use crate::limits::{ConnectionGate, IdentityLimits, Refusal};
use crate::metrics::Metrics;
use crate::outbox::DISCONNECT_REASONS;

/// Everything a request or connection handler needs, shared by all of them.
pub struct AppState {
    pub settings: Settings,
    pub node_id: String,
    pub auth: Authenticator,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub gate: Arc<ConnectionGate>,
    /// Cancelled when the drain starts: every connection closes with 1012.
    pub shutdown: CancellationToken,
    /// Which new traces start here; off when spans are not exported, and then the
    /// per-connection and per-publication spans are not even built.
    pub roots: RootSampler,
    draining: AtomicBool,
    connections: TaskTracker,
    next_id: AtomicU64,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.broker.is_ready()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A span that starts a trace, built only if this trace is sampled; else a disabled span
    /// that costs nothing.
    pub fn root_span(&self, make: impl FnOnce() -> Span) -> Span {
        if self.roots.sample() {
            make()
        } else {
            Span::none()
        }
    }

    /// A span inside the current one, built only if that one is.
    pub fn child_span(&self, make: impl FnOnce() -> Span) -> Span {
        if self.roots.enabled() && !Span::current().is_disabled() {
            make()
        } else {
            Span::none()
        }
    }

    /// A span for a trace sampled elsewhere (its parent comes from a `traceparent`): built
    /// whenever spans are exported.
    pub fn remote_child_span(&self, make: impl FnOnce() -> Span) -> Span {
        if self.roots.enabled() {
            make()
        } else {
            Span::none()
        }
    }
}

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

type Body = Full<Bytes>;

impl Server {
    /// Builds the hub from `settings` and binds its listener; nothing goes to OpenTelemetry.
    pub async fn bind(settings: Settings) -> Result<Server, ServerError> {
        Self::bind_with(settings, OtelExport::default()).await
    }

    /// As [`Server::bind`], reporting to OpenTelemetry as `export` says.
    pub async fn bind_with(settings: Settings, export: OtelExport) -> Result<Server, ServerError> {
        let metrics = Arc::new(Metrics::new(DISCONNECT_REASONS, AUTH_FAILURE_REASONS));
        if let Some(meter) = &export.meter {
            crate::metrics::observe_with(meter, metrics.clone());
        }
        let auth = Authenticator::from_settings(&settings.auth)?;
        let broker: Arc<dyn Broker> = match &settings.broker.url {
            Some(url) => Arc::new(RedisBroker::new(
                &settings,
                url,
                metrics.clone(),
                export.roots.enabled(),
            )?),
            None => Arc::new(MemoryBroker::new(
                settings.history.clone(),
                settings.limits.max_channels,
                metrics.clone(),
            )),
        };
        let listener =
            listen(settings.listen).map_err(|e| ServerError::Bind(settings.listen, e))?;
        let limits = &settings.limits;
        let gate = ConnectionGate::new(
            limits.max_connections,
            limits.connect_rate,
            limits.connect_burst,
            IdentityLimits {
                agent_connections: limits.max_connections_per_agent,
                viewer_connections: limits.max_connections_per_viewer,
                publish_rate: limits.publish_rate,
                publish_burst: limits.publish_burst,
            },
        );
        let state = Arc::new(AppState {
            node_id: settings.resolved_node_id(),
            auth,
            broker,
            metrics,
            gate,
            shutdown: CancellationToken::new(),
            roots: export.roots,
            draining: AtomicBool::new(false),
            connections: TaskTracker::new(),
            next_id: AtomicU64::new(1),
            settings,
        });
        Ok(Server { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `signal` resolves, then drains: readiness off, new upgrades refused (probes
    /// still answered), every client closed with 1012, and returns once they are gone or the
    /// drain timeout has passed.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let Server { listener, state } = self;
        if let Ok(addr) = listener.local_addr() {
            info!(node = %state.node_id, %addr, "hub listening");
        }
        if state.settings.demo.devices > 0 {
            let demo = &state.settings.demo;
            tokio::spawn(crate::demo::run(state.clone(), demo.devices, demo.interval));
        }
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                accepted = listener.accept() => accept(accepted, &state).await,
            }
        }

        state.draining.store(true, Ordering::Release);
        let open = state.connections.len();
        info!(open, "draining: closing every connection with 1012");
        state.shutdown.cancel();
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
        info!("hub stopped");
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
        async move { Ok::<_, Infallible>(route(req, &state)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let _ = conn.await;
}

fn route(req: Request<Incoming>, state: &Arc<AppState>) -> Response<Body> {
    let mut response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(req, state),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if state.is_ready() => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (&Method::GET, "/metrics") => {
            state.metrics.ready.set(i64::from(state.is_ready()));
            let mut r = Response::new(Body::from(state.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, path) => match assets::get(path) {
            Some((content_type, bytes)) => asset(content_type, bytes),
            None => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        },
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    if let Ok(node) = HeaderValue::from_str(&state.node_id) {
        response.headers_mut().insert("x-hub-node", node);
    }
    response
}

fn upgrade(req: Request<Incoming>, state: &Arc<AppState>) -> Response<Body> {
    let span = state.root_span(|| {
        info_span!(
            parent: None,
            "ws.upgrade",
            auth = Empty,
            role = Empty,
            sub = Empty,
            http.response.status_code = Empty,
        )
    });
    let response = span.in_scope(|| admit(req, state, &span));
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The upgrade's checks in order: draining, WebSocket, connection cap, token, the identity's
/// share, connect rate.
fn admit(mut req: Request<Incoming>, state: &Arc<AppState>, span: &Span) -> Response<Body> {
    let metrics = &state.metrics;
    if state.draining.load(Ordering::Acquire) {
        metrics.refused.inc("draining");
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "hub is shutting down; reconnect",
        );
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        // A browser cannot see why an upgrade failed; a plain GET with the token tells it
        // whether the token is the problem (401/403) or not (426).
        if let Some(Err(e)) = token(&req).map(|t| state.auth.authenticate(&t)) {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return json_error(status, e.reason(), &e.to_string());
        }
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only",
        );
    }
    let slot = match state.gate.reserve() {
        Ok(slot) => slot,
        Err(refusal) => return refuse(state, refusal),
    };
    // The token before the connect rate: a flood of upgrades without a valid token must not use
    // up the budget that devices reconnecting after an outage need.
    let identity = match token(&req)
        .ok_or(AuthError::Missing)
        .and_then(|t| state.auth.authenticate(&t))
    {
        Ok(identity) => identity,
        Err(e) => {
            metrics.auth_failures.inc(e.reason());
            span.record("auth", e.reason());
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return json_error(status, e.reason(), &e.to_string());
        }
    };
    let permit = match state.gate.admit(slot, identity.role, &identity.sub) {
        Ok(permit) => permit,
        Err(refusal) => return refuse(state, refusal),
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(parts) => parts,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string()),
    };
    span.record("auth", "ok");
    span.record("role", identity.role.as_str());
    span.record("sub", identity.sub.as_str());
    let connection_span = state.child_span(|| {
        info_span!(
            parent: span,
            "connection",
            role = identity.role.as_str(),
            sub = %identity.sub,
            close.reason = Empty,
            close.code = Empty,
        )
    });
    let serve = connection::serve(upgrade, identity, state.clone(), permit);
    state.connections.spawn(in_span(connection_span, serve));
    response.map(|_| Body::default())
}

/// An upgrade turned away by admission control.
fn refuse(state: &AppState, refusal: Refusal) -> Response<Body> {
    state.metrics.refused.inc(refusal.reason());
    let (status, message) = match refusal {
        Refusal::MaxConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "this hub is full; retry with backoff",
        ),
        Refusal::ConnectRate => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections; retry with backoff",
        ),
        Refusal::IdentityConnections => (
            StatusCode::TOO_MANY_REQUESTS,
            "this identity holds as many connections as it may; close one or retry later",
        ),
    };
    retry_later(status, refusal.reason(), message)
}

/// The token from `Authorization: Bearer …`, else from the `token` query parameter.
fn token(req: &Request<Incoming>) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response<Body> {
    let mut r = Response::new(Body::from(Bytes::from_static(bytes)));
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small files that change with the binary: always revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
             style-src 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// One line of JSON: `{"error": code, "message": …}`.
fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut body = serde_json::json!({ "error": code, "message": message }).to_string();
    body.push('\n');
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn retry_later(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut r = json_error(status, code, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}
