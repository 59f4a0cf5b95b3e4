//! Internal events: one small struct per thing that happens, whose [`Event::emit`] logs
//! it and counts it in the same call (vector's internal events). Code that wants a
//! counter to move emits an event; it never touches the counter, so nothing is counted
//! without being logged, or logged without being counted.
//!
//! Each layer keeps its events next to its counters (`engine/events.rs` beside
//! `engine/stats.rs`). The ops endpoint reads the counters at scrape time.
//! Events carry ids, kinds and numbers; never message text, never secrets.
//!
//! Every line logged at `error` carries a stable `error.kind` field from [`ErrorKind`]
//! (`tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), …)`), so a log pipeline
//! can group errors; a test scans `src/` for `error!` without one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Something that happened. `emit` writes its log line and moves its counters.
pub trait Event {
    /// The counters this event moves.
    type Stats: ?Sized;
    fn emit(self, stats: &Self::Stats);
}

/// Implements [`Event`] for an event struct from its `emit` body alone:
/// `impl_event!(CacheHit => EngineStats, |self, stats| { …log…; …count… });`
/// (every event has the same `impl` frame; only its log line and counters differ).
macro_rules! impl_event {
    ($name:ty => $stats:ty, |$this:ident, $counters:ident| $body:block) => {
        impl $crate::events::Event for $name {
            type Stats = $stats;
            fn emit($this, $counters: &$stats) $body
        }
    };
}
pub(crate) use impl_event;

/// A monotonic counter. Readable anywhere; only events add to it.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Like [`AtomicU64::load`] (for readers written against plain atomics).
    pub fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }

    /// For events only (see the module documentation).
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counters by a label value from a closed set of `&'static str`s (an outcome, a kind).
#[derive(Debug, Default)]
pub struct LabeledCounter(Mutex<BTreeMap<&'static str, u64>>);

impl LabeledCounter {
    /// Every label seen so far with its count, in label order.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// For events only (see the module documentation).
    pub(crate) fn add(&self, label: &'static str, n: u64) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(label)
            .or_default() += n;
    }
}

/// The stable `error.kind` of a line logged at `error`: a small closed set a log
/// pipeline can group and alert on. A new kind is a new variant (and a README line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A store read, write or flush failed.
    StoreIo,
    /// A stored entry could not be decoded and was skipped.
    StoreCorrupt,
    /// The system prompt did not render.
    Prompt,
    /// The configuration: a reload refused, a message for a bot that is not configured.
    Config,
    /// A panic was caught (the message is never logged: it can quote user text).
    Panic,
    /// A reply was still not delivered after `delivery.max_retry_secs` and given up.
    DeliveryExpired,
    /// A platform connection (the Discord gateway) failed and is retried.
    Platform,
    /// Something could not be serialised to be stored (a bug, not an outside failure).
    Encode,
    /// `/metrics` could not be rendered.
    Metrics,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::StoreIo,
        ErrorKind::StoreCorrupt,
        ErrorKind::Prompt,
        ErrorKind::Config,
        ErrorKind::Panic,
        ErrorKind::DeliveryExpired,
        ErrorKind::Platform,
        ErrorKind::Encode,
        ErrorKind::Metrics,
    ];

    /// The value of the `error.kind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::StoreIo => "store_io",
            ErrorKind::StoreCorrupt => "store_corrupt",
            ErrorKind::Prompt => "prompt",
            ErrorKind::Config => "config",
            ErrorKind::Panic => "panic",
            ErrorKind::DeliveryExpired => "delivery_expired",
            ErrorKind::Platform => "platform",
            ErrorKind::Encode => "encode",
            ErrorKind::Metrics => "metrics",
        }
    }
}

/// The upper bounds (seconds) of a [`Histogram`]'s buckets, as a type.
pub trait Buckets {
    const BOUNDS: &'static [f64];
}

/// A histogram over `B`'s bounds. Readable anywhere; only events observe into it.
pub struct Histogram<B> {
    /// Per-bucket counts (last slot = over the largest bound), plus the sum in µs.
    state: Mutex<(Vec<u64>, u64)>,
    bounds: std::marker::PhantomData<fn() -> B>,
}

impl<B> Default for Histogram<B> {
    fn default() -> Self {
        Self {
            state: Mutex::new((Vec::new(), 0)),
            bounds: std::marker::PhantomData,
        }
    }
}

impl<B> std::fmt::Debug for Histogram<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").finish_non_exhaustive()
    }
}

impl<B: Buckets> Histogram<B> {
    /// For events only (see the module documentation).
    pub(crate) fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let idx = B::BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(B::BOUNDS.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.is_empty() {
            s.0 = vec![0; B::BOUNDS.len() + 1];
        }
        if let Some(c) = s.0.get_mut(idx) {
            *c += 1;
        }
        s.1 += d.as_micros() as u64;
    }

    /// Per-bucket counts (not cumulative; last = over the largest bound; empty before
    /// the first observation) and the sum.
    pub fn snapshot(&self) -> (Vec<u64>, std::time::Duration) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.0.clone(), std::time::Duration::from_micros(s.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_distinct_snake_case() {
        let names: std::collections::BTreeSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        for n in names {
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{n}");
        }
    }

    #[test]
    fn histogram_counts_per_bucket_and_over_the_top() {
        struct Two;
        impl Buckets for Two {
            const BOUNDS: &'static [f64] = &[0.01, 0.1];
        }
        let h = Histogram::<Two>::default();
        assert_eq!(h.snapshot().0, Vec::<u64>::new());
        for ms in [5, 10, 50, 2_000] {
            h.observe(std::time::Duration::from_millis(ms));
        }
        let (counts, sum) = h.snapshot();
        assert_eq!(counts, [2, 1, 1]);
        assert_eq!(sum, std::time::Duration::from_millis(2_065));
    }
}
