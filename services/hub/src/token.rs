//! Minting tokens from the configured key (`hub token`), for first runs, demos and tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hub_protocol::{Claims, Role};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};

use crate::auth::keys;
use crate::config::AuthSettings;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("auth.private_key_file is needed to mint tokens when auth.public_key_file is used")]
    NoPrivateKey,
    #[error("auth.private_key_file: {0}")]
    Key(String),
    #[error("auth.jwks_file is the only key source: name the key to sign with (--kid)")]
    KidNeeded,
    #[error("--kid needs auth.jwks_file")]
    NoKeySet,
    #[error("auth.jwks_file: {0}")]
    KeySet(String),
    #[error("auth.jwks_file has no key `{0}`")]
    UnknownKid(String),
    #[error(
        "auth.private_key_file is not the private half of key `{0}`: its tokens would not verify"
    )]
    WrongPrivateKey(String),
    #[error(
        "--ttl {0:?} is longer than auth.max_token_lifetime ({1:?}): hubs would refuse the token"
    )]
    TooLong(Duration, Duration),
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
    /// The JWKS key to sign with; `None`: the single configured key.
    pub kid: Option<String>,
}

impl TokenRequest {
    pub fn new(sub: impl Into<String>, role: Role) -> Self {
        TokenRequest {
            sub: sub.into(),
            role,
            ttl: Duration::from_secs(3600),
            groups: Vec::new(),
            channels: Vec::new(),
            kid: None,
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
            // Random: `hub revoke --jti` can void this one token.
            jti: Some(format!("{:032x}", rand::random::<u128>())),
            iss: auth.issuer.clone(),
            aud: auth.audience.clone().map(serde_json::Value::String),
            groups: (!self.groups.is_empty()).then(|| self.groups.clone()),
            channels: (!self.channels.is_empty()).then(|| self.channels.clone()),
        }
    }
}

/// Signs `claims` with the single configured key.
pub fn sign(auth: &AuthSettings, claims: &Claims) -> Result<String, MintError> {
    if auth.hs256_secret.is_none() && auth.public_key_file.is_none() && auth.jwks_file.is_some() {
        // A token without a kid would need a single key, and this hub has none.
        return Err(MintError::KidNeeded);
    }
    let (key, alg) = match (&auth.hs256_secret, &auth.private_key_file) {
        (Some(secret), _) => (
            EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        ),
        (None, Some(path)) => {
            let pem = private_pem(path)?;
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

/// Signs `claims` with key `kid` of `auth.jwks_file`: an `oct` key's own secret, or for a
/// public key, `auth.private_key_file`, which must be its private half.
pub fn sign_with_kid(auth: &AuthSettings, claims: &Claims, kid: &str) -> Result<String, MintError> {
    let path = auth.jwks_file.as_ref().ok_or(MintError::NoKeySet)?;
    let text =
        std::fs::read(path).map_err(|e| MintError::KeySet(format!("{}: {e}", path.display())))?;
    // Read as the hub reads it: a file it refuses, or a key it leaves out, mints nothing.
    let usable = keys::KeySet::parse(&text, &Validation::default())
        .map_err(|e| MintError::KeySet(e.to_string()))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| MintError::KeySet(e.to_string()))?;
    let jwk = set
        .find(kid)
        .filter(|_| usable.contains(kid))
        .ok_or_else(|| MintError::UnknownKid(kid.to_owned()))?;
    let alg = keys::algorithm_of(jwk).map_err(MintError::KeySet)?;
    let key = match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            let key = DecodingKey::from_jwk(jwk)?;
            EncodingKey::from_secret(keys::secret_of(&key).map_err(MintError::KeySet)?)
        }
        _ => {
            let pem = private_pem(
                auth.private_key_file
                    .as_ref()
                    .ok_or(MintError::NoPrivateKey)?,
            )?;
            let key = match alg.family() {
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
                AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
                AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
                AlgorithmFamily::Hmac => {
                    return Err(MintError::KeySet(format!(
                        "key `{kid}`: HMAC needs an oct key"
                    )));
                }
            };
            key.map_err(|e| MintError::Key(e.to_string()))?
        }
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let token = jsonwebtoken::encode(&header, claims, &key)?;
    // A private key of another pair signs happily; only verifying says so.
    let public = DecodingKey::from_jwk(jwk)?;
    let mut signature_only = Validation::new(alg);
    signature_only.validate_exp = false;
    signature_only.validate_aud = false;
    signature_only.required_spec_claims.clear();
    jsonwebtoken::decode::<serde_json::Value>(&token, &public, &signature_only)
        .map_err(|_| MintError::WrongPrivateKey(kid.to_owned()))?;
    Ok(token)
}

fn private_pem(path: &std::path::Path) -> Result<Vec<u8>, MintError> {
    std::fs::read(path).map_err(|e| MintError::Key(format!("{}: {e}", path.display())))
}

/// Mints a token for `request`.
pub fn mint(auth: &AuthSettings, request: &TokenRequest) -> Result<String, MintError> {
    if request.ttl > auth.max_token_lifetime {
        return Err(MintError::TooLong(request.ttl, auth.max_token_lifetime));
    }
    let claims = request.claims(auth);
    match &request.kid {
        Some(kid) => sign_with_kid(auth, &claims, kid),
        None => sign(auth, &claims),
    }
}

/// Seconds since the Unix epoch, the unit of `exp`, `iat` and `nbf`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
