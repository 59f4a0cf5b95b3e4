//! Retry, timeout, circuit breaker and concurrency cap around any [`LlmProvider`].

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use super::events::LlmStats;
use super::events::{AttemptFailed, AttemptStarted, AttemptSucceeded, BusyCause, LlmBusy};
use super::events::{CircuitRejected, Retrying, TokensUsed};
use super::{ChatRequest, ChatResponse, DeltaStream, LlmError, LlmProvider, Speech, Transcription};
use crate::events::Event;

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
    /// Longest wait for a free slot under `max_concurrent`; then [`LlmError::Busy`].
    pub queue_timeout: Duration,
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

pub struct ResilientLlm {
    inner: Arc<dyn LlmProvider>,
    policy: RetryPolicy,
    breaker: Mutex<Breaker>,
    permits: Arc<Semaphore>,
    /// Calls waiting for a slot; bounded so a flood cannot queue without limit.
    waiting: AtomicUsize,
    rpm: Option<DefaultDirectRateLimiter>,
    pub stats: LlmStats,
}

enum Admission {
    Normal,
    Probe,
}

/// The result of one call (all its attempts), with what the failed attempts may have
/// cost: attempts that reached the endpoint and failed after it could have generated
/// (timeouts, 5xx, malformed answers) are billed by the engine against the user's budget.
#[derive(Debug)]
pub struct Billed<T> {
    pub result: Result<T, LlmError>,
    pub billable_failures: u32,
}

impl<T> Billed<T> {
    /// The same bill, its success turned into something else.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Billed<U> {
        Billed {
            result: self.result.map(f),
            billable_failures: self.billable_failures,
        }
    }
}

/// Failures after which the endpoint may have spent tokens on the prompt.
fn may_have_cost(e: &LlmError) -> bool {
    matches!(
        e,
        LlmError::Timeout | LlmError::Server { .. } | LlmError::BadResponse(_)
    )
}

