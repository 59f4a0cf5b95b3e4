//! Engine counters, read by `/admin stats`, the terminal and the ops endpoint. They
//! move only through the events in `engine/events.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::events::InternalCause;
use crate::domain::Platform;
use crate::events::{Buckets, Counter, Histogram, LabeledCounter};

/// Upper bounds (seconds) of the reply-latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The reply-latency histogram's bounds ([`LATENCY_BUCKETS`]).
#[derive(Debug)]
pub struct ReplyBuckets;

impl Buckets for ReplyBuckets {
    const BOUNDS: &'static [f64] = LATENCY_BUCKETS;
}

/// The store-write histogram's bounds: one exchange's atomic write and group-commit
/// flush, from 100 µs to 2.5 s.
#[derive(Debug)]
pub struct StoreWriteBuckets;

impl Buckets for StoreWriteBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
}

#[derive(Debug, Default)]
pub struct EngineStats {
    pub messages: Counter,
    /// Messages by platform (the same messages as `messages`).
    by_platform: LabeledCounter,
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
    /// Reply latency of answers (fresh or cached).
    pub reply_latency: Histogram<ReplyBuckets>,
    /// Writing one answered exchange and making it durable (`record_exchange` + flush).
    pub store_write: Histogram<StoreWriteBuckets>,
    /// Voice notes, audio files and images by kind and outcome; audio seconds.
    pub media: super::media::MediaStats,
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

    /// Messages by platform, every platform listed (0 before its first message).
    pub fn messages_by_platform(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = self.by_platform.snapshot();
        for p in [Platform::Telegram, Platform::Discord, Platform::Terminal] {
            counts.entry(p.name()).or_default();
        }
        counts
    }

    pub(super) fn count_message(&self, platform: Platform) {
        self.messages.add(1);
        self.by_platform.add(platform.name(), 1);
    }

    pub(crate) fn observe_latency(&self, d: Duration) {
        self.reply_latency.observe(d);
    }

    /// Per-bucket counts (not cumulative; last = over the largest bound) and the sum.
    pub fn latency(&self) -> (Vec<u64>, Duration) {
        self.reply_latency.snapshot()
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
