//! The ops HTTP endpoint (SPEC §10): `/healthz`, `/readyz` and `/metrics`.
//!
//! Metrics are not kept twice: a `prometheus` [`Collector`] reads the engine's,
//! the LLM client's, the delivery machinery's and the store's own counters at scrape
//! time; [`Series`] declares every series once. The registry adds
//! the `confab_` prefix and the `env` label to every series. Nothing here sees
//! message text or secrets.

use std::collections::{BTreeMap, HashMap};
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

use crate::adapters::delivery::DeliveryStats;
use crate::engine::events::InternalCause;
use crate::engine::Engine;
use crate::events::{Buckets, Counter, ErrorKind, Histogram};

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
    delivery: Arc<DeliveryStats>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) -> anyhow::Result<Server> {
    let registry = registry_with(engine.clone(), delivery, readiness.clone())?;
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
pub(crate) async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
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
            let kind = ErrorKind::Metrics.as_str();
            tracing::error!(error.kind = kind, error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
        Err(e) => {
            let kind = ErrorKind::Metrics.as_str();
            tracing::error!(error.kind = kind, error = %e, "metrics task failed");
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
/// collector reading `engine`'s and the adapters' counters at scrape time. Readiness
/// (`confab_ready`) sees only the store (no platforms registered).
pub fn registry(engine: Arc<Engine>, delivery: Arc<DeliveryStats>) -> anyhow::Result<Registry> {
    registry_with(engine, delivery, Arc::new(Readiness::default()))
}

/// [`registry`] whose `confab_ready` gauge is `/readyz`'s answer.
pub fn registry_with(
    engine: Arc<Engine>,
    delivery: Arc<DeliveryStats>,
    readiness: Arc<Readiness>,
) -> anyhow::Result<Registry> {
    let env = engine.config().env.as_str().to_string();
    let labels = HashMap::from([("env".to_string(), env)]);
    let registry = Registry::new_custom(Some("confab".into()), Some(labels))
        .context("creating the metrics registry")?;
    registry
        .register(Box::new(EngineCollector::new(engine, delivery, readiness)?))
        .context("registering the metrics collector")?;
    Ok(registry)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Summary,
    Histogram,
}

/// Declares [`Series`] from one table, one row per series (grouped by topic): variant,
/// name (without `confab_`), type, variable labels, help. The collector's `samples`
/// matches every variant, so a series cannot be declared without being read, nor read
/// without being declared.
macro_rules! series {
    ($($variant:ident: $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)*) => {
        /// Every exported series.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Series {
            $($variant),*
        }

        impl Series {
            pub const ALL: &'static [Series] = &[$(Series::$variant),*];

            /// The name without the registry's `confab_` prefix.
            pub fn name(self) -> &'static str {
                match self {
                    $(Series::$variant => $name),*
                }
            }

            fn help(self) -> &'static str {
                match self {
                    $(Series::$variant => $help),*
                }
            }

            fn kind(self) -> Kind {
                match self {
                    $(Series::$variant => Kind::$kind),*
                }
            }

            fn labels(self) -> &'static [&'static str] {
                match self {
                    $(Series::$variant => &[$($label),*]),*
                }
            }
        }
    };
}

