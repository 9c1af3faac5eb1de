//! Token verification: every WebSocket upgrade is authenticated before it is accepted, with
//! the single configured key or, by the token's `kid`, a key of the JWKS file ([`keys`]).

use std::sync::Arc;

use hub_protocol::channel::is_valid_segment;
use hub_protocol::{ChannelPattern, Claims, Role};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::watch;

use crate::config::{AuthSettings, ConfigError};

pub mod keys;

use keys::{KeySet, VerifyingKey};

use crate::live_tokens::Lists;
use crate::revocation::{RevocationList, TokenFacts};

/// Why a token was refused. Each variant's snake_case name is a metric label and the `error` of
/// the HTTP body.
#[derive(
    Debug, Clone, PartialEq, Eq, thiserror::Error, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <jwt>` or the `token` query parameter")]
    Missing,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm is not accepted by this hub")]
    WrongAlgorithm,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("role `{0}` may not connect")]
    RoleForbidden(String),
    #[error("token has been revoked; a newly provisioned one is needed")]
    Revoked,
}

impl AuthError {
    /// Every [`reason`](AuthError::reason), in declaration order.
    pub const REASONS: &'static [&'static str] = <AuthError as strum::VariantNames>::VARIANTS;

    pub fn reason(&self) -> &'static str {
        self.into()
    }
}

/// Who a connection is, from a verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub sub: String,
    pub role: Role,
    pub groups: Vec<String>,
    /// Channels a viewer may subscribe to; `None`: any.
    pub channels: Option<Arc<[ChannelPattern]>>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    /// The JWKS key that verified the token; `None`: the single configured key did.
    pub kid: Option<Arc<str>>,
    /// `iat` and `jti`, which revocations match.
    pub iat: Option<u64>,
    pub jti: Option<Arc<str>>,
}

impl Identity {
    /// What a revocation looks at.
    pub fn facts(&self) -> TokenFacts<'_> {
        TokenFacts {
            sub: &self.sub,
            iat: self.iat,
            jti: self.jti.as_deref(),
        }
    }
}

impl Identity {
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.role == Role::Viewer
            && self
                .channels
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p.matches(channel)))
    }
}

pub struct Authenticator {
    /// The key for tokens without a `kid`: `auth.hs256_secret` or `auth.public_key_file`.
    single: Option<Arc<VerifyingKey>>,
    /// `auth.jwks_file`'s keys, for tokens with a `kid`; `None` without a file, and then a
    /// token's `kid` is not looked at.
    set: Option<Arc<watch::Sender<Arc<KeySet>>>>,
    /// The file's bytes the set was made of: a reload compares against them, so a change made
    /// between this and the watcher's start is not taken for the loaded set.
    set_bytes: Vec<u8>,
    /// The claim checks every key applies (its own algorithm aside), kept for reloads.
    checks: Validation,
    viewer_default: Option<Arc<[ChannelPattern]>>,
    /// The pool's revocations in force, kept current by `revocation::follow`.
    revocations: Arc<watch::Sender<Arc<RevocationList>>>,
    require_iat: bool,
    max_lifetime: u64,
}

impl Authenticator {
    pub fn from_settings(auth: &AuthSettings) -> Result<Self, ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid { key, message };
        let checks = claim_checks(auth);
        let single = match (&auth.hs256_secret, &auth.public_key_file) {
            (Some(secret), _) => Some(Arc::new(VerifyingKey::new(
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
                &checks,
            ))),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    invalid("auth.public_key_file", format!("{}: {e}", path.display()))
                })?;
                Some(Arc::new(if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    VerifyingKey::new(Algorithm::ES256, key, &checks)
                } else {
                    let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                        invalid(
                            "auth.public_key_file",
                            format!("not an RSA or EC public key in PEM: {e}"),
                        )
                    })?;
                    VerifyingKey::new(Algorithm::RS256, key, &checks)
                }))
            }
            (None, None) => None,
        };
        let (set, set_bytes) = match &auth.jwks_file {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| invalid("auth.jwks_file", format!("{}: {e}", path.display())))?;
                let set = KeySet::parse(&bytes, &checks)
                    .map_err(|e| invalid("auth.jwks_file", e.to_string()))?;
                (Some(Arc::new(watch::Sender::new(Arc::new(set)))), bytes)
            }
            None => (None, Vec::new()),
        };
        if single.is_none() && set.is_none() {
            return Err(invalid("auth.hs256_secret", "no key configured".into()));
        }
        let viewer_default = match &auth.viewer_channels {
            Some(list) => {
                Some(parse_patterns(list).map_err(|e| invalid("auth.viewer_channels", e))?)
            }
            None => None,
        };
        Ok(Authenticator {
            single,
            set,
            set_bytes,
            checks,
            viewer_default,
            revocations: Arc::new(watch::Sender::new(Arc::default())),
            require_iat: auth.require_iat,
            max_lifetime: auth.max_token_lifetime.as_secs(),
        })
    }

    /// The JWKS file's keys as they are now, and every later set; `None` without a file.
    pub fn key_set(&self) -> Option<watch::Receiver<Arc<KeySet>>> {
        self.set.as_ref().map(|s| s.subscribe())
    }

    /// What [`keys::watch_file`] needs to replace the set; `None` without a file.
    pub fn reloader(
        &self,
        auth: &AuthSettings,
    ) -> Option<(keys::Reload, Arc<watch::Sender<Arc<KeySet>>>)> {
        let (path, set) = auth.jwks_file.clone().zip(self.set.clone())?;
        let reload = keys::Reload {
            path,
            poll: auth.jwks_poll,
            checks: self.checks.clone(),
            loaded: self.set_bytes.clone(),
        };
        Some((reload, set))
    }

    /// The lists a live token is checked against: the revocations, and with `close_on_removal`
    /// the key set.
    pub fn lists(&self, close_on_removal: bool) -> Lists {
        Lists {
            revocations: self.revocations.subscribe(),
            keys: self.key_set().filter(|_| close_on_removal),
        }
    }

    /// Where the revocations in force are kept: `revocation::follow` writes, connections watch.
    pub fn revocations(&self) -> &Arc<watch::Sender<Arc<RevocationList>>> {
        &self.revocations
    }

    /// The key a token's `kid` picks from the set, with the set's copy of the `kid`; without a
    /// set or a `kid`, the single key.
    fn key_for(
        &self,
        kid: Option<&str>,
    ) -> Result<(Arc<VerifyingKey>, Option<Arc<str>>), AuthError> {
        match (kid, &self.set) {
            (Some(kid), Some(set)) => set
                .borrow()
                .get(kid)
                .map(|(kid, key)| (key.clone(), Some(kid.clone())))
                // Removed, never added, or another issuer's: the hub cannot verify it.
                .ok_or(AuthError::BadSignature),
            _ => self
                .single
                .clone()
                .map(|key| (key, None))
                .ok_or(AuthError::BadSignature),
        }
    }

    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| map_error(e.kind()))?;
        let (key, kid) = self.key_for(header.kid.as_deref())?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| map_error(e.kind()))?
            .claims;
        let role = Role::parse(&claims.role)
            .ok_or_else(|| AuthError::RoleForbidden(claims.role.clone()))?;
        let groups = claims.groups.unwrap_or_default();
        match role {
            Role::Agent => {
                if !is_valid_segment(&claims.sub) {
                    return Err(AuthError::InvalidClaims(format!(
                        "agent sub `{}` is not a valid device id (A-Z a-z 0-9 _ - :)",
                        claims.sub
                    )));
                }
                if let Some(g) = groups.iter().find(|g| !is_valid_segment(g)) {
                    return Err(AuthError::InvalidClaims(format!(
                        "group `{g}` is not a valid channel segment"
                    )));
                }
            }
            Role::Viewer | Role::Admin => {
                if claims.sub.is_empty() {
                    return Err(AuthError::InvalidClaims("empty sub".into()));
                }
            }
        }
        let now = crate::token::unix_now();
        match claims.iat {
            None if self.require_iat => {
                return Err(AuthError::InvalidClaims(
                    "missing `iat` (auth.require_iat): a token must say when it was issued to be revocable"
                        .into(),
                ));
            }
            // No token outlives the revocation entries that may void it, and none is dated
            // after them: a revocation voids what was issued before it.
            Some(iat) if iat > now.saturating_add(self.checks.leeway) => {
                return Err(AuthError::InvalidClaims(format!(
                    "`iat` {iat} is in the future (now {now})"
                )));
            }
            Some(iat) if claims.exp.saturating_sub(iat) > self.max_lifetime => {
                return Err(AuthError::InvalidClaims(format!(
                    "lives {} s from `iat` to `exp`, longer than auth.max_token_lifetime ({} s)",
                    claims.exp.saturating_sub(iat),
                    self.max_lifetime
                )));
            }
            // Undated: it may live at most the lifetime from now, so an entry that voids it
            // outlasts it too.
            None if claims.exp.saturating_sub(now) > self.max_lifetime => {
                return Err(AuthError::InvalidClaims(format!(
                    "has no `iat` and expires in {} s, past auth.max_token_lifetime ({} s)",
                    claims.exp.saturating_sub(now),
                    self.max_lifetime
                )));
            }
            _ => {}
        }
        let channels = match claims.channels {
            Some(list) => Some(parse_patterns(&list).map_err(AuthError::InvalidClaims)?),
            None => self.viewer_default.clone(),
        };
        let identity = Identity {
            sub: claims.sub,
            role,
            groups,
            channels,
            expires_at: claims.exp,
            kid,
            iat: claims.iat,
            jti: claims.jti.map(Arc::from),
        };
        if self.revocations.borrow().voids(identity.facts(), now) {
            return Err(AuthError::Revoked);
        }
        Ok(identity)
    }
}

/// The claim checks of every token, whichever key verifies it.
fn claim_checks(auth: &AuthSettings) -> Validation {
    let mut validation = Validation {
        leeway: auth.leeway.as_secs(),
        validate_nbf: true,
        ..Validation::default()
    };
    // jsonwebtoken checks `iss` and `aud` only when present unless they are required.
    let mut required = vec!["exp", "sub"];
    match &auth.audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    if let Some(iss) = &auth.issuer {
        validation.set_issuer(&[iss]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn parse_patterns(list: &[String]) -> Result<Arc<[ChannelPattern]>, String> {
    list.iter()
        .map(|p| ChannelPattern::parse(p).map_err(|e| format!("channel pattern `{p}`: {e}")))
        .collect()
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::InvalidClaims(format!("missing `{c}`")),
        ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidClaims(format!("bad `{c}`")),
        ErrorKind::Json(e) => AuthError::InvalidClaims(e.to_string()),
        _ => AuthError::Malformed,
    }
}
