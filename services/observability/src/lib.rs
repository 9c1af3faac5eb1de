//! Logs, traces and metrics export shared by the hub and the edge agent.
//!
//! [`init`] installs one `tracing` subscriber per process: a stderr log layer (text, or JSON
//! with trace ids) and, when OTLP export is configured, a `tracing-opentelemetry` layer that
//! turns spans into OpenTelemetry spans sent through a batch processor. Export is off by
//! default; with it off no OpenTelemetry layer exists and spans cost what `tracing` spans cost.
//!
//! - [`settings`]: the `[log]` and `[telemetry]` settings and the `OTEL_*` variables.
//! - [`export`]: OTLP exporters over gRPC or HTTP/protobuf.
//! - [`logs`]: the JSON log format with `trace_id`/`span_id`.
//! - [`propagation`]: W3C `traceparent` in and out of spans.
//!
//! The returned [`Telemetry`] flushes what is buffered at [`Telemetry::shutdown`]: keep it
//! alive until the runtime's work is done.

pub mod export;
pub mod logs;
pub mod propagation;
pub mod settings;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::future::Either;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing::instrument::{Instrument, Instrumented};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use settings::{LogFormat, Protocol, TelemetrySettings};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("a tracing subscriber is already installed: {0}")]
    Installed(#[from] tracing_subscriber::util::TryInitError),
}

/// `work` inside `span`. Untraced, the usual case, `work` runs as it is and the caller's state
/// machine holds no span at all (a connection's task would grow by one per nesting level);
/// traced, it runs boxed inside the span.
pub fn in_span<F: Future>(span: Span, work: F) -> Either<F, Pin<Box<Instrumented<F>>>> {
    if span.is_disabled() {
        Either::Left(work)
    } else {
        Either::Right(Box::pin(work.instrument(span)))
    }
}

/// Who is reporting: `service.name` defaults to `service`, `service.instance.id` is `instance`.
pub struct Identity<'a> {
    pub service: &'a str,
    pub instance: &'a str,
    pub version: &'a str,
}

/// The installed providers; dropping it flushes and stops export.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    roots: RootSampler,
}

/// Decides, before a span is built, whether a new trace starts here.
///
/// A `tracing` span costs its OpenTelemetry data from creation to close whether or not the
/// SDK's sampler records it; for a span that lives as long as a WebSocket connection that is
/// memory per connection. So new traces are sampled here, with the configured ratio, and only
/// those spans are built; the SDK then records every span it is given (parent-based, always
/// on). With `OTEL_TRACES_SAMPLER` set and no `sample_ratio`, every root span is built and the
/// SDK's sampler decides.
#[derive(Debug, Clone, Copy)]
pub struct RootSampler {
    /// Probability of a new trace; `None`: always build, the SDK decides.
    ratio: Option<f64>,
    enabled: bool,
}

impl Default for RootSampler {
    fn default() -> Self {
        RootSampler::off()
    }
}

impl RootSampler {
    /// Never samples: export is off.
    pub fn off() -> Self {
        RootSampler {
            ratio: Some(0.0),
            enabled: false,
        }
    }

    /// Samples with probability `ratio` (export on).
    pub fn ratio(ratio: f64) -> Self {
        RootSampler {
            ratio: Some(ratio),
            enabled: true,
        }
    }

    /// Whether spans are exported at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether to start a new trace now.
    pub fn sample(&self) -> bool {
        match self.ratio {
            _ if !self.enabled => false,
            None => true,
            Some(r) if r >= 1.0 => true,
            Some(r) if r <= 0.0 => false,
            Some(r) => rand::random::<f64>() < r,
        }
    }

    /// A span that starts a trace, built only if this trace is sampled; else a disabled span
    /// that costs nothing.
    pub fn root_span(&self, make: impl FnOnce() -> Span) -> Span {
        if self.sample() { make() } else { Span::none() }
    }

    /// A span inside the current one, built only if that one is.
    pub fn child_span(&self, make: impl FnOnce() -> Span) -> Span {
        if self.enabled && !Span::current().is_disabled() {
            make()
        } else {
            Span::none()
        }
    }

    /// A span for a trace sampled elsewhere (its parent comes from a `traceparent`): built
    /// whenever spans are exported.
    pub fn remote_child_span(&self, make: impl FnOnce() -> Span) -> Span {
        if self.enabled { make() } else { Span::none() }
    }
}

impl Telemetry {
    /// The sampler for traces that start in this process.
    pub fn roots(&self) -> RootSampler {
        self.roots
    }

    /// A meter whose instruments are exported over OTLP, when metrics export is on.
    pub fn meter(&self, scope: &'static str) -> Option<Meter> {
        use opentelemetry::metrics::MeterProvider as _;
        self.meter.as_ref().map(|m| m.meter(scope))
    }
}

