//! Hub settings: built-in defaults < TOML file (`--config`) < `HUB_*` environment variables
//! (`__` between levels, e.g. `HUB_AUTH__HS256_SECRET`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hub_protocol::ChannelPattern;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The shortest HS256 secret the hub accepts: 256 bits, the size of the hash.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Address the HTTP/WebSocket listener binds.
    pub listen: SocketAddr,
    /// Name of this hub in `hello` frames, the `X-Hub-Node` header and logs. Defaults to
    /// `$HOSTNAME` (the pod name on Kubernetes), else a random name.
    pub node_id: Option<String>,
    pub auth: AuthSettings,
    pub broker: BrokerSettings,
    pub history: HistorySettings,
    pub limits: Limits,
    pub ws: WsSettings,
    pub shutdown: ShutdownSettings,
    pub presence: PresenceSettings,
    pub demo: DemoSettings,
    pub log: LogSettings,
    /// OpenTelemetry export (traces and metrics over OTLP); off unless an endpoint is set.
    pub telemetry: TelemetrySettings,
}

/// How the hub logs to stderr.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// `text` (default) or `json` (one object per line, for log shippers).
    pub format: LogFormat,
}

pub use observability::{LogFormat, TelemetrySettings};

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            node_id: None,
            auth: AuthSettings::default(),
            broker: BrokerSettings::default(),
            history: HistorySettings::default(),
            limits: Limits::default(),
            ws: WsSettings::default(),
            shutdown: ShutdownSettings::default(),
            presence: PresenceSettings::default(),
            demo: DemoSettings::default(),
            log: LogSettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// PEM public key (RSA or EC P-256) for RS256/ES256 tokens.
    pub public_key_file: Option<PathBuf>,
    /// PEM private key matching `public_key_file` (or, with `hub token --kid`, a public key of
    /// `jwks_file`); only `hub token` uses it.
    pub private_key_file: Option<PathBuf>,
    /// A JWK set (RFC 7517): tokens with a `kid` are verified with that key of the set. Reloaded
    /// when it changes and on SIGHUP; a file that does not parse keeps the previous keys.
    pub jwks_file: Option<PathBuf>,
    /// How often `jwks_file` is checked for changes.
    #[serde(with = "humantime_serde")]
    pub jwks_poll: Duration,
    /// Close the live connections of tokens whose key left `jwks_file` (4004 `key_removed`);
    /// otherwise they last until their `exp`.
    pub close_on_key_removal: bool,
    /// Refuse tokens without `iat`: only a token that says when it was issued can be revoked
    /// by "its `sub`, issued before" alone (one without counts as issued before any revocation).
    pub require_iat: bool,
    /// The longest a token may live from `iat` to `exp`; a revocation entry lasts this long.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// Embedded broker: where revocations are kept (`hub revoke` writes it, the hub polls it).
    /// On Redis they are in Redis and this is not used.
    pub revocations_file: Option<PathBuf>,
    /// How often every hub looks for new revocations.
    #[serde(with = "humantime_serde")]
    pub revocation_poll: Duration,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Channel patterns a viewer token without a `channels` claim may subscribe to; absent: any.
    pub viewer_channels: Option<Vec<String>>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            hs256_secret: None,
            public_key_file: None,
            private_key_file: None,
            jwks_file: None,
            jwks_poll: Duration::from_secs(2),
            close_on_key_removal: false,
            require_iat: false,
            max_token_lifetime: Duration::from_secs(400 * 86_400),
            revocations_file: None,
            revocation_poll: Duration::from_millis(500),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
            viewer_channels: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BrokerSettings {
    /// `redis://host:port/db` (or `redis+unix:///path`) for a pool of hubs; absent: the embedded
    /// in-process broker.
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://host:port`, any few of its masters or replicas),
    /// instead of `url`: every channel lives in its own hash slot, so the pool's ingest spreads
    /// over the shards, and the relay uses sharded pub/sub. Empty: not a cluster.
    pub cluster_nodes: Vec<String>,
    /// Redis connections for commands (the pub/sub connection is extra).
    pub pool_size: usize,
    /// Limit for one Redis command or connection attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How often each live channel's position is compared with Redis, to repair a lost last
    /// message of a channel that then went quiet.
    #[serde(with = "humantime_serde")]
    pub position_check: Duration,
    /// Which publications reach this hub: `interest` (only channels its clients watch) or
    /// `broadcast` (all of them, one pattern subscription; for comparison, see docs/benchmarks.md).
    pub routing: Routing,
    /// Partitions of `fleet` and of each `groups.<g>`: each is its own log (epoch, offsets,
    /// history) in its own hash slot, and a device always writes to the same one, so on a
    /// cluster the fleet's publications spread over the shards. Redis only; unset: 1 with
    /// `url`, 16 with `cluster_nodes`. Every hub of a pool must use the same number: another
    /// number names other logs (clients resume them with `recovered: false`).
    pub partitions: Option<u32>,
}