series! {
    // Messages and their replies.
    Messages: "messages_total", Counter, ["platform"], "Messages received by the engine, by platform.";
    Replies: "replies_total", Counter, ["outcome"], "Replies by outcome.";
    RateLimited: "rate_limited_total", Counter, [], "Messages refused by a rate limit or budget.";
    Duplicates: "duplicates_total", Counter, [], "Redelivered updates dropped or resent without an LLM call.";
    InternalErrors: "internal_errors_total", Counter, ["cause"], "Our own failures by cause: store and prompt (the user got the internal-error notice), unknown_bot, cache_write, mark_sent.";
    ContextRetries: "context_retries_total", Counter, [], "LLM calls retried with half the history after a context-length error.";
    LlmFailedReplies: "llm_failed_replies_total", Counter, ["kind"], "Replies that apologised for a failed LLM call, by the last error's kind.";
    ReplyLatency: "reply_latency_seconds", Histogram, [], "Time from receiving a message to its reply being ready.";
    Media: "media_total", Counter, ["kind", "outcome"], "Voice notes, audio files and images by kind (voice, audio, image) and outcome (read, too_long, too_large, unsupported, no_vision, budget, fetch_failed, transcription_failed; voice replies: spoken, speech_failed).";
    AudioSeconds: "audio_seconds_total", Counter, [], "Seconds of audio transcribed.";

    // The LLM.
    LlmTokens: "llm_tokens_total", Counter, ["kind"], "LLM tokens by kind (prompt, completion).";
    LlmRequests: "llm_requests_total", Counter, [], "LLM attempts, retries included.";
    LlmErrors: "llm_errors_total", Counter, [], "Failed LLM attempts.";
    LlmRetries: "llm_retries_total", Counter, [], "LLM attempts that were retries.";
    LlmCircuitRejections: "llm_circuit_rejections_total", Counter, [], "LLM calls refused by the open circuit.";
    LlmBusy: "llm_busy_total", Counter, [], "LLM calls refused with the busy apology (no slot, or the user's previous call, within llm.queue_timeout_secs).";
    LlmRequestSeconds: "llm_request_seconds", Summary, [], "Latency of successful LLM attempts.";
    CircuitState: "circuit_state", Gauge, [], "LLM circuit breaker: 0 closed, 1 open, 2 half-open.";

    // The reply cache.
    CacheHits: "cache_hits_total", Counter, [], "Reply cache hits.";
    CacheMisses: "cache_misses_total", Counter, [], "Reply cache misses.";
    CacheTokensSaved: "cache_tokens_saved_total", Counter, [], "LLM tokens saved by cache hits.";
    CacheEntries: "cache_entries", Gauge, [], "Entries in the reply cache.";

    // Delivery by the adapters.
    DeliveryRetries: "delivery_retries_total", Counter, [], "Sends waited out and tried again (transient errors and 429s).";
    DeliveryFailed: "delivery_failed_total", Counter, [], "Replies given up: refused for good, or still failing after delivery.max_retry_secs.";
    UpdatePanics: "update_panics_total", Counter, [], "Panics caught while translating or handling one update.";
    UpdatesParked: "updates_parked_total", Counter, [], "Updates moved out of the inbox after repeated panics.";
    QueueOverflow: "queue_overflow_total", Counter, [], "Updates refused because a queue was full (the user got a busy notice).";
    TaskRestarts: "task_restarts_total", Counter, [], "Poller and gateway tasks restarted after they died.";
    WebhookMalformed: "telegram_webhook_malformed_total", Counter, [], "Telegram webhook requests whose body was no update (answered 200, ignored).";
    WebhookUnauthorized: "telegram_webhook_unauthorized_total", Counter, [], "Telegram webhook requests refused for a missing or wrong secret token.";

    // The process.
    Users: "users", Gauge, [], "Users known to the store.";
    Uptime: "uptime_seconds", Gauge, [], "Seconds since the daemon started.";
    Ready: "ready", Gauge, [], "1 when /readyz answers 200 (store readable, platforms connected, not shutting down), else 0.";
    ResidentMemory: "resident_memory_bytes", Gauge, [], "Resident set size of the process (/proc/self/statm).";
    StoreWrite: "store_write_seconds", Histogram, [], "Time to write one answered exchange atomically (one sled batch or one Redis script) and make it durable (group-commit flush).";

    // The Redis backend (absent on sled).
    RedisCommands: "redis_commands_total", Counter, ["result"], "Redis round trips (commands, pipelines, scripts) by result: ok, error (refused by Redis), unreachable (timeout, refused or dropped connection). Redis backend only.";
    RedisCommandSeconds: "redis_command_seconds", Histogram, [], "Latency of Redis round trips. Redis backend only.";
    RedisUp: "redis_up", Gauge, [], "1 when the last Redis round trip got an answer, else 0. Redis backend only.";

    // Coordination across instances (Redis; absent or zero on one instance).
    RedisLimiterErrors: "redis_limiter_errors_total", Counter, [], "Rate-limit checks the shared (Redis) limiter could not answer; the user got the busy apology.";
    RedisOrderingTimeouts: "redis_ordering_timeouts_total", Counter, [], "Messages refused with the busy apology because their conversation's Redis lease was not obtained in time.";
    RedisLeaseTakeovers: "redis_lease_takeovers_total", Counter, [], "Polling leases this instance took over from another holder (dead or lost).";
    RedisLeasesLost: "redis_leases_lost_total", Counter, [], "Polling leases this instance lost (taken, or not renewable in time); it stopped polling.";
}

