//! Prometheus metrics, kept as plain atomics.
//!
//! Every metric the hot path touches is a fixed field updated with one relaxed atomic add; label
//! values are fixed lists known at start, so nothing is hashed or locked per event. `render`
//! writes the text exposition format 0.0.4.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

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

/// Histogram with fixed buckets and lock-free observation.
pub struct Histogram {
    bounds: &'static [u64],
    /// Rendered value of one unit: 1e-6 for microseconds shown as seconds.
    unit: f64,
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

const LATENCY_BOUNDS_US: &[u64] = &[
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

/// Queue depths: powers of two up to the largest `limits.outbound_queue` worth telling apart.
const DEPTH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

impl Histogram {
    fn with_bounds(bounds: &'static [u64], unit: f64) -> Self {
        Histogram {
            bounds,
            unit,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Durations, observed in microseconds and shown in seconds.
    pub fn latency() -> Self {
        Self::with_bounds(LATENCY_BOUNDS_US, 1e-6)
    }

    /// Item counts.
    pub fn depth() -> Self {
        Self::with_bounds(DEPTH_BOUNDS, 1.0)
    }

    pub fn observe(&self, d: Duration) {
        self.observe_value(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn observe_value(&self, v: u64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        self.sum.load(Relaxed) as f64 * self.unit
    }
}

pub const ROLES: &[&str] = &["agent", "viewer"];
pub const REFUSALS: &[&str] = &[
    "draining",
    "max_connections",
    "connect_rate",
    "identity_connections",
];
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
    /// Channels this hub's broker holds state for (`limits.max_channels` caps it).
    pub channels: Gauge,
    /// New channels refused because the table was full.
    pub channel_table_full: Counter,
    pub recoveries: CounterVec,
    pub publish_to_deliver: Histogram,
    /// Items waiting in a connection's outbound queue when its writer wakes.
    pub outbound_queue_depth: Histogram,
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
            channels: Gauge::default(),
            channel_table_full: Counter::default(),
            recoveries: CounterVec::new("result", RECOVERY_RESULTS),
            publish_to_deliver: Histogram::latency(),
            outbound_queue_depth: Histogram::depth(),
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

    /// Every metric family with its current values, in exposition order.
    pub fn families(&self) -> Vec<Family<'_>> {
        use Values::*;
        let f = |name, help, values| Family { name, help, values };
        vec![
            f(
                "hub_connections",
                "Open WebSocket connections.",
                Gauges(
                    "role",
                    vec![
                        ("agent", self.connections_agent.get()),
                        ("viewer", self.connections_viewer.get()),
                    ],
                ),
            ),
            f(
                "hub_connections_opened_total",
                "WebSocket connections accepted.",
                Labelled(&self.connections_opened),
            ),
            f(
                "hub_disconnects_total",
                "WebSocket connections closed, by reason.",
                Labelled(&self.disconnects),
            ),
            f(
                "hub_connections_refused_total",
                "Upgrades refused by admission control (draining, the connection cap, the connect rate, an identity's share).",
                Labelled(&self.refused),
            ),
            f(
                "hub_auth_failures_total",
                "Upgrades refused by authentication.",
                Labelled(&self.auth_failures),
            ),
            f(
                "hub_frames_received_total",
                "WebSocket frames received.",
                Count(&self.frames_received),
            ),
            f(
                "hub_frames_sent_total",
                "WebSocket frames sent.",
                Count(&self.frames_sent),
            ),
            f(
                "hub_sent_bytes_total",
                "Bytes written to WebSocket connections.",
                Count(&self.bytes_sent),
            ),
            f(
                "hub_publications_total",
                "Publish frames handled, by result.",
                Labelled(&self.publications),
            ),
            f(
                "hub_deliveries_total",
                "Messages queued to subscribers.",
                Count(&self.deliveries),
            ),
            f(
                "hub_delivery_drops_total",
                "Messages not queued because the subscriber was too slow.",
                Count(&self.delivery_drops),
            ),
            f(
                "hub_slow_consumer_disconnects_total",
                "Subscribers closed with 4008.",
                Count(&self.slow_consumer_disconnects),
            ),
            f(
                "hub_subscriptions",
                "Active subscriptions.",
                Level(self.subscriptions.get()),
            ),
            f(
                "hub_channels",
                "Channels this hub holds state for (limits.max_channels caps them).",
                Level(self.channels.get()),
            ),
            f(
                "hub_channel_table_full_total",
                "Subscribes and publications refused because the channel table was full.",
                Count(&self.channel_table_full),
            ),
            f(
                "hub_recoveries_total",
                "Subscribes with `since`, by outcome.",
                Labelled(&self.recoveries),
            ),
            f(
                "hub_publish_to_deliver_seconds",
                "From receiving a publish to writing it to a subscriber's socket (oldest frame per write).",
                Distribution(&self.publish_to_deliver),
            ),
            f(
                "hub_outbound_queue_depth",
                "Items waiting in a connection's outbound queue when its writer wakes (limits.outbound_queue is the most).",
                Distribution(&self.outbound_queue_depth),
            ),
            f(
                "hub_redis_command_seconds",
                "Redis commands and scripts, from taking a pooled connection to the reply.",
                Distribution(&self.redis_commands),
            ),
            f(
                "hub_redis_errors_total",
                "Redis commands that failed or timed out (the caller answered unavailable).",
                Count(&self.redis_errors),
            ),
            f(
                "hub_broker_messages_total",
                "Publications received from Redis pub/sub.",
                Count(&self.broker_messages),
            ),
            f(
                "hub_broker_unwanted_messages_total",
                "Publications received from Redis for channels no client of this hub watches.",
                Count(&self.broker_unwanted),
            ),
            f(
                "hub_broker_reconnects_total",
                "Reconnects of the Redis pub/sub connection.",
                Count(&self.broker_reconnects),
            ),
            f(
                "hub_gap_fills_total",
                "Offset gaps in pub/sub repaired from history.",
                Count(&self.gap_fills),
            ),
            f(
                "hub_history_misses_total",
                "Live channels whose missed messages were gone from history (subscribers told recovered=false).",
                Count(&self.history_misses),
            ),
            f(
                "hub_ready",
                "1 when the hub accepts new connections.",
                Level(self.ready.get()),
            ),
        ]
    }

    /// The text exposition format 0.0.4 of every metric.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(8 * 1024);
        for family in self.families() {
            let name = family.name;
            let _ = writeln!(
                o,
                "# HELP {name} {}\n# TYPE {name} {}",
                family.help,
                family.values.kind()
            );
            match family.values {
                Values::Count(c) => {
                    let _ = writeln!(o, "{name} {}", c.get());
                }
                Values::Level(v) => {
                    let _ = writeln!(o, "{name} {v}");
                }
                Values::Labelled(v) => {
                    for (value, c) in v.values.iter().zip(v.counters.iter()) {
                        let _ = writeln!(o, "{name}{{{}=\"{value}\"}} {}", v.label, c.get());
                    }
                }
                Values::Gauges(label, series) => {
                    for (value, v) in series {
                        let _ = writeln!(o, "{name}{{{label}=\"{value}\"}} {v}");
                    }
                }
                Values::Distribution(h) => histogram(&mut o, name, h),
            }
        }
        o
    }
}

/// One metric family and where its values are read from.
pub struct Family<'a> {
    pub name: &'static str,
    pub help: &'static str,
    pub values: Values<'a>,
}

pub enum Values<'a> {
    Count(&'a Counter),
    Labelled(&'a CounterVec),
    Level(i64),
    Gauges(&'static str, Vec<(&'static str, i64)>),
    Distribution(&'a Histogram),
}

impl Values<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Values::Count(_) | Values::Labelled(_) => "counter",
            Values::Level(_) | Values::Gauges(..) => "gauge",
            Values::Distribution(_) => "histogram",
        }
    }
}

