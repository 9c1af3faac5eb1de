//! The agent's own health: how much it holds, what it dropped, how its link is doing. Carried in
//! every reading (`"agent":{…}`, so the fleet dashboard sees a device falling behind) and, when
//! `metrics.listen` is set, served as Prometheus text on `/metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::Log;
use crate::uplink::LinkStats;

/// A snapshot, as it travels in readings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Health {
    /// Readings in the log not yet acknowledged by a hub.
    pub buffered: u64,
    /// Readings dropped (oldest first) because the log reached `storage.max_bytes`.
    pub dropped: u64,
    /// Connections made to a hub since the agent started.
    pub connects: u64,
    /// Seconds since the last ack; absent before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_ack_age_s: Option<u64>,
}

impl Health {
    /// Reads the log's and the link's counters; the caller holds the log.
    pub fn of(log: &Log, link: &LinkStats) -> Health {
        let stats = log.stats();
        let last_ack = link.last_ack_ms.load(Ordering::Relaxed);
        Health {
            buffered: stats.pending_records,
            dropped: stats.dropped_total,
            connects: link.connects.load(Ordering::Relaxed),
            last_ack_age_s: (last_ack > 0).then(|| now_ms().saturating_sub(last_ack) / 1000),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, acked: u64, last_seq: u64) -> String {
        let mut o = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "edge_agent_buffered_readings",
            "gauge",
            "Readings on disk not yet acknowledged by a hub.",
            self.buffered,
        );
        metric(
            "edge_agent_dropped_readings_total",
            "counter",
            "Readings dropped because the log reached storage.max_bytes.",
            self.dropped,
        );
        metric(
            "edge_agent_connects_total",
            "counter",
            "Connections made to a hub.",
            self.connects,
        );
        metric(
            "edge_agent_acked_readings_total",
            "counter",
            "Readings acknowledged by a hub since start.",
            acked,
        );
        metric(
            "edge_agent_last_seq",
            "gauge",
            "Highest seq given to a reading.",
            last_seq,
        );
        if let Some(age) = self.last_ack_age_s {
            metric(
                "edge_agent_last_ack_age_seconds",
                "gauge",
                "Seconds since a hub last acknowledged a reading.",
                age,
            );
        }
        o
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves `/metrics` on `addr` until shutdown.
pub async fn serve(
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    link: Arc<LinkStats>,
    shutdown: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve metrics");
            return;
        }
    };
    info!(addr = %listener.local_addr().unwrap_or(addr), "metrics on /metrics");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (log, link) = (log.clone(), link.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let response = if req.uri().path() == "/metrics" {
                    let (health, last_seq) = {
                        let log = log.lock().unwrap_or_else(|p| p.into_inner());
                        (Health::of(&log, &link), log.last_seq())
                    };
                    let body = health.render(link.acked.load(Ordering::Relaxed), last_seq);
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(body)))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found\n")))
                };
                std::future::ready(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
