//! Retry, timeout, circuit breaker and concurrency cap around any [`LlmProvider`].

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{ChatRequest, ChatResponse, DeltaStream, LlmError, LlmProvider};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub max_retries: u32,
    /// First backoff step; doubles each retry (full jitter).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest `Retry-After` we honour; a longer one is treated as this.
    pub retry_after_cap: Duration,
    /// Per attempt (and, for streams, per chunk).
    pub timeout: Duration,
    /// Consecutive failed attempts that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before one probe is let through.
    pub breaker_cooldown: Duration,
    /// Calls in flight at once, across all conversations.
    pub max_concurrent: usize,
    /// Global requests per minute (0 = no cap).
    pub requests_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// For metrics: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else is told "unavailable".
    HalfOpen,
}

/// Counters the ops endpoint and `/admin stats` read.
#[derive(Debug, Default)]
pub struct LlmStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub circuit_rejections: AtomicU64,
    /// Sum of successful call latencies in microseconds (with `requests` gives the mean).
    pub latency_micros: AtomicU64,
}

pub struct ResilientLlm {
    inner: Arc<dyn LlmProvider>,
    policy: RetryPolicy,
    breaker: Mutex<Breaker>,
    permits: Arc<Semaphore>,
    rpm: Option<DefaultDirectRateLimiter>,
    pub stats: LlmStats,
}

enum Admission {
    Normal,
    Probe,
}

