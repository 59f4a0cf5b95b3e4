//! The ops HTTP endpoint (SPEC §10): `/healthz`, `/readyz` and `/metrics`.
//!
//! Metrics are not kept twice: a `prometheus` [`Collector`] reads the engine's,
//! the LLM client's and the store's own counters at scrape time. The registry adds
//! the `confab_` prefix and the `env` label to every series. Nothing here sees
//! message text or secrets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::stats::{EngineStats, LATENCY_BUCKETS};
use crate::engine::Engine;

/// What `/readyz` looks at besides the store: each enabled platform adapter's
/// `connected` flag, and whether the daemon is shutting down.
#[derive(Debug, Default)]
pub struct Readiness {
    platforms: Vec<(String, Arc<AtomicBool>)>,
    shutting_down: AtomicBool,
}

impl Readiness {
    /// `label` names the adapter in reasons, e.g. `telegram/assistant`.
    pub fn add_platform(&mut self, label: impl Into<String>, connected: Arc<AtomicBool>) {
        self.platforms.push((label.into(), connected));
    }

    /// From now on `/readyz` answers 503 "shutting down".
    pub fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Why the daemon is not ready; empty when it is.
    fn reasons(&self, engine: &Engine) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.shutting_down.load(Ordering::Relaxed) {
            reasons.push("shutting down".to_string());
        }
        // A cheap read proves the store is open and readable.
        if let Err(e) = engine.store().meta_get("schema_version") {
            reasons.push(format!("store: {e}"));
        }
        for (label, connected) in &self.platforms {
            if !connected.load(Ordering::Relaxed) {
                reasons.push(format!("{label}: not connected"));
            }
        }
        reasons
    }
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    readiness: Arc<Readiness>,
    registry: Registry,
}

/// A running ops endpoint.
pub struct Server {
    /// The address actually bound (differs from the configured one for port 0).
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `bind` and serves until `stop` is cancelled. A bind failure (address in use,
/// no permission) is returned, so the daemon refuses to start without its endpoint.
pub async fn start(
    bind: SocketAddr,
    engine: Arc<Engine>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) -> anyhow::Result<Server> {
    let registry = registry(engine.clone())?;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding the ops HTTP endpoint on {bind}"))?;
    let addr = listener.local_addr().context("ops HTTP endpoint address")?;
    let app = router(AppState {
        engine,
        readiness,
        registry,
    });
    let task = tokio::spawn(serve(listener, app, stop));
    tracing::info!(%addr, "ops HTTP endpoint listening");
    Ok(Server { addr, task })
}

/// Connections served at once; more are closed at once (scrapers and probes need few).
pub const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then is disconnected (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections until `stop`, each served by hyper with a header-read timeout;
/// at most [`MAX_CONNECTIONS`] at once.
async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "ops HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("ops HTTP connection refused: too many open");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "ops HTTP connection ended with an error");
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "alive"}))
}

async fn readyz(State(s): State<AppState>) -> Response {
    let reasons = s.readiness.reasons(&s.engine);
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    // Gathering reads sled (user count): keep it off the async workers.
    let registry = s.registry.clone();
    let rendered = tokio::task::spawn_blocking(move || render(&registry)).await;
    match rendered {
        Ok(Ok(body)) => (
            [(header::CONTENT_TYPE, TextEncoder::new().format_type())],
            body,
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics task failed\n").into_response()
        }
    }
}

/// The Prometheus text exposition of everything `registry` collects.
pub fn render(registry: &Registry) -> prometheus::Result<String> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A registry with the `confab_` prefix, the `env` label on every series, and a
/// collector reading `engine`'s counters at scrape time.
pub fn registry(engine: Arc<Engine>) -> anyhow::Result<Registry> {
    let env = engine.config().env.as_str().to_string();
    let labels = HashMap::from([("env".to_string(), env)]);
    let registry = Registry::new_custom(Some("confab".into()), Some(labels))
        .context("creating the metrics registry")?;
    registry
        .register(Box::new(EngineCollector::new(engine)?))
        .context("registering the metrics collector")?;
    Ok(registry)
}

