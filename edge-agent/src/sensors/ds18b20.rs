//! DS18B20 1-Wire temperature probes through the kernel `w1_therm` driver.
//!
//! Each probe appears as `/sys/bus/w1/devices/28-<serial>/w1_slave` (family code 0x28).
//! Reading the file makes the kernel run a conversion (up to 750 ms per probe at 12-bit
//! resolution, the reason `read()` belongs on a blocking thread) and returns two lines:
//!
//! ```text
//! 72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
//! 72 01 4b 46 7f ff 0e 10 57 t=23125
//! ```
//!
//! the nine scratchpad bytes with the kernel's CRC verdict, then the temperature in
//! millidegrees Celsius. Faults seen in the field and rejected here: `crc=.. NO` (noise,
//! long cable, missing pull-up), `t=85000` (the power-on reset value: the probe was reset
//! before converting, typically a weak supply in parasitic mode), and an all-zero
//! scratchpad, whose CRC is also zero and so passes as `YES` when the data line is shorted.

use std::path::{Path, PathBuf};

use super::{Metric, Sensor, SensorError, read_text};

pub const DEFAULT_BASE_DIR: &str = "/sys/bus/w1/devices";
const FAMILY_PREFIX: &str = "28-";
const POWER_ON_RESET_MILLI: i64 = 85_000;
/// Datasheet measuring range, -55 °C to +125 °C.
const RANGE_MILLI: std::ops::RangeInclusive<i64> = -55_000..=125_000;

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ds18b20Settings {
    #[serde(default = "default_base_dir")]
    pub base_dir: PathBuf,
    /// Probes to read, e.g. `["28-0316a2794aff"]` (the `28-` may be left out). Empty: every
    /// `28-*` device present at read time, so hot-plugged probes are picked up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}

fn default_base_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BASE_DIR)
}

impl Default for Ds18b20Settings {
    fn default() -> Self {
        Self {
            base_dir: default_base_dir(),
            ids: Vec::new(),
        }
    }
}

/// Parses one `w1_slave` file of the probe `device` into degrees Celsius.
pub fn parse_w1_slave(device: &str, text: &str) -> Result<f64, SensorError> {
    let malformed = |detail: &str| SensorError::Parse {
        what: format!("w1_slave of {device}"),
        detail: format!("{detail}: {:?}", text.trim()),
    };
    let mut lines = text.lines();
    let crc_line = lines.next().ok_or_else(|| malformed("empty file"))?;
    let (bytes, verdict) = crc_line
        .split_once(" crc=")
        .ok_or_else(|| malformed("no crc verdict on the first line"))?;
    match verdict.split_whitespace().nth(1) {
        Some("YES") => {}
        Some("NO") => {
            return Err(SensorError::Crc {
                device: device.to_string(),
            });
        }
        _ => return Err(malformed("crc verdict is neither YES nor NO")),
    }
    let scratchpad: Vec<&str> = bytes.trim_end_matches(':').split_whitespace().collect();
    if scratchpad.len() == 9 && scratchpad.iter().all(|b| *b == "00") {
        return Err(SensorError::Bus(format!(
            "{device} returned an all-zero scratchpad (data line shorted or probe disconnected)"
        )));
    }

    let temp_line = lines
        .next()
        .ok_or_else(|| malformed("truncated: no temperature line"))?;
    let (_, milli) = temp_line
        .rsplit_once("t=")
        .ok_or_else(|| malformed("no t= on the second line"))?;
    let milli: i64 = milli
        .trim()
        .parse()
        .map_err(|_| malformed("t= is not an integer"))?;
    if milli == POWER_ON_RESET_MILLI {
        return Err(SensorError::PowerOnReset {
            device: device.to_string(),
        });
    }
    if !RANGE_MILLI.contains(&milli) {
        return Err(malformed(
            "temperature outside the DS18B20 range of -55..=125 °C",
        ));
    }
    Ok(milli as f64 / 1000.0)
}

/// Metric name for a probe: `ds18b20_<serial>`, e.g. `ds18b20_0316a2794aff`.
pub fn metric_name(device: &str) -> String {
    format!(
        "ds18b20_{}",
        device.strip_prefix(FAMILY_PREFIX).unwrap_or(device)
    )
}

