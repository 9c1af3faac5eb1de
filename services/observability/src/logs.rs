//! JSON log lines that carry the trace they were written in, so a log search can jump to the
//! trace and back.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;

/// tracing-subscriber's JSON line plus `trace_id` and `span_id` when the event happens inside a
/// span that OpenTelemetry knows (only when export is on).
pub struct JsonWithTraceIds {
    inner: Format<Json>,
    /// The subscriber this format belongs to. While an event is dispatched `tracing` hides the
    /// current dispatcher (no re-entry), so it is handed over once installed: see [`Self::bind`].
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl JsonWithTraceIds {
    pub fn new() -> Self {
        JsonWithTraceIds {
            inner: tracing_subscriber::fmt::format().json().flatten_event(true),
            dispatch: Arc::default(),
        }
    }

    /// Where to put the dispatcher once the subscriber is installed.
    pub fn binding(&self) -> DispatchBinding {
        DispatchBinding(self.dispatch.clone())
    }
}

/// Lets a [`JsonWithTraceIds`] find OpenTelemetry's span data in its subscriber.
#[derive(Clone)]
pub struct DispatchBinding(Arc<OnceLock<WeakDispatch>>);

impl DispatchBinding {
    /// Binds to the default dispatcher of this thread (call right after installing it).
    pub fn bind_current(&self) {
        tracing::dispatcher::get_default(|d| {
            let _ = self.0.set(d.downgrade());
        });
    }
}

impl Default for JsonWithTraceIds {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx.lookup_current().and_then(|span| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let otel = cx.span();
            let sc = otel.span_context();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        match (ids, line.rfind('}')) {
            (Some((trace_id, span_id)), Some(end)) => write!(
                writer,
                "{},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"{}",
                &line[..end],
                &line[end..]
            ),
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_written_inside_a_traced_span_names_the_trace_and_one_outside_does_not() {
        let provider = SdkTracerProvider::builder().build();
        let out = Lines::default();
        let writer = out.clone();
        let format = JsonWithTraceIds::new();
        let binding = format.binding();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(format)
                    .with_writer(move || writer.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            binding.bind_current();
            tracing::info!("outside");
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            tracing::info!(answer = 42, "inside");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{}", lines[0]);
        let inside = &lines[1];
        assert_eq!(inside["answer"], 42);
        let trace_id = inside["trace_id"].as_str().unwrap();
        let span_id = inside["span_id"].as_str().unwrap();
        assert_eq!((trace_id.len(), span_id.len()), (32, 16), "{inside}");
        assert!(trace_id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
