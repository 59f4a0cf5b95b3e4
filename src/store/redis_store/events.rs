//! The Redis store's counters (`confab_redis_*`) and the one event that moves them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::events::{impl_event, Buckets, Counter, ErrorKind, Event, Histogram};

/// Upper bounds (seconds) of the round-trip histogram's buckets: 0.5 ms … 2.5 s.
pub struct CommandBuckets;

impl Buckets for CommandBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
}

/// Round trips by result, their latency, and whether the last one reached Redis.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub ok: Counter,
    /// Redis answered with an error (a script or command refused).
    pub error: Counter,
    /// No answer: timed out, refused or dropped connection.
    pub unreachable: Counter,
    /// Round-trip latency.
    pub latency: Histogram<CommandBuckets>,
    up: AtomicBool,
}

impl RedisStats {
    /// Whether the last round trip reached Redis.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    Error,
    Unreachable,
}

/// One round trip to Redis ended.
pub(super) struct CommandDone {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

impl_event!(CommandDone => RedisStats, |self, stats| {
    stats.latency.observe(self.elapsed);
    let was_up = stats.up.swap(self.outcome != Outcome::Unreachable, Ordering::Relaxed);
    match self.outcome {
        Outcome::Ok => stats.ok.add(1),
        Outcome::Error => {
            tracing::warn!(elapsed_ms = self.elapsed.as_millis() as u64, "redis refused a command");
            stats.error.add(1)
        }
        Outcome::Unreachable => {
            if was_up {
                tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), elapsed_ms = self.elapsed.as_millis() as u64, "redis unreachable");
            }
            stats.unreachable.add(1)
        }
    }
    if !was_up && self.outcome != Outcome::Unreachable {
        tracing::info!("redis reachable");
    }
});

pub(super) fn emit(event: CommandDone, stats: &RedisStats) {
    event.emit(stats);
}
