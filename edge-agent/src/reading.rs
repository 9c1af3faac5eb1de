//! A reading as it travels: the `data` object of a `publish` frame, built once and stored as is.
//!
//! ```json
//! {"device":"pi-01","sensor":"bme280@0x76","ts":1764100000123,"mono_ms":81234567,
//!  "boot_id":"6f1c…","clock_synced":true,
//!  "metrics":{"temperature":{"value":21.4,"unit":"C"},"humidity":{"value":40.2,"unit":"%"}},
//!  "agent":{"buffered":0,"dropped":0,"connects":1,"last_ack_age_s":0}}
//! ```
//!
//! A Pi has no real-time clock: until NTP syncs, `ts` may be far off or jump. `clock_synced`
//! says whether the kernel considered the clock synchronised when the reading was taken, and
//! `(boot_id, mono_ms)` orders readings of one boot whatever the wall clock did.
//! The reading's `seq` travels beside it, in the `publish` frame and the log record, not inside:
//! a reading that must be renumbered (see `uplink`) keeps its bytes.
//! `agent` carries the agent's own health at that moment (see `health`).
//! A failed sensor produces `"status":"error","error":"…"` and no `metrics`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::health::Health;
use crate::sensors::Metric;

/// When a reading was taken, by each of the clocks that matter on a device without an RTC.
#[derive(Debug, Clone, Serialize)]
pub struct Stamp {
    /// Wall clock, milliseconds since the Unix epoch.
    pub ts: u64,
    /// Milliseconds since boot (CLOCK_BOOTTIME: counts suspend, never jumps).
    pub mono_ms: u64,
    pub boot_id: String,
    pub clock_synced: bool,
}

/// Reads the clocks. `boot_id` is read once per process by the caller.
pub fn stamp(boot_id: &str) -> Stamp {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Stamp {
        ts,
        mono_ms: boot_time_ms(),
        boot_id: boot_id.to_owned(),
        clock_synced: clock_synced(),
    }
}

/// The kernel's id of this boot, so `mono_ms` of different boots are never compared.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn boot_time_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Whether the kernel's clock is synchronised (NTP, chrony or systemd-timesyncd clear
/// STA_UNSYNC once they have disciplined it). Where adjtimex is filtered (systemd's
/// ProtectClock), timesyncd's flag file answers instead.
fn clock_synced() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads; the struct is zeroed and ours.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return std::path::Path::new("/run/systemd/timesync/synchronized").exists();
    }
    state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

#[derive(Serialize)]
struct Value<'a> {
    value: f64,
    unit: &'a str,
}

#[derive(Serialize)]
struct Reading<'a> {
    device: &'a str,
    sensor: &'a str,
    #[serde(flatten)]
    stamp: &'a Stamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    agent: &'a Health,
}

/// The JSON of a successful reading.
pub fn encode(
    device: &str,
    sensor: &str,
    stamp: &Stamp,
    metrics: &[Metric],
    agent: &Health,
) -> Vec<u8> {
    let metrics = metrics
        .iter()
        .filter(|m| m.value.is_finite())
        .map(|m| {
            let value = Value {
                value: m.value,
                unit: m.unit,
            };
            (
                m.name.clone(),
                serde_json::to_value(value).unwrap_or_default(),
            )
        })
        .collect();
    to_vec(&Reading {
        device,
        sensor,
        stamp,
        metrics: Some(metrics),
        status: None,
        error: None,
        agent,
    })
}

/// The JSON of a failed read: the sensor reports its error instead of going quiet.
pub fn encode_error(
    device: &str,
    sensor: &str,
    stamp: &Stamp,
    error: &str,
    agent: &Health,
) -> Vec<u8> {
    to_vec(&Reading {
        device,
        sensor,
        stamp,
        metrics: None,
        status: Some("error"),
        error: Some(error),
        agent,
    })
}

fn to_vec(reading: &Reading<'_>) -> Vec<u8> {
    // Plain structs of strings and finite numbers always serialise.
    serde_json::to_vec(reading).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTH: Health = Health {
        buffered: 3,
        dropped: 0,
        connects: 1,
        last_ack_age_s: Some(2),
    };

    fn stamp_for_test() -> Stamp {
        Stamp {
            ts: 1_764_100_000_123,
            mono_ms: 81_234_567,
            boot_id: "b00t".into(),
            clock_synced: false,
        }
    }

    #[test]
    fn a_reading_carries_identity_clocks_and_units() {
        let metrics = [
            Metric {
                name: "temperature".into(),
                value: 21.5,
                unit: "C",
            },
            Metric {
                name: "broken".into(),
                value: f64::NAN,
                unit: "C",
            },
        ];
        let json: serde_json::Value = serde_json::from_slice(&encode(
            "pi-01",
            "bme280@0x76",
            &stamp_for_test(),
            &metrics,
            &HEALTH,
        ))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"device": "pi-01", "sensor": "bme280@0x76",
                "ts": 1_764_100_000_123u64, "mono_ms": 81_234_567, "boot_id": "b00t",
                "clock_synced": false,
                "metrics": {"temperature": {"value": 21.5, "unit": "C"}},
                "agent": {"buffered": 3, "dropped": 0, "connects": 1, "last_ack_age_s": 2}})
        );
    }

    #[test]
    fn a_failed_sensor_reports_an_error_status() {
        let json: serde_json::Value = serde_json::from_slice(&encode_error(
            "pi-01",
            "ds18b20",
            &stamp_for_test(),
            "crc mismatch",
            &HEALTH,
        ))
        .unwrap();
        assert_eq!(json["status"], "error");
        assert_eq!(json["error"], "crc mismatch");
        assert!(json.get("metrics").is_none());
    }

    #[test]
    fn the_clocks_read_sensible_values_here() {
        let s = stamp(&boot_id());
        assert!(s.ts > 1_700_000_000_000);
        assert!(s.mono_ms > 0);
        assert_ne!(s.boot_id, "unknown");
    }
}
