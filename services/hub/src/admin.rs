//! `/admin`: what an operator's tool does to a running pool with a token of role `admin`.
//! `GET /admin/revocations` lists the revocations in force; `POST` adds one
//! (`{"sub": "pi-07", "before": <unix s>}` or `{"jti": "…", "expires_at": <unix s>}`), which
//! every hub of the pool applies within `auth.revocation_poll`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hub_protocol::Role;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::info;

use crate::auth::AuthError;
use crate::rejection::{Body, Rejection};
use crate::revocation::{self, RevocationRequest};
use crate::routes::token;
use crate::state::AppState;
use crate::token::unix_now;

/// A revocation request is a few fields.
const MAX_BODY: usize = 16 * 1024;

pub(crate) async fn revocations(
    req: Request<Incoming>,
    state: Arc<AppState>,
) -> Result<Response<Body>, Rejection> {
    let admin = token(&req)
        .ok_or(AuthError::Missing)
        .and_then(|t| state.auth.authenticate(&t))
        .map_err(Rejection::Auth)?;
    if admin.role != Role::Admin {
        return Err(Rejection::Forbidden(format!(
            "`/admin` takes a token of role admin, not {}",
            admin.role.as_str()
        )));
    }
    let store = state.revocations.as_ref().ok_or_else(|| {
        Rejection::Unavailable(
            "this hub keeps no revocations: set auth.revocations_file (embedded broker)".into(),
        )
    })?;
    let unavailable = |e: revocation::RevocationError| Rejection::Unavailable(e.to_string());
    if req.method() == Method::GET {
        let (version, entries) = store.entries().await.map_err(unavailable)?;
        let now = unix_now();
        let live: Vec<_> = entries
            .into_iter()
            .filter(|e| e.expires_at() > now)
            .collect();
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "version": version, "revocations": live }),
        ));
    }
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Rejection::BadRequest(format!("cannot read the body: {e}")))?
        .to_bytes();
    let request: RevocationRequest = serde_json::from_slice(&body)
        .map_err(|e| Rejection::BadRequest(format!("not a revocation request: {e}")))?;
    let now = unix_now();
    let entry = request
        .into_revocation(&state.settings.auth, now)
        .map_err(Rejection::BadRequest)?;
    store.add(&entry, now).await.map_err(unavailable)?;
    info!(by = %admin.sub, ?entry, "revocation added");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "revoked": entry }),
    ))
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = value.to_string();
    body.push('\n');
    let mut r = Response::new(Body::from(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
