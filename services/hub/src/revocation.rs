//! Revocation: tokens of one `sub` issued before a time, or one token by its `jti`, are void at
//! once on every hub of the pool, long before they expire.
//!
//! The list lives where the pool's shared state lives: on the Redis broker in the hash
//! `tl:{revoked}:list` (one slot, so it works on a Redis Cluster; it survives hub restarts, and
//! Redis restarts with persistence), with a version counter beside it; on the embedded broker in
//! `auth.revocations_file`. `hub revoke` and `POST /admin/revocations` add to it; every hub polls
//! the version every `auth.revocation_poll` (500 ms) and, when it moved, reads the list into a
//! [`watch`] channel. Upgrades check it after the signature, and [`crate::live_tokens`] closes
//! the open connections it voids with 4003 `revoked`. Polling instead of pub/sub: a missed
//! message would leave a stolen token working, a missed poll is taken at the next one.
//!
//! An entry lives as long as a token it voids could: `(sub, before)` until `before` plus
//! `auth.max_token_lifetime` (no token lives longer: [`crate::auth`] refuses one whose
//! `exp - iat` is longer), a `jti` until the token's `exp` given with it (or the same bound).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AuthSettings, Settings};
use crate::metrics::Metrics;

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Revocation {
    /// Every token of `sub` issued before `before` (seconds since the Unix epoch); a token
    /// without `iat` counts as issued before any time.
    Subject {
        sub: String,
        before: u64,
        /// When the entry is dropped: no token it voids is valid past it.
        expires_at: u64,
    },
    /// The one token with this `jti`.
    Token { jti: String, expires_at: u64 },
}

impl Revocation {
    /// Its field in the list: one entry per `sub` and per `jti`.
    fn key(&self) -> String {
        match self {
            Revocation::Subject { sub, .. } => format!("sub:{sub}"),
            Revocation::Token { jti, .. } => format!("jti:{jti}"),
        }
    }

    pub fn expires_at(&self) -> u64 {
        match self {
            Revocation::Subject { expires_at, .. } | Revocation::Token { expires_at, .. } => {
                *expires_at
            }
        }
    }

    /// This entry and an older one of the same key as one: the later time of each.
    fn merged(self, older: &Revocation) -> Revocation {
        match (self, older) {
            (
                Revocation::Subject {
                    sub,
                    before,
                    expires_at,
                },
                Revocation::Subject {
                    before: b,
                    expires_at: e,
                    ..
                },
            ) => Revocation::Subject {
                sub,
                before: before.max(*b),
                expires_at: expires_at.max(*e),
            },
            (Revocation::Token { jti, expires_at }, Revocation::Token { expires_at: e, .. }) => {
                Revocation::Token {
                    jti,
                    expires_at: expires_at.max(*e),
                }
            }
            (new, _) => new,
        }
    }
}

/// What `hub revoke` and `POST /admin/revocations` are asked: a `sub` (tokens issued before
/// `before`, default now) or a `jti` (until `expires_at`, default the longest a token lives).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRequest {
    pub sub: Option<String>,
    pub before: Option<u64>,
    pub jti: Option<String>,
    pub expires_at: Option<u64>,
}

impl RevocationRequest {
    /// The entry, or why the request is not one.
    pub fn into_revocation(self, auth: &AuthSettings, now: u64) -> Result<Revocation, String> {
        // Times stay in plain integers through Redis' Lua (cjson writes larger numbers with an
        // exponent, which would make the whole list unreadable).
        for (name, at) in [("before", self.before), ("expires_at", self.expires_at)] {
            if at.is_some_and(|at| at > LATEST) {
                return Err(format!("`{name}` is past the year 9999 (unix seconds?)"));
            }
        }
        let lifetime = auth.max_token_lifetime.as_secs();
        let leeway = auth.leeway.as_secs();
        match (self.sub, self.jti) {
            (Some(sub), None) => {
                if sub.is_empty() {
                    return Err("`sub` is empty".into());
                }
                if self.expires_at.is_some() {
                    return Err("`expires_at` goes with `jti`; a `sub` entry lasts as long as a token issued before `before` can".into());
                }
                // Tokens issued before this second: one minted right after the revocation works.
                let before = self.before.unwrap_or(now);
                // The last token issued before `before` lives at most this long.
                let expires_at = before
                    .saturating_add(lifetime)
                    .saturating_add(leeway)
                    .min(LATEST);
                if expires_at <= now {
                    return Err(format!(
                        "every token issued before {before} has expired already (auth.max_token_lifetime): nothing to revoke"
                    ));
                }
                Ok(Revocation::Subject {
                    sub,
                    before,
                    expires_at,
                })
            }
            (None, Some(jti)) => {
                if jti.is_empty() {
                    return Err("`jti` is empty".into());
                }
                if self.before.is_some() {
                    return Err("`before` goes with `sub`".into());
                }
                let until = self
                    .expires_at
                    .unwrap_or(now.saturating_add(lifetime))
                    .saturating_add(leeway)
                    .min(LATEST);
                if until <= now {
                    return Err(format!(
                        "a token that expired at {until} is void already: nothing to revoke"
                    ));
                }
                Ok(Revocation::Token {
                    jti,
                    expires_at: until,
                })
            }
            _ => Err("name exactly one of `sub` and `jti`".into()),
        }
    }
}

