//! Debounced digital inputs (door contacts, PIR motion sensors).
//!
//! [`GpioInputs`] is generic over `embedded_hal::digital::InputPin`. The agent calls
//! [`Sensor::poll_changes`] every [`POLL_INTERVAL`] to report state changes promptly, and
//! [`Sensor::read`] at the configured interval to report every input's state periodically
//! (so a lost change event is corrected at the next heartbeat). Debouncing is done in
//! software by [`Debouncer`] against [`Instant`], which is monotonic.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use embedded_hal::digital::{Error as _, InputPin};

use super::{Metric, Sensor, SensorError};

/// How often the agent should call `poll_changes`: well below any useful debounce time.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// Internal pull resistor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pull {
    /// For contacts that short the pin to GND when closed (use with `active_low = true`).
    Up,
    Down,
    /// External resistor, or a sensor with a push-pull output such as most PIR modules.
    #[default]
    None,
}

/// One input: `{ pin = 17, name = "door", pull = "up", active_low = true, debounce = "50ms" }`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpioPinSettings {
    /// BCM GPIO number (not the physical header pin number).
    pub pin: u8,
    /// Metric name of this input.
    pub name: String,
    #[serde(default)]
    pub pull: Pull,
    /// Report 1 when the pin is low.
    #[serde(default)]
    pub active_low: bool,
    #[serde(default = "default_debounce", with = "humantime_serde")]
    pub debounce: Duration,
}