pub struct Ds18b20 {
    name: String,
    base_dir: PathBuf,
    ids: Vec<String>,
}

impl Ds18b20 {
    pub fn open(settings: &Ds18b20Settings, name: String) -> Result<Self, SensorError> {
        if !settings.base_dir.is_dir() {
            return Err(SensorError::NotFound(format!(
                "{} does not exist: the 1-Wire bus is not enabled (on a Raspberry Pi add \
                 dtoverlay=w1-gpio to config.txt)",
                settings.base_dir.display()
            )));
        }
        let ids = settings
            .ids
            .iter()
            .map(|id| normalize_id(id))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name,
            base_dir: settings.base_dir.clone(),
            ids,
        })
    }

    /// Configured probes, or every `28-*` device currently on the bus.
    fn probes(&self) -> Result<Vec<String>, SensorError> {
        if !self.ids.is_empty() {
            return Ok(self.ids.clone());
        }
        let entries = std::fs::read_dir(&self.base_dir).map_err(|source| SensorError::Io {
            path: self.base_dir.clone(),
            source,
        })?;
        let mut found: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.starts_with(FAMILY_PREFIX))
            .collect();
        // Stable metric order regardless of directory order.
        found.sort();
        Ok(found)
    }

    fn read_probe(&self, device: &str) -> Result<f64, SensorError> {
        let path: PathBuf = [
            self.base_dir.as_path(),
            Path::new(device),
            Path::new("w1_slave"),
        ]
        .iter()
        .collect();
        parse_w1_slave(device, &read_text(&path)?)
    }
}

fn normalize_id(id: &str) -> Result<String, SensorError> {
    let id = id.trim();
    let serial = id.strip_prefix(FAMILY_PREFIX).unwrap_or(id);
    if serial.is_empty() || !serial.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(SensorError::InvalidConfig(format!(
            "DS18B20 id {id:?} is not of the form 28-<hex serial>"
        )));
    }
    Ok(format!("{FAMILY_PREFIX}{serial}"))
}

impl Sensor for Ds18b20 {
    fn name(&self) -> &str {
        &self.name
    }

