//! Memory and swap usage from `/proc/meminfo`.
//!
//! Lines look like `MemAvailable:    3184312 kB`; the kernel's "kB" means KiB.
//! `MemAvailable` (kernel ≥ 3.14) is the kernel's own estimate of memory available
//! without swapping, so "used" is `MemTotal - MemAvailable` rather than `MemTotal - MemFree`
//! (which would count the page cache as used).

use std::collections::HashMap;
use std::path::PathBuf;

use super::{FileSensor, Metric, SensorError};

pub const DEFAULT_PATH: &str = "/proc/meminfo";

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

fn default_path() -> PathBuf {
    PathBuf::from(DEFAULT_PATH)
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            path: default_path(),
        }
    }
}

/// Values from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
    /// `(SwapTotal, SwapFree)` when the kernel reports swap lines.
    pub swap: Option<(u64, u64)>,
}

impl MemInfo {
    pub fn used_ratio(&self) -> f64 {
        ratio(self.total - self.available.min(self.total), self.total)
    }

    pub fn metrics(&self) -> Vec<Metric> {
        let mut metrics = vec![
            Metric::new("mem_total", self.total as f64, "B"),
            Metric::new("mem_available", self.available as f64, "B"),
            Metric::new("mem_used_ratio", self.used_ratio(), "ratio"),
        ];
        if let Some((total, free)) = self.swap {
            metrics.push(Metric::new("swap_total", total as f64, "B"));
            metrics.push(Metric::new("swap_free", free as f64, "B"));
            metrics.push(Metric::new(
                "swap_used_ratio",
                ratio(total - free.min(total), total),
                "ratio",
            ));
        }
        metrics
    }
}

/// `part / whole`, 0 when there is nothing (e.g. swap disabled: SwapTotal 0).
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Parses the content of `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, SensorError> {
    // Keep the raw value text; only the fields we use have to be well-formed.
    let fields: HashMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    let get = |key: &str| -> Result<Option<u64>, SensorError> {
        let Some(raw) = fields.get(key) else {
            return Ok(None);
        };
        let bad = |detail: String| SensorError::Parse {
            what: "/proc/meminfo".into(),
            detail: format!("{key}: {detail}"),
        };
        let (number, multiplier) = match raw.split_once(char::is_whitespace) {
            Some((number, "kB")) => (number, 1024),
            Some((_, unit)) => return Err(bad(format!("unexpected unit {unit:?}"))),
            None => (*raw, 1),
        };
        let value: u64 = number
            .parse()
            .map_err(|e| bad(format!("{number:?} is not a number ({e})")))?;
        value
            .checked_mul(multiplier)
            .map(Some)
            .ok_or_else(|| bad(format!("{number} kB overflows")))
    };
    let require = |key: &str| -> Result<u64, SensorError> {
        get(key)?.ok_or_else(|| SensorError::Parse {
            what: "/proc/meminfo".into(),
            detail: format!("no {key} line"),
        })
    };

    let total = require("MemTotal")?;
    if total == 0 {
        return Err(SensorError::Parse {
            what: "/proc/meminfo".into(),
            detail: "MemTotal is 0".into(),
        });
    }
    let available = match get("MemAvailable")? {
        Some(available) => available,
        // Kernels before 3.14 have no MemAvailable; free + reclaimable caches is the classic
        // approximation.
        None => require("MemFree")? + require("Buffers")? + require("Cached")?,
    };
    let swap = match (get("SwapTotal")?, get("SwapFree")?) {
        (Some(total), Some(free)) => Some((total, free)),
        _ => None,
    };
    Ok(MemInfo {
        total,
        available,
        swap,
    })
}

/// The `memory` sensor: totals, available and used ratio, swap when present.
pub fn open(settings: &MemorySettings, name: String) -> Result<FileSensor, SensorError> {
    FileSensor::open(name, &settings.path, "is /proc mounted?", |text| {
        Ok(parse_meminfo(text)?.metrics())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::test_support::{fixture_text, metric};

    #[test]
    fn meminfo_from_a_pi4_is_converted_from_kib_to_bytes() {
        let info = parse_meminfo(&fixture_text("meminfo_pi4")).unwrap();
        assert_eq!(info.total, 3_882_068 * 1024);
        assert_eq!(info.available, 3_184_312 * 1024);
        assert_eq!(info.swap, Some((204_796 * 1024, 153_600 * 1024)));
        let metrics = info.metrics();
        let used = metric(&metrics, "mem_used_ratio");
        assert_eq!(used.unit, "ratio");
        assert!((used.value - (1.0 - 3_184_312.0 / 3_882_068.0)).abs() < 1e-12);
        assert_eq!(metric(&metrics, "mem_total").unit, "B");
        assert!((metric(&metrics, "swap_used_ratio").value - 0.25).abs() < 0.001);
    }

    #[test]
    fn swap_metrics_are_omitted_when_the_kernel_reports_no_swap() {
        let info = parse_meminfo(&fixture_text("meminfo_no_swap")).unwrap();
        assert_eq!(info.swap, None);
        assert!(info.metrics().iter().all(|m| !m.name.starts_with("swap")));
    }

    #[test]
    fn available_memory_is_estimated_on_kernels_without_memavailable() {
        let info = parse_meminfo(&fixture_text("meminfo_no_memavailable")).unwrap();
        assert_eq!(info.available, (2_147_900 + 58_524 + 1_066_232) * 1024);
    }

    #[test]
    fn a_malformed_meminfo_value_is_a_parse_error() {
        let err = parse_meminfo(&fixture_text("meminfo_garbage")).unwrap_err();
        assert!(err.to_string().contains("MemFree"), "{err}");
        assert!(parse_meminfo("").is_err());
    }
}