fn default_debounce() -> Duration {
    DEFAULT_DEBOUNCE
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpioSettings {
    pub pins: Vec<GpioPinSettings>,
}

impl GpioSettings {
    /// Checks what can be checked without hardware: at least one pin, no duplicates.
    pub fn validate(&self) -> Result<(), SensorError> {
        if self.pins.is_empty() {
            return Err(SensorError::InvalidConfig(
                "gpio sensor needs at least one entry in pins".into(),
            ));
        }
        let mut pins = HashSet::new();
        let mut names = HashSet::new();
        for p in &self.pins {
            if p.name.trim().is_empty() {
                return Err(SensorError::InvalidConfig(format!(
                    "GPIO {} has an empty name",
                    p.pin
                )));
            }
            if !pins.insert(p.pin) {
                return Err(SensorError::InvalidConfig(format!(
                    "GPIO {} is configured twice",
                    p.pin
                )));
            }
            if !names.insert(p.name.as_str()) {
                return Err(SensorError::InvalidConfig(format!(
                    "input name {:?} is used twice",
                    p.name
                )));
            }
        }
        Ok(())
    }
}

/// Turns a bouncing level into a stable one: a new level is accepted once it has been
/// seen continuously for the debounce time.
#[derive(Debug, Clone)]
pub struct Debouncer {
    debounce: Duration,
    stable: Option<bool>,
    /// Level that differs from `stable` and when it was first seen.
    candidate: Option<(bool, Instant)>,
}

impl Debouncer {
    pub fn new(debounce: Duration) -> Self {
        Self {
            debounce,
            stable: None,
            candidate: None,
        }
    }

    /// The accepted level; `None` until the first level has held for the debounce time.
    pub fn stable(&self) -> Option<bool> {
        self.stable
    }

    /// Feeds one sample; returns the new stable level when it changes (including the
    /// first time one is established).
    pub fn update(&mut self, raw_level: bool, now: Instant) -> Option<bool> {
        if self.stable == Some(raw_level) {
            // A bounce back to the stable level cancels the pending change.
            self.candidate = None;
            return None;
        }
        let since = match self.candidate {
            Some((level, since)) if level == raw_level => since,
            _ => {
                self.candidate = Some((raw_level, now));
                now
            }
        };
        if now.saturating_duration_since(since) >= self.debounce {
            self.stable = Some(raw_level);
            self.candidate = None;
            Some(raw_level)
        } else {
            None
        }
    }
}

struct Input<P> {
    pin: P,
    name: String,
    active_low: bool,
    debouncer: Debouncer,
    /// Last state returned by `poll`, so that a change seen first by `read` is still
    /// reported as a change.
    reported: Option<bool>,
}

impl<P: InputPin> Input<P> {
    /// Samples the pin and returns the logical (active-low corrected) raw level.
    fn sample(&mut self, now: Instant) -> Result<bool, SensorError> {
        let high = self.pin.is_high().map_err(|e| {
            SensorError::Bus(format!(
                "reading input {:?} failed: {:?} ({e:?})",
                self.name,
                e.kind()
            ))
        })?;
        let active = high != self.active_low;
        self.debouncer.update(active, now);
        Ok(active)
    }
}

/// A set of debounced digital inputs reported as 0/1 metrics named after each input.
pub struct GpioInputs<P> {
    name: String,
    inputs: Vec<Input<P>>,
}

impl<P: InputPin> GpioInputs<P> {
    pub fn new(name: String) -> Self {
        Self {
            name,
            inputs: Vec::new(),
        }
    }

    /// Adds an input; `active_low` inverts the level, `debounce` is the hold time.
    pub fn with_input(
        mut self,
        pin: P,
        name: impl Into<String>,
        active_low: bool,
        debounce: Duration,
    ) -> Self {
        self.inputs.push(Input {
            pin,
            name: name.into(),
            active_low,
            debouncer: Debouncer::new(debounce),
            reported: None,
        });
        self
    }

    /// Samples every pin; returns the inputs whose stable state changed since the last
    /// poll (the first poll after start-up reports each input once it is stable). A pin
    /// that cannot be read is logged and skipped.
    pub fn poll(&mut self, now: Instant) -> Vec<Metric> {
        let mut changes = Vec::new();
        for input in &mut self.inputs {
            if let Err(error) = input.sample(now) {
                tracing::warn!(sensor = %self.name, %error, "GPIO input unreadable");
                continue;
            }
            if let Some(state) = input.debouncer.stable()
                && input.reported != Some(state)
            {
                input.reported = Some(state);
                changes.push(Metric::flag(input.name.clone(), state));
            }
        }
        changes
    }

    /// Current state of every input: the debounced state, or the instantaneous level while
    /// an input has not been stable for its debounce time yet (right after start-up).
    pub fn read_at(&mut self, now: Instant) -> Result<Vec<Metric>, SensorError> {
        self.inputs
            .iter_mut()
            .map(|input| {
                let level = input.sample(now)?;
                let state = input.debouncer.stable().unwrap_or(level);
                Ok(Metric::flag(input.name.clone(), state))
            })
            .collect()
    }

    /// Gives the pins back (tests use it to verify mock expectations).
    pub fn release(self) -> Vec<P> {
        self.inputs.into_iter().map(|i| i.pin).collect()
    }
}

impl<P: InputPin + Send> Sensor for GpioInputs<P> {
    fn name(&self) -> &str {
        &self.name
    }

    fn read(&mut self) -> Result<Vec<Metric>, SensorError> {
        self.read_at(Instant::now())
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(POLL_INTERVAL)
    }

    fn poll_changes(&mut self, now: Instant) -> Option<Vec<Metric>> {
        Some(self.poll(now))
    }
}

/// Claims the configured pins through rppal as inputs with the requested pull resistors.
pub fn open_rppal(
    settings: &GpioSettings,
    name: String,
) -> Result<GpioInputs<rppal::gpio::InputPin>, SensorError> {
    settings.validate()?;
    let gpio = rppal::gpio::Gpio::new().map_err(|e| {
        SensorError::Unsupported(format!(
            "GPIO is not available: {e} (not a Raspberry Pi, or no access to /dev/gpiomem)"
        ))
    })?;
    let mut inputs = GpioInputs::new(name);
    for p in &settings.pins {
        let pin = gpio
            .get(p.pin)
            .map_err(|e| SensorError::InvalidConfig(format!("GPIO {}: {e}", p.pin)))?;
        let pin = match p.pull {
            Pull::Up => pin.into_input_pullup(),
            Pull::Down => pin.into_input_pulldown(),
            Pull::None => pin.into_input(),
        };
        inputs = inputs.with_input(pin, p.name.clone(), p.active_low, p.debounce);
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::MockError;
    use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as T};

    const DEBOUNCE: Duration = Duration::from_millis(50);

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    fn pin(levels: &[State]) -> PinMock {
        PinMock::new(&levels.iter().map(|s| T::get(*s)).collect::<Vec<_>>())
    }

    fn finish(inputs: GpioInputs<PinMock>) {
        for mut pin in inputs.release() {
            pin.done();
        }
    }

    #[test]
    fn a_level_becomes_stable_only_after_holding_for_the_debounce_time() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DEBOUNCE);
        assert_eq!(d.update(true, t0), None);
        assert_eq!(d.update(true, at(t0, 49)), None);
        assert_eq!(d.stable(), None);
        assert_eq!(d.update(true, at(t0, 50)), Some(true));
        assert_eq!(d.update(true, at(t0, 60)), None, "no repeated report");
        assert_eq!(d.stable(), Some(true));
    }

    #[test]
    fn bouncing_restarts_the_debounce_timer() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DEBOUNCE);
        d.update(false, t0);
        assert_eq!(d.update(false, at(t0, 50)), Some(false));
        // Contact closes with bounces: low-high-low-high, then stays high.
        for (ms, level) in [
            (100, true),
            (103, false),
            (106, true),
            (109, false),
            (112, true),
        ] {
            assert_eq!(d.update(level, at(t0, ms)), None, "at {ms} ms");
        }
        assert_eq!(
            d.update(true, at(t0, 161)),
            None,
            "held only 49 ms since the last bounce"
        );
        assert_eq!(d.update(true, at(t0, 162)), Some(true));
    }

    #[test]
    fn a_short_glitch_never_changes_the_stable_state() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DEBOUNCE);
        d.update(false, t0);
        d.update(false, at(t0, 50));
        assert_eq!(d.update(true, at(t0, 100)), None);
        assert_eq!(d.update(false, at(t0, 130)), None);
        assert_eq!(
            d.update(true, at(t0, 140)),
            None,
            "timer restarted by the glitch"
        );
        assert_eq!(d.update(false, at(t0, 200)), None);
        assert_eq!(d.stable(), Some(false));
    }

    #[test]
    fn a_zero_debounce_accepts_every_level_immediately() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Duration::ZERO);
        assert_eq!(d.update(true, t0), Some(true));
        assert_eq!(d.update(false, t0), Some(false));
    }

    #[test]
    fn polling_reports_only_debounced_changes() {
        use State::{High, Low};
        let t0 = Instant::now();
        let door = pin(&[High, Low, High, High, High, Low, High, Low, Low, Low]);
        let mut inputs = GpioInputs::new("gpio".into()).with_input(door, "door", false, DEBOUNCE);
        let polls: Vec<Vec<Metric>> = [0, 5, 10, 30, 61, 70, 75, 80, 100, 131]
            .iter()
            .map(|ms| inputs.poll(at(t0, *ms)))
            .collect();
        let expected = |i: usize| match i {
            4 => vec![Metric::flag("door", true)],
            9 => vec![Metric::flag("door", false)],
            _ => vec![],
        };
        for (i, changes) in polls.iter().enumerate() {
            assert_eq!(changes, &expected(i), "poll {i}");
        }
        finish(inputs);
    }

    #[test]
    fn an_active_low_input_reports_1_when_the_pin_is_low() {
        use State::{High, Low};
        let t0 = Instant::now();
        // Door contact to GND with pull-up: closed = low = active.
        let door = pin(&[Low, Low, High, High]);
        let mut inputs = GpioInputs::new("gpio".into()).with_input(door, "door", true, DEBOUNCE);
        assert!(inputs.poll(t0).is_empty());
        assert_eq!(inputs.poll(at(t0, 50)), vec![Metric::flag("door", true)]);
        assert!(inputs.poll(at(t0, 100)).is_empty());
        assert_eq!(inputs.poll(at(t0, 150)), vec![Metric::flag("door", false)]);
        finish(inputs);
    }

    #[test]
    fn read_reports_every_input_and_falls_back_to_the_raw_level_before_it_is_stable() {
        use State::{High, Low};
        let t0 = Instant::now();
        let door = pin(&[High, High, High]);
        let pir = pin(&[Low, Low, High]);
        let mut inputs = GpioInputs::new("gpio".into())
            .with_input(door, "door", false, DEBOUNCE)
            .with_input(pir, "pir", false, DEBOUNCE);
        assert_eq!(
            inputs.read_at(t0).unwrap(),
            vec![Metric::flag("door", true), Metric::flag("pir", false)]
        );
        assert_eq!(
            inputs.read_at(at(t0, 60)).unwrap(),
            vec![Metric::flag("door", true), Metric::flag("pir", false)]
        );
        // A PIR blip shorter than the debounce is not reported by read either.
        assert_eq!(
            inputs.read_at(at(t0, 70)).unwrap(),
            vec![Metric::flag("door", true), Metric::flag("pir", false)]
        );
        finish(inputs);
    }

    #[test]
    fn a_change_seen_by_read_is_still_reported_by_the_next_poll() {
        use State::{High, Low};
        let t0 = Instant::now();
        let door = pin(&[Low, Low, High, High, High]);
        let mut inputs = GpioInputs::new("gpio".into()).with_input(door, "door", false, DEBOUNCE);
        inputs.poll(t0);
        assert_eq!(inputs.poll(at(t0, 50)), vec![Metric::flag("door", false)]);
        inputs.poll(at(t0, 100));
        inputs.read_at(at(t0, 150)).unwrap(); // read establishes the new stable state
        assert_eq!(inputs.poll(at(t0, 160)), vec![Metric::flag("door", true)]);
        finish(inputs);
    }

    #[test]
    fn a_pin_read_error_is_a_sensor_error_from_read_and_skipped_by_poll() {
        use State::High;
        let t0 = Instant::now();
        let err = MockError::Io(std::io::ErrorKind::NotConnected);
        let bad = PinMock::new(&[
            T::get(High).with_error(err.clone()),
            T::get(High).with_error(err),
        ]);
        let good = pin(&[High, High]);
        let mut inputs = GpioInputs::new("gpio".into())
            .with_input(good, "pir", false, Duration::ZERO)
            .with_input(bad, "door", false, DEBOUNCE);
        assert_eq!(inputs.poll(t0), vec![Metric::flag("pir", true)]);
        assert!(matches!(inputs.read_at(t0), Err(SensorError::Bus(_))));
        finish(inputs);
    }

    #[test]
    fn the_sensor_trait_exposes_fast_change_polling() {
        let mut door = pin(&[State::High]);
        let mut sensor: Box<dyn Sensor> = Box::new(GpioInputs::new("gpio".into()).with_input(
            door.clone(),
            "door",
            false,
            Duration::ZERO,
        ));
        assert_eq!(sensor.poll_interval(), Some(POLL_INTERVAL));
        assert_eq!(
            sensor.poll_changes(Instant::now()),
            Some(vec![Metric::flag("door", true)])
        );
        door.done();
    }

    #[test]
    fn duplicate_pins_or_names_are_rejected_before_touching_hardware() {
        let input = |pin: u8, name: &str| GpioPinSettings {
            pin,
            name: name.into(),
            pull: Pull::Up,
            active_low: true,
            debounce: DEBOUNCE,
        };
        for pins in [
            vec![],
            vec![input(17, "door"), input(17, "window")],
            vec![input(17, "door"), input(27, "door")],
            vec![input(17, " ")],
        ] {
            let err = open_rppal(&GpioSettings { pins }, "gpio".into())
                .err()
                .unwrap();
            assert!(matches!(err, SensorError::InvalidConfig(_)), "{err}");
        }
    }
}
