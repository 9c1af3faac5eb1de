//! Every way the HTTP side says no, mapped to its response in one place.
//!
//! A refusal is one line of JSON, `{"error": code, "message": …}`, where `code` is the snake_case
//! name docs/protocol.md lists; refusals a client should retry carry `Retry-After`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::auth::AuthError;
use crate::limits::Refusal;

pub(crate) type Body = Full<Bytes>;

/// Why a request was not served.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// No such endpoint.
    NotFound,
    /// A plain HTTP request on `/ws`: with a good token (or none) it says so.
    UpgradeRequired,
    /// The token does not verify or grants no access.
    Auth(AuthError),
    /// Admission control turned the upgrade away: retry later.
    Refused(Refusal),
    /// The upgrade request is not a valid WebSocket handshake.
    BadUpgrade(String),
    /// A verified token whose role may not do this (an admin endpoint without `admin`).
    Forbidden(String),
    /// A request body the endpoint cannot take.
    BadRequest(String),
    /// The hub cannot do it now, or is not set up for it.
    Unavailable(String),
}

impl Rejection {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Rejection::NotFound => json(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
            Rejection::UpgradeRequired => json(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "this endpoint speaks WebSocket only",
            ),
            Rejection::Auth(e) => {
                let status = match e {
                    AuthError::RoleForbidden(_) => StatusCode::FORBIDDEN,
                    _ => StatusCode::UNAUTHORIZED,
                };
                json(status, e.reason(), &e.to_string())
            }
            Rejection::Refused(refusal) => {
                let (status, message) = match refusal {
                    Refusal::Draining => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "hub is shutting down; reconnect",
                    ),
                    Refusal::MaxConnections => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this hub is full; retry with backoff",
                    ),
                    Refusal::ConnectRate => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many new connections; retry with backoff",
                    ),
                    Refusal::RevocationsUnknown => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this hub has not read the revocation list yet; retry with backoff",
                    ),
                    Refusal::IdentityConnections => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "this identity holds as many connections as it may; close one or retry later",
                    ),
                };
                let mut r = json(status, refusal.reason(), message);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Rejection::BadUpgrade(why) => json(StatusCode::BAD_REQUEST, "bad_upgrade", &why),
            Rejection::Forbidden(why) => json(StatusCode::FORBIDDEN, "forbidden", &why),
            Rejection::BadRequest(why) => json(StatusCode::BAD_REQUEST, "bad_request", &why),
            Rejection::Unavailable(why) => {
                json(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &why)
            }
        }
    }
}

fn json(status: StatusCode, code: &str, message: &str) -> Response<Body> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(r: Rejection) -> (u16, Option<String>, serde_json::Value) {
        let response = r.into_response();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let status = response.status().as_u16();
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            response.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn a_refusal_names_its_reason_and_says_when_to_retry() {
        let (status, retry, body) = parts(Rejection::Refused(Refusal::ConnectRate));
        assert_eq!((status, retry.as_deref()), (429, Some("1")));
        assert_eq!(body["error"], "connect_rate");
        let (status, retry, body) = parts(Rejection::Refused(Refusal::Draining));
        assert_eq!((status, retry.as_deref()), (503, Some("1")));
        assert_eq!(body["error"], "draining");
    }

    #[test]
    fn a_token_that_grants_nothing_is_403_and_one_that_proves_nothing_401() {
        let (status, retry, body) = parts(Rejection::Auth(AuthError::RoleForbidden("x".into())));
        assert_eq!((status, retry), (403, None));
        assert_eq!(body["error"], "role_forbidden");
        let (status, _, body) = parts(Rejection::Auth(AuthError::Expired));
        assert_eq!(status, 401);
        assert_eq!(body["error"], "expired");
        assert_eq!(body["message"], "token has expired");
    }
}
