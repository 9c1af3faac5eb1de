//! The keys tokens are verified with, and the JWKS file that can change them while the hub runs.
//!
//! A token's `kid` picks its key from the set of `auth.jwks_file` (RFC 7517); a token without
//! one is tried against the single configured key only (`auth.hs256_secret` or
//! `auth.public_key_file`). Each key verifies one algorithm, the one its JWK names (or its key
//! type's usual one): a token cannot choose a weaker algorithm for a key than the key's.
//!
//! The set lives in a [`watch`] channel: verifying a token borrows it for a map lookup, and a
//! connection whose key is removed can wait for that without polling. [`watch_file`] swaps it
//! when the file's bytes change (polled, so a Kubernetes ConfigMap's symlink swap is seen like
//! an edit) or on SIGHUP; a file that does not parse keeps the previous set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::MIN_HS256_SECRET_BYTES;
use crate::metrics::Metrics;

/// Why a JWKS file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("not a JWK set: {0}")]
    Json(#[from] serde_json::Error),
    #[error("key #{index} has no `kid`: every key of the set needs one, tokens pick it by it")]
    NoKid { index: usize },
    #[error("two keys have `kid` `{0}`")]
    DuplicateKid(String),
    #[error("key `{kid}`: {message}")]
    Key { kid: String, message: String },
}

/// One key and the only algorithm it verifies.
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    /// The hub's claim checks, with `algorithms` narrowed to this key's.
    pub validation: Validation,
}

impl VerifyingKey {
    pub fn new(algorithm: Algorithm, key: DecodingKey, checks: &Validation) -> Self {
        let mut validation = checks.clone();
        validation.algorithms = vec![algorithm];
        VerifyingKey {
            algorithm,
            key,
            validation,
        }
    }
}

/// The keys of a JWKS file by `kid`. Empty when no file is configured.
#[derive(Default)]
pub struct KeySet {
    /// The `kid` is shared with the identities it verified.
    keys: HashMap<Arc<str>, Arc<VerifyingKey>>,
}

impl KeySet {
    /// Parses a JWK set. Keys for encryption (`"use": "enc"`) are left out; any other key the
    /// hub cannot verify with fails the whole set, so that a typo never silently drops a key.
    pub fn parse(json: &[u8], checks: &Validation) -> Result<KeySet, KeysError> {
        let set: JwkSet = serde_json::from_slice(json)?;
        let mut keys = HashMap::with_capacity(set.keys.len());
        for (index, jwk) in set.keys.iter().enumerate() {
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or(KeysError::NoKid { index })?;
            let key = verifying_key(jwk, checks).map_err(|message| KeysError::Key {
                kid: kid.clone(),
                message,
            })?;
            if keys
                .insert(Arc::from(kid.as_str()), Arc::new(key))
                .is_some()
            {
                return Err(KeysError::DuplicateKid(kid));
            }
        }
        Ok(KeySet { keys })
    }

    /// The key of `kid`, with the set's copy of the `kid`.
    pub fn get(&self, kid: &str) -> Option<(&Arc<str>, &Arc<VerifyingKey>)> {
        self.keys.get_key_value(kid)
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `kid`s, sorted (for logs).
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(|k| &**k).collect();
        kids.sort_unstable();
        kids
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeysError> {
    std::fs::read(path).map_err(|error| KeysError::Read {
        path: path.to_owned(),
        error,
    })
}

/// The algorithm a JWK verifies: its `alg`, or its key type's usual one.
pub fn algorithm_of(jwk: &Jwk) -> Result<Algorithm, String> {
    let named = match jwk.common.key_algorithm {
        None => None,
        Some(alg) => Some(match alg {
            KeyAlgorithm::HS256 => Algorithm::HS256,
            KeyAlgorithm::HS384 => Algorithm::HS384,
            KeyAlgorithm::HS512 => Algorithm::HS512,
            KeyAlgorithm::ES256 => Algorithm::ES256,
            KeyAlgorithm::ES384 => Algorithm::ES384,
            KeyAlgorithm::RS256 => Algorithm::RS256,
            KeyAlgorithm::RS384 => Algorithm::RS384,
            KeyAlgorithm::RS512 => Algorithm::RS512,
            KeyAlgorithm::PS256 => Algorithm::PS256,
            KeyAlgorithm::PS384 => Algorithm::PS384,
            KeyAlgorithm::PS512 => Algorithm::PS512,
            KeyAlgorithm::EdDSA => Algorithm::EdDSA,
            other => return Err(format!("`alg` {other:?} does not sign tokens")),
        }),
    };
    let usual = match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        _ => return Err("unsupported key type".into()),
    };
    let algorithm = named.unwrap_or(usual);
    if algorithm.family() != usual.family() {
        return Err(format!("`alg` {algorithm:?} does not fit its key type"));
    }
    Ok(algorithm)
}

fn verifying_key(jwk: &Jwk, checks: &Validation) -> Result<VerifyingKey, String> {
    let algorithm = algorithm_of(jwk)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    if let AlgorithmParameters::OctetKey(_) = &jwk.algorithm {
        let secret = secret_of(&key)?;
        if secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(format!(
                "an HMAC key needs at least {MIN_HS256_SECRET_BYTES} bytes, this one has {}",
                secret.len()
            ));
        }
    }
    Ok(VerifyingKey::new(algorithm, key, checks))
}