fn histogram(o: &mut String, name: &str, h: &Histogram) {
    let mut cumulative = 0;
    for (i, bound) in h.bounds.iter().enumerate() {
        cumulative += h.buckets[i].load(Relaxed);
        let _ = writeln!(
            o,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 * h.unit
        );
    }
    cumulative += h.buckets[h.bounds.len()].load(Relaxed);
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(o, "{name}_sum {}", h.sum());
    let _ = writeln!(o, "{name}_count {cumulative}");
}

/// Publishes every family through OpenTelemetry observable instruments, read at each export:
/// nothing more on the hot path. Names drop `_total` (OTLP counters are monotonic by type); a
/// histogram goes as its `_count` and `_sum`, its buckets stay on `/metrics`.
pub fn observe_with(meter: &Meter, metrics: Arc<Metrics>) {
    for family in metrics.families() {
        let name = family.name;
        let help = family.help;
        let m = metrics.clone();
        match family.values {
            Values::Count(_) | Values::Labelled(_) => {
                meter
                    .u64_observable_counter(name.strip_suffix("_total").unwrap_or(name))
                    .with_description(help)
                    .with_callback(move |o| {
                        read(&m, name, |values| match values {
                            Values::Count(c) => o.observe(c.get(), &[]),
                            Values::Labelled(v) => {
                                for (value, c) in v.values.iter().zip(v.counters.iter()) {
                                    o.observe(c.get(), &[KeyValue::new(v.label, *value)]);
                                }
                            }
                            _ => {}
                        })
                    })
                    .build();
            }
            Values::Level(_) | Values::Gauges(..) => {
                meter
                    .i64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |o| {
                        read(&m, name, |values| match values {
                            Values::Level(v) => o.observe(v, &[]),
                            Values::Gauges(label, series) => {
                                for (value, v) in series {
                                    o.observe(v, &[KeyValue::new(label, value)]);
                                }
                            }
                            _ => {}
                        })
                    })
                    .build();
            }
            Values::Distribution(_) => {
                let m2 = m.clone();
                meter
                    .u64_observable_counter(format!("{name}_count"))
                    .with_description(help)
                    .with_callback(move |o| {
                        read(&m, name, |values| {
                            if let Values::Distribution(h) = values {
                                o.observe(h.count(), &[]);
                            }
                        })
                    })
                    .build();
                meter
                    .f64_observable_counter(format!("{name}_sum"))
                    .with_description(help)
                    .with_callback(move |o| {
                        read(&m2, name, |values| {
                            if let Values::Distribution(h) = values {
                                o.observe(h.sum(), &[]);
                            }
                        })
                    })
                    .build();
            }
        }
    }
}

fn read(metrics: &Metrics, name: &str, f: impl FnOnce(Values<'_>)) {
    if let Some(family) = metrics.families().into_iter().find(|f| f.name == name) {
        f(family.values);
    }
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