/// 9999-12-31T23:59:59Z: the latest time a revocation names.
const LATEST: u64 = 253_402_300_799;

/// What a token is, as far as revocation asks.
#[derive(Debug, Clone, Copy)]
pub struct TokenFacts<'a> {
    pub sub: &'a str,
    pub iat: Option<u64>,
    pub jti: Option<&'a str>,
}

/// The revocations in force.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// `sub` → (tokens issued before this are void, until).
    subjects: HashMap<String, (u64, u64)>,
    /// `jti` → until.
    tokens: HashMap<String, u64>,
}

impl RevocationList {
    pub fn from_entries(entries: impl IntoIterator<Item = Revocation>, now: u64) -> Self {
        let mut list = RevocationList::default();
        for entry in entries.into_iter().filter(|e| e.expires_at() > now) {
            match entry {
                Revocation::Subject {
                    sub,
                    before,
                    expires_at,
                } => {
                    let slot = list.subjects.entry(sub).or_insert((0, 0));
                    *slot = (slot.0.max(before), slot.1.max(expires_at));
                }
                Revocation::Token { jti, expires_at } => {
                    let slot = list.tokens.entry(jti).or_insert(0);
                    *slot = (*slot).max(expires_at);
                }
            }
        }
        list
    }

    /// Whether a token with these facts is void at `now`.
    pub fn voids(&self, token: TokenFacts<'_>, now: u64) -> bool {
        let by_subject = self
            .subjects
            .get(token.sub)
            .is_some_and(|&(before, until)| {
                until > now && token.iat.is_none_or(|iat| iat < before)
            });
        let by_id = token
            .jti
            .and_then(|jti| self.tokens.get(jti))
            .is_some_and(|&until| until > now);
        by_subject || by_id
    }

    pub fn len(&self) -> usize {
        self.subjects.len() + self.tokens.len()
    }

    /// This list's entries that `other` does not have as they are here (new or moved).
    fn entries_not_in(&self, other: &RevocationList) -> Vec<Revocation> {
        let subjects = self
            .subjects
            .iter()
            .filter(|(sub, v)| other.subjects.get(*sub) != Some(v))
            .map(|(sub, &(before, expires_at))| Revocation::Subject {
                sub: sub.clone(),
                before,
                expires_at,
            });
        let tokens = self
            .tokens
            .iter()
            .filter(|(jti, v)| other.tokens.get(*jti) != Some(v))
            .map(|(jti, &expires_at)| Revocation::Token {
                jti: jti.clone(),
                expires_at,
            });
        subjects.chain(tokens).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: {error}")]
    File {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a revocation list: {error}")]
    Format {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a revocation entry in Redis is not JSON: {0}")]
    Entry(serde_json::Error),
    #[error(
        "revocations need a place every hub reads: set auth.revocations_file (embedded broker) or \
         broker.url / broker.cluster_nodes"
    )]
    NoStore,
}

/// Where the pool's revocations are kept.
pub enum RevocationStore {
    File(FileStore),
    Redis(Box<RedisStore>),
}

impl RevocationStore {
    /// Redis when the broker is Redis (one or a cluster), else `auth.revocations_file`, else
    /// none: the embedded broker without a file has nowhere to keep them.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, RevocationError> {
        let broker = &settings.broker;
        if let Some(url) = &broker.url {
            let client = redis::Client::open(url.as_str())?;
            let store = RedisStore::new(RedisTarget::One(client));
            return Ok(Some(RevocationStore::Redis(Box::new(store))));
        }
        if !broker.cluster_nodes.is_empty() {
            let client = redis::cluster::ClusterClient::new(broker.cluster_nodes.clone())?;
            let store = RedisStore::new(RedisTarget::Cluster(Box::new(client)));
            return Ok(Some(RevocationStore::Redis(Box::new(store))));
        }
        Ok(settings
            .auth
            .revocations_file
            .clone()
            .map(|path| RevocationStore::File(FileStore::new(path))))
    }

