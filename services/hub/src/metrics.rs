//! Prometheus metrics, kept as plain atomics.
//!
//! Every metric the hot path touches is a fixed field updated with one relaxed atomic add; label
//! values are fixed lists known at start, so nothing is hashed or locked per event. `render`
//! writes the text exposition format 0.0.4.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Counters with one label whose values are fixed when the family is made.
pub struct CounterVec {
    label: &'static str,
    values: &'static [&'static str],
    counters: Box<[Counter]>,
}

impl CounterVec {
    pub fn new(label: &'static str, values: &'static [&'static str]) -> Self {
        CounterVec {
            label,
            values,
            counters: values.iter().map(|_| Counter::default()).collect(),
        }
    }

    /// Counts one event for `value`; a value outside the list counts under the last one.
    pub fn inc(&self, value: &str) {
        let i = self
            .values
            .iter()
            .position(|v| *v == value)
            .unwrap_or(self.values.len() - 1);
        self.counters[i].inc();
    }

    pub fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map_or(0, |i| self.counters[i].get())
    }
}

/// Latency histogram with fixed buckets and lock-free observation.
pub struct Histogram {
    bounds_us: &'static [u64],
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

const LATENCY_BOUNDS_US: &[u64] = &[
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

impl Histogram {
    pub fn latency() -> Self {
        Histogram {
            bounds_us: LATENCY_BOUNDS_US,
            buckets: (0..=LATENCY_BOUNDS_US.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = self
            .bounds_us
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(self.bounds_us.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

pub const ROLES: &[&str] = &["agent", "viewer"];
pub const REFUSALS: &[&str] = &["draining", "max_connections", "connect_rate"];
pub const PUBLISH_RESULTS: &[&str] = &["accepted", "duplicate", "refused"];
pub const RECOVERY_RESULTS: &[&str] = &["recovered", "not_recovered"];

/// Every metric of one hub.
pub struct Metrics {
    pub connections_agent: Gauge,
    pub connections_viewer: Gauge,
    pub connections_opened: CounterVec,
    pub disconnects: CounterVec,
    pub refused: CounterVec,
    pub auth_failures: CounterVec,
    pub frames_received: Counter,
    pub frames_sent: Counter,
    pub bytes_sent: Counter,
    pub publications: CounterVec,
    pub deliveries: Counter,
    pub delivery_drops: Counter,
    pub slow_consumer_disconnects: Counter,
    pub subscriptions: Gauge,
    pub recoveries: CounterVec,
    pub publish_to_deliver: Histogram,
    pub ready: Gauge,
    pub broker_reconnects: Counter,
    pub broker_messages: Counter,
    pub broker_unwanted: Counter,
    pub gap_fills: Counter,
    pub history_misses: Counter,
    pub redis_commands: Histogram,
    pub redis_errors: Counter,
}

impl Metrics {
    pub fn new(
        disconnect_reasons: &'static [&'static str],
        auth_reasons: &'static [&'static str],
    ) -> Self {
        Metrics {
            connections_agent: Gauge::default(),
            connections_viewer: Gauge::default(),
            connections_opened: CounterVec::new("role", ROLES),
            disconnects: CounterVec::new("reason", disconnect_reasons),
            refused: CounterVec::new("reason", REFUSALS),
            auth_failures: CounterVec::new("reason", auth_reasons),
            frames_received: Counter::default(),
            frames_sent: Counter::default(),
            bytes_sent: Counter::default(),
            publications: CounterVec::new("result", PUBLISH_RESULTS),
            deliveries: Counter::default(),
            delivery_drops: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            subscriptions: Gauge::default(),
            recoveries: CounterVec::new("result", RECOVERY_RESULTS),
            publish_to_deliver: Histogram::latency(),
            ready: Gauge::default(),
            broker_reconnects: Counter::default(),
            broker_messages: Counter::default(),
            broker_unwanted: Counter::default(),
            gap_fills: Counter::default(),
            history_misses: Counter::default(),
            redis_commands: Histogram::latency(),
            redis_errors: Counter::default(),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let o = &mut out;
        header(o, "hub_connections", "gauge", "Open WebSocket connections.");
        let _ = writeln!(
            o,
            "hub_connections{{role=\"agent\"}} {}",
            self.connections_agent.get()
        );
        let _ = writeln!(
            o,
            "hub_connections{{role=\"viewer\"}} {}",
            self.connections_viewer.get()
        );
        vec(
            o,
            "hub_connections_opened_total",
            "WebSocket connections accepted.",
            &self.connections_opened,
        );
        vec(
            o,
            "hub_disconnects_total",
            "WebSocket connections closed, by reason.",
            &self.disconnects,
        );
        vec(
            o,
            "hub_connections_refused_total",
            "Upgrades refused before authentication.",
            &self.refused,
        );
        vec(
            o,
            "hub_auth_failures_total",
            "Upgrades refused by authentication.",
            &self.auth_failures,
        );
        counter(
            o,
            "hub_frames_received_total",
            "WebSocket frames received.",
            &self.frames_received,
        );
        counter(
            o,
            "hub_frames_sent_total",
            "WebSocket frames sent.",
            &self.frames_sent,
        );
        counter(
            o,
            "hub_sent_bytes_total",
            "Bytes written to WebSocket connections.",
            &self.bytes_sent,
        );
        vec(
            o,
            "hub_publications_total",
            "Publish frames handled, by result.",
            &self.publications,
        );
        counter(
            o,
            "hub_deliveries_total",
            "Messages queued to subscribers.",
            &self.deliveries,
        );
        counter(
            o,
            "hub_delivery_drops_total",
            "Messages not queued because the subscriber was too slow.",
            &self.delivery_drops,
        );
        counter(
            o,
            "hub_slow_consumer_disconnects_total",
            "Subscribers closed with 4008.",
            &self.slow_consumer_disconnects,
        );
        header(o, "hub_subscriptions", "gauge", "Active subscriptions.");
        let _ = writeln!(o, "hub_subscriptions {}", self.subscriptions.get());
        vec(
            o,
            "hub_recoveries_total",
            "Subscribes with `since`, by outcome.",
            &self.recoveries,
        );
        histogram(
            o,
            "hub_publish_to_deliver_seconds",
            "From receiving a publish to writing it to a subscriber's socket (oldest frame per write).",
            &self.publish_to_deliver,
        );
        histogram(
            o,
            "hub_redis_command_seconds",
            "Redis commands and scripts, from taking a pooled connection to the reply.",
            &self.redis_commands,
        );
        counter(
            o,
            "hub_redis_errors_total",
            "Redis commands that failed or timed out (the caller answered unavailable).",
            &self.redis_errors,
        );
        counter(
            o,
            "hub_broker_messages_total",
            "Publications received from Redis pub/sub.",
            &self.broker_messages,
        );
        counter(
            o,
            "hub_broker_unwanted_messages_total",
            "Publications received from Redis for channels no client of this hub watches.",
            &self.broker_unwanted,
        );
        counter(
            o,
            "hub_broker_reconnects_total",
            "Reconnects of the Redis pub/sub connection.",
            &self.broker_reconnects,
        );
        counter(
            o,
            "hub_gap_fills_total",
            "Offset gaps in pub/sub repaired from history.",
            &self.gap_fills,
        );
        counter(
            o,
            "hub_history_misses_total",
            "Live channels whose missed messages were gone from history (subscribers told recovered=false).",
            &self.history_misses,
        );
        header(
            o,
            "hub_ready",
            "gauge",
            "1 when the hub accepts new connections.",
        );
        let _ = writeln!(o, "hub_ready {}", self.ready.get());
        out
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(o: &mut String, name: &str, help: &str, c: &Counter) {
    header(o, name, "counter", help);
    let _ = writeln!(o, "{name} {}", c.get());
}

fn vec(o: &mut String, name: &str, help: &str, v: &CounterVec) {
    header(o, name, "counter", help);
    for (value, c) in v.values.iter().zip(v.counters.iter()) {
        let _ = writeln!(o, "{name}{{{}=\"{value}\"}} {}", v.label, c.get());
    }
}

fn histogram(o: &mut String, name: &str, help: &str, h: &Histogram) {
    header(o, name, "histogram", help);
    let mut cumulative = 0;
    for (i, bound) in h.bounds_us.iter().enumerate() {
        cumulative += h.buckets[i].load(Relaxed);
        let _ = writeln!(
            o,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += h.buckets[h.bounds_us.len()].load(Relaxed);
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(o, "{name}_sum {}", h.sum_us.load(Relaxed) as f64 / 1e6);
    let _ = writeln!(o, "{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let m = Metrics::new(&["normal", "other"], &["expired", "other"]);
        m.publish_to_deliver.observe(Duration::from_micros(100));
        m.publish_to_deliver.observe(Duration::from_millis(3));
        m.publish_to_deliver.observe(Duration::from_secs(10));
        let text = m.render();
        assert!(
            text.contains("hub_publish_to_deliver_seconds_bucket{le=\"0.00025\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("hub_publish_to_deliver_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("hub_publish_to_deliver_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("hub_publish_to_deliver_seconds_count 3\n"));
    }

    #[test]
    fn unknown_label_values_fall_into_the_last_one() {
        let v = CounterVec::new("reason", &["a", "other"]);
        v.inc("a");
        v.inc("zzz");
        assert_eq!((v.get("a"), v.get("other")), (1, 1));
    }
}