enum Kind {
    Counter,
    Gauge,
    Summary,
    Histogram,
}

/// Every series: name (without `confab_`), help, type, variable labels.
const SERIES: &[(&str, &str, Kind, &[&str])] = &[
    (
        "messages_total",
        "Messages received by the engine.",
        Kind::Counter,
        &[],
    ),
    (
        "replies_total",
        "Replies by outcome.",
        Kind::Counter,
        &["outcome"],
    ),
    (
        "rate_limited_total",
        "Messages refused by a rate limit or budget.",
        Kind::Counter,
        &[],
    ),
    (
        "duplicates_total",
        "Redelivered updates dropped or resent without an LLM call.",
        Kind::Counter,
        &[],
    ),
    (
        "llm_requests_total",
        "LLM attempts, retries included.",
        Kind::Counter,
        &[],
    ),
    (
        "llm_errors_total",
        "Failed LLM attempts.",
        Kind::Counter,
        &[],
    ),
    (
        "llm_retries_total",
        "LLM attempts that were retries.",
        Kind::Counter,
        &[],
    ),
    (
        "llm_circuit_rejections_total",
        "LLM calls refused by the open circuit.",
        Kind::Counter,
        &[],
    ),
    (
        "llm_busy_total",
        "LLM calls refused because every slot stayed taken for llm.queue_timeout_secs.",
        Kind::Counter,
        &[],
    ),
    (
        "llm_tokens_total",
        "LLM tokens by kind (prompt, completion).",
        Kind::Counter,
        &["kind"],
    ),
    (
        "llm_request_seconds",
        "Latency of successful LLM attempts.",
        Kind::Summary,
        &[],
    ),
    ("cache_hits_total", "Reply cache hits.", Kind::Counter, &[]),
    (
        "cache_misses_total",
        "Reply cache misses.",
        Kind::Counter,
        &[],
    ),
    (
        "cache_tokens_saved_total",
        "LLM tokens saved by cache hits.",
        Kind::Counter,
        &[],
    ),
    (
        "cache_entries",
        "Entries in the reply cache.",
        Kind::Gauge,
        &[],
    ),
    (
        "circuit_state",
        "LLM circuit breaker: 0 closed, 1 open, 2 half-open.",
        Kind::Gauge,
        &[],
    ),
    (
        "reply_latency_seconds",
        "Time from receiving a message to its reply being ready.",
        Kind::Histogram,
        &[],
    ),
    ("users", "Users known to the store.", Kind::Gauge, &[]),
    (
        "uptime_seconds",
        "Seconds since the daemon started.",
        Kind::Gauge,
        &[],
    ),
];

struct EngineCollector {
    engine: Arc<Engine>,
    descs: Vec<Desc>,
}