impl ResilientLlm {
    pub fn new(inner: Arc<dyn LlmProvider>, policy: RetryPolicy) -> Self {
        let rpm = NonZeroU32::new(policy.requests_per_minute)
            .map(|n| RateLimiter::direct(Quota::per_minute(n)));
        Self {
            inner,
            permits: Arc::new(Semaphore::new(policy.max_concurrent.max(1))),
            waiting: AtomicUsize::new(0),
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
                CircuitRejected.emit(&self.stats);
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
                    let now = Instant::now();
                    *b = Breaker::Open {
                        // Config bounds the cooldown; never panic on the arithmetic anyway.
                        until: now
                            .checked_add(self.policy.breaker_cooldown)
                            .unwrap_or(now + Duration::from_secs(86_400)),
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

    /// A slot under `max_concurrent`, waited for at most `queue_timeout`. One per call:
    /// a stream keeps its slot until the stream ends.
    /// At most `4 × max_concurrent` (at least 64) calls wait; more are told busy at once.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, LlmError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let cap = self.policy.max_concurrent.saturating_mul(4).max(64);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= cap {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            let cause = BusyCause::QueueFull;
            LlmBusy { cause }.emit(&self.stats);
            return Err(LlmError::Busy);
        }
        let got = tokio::time::timeout(
            self.policy.queue_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match got {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => {
                let cause = BusyCause::Slots;
                LlmBusy { cause }.emit(&self.stats);
                Err(LlmError::Busy)
            }
        }
    }

    /// Attempts with retries. The caller holds the call's slot. The breaker hears about
    /// the call once, at its end: one user's request counts once, however many
    /// attempts it took. A half-open probe is a single attempt.
    async fn run<T, F>(&self, mut attempt_fn: F) -> Billed<T>
    where
        F: FnMut() -> futures::future::BoxFuture<'static, Result<T, LlmError>>,
    {
        let mut billable_failures = 0u32;
        let mut attempt = 0u32;
        let admission = match self.admit() {
            Ok(a) => a,
            Err(e) => {
                return Billed {
                    result: Err(e),
                    billable_failures,
                }
            }
        };
        loop {
            if let Some(rpm) = &self.rpm {
                rpm.until_ready().await;
            }
            AttemptStarted { attempt }.emit(&self.stats);
            let started = Instant::now();
            let result = match tokio::time::timeout(self.policy.timeout, attempt_fn()).await {
                Ok(r) => r,
                Err(_) => Err(LlmError::Timeout),
            };
            let e = match result {
                Ok(v) => {
                    self.record(&admission, Ok(()));
                    let latency = started.elapsed();
                    AttemptSucceeded { latency }.emit(&self.stats);
                    return Billed {
                        result: Ok(v),
                        billable_failures,
                    };
                }
                Err(e) => e,
            };
            AttemptFailed { error: &e, attempt }.emit(&self.stats);
            if may_have_cost(&e) {
                billable_failures += 1;
            }
            let probe = matches!(admission, Admission::Probe);
            if probe || !e.is_retryable() || attempt >= self.policy.max_retries {
                self.record(&admission, Err(&e));
                return Billed {
                    result: Err(e),
                    billable_failures,
                };
            }
            let wait = self.backoff(attempt, &e);
            attempt += 1;
            Retrying { attempt, wait }.emit(&self.stats);
            tokio::time::sleep(wait).await;
            // Others' failures may have opened the circuit meanwhile: stop retrying.
            if self.breaker_state() == BreakerState::Open {
                CircuitRejected.emit(&self.stats);
                return Billed {
                    result: Err(LlmError::CircuitOpen),
                    billable_failures,
                };
            }
        }
    }

    pub async fn complete(&self, req: ChatRequest) -> Result<ChatResponse, LlmError> {
        self.complete_billed(req).await.result
    }

    /// Takes the call's one slot, then runs the attempts of `call` on the provider.
    /// A success comes with the slot, so a stream can keep it until it ends.
    async fn with_slot<R, T, C>(&self, req: R, call: C) -> Billed<(T, OwnedSemaphorePermit)>
    where
        R: Clone,
        T: 'static,
        C: Fn(Arc<dyn LlmProvider>, R) -> futures::future::BoxFuture<'static, Result<T, LlmError>>
            + Send
            + 'static,
    {
        let slot = match self.slot().await {
            Ok(s) => s,
            Err(e) => {
                return Billed {
                    result: Err(e),
                    billable_failures: 0,
                }
            }
        };
        let inner = self.inner.clone();
        let billed = self.run(move || call(inner.clone(), req.clone())).await;
        billed.map(|v| (v, slot))
    }

    /// A completion, with the failed attempts that may have cost tokens.
    pub async fn complete_billed(&self, req: ChatRequest) -> Billed<ChatResponse> {
        let billed = self
            .with_slot(req, |inner, req| {
                Box::pin(async move { inner.complete(req).await })
            })
            .await;
        if let Ok((resp, _)) = &billed.result {
            TokensUsed {
                prompt: resp.prompt_tokens,
                completion: resp.completion_tokens,
            }
            .emit(&self.stats);
        }
        billed.map(|(resp, _slot)| resp)
    }

    /// A transcription (`/audio/transcriptions`) under the same slot, timeout, retry and
    /// breaker rules as a completion: one endpoint, one health.
    pub async fn transcribe(&self, req: Transcription) -> Billed<String> {
        let billed = self
            .with_slot(req, |inner, req| {
                Box::pin(async move { inner.transcribe(req).await })
            })
            .await;
        billed.map(|(text, _slot)| text)
    }

    /// A spoken text (`/audio/speech`), under the same rules.
    pub async fn speak(&self, req: Speech) -> Billed<Vec<u8>> {
        let billed = self
            .with_slot(req, |inner, req| {
                Box::pin(async move { inner.speak(req).await })
            })
            .await;
        billed.map(|(audio, _slot)| audio)
    }

    /// A streamed completion. Retries cover starting the stream; once text flows, a
    /// stalled chunk (longer than the timeout) or an error ends the stream. The call's
    /// one slot is held until the stream ends or is dropped.
    pub async fn stream(&self, req: ChatRequest) -> Billed<DeltaStream> {
        let billed = self
            .with_slot(req, |inner, req| {
                Box::pin(async move { inner.stream(req).await })
            })
            .await;
        let timeout = self.policy.timeout;
        billed.map(move |(stream, slot)| -> DeltaStream {
            Box::pin(futures::stream::unfold(
                (stream, Some(slot)),
                move |(mut s, slot)| async move {
                    slot.as_ref()?;
                    match tokio::time::timeout(timeout, s.next()).await {
                        Ok(Some(item)) => Some((item, (s, slot))),
                        Ok(None) => None,
                        Err(_) => Some((Err(LlmError::Timeout), (s, None))),
                    }
                },
            ))
        })
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
        ) -> futures::future::BoxFuture<'_, Result<ChatResponse, LlmError>> {
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
        ) -> futures::future::BoxFuture<'_, Result<DeltaStream, LlmError>> {
            Box::pin(async { Err(LlmError::Connect("no".into())) })
        }
        fn transcribe(
            &self,
            _req: Transcription,
        ) -> futures::future::BoxFuture<'_, Result<String, LlmError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let (err, fail) = (self.err.clone(), self.fail);
            Box::pin(async move {
                if n < fail {
                    Err(err)
                } else {
                    Ok("heard".into())
                }
            })
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
            queue_timeout: Duration::from_secs(30),
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

    /// Transcriptions share the chat's endpoint health: retried like a completion, and
    /// their failures open the one circuit.
    #[tokio::test(start_paused = true)]
    async fn transcriptions_are_retried_and_open_the_shared_circuit() {
        let p = Arc::new(Flaky {
            fail: 7,
            err: LlmError::Server {
                status: 503,
                retry_after: None,
            },
            calls: AtomicUsize::new(0),
        });
        let mut pol = policy();
        (pol.max_retries, pol.breaker_failures) = (1, 3);
        let llm = ResilientLlm::new(p.clone(), pol);
        let audio = || Transcription {
            model: "whisper-1".into(),
            file_name: "voice.ogg".into(),
            bytes: Arc::new(b"x".to_vec()),
        };
        for _ in 0..3 {
            let billed = llm.transcribe(audio()).await;
            assert!(matches!(billed.result, Err(LlmError::Server { .. })));
            assert_eq!(billed.billable_failures, 2, "two attempts each");
        }
        assert_eq!(p.calls.load(Ordering::SeqCst), 6);
        assert_eq!(llm.breaker_state(), BreakerState::Open);
        let refused = llm.transcribe(audio()).await.result;
        assert_eq!(refused, Err(LlmError::CircuitOpen));
        assert_eq!(llm.complete(req()).await, Err(LlmError::CircuitOpen));
        assert_eq!(p.calls.load(Ordering::SeqCst), 6, "no call while open");
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
