//! The LLM client's events (see [`crate::events`]): each logs and moves [`LlmStats`]
//! together. Fields are kinds, counts and durations; never prompt or answer text.

use std::time::Duration;

use super::LlmError;
use crate::events::{impl_event, Counter};

/// Counters the ops endpoint and `/admin stats` read; moved only by the events below.
#[derive(Debug, Default)]
pub struct LlmStats {
    /// Attempts, retries included.
    pub requests: Counter,
    /// Failed attempts.
    pub errors: Counter,
    pub retries: Counter,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub circuit_rejections: Counter,
    /// Calls refused with the busy apology: no `max_concurrent` slot within
    /// `queue_timeout`, a full waiting line, or the user's previous call still running.
    pub busy_rejections: Counter,
    /// Sum of successful attempt latencies in microseconds.
    pub latency_micros: Counter,
}

/// One attempt goes to the endpoint (`attempt` 0 is the first, then retries).
pub struct AttemptStarted {
    pub attempt: u32,
}

impl_event!(AttemptStarted => LlmStats, |self, stats| {
    tracing::debug!(attempt = self.attempt, "LLM attempt");
    stats.requests.add(1);
});

/// An attempt answered.
pub struct AttemptSucceeded {
    pub latency: Duration,
}

impl_event!(AttemptSucceeded => LlmStats, |self, stats| {
    let micros = self.latency.as_micros() as u64;
    tracing::debug!(latency_ms = micros / 1000, "LLM attempt answered");
    stats.latency_micros.add(micros);
});

/// An attempt failed (it may be retried).
pub struct AttemptFailed<'a> {
    pub error: &'a LlmError,
    pub attempt: u32,
}

impl_event!(AttemptFailed<'_> => LlmStats, |self, stats| {
    let (error, kind) = (self.error, self.error.kind());
    tracing::warn!(%error, kind, attempt = self.attempt, "LLM attempt failed");
    stats.errors.add(1);
});

/// A failed attempt is retried after `wait`.
pub struct Retrying {
    pub attempt: u32,
    pub wait: Duration,
}

impl_event!(Retrying => LlmStats, |self, stats| {
    let wait_ms = self.wait.as_millis() as u64;
    tracing::debug!(attempt = self.attempt, wait_ms, "retrying the LLM call");
    stats.retries.add(1);
});

/// A call refused because the circuit is open (or opened while it waited to retry).
pub struct CircuitRejected;

impl_event!(CircuitRejected => LlmStats, |self, stats| {
    tracing::debug!("LLM call refused: circuit open");
    stats.circuit_rejections.add(1);
});

/// Why a call was refused as busy.
#[derive(Debug, Clone, Copy)]
pub enum BusyCause {
    /// Every `max_concurrent` slot stayed taken for `queue_timeout`.
    Slots,
    /// Too many calls were already waiting for a slot.
    QueueFull,
    /// The user's previous call was still running after `queue_timeout`.
    UserCall,
}

/// A call refused with the busy apology.
pub struct LlmBusy {
    pub cause: BusyCause,
}

impl_event!(LlmBusy => LlmStats, |self, stats| {
    let cause = match self.cause {
        BusyCause::Slots => "slots",
        BusyCause::QueueFull => "queue_full",
        BusyCause::UserCall => "user_call",
    };
    tracing::debug!(cause, "LLM call refused: busy");
    stats.busy_rejections.add(1);
});

/// Tokens the endpoint reported for an answered call.
pub struct TokensUsed {
    pub prompt: u64,
    pub completion: u64,
}

impl_event!(TokensUsed => LlmStats, |self, stats| {
    let (prompt, completion) = (self.prompt, self.completion);
    tracing::debug!(prompt, completion, "LLM tokens used");
    stats.prompt_tokens.add(prompt);
    stats.completion_tokens.add(completion);
});
