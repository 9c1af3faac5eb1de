//! Wiring: one task per sensor appends readings to the log; the uplink sends them; a flusher
//! syncs the log on the `interval` fsync policy. Everything stops on the shutdown token.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Fsync, Settings};
use crate::health::{self, Health};
use crate::reading;
use crate::sensors::{self, Metric, Sensor, SensorSettings};
use crate::store::{Log, StoreError};
use crate::uplink::{LinkStats, Uplink};

/// What sensor tasks share.
#[derive(Clone)]
struct Recorder {
    device: Arc<str>,
    boot_id: Arc<str>,
    log: Arc<Mutex<Log>>,
    appended: Arc<Notify>,
    link: Arc<LinkStats>,
}

impl Recorder {
    /// Numbers and stores one reading. Blocking (file I/O, maybe fsync): call off the runtime.
    fn record(&self, sensor: &str, result: &Result<Vec<Metric>, String>) -> Result<(), StoreError> {
        let stamp = reading::stamp(&self.boot_id);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let seq = log.next_seq()?;
        let health = Health::of(&log, &self.link);
        let payload = match result {
            Ok(metrics) => reading::encode(&self.device, sensor, &stamp, metrics, &health),
            Err(e) => reading::encode_error(&self.device, sensor, &stamp, e, &health),
        };
        let appended = log.append(seq, &payload)?;
        drop(log);
        if appended.dropped > 0 {
            warn!(
                dropped = appended.dropped,
                "log full: dropped the oldest unsent readings"
            );
        }
        self.appended.notify_one();
        Ok(())
    }
}

/// Runs the agent until `shutdown` is cancelled.
/// Runs the agent until `shutdown`. Each batch of readings `roots` samples is sent as a trace
/// that the hubs continue.
pub async fn run(
    settings: Settings,
    roots: observability::RootSampler,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let device = device_id(&settings.token()?)?;
    let store = settings.store_config();
    let dir = store.dir.clone();
    let log = tokio::task::spawn_blocking(move || Log::open(store))
        .await?
        .with_context(|| format!("cannot open the reading log in {}", dir.display()))?;
    let stats = log.stats();
    info!(
        %device,
        pending = stats.pending_records,
        last_seq = stats.last_seq,
        skipped_seqs = log.skipped_at_open(),
        dropped_total = stats.dropped_total,
        "log opened"
    );
    let log = Arc::new(Mutex::new(log));
    let appended = Arc::new(Notify::new());
    let link = Arc::new(LinkStats::default());
    let recorder = Recorder {
        device: device.into(),
        boot_id: reading::boot_id().into(),
        log: log.clone(),
        appended: appended.clone(),
        link: link.clone(),
    };

    let mut tasks = JoinSet::new();
    let sensors = if settings.simulate {
        vec![sensors::SensorSettings::simulated()]
    } else {
        settings.sensors.clone()
    };
    for sensor in sensors {
        tasks.spawn(sensor_task(sensor, recorder.clone(), shutdown.clone()));
    }
    if settings.storage.fsync == Fsync::Interval {
        tasks.spawn(flusher(
            log.clone(),
            settings.storage.fsync_interval,
            shutdown.clone(),
        ));
    }
    let token_settings = settings.clone();
    let uplink = Uplink::new(
        settings.hub.clone(),
        Box::new(move || Ok(token_settings.token()?)),
        log.clone(),
        appended,
        settings.storage.dir.clone(),
        link.clone(),
        roots,
    )?;
    tasks.spawn(uplink.run(shutdown.clone()));
    if let Some(addr) = settings.metrics.listen {
        tasks.spawn(health::serve(addr, log.clone(), link, shutdown.clone()));
    }

    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    log.sync().context("final sync of the reading log")?;
    info!(pending = log.stats().pending_records, "stopped");
    Ok(())
}

/// Reads one sensor at its interval (and, for inputs that report changes, polls them), until
/// shutdown. A sensor that fails reports an error reading and is tried again next time; one
/// that cannot even be set up is set up again at its interval.
async fn sensor_task(settings: SensorSettings, recorder: Recorder, shutdown: CancellationToken) {
    let label = settings.label();
    let interval = settings.interval();
    let mut sensor: Option<Box<dyn Sensor>> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(Duration::from_secs(3600));
    let mut failing = false;
    loop {
        let periodic = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => true,
            _ = poll.tick(), if sensor.as_ref().is_some_and(|s| s.poll_interval().is_some()) => false,
        };
        let taken = sensor.take();
        let settings = settings.clone();
        let job = tokio::task::spawn_blocking(move || {
            let mut sensor = match taken {
                Some(s) => s,
                None => match sensors::build(&settings) {
                    Ok(s) => s,
                    Err(e) => return (None, Some(Err(e.to_string()))),
                },
            };
            let result = if periodic {
                Some(sensor.read().map_err(|e| e.to_string()))
            } else {
                sensor
                    .poll_changes(Instant::now())
                    .filter(|changes| !changes.is_empty())
                    .map(Ok)
            };
            (Some(sensor), result)
        });
        let Ok((back, result)) = job.await else {
            error!(sensor = %label, "sensor read panicked; rebuilding it");
            continue;
        };
        if let Some(s) = &back
            && sensor.is_none()
            && let Some(every) = s.poll_interval()
        {
            poll = tokio::time::interval(every);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        }
        sensor = back;
        let Some(result) = result else { continue };
        match &result {
            Err(e) if !failing => warn!(sensor = %label, error = %e, "sensor failing"),
            Ok(_) if failing => info!(sensor = %label, "sensor back"),
            _ => {}
        }
        failing = result.is_err();
        let recorder = recorder.clone();
        let name = sensor
            .as_ref()
            .map_or(label.clone(), |s| s.name().to_owned());
        match tokio::task::spawn_blocking(move || recorder.record(&name, &result)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(sensor = %label, error = %e, "cannot store a reading"),
            Err(e) => error!(sensor = %label, error = %e, "storing a reading panicked"),
        }
    }
}

async fn flusher(log: Arc<Mutex<Log>>, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let log = log.clone();
        let synced = tokio::task::spawn_blocking(move || {
            log.lock().unwrap_or_else(|p| p.into_inner()).sync()
        })
        .await;
        if let Ok(Err(e)) = synced {
            error!(error = %e, "cannot sync the reading log");
        }
    }
}

/// The device id is the token's `sub`. Read without verifying: only the hub can verify, and
/// the agent needs the id before it can reach one.
pub fn device_id(token: &str) -> anyhow::Result<String> {
    let payload = token
        .split('.')
        .nth(1)
        .context("the token is not a JWT (three dot-separated parts)")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .context("the token's payload is not base64url")?;
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    let claims: Claims =
        serde_json::from_slice(&bytes).context("the token's payload has no `sub` claim")?;
    Ok(claims.sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_id_is_the_tokens_subject() {
        // {"alg":"HS256"} . {"sub":"pi-07","role":"agent"} . signature
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwaS0wNyIsInJvbGUiOiJhZ2VudCJ9.c2ln";
        assert_eq!(device_id(token).unwrap(), "pi-07");
        assert!(device_id("not-a-jwt").is_err());
        assert!(device_id("a.!!!.c").is_err());
    }
}
