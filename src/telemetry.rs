//! OpenTelemetry traces (SPEC §15): one trace per update, exported over OTLP/HTTP
//! (protobuf) by a batch processor on its own thread.
//!
//! On when `[otel] endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not `true`);
//! then [`start`] builds the exporter and `logging` adds [`layer`] to the subscriber.
//! Off, nothing of this exists: no provider, no thread, no layer — the spans in the code
//! are `debug` (the `update` span aside), so their callsites stay disabled and cost one
//! cached check each.
//!
//! What is exported: confab's own spans (target `confab…`), never events and never
//! another crate's spans (HTTP clients put URLs with tokens in theirs). Span fields are
//! ids, names of bots and models, counts and outcomes — never message text, user names,
//! tokens or keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::Config;

/// At most one warning about failed exports per this interval.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// How long a graceful stop waits for the last spans to leave.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The running trace pipeline; [`Traces::shutdown`] flushes it.
pub struct Traces {
    provider: SdkTracerProvider,
}

/// Where traces go: `Some(url)` from `[otel] endpoint` (`{endpoint}/v1/traces`), or
/// `None` to let the SDK read the `OTEL_EXPORTER_OTLP_*` variables. `None` overall: off.
pub fn destination(cfg: &Config) -> Option<Option<String>> {
    destination_in(cfg, |name| std::env::var(name).ok())
}

fn destination_in(cfg: &Config, var: impl Fn(&str) -> Option<String>) -> Option<Option<String>> {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    if let Some(endpoint) = &cfg.otel.endpoint {
        return Some(Some(format!(
            "{}/v1/traces",
            endpoint.trim_end_matches('/')
        )));
    }
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .then_some(None)
}

/// Builds the exporter and the tracer provider when traces are on (`Ok(None)`: off).
/// Call outside the async runtime: the HTTP client and the export thread start here.
pub fn start(cfg: &Config) -> Result<Option<(Traces, SdkTracer)>, String> {
    let Some(url) = destination(cfg) else {
        return Ok(None);
    };
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(url) = url {
        builder = builder.with_endpoint(url);
    }
    let exporter = builder
        .build()
        .map_err(|e| format!("building the OTLP exporter: {e}"))?;
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(Reported::new(exporter))
        .with_resource(resource(cfg));
    // OTEL_TRACES_SAMPLER, when set, is read by the SDK itself.
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        let ratio = Sampler::TraceIdRatioBased(cfg.otel.sample_ratio);
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(ratio)));
    }
    let provider = provider.build();
    let tracer = provider.tracer("confab");
    Ok(Some((Traces { provider }, tracer)))
}

/// `service.name = confab` (unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
/// names another), the version, the environment and the bots; `OTEL_RESOURCE_ATTRIBUTES`
/// adds to it.
fn resource(cfg: &Config) -> Resource {
    let env = cfg.env.as_str();
    let bots: Vec<StringValue> = cfg.bots.iter().map(|b| b.name.clone().into()).collect();
    let builder = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("deployment.environment", env),
        KeyValue::new("deployment.environment.name", env),
        KeyValue::new("confab.bot", Value::Array(Array::String(bots))),
    ]);
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    if named {
        builder.build()
    } else {
        builder.with_service_name("confab").build()
    }
}

/// The subscriber layer that turns confab's spans into OpenTelemetry spans. Only spans
/// whose target is confab's pass: no events (log lines), no other crate's spans.
pub fn layer<S>(tracer: SdkTracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let ours = filter_fn(|m| m.is_span() && m.target().starts_with("confab"));
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_filter(ours)
}

impl Traces {
    /// Exports what is still queued and stops the export thread (graceful stop).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_WAIT) {
            tracing::warn!(error = %e, "traces: the last spans could not be exported");
        }
    }
}

/// The OTLP exporter, logging failed exports at warn at most once per [`WARN_EVERY`]
/// (with how many failed since). It runs on the batch processor's thread: a collector
/// that is down costs dropped spans, never a reply.
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    last_warning: Mutex<Option<Instant>>,
    failed: AtomicU64,
}

impl<E> Reported<E> {
    fn new(inner: E) -> Self {
        Reported {
            inner,
            last_warning: Mutex::new(None),
            failed: AtomicU64::new(0),
        }
    }

    /// Counts a failure; whether to warn now.
    fn warn_due(&self, now: Instant) -> Option<u64> {
        let failed = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return None;
        }
        *last = Some(now);
        self.failed.store(0, Ordering::Relaxed);
        Some(failed)
    }
}

impl<E: SpanExporter> SpanExporter for Reported<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            if let Some(failed) = self.warn_due(Instant::now()) {
                let error: String = e.to_string().chars().take(300).collect();
                tracing::warn!(
                    error = %error,
                    spans,
                    failed_exports = failed,
                    "traces: export to the collector failed; spans are dropped until it answers"
                );
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn config(endpoint: Option<&str>) -> Config {
        let mut c = Config::with_defaults(Env::Staging, ".");
        c.otel.endpoint = endpoint.map(String::from);
        c
    }

    #[test]
    fn off_unless_an_endpoint_is_named() {
        let none = |_: &str| None;
        assert_eq!(destination_in(&config(None), none), None);
        let url = destination_in(&config(Some("http://c:4318/")), none);
        assert_eq!(url, Some(Some("http://c:4318/v1/traces".into())));
        let env = |n: &str| (n == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c".to_string());
        assert_eq!(destination_in(&config(None), env), Some(None));
        let blank = |n: &str| (n == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| " ".to_string());
        assert_eq!(destination_in(&config(None), blank), None);
        let disabled = |n: &str| (n == "OTEL_SDK_DISABLED").then(|| "true".to_string());
        assert_eq!(destination_in(&config(Some("http://c")), disabled), None);
    }

    #[test]
    fn export_failures_warn_at_most_once_a_minute() {
        let r = Reported::new(());
        let t0 = Instant::now();
        assert_eq!(r.warn_due(t0), Some(1));
        assert_eq!(r.warn_due(t0 + Duration::from_secs(10)), None);
        assert_eq!(r.warn_due(t0 + Duration::from_secs(59)), None);
        assert_eq!(r.warn_due(t0 + Duration::from_secs(61)), Some(3));
    }
}
