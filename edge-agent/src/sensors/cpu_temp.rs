//! SoC temperature from the kernel thermal framework.
//!
//! `/sys/class/thermal/thermal_zone0/temp` holds millidegrees Celsius as a decimal integer
//! (e.g. `48686`). On a Pi, zone 0 is the SoC sensor.

use std::path::PathBuf;

use super::{FileSensor, Metric, SensorError};

pub const DEFAULT_PATH: &str = "/sys/class/thermal/thermal_zone0/temp";

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTempSettings {
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

fn default_path() -> PathBuf {
    PathBuf::from(DEFAULT_PATH)
}

impl Default for CpuTempSettings {
    fn default() -> Self {
        Self {
            path: default_path(),
        }
    }
}

/// Converts the content of a thermal zone `temp` file to degrees Celsius.
pub fn parse_millidegrees(text: &str) -> Result<f64, SensorError> {
    let trimmed = text.trim();
    let milli: i64 = trimmed.parse().map_err(|e| SensorError::Parse {
        what: "thermal zone temperature".into(),
        detail: format!("{trimmed:?} is not an integer number of millidegrees ({e})"),
    })?;
    Ok(milli as f64 / 1000.0)
}

/// The `cpu_temp` sensor: one metric, `cpu_temp` in °C.
pub fn open(settings: &CpuTempSettings, name: String) -> Result<FileSensor, SensorError> {
    FileSensor::open(
        name,
        &settings.path,
        "no thermal zone 0 on this kernel",
        |text| {
            Ok(vec![Metric::new(
                "cpu_temp",
                parse_millidegrees(text)?,
                "C",
            )])
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::Sensor;
    use crate::sensors::test_support::{fixture, fixture_text};

    #[test]
    fn a_thermal_zone_reading_is_converted_from_millidegrees() {
        let c = parse_millidegrees(&fixture_text("thermal_zone0_temp")).unwrap();
        assert!((c - 48.686).abs() < 1e-9);
    }

    #[test]
    fn a_below_zero_thermal_zone_reading_is_negative() {
        let c = parse_millidegrees(&fixture_text("thermal_zone0_temp_negative")).unwrap();
        assert!((c + 5.25).abs() < 1e-9);
    }

    #[test]
    fn an_empty_or_garbage_thermal_zone_file_is_a_parse_error() {
        for name in ["thermal_zone0_temp_empty", "thermal_zone0_temp_garbage"] {
            let err = parse_millidegrees(&fixture_text(name)).unwrap_err();
            assert!(matches!(err, SensorError::Parse { .. }), "{name}: {err}");
        }
    }

    #[test]
    fn the_sensor_reports_cpu_temp_in_celsius() {
        let settings = CpuTempSettings {
            path: fixture("thermal_zone0_temp"),
        };
        let mut sensor = open(&settings, "cpu_temp".into()).unwrap();
        assert_eq!(
            sensor.read().unwrap(),
            vec![Metric::new("cpu_temp", 48.686, "C")]
        );
    }

    #[test]
    fn a_parse_error_from_the_sensor_names_the_file() {
        let settings = CpuTempSettings {
            path: fixture("thermal_zone0_temp_garbage"),
        };
        let err = open(&settings, "cpu_temp".into())
            .unwrap()
            .read()
            .unwrap_err();
        assert!(
            err.to_string().contains("thermal_zone0_temp_garbage"),
            "{err}"
        );
    }
}
