//! A stand-in OpenTelemetry collector: it takes OTLP traces and metrics over gRPC and over
//! HTTP/protobuf, decoded with the real OTLP schema (`opentelemetry-proto`), and keeps what came
//! in for the test to inspect.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// One span as the collector received it; ids in hex.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub instance: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub attributes: Vec<(String, String)>,
    /// How it arrived: `grpc` or `http`.
    pub via: &'static str,
}

impl Span {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// (service instance, metric name)
    metrics: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Received>>);

impl Store {
    fn traces(&self, request: ExportTraceServiceRequest, via: &'static str) {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.unwrap_or_default().attributes;
            let service = find(&resource, "service.name");
            let instance = find(&resource, "service.instance.id");
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.spans.push(Span {
                        service: service.clone(),
                        instance: instance.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                            .collect(),
                        via,
                    });
                }
            }
        }
    }

    fn metrics(&self, request: ExportMetricsServiceRequest) {
        let mut received = self.0.lock().unwrap();
        for resource_metrics in request.resource_metrics {
            let resource = resource_metrics.resource.unwrap_or_default().attributes;
            let instance = find(&resource, "service.instance.id");
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    received.metrics.push((instance.clone(), metric.name));
                }
            }
        }
    }
}

fn find(attributes: &[KeyValue], key: &str) -> String {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(kv.value.as_ref()))
        .unwrap_or_default()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces(request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

pub struct Collector {
    /// `http://127.0.0.1:port` for OTLP/gRPC.
    pub grpc: String,
    /// `http://127.0.0.1:port` for OTLP/HTTP (the exporter appends `/v1/traces`).
    pub http: String,
    store: Store,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Collector {
    pub async fn start() -> Collector {
        let store = Store::default();
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_listener.local_addr().unwrap();
        let http = http_listener.local_addr().unwrap();
        let grpc_server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .add_service(MetricsServiceServer::new(store.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc_listener));
        let tasks = vec![
            tokio::spawn(async move {
                let _ = grpc_server.await;
            }),
            tokio::spawn(serve_http(http_listener, store.clone())),
        ];
        Collector {
            grpc: url(grpc),
            http: url(http),
            store,
            tasks,
        }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.0.lock().unwrap().spans.clone()
    }

    /// Names of the metrics that `instance` exported.
    pub fn metric_names(&self, instance: &str) -> Vec<String> {
        let received = self.store.0.lock().unwrap();
        received
            .metrics
            .iter()
            .filter(|(i, _)| i == instance)
            .map(|(_, name)| name.clone())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

async fn serve_http(listener: tokio::net::TcpListener, store: Store) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let store = store.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &store).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn handle(req: Request<hyper::body::Incoming>, store: &Store) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    let decoded = match path.as_str() {
        "/v1/traces" => ExportTraceServiceRequest::decode(body).map(|r| store.traces(r, "http")),
        "/v1/metrics" => ExportMetricsServiceRequest::decode(body).map(|r| store.metrics(r)),
        _ => return status(StatusCode::NOT_FOUND),
    };
    match decoded {
        // An empty protobuf message is zero bytes: a valid Export*ServiceResponse.
        Ok(()) => {
            let mut response = status(StatusCode::OK);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-protobuf"),
            );
            response
        }
        Err(_) => status(StatusCode::BAD_REQUEST),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}
