//! Sensor drivers of the edge agent.
//!
//! Every source of measurements implements [`Sensor`]: a short, synchronous `read()` that
//! returns a batch of [`Metric`]s. The agent owns the scheduling: it calls `read()` on a
//! blocking thread at [`SensorSettings::interval`], and for sensors that report
//! [`Sensor::poll_interval`] (GPIO inputs) it additionally calls [`Sensor::poll_changes`]
//! at that fast rate so state changes are reported without waiting for the next interval.
//!
//! Design choices:
//! - **Bus drivers are written against the embedded-hal 1.0 traits** (`I2c`, `InputPin`,
//!   `DelayNs`), not against rppal. rppal (0.22, unmaintained upstream but required on
//!   our Pis) only appears in [`build`], so a bus can be swapped for `linux-embedded-hal`
//!   or a mock without touching the drivers, and the drivers are unit-tested with
//!   `embedded-hal-mock`.
//! - **Kernel interfaces are parsed by pure functions** (`parse_*`) over the text of
//!   `/proc` and `/sys` files. Tests feed them real sample files, including the broken
//!   ones a Pi produces in the field (failed 1-Wire CRC, the 85 °C power-on value, …),
//!   from `tests/fixtures/sensors/`. Every path is configurable so whole sensors can also
//!   be exercised against fixture trees.
//! - **Nothing panics.** Missing hardware (for example on a developer laptop) is a
//!   [`SensorError`] from [`build`]; bus and parse failures are errors from `read()`.
//!   A sensor with several probes (DS18B20) returns the good readings, logs the bad ones
//!   and fails only when none could be read.
//! - Debouncing uses [`Instant`], never wall-clock time: a Pi has no RTC and its clock can
//!   jump when NTP first syncs.
//! - The `simulated` kind produces plausible values on any machine, for demos and for
//!   exercising the rest of the pipeline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod bme280;
pub mod cpu_temp;
pub mod ds18b20;
pub mod gpio;
pub mod load;
pub mod memory;
pub mod simulated;
pub mod throttled;

/// One measured value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

impl Metric {
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
        }
    }

    /// A boolean state as 0/1, the way dashboards and alert rules expect it.
    pub fn flag(name: impl Into<String>, on: bool) -> Self {
        Self::new(name, if on { 1.0 } else { 0.0 }, "")
    }
}

/// Why a sensor could not be built or read.
#[derive(thiserror::Error, Debug)]
pub enum SensorError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("1-Wire CRC check failed for {device} (noisy or loose data line?)")]
    Crc { device: String },
    #[error(
        "{device} returned the power-on reset value 85 °C: no conversion took place (check the probe's power supply)"
    )]
    PowerOnReset { device: String },
    #[error("bus error: {0}")]
    Bus(String),
    #[error(
        "unexpected chip id {found:#04x} at I2C address {address:#04x} (expected 0x60 for a BME280 or 0x58 for a BMP280)"
    )]
    WrongChipId { address: u8, found: u8 },
    #[error("measurement not ready: {0}")]
    NotReady(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid sensor configuration: {0}")]
    InvalidConfig(String),
    #[error("unsupported on this machine: {0}")]
    Unsupported(String),
}

/// A source of metrics polled at its own interval. Sync reads are short (sysfs, one I2C
/// transaction set); the caller runs them on a blocking thread.
pub trait Sensor: Send {
    /// Stable identifier used in logs and as the source label, e.g. `cpu_temp`, `bme280@0x76`.
    fn name(&self) -> &str;

    /// Takes one reading of everything this sensor measures.
    fn read(&mut self) -> Result<Vec<Metric>, SensorError>;

    /// How often [`Sensor::poll_changes`] wants to be called; `None` for sensors that are
    /// only read at their interval.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Fast path for event-like inputs: samples the hardware and returns only the metrics
    /// whose state changed since the last call. `None` means the sensor does not support
    /// change polling.
    fn poll_changes(&mut self, _now: Instant) -> Option<Vec<Metric>> {
        None
    }
}

/// Configuration of one sensor, as it appears in the agent's TOML:
///
/// ```toml
/// [[sensors]]
/// kind = "bme280"
/// interval = "10s"   # humantime; each kind has a sensible default when omitted
/// bus = 1
/// address = 0x76
/// ```
///
/// The kind-specific fields sit next to `kind`; see [`SensorKind`].
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct SensorSettings {
    /// How often `read()` is called; defaults per kind (see [`SensorKind::default_interval`]).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// Overrides the generated label (useful when two sensors of one kind are configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub kind: SensorKind,
}

