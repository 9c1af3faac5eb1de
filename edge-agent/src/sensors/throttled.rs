//! Raspberry Pi firmware throttling state.
//!
//! The Raspberry Pi OS kernel's firmware driver exposes the VideoCore `get_throttled`
//! bitmask at `/sys/devices/platform/soc/soc:firmware/get_throttled`. The driver writes it
//! with `sprintf(buf, "%x\n", value)`, i.e. **hex without a `0x` prefix**: `50005`, not
//! `0x50005`, so the digits must never be read as decimal. `vcgencmd get_throttled`
//! prints the same value as `throttled=0x50005`; both spellings are accepted.
//!
//! Newer kernels mark the attribute deprecated in favour of the `rpi_volt` hwmon device
//! (and log a one-time warning when it is read), but it is still present on current
//! Raspberry Pi OS images.
//!
//! Bits 0..=3 describe the current state, bits 16..=19 the same conditions "has occurred
//! since boot".

use std::path::PathBuf;

use super::{FileSensor, Metric, SensorError};

pub const DEFAULT_PATH: &str = "/sys/devices/platform/soc/soc:firmware/get_throttled";

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottledSettings {
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

fn default_path() -> PathBuf {
    PathBuf::from(DEFAULT_PATH)
}

impl Default for ThrottledSettings {
    fn default() -> Self {
        Self {
            path: default_path(),
        }
    }
}

/// Parses the `get_throttled` bitmask (`50005`, `0x50005` or `throttled=0x50005`).
pub fn parse_throttled(text: &str) -> Result<u32, SensorError> {
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix("throttled=").unwrap_or(trimmed);
    let digits = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
        .unwrap_or(digits);
    u32::from_str_radix(digits, 16).map_err(|e| SensorError::Parse {
        what: "get_throttled".into(),
        detail: format!("{trimmed:?} is not a hexadecimal bitmask ({e})"),
    })
}

/// One group of the four throttling conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conditions {
    pub under_voltage: bool,
    pub freq_capped: bool,
    pub throttled: bool,
    pub soft_temp_limit: bool,
}

impl Conditions {
    fn from_nibble(nibble: u32) -> Self {
        Self {
            under_voltage: nibble & 0b0001 != 0,
            freq_capped: nibble & 0b0010 != 0,
            throttled: nibble & 0b0100 != 0,
            soft_temp_limit: nibble & 0b1000 != 0,
        }
    }
}

/// The decoded bitmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleState {
    pub bits: u32,
    /// Bits 0..=3: conditions active right now.
    pub now: Conditions,
    /// Bits 16..=19: conditions seen at least once since boot.
    pub occurred: Conditions,
}

impl ThrottleState {
    pub fn from_bits(bits: u32) -> Self {
        Self {
            bits,
            now: Conditions::from_nibble(bits & 0xF),
            occurred: Conditions::from_nibble((bits >> 16) & 0xF),
        }
    }

    pub fn metrics(&self) -> Vec<Metric> {
        let (n, o) = (self.now, self.occurred);
        vec![
            Metric::flag("under_voltage", n.under_voltage),
            Metric::flag("freq_capped", n.freq_capped),
            Metric::flag("throttled", n.throttled),
            Metric::flag("soft_temp_limit", n.soft_temp_limit),
            Metric::flag("under_voltage_occurred", o.under_voltage),
            Metric::flag("freq_capped_occurred", o.freq_capped),
            Metric::flag("throttled_occurred", o.throttled),
            Metric::flag("soft_temp_limit_occurred", o.soft_temp_limit),
            Metric::new("throttled_bits", f64::from(self.bits), ""),
        ]
    }
}

/// The `throttled` sensor: the firmware's throttling bits, now and since boot.
pub fn open(settings: &ThrottledSettings, name: String) -> Result<FileSensor, SensorError> {
    FileSensor::open(
        name,
        &settings.path,
        "not a Raspberry Pi OS kernel, or its firmware driver no longer provides get_throttled",
        |text| Ok(ThrottleState::from_bits(parse_throttled(text)?).metrics()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::test_support::{fixture_text, metric};

    fn decode(fixture: &str) -> ThrottleState {
        ThrottleState::from_bits(parse_throttled(&fixture_text(fixture)).unwrap())
    }

    #[test]
    fn a_healthy_pi_reports_no_conditions() {
        let state = decode("get_throttled_ok");
        assert_eq!(state.bits, 0);
        assert_eq!(state.now, Conditions::default());
        assert_eq!(state.occurred, Conditions::default());
    }

    #[test]
    fn the_sysfs_value_is_hex_without_prefix_so_50005_is_under_voltage_and_throttling() {
        let state = decode("get_throttled_undervoltage_now");
        assert_eq!(state.bits, 0x50005);
        assert!(state.now.under_voltage && state.now.throttled);
        assert!(!state.now.freq_capped && !state.now.soft_temp_limit);
        assert!(state.occurred.under_voltage && state.occurred.throttled);
    }

    #[test]
    fn a_soft_temperature_limit_is_decoded_from_bits_3_and_19() {
        let state = decode("get_throttled_soft_temp_limit");
        assert_eq!(state.bits, 0x80008);
        assert!(state.now.soft_temp_limit && state.occurred.soft_temp_limit);
        assert!(!state.now.under_voltage);
    }

    #[test]
    fn past_conditions_are_reported_separately_from_current_ones() {
        let state = decode("get_throttled_occurred_only");
        assert_eq!(state.now, Conditions::default());
        assert!(state.occurred.freq_capped && state.occurred.throttled);
        assert!(state.occurred.soft_temp_limit && !state.occurred.under_voltage);
        let metrics = state.metrics();
        assert_eq!(metric(&metrics, "throttled").value, 0.0);
        assert_eq!(metric(&metrics, "throttled_occurred").value, 1.0);
        assert_eq!(
            metric(&metrics, "throttled_bits").value,
            f64::from(0xE0000u32)
        );
    }

    #[test]
    fn vcgencmd_and_prefixed_spellings_are_accepted() {
        assert_eq!(parse_throttled("throttled=0x50005\n").unwrap(), 0x50005);
        assert_eq!(parse_throttled("0x50005").unwrap(), 0x50005);
        assert_eq!(parse_throttled("0X0").unwrap(), 0);
    }

    #[test]
    fn a_garbage_get_throttled_file_is_a_parse_error() {
        let err = parse_throttled(&fixture_text("get_throttled_garbage")).unwrap_err();
        assert!(matches!(err, SensorError::Parse { .. }), "{err}");
        assert!(parse_throttled("").is_err());
    }
}