    /// Adds `entry` (merged with the one of the same `sub` or `jti`) and drops expired ones.
    pub async fn add(&self, entry: &Revocation, now: u64) -> Result<(), RevocationError> {
        match self {
            RevocationStore::File(f) => f.add(entry, now).await,
            RevocationStore::Redis(r) => r.add(entry, now).await,
        }
    }

    /// The list's version: it moves with every change.
    pub async fn version(&self) -> Result<u64, RevocationError> {
        match self {
            RevocationStore::File(f) => f.version().await,
            RevocationStore::Redis(r) => r.version().await,
        }
    }

    /// Every entry, with the version it is of.
    pub async fn entries(&self) -> Result<(u64, Vec<Revocation>), RevocationError> {
        match self {
            RevocationStore::File(f) => f.entries().await,
            RevocationStore::Redis(r) => r.entries().await,
        }
    }
}

/// The embedded broker's list: one JSON file, replaced in one rename on every change.
pub struct FileStore {
    path: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct FileContents {
    version: u64,
    revocations: Vec<Revocation>,
}

impl FileStore {
    pub fn new(path: PathBuf) -> Self {
        FileStore { path }
    }

    /// Runs `f` on the file's path off the async threads (file IO blocks).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(PathBuf) -> Result<T, RevocationError> + Send + 'static,
    ) -> Result<T, RevocationError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(path))
            .await
            .unwrap_or_else(|e| {
                Err(RevocationError::File {
                    path: self.path.clone(),
                    error: std::io::Error::other(e),
                })
            })
    }

    async fn read(&self) -> Result<FileContents, RevocationError> {
        self.blocking(|path| read_file(&path)).await
    }

    async fn add(&self, entry: &Revocation, now: u64) -> Result<(), RevocationError> {
        let entry = entry.clone();
        self.blocking(move |path| {
            // One writer at a time (the hub's admin endpoint, `hub revoke`, another hub on the
            // same file): read, merge and replace under an exclusive lock on a file beside it.
            let lock_path = path.with_extension("lock");
            let io = |error| RevocationError::File {
                path: lock_path.clone(),
                error,
            };
            let lock = std::fs::File::create(&lock_path).map_err(io)?;
            lock.lock().map_err(io)?;
            let mut contents = read_file(&path)?;
            let key = entry.key();
            let older = contents
                .revocations
                .iter()
                .find(|e| e.key() == key)
                .cloned();
            contents
                .revocations
                .retain(|e| e.key() != key && e.expires_at() > now);
            contents.revocations.push(match older {
                Some(older) => entry.merged(&older),
                None => entry,
            });
            contents.version += 1;
            write_file(&path, &contents)
        })
        .await
    }

    async fn version(&self) -> Result<u64, RevocationError> {
        Ok(self.read().await?.version)
    }

    async fn entries(&self) -> Result<(u64, Vec<Revocation>), RevocationError> {
        let contents = self.read().await?;
        Ok((contents.version, contents.revocations))
    }
}

/// A file not there yet is an empty list.
fn read_file(path: &Path) -> Result<FileContents, RevocationError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileContents::default()),
        Err(error) => {
            return Err(RevocationError::File {
                path: path.to_owned(),
                error,
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|error| RevocationError::Format {
        path: path.to_owned(),
        error,
    })
}

/// Written to a temporary file, synced, renamed over the old one: a reader sees the old list or
/// the new one, and a power cut leaves one of them.
fn write_file(path: &Path, contents: &FileContents) -> Result<(), RevocationError> {
    let io = |error| RevocationError::File {
        path: path.to_owned(),
        error,
    };
    // Its own name: a crashed writer's leftover is never renamed into place by another.
    let staged = path.with_extension(format!("{}.tmp", std::process::id()));
    let json = serde_json::to_vec_pretty(contents).map_err(|e| io(std::io::Error::other(e)))?;
    let mut file = std::fs::File::create(&staged).map_err(io)?;
    std::io::Write::write_all(&mut file, &json).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&staged, path).map_err(io)
}

const LIST_KEY: &str = "tl:{revoked}:list";
const VERSION_KEY: &str = "tl:{revoked}:version";