    /// Returns every readable probe plus `ds18b20_failed_probes`; a faulty probe is logged
    /// and does not hide the others. Fails only when no probe could be read.
    fn read(&mut self) -> Result<Vec<Metric>, SensorError> {
        let probes = self.probes()?;
        if probes.is_empty() {
            return Err(SensorError::NotFound(format!(
                "no DS18B20 probes (28-*) under {}",
                self.base_dir.display()
            )));
        }
        let mut metrics = Vec::with_capacity(probes.len() + 1);
        let mut first_error = None;
        let mut failed = 0u32;
        for device in &probes {
            match self.read_probe(device) {
                Ok(celsius) => metrics.push(Metric::new(metric_name(device), celsius, "C")),
                Err(error) => {
                    tracing::warn!(sensor = %self.name, probe = %device, %error, "DS18B20 probe unreadable");
                    failed += 1;
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) if metrics.is_empty() => Err(error),
            _ => {
                metrics.push(Metric::new("ds18b20_failed_probes", f64::from(failed), ""));
                Ok(metrics)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::test_support::{fixture, fixture_text, metric};

    const DEV: &str = "28-0316a2794aff";

    fn parse(name: &str) -> Result<f64, SensorError> {
        parse_w1_slave(DEV, &fixture_text(name))
    }

    fn sensor(dir: &str, ids: &[&str]) -> Ds18b20 {
        let settings = Ds18b20Settings {
            base_dir: fixture(dir),
            ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        Ds18b20::open(&settings, "ds18b20".into()).unwrap()
    }

    #[test]
    fn a_good_ds18b20_reading_is_converted_to_celsius() {
        assert_eq!(parse("w1_slave_good").unwrap(), 23.125);
    }

    #[test]
    fn a_ds18b20_reading_below_zero_is_negative() {
        assert_eq!(parse("w1_slave_negative").unwrap(), -10.125);
    }

    #[test]
    fn a_ds18b20_reading_with_a_failed_crc_is_rejected() {
        let err = parse("w1_slave_crc_no").unwrap_err();
        assert!(
            matches!(err, SensorError::Crc { ref device } if device == DEV),
            "{err}"
        );
    }

    #[test]
    fn the_85_degree_power_on_reset_value_is_rejected() {
        let err = parse("w1_slave_power_on_reset").unwrap_err();
        assert!(matches!(err, SensorError::PowerOnReset { .. }), "{err}");
    }

    #[test]
    fn an_all_zero_scratchpad_is_rejected_although_its_crc_passes() {
        let err = parse("w1_slave_all_zero").unwrap_err();
        assert!(matches!(err, SensorError::Bus(_)), "{err}");
    }

    #[test]
    fn truncated_empty_and_garbage_files_are_parse_errors() {
        for name in ["w1_slave_truncated", "w1_slave_empty", "w1_slave_garbage"] {
            let err = parse(name).unwrap_err();
            assert!(matches!(err, SensorError::Parse { .. }), "{name}: {err}");
            assert!(err.to_string().contains(DEV), "{name}: {err}");
        }
    }

    #[test]
    fn a_temperature_outside_the_sensor_range_is_rejected() {
        let text = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=127937\n";
        assert!(parse_w1_slave(DEV, text).is_err());
    }

    #[test]
    fn every_probe_on_the_bus_is_read_and_a_faulty_one_does_not_hide_the_others() {
        let metrics = sensor("w1_devices", &[]).read().unwrap();
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ds18b20_01191b6e0c4d",
                "ds18b20_0316a2794aff",
                "ds18b20_failed_probes"
            ]
        );
        assert_eq!(metric(&metrics, "ds18b20_01191b6e0c4d").value, -10.125);
        assert_eq!(metric(&metrics, "ds18b20_0316a2794aff").value, 23.125);
        assert_eq!(metric(&metrics, "ds18b20_0316a2794aff").unit, "C");
        assert_eq!(metric(&metrics, "ds18b20_failed_probes").value, 1.0);
    }

    #[test]
    fn only_the_configured_probes_are_read() {
        let metrics = sensor("w1_devices", &["0316a2794aff"]).read().unwrap();
        assert_eq!(metrics[0], Metric::new("ds18b20_0316a2794aff", 23.125, "C"));
        assert_eq!(metric(&metrics, "ds18b20_failed_probes").value, 0.0);
    }

    #[test]
    fn reading_fails_only_when_no_probe_is_readable() {
        let err = sensor("w1_devices_all_bad", &[]).read().unwrap_err();
        // The first probe in sorted order is the one stuck at the power-on value.
        assert!(matches!(err, SensorError::PowerOnReset { .. }), "{err}");
    }

    #[test]
    fn a_configured_probe_that_is_missing_is_an_io_error() {
        let err = sensor("w1_devices", &["28-ffffffffffff"])
            .read()
            .unwrap_err();
        assert!(matches!(err, SensorError::Io { .. }), "{err}");
    }

    #[test]
    fn a_bus_without_probes_is_reported_as_not_found() {
        let err = sensor("w1_devices_empty", &[]).read().unwrap_err();
        assert!(matches!(err, SensorError::NotFound(_)), "{err}");
    }

    #[test]
    fn a_missing_1_wire_directory_fails_at_build_time() {
        let settings = Ds18b20Settings {
            base_dir: fixture("no_such_dir"),
            ids: vec![],
        };
        let err = Ds18b20::open(&settings, "ds18b20".into()).err().unwrap();
        assert!(err.to_string().contains("w1-gpio"), "{err}");
    }

    #[test]
    fn probe_ids_that_could_escape_the_sysfs_directory_are_rejected() {
        for id in ["../etc", "28-", "28-xyz"] {
            let settings = Ds18b20Settings {
                base_dir: fixture("w1_devices"),
                ids: vec![id.into()],
            };
            let err = Ds18b20::open(&settings, "ds18b20".into()).err().unwrap();
            assert!(matches!(err, SensorError::InvalidConfig(_)), "{id}: {err}");
        }
    }
}
