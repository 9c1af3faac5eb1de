//! An OTLP/HTTP endpoint that takes trace exports and counts their spans, so the fan-out
//! benchmark can run a hub with tracing on, exporting for real, on this machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

#[derive(Default)]
pub struct Counts {
    pub exports: AtomicU64,
    pub spans: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct Sink {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    pub async fn start() -> std::io::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(serve(listener, counts.clone()));
        Ok(Sink { addr, counts, task })
    }
}

async fn serve(listener: tokio::net::TcpListener, counts: Arc<Counts>) {
    while let Ok((stream, _)) = listener.accept().await {
        let counts = counts.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let counts = counts.clone();
                async move { Ok::<_, std::convert::Infallible>(take(req, &counts).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn take(req: Request<hyper::body::Incoming>, counts: &Counts) -> Response<Full<Bytes>> {
    let traces = req.uri().path() == "/v1/traces";
    let status = match req.into_body().collect().await {
        Ok(body) => {
            let body = body.to_bytes();
            counts.exports.fetch_add(1, Ordering::Relaxed);
            counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            if traces && let Ok(request) = ExportTraceServiceRequest::decode(body) {
                let spans = request
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len() as u64)
                    .sum();
                counts.spans.fetch_add(spans, Ordering::Relaxed);
            }
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}