/// Merges an entry into the list (the later `before` and expiry of the old and the new), drops
/// expired entries, and moves the version, in one step. `KEYS`: list, version. `ARGV`: the
/// entry's field, its JSON, now (seconds).
const ADD: &str = r#"
local list, version = KEYS[1], KEYS[2]
local field, entry, now = ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3])
local old = redis.call('HGET', list, field)
if old then
  old = cjson.decode(old)
  if entry.before and old.before and old.before > entry.before then entry.before = old.before end
  if old.expires_at > entry.expires_at then entry.expires_at = old.expires_at end
end
redis.call('HSET', list, field, cjson.encode(entry))
local all = redis.call('HGETALL', list)
for k = 1, #all, 2 do
  if cjson.decode(all[k + 1]).expires_at <= now then redis.call('HDEL', list, all[k]) end
end
return redis.call('INCR', version)
"#;

/// The Redis broker's list, on its own connection (one multiplexed connection, or a cluster
/// connection), reconnected on the next call after an error.
pub struct RedisStore {
    target: RedisTarget,
    connection: tokio::sync::Mutex<Option<Connection>>,
    add: redis::Script,
}

pub enum RedisTarget {
    One(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

enum Connection {
    One(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::One(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::One(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::One(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisStore {
    pub fn new(target: RedisTarget) -> Self {
        RedisStore {
            target,
            connection: tokio::sync::Mutex::new(None),
            add: redis::Script::new(ADD),
        }
    }

    /// Runs `f` on the connection, made first if there is none; an error drops it.
    async fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, RevocationError> {
        // The lock is held across the call: calls take turns, which the poll and the rare
        // revoke can afford; no other lock is taken meanwhile.
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            *slot = Some(match &self.target {
                RedisTarget::One(client) => {
                    Connection::One(client.get_multiplexed_async_connection().await?)
                }
                RedisTarget::Cluster(client) => {
                    Connection::Cluster(client.get_async_connection().await?)
                }
            });
        }
        let Some(connection) = slot.as_mut() else {
            return Err(RevocationError::NoStore);
        };
        let result = f(connection).await;
        if result.is_err() {
            *slot = None;
        }
        Ok(result?)
    }

    async fn add(&self, entry: &Revocation, now: u64) -> Result<(), RevocationError> {
        let json = serde_json::to_string(entry).map_err(RevocationError::Entry)?;
        let mut call = self.add.prepare_invoke();
        call.key(LIST_KEY)
            .key(VERSION_KEY)
            .arg(entry.key())
            .arg(json)
            .arg(now);
        self.with(async |c| call.invoke_async::<u64>(c).await)
            .await
            .map(drop)
    }

    async fn version(&self) -> Result<u64, RevocationError> {
        let version: Option<u64> = self
            .with(async |c| redis::cmd("GET").arg(VERSION_KEY).query_async(c).await)
            .await?;
        Ok(version.unwrap_or(0))
    }

    async fn entries(&self) -> Result<(u64, Vec<Revocation>), RevocationError> {
        let (version, fields): (Option<u64>, HashMap<String, String>) = self
            .with(async |c| {
                redis::pipe()
                    .atomic()
                    .cmd("GET")
                    .arg(VERSION_KEY)
                    .cmd("HGETALL")
                    .arg(LIST_KEY)
                    .query_async(c)
                    .await
            })
            .await?;
        let entries = fields
            .values()
            .map(|json| serde_json::from_str(json).map_err(RevocationError::Entry))
            .collect::<Result<_, _>>()?;
        Ok((version.unwrap_or(0), entries))
    }
}

/// Reads the whole list into `list` once; the version it is of.
pub async fn load(
    store: &RevocationStore,
    list: &watch::Sender<Arc<RevocationList>>,
    metrics: &Metrics,
) -> Result<u64, RevocationError> {
    let (version, entries) = store.entries().await?;
    let fresh = RevocationList::from_entries(entries, crate::token::unix_now());
    let before = list.borrow().clone();
    for entry in fresh.entries_not_in(&before) {
        info!(?entry, "revocation applied");
    }
    metrics.revocations.set(fresh.len() as i64);
    list.send_replace(Arc::new(fresh));
    Ok(version)
}

/// Keeps `list` as the store has it: reads the version every `poll` and the whole list when it
/// moved, until `shutdown`; `loaded` is set after the first read. A store that cannot be read
/// keeps the list as it was (said once per outage).
pub async fn follow(
    store: Arc<RevocationStore>,
    list: Arc<watch::Sender<Arc<RevocationList>>>,
    loaded: Arc<AtomicBool>,
    poll: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read = match store.version().await {
            Ok(version) if seen == Some(version) => Ok(version),
            Ok(_) => load(&store, &list, &metrics).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(version) => {
                if failing {
                    info!("the revocation list can be read again");
                }
                seen = Some(version);
                failing = false;
                loaded.store(true, Ordering::Release);
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "the revocation list cannot be read; keeping the one in force");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(sub: &'a str, iat: Option<u64>, jti: Option<&'a str>) -> TokenFacts<'a> {
        TokenFacts { sub, iat, jti }
    }

    #[test]
    fn a_subject_entry_voids_tokens_issued_before_it_until_it_expires() {
        let list = RevocationList::from_entries(
            [Revocation::Subject {
                sub: "pi-07".into(),
                before: 1000,
                expires_at: 5000,
            }],
            0,
        );
        assert!(list.voids(facts("pi-07", Some(999), None), 2000));
        assert!(
            list.voids(facts("pi-07", None, None), 2000),
            "no iat: issued whenever"
        );
        assert!(
            !list.voids(facts("pi-07", Some(1000), None), 2000),
            "issued after"
        );
        assert!(
            !list.voids(facts("pi-08", Some(1), None), 2000),
            "another device"
        );
        assert!(
            !list.voids(facts("pi-07", Some(999), None), 5000),
            "expired entry"
        );
    }

    #[test]
    fn a_request_names_one_of_sub_and_jti_and_plain_times() {
        let auth = AuthSettings::default();
        let sub = RevocationRequest {
            sub: Some("pi-07".into()),
            ..Default::default()
        };
        let lifetime = auth.max_token_lifetime.as_secs() + auth.leeway.as_secs();
        assert_eq!(
            sub.clone().into_revocation(&auth, 1000),
            Ok(Revocation::Subject {
                sub: "pi-07".into(),
                before: 1000,
                expires_at: 1000 + lifetime
            })
        );
        let far = RevocationRequest {
            before: Some(LATEST + 1),
            ..sub
        };
        assert!(
            far.into_revocation(&auth, 1000)
                .unwrap_err()
                .contains("9999")
        );
        let both = RevocationRequest {
            sub: Some("a".into()),
            jti: Some("b".into()),
            ..Default::default()
        };
        assert!(both.into_revocation(&auth, 1000).is_err());
        let jti = RevocationRequest {
            jti: Some("t".into()),
            expires_at: Some(5000),
            ..Default::default()
        };
        assert_eq!(
            jti.into_revocation(&auth, 1000),
            Ok(Revocation::Token {
                jti: "t".into(),
                expires_at: 5000 + auth.leeway.as_secs()
            })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_of_one_file_take_turns_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path().join("revocations.json")));
        let writers: Vec<_> = (0..16)
            .map(|k| {
                let store = store.clone();
                tokio::spawn(async move {
                    let entry = Revocation::Token {
                        jti: format!("t-{k}"),
                        expires_at: 5000,
                    };
                    store.add(&entry, 10).await.unwrap();
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let (version, entries) = store.entries().await.unwrap();
        assert_eq!((version, entries.len()), (16, 16));
    }

    #[test]
    fn a_token_entry_voids_that_token_only() {
        let entries = [Revocation::Token {
            jti: "t-1".into(),
            expires_at: 5000,
        }];
        let list = RevocationList::from_entries(entries, 0);
        assert!(list.voids(facts("pi-07", Some(1), Some("t-1")), 10));
        assert!(!list.voids(facts("pi-07", Some(1), Some("t-2")), 10));
        assert!(!list.voids(facts("pi-07", Some(1), None), 10));
    }

    #[test]
    fn entries_of_one_key_merge_to_the_later_times_and_expired_ones_are_left_out() {
        let a = Revocation::Subject {
            sub: "pi".into(),
            before: 10,
            expires_at: 100,
        };
        let b = Revocation::Subject {
            sub: "pi".into(),
            before: 5,
            expires_at: 200,
        };
        assert_eq!(
            b.clone().merged(&a),
            Revocation::Subject {
                sub: "pi".into(),
                before: 10,
                expires_at: 200
            }
        );
        let list = RevocationList::from_entries([a, b], 150);
        assert!(list.voids(facts("pi", Some(4), None), 160));
        assert!(
            !list.voids(facts("pi", Some(7), None), 160),
            "the expired entry's 10 is gone"
        );
    }
}
