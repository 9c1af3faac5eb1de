//! Minting tokens from the configured key (`hub token`), for first runs, demos and tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hub_protocol::{Claims, Role};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::config::AuthSettings;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("auth.private_key_file is needed to mint tokens when auth.public_key_file is used")]
    NoPrivateKey,
    #[error("auth.private_key_file: {0}")]
    Key(String),
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// What a new token grants.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub sub: String,
    pub role: Role,
    pub ttl: Duration,
    pub groups: Vec<String>,
    pub channels: Vec<String>,
}

impl TokenRequest {
    pub fn new(sub: impl Into<String>, role: Role) -> Self {
        TokenRequest {
            sub: sub.into(),
            role,
            ttl: Duration::from_secs(3600),
            groups: Vec::new(),
            channels: Vec::new(),
        }
    }

    pub fn claims(&self, auth: &AuthSettings) -> Claims {
        let now = unix_now();
        Claims {
            sub: self.sub.clone(),
            role: self.role.as_str().to_owned(),
            exp: now + self.ttl.as_secs(),
            iat: Some(now),
            nbf: None,
            iss: auth.issuer.clone(),
            aud: auth.audience.clone().map(serde_json::Value::String),
            groups: (!self.groups.is_empty()).then(|| self.groups.clone()),
            channels: (!self.channels.is_empty()).then(|| self.channels.clone()),
        }
    }
}

/// Signs `claims` with the key the hub is configured with.
pub fn sign(auth: &AuthSettings, claims: &Claims) -> Result<String, MintError> {
    let (key, alg) = match (&auth.hs256_secret, &auth.private_key_file) {
        (Some(secret), _) => (
            EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        ),
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| MintError::Key(format!("{}: {e}", path.display())))?;
            match EncodingKey::from_ec_pem(&pem) {
                Ok(key) => (key, Algorithm::ES256),
                Err(_) => (
                    EncodingKey::from_rsa_pem(&pem).map_err(|e| MintError::Key(e.to_string()))?,
                    Algorithm::RS256,
                ),
            }
        }
        (None, None) => return Err(MintError::NoPrivateKey),
    };
    Ok(jsonwebtoken::encode(&Header::new(alg), claims, &key)?)
}

/// Mints a token for `request`.
pub fn mint(auth: &AuthSettings, request: &TokenRequest) -> Result<String, MintError> {
    sign(auth, &request.claims(auth))
}

/// Seconds since the Unix epoch, the unit of `exp`, `iat` and `nbf`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