/// The kind of a sensor and its kind-specific settings (`kind = "..."` in TOML).
///
/// Unknown fields inside a kind are rejected, so a typo such as `adress = 0x77` is an error
/// instead of a silently ignored setting.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SensorKind {
    CpuTemp(cpu_temp::CpuTempSettings),
    Throttled(throttled::ThrottledSettings),
    Load(load::LoadSettings),
    Memory(memory::MemorySettings),
    /// Also accepts `kind = "bmp280"`: the driver detects which chip is present.
    #[serde(alias = "bmp280")]
    Bme280(bme280::Bme280Settings),
    Ds18b20(ds18b20::Ds18b20Settings),
    Gpio(gpio::GpioSettings),
    Simulated(simulated::SimulatedSettings),
}

impl SensorKind {
    /// The read interval used when the configuration does not give one.
    pub fn default_interval(&self) -> Duration {
        let secs = match self {
            // Cheap sysfs reads; temperature and load change quickly enough to be worth 10 s.
            SensorKind::CpuTemp(_) | SensorKind::Load(_) => 10,
            SensorKind::Throttled(_) | SensorKind::Memory(_) => 30,
            // Environmental values drift slowly; a DS18B20 conversion also takes 750 ms.
            SensorKind::Bme280(_) | SensorKind::Ds18b20(_) => 30,
            // Changes are reported by poll_changes; the interval is only a heartbeat.
            SensorKind::Gpio(_) => 60,
            SensorKind::Simulated(_) => 5,
        };
        Duration::from_secs(secs)
    }
}

impl SensorSettings {
    /// The simulated source alone, at its default interval (`--simulate`).
    pub fn simulated() -> Self {
        SensorSettings {
            interval: None,
            name: None,
            kind: SensorKind::Simulated(simulated::SimulatedSettings::default()),
        }
    }

    /// The configured interval, or the kind's default.
    pub fn interval(&self) -> Duration {
        self.interval
            .unwrap_or_else(|| self.kind.default_interval())
    }

    /// Human-readable identifier; equals [`Sensor::name`] of the sensor [`build`] makes.
    pub fn label(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match &self.kind {
            SensorKind::CpuTemp(_) => "cpu_temp".into(),
            SensorKind::Throttled(_) => "throttled".into(),
            SensorKind::Load(_) => "load".into(),
            SensorKind::Memory(_) => "memory".into(),
            SensorKind::Bme280(s) => s.label(),
            SensorKind::Ds18b20(_) => "ds18b20".into(),
            SensorKind::Gpio(_) => "gpio".into(),
            SensorKind::Simulated(_) => "simulated".into(),
        }
    }
}

/// Constructs the real sensor described by `settings` (sysfs files, I2C bus, GPIO pins).
///
/// Hardware kinds check that their hardware is reachable and fail with a descriptive error
/// otherwise (for example `bme280` or `gpio` on a machine that is not a Raspberry Pi).
pub fn build(settings: &SensorSettings) -> Result<Box<dyn Sensor>, SensorError> {
    let name = settings.label();
    Ok(match &settings.kind {
        SensorKind::CpuTemp(s) => Box::new(cpu_temp::open(s, name)?),
        SensorKind::Throttled(s) => Box::new(throttled::open(s, name)?),
        SensorKind::Load(s) => Box::new(load::open(s, name)?),
        SensorKind::Memory(s) => Box::new(memory::open(s, name)?),
        SensorKind::Bme280(s) => Box::new(bme280::open_rppal(s, name)?),
        SensorKind::Ds18b20(s) => Box::new(ds18b20::Ds18b20::open(s, name)?),
        SensorKind::Gpio(s) => Box::new(gpio::open_rppal(s, name)?),
        SensorKind::Simulated(s) => Box::new(simulated::Simulated::new(s, name)),
    })
}

