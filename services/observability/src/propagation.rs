//! W3C `traceparent`: how a trace crosses from the agent to a hub, and from hub to hub inside
//! the Redis envelope.
//!
//! Only recorded (sampled) traces travel: an unsampled trace would cost every hop bytes and
//! work for spans nobody keeps, and downstream samplers follow the parent's decision anyway.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Longest `traceparent` accepted (version 00 is 55 characters; later versions may add fields).
pub const MAX_TRACEPARENT: usize = 128;

/// The `traceparent` that continues `span`, if it is recorded.
pub fn traceparent(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    (sc.is_valid() && sc.is_sampled()).then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// What a received `traceparent` says.
#[derive(Debug)]
pub enum Remote {
    /// A recorded trace to continue.
    Recorded(Context),
    /// A valid context whose trace the sender does not record: neither do we.
    NotRecorded,
    /// Not a `traceparent` (or longer than [`MAX_TRACEPARENT`]): as if there were none.
    Invalid,
}

/// Reads a `traceparent` before any span is built, so an unusable one costs no span.
pub fn remote_parent(traceparent: &str) -> Remote {
    if traceparent.len() > MAX_TRACEPARENT {
        return Remote::Invalid;
    }
    let cx = TraceContextPropagator::new().extract(&Single(traceparent));
    let sc = cx.span().span_context().clone();
    match (sc.is_valid(), sc.is_sampled()) {
        (true, true) => Remote::Recorded(cx),
        (true, false) => Remote::NotRecorded,
        (false, _) => Remote::Invalid,
    }
}

/// Makes `span` a child of a remote `parent` from [`remote_parent`].
pub fn adopt(span: &Span, parent: Context) {
    if !span.is_disabled() {
        let _ = span.set_parent(parent);
    }
}

struct Single<'a>(&'a str);

impl Extractor for Single<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn with_sampler<R>(sampler: Sampler, f: impl FnOnce() -> R) -> R {
        let provider = SdkTracerProvider::builder().with_sampler(sampler).build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_recorded_span_continues_in_a_span_given_its_traceparent() {
        with_sampler(Sampler::AlwaysOn, || {
            let upstream = tracing::info_span!("agent");
            let tp = traceparent(&upstream).expect("recorded spans travel");
            assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
            let downstream = tracing::info_span!("hub");
            let Remote::Recorded(parent) = remote_parent(&tp) else {
                panic!("{tp} is a recorded trace");
            };
            adopt(&downstream, parent);
            let up = upstream.context().span().span_context().clone();
            let down = downstream.context().span().span_context().clone();
            assert_eq!(down.trace_id(), up.trace_id());
            assert_ne!(down.span_id(), up.span_id());
        });
    }

    #[test]
    fn unrecorded_disabled_and_garbled_contexts_do_not_travel() {
        with_sampler(Sampler::AlwaysOff, || {
            assert_eq!(traceparent(&tracing::info_span!("dropped")), None);
        });
        assert_eq!(traceparent(&Span::none()), None);
        assert!(matches!(
            remote_parent("00-not-a-trace-01"),
            Remote::Invalid
        ));
        assert!(matches!(remote_parent(""), Remote::Invalid));
        let long = format!("00-{}-00f067aa0ba902b7-01", "4".repeat(MAX_TRACEPARENT));
        assert!(matches!(remote_parent(&long), Remote::Invalid));
        assert!(matches!(
            remote_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            Remote::NotRecorded
        ));
        assert!(matches!(
            remote_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Remote::Recorded(_)
        ));
    }
}
