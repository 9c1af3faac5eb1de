//! The HTTP routes: `/ws` (the upgrade with its admission checks), the probes, `/metrics` and the
//! dashboard's files. Refusals are [`Rejection`]s, turned into responses in one place.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use observability::in_span;
use tracing::field::Empty;
use tracing::{Span, info_span};

use crate::admin;
use crate::assets;
use crate::auth::AuthError;
use crate::connection;
use crate::limits::Refusal;
use crate::rejection::{Body, Rejection};
use crate::state::AppState;
use hub_protocol::Role;

pub(crate) async fn route(req: Request<Incoming>, state: &Arc<AppState>) -> Response<Body> {
    let mut response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(req, state),
        (&Method::GET | &Method::POST, "/admin/revocations") => {
            admin::revocations(req, state.clone())
                .await
                .unwrap_or_else(Rejection::into_response)
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if state.is_ready() => match state.broker.degraded() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::OK, format!("ready, degraded: {why}\n")),
        },
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
            None => Rejection::NotFound.into_response(),
        },
        _ => Rejection::NotFound.into_response(),
    };
    if let Ok(node) = HeaderValue::from_str(&state.node_id) {
        response.headers_mut().insert("x-hub-node", node);
    }
    response
}

fn upgrade(req: Request<Incoming>, state: &Arc<AppState>) -> Response<Body> {
    let span = state.roots.root_span(|| {
        info_span!(
            parent: None,
            "ws.upgrade",
            auth = Empty,
            role = Empty,
            sub = Empty,
            http.response.status_code = Empty,
        )
    });
    let response = span
        .in_scope(|| admit(req, state, &span))
        .unwrap_or_else(Rejection::into_response);
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The upgrade's checks in order: draining, WebSocket, connection cap, token, the identity's
/// share, connect rate.
fn admit(
    mut req: Request<Incoming>,
    state: &Arc<AppState>,
    span: &Span,
) -> Result<Response<Body>, Rejection> {
    let metrics = &state.metrics;
    let refuse = |refusal: Refusal| {
        metrics.refused.inc(refusal.reason());
        Rejection::Refused(refusal)
    };
    if state.is_draining() {
        return Err(refuse(Refusal::Draining));
    }
    if !state.revocations_known() {
        return Err(refuse(Refusal::RevocationsUnknown));
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        // A browser cannot see why an upgrade failed; a plain GET with the token tells it
        // whether the token is the problem (401/403) or not (426).
        if let Some(Err(e)) = token(&req).map(|t| state.auth.authenticate(&t)) {
            return Err(Rejection::Auth(e));
        }
        return Err(Rejection::UpgradeRequired);
    }
    let slot = state.gate.reserve().map_err(refuse)?;
    // The token before the connect rate: a flood of upgrades without a valid token must not use
    // up the budget that devices reconnecting after an outage need.
    let identity = token(&req)
        .ok_or(AuthError::Missing)
        .and_then(|t| state.auth.authenticate(&t))
        .and_then(|identity| match identity.role {
            Role::Admin => Err(AuthError::RoleForbidden("admin".into())),
            _ => Ok(identity),
        })
        .map_err(|e| {
            metrics.auth_failures.inc(e.reason());
            span.record("auth", e.reason());
            Rejection::Auth(e)
        })?;
    let permit = state
        .gate
        .admit(slot, identity.role, &identity.sub)
        .map_err(refuse)?;
    let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| Rejection::BadUpgrade(e.to_string()))?;
    span.record("auth", "ok");
    span.record("role", identity.role.as_str());
    span.record("sub", identity.sub.as_str());
    let connection_span = state.roots.child_span(|| {
        info_span!(
            parent: span,
            "connection",
            role = identity.role.as_str(),
            sub = %identity.sub,
            close.reason = Empty,
            close.code = Empty,
        )
    });
    let serve = connection::serve(upgrade, Box::new(identity), state.clone(), permit);
    state.connections.spawn(in_span(connection_span, serve));
    Ok(response.map(|_| Body::default()))
}

/// The token from `Authorization: Bearer …`, else from the `token` query parameter.
pub(crate) fn token(req: &Request<Incoming>) -> Option<String> {
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

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
