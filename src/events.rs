//! Internal events: one small struct per thing that happens, whose [`Event::emit`] logs
//! it and counts it in the same call (vector's internal events). Code that wants a
//! counter to move emits an event; it never touches the counter, so nothing is counted
//! without being logged, or logged without being counted.
//!
//! Each layer keeps its events next to its counters (`engine/events.rs` beside
//! `engine/stats.rs`). The ops endpoint reads the counters at scrape time.
//! Events carry ids, kinds and numbers; never message text, never secrets.

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
