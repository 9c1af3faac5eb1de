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
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Metrics with one label whose values are fixed when the family is made.
pub struct Labelled<M> {
    label: &'static str,
    values: &'static [&'static str],
    series: Box<[M]>,
}

/// Counters by one label.
pub type CounterVec = Labelled<Counter>;
/// Gauges by one label.
pub type GaugeVec = Labelled<Gauge>;

impl<M: Default> Labelled<M> {
    pub fn new(label: &'static str, values: &'static [&'static str]) -> Self {
        Labelled {
            label,
            values,
            series: values.iter().map(|_| M::default()).collect(),
        }
    }
}

impl<M> Labelled<M> {
    /// The series of `value`. A value outside the list is a bug that fails every test (debug
    /// builds); a release build files it under the last value rather than crash.
    pub fn get(&self, value: &str) -> &M {
        let i = self.values.iter().position(|v| *v == value);
        debug_assert!(i.is_some(), "`{value}` is not a `{}` label", self.label);
        let last = self.series.len().saturating_sub(1);
        &self.series[i.unwrap_or(last)]
    }

    /// Each label value with its series, in the list's order.
    fn each(&self) -> impl Iterator<Item = (&'static str, &M)> {
        self.values.iter().copied().zip(self.series.iter())
    }
}

impl CounterVec {
    /// Counts one event for `value`.
    pub fn inc(&self, value: &str) {
        self.get(value).inc();
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

/// Counts of things (devices in a snapshot), by powers of ten.
const SIZE_BOUNDS: &[u64] = &[1, 10, 100, 1_000, 10_000, 100_000, 1_000_000];

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

    /// Larger counts, by powers of ten.
    pub fn sizes() -> Self {
        Self::with_bounds(SIZE_BOUNDS, 1.0)
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

pub const PUBLISH_RESULTS: &[&str] = &["accepted", "duplicate", "refused"];
pub const RECOVERY_RESULTS: &[&str] = &["recovered", "not_recovered"];
pub const PRESENCE_STATES: &[&str] = &["online", "offline"];
pub const KEY_RELOAD_RESULTS: &[&str] = &["applied", "rejected"];
pub const REFRESH_RESULTS: &[&str] = &["refreshed", "refused"];

/// Label values that other modules derive from their enums.
pub struct Labels {
    pub disconnect_reasons: &'static [&'static str],
    pub refusals: &'static [&'static str],
    pub auth_failures: &'static [&'static str],
}

/// Declares every metric once: its field, how it is made, its exposition name and help. The
/// struct, its constructor and [`Metrics::families`] all come from this one list, in exposition
/// order.
macro_rules! metrics {
    ($labels:ident; $($(#[$doc:meta])* $field:ident: $kind:ty = $make:expr, $name:literal, $help:literal;)*) => {
        /// Every metric of one hub.
        pub struct Metrics {
            $($(#[$doc])* pub $field: $kind,)*
        }

        impl Metrics {
            pub fn new($labels: Labels) -> Self {
                Metrics { $($field: $make,)* }
            }

            /// Every metric family with its current values, in exposition order.
            pub fn families(&self) -> Vec<Family<'_>> {
                vec![$(Family { name: $name, help: $help, values: self.$field.values() },)*]
            }
        }
    };
}

metrics! { labels;
    connections: GaugeVec = GaugeVec::new("role", hub_protocol::Role::NAMES),
        "hub_connections", "Open WebSocket connections.";
    connections_opened: CounterVec = CounterVec::new("role", hub_protocol::Role::NAMES),
        "hub_connections_opened_total", "WebSocket connections accepted.";
    disconnects: CounterVec = CounterVec::new("reason", labels.disconnect_reasons),
        "hub_disconnects_total", "WebSocket connections closed, by reason.";
    refused: CounterVec = CounterVec::new("reason", labels.refusals),
        "hub_connections_refused_total",
        "Upgrades refused by admission control (draining, the connection cap, the connect rate, an identity's share).";
    auth_failures: CounterVec = CounterVec::new("reason", labels.auth_failures),
        "hub_auth_failures_total", "Upgrades refused by authentication.";
    frames_received: Counter = Counter::default(),
        "hub_frames_received_total", "WebSocket frames received.";
    frames_sent: Counter = Counter::default(),
        "hub_frames_sent_total", "WebSocket frames sent.";
    bytes_sent: Counter = Counter::default(),
        "hub_sent_bytes_total", "Bytes written to WebSocket connections.";
    publications: CounterVec = CounterVec::new("result", PUBLISH_RESULTS),
        "hub_publications_total", "Publish frames handled, by result.";
    publish_batch_readings: Histogram = Histogram::depth(),
        "hub_publish_batch_readings",
        "Readings per broker publication: an agent's publishes that arrived together go as one.";
    deliveries: Counter = Counter::default(),
        "hub_deliveries_total", "Messages queued to subscribers.";
    delivery_drops: Counter = Counter::default(),
        "hub_delivery_drops_total", "Messages not queued because the subscriber was too slow.";
    slow_consumer_disconnects: Counter = Counter::default(),
        "hub_slow_consumer_disconnects_total", "Subscribers closed with 4008.";
    subscriptions: Gauge = Gauge::default(),
        "hub_subscriptions", "Active subscriptions.";
    channels: Gauge = Gauge::default(),
        "hub_channels", "Channels this hub holds state for (limits.max_channels caps them).";
    channel_table_full: Counter = Counter::default(),
        "hub_channel_table_full_total",
        "Subscribes and publications refused because the channel table was full.";
    recoveries: CounterVec = CounterVec::new("result", RECOVERY_RESULTS),
        "hub_recoveries_total", "Subscribes with `since`, by outcome.";
    publish_to_deliver: Histogram = Histogram::latency(),
        "hub_publish_to_deliver_seconds",
        "From receiving a publish to writing it to a subscriber's socket (oldest frame per write).";
    /// Items waiting in a connection's outbound queue when its writer wakes.
    outbound_queue_depth: Histogram = Histogram::depth(),
        "hub_outbound_queue_depth",
        "Items waiting in a connection's outbound queue when its writer wakes (limits.outbound_queue is the most).";
    redis_commands: Histogram = Histogram::latency(),
        "hub_redis_command_seconds",
        "Redis commands and scripts, from taking a pooled connection to the reply.";
    redis_errors: Counter = Counter::default(),
        "hub_redis_errors_total",
        "Redis commands that failed or timed out (the caller answered unavailable).";
    broker_messages: Counter = Counter::default(),
        "hub_broker_messages_total",
        "Redis pub/sub messages received (each holds one or more publications to a channel).";
    broker_unwanted: Counter = Counter::default(),
        "hub_broker_unwanted_messages_total",
        "Publications received from Redis for channels no client of this hub watches.";
    broker_reconnects: Counter = Counter::default(),
        "hub_broker_reconnects_total", "Reconnects of the Redis pub/sub connection.";
    broker_pending_channels: Gauge = Gauge::default(),
        "hub_broker_pending_channels",
        "Channels watched here whose Redis Cluster shard does not take their subscription (it is down): their subscribers wait.";
    gap_fills: Counter = Counter::default(),
        "hub_gap_fills_total", "Offset gaps in pub/sub repaired from history.";
    history_misses: Counter = Counter::default(),
        "hub_history_misses_total",
        "Live channels whose missed messages were gone from history (subscribers told recovered=false).";
    snapshot_devices: Histogram = Histogram::sizes(),
        "hub_snapshot_devices",
        "Devices in each snapshot sent (subscribes with `snapshot: true`).";
    snapshots_truncated: Counter = Counter::default(),
        "hub_snapshots_truncated_total",
        "Snapshots cut short by history.snapshot_devices or the subscriber's queue (the oldest devices left out).";
    conflated: Counter = Counter::default(),
        "hub_conflated_messages_total",
        "Messages of conflated subscriptions (max_rate) replaced by a newer one of the same device before they were sent.";
    presence_changes: CounterVec = CounterVec::new("state", PRESENCE_STATES),
        "hub_presence_changes_total",
        "Presence messages this hub published (devices coming online or going offline; hub_gone ones included).";
    presence_pending: Gauge = Gauge::default(),
        "hub_presence_pending",
        "Redis broker: devices whose presence change this hub has not yet written to Redis.";
    token_refreshes: CounterVec = CounterVec::new("result", REFRESH_RESULTS),
        "hub_token_refreshes_total",
        "refresh frames: the connection's token replaced (refreshed), or refused and kept.";
    revocations: Gauge = Gauge::default(),
        "hub_revocations", "Revocations in force (tokens of a sub issued before a time, or by jti).";
    auth_keys: Gauge = Gauge::default(),
        "hub_auth_keys", "Keys in auth.jwks_file's set as the hub uses it.";
    auth_key_reloads: CounterVec = CounterVec::new("result", KEY_RELOAD_RESULTS),
        "hub_auth_key_reloads_total",
        "Changes of auth.jwks_file taken (applied) or refused, the previous keys kept (rejected).";
    ready: Gauge = Gauge::default(),
        "hub_ready", "1 when the hub accepts new connections.";
}

impl Metrics {
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
                    for (value, c) in v.each() {
                        let _ = writeln!(o, "{name}{{{}=\"{value}\"}} {}", v.label, c.get());
                    }
                }
                Values::Levels(v) => {
                    for (value, g) in v.each() {
                        let _ = writeln!(o, "{name}{{{}=\"{value}\"}} {}", v.label, g.get());
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
    Levels(&'a GaugeVec),
    Distribution(&'a Histogram),
}

/// Each kind of metric says how its values are read.
trait Observe {
    fn values(&self) -> Values<'_>;
}

impl Observe for Counter {
    fn values(&self) -> Values<'_> {
        Values::Count(self)
    }
}

impl Observe for Gauge {
    fn values(&self) -> Values<'_> {
        Values::Level(self.get())
    }
}

impl Observe for CounterVec {
    fn values(&self) -> Values<'_> {
        Values::Labelled(self)
    }
}

impl Observe for GaugeVec {
    fn values(&self) -> Values<'_> {
        Values::Levels(self)
    }
}

impl Observe for Histogram {
    fn values(&self) -> Values<'_> {
        Values::Distribution(self)
    }
}

impl Values<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Values::Count(_) | Values::Labelled(_) => "counter",
            Values::Level(_) | Values::Levels(_) => "gauge",
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
                                for (value, c) in v.each() {
                                    o.observe(c.get(), &[KeyValue::new(v.label, value)]);
                                }
                            }
                            _ => {}
                        })
                    })
                    .build();
            }
            Values::Level(_) | Values::Levels(_) => {
                meter
                    .i64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |o| {
                        read(&m, name, |values| match values {
                            Values::Level(v) => o.observe(v, &[]),
                            Values::Levels(v) => {
                                for (value, g) in v.each() {
                                    o.observe(g.get(), &[KeyValue::new(v.label, value)]);
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
        let m = Metrics::new(Labels {
            disconnect_reasons: &["normal"],
            refusals: &["draining"],
            auth_failures: &["expired"],
        });
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
    fn label_values_are_counted_apart() {
        let v = CounterVec::new("reason", &["a", "other"]);
        v.inc("a");
        v.inc("a");
        v.inc("other");
        assert_eq!((v.get("a").get(), v.get("other").get()), (2, 1));
    }

    #[test]
    #[should_panic(expected = "`zzz` is not a `reason` label")]
    fn an_unknown_label_value_fails_the_tests() {
        CounterVec::new("reason", &["a", "other"]).inc("zzz");
    }
}