impl Telemetry {
    /// Flushes and stops export, for at most [`FLUSH_LIMIT`], driving `runtime` meanwhile:
    /// exports run on it, and a current-thread runtime only runs while someone blocks on it.
    pub fn shutdown(self, runtime: &tokio::runtime::Runtime) {
        // The SDK's own timeouts do not bound it (the metric reader waits 5 s whatever it is
        // told), so the flush runs on a thread of its own and is waited for with one deadline;
        // past it, the process exits without it.
        let (done, flushed) = std::sync::mpsc::channel();
        let flush = std::thread::Builder::new()
            .name("telemetry-flush".into())
            .spawn(move || {
                drop(self);
                let _ = done.send(());
            });
        if flush.is_ok() {
            runtime.block_on(async {
                let _ =
                    tokio::task::spawn_blocking(move || flushed.recv_timeout(FLUSH_LIMIT)).await;
            });
        }
    }
}

/// The longest a shutdown waits for telemetry to be flushed.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(5);

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Errors here mean the collector is unreachable at exit: no one is left to tell.
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.shutdown_with_timeout(Duration::from_secs(3));
        }
        if let Some(meter) = self.meter.take() {
            let _ = meter.shutdown_with_timeout(Duration::from_secs(2));
        }
    }
}

/// Installs logging and, when configured, OTLP export. Call inside `runtime`, once.
pub fn init(
    identity: &Identity<'_>,
    log: LogFormat,
    settings: &TelemetrySettings,
    runtime: &tokio::runtime::Handle,
) -> Result<Telemetry, InitError> {
    settings.validate()?;
    let env = settings::ProcessEnv;
    let (logs, binding) = log_layer(log);
    let logs = logs
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    if !settings.enabled(&env) {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(Telemetry {
            tracer: None,
            meter: None,
            roots: RootSampler::off(),
        });
    }
    let protocol = settings.resolved_protocol(&env)?;
    let exporters = export::build(settings, protocol, &env, runtime)?;
    let resource = Resource::builder()
        .with_service_name(settings.resolved_service_name(&env, identity.service))
        .with_attributes([
            KeyValue::new("service.instance.id", identity.instance.to_owned()),
            KeyValue::new("service.version", identity.version.to_owned()),
        ])
        .build();
    let mut tracer = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(exporters.spans);
    let ratio = settings.resolved_sample_ratio(&env);
    if ratio.is_some() {
        // Roots were sampled before they were built (RootSampler); children follow them.
        tracer = tracer.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    }
    let roots = RootSampler {
        ratio,
        enabled: true,
    };
    let tracer = tracer.build();
    let meter = exporters.metrics.map(|exporter| {
        let reader = PeriodicReader::builder(exporter)
            .with_interval(settings.metrics_interval)
            .build();
        SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader)
            .build()
    });
    // The exporter's own HTTP/2 and gRPC machinery must not trace itself. Targets match by
    // prefix: `hyper` covers `hyper_util`, `opentelemetry` covers `opentelemetry-otlp` and the SDK.
    let spans = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF);
    // Long-lived spans (a connection) are entered on every poll: no busy/idle timing, no
    // thread or source-location attributes per span. No context activation either: parents come
    // from the span tree and `traceparent`s only, so a `parent: None` span (a publish) is a root
    // even while a traced connection's span is entered, and entering costs no context swap.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.tracer(identity.service.to_owned()))
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_filter(spans);
    tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()?;
    if let Some(binding) = binding {
        binding.bind_current();
    }
    tracing::info!(
        ?protocol,
        endpoint = settings
            .endpoint
            .as_deref()
            .unwrap_or("(from OTEL_* variables)"),
        metrics = meter.is_some(),
        "OpenTelemetry export on"
    );
    Ok(Telemetry {
        tracer: Some(tracer),
        meter,
        roots,
    })
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The stderr layer, and for JSON the binding that lets it find trace ids.
fn log_layer(format: LogFormat) -> (BoxedLayer, Option<logs::DispatchBinding>) {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => {
            let json = logs::JsonWithTraceIds::new();
            let binding = json.binding();
            (layer.json().event_format(json).boxed(), Some(binding))
        }
        LogFormat::Text => (
            layer
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .boxed(),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::RootSampler;

    #[test]
    fn root_sampling_follows_the_ratio_and_never_samples_with_export_off() {
        let draws = |s: RootSampler| (0..10_000).filter(|_| s.sample()).count();
        assert_eq!(draws(RootSampler::off()), 0);
        assert_eq!(draws(RootSampler::ratio(0.0)), 0);
        assert_eq!(draws(RootSampler::ratio(1.0)), 10_000);
        let half = draws(RootSampler::ratio(0.5));
        assert!((4_000..6_000).contains(&half), "{half} of 10000 at 0.5");
        assert!(!RootSampler::off().enabled() && RootSampler::ratio(0.0).enabled());
    }
}
