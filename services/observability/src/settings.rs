//! What an operator sets: the log format and where OpenTelemetry data goes.
//!
//! Each binary embeds these in its own settings (`[log]` and `[telemetry]`). Where a field is
//! left out, the standard `OTEL_*` environment variables apply, as in any OpenTelemetry SDK.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a binary logs to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` inside a traced span.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.trim() {
            "grpc" => Some(Protocol::Grpc),
            "http/protobuf" => Some(Protocol::HttpProtobuf),
            _ => None,
        }
    }
}

/// OTLP export. Off unless an endpoint is set here or in `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and always off with `OTEL_SDK_DISABLED=true`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct TelemetrySettings {
    /// Collector base URL, e.g. `http://otel-collector:4318` (HTTP) or `http://...:4317`
    /// (gRPC); HTTP appends `/v1/traces` and `/v1/metrics`. `https://` turns TLS on.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`; else `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub protocol: Option<Protocol>,
    /// Extra request headers (API keys); `OTEL_EXPORTER_OTLP_HEADERS` adds to them.
    pub headers: HashMap<String, String>,
    /// Fraction of new traces recorded (0.0–1.0); a trace started upstream follows its parent's
    /// decision. Unset: `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` if set, else 0.01.
    pub sample_ratio: Option<f64>,
    /// `service.name`; else `OTEL_SERVICE_NAME`, else the binary's name.
    pub service_name: Option<String>,
    /// Also export metrics over OTLP (they are always on the Prometheus endpoint).
    pub metrics: bool,
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Per export; else `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            endpoint: None,
            protocol: None,
            headers: HashMap::new(),
            sample_ratio: None,
            service_name: None,
            metrics: true,
            metrics_interval: Duration::from_secs(60),
            timeout: None,
        }
    }
}

/// Why the telemetry settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("telemetry.sample_ratio must be within 0.0..=1.0, not {0}")]
    SampleRatio(f64),
    #[error("telemetry.endpoint `{0}` is not an http:// or https:// URL")]
    Endpoint(String),
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL `{0}` is not supported: use grpc or http/protobuf")]
    Protocol(String),
    #[error("telemetry.metrics_interval and telemetry.timeout must be above zero")]
    Interval,
}

/// Reads the process environment; a seam so tests need not mutate it.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl TelemetrySettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(r) = self.sample_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(SettingsError::SampleRatio(r));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(SettingsError::Endpoint(e.clone()));
        }
        if self.metrics_interval.is_zero() || self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(SettingsError::Interval);
        }
        Ok(())
    }

    /// Whether anything is exported at all.
    pub fn enabled(&self, env: &impl Env) -> bool {
        let disabled = env
            .var("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        !disabled
            && (self.endpoint.is_some()
                || env.var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || env.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
    }

    pub fn resolved_protocol(&self, env: &impl Env) -> Result<Protocol, SettingsError> {
        if let Some(p) = self.protocol {
            return Ok(p);
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(v) = env.var(name) {
                return Protocol::parse(&v).ok_or(SettingsError::Protocol(v));
            }
        }
        Ok(Protocol::HttpProtobuf)
    }

    pub fn resolved_timeout(&self, env: &impl Env) -> Duration {
        self.timeout
            .or_else(|| {
                let ms = env.var("OTEL_EXPORTER_OTLP_TIMEOUT")?.trim().parse().ok()?;
                Some(Duration::from_millis(ms)).filter(|d| !d.is_zero())
            })
            .unwrap_or(Duration::from_secs(10))
    }

    /// Where traces go, when the settings or the environment say (else the SDK's default).
    pub fn resolved_endpoint(&self, env: &impl Env) -> Option<String> {
        self.endpoint.clone().or_else(|| {
            env.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| env.var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        })
    }

    pub fn resolved_service_name(&self, env: &impl Env, default: &str) -> String {
        self.service_name
            .clone()
            .or_else(|| env.var("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| default.to_owned())
    }

    /// The ratio to sample new traces at; `None` leaves the choice to `OTEL_TRACES_SAMPLER`.
    pub fn resolved_sample_ratio(&self, env: &impl Env) -> Option<f64> {
        match self.sample_ratio {
            Some(r) => Some(r),
            None if env.var("OTEL_TRACES_SAMPLER").is_some() => None,
            None => Some(DEFAULT_SAMPLE_RATIO),
        }
    }
}

/// One trace in a hundred: enough to see every path of a busy fleet, cheap for the collector.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

#[cfg(test)]
mod tests {
    use super::*;

    struct Vars(&'static [(&'static str, &'static str)]);
    impl Env for Vars {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn off_unless_an_endpoint_is_set_and_never_when_the_sdk_is_disabled() {
        let settings = TelemetrySettings::default();
        assert!(!settings.enabled(&Vars(&[])));
        assert!(settings.enabled(&Vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])));
        let configured = TelemetrySettings {
            endpoint: Some("http://c:4317".into()),
            ..TelemetrySettings::default()
        };
        assert!(configured.enabled(&Vars(&[])));
        assert!(!configured.enabled(&Vars(&[("OTEL_SDK_DISABLED", "TRUE")])));
    }

    #[test]
    fn settings_win_over_the_environment_which_wins_over_defaults() {
        let env = Vars(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "from-env"),
        ]);
        let mut settings = TelemetrySettings::default();
        assert_eq!(settings.resolved_protocol(&env).unwrap(), Protocol::Grpc);
        assert_eq!(settings.resolved_service_name(&env, "hub"), "from-env");
        assert_eq!(settings.resolved_service_name(&Vars(&[]), "hub"), "hub");
        assert_eq!(
            settings.resolved_protocol(&Vars(&[])).unwrap(),
            Protocol::HttpProtobuf
        );
        settings.protocol = Some(Protocol::HttpProtobuf);
        settings.service_name = Some("edge".into());
        assert_eq!(
            settings.resolved_protocol(&env).unwrap(),
            Protocol::HttpProtobuf
        );
        assert_eq!(settings.resolved_service_name(&env, "hub"), "edge");
    }

    #[test]
    fn timeout_and_endpoint_come_from_settings_then_the_environment() {
        let env = Vars(&[
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
        ]);
        let mut settings = TelemetrySettings::default();
        assert_eq!(settings.resolved_timeout(&env), Duration::from_millis(2500));
        assert_eq!(
            settings.resolved_timeout(&Vars(&[])),
            Duration::from_secs(10)
        );
        assert_eq!(
            settings.resolved_endpoint(&env).as_deref(),
            Some("https://c:4317")
        );
        settings.timeout = Some(Duration::from_secs(1));
        settings.endpoint = Some("http://local:4318".into());
        assert_eq!(settings.resolved_timeout(&env), Duration::from_secs(1));
        assert_eq!(
            settings.resolved_endpoint(&env).as_deref(),
            Some("http://local:4318")
        );
    }

    #[test]
    fn sampling_defaults_to_one_percent_unless_the_environment_chooses() {
        let settings = TelemetrySettings::default();
        assert_eq!(
            settings.resolved_sample_ratio(&Vars(&[])),
            Some(DEFAULT_SAMPLE_RATIO)
        );
        let env = Vars(&[("OTEL_TRACES_SAMPLER", "always_on")]);
        assert_eq!(settings.resolved_sample_ratio(&env), None);
        let set = TelemetrySettings {
            sample_ratio: Some(1.0),
            ..TelemetrySettings::default()
        };
        assert_eq!(set.resolved_sample_ratio(&env), Some(1.0));
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let bad_ratio = TelemetrySettings {
            sample_ratio: Some(1.5),
            ..TelemetrySettings::default()
        };
        assert!(
            bad_ratio
                .validate()
                .unwrap_err()
                .to_string()
                .contains("sample_ratio")
        );
        let bad_url = TelemetrySettings {
            endpoint: Some("collector:4317".into()),
            ..TelemetrySettings::default()
        };
        assert!(
            bad_url
                .validate()
                .unwrap_err()
                .to_string()
                .contains("endpoint")
        );
        let env = Vars(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
        assert!(
            TelemetrySettings::default()
                .resolved_protocol(&env)
                .is_err()
        );
    }
}