struct EngineCollector {
    engine: Arc<Engine>,
    delivery: Arc<DeliveryStats>,
    readiness: Arc<Readiness>,
    descs: Vec<Desc>,
}

impl EngineCollector {
    fn new(
        engine: Arc<Engine>,
        delivery: Arc<DeliveryStats>,
        readiness: Arc<Readiness>,
    ) -> anyhow::Result<Self> {
        let descs = Series::ALL
            .iter()
            .map(|s| {
                Desc::new(
                    s.name().to_string(),
                    s.help().to_string(),
                    s.labels().iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .with_context(|| format!("metric {}", s.name()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            engine,
            delivery,
            readiness,
            descs,
        })
    }

    /// The samples of one series, read now.
    fn samples(&self, series: Series) -> Vec<proto::Metric> {
        let e = &self.engine.stats;
        let l = &self.engine.llm().stats;
        let c = &self.engine.coordination().stats;
        let get = Counter::get;
        let one = |value: u64| vec![counter(value, vec![])];
        match series {
            Series::Messages => labeled("platform", e.messages_by_platform()),
            Series::Replies => labeled("outcome", e.outcomes()),
            Series::RateLimited => one(e.rate_limited.get()),
            Series::Duplicates => one(e.duplicates.get()),
            Series::InternalErrors => InternalCause::ALL
                .iter()
                .map(|c| counter(e.internal_errors(*c), vec![label("cause", c.as_str())]))
                .collect(),
            Series::ContextRetries => one(e.context_retries.get()),
            Series::LlmFailedReplies => labeled("kind", e.llm_failures.snapshot()),
            Series::LlmRequests => one(get(&l.requests)),
            Series::LlmErrors => one(get(&l.errors)),
            Series::LlmRetries => one(get(&l.retries)),
            Series::LlmCircuitRejections => one(get(&l.circuit_rejections)),
            Series::LlmBusy => one(get(&l.busy_rejections)),
            Series::LlmTokens => vec![
                counter(get(&l.prompt_tokens), vec![label("kind", "prompt")]),
                counter(get(&l.completion_tokens), vec![label("kind", "completion")]),
            ],
            // Successful attempts: every attempt counted minus the failed ones.
            Series::LlmRequestSeconds => vec![summary(
                get(&l.requests).saturating_sub(get(&l.errors)),
                get(&l.latency_micros) as f64 / 1e6,
            )],
            Series::CacheHits => one(e.cache_hits.get()),
            Series::CacheMisses => one(e.cache_misses.get()),
            Series::CacheTokensSaved => one(e.cache_tokens_saved.get()),
            Series::CacheEntries => vec![gauge(self.engine.store().cache_len() as f64)],
            Series::CircuitState => {
                vec![gauge(self.engine.llm().breaker_state().as_gauge() as f64)]
            }
            Series::ReplyLatency => vec![histogram(&e.reply_latency)],
            Series::Media => e.media.snapshot().into_iter().map(media_sample).collect(),
            Series::AudioSeconds => one(e.media.audio_secs.get()),
            Series::DeliveryRetries => one(self.delivery.snapshot().delivery_retries),
            Series::DeliveryFailed => one(self.delivery.snapshot().delivery_failed),
            Series::UpdatePanics => one(self.delivery.snapshot().update_panics),
            Series::UpdatesParked => one(self.delivery.snapshot().updates_parked),
            Series::QueueOverflow => one(self.delivery.snapshot().overflow),
            Series::TaskRestarts => one(self.delivery.snapshot().task_restarts),
            Series::WebhookMalformed => one(self.delivery.snapshot().webhook_malformed),
            Series::WebhookUnauthorized => one(self.delivery.snapshot().webhook_unauthorized),
            Series::Users => match self.engine.store().user_count() {
                Ok(n) => vec![gauge(n as f64)],
                Err(err) => {
                    tracing::warn!(error = %err, "counting users for metrics failed");
                    vec![]
                }
            },
            Series::Uptime => vec![gauge(self.engine.uptime().as_secs_f64())],
            Series::Ready => {
                let ready = self.readiness.reasons(&self.engine).is_empty();
                vec![gauge(if ready { 1.0 } else { 0.0 })]
            }
            Series::ResidentMemory => crate::memory::resident_bytes()
                .map(|b| vec![gauge(b as f64)])
                .unwrap_or_default(),
            Series::StoreWrite => vec![histogram(&e.store_write)],
            Series::RedisCommands | Series::RedisCommandSeconds | Series::RedisUp => {
                self.redis_samples(series)
            }
            Series::RedisLimiterErrors => one(c.limiter_errors.get()),
            Series::RedisOrderingTimeouts => one(c.ordering_timeouts.get()),
            Series::RedisLeaseTakeovers => one(c.lease_takeovers.get()),
            Series::RedisLeasesLost => one(c.leases_lost.get()),
        }
    }
}

impl EngineCollector {
    /// The Redis backend's series: none on sled.
    fn redis_samples(&self, series: Series) -> Vec<proto::Metric> {
        let Some(r) = self.engine.store().redis_stats() else {
            return vec![];
        };
        match series {
            Series::RedisCommands => vec![
                counter(r.ok.get(), vec![label("result", "ok")]),
                counter(r.error.get(), vec![label("result", "error")]),
                counter(r.unreachable.get(), vec![label("result", "unreachable")]),
            ],
            Series::RedisCommandSeconds => vec![histogram(&r.latency)],
            Series::RedisUp => vec![gauge(if r.up() { 1.0 } else { 0.0 })],
            _ => vec![],
        }
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

/// `confab_media_total{kind,outcome}`: one sample.
fn media_sample(((kind, outcome), n): ((&'static str, &'static str), u64)) -> proto::Metric {
    counter(n, vec![label("kind", kind), label("outcome", outcome)])
}

/// One counter per label value.
fn labeled(name: &str, counts: BTreeMap<&'static str, u64>) -> Vec<proto::Metric> {
    counts
        .into_iter()
        .map(|(value, n)| counter(n, vec![label(name, value)]))
        .collect()
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

/// Prometheus buckets from a histogram's per-bucket counts (made cumulative; the last
/// slot, over the largest bound, only counts towards `+Inf`, which the encoder adds
/// from the sample count).
fn histogram<B: Buckets>(h: &Histogram<B>) -> proto::Metric {
    let (counts, sum) = h.snapshot();
    let mut buckets = Vec::with_capacity(B::BOUNDS.len());
    let mut cumulative = 0u64;
    for (i, bound) in B::BOUNDS.iter().enumerate() {
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
        let mut families = Vec::with_capacity(Series::ALL.len());
        for series in Series::ALL {
            let metrics = self.samples(*series);
            // The encoder refuses a family without samples (e.g. no replies yet).
            if metrics.is_empty() {
                continue;
            }
            let mut mf = MetricFamily::default();
            mf.set_name(series.name().to_string());
            mf.set_help(series.help().to_string());
            mf.set_field_type(match series.kind() {
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
    use crate::engine::stats::{EngineStats, LATENCY_BUCKETS};

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_is_the_count() {
        let stats = EngineStats::default();
        for ms in [0, 3, 3, 200, 120_000] {
            stats.observe_latency(Duration::from_millis(ms));
        }
        let m = histogram(&stats.reply_latency);
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
        let m = histogram(&EngineStats::default().reply_latency);
        assert_eq!(m.get_histogram().get_sample_count(), 0);
        assert!(m
            .get_histogram()
            .get_bucket()
            .iter()
            .all(|b| b.cumulative_count() == 0));
    }
}
