//! Engine counters, read by `/admin stats`, the terminal and the ops endpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the reply-latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
pub struct EngineStats {
    pub messages: AtomicU64,
    pub duplicates: AtomicU64,
    pub rate_limited: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_tokens_saved: AtomicU64,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// Cumulative counts per bucket (last slot = +Inf), plus sum in microseconds.
    latency: Mutex<(Vec<u64>, u64)>,
}

impl EngineStats {
    pub fn outcome(&self, label: &'static str) {
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(label)
            .or_default() += 1;
    }

    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn observe_latency(&self, d: Duration) {
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

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
