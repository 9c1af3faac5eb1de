//! Simulated devices inside the hub (`demo.devices`), so a first run shows a live fleet without
//! a Pi or an agent. Their readings take the same path as an agent's (`Broker::publish`, with
//! the agent's reading format) and the same channels (`devices.<id>`, `fleet`, `groups.demo`),
//! and they are online in `presence` while the hub runs, as if each had an agent connected.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{Broker, PresenceChange, Publication, Reading};

/// One simulated device: a few slowly drifting metrics.
struct Device {
    id: String,
    channels: Vec<String>,
    cpu_temp: f64,
    temperature: f64,
    humidity: f64,
    door: bool,
}

impl Device {
    fn new(n: usize) -> Device {
        let id = format!("demo-{n:02}");
        let mut rng = rand::rng();
        Device {
            channels: hub_protocol::channel::publication_channels(&id, &["demo".into()]),
            id,
            cpu_temp: rng.random_range(42.0..55.0),
            temperature: rng.random_range(18.0..24.0),
            humidity: rng.random_range(35.0..55.0),
            door: false,
        }
    }

    fn step(&mut self) {
        let mut rng = rand::rng();
        let mut walk =
            |v: f64, step: f64, lo: f64, hi: f64| (v + rng.random_range(-step..step)).clamp(lo, hi);
        self.cpu_temp = walk(self.cpu_temp, 0.8, 38.0, 75.0);
        self.temperature = walk(self.temperature, 0.1, 10.0, 35.0);
        self.humidity = walk(self.humidity, 0.4, 20.0, 80.0);
        if rand::rng().random_bool(0.03) {
            self.door = !self.door;
        }
    }

    fn reading(&self, boot_id: &str, started: Instant) -> String {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let metric = |v: f64, unit: &str| serde_json::json!({"value": (v * 100.0).round() / 100.0, "unit": unit});
        serde_json::json!({
            "device": self.id,
            "sensor": "demo",
            "ts": ts,
            "mono_ms": started.elapsed().as_millis() as u64,
            "boot_id": boot_id,
            "clock_synced": true,
            "metrics": {
                "cpu_temp": metric(self.cpu_temp, "C"),
                "temperature": metric(self.temperature, "C"),
                "humidity": metric(self.humidity, "%"),
                "door": metric(if self.door { 1.0 } else { 0.0 }, ""),
            }
        })
        .to_string()
    }
}

/// Publishes a reading per device every `interval` until shutdown.
pub async fn run(
    broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
    devices: usize,
    interval: Duration,
) {
    info!(devices, ?interval, "demo devices publishing");
    let mut fleet: Vec<Device> = (1..=devices).map(Device::new).collect();
    let boot_id = format!("demo-{:016x}", rand::random::<u64>());
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for device in &fleet {
        broker.presence(&device.id, PresenceChange::Connected);
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let reason = hub_protocol::CloseCode::ServiceRestart.reason();
                for device in &fleet {
                    broker.presence(&device.id, PresenceChange::Disconnected { reason });
                }
                return;
            }
            _ = ticker.tick() => {}
        }
        // Unix milliseconds: increasing across hub restarts, so Redis' dedup never takes a new
        // reading for an old one.
        let seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for device in &mut fleet {
            device.step();
            let text = device.reading(&boot_id, started);
            let Ok(data) = RawValue::from_string(text) else {
                continue;
            };
            let untraced = tracing::Span::none();
            let reading = [Reading {
                seq,
                data: &data,
                span: &untraced,
            }];
            let publication = Publication {
                device: &device.id,
                channels: &device.channels,
                readings: &reading,
                received_at: Instant::now(),
            };
            if let Err(e) = broker.publish(&publication).await {
                warn!(device = %device.id, error = %e, "demo reading not published");
            }
        }
    }
}
