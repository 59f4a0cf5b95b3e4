//! Engine counters, read by `/admin stats`, the terminal and the ops endpoint. They
//! move only through the events in `engine/events.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::events::InternalCause;
use crate::events::{Counter, LabeledCounter};

/// Upper bounds (seconds) of the reply-latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
pub struct EngineStats {
    pub messages: Counter,
    /// Redelivered updates dropped (already sent) or resent from the store.
    pub duplicates: Counter,
    /// Messages refused by a rate limit (messages or commands) or the daily budget.
    pub rate_limited: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_tokens_saved: Counter,
    /// LLM calls retried with half the history after a context-length error.
    pub context_retries: Counter,
    /// Replies that apologised for a failed LLM call, by the error's kind.
    pub llm_failures: LabeledCounter,
    /// Our own failures, by cause ([`InternalCause`]).
    internal: [Counter; InternalCause::ALL.len()],
    outcomes: LabeledCounter,
    /// Cumulative counts per bucket (last slot = +Inf), plus sum in microseconds.
    latency: Mutex<(Vec<u64>, u64)>,
}

impl EngineStats {
    /// Replies by outcome (`answer`, `cached`, `command`, `silent`, a rejection).
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        self.outcomes.snapshot()
    }

    pub(super) fn count_outcome(&self, outcome: &'static str) {
        self.outcomes.add(outcome, 1);
    }

    /// Internal failures of this cause so far.
    pub fn internal_errors(&self, cause: InternalCause) -> u64 {
        self.internal.get(cause as usize).map_or(0, Counter::get)
    }

    pub(super) fn count_internal(&self, cause: InternalCause) {
        if let Some(c) = self.internal.get(cause as usize) {
            c.add(1);
        }
    }

    pub(crate) fn observe_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        if l.0.is_empty() {
            l.0 = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let idx = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        l.0[idx] += 1;
        l.1 += d.as_micros() as u64;
    }

    /// Per-bucket counts (not cumulative; last = over the largest bound) and the sum.
    pub fn latency(&self) -> (Vec<u64>, Duration) {
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        (l.0.clone(), Duration::from_micros(l.1))
    }

    /// Upper bound of the bucket holding the given quantile (e.g. 0.95), if any samples.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let (counts, _) = self.latency();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}
