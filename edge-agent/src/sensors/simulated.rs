//! Plausible fake readings for machines without sensors (demos, CI, laptops).
//!
//! One sensor produces the metrics of several real kinds under the same names: a CPU
//! temperature random walk around 45–60 °C, load averages, memory of a 4 GB Pi, a BME280
//! with slow drift, and a door contact that toggles rarely. Each `read()` advances the
//! simulation by one step; with a `seed` the sequence is reproducible.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Metric, Sensor, SensorError};

const MEM_TOTAL: f64 = 3_882_068.0 * 1024.0; // MemTotal of a 4 GB Pi 4
const DOOR_TOGGLE_PROBABILITY: f64 = 0.02;

#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSettings {
    /// Fixed seed for a reproducible sequence; random when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

pub struct Simulated {
    name: String,
    rng: StdRng,
    cpu_temp: f64,
    load: [f64; 3],
    mem_available: f64,
    temperature: f64,
    pressure: f64,
    humidity: f64,
    door_open: bool,
}

impl Simulated {
    pub fn new(settings: &SimulatedSettings, name: String) -> Self {
        // Seeding from the clock instead of the OS RNG: cannot fail, and simulation
        // values need no cryptographic quality.
        let seed = settings.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5EED)
                ^ u64::from(std::process::id())
        });
        tracing::debug!(sensor = %name, seed, "simulated sensor seeded");
        Self {
            name,
            rng: StdRng::seed_from_u64(seed),
            cpu_temp: 50.0,
            load: [0.4, 0.35, 0.3],
            mem_available: MEM_TOTAL * 0.75,
            temperature: 21.0,
            pressure: 1013.25,
            humidity: 45.0,
            door_open: false,
        }
    }

    /// A mean-reverting random step kept inside `[min, max]`.
    fn walk(&mut self, value: f64, mean: f64, step: f64, min: f64, max: f64) -> f64 {
        let noise = self.rng.random_range(-step..=step);
        (value + 0.1 * (mean - value) + noise).clamp(min, max)
    }

    fn step(&mut self) {
        self.cpu_temp = self.walk(self.cpu_temp, 52.0, 1.0, 45.0, 60.0);
        // load1 wanders; load5/load15 follow it as slower moving averages, like the kernel's.
        self.load[0] = self.walk(self.load[0], 0.5, 0.3, 0.0, 4.0);
        self.load[1] += (self.load[0] - self.load[1]) * 0.2;
        self.load[2] += (self.load[0] - self.load[2]) * 0.07;
        self.mem_available = self.walk(
            self.mem_available,
            MEM_TOTAL * 0.75,
            MEM_TOTAL * 0.01,
            MEM_TOTAL * 0.5,
            MEM_TOTAL * 0.9,
        );
        self.temperature = self.walk(self.temperature, 21.0, 0.05, 15.0, 30.0);
        self.pressure = self.walk(self.pressure, 1013.25, 0.1, 980.0, 1040.0);
        self.humidity = self.walk(self.humidity, 45.0, 0.2, 25.0, 70.0);
        if self.rng.random_bool(DOOR_TOGGLE_PROBABILITY) {
            self.door_open = !self.door_open;
        }
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("cpu_temp", self.cpu_temp, "C"),
            Metric::new("load1", self.load[0], ""),
            Metric::new("load5", self.load[1], ""),
            Metric::new("load15", self.load[2], ""),
            Metric::new("mem_total", MEM_TOTAL, "B"),
            Metric::new("mem_available", self.mem_available.round(), "B"),
            Metric::new(
                "mem_used_ratio",
                1.0 - self.mem_available / MEM_TOTAL,
                "ratio",
            ),
            Metric::new("temperature", self.temperature, "C"),
            Metric::new("pressure", self.pressure, "hPa"),
            Metric::new("humidity", self.humidity, "%"),
            Metric::flag("door", self.door_open),
        ]
    }
}

impl Sensor for Simulated {
    fn name(&self) -> &str {
        &self.name
    }

    /// Never fails.
    fn read(&mut self) -> Result<Vec<Metric>, SensorError> {
        self.step();
        Ok(self.metrics())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::test_support::metric;

    fn run(seed: Option<u64>, steps: usize) -> Vec<Vec<Metric>> {
        let mut sensor = Simulated::new(&SimulatedSettings { seed }, "simulated".into());
        (0..steps).map(|_| sensor.read().unwrap()).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        assert_eq!(run(Some(42), 50), run(Some(42), 50));
        assert_ne!(run(Some(42), 50), run(Some(43), 50));
    }

    #[test]
    fn simulated_values_stay_plausible_over_a_long_run() {
        for metrics in run(Some(7), 5_000) {
            let v = |name| metric(&metrics, name).value;
            assert!((45.0..=60.0).contains(&v("cpu_temp")));
            assert!((0.0..=4.0).contains(&v("load1")));
            assert!((0.0..=1.0).contains(&v("mem_used_ratio")));
            assert!((980.0..=1040.0).contains(&v("pressure")));
            assert!((25.0..=70.0).contains(&v("humidity")));
            assert!(v("door") == 0.0 || v("door") == 1.0);
        }
    }

    #[test]
    fn the_simulated_door_toggles_but_rarely() {
        let doors: Vec<f64> = run(Some(1), 2_000)
            .iter()
            .map(|m| metric(m, "door").value)
            .collect();
        let toggles = doors.windows(2).filter(|w| w[0] != w[1]).count();
        assert!((5..200).contains(&toggles), "{toggles} toggles");
    }

    #[test]
    fn an_unseeded_simulation_works_too() {
        assert_eq!(run(None, 3).len(), 3);
    }
}