impl ResilientLlm {
    pub fn new(inner: Arc<dyn LlmProvider>, policy: RetryPolicy) -> Self {
        let rpm = NonZeroU32::new(policy.requests_per_minute)
            .map(|n| RateLimiter::direct(Quota::per_minute(n)));
        Self {
            inner,
            permits: Arc::new(Semaphore::new(policy.max_concurrent.max(1))),
            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
            rpm,
            policy,
            stats: LlmStats::default(),
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        let b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match &*b {
            Breaker::Closed { .. } => BreakerState::Closed,
            Breaker::Open { until } if Instant::now() >= *until => BreakerState::HalfOpen,
            Breaker::Open { .. } => BreakerState::Open,
            Breaker::HalfOpen => BreakerState::HalfOpen,
        }
    }

    fn admit(&self) -> Result<Admission, LlmError> {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match &*b {
            Breaker::Closed { .. } => Ok(Admission::Normal),
            Breaker::Open { until } if Instant::now() >= *until => {
                *b = Breaker::HalfOpen;
                Ok(Admission::Probe)
            }
            _ => {
                self.stats
                    .circuit_rejections
                    .fetch_add(1, Ordering::Relaxed);
                Err(LlmError::CircuitOpen)
            }
        }
    }

    fn record(&self, admission: &Admission, outcome: Result<(), &LlmError>) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => *b = Breaker::Closed { failures: 0 },
            Err(e) if e.is_endpoint_failure() => {
                let failures = match (&*b, admission) {
                    (_, Admission::Probe) => u32::MAX,
                    (Breaker::Closed { failures }, _) => failures.saturating_add(1),
                    _ => u32::MAX,
                };
                if failures >= self.policy.breaker_failures.max(1) {
                    if !matches!(&*b, Breaker::Open { .. }) {
                        tracing::warn!(
                            cooldown_secs = self.policy.breaker_cooldown.as_secs(),
                            "LLM circuit opened"
                        );
                    }
                    *b = Breaker::Open {
                        until: Instant::now() + self.policy.breaker_cooldown,
                    };
                } else {
                    *b = Breaker::Closed { failures };
                }
            }
            // The endpoint answered sensibly (e.g. context too long): it is healthy.
            Err(_) => {
                if matches!(admission, Admission::Probe) || matches!(&*b, Breaker::HalfOpen) {
                    *b = Breaker::Closed { failures: 0 };
                }
            }
        }
    }

    fn backoff(&self, attempt: u32, err: &LlmError) -> Duration {
        let exp = self
            .policy
            .backoff_base
            .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
            .min(self.policy.backoff_max);
        let jittered = rand::rng().random_range(Duration::ZERO..=exp);
        match err.retry_after() {
            Some(ra) => ra.min(self.policy.retry_after_cap).max(jittered),
            None => jittered,
        }
    }

    async fn run<T, F>(&self, mut attempt_fn: F) -> Result<T, LlmError>
    where
        F: FnMut() -> crate::store::BoxFuture<'static, Result<T, LlmError>>,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| LlmError::CircuitOpen)?;
        let mut attempt = 0u32;
        loop {
            let admission = self.admit()?;
            if let Some(rpm) = &self.rpm {
                rpm.until_ready().await;
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let result = match tokio::time::timeout(self.policy.timeout, attempt_fn()).await {
                Ok(r) => r,
                Err(_) => Err(LlmError::Timeout),
            };
            match result {
                Ok(v) => {
                    self.record(&admission, Ok(()));
                    self.stats
                        .latency_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.record(&admission, Err(&e));
                    tracing::warn!(error = %e, attempt, "LLM attempt failed");
                    if !e.is_retryable() || attempt >= self.policy.max_retries {
                        return Err(e);
                    }
                    let wait = self.backoff(attempt, &e);
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    pub async fn complete(&self, req: ChatRequest) -> Result<ChatResponse, LlmError> {
        let inner = self.inner.clone();
        let resp = self
            .run(move || {
                let inner = inner.clone();
                let req = req.clone();
                Box::pin(async move { inner.complete(req).await })
            })
            .await?;
        self.stats
            .prompt_tokens
            .fetch_add(resp.prompt_tokens, Ordering::Relaxed);
        self.stats
            .completion_tokens
            .fetch_add(resp.completion_tokens, Ordering::Relaxed);
        Ok(resp)
    }

    /// A streamed completion. Retries cover starting the stream; once text flows, a
    /// stalled chunk (longer than the timeout) or an error ends the stream.
    pub async fn stream(&self, req: ChatRequest) -> Result<DeltaStream, LlmError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LlmError::CircuitOpen)?;
        let inner = self.inner.clone();
        let stream = self
            .run(move || {
                let inner = inner.clone();
                let req = req.clone();
                Box::pin(async move { inner.stream(req).await })
            })
            .await?;
        let timeout = self.policy.timeout;
        let guarded =
            futures::stream::unfold((stream, Some(permit)), move |(mut s, permit)| async move {
                permit.as_ref()?;
                match tokio::time::timeout(timeout, s.next()).await {
                    Ok(Some(item)) => Some((item, (s, permit))),
                    Ok(None) => None,
                    Err(_) => Some((Err(LlmError::Timeout), (s, None))),
                }
            });
        Ok(Box::pin(guarded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Fails the first `fail` calls with the given error, then answers.
    struct Flaky {
        fail: usize,
        err: LlmError,
        calls: AtomicUsize,
    }

    impl LlmProvider for Flaky {
        fn complete(
            &self,
            _req: ChatRequest,
        ) -> crate::store::BoxFuture<'_, Result<ChatResponse, LlmError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let err = self.err.clone();
            let fail = self.fail;
            Box::pin(async move {
                if n < fail {
                    Err(err)
                } else {
                    Ok(ChatResponse {
                        text: "ok".into(),
                        prompt_tokens: 1,
                        completion_tokens: 1,
                    })
                }
            })
        }
        fn stream(
            &self,
            _req: ChatRequest,
        ) -> crate::store::BoxFuture<'_, Result<DeltaStream, LlmError>> {
            Box::pin(async { Err(LlmError::Connect("no".into())) })
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            retry_after_cap: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            max_concurrent: 4,
            requests_per_minute: 0,
        }
    }

    fn req() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![],
            temperature: None,
            max_tokens: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn honours_capped_retry_after() {
        let p = Arc::new(Flaky {
            fail: 1,
            err: LlmError::RateLimited {
                retry_after: Some(Duration::from_secs(600)),
            },
            calls: AtomicUsize::new(0),
        });
        let llm = ResilientLlm::new(p.clone(), policy());
        let t0 = Instant::now();
        llm.complete(req()).await.unwrap();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_then_probe_closes_it() {
        let p = Arc::new(Flaky {
            fail: 5,
            err: LlmError::Server {
                status: 500,
                retry_after: None,
            },
            calls: AtomicUsize::new(0),
        });
        let mut pol = policy();
        pol.max_retries = 0;
        pol.breaker_failures = 3;
        let llm = ResilientLlm::new(p.clone(), pol);
        for _ in 0..3 {
            assert!(matches!(
                llm.complete(req()).await,
                Err(LlmError::Server { .. })
            ));
        }
        assert_eq!(llm.breaker_state(), BreakerState::Open);
        assert_eq!(llm.complete(req()).await, Err(LlmError::CircuitOpen));
        assert_eq!(p.calls.load(Ordering::SeqCst), 3, "no call while open");
        tokio::time::advance(Duration::from_secs(31)).await;
        // probe fails (call 4) → open again
        assert!(llm.complete(req()).await.is_err());
        assert_eq!(llm.breaker_state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(llm.complete(req()).await.is_err()); // call 5 fails
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(llm.complete(req()).await.is_ok()); // call 6 succeeds
        assert_eq!(llm.breaker_state(), BreakerState::Closed);
    }
}
