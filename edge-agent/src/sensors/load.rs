//! System load averages from `/proc/loadavg`.
//!
//! Format: `0.52 0.58 0.59 1/391 12345` — 1, 5 and 15 minute averages, then
//! running/total scheduling entities and the last PID (both ignored).

use std::path::PathBuf;

use super::{FileSensor, Metric, SensorError};

pub const DEFAULT_PATH: &str = "/proc/loadavg";

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSettings {
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

fn default_path() -> PathBuf {
    PathBuf::from(DEFAULT_PATH)
}

impl Default for LoadSettings {
    fn default() -> Self {
        Self {
            path: default_path(),
        }
    }
}

/// The three load averages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadAvg {
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

impl LoadAvg {
    pub fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("load1", self.load1, ""),
            Metric::new("load5", self.load5, ""),
            Metric::new("load15", self.load15, ""),
        ]
    }
}

/// Parses the content of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Result<LoadAvg, SensorError> {
    let mut fields = text.split_whitespace();
    let mut next = |label: &str| -> Result<f64, SensorError> {
        let field = fields.next().ok_or_else(|| SensorError::Parse {
            what: "/proc/loadavg".into(),
            detail: format!("missing the {label} average in {:?}", text.trim()),
        })?;
        field.parse().map_err(|e| SensorError::Parse {
            what: "/proc/loadavg".into(),
            detail: format!("{label} average {field:?} is not a number ({e})"),
        })
    };
    Ok(LoadAvg {
        load1: next("1 minute")?,
        load5: next("5 minute")?,
        load15: next("15 minute")?,
    })
}

/// The `load` sensor: `load1`, `load5`, `load15`.
pub fn open(settings: &LoadSettings, name: String) -> Result<FileSensor, SensorError> {
    FileSensor::open(name, &settings.path, "is /proc mounted?", |text| {
        Ok(parse_loadavg(text)?.metrics())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::test_support::fixture_text;

    #[test]
    fn the_three_load_averages_are_read_from_proc_loadavg() {
        let load = parse_loadavg(&fixture_text("loadavg")).unwrap();
        assert_eq!(
            load,
            LoadAvg {
                load1: 0.52,
                load5: 0.58,
                load15: 0.59
            }
        );
        let busy = parse_loadavg(&fixture_text("loadavg_busy")).unwrap();
        assert_eq!(busy.load1, 3.05);
        assert_eq!(
            busy.metrics()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["load1", "load5", "load15"]
        );
    }

    #[test]
    fn a_truncated_loadavg_is_a_parse_error_naming_the_missing_field() {
        let err = parse_loadavg(&fixture_text("loadavg_truncated")).unwrap_err();
        assert!(err.to_string().contains("15 minute"), "{err}");
        assert!(parse_loadavg("").is_err());
        assert!(parse_loadavg("a b c 1/2 3").is_err());
    }
}