/// The secret of an `oct` key.
pub fn secret_of(key: &DecodingKey) -> Result<&[u8], String> {
    key.try_get_as_bytes().map_err(|e| e.to_string())
}

/// How [`watch_file`] looks for changes.
pub struct Reload {
    pub path: PathBuf,
    pub poll: Duration,
    pub checks: Validation,
    /// The bytes the set in use was made of.
    pub loaded: Vec<u8>,
}

/// Reloads the set from `reload.path` whenever its bytes change (checked every `reload.poll`)
/// and on SIGHUP, until `shutdown`. A file that cannot be read or parsed keeps the set as it is:
/// the log says why and `hub_auth_key_reloads_total{result="rejected"}` counts it.
pub async fn watch_file(
    reload: Reload,
    keys: Arc<watch::Sender<Arc<KeySet>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut last = Some(reload.loaded.clone());
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            warn!(error = %e, "SIGHUP cannot be watched; the JWKS file is still polled");
            None
        }
    };
    // The first look one period from now: the file was read at start, and an interval's
    // immediate first tick would take a change made since for a poll's (racing the SIGHUP test).
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + reload.poll, reload.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = poll.tick() => false,
            Some(()) = async { match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            } } => true,
        };
        let bytes = match read(&reload.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Mid-rewrite or deleted: only worth a line when it persists or was asked for.
                if forced || last.is_some() {
                    warn!(error = %e, "JWKS file unreadable; keeping the previous keys");
                    metrics.auth_key_reloads.inc("rejected");
                }
                last = None;
                continue;
            }
        };
        if !forced && last.as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        match KeySet::parse(&bytes, &reload.checks) {
            Ok(set) => {
                let before = keys.borrow().kids().join(",");
                info!(path = %reload.path.display(), keys = %set.kids().join(","), %before,
                    "JWKS reloaded");
                metrics.auth_keys.set(set.len() as i64);
                metrics.auth_key_reloads.inc("applied");
                keys.send_replace(Arc::new(set));
            }
            Err(e) => {
                warn!(path = %reload.path.display(), error = %e,
                    "JWKS file refused; keeping the previous keys");
                metrics.auth_key_reloads.inc("rejected");
            }
        }
        last = Some(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(json: &str) -> Jwk {
        serde_json::from_str(json).unwrap()
    }

    const SECRET_K: &str = "dGhpcnR5LXR3by1ieXRlcy1vZi1zZWNyZXQtZm9yLWhtYWMh"; // 36 bytes

    #[test]
    fn a_key_verifies_its_alg_or_its_key_types_usual_one() {
        let oct = jwk(&format!(r#"{{"kty":"oct","k":"{SECRET_K}"}}"#));
        assert_eq!(algorithm_of(&oct), Ok(Algorithm::HS256));
        let hs512 = jwk(&format!(
            r#"{{"kty":"oct","alg":"HS512","k":"{SECRET_K}"}}"#
        ));
        assert_eq!(algorithm_of(&hs512), Ok(Algorithm::HS512));
        let rsa_as_hmac = jwk(r#"{"kty":"RSA","alg":"HS256","n":"AQAB","e":"AQAB"}"#);
        assert!(
            algorithm_of(&rsa_as_hmac)
                .unwrap_err()
                .contains("does not fit")
        );
        let pss = jwk(r#"{"kty":"RSA","alg":"PS256","n":"AQAB","e":"AQAB"}"#);
        assert_eq!(algorithm_of(&pss), Ok(Algorithm::PS256));
        let encryption = jwk(r#"{"kty":"RSA","alg":"RSA-OAEP","n":"AQAB","e":"AQAB"}"#);
        assert!(algorithm_of(&encryption).is_err());
    }

    #[test]
    fn a_set_is_taken_whole_or_not_at_all() {
        let checks = Validation::default();
        let good = format!(
            r#"{{"keys":[{{"kty":"oct","kid":"a","k":"{SECRET_K}"}},
                {{"kty":"oct","kid":"e","use":"enc","k":"c2hvcnQ"}}]}}"#
        );
        let set = KeySet::parse(good.as_bytes(), &checks).unwrap();
        assert_eq!(set.kids(), ["a"], "the encryption key is left out");
        assert_eq!(
            set.get("a").unwrap().1.validation.algorithms,
            [Algorithm::HS256]
        );
        for (bad, says) in [
            (
                r#"{"keys":[{"kty":"oct","k":"c2hvcnQ"}]}"#.to_owned(),
                "no `kid`",
            ),
            (
                r#"{"keys":[{"kty":"oct","kid":"s","k":"c2hvcnQ"}]}"#.to_owned(),
                "at least 32 bytes",
            ),
            (
                format!(
                    r#"{{"keys":[{{"kty":"oct","kid":"d","k":"{SECRET_K}"}},{{"kty":"oct","kid":"d","k":"{SECRET_K}"}}]}}"#
                ),
                "two keys",
            ),
            (r#"{"keys":"#.to_owned(), "not a JWK set"),
        ] {
            let error = KeySet::parse(bad.as_bytes(), &checks).err().unwrap();
            assert!(error.to_string().contains(says), "{error} for {bad}");
        }
    }
}