impl BrokerSettings {
    /// Partitions per split channel in effect (see [`BrokerSettings::partitions`]).
    pub fn partitions(&self) -> u32 {
        match self.partitions {
            Some(parts) => parts,
            None if !self.cluster_nodes.is_empty() => 16,
            None => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    #[default]
    Interest,
    Broadcast,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            url: None,
            cluster_nodes: Vec::new(),
            pool_size: 16,
            timeout: Duration::from_secs(2),
            position_check: Duration::from_secs(2),
            routing: Routing::Interest,
            partitions: None,
        }
    }
}

/// Simulated devices published by the hub itself, for a first run (off by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DemoSettings {
    /// How many (`demo-01`, `demo-02`, …); 0 turns the demo off.
    pub devices: usize,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for DemoSettings {
    fn default() -> Self {
        DemoSettings {
            devices: 0,
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HistorySettings {
    /// Messages kept per channel for recovery.
    pub size: usize,
    /// Age after which a message leaves the history.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a silent channel keeps its epoch and offset, and a silent device its last accepted
    /// `seq` for deduplication.
    #[serde(with = "humantime_serde")]
    pub meta_ttl: Duration,
    /// Devices whose latest message a channel keeps for snapshots (the least recently heard go
    /// first past it), and so the most a snapshot holds; a device silent for `meta_ttl` leaves.
    pub snapshot_devices: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            size: 1000,
            ttl: Duration::from_secs(300),
            meta_ttl: Duration::from_secs(24 * 3600),
            snapshot_devices: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest inbound message (after reassembling fragments), in bytes.
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    /// Subscribes per second per connection (token bucket with `subscribe_burst`): how fast one
    /// client can make the broker create channel state.
    pub subscribe_rate: f64,
    pub subscribe_burst: u32,
    /// Channels this hub holds state for at most: with the embedded broker every channel with
    /// history or subscribers, with Redis every channel its clients watch. A subscribe or a
    /// publication that needs a new channel past it is answered `unavailable`.
    pub max_channels: usize,
    /// Sustained publishes per second per device, across all its connections to this hub.
    pub publish_rate: f64,
    pub publish_burst: u32,
    pub max_connections: usize,
    /// Connections one device (an agent token's `sub`) may hold open on this hub. A device needs
    /// one; a few more cover connections a flapping link left behind until they time out.
    pub max_connections_per_agent: usize,
    /// Connections one viewer identity (a viewer token's `sub`) may hold open on this hub.
    pub max_connections_per_viewer: usize,
    /// New WebSocket connections admitted per second (reconnect storms).
    pub connect_rate: f64,
    pub connect_burst: u32,
    /// Frames queued per connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes queued per connection (replays included) before it counts as a slow consumer. A
    /// resume whose replay alone is larger is answered `recovered: false`.
    pub outbound_queue_bytes: usize,
    /// Kernel send buffer per connection, in bytes; absent: the kernel's autotuning (up to
    /// `net.ipv4.tcp_wmem`, 4 MiB by default). Bounding it bounds kernel memory per connection and
    /// makes a stalled client count as slow sooner.
    pub socket_send_buffer: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_subscriptions: 128,
            subscribe_rate: 20.0,
            subscribe_burst: 256,
            max_channels: 100_000,
            publish_rate: 100.0,
            publish_burst: 200,
            max_connections: 100_000,
            max_connections_per_agent: 16,
            max_connections_per_viewer: 256,
            connect_rate: 5_000.0,
            connect_burst: 10_000,
            outbound_queue: 1024,
            outbound_queue_bytes: 8 * 1024 * 1024,
            socket_send_buffer: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WsSettings {
    /// How often the hub pings each client. Keep it below every proxy's read timeout.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long after a ping with nothing heard from the peer it is closed (4002).
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        WsSettings {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ShutdownSettings {
    /// Longest time from SIGTERM to exit.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// How a pool of hubs agrees on who is online (the Redis broker; the embedded one needs none
/// of it). Each hub holds a lease it renews every `heartbeat`; a hub whose lease is `hub_ttl`
/// old is taken for dead by the others, which mark its devices offline (`hub_gone`). A device
/// of a killed hub is so marked offline within `hub_ttl + heartbeat` plus one broker round trip.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PresenceSettings {
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// At least twice `heartbeat`, so one late renewal is not taken for a death.
    #[serde(with = "humantime_serde")]
    pub hub_ttl: Duration,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        PresenceSettings {
            heartbeat: Duration::from_secs(2),
            hub_ttl: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// Loads defaults, then `file` if given, then `HUB_*` variables, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, None)
    }

    /// As [`Settings::load`], with the environment given explicitly (tests) instead of the process's.
    pub fn load_from(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let raw = |name: &str| match &env {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        let verbatim = [
            "HUB_AUTH__HS256_SECRET",
            "HUB_AUTH__ISSUER",
            "HUB_AUTH__AUDIENCE",
            "HUB_NODE_ID",
        ]
        .map(raw);
        let environment = config::Environment::with_prefix("HUB")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("auth.viewer_channels")
            .with_list_parse_key("broker.cluster_nodes")
            .source(env);
        let mut settings: Settings = builder.add_source(environment).build()?.try_deserialize()?;
        // `try_parsing` (which lists need) reads a digits-only value as a number, and a long one
        // as a float that has lost digits: these strings are taken as they were written.
        let [secret, issuer, audience, node_id] = verbatim;
        let strings = [
            (secret, &mut settings.auth.hs256_secret),
            (issuer, &mut settings.auth.issuer),
            (audience, &mut settings.auth.audience),
            (node_id, &mut settings.node_id),
        ];
        for (value, slot) in strings {
            if value.is_some() {
                *slot = value;
            }
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: the key material, patterns and limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry
            .validate()
            .map_err(|e| invalid("telemetry", e.to_string()))?;
        let auth = &self.auth;
        match (&auth.hs256_secret, &auth.public_key_file) {
            (None, None) if auth.jwks_file.is_none() => {
                return Err(invalid(
                    "auth.hs256_secret",
                    "set it (or auth.public_key_file, or auth.jwks_file): the hub refuses to run without token verification",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "auth.public_key_file",
                    "set either it or auth.hs256_secret, not both",
                ));
            }
            // RFC 7518 §3.2: an HS256 key at least as long as the hash. A short one is a password
            // an attacker can guess offline from any token.
            (Some(secret), None) if secret.len() < MIN_HS256_SECRET_BYTES => {
                return Err(invalid(
                    "auth.hs256_secret",
                    format!(
                        "is {} bytes; it must be at least {MIN_HS256_SECRET_BYTES} \
                         (generate one with `openssl rand -base64 32`)",
                        secret.len()
                    ),
                ));
            }
            (None, Some(path)) => {
                std::fs::metadata(path).map_err(|e| {
                    invalid("auth.public_key_file", format!("{}: {e}", path.display()))
                })?;
            }
            _ => {}
        }
        if auth.revocation_poll.is_zero() {
            return Err(invalid("auth.revocation_poll", "must be greater than zero"));
        }
        if auth.max_token_lifetime.is_zero() {
            return Err(invalid(
                "auth.max_token_lifetime",
                "must be greater than zero",
            ));
        }
        if let Some(path) = &auth.jwks_file {
            std::fs::metadata(path)
                .map_err(|e| invalid("auth.jwks_file", format!("{}: {e}", path.display())))?;
            if auth.jwks_poll.is_zero() {
                return Err(invalid("auth.jwks_poll", "must be greater than zero"));
            }
        }
        for pattern in auth.viewer_channels.iter().flatten() {
            ChannelPattern::parse(pattern)
                .map_err(|e| invalid("auth.viewer_channels", format!("`{pattern}`: {e}")))?;
        }
        if let Some(url) = &self.broker.url {
            if !self.broker.cluster_nodes.is_empty() {
                return Err(invalid(
                    "broker.cluster_nodes",
                    "set either it (a Redis Cluster) or broker.url (one Redis), not both",
                ));
            }
            redis::Client::open(url.as_str())
                .map_err(|e| invalid("broker.url", format!("`{url}`: {e}")))?;
        }
        if !self.broker.cluster_nodes.is_empty() && self.broker.routing == Routing::Broadcast {
            return Err(invalid(
                "broker.routing",
                "`broadcast` needs one Redis (broker.url): sharded pub/sub has no patterns",
            ));
        }
        for node in &self.broker.cluster_nodes {
            redis::Client::open(node.as_str())
                .map_err(|e| invalid("broker.cluster_nodes", format!("`{node}`: {e}")))?;
        }
        let broker = &self.broker;
        if let Some(parts) = broker.partitions {
            if broker.url.is_none() && broker.cluster_nodes.is_empty() {
                return Err(invalid(
                    "broker.partitions",
                    "applies to Redis only (broker.url or broker.cluster_nodes); the embedded broker keeps each channel as one log",
                ));
            }
            if !(1..=hub_protocol::MAX_PARTITIONS).contains(&parts) {
                return Err(invalid(
                    "broker.partitions",
                    format!("must be from 1 to {}", hub_protocol::MAX_PARTITIONS),
                ));
            }
        }
        if broker.pool_size == 0 || broker.timeout.is_zero() || broker.position_check.is_zero() {
            return Err(invalid(
                "broker",
                "broker.pool_size, broker.timeout and broker.position_check must be greater than zero",
            ));
        }
        let l = &self.limits;
        let positive: [(&'static str, bool); 14] = [
            ("limits.max_message_bytes", l.max_message_bytes >= 128),
            ("limits.max_subscriptions", l.max_subscriptions > 0),
            ("limits.subscribe_rate", l.subscribe_rate > 0.0),
            ("limits.subscribe_burst", l.subscribe_burst > 0),
            ("limits.max_channels", l.max_channels > 0),
            ("limits.publish_rate", l.publish_rate > 0.0),
            ("limits.publish_burst", l.publish_burst > 0),
            ("limits.max_connections", l.max_connections > 0),
            (
                "limits.max_connections_per_agent",
                l.max_connections_per_agent > 0,
            ),
            (
                "limits.max_connections_per_viewer",
                l.max_connections_per_viewer > 0,
            ),
            ("limits.connect_rate", l.connect_rate > 0.0),
            ("limits.connect_burst", l.connect_burst > 0),
            ("limits.outbound_queue", l.outbound_queue > 0),
            (
                "limits.outbound_queue_bytes",
                l.outbound_queue_bytes >= 64 * 1024,
            ),
        ];
        for (key, ok) in positive {
            if !ok {
                return Err(invalid(
                    key,
                    "must be greater than zero (max_message_bytes: at least 128)",
                ));
            }
        }
        // A queue that cannot hold two of the largest messages would cut every subscriber of a
        // channel the first time a device sends one.
        let largest = l.max_message_bytes.saturating_add(512);
        if l.outbound_queue_bytes < largest.saturating_mul(2) {
            return Err(invalid(
                "limits.outbound_queue_bytes",
                format!(
                    "must hold at least two of the largest messages: 2 x (limits.max_message_bytes + 512) = {}",
                    largest.saturating_mul(2)
                ),
            ));
        }
        if self.ws.ping_interval.is_zero() {
            return Err(invalid("ws.ping_interval", "must be greater than zero"));
        }
        if self.ws.pong_timeout.is_zero() {
            return Err(invalid("ws.pong_timeout", "must be greater than zero"));
        }
        if self.history.snapshot_devices == 0 {
            return Err(invalid(
                "history.snapshot_devices",
                "must be greater than zero",
            ));
        }
        let presence = &self.presence;
        if presence.heartbeat < Duration::from_millis(50)
            || presence.hub_ttl < presence.heartbeat.saturating_mul(2)
        {
            return Err(invalid(
                "presence.hub_ttl",
                "presence.heartbeat must be at least 50ms and presence.hub_ttl at least twice it",
            ));
        }
        if self.demo.devices > 0 && self.demo.interval < Duration::from_millis(10) {
            return Err(invalid("demo.interval", "must be at least 10ms"));
        }
        Ok(())
    }

    /// The node id, resolved as documented on the field.
    pub fn resolved_node_id(&self) -> String {
        self.node_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("hub-{:06x}", rand::random::<u32>() & 0xff_ffff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hub.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\n[auth]\nhs256_secret = \"from-file-from-file-from-file-32b!\"\n[limits]\nmax_subscriptions = 7\n",
        )
        .unwrap();
        let settings = Settings::load_from(
            Some(&file),
            env(&[
                ("HUB_LISTEN", "127.0.0.1:9100"),
                ("HUB_WS__PING_INTERVAL", "750ms"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(
            settings.auth.hs256_secret.as_deref(),
            Some("from-file-from-file-from-file-32b!")
        );
        assert_eq!(settings.limits.max_subscriptions, 7);
        assert_eq!(settings.ws.ping_interval, Duration::from_millis(750));
        assert_eq!(settings.history.size, 1000);
    }

    #[test]
    fn env_lists_and_numeric_secrets_parse() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("HUB_AUTH__HS256_SECRET", "12345678901234567890123456789012"),
                ("HUB_NODE_ID", "0042"),
                ("HUB_AUTH__VIEWER_CHANNELS", "fleet,devices.*"),
            ]),
        )
        .unwrap();
        assert_eq!(
            settings.auth.hs256_secret.as_deref(),
            Some("12345678901234567890123456789012"),
            "every digit kept"
        );
        assert_eq!(settings.node_id.as_deref(), Some("0042"));
        assert_eq!(
            settings.auth.viewer_channels.unwrap(),
            ["fleet", "devices.*"]
        );
    }

    #[test]
    fn cluster_seeds_come_as_a_list_and_exclude_a_single_url() {
        let secret = ("HUB_AUTH__HS256_SECRET", "12345678901234567890123456789012");
        let nodes = (
            "HUB_BROKER__CLUSTER_NODES",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        );
        let settings = Settings::load_from(None, env(&[secret, nodes])).unwrap();
        assert_eq!(
            settings.broker.cluster_nodes,
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        let both = env(&[secret, nodes, ("HUB_BROKER__URL", "redis://127.0.0.1:6379")]);
        let message = Settings::load_from(None, both).unwrap_err().to_string();
        assert!(
            message.contains("broker.cluster_nodes") && message.contains("broker.url"),
            "{message}"
        );
    }

    #[test]
    fn partitions_default_by_broker_and_need_redis() {
        let secret = ("HUB_AUTH__HS256_SECRET", "12345678901234567890123456789012");
        let url = ("HUB_BROKER__URL", "redis://127.0.0.1:6379");
        let nodes = ("HUB_BROKER__CLUSTER_NODES", "redis://127.0.0.1:7000");
        let load = |vars: &[(&str, &str)]| Settings::load_from(None, env(vars));
        assert_eq!(load(&[secret, url]).unwrap().broker.partitions(), 1);
        assert_eq!(load(&[secret, nodes]).unwrap().broker.partitions(), 16);
        let four = ("HUB_BROKER__PARTITIONS", "4");
        assert_eq!(load(&[secret, url, four]).unwrap().broker.partitions(), 4);
        let embedded = load(&[secret, four]).unwrap_err().to_string();
        assert!(embedded.contains("broker.partitions"), "{embedded}");
        let zero = load(&[secret, url, ("HUB_BROKER__PARTITIONS", "0")]);
        assert!(zero.unwrap_err().to_string().contains("from 1 to 256"));
    }

    #[test]
    fn the_example_file_loads_with_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("hub.example.toml");
        let settings = Settings::load_from(Some(&file), env(&[])).unwrap();
        let defaults = Settings::default();
        assert_eq!(settings.listen, defaults.listen);
        assert_eq!(
            settings.limits.outbound_queue,
            defaults.limits.outbound_queue
        );
        assert_eq!(settings.history.meta_ttl, defaults.history.meta_ttl);
        assert_eq!(settings.ws.ping_interval, defaults.ws.ping_interval);
        assert_eq!(
            settings.shutdown.drain_timeout,
            defaults.shutdown.drain_timeout
        );
        assert_eq!(settings.presence.hub_ttl, defaults.presence.hub_ttl);
        assert_eq!(settings.presence.heartbeat, defaults.presence.heartbeat);
    }

    const GOOD: &str = "a-secret-of-at-least-thirty-two-bytes";

    #[test]
    fn a_queue_too_small_for_the_largest_message_is_refused() {
        let e = Settings::load_from(
            None,
            env(&[
                ("HUB_AUTH__HS256_SECRET", GOOD),
                ("HUB_LIMITS__OUTBOUND_QUEUE_BYTES", "65536"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limits.outbound_queue_bytes"), "{e}");
    }

    #[test]
    fn a_short_hs256_secret_is_refused_naming_the_key() {
        for short in ["s", "0123456789012345678901234567890"] {
            let e = Settings::load_from(None, env(&[("HUB_AUTH__HS256_SECRET", short)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("auth.hs256_secret") && e.contains("at least 32"),
                "{e}"
            );
        }
        assert!(Settings::load_from(None, env(&[("HUB_AUTH__HS256_SECRET", GOOD)])).is_ok());
    }

    #[test]
    fn errors_name_the_key() {
        let err = |pairs: &[(&str, &str)]| {
            Settings::load_from(None, env(pairs))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("auth.hs256_secret"));
        let e = err(&[
            ("HUB_AUTH__HS256_SECRET", GOOD),
            ("HUB_LIMITS__MAX_CONNECTIONS", "many"),
        ]);
        assert!(e.contains("limits.max_connections"), "{e}");
        let e = err(&[("HUB_AUTH__HS256_SECRET", GOOD), ("HUB_LISTEN", "nowhere")]);
        assert!(e.contains("listen"), "{e}");
        let e = err(&[
            ("HUB_AUTH__HS256_SECRET", GOOD),
            ("HUB_LIMITS__OUTBOUND_QUEUE", "0"),
        ]);
        assert!(e.contains("limits.outbound_queue"), "{e}");
        let e = err(&[
            ("HUB_AUTH__HS256_SECRET", GOOD),
            ("HUB_AUTH__VIEWER_CHANNELS", "dev*"),
        ]);
        assert!(e.contains("auth.viewer_channels"), "{e}");
        let e = err(&[("HUB_AUTH__PUBLIC_KEY_FILE", "/nonexistent/key.pem")]);
        assert!(e.contains("auth.public_key_file"), "{e}");
        let e = err(&[
            ("HUB_AUTH__HS256_SECRET", GOOD),
            ("HUB_WS__PING_INTERVAL", "soon"),
        ]);
        assert!(e.contains("ws.ping_interval"), "{e}");
        let e = err(&[
            ("HUB_AUTH__HS256_SECRET", GOOD),
            ("HUB_PRESENCE__HEARTBEAT", "2s"),
            ("HUB_PRESENCE__HUB_TTL", "3s"),
        ]);
        assert!(
            e.contains("presence.hub_ttl"),
            "a lease of under two beats: {e}"
        );
    }
}