/// Reads a small kernel text file, keeping the path in the error.
pub(crate) fn read_text(path: &Path) -> Result<String, SensorError> {
    std::fs::read_to_string(path).map_err(|source| SensorError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Fails early with a clear message when a kernel interface file does not exist.
fn require_file(path: &Path, hint: &str) -> Result<(), SensorError> {
    if path.exists() {
        Ok(())
    } else {
        Err(SensorError::NotFound(format!(
            "{} does not exist ({hint})",
            path.display()
        )))
    }
}

/// A sensor that reads one kernel interface file (sysfs, procfs) and parses its text: what
/// `cpu_temp`, `throttled`, `load` and `memory` are, differing only in file and parser.
pub struct FileSensor {
    name: String,
    path: PathBuf,
    parse: fn(&str) -> Result<Vec<Metric>, SensorError>,
}

impl FileSensor {
    /// Fails at once, with `hint`, when `path` does not exist on this machine.
    pub fn open(
        name: String,
        path: &Path,
        hint: &str,
        parse: fn(&str) -> Result<Vec<Metric>, SensorError>,
    ) -> Result<Self, SensorError> {
        require_file(path, hint)?;
        Ok(FileSensor {
            name,
            path: path.to_path_buf(),
            parse,
        })
    }
}

impl Sensor for FileSensor {
    fn name(&self) -> &str {
        &self.name
    }

    /// A parse error names the file it came from.
    fn read(&mut self) -> Result<Vec<Metric>, SensorError> {
        (self.parse)(&read_text(&self.path)?).map_err(|e| match e {
            SensorError::Parse { detail, .. } => SensorError::Parse {
                what: self.path.display().to_string(),
                detail,
            },
            other => other,
        })
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;

    /// Path of a file under `tests/fixtures/sensors/`.
    pub fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sensors/"
        ))
        .join(name)
    }

    /// Contents of a fixture file.
    pub fn fixture_text(name: &str) -> String {
        let path = fixture(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
    }

    /// Looks up one metric by name.
    pub fn metric<'a>(metrics: &'a [super::Metric], name: &str) -> &'a super::Metric {
        metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no metric {name} in {metrics:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_KINDS_TOML: &str = r#"
        [[sensors]]
        kind = "cpu_temp"

        [[sensors]]
        kind = "throttled"
        interval = "1m"

        [[sensors]]
        kind = "load"
        path = "/proc/loadavg"

        [[sensors]]
        kind = "memory"

        [[sensors]]
        kind = "bme280"
        interval = "10s"
        bus = 1
        address = 0x77

        [[sensors]]
        kind = "ds18b20"
        ids = ["28-0316a2794aff"]

        [[sensors]]
        kind = "gpio"
        name = "doors"
        pins = [
            { pin = 17, name = "door", pull = "up", active_low = true, debounce = "50ms" },
            { pin = 27, name = "pir" },
        ]

        [[sensors]]
        kind = "simulated"
        seed = 42
    "#;

    #[derive(serde::Deserialize)]
    struct AgentConfig {
        sensors: Vec<SensorSettings>,
    }

    fn parse_toml(text: &str) -> Result<Vec<SensorSettings>, toml::de::Error> {
        toml::from_str::<AgentConfig>(text).map(|c| c.sensors)
    }

    #[test]
    fn every_kind_deserializes_from_the_agent_toml() {
        let sensors = parse_toml(ALL_KINDS_TOML).unwrap();
        let labels: Vec<String> = sensors.iter().map(SensorSettings::label).collect();
        assert_eq!(
            labels,
            [
                "cpu_temp",
                "throttled",
                "load",
                "memory",
                "bme280@0x77",
                "ds18b20",
                "doors",
                "simulated"
            ]
        );
        assert_eq!(sensors[1].interval(), Duration::from_secs(60));
        assert_eq!(sensors[4].interval(), Duration::from_secs(10));
        match &sensors[4].kind {
            SensorKind::Bme280(b) => assert_eq!((b.bus, b.address), (1, 0x77)),
            other => panic!("expected bme280, got {other:?}"),
        }
        match &sensors[6].kind {
            SensorKind::Gpio(g) => {
                assert_eq!(g.pins.len(), 2);
                assert_eq!(g.pins[0].debounce, Duration::from_millis(50));
                assert!(g.pins[0].active_low);
                assert_eq!(g.pins[1].pull, gpio::Pull::None);
            }
            other => panic!("expected gpio, got {other:?}"),
        }
    }

    #[test]
    fn an_omitted_interval_falls_back_to_the_kinds_default() {
        let sensors = parse_toml(ALL_KINDS_TOML).unwrap();
        assert_eq!(sensors[0].interval(), Duration::from_secs(10));
        assert_eq!(sensors[6].interval(), Duration::from_secs(60));
    }

    #[test]
    fn the_same_settings_deserialize_from_a_self_describing_value() {
        // The `config` crate hands values over through its own self-describing Value type;
        // serde_json::Value exercises the same (buffered, deserialize_any) code paths.
        let value = serde_json::json!({
            "sensors": [
                { "kind": "bme280", "interval": "10s", "bus": 1, "address": 118 },
                { "kind": "bmp280" },
                { "kind": "ds18b20", "base_dir": "/sys/bus/w1/devices" },
                { "kind": "gpio", "pins": [ { "pin": 17, "name": "door", "pull": "up", "debounce": "20ms" } ] },
                { "kind": "simulated", "seed": 7, "interval": "2s" },
                { "kind": "cpu_temp" }
            ]
        });
        let config: AgentConfig = serde_json::from_value(value).unwrap();
        let s = &config.sensors;
        assert_eq!(s[0].label(), "bme280@0x76");
        assert_eq!(s[0].interval(), Duration::from_secs(10));
        assert_eq!(s[1].label(), "bme280@0x76");
        assert_eq!(s[4].interval(), Duration::from_secs(2));
        match &s[3].kind {
            SensorKind::Gpio(g) => assert_eq!(g.pins[0].debounce, Duration::from_millis(20)),
            other => panic!("expected gpio, got {other:?}"),
        }
    }

    #[test]
    fn settings_survive_a_serialize_deserialize_round_trip() {
        let sensors = parse_toml(ALL_KINDS_TOML).unwrap();
        for settings in sensors {
            let value = serde_json::to_value(&settings).unwrap();
            let back: SensorSettings = serde_json::from_value(value).unwrap();
            assert_eq!(back, settings);
        }
    }

    #[test]
    fn a_misspelled_field_is_rejected() {
        let err = parse_toml("[[sensors]]\nkind = \"bme280\"\nadress = 0x77\n").unwrap_err();
        assert!(err.to_string().contains("adress"), "{err}");
    }

    #[test]
    fn an_unknown_kind_is_rejected() {
        let err = parse_toml("[[sensors]]\nkind = \"sht31\"\n").unwrap_err();
        assert!(err.to_string().contains("sht31"), "{err}");
    }

    #[test]
    fn an_i2c_address_other_than_0x76_or_0x77_is_rejected_when_building() {
        let settings = parse_toml("[[sensors]]\nkind = \"bme280\"\naddress = 0x40\n").unwrap();
        let err = build(&settings[0]).err().unwrap();
        assert!(matches!(err, SensorError::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn the_simulated_kind_builds_and_reads_on_any_machine() {
        let settings = parse_toml("[[sensors]]\nkind = \"simulated\"\n").unwrap();
        let mut sensor = build(&settings[0]).unwrap();
        assert_eq!(sensor.name(), "simulated");
        assert!(!sensor.read().unwrap().is_empty());
    }

    #[test]
    fn file_sensors_build_from_configured_paths() {
        let dir = test_support::fixture("");
        let toml = format!(
            "[[sensors]]\nkind = \"cpu_temp\"\npath = \"{d}thermal_zone0_temp\"\n\
             [[sensors]]\nkind = \"throttled\"\npath = \"{d}get_throttled_undervoltage_now\"\n\
             [[sensors]]\nkind = \"load\"\npath = \"{d}loadavg\"\n\
             [[sensors]]\nkind = \"memory\"\npath = \"{d}meminfo_pi4\"\n\
             [[sensors]]\nkind = \"ds18b20\"\nbase_dir = \"{d}w1_devices\"\n",
            d = dir.display()
        );
        for settings in parse_toml(&toml).unwrap() {
            let mut sensor = build(&settings).unwrap();
            assert_eq!(sensor.name(), settings.label());
            assert!(!sensor.read().unwrap().is_empty(), "{}", sensor.name());
        }
    }

    #[test]
    fn a_missing_sysfs_file_is_a_clear_build_error_not_a_panic() {
        let settings = parse_toml(
            "[[sensors]]\nkind = \"throttled\"\npath = \"/nonexistent/get_throttled\"\n",
        )
        .unwrap();
        let err = build(&settings[0]).err().unwrap();
        assert!(matches!(err, SensorError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/get_throttled"));
    }

    #[test]
    fn hardware_kinds_fail_with_an_error_instead_of_panicking_without_hardware() {
        // On a Pi with the hardware attached these may succeed; elsewhere they must be errors.
        let sensors = parse_toml(
            "[[sensors]]\nkind = \"bme280\"\nbus = 250\n\
             [[sensors]]\nkind = \"gpio\"\npins = [{ pin = 17, name = \"door\" }]\n",
        )
        .unwrap();
        let i2c = build(&sensors[0]);
        assert!(i2c.is_err(), "there is no I2C bus 250");
        if !Path::new("/proc/device-tree/model").exists() {
            let err = build(&sensors[1]).err().unwrap();
            assert!(matches!(err, SensorError::Unsupported(_)), "{err}");
        }
    }
}
