//! OTLP exporters for traces and metrics, over gRPC (tonic) or HTTP/protobuf (hyper).
//!
//! The SDK's batch span processor and periodic metric reader export from threads of their own,
//! outside any Tokio runtime. tonic copes (its channel runs on the runtime it was made in); the
//! hyper client does not, so [`OnRuntime`] hands each HTTP request to the binary's runtime.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, hyper::HyperClient};
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
use opentelemetry_otlp::{
    MetricExporter, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};

use crate::settings::{Env, Protocol, TelemetrySettings};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("OTLP exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP header `{0}` is not a valid gRPC metadata key or value")]
    Header(String),
    #[error(
        "OTLP endpoint `{0}`: https needs protocol grpc (or a collector on this host over http)"
    )]
    HttpsOverHttp(String),
}

/// Runs the hyper client's requests on the binary's runtime, whatever thread asks.
#[derive(Debug)]
struct OnRuntime {
    client: Arc<HyperClient>,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

pub(crate) struct Exporters {
    pub spans: SpanExporter,
    pub metrics: Option<MetricExporter>,
}

/// Builds the exporters; must run inside `runtime` (tonic's channel is spawned on it).
pub(crate) fn build(
    settings: &TelemetrySettings,
    protocol: Protocol,
    env: &impl Env,
    runtime: &tokio::runtime::Handle,
) -> Result<Exporters, ExportError> {
    let timeout = settings.resolved_timeout(env);
    let endpoint = settings
        .endpoint
        .as_deref()
        .map(|e| e.trim_end_matches('/'));
    match protocol {
        Protocol::Grpc => {
            let metadata = metadata(settings)?;
            Ok(Exporters {
                spans: grpc(
                    SpanExporter::builder().with_tonic(),
                    timeout,
                    endpoint,
                    &metadata,
                )
                .build()?,
                metrics: settings
                    .metrics
                    .then(|| {
                        let b = MetricExporter::builder().with_tonic();
                        grpc(b, timeout, endpoint, &metadata).build()
                    })
                    .transpose()?,
            })
        }
        Protocol::HttpProtobuf => {
            if let Some(e) = settings
                .resolved_endpoint(env)
                .filter(|e| e.starts_with("https://"))
            {
                return Err(ExportError::HttpsOverHttp(e));
            }
            let client: Arc<dyn HttpClient> = Arc::new(OnRuntime {
                client: Arc::new(HyperClient::with_default_connector(timeout, None)),
                runtime: runtime.clone(),
            });
            let url = |path: &str| endpoint.map(|e| format!("{e}{path}"));
            Ok(Exporters {
                spans: http(
                    SpanExporter::builder().with_http(),
                    settings,
                    timeout,
                    url("/v1/traces"),
                )
                .with_shared_http_client(client.clone())
                .build()?,
                metrics: settings
                    .metrics
                    .then(|| {
                        let b = MetricExporter::builder().with_http();
                        http(b, settings, timeout, url("/v1/metrics"))
                            .with_shared_http_client(client)
                            .build()
                    })
                    .transpose()?,
            })
        }
    }
}

fn grpc<B: WithExportConfig + WithTonicConfig>(
    builder: B,
    timeout: std::time::Duration,
    endpoint: Option<&str>,
    metadata: &MetadataMap,
) -> B {
    let mut b = builder
        .with_timeout(timeout)
        .with_metadata(metadata.clone());
    if let Some(e) = endpoint {
        if e.starts_with("https://") {
            b = b.with_tls_config(ClientTlsConfig::new().with_native_roots());
        }
        b = b.with_endpoint(e);
    }
    b
}

fn http<B: WithExportConfig + WithHttpConfig>(
    builder: B,
    settings: &TelemetrySettings,
    timeout: std::time::Duration,
    url: Option<String>,
) -> B {
    let mut b = builder
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(timeout)
        .with_headers(settings.headers.clone());
    if let Some(url) = url {
        b = b.with_endpoint(url);
    }
    b
}

fn metadata(settings: &TelemetrySettings) -> Result<MetadataMap, ExportError> {
    let mut headers = http::HeaderMap::new();
    for (key, value) in &settings.headers {
        let bad = || ExportError::Header(key.clone());
        let name = http::HeaderName::from_bytes(key.as_bytes()).map_err(|_| bad())?;
        let value = http::HeaderValue::from_str(value).map_err(|_| bad())?;
        headers.insert(name, value);
    }
    Ok(MetadataMap::from_headers(headers))
}