impl EngineCollector {
    fn new(engine: Arc<Engine>) -> anyhow::Result<Self> {
        let descs = SERIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .with_context(|| format!("metric {name}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { engine, descs })
    }
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn counter(value: u64, labels: Vec<proto::LabelPair>) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    let mut m = proto::Metric::from_label(labels);
    m.set_counter(c);
    m
}

fn gauge(value: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    proto::Metric::from_gauge(g)
}

fn summary(count: u64, sum_secs: f64) -> proto::Metric {
    let mut s = proto::Summary::default();
    s.set_sample_count(count);
    s.set_sample_sum(sum_secs);
    let mut m = proto::Metric::default();
    m.set_summary(s);
    m
}

/// Prometheus buckets from the engine's per-bucket counts (made cumulative; the last
/// slot, over the largest bound, only counts towards `+Inf`, which the encoder adds
/// from the sample count).
fn histogram(stats: &EngineStats) -> proto::Metric {
    let (counts, sum) = stats.latency();
    let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
    let mut cumulative = 0u64;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += counts.get(i).copied().unwrap_or(0);
        let mut b = proto::Bucket::default();
        b.set_upper_bound(*bound);
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    let total: u64 = counts.iter().sum();
    let mut h = proto::Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(total);
    h.set_sample_sum(sum.as_secs_f64());
    let mut m = proto::Metric::default();
    m.set_histogram(h);
    m
}

impl Collector for EngineCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let e = &self.engine.stats;
        let llm = self.engine.llm();
        let l = &llm.stats;
        let get = EngineStats::get;
        let requests = get(&l.requests);
        let errors = get(&l.errors);
        let mut families = Vec::with_capacity(SERIES.len());
        for (name, help, kind, _) in SERIES {
            let metrics = match *name {
                "messages_total" => vec![counter(get(&e.messages), vec![])],
                "replies_total" => e
                    .outcomes()
                    .into_iter()
                    .map(|(outcome, n)| counter(n, vec![label("outcome", outcome)]))
                    .collect(),
                "rate_limited_total" => vec![counter(get(&e.rate_limited), vec![])],
                "duplicates_total" => vec![counter(get(&e.duplicates), vec![])],
                "llm_requests_total" => vec![counter(requests, vec![])],
                "llm_errors_total" => vec![counter(errors, vec![])],
                "llm_retries_total" => vec![counter(get(&l.retries), vec![])],
                "llm_circuit_rejections_total" => {
                    vec![counter(get(&l.circuit_rejections), vec![])]
                }
                "llm_busy_total" => vec![counter(get(&l.busy_rejections), vec![])],
                "llm_tokens_total" => vec![
                    counter(get(&l.prompt_tokens), vec![label("kind", "prompt")]),
                    counter(get(&l.completion_tokens), vec![label("kind", "completion")]),
                ],
                // Successful attempts: every attempt counted minus the failed ones.
                "llm_request_seconds" => vec![summary(
                    requests.saturating_sub(errors),
                    get(&l.latency_micros) as f64 / 1e6,
                )],
                "cache_hits_total" => vec![counter(get(&e.cache_hits), vec![])],
                "cache_misses_total" => vec![counter(get(&e.cache_misses), vec![])],
                "cache_tokens_saved_total" => vec![counter(get(&e.cache_tokens_saved), vec![])],
                "cache_entries" => vec![gauge(self.engine.store().cache_len() as f64)],
                "circuit_state" => vec![gauge(llm.breaker_state().as_gauge() as f64)],
                "reply_latency_seconds" => vec![histogram(e)],
                "users" => match self.engine.store().user_count() {
                    Ok(n) => vec![gauge(n as f64)],
                    Err(err) => {
                        tracing::warn!(error = %err, "counting users for metrics failed");
                        vec![]
                    }
                },
                "uptime_seconds" => vec![gauge(self.engine.uptime().as_secs_f64())],
                _ => vec![],
            };
            // The encoder refuses a family without samples (e.g. no replies yet).
            if metrics.is_empty() {
                continue;
            }
            let mut mf = MetricFamily::default();
            mf.set_name(name.to_string());
            mf.set_help(help.to_string());
            mf.set_field_type(match kind {
                Kind::Counter => MetricType::COUNTER,
                Kind::Gauge => MetricType::GAUGE,
                Kind::Summary => MetricType::SUMMARY,
                Kind::Histogram => MetricType::HISTOGRAM,
            });
            mf.set_metric(metrics);
            families.push(mf);
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_is_the_count() {
        let stats = EngineStats::default();
        for ms in [0, 3, 3, 200, 120_000] {
            stats.observe_latency(Duration::from_millis(ms));
        }
        let m = histogram(&stats);
        let h = m.get_histogram();
        let counts: Vec<u64> = h
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        let bounds: Vec<f64> = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
        assert_eq!(bounds, LATENCY_BUCKETS);
        // ≤1ms: 1; ≤5ms: 3; ≤0.25s: 4; the 120 s sample only counts towards +Inf.
        assert_eq!(counts, [1, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(h.get_sample_count(), 5);
        assert!((h.get_sample_sum() - 120.206).abs() < 1e-9);
    }

    #[test]
    fn an_empty_histogram_encodes() {
        let m = histogram(&EngineStats::default());
        assert_eq!(m.get_histogram().get_sample_count(), 0);
        assert!(m
            .get_histogram()
            .get_bucket()
            .iter()
            .all(|b| b.cumulative_count() == 0));
    }
}
