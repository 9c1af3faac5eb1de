//! Agent settings: `/etc/edge-agent/agent.toml` (or `--config`), then `AGENT_*` environment
//! variables with `__` between levels (`AGENT_HUB__URL`, `AGENT_AUTH__TOKEN_FILE`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sensors::SensorSettings;
use crate::store::{FsyncPolicy, StoreConfig};

/// Where the agent looks for its file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edge-agent/agent.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub hub: HubSettings,
    pub auth: AuthSettings,
    pub storage: StorageSettings,
    /// Sensors to read, each at its own interval. Empty with `simulate`: the simulated source.
    pub sensors: Vec<SensorSettings>,
    /// Read only the simulated source (any Linux box; demos, tests, load tests).
    pub simulate: bool,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    /// OpenTelemetry export: a trace per batch of readings, continued by the hubs. Off unless an
    /// endpoint is set here or in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub telemetry: TelemetrySettings,
}

/// How the agent logs to stderr (journald keeps it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (default) or `json` (one object per line, for log shippers).
    pub format: LogFormat,
}

pub use observability::{LogFormat, TelemetrySettings};

/// The agent's own Prometheus endpoint, off unless `listen` is set (e.g. "127.0.0.1:9464").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubSettings {
    /// `ws://host:port/ws` or `wss://host/ws`.
    pub url: String,
    /// PEM file of the CA(s) to trust for `wss://` instead of the system roots.
    pub ca_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// No frame from the hub for this long (it pings every 20 s) means the link is dead.
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    /// Reconnect backoff: full jitter between 0 and min(cap, base * 2^attempt).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Wait after the hub refused the token (401/403): retrying at once cannot help.
    #[serde(with = "humantime_serde")]
    pub auth_backoff: Duration,
    /// Readings sent ahead of their acks when the agent is behind.
    pub max_in_flight: usize,
    /// Readings per second the agent sends at most (below the hub's `limits.publish_rate`).
    pub publish_rate: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// The device's JWT (role `agent`, `sub` = device id). Prefer `token_file`.
    pub token: Option<String>,
    /// File holding the JWT; read again before every connection, so it can be rotated.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory of the reading log and the state file.
    pub dir: PathBuf,
    /// The log's size bound; when full the oldest readings are dropped and counted.
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// `interval` (sync every `fsync_interval`: a power cut loses at most that much) or
    /// `always` (sync every reading: more flash wear).
    pub fsync: Fsync,
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    Interval,
    Always,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            url: "ws://127.0.0.1:8080/ws".into(),
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            dead_after: Duration::from_secs(45),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            auth_backoff: Duration::from_secs(300),
            max_in_flight: 32,
            publish_rate: 50.0,
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            dir: PathBuf::from("/var/lib/edge-agent"),
            max_bytes: 64 * 1024 * 1024,
            segment_bytes: 1024 * 1024,
            fsync: Fsync::Interval,
            fsync_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Settings {
    /// Loads `path` (required when given; else the default path if it exists), then the
    /// environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let file = match path {
            Some(p) => config::File::from(p).required(true),
            None => config::File::with_name(DEFAULT_PATH).required(false),
        };
        let settings: Settings = config::Config::builder()
            .add_source(file.format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("AGENT")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let url = &self.hub.url;
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return invalid("hub.url must start with ws:// or wss://");
        }
        if self.auth.token.is_none() && self.auth.token_file.is_none() {
            return invalid("set auth.token or auth.token_file");
        }
        if self.hub.max_in_flight == 0 || self.hub.publish_rate <= 0.0 {
            return invalid("hub.max_in_flight and hub.publish_rate must be greater than zero");
        }
        if self.hub.dead_after.is_zero() || self.hub.connect_timeout.is_zero() {
            return invalid("hub.dead_after and hub.connect_timeout must be greater than zero");
        }
        if self.hub.backoff_base.is_zero() || self.hub.backoff_cap < self.hub.backoff_base {
            return invalid("need 0 < hub.backoff_base <= hub.backoff_cap");
        }
        if !self.simulate && self.sensors.is_empty() {
            return invalid("no [[sensors]] configured (or run with --simulate)");
        }
        self.telemetry
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The token as it is now (the file is read again on every call).
    pub fn token(&self) -> Result<String, ConfigError> {
        if let Some(path) = &self.auth.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
                path: path.clone(),
                source,
            })?;
            return Ok(text.trim().to_owned());
        }
        Ok(self.auth.token.clone().unwrap_or_default())
    }

    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            dir: self.storage.dir.clone(),
            max_bytes: self.storage.max_bytes,
            segment_bytes: self.storage.segment_bytes,
            fsync: match self.storage.fsync {
                Fsync::Always => FsyncPolicy::Always,
                Fsync::Interval => FsyncPolicy::Interval(self.storage.fsync_interval),
            },
        }
    }

    /// The effective settings as TOML, secrets masked (`--check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        if let Some(token) = &mut shown.auth.token {
            *token = mask(token);
        }
        // Collector headers usually hold API keys.
        for value in shown.telemetry.headers.values_mut() {
            *value = mask(value);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn mask(secret: &str) -> String {
    format!("***({} characters)", secret.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let s: Settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn the_documented_keys_keep_their_names() {
        let s = from_toml(
            r#"
            simulate = true
            [hub]
            url = "wss://hub.example.com/ws"
            [auth]
            token_file = "/etc/edge-agent/token"
            [storage]
            dir = "/var/lib/edge-agent"
            fsync = "always"
            "#,
        )
        .unwrap();
        assert_eq!(s.hub.url, "wss://hub.example.com/ws");
        assert_eq!(
            s.auth.token_file.as_deref(),
            Some(Path::new("/etc/edge-agent/token"))
        );
        assert_eq!(s.storage.fsync, Fsync::Always);
    }

    #[test]
    fn a_misspelt_key_is_an_error_not_a_silent_default() {
        let err = from_toml("simulate = true\n[hub]\nurll = \"ws://x/ws\"").unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn settings_without_a_token_or_sensors_are_refused() {
        let err = from_toml("simulate = true").unwrap_err();
        assert!(err.to_string().contains("auth.token"), "{err}");
        let err = from_toml("[auth]\ntoken = \"t\"").unwrap_err();
        assert!(err.to_string().contains("sensors"), "{err}");
    }

    #[test]
    fn check_config_masks_the_token() {
        let s = from_toml("simulate = true\n[auth]\ntoken = \"eyJhbGciOi.secret.sig\"").unwrap();
        let shown = s.to_masked_toml();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("***(21 characters)"), "{shown}");
    }
}
