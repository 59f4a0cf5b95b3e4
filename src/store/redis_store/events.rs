//! The Redis store's counters (`confab_redis_*`) and the one event that moves them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::events::{impl_event, Counter, Event};

/// Upper bounds (seconds) of the round-trip histogram's buckets.
pub const COMMAND_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Round trips by result, their latency, and whether the last one reached Redis.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub ok: Counter,
    /// Redis answered with an error (a script or command refused).
    pub error: Counter,
    /// No answer: timed out, refused or dropped connection.
    pub unreachable: Counter,
    /// Per bucket of [`COMMAND_BUCKETS`], plus one slot over the largest bound.
    buckets: [AtomicU64; COMMAND_BUCKETS.len() + 1],
    micros: AtomicU64,
    up: AtomicBool,
}

impl RedisStats {
    /// Per-bucket counts (not cumulative) and the sum of all samples.
    pub fn latency(&self) -> (Vec<u64>, Duration) {
        let counts = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        (
            counts,
            Duration::from_micros(self.micros.load(Ordering::Relaxed)),
        )
    }

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
    let secs = self.elapsed.as_secs_f64();
    let slot = COMMAND_BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(COMMAND_BUCKETS.len());
    if let Some(b) = stats.buckets.get(slot) {
        b.fetch_add(1, Ordering::Relaxed);
    }
    stats
        .micros
        .fetch_add(self.elapsed.as_micros() as u64, Ordering::Relaxed);
    let was_up = stats.up.swap(self.outcome != Outcome::Unreachable, Ordering::Relaxed);
    match self.outcome {
        Outcome::Ok => stats.ok.add(1),
        Outcome::Error => {
            tracing::warn!(elapsed_ms = self.elapsed.as_millis() as u64, "redis refused a command");
            stats.error.add(1)
        }
        Outcome::Unreachable => {
            if was_up {
                tracing::error!(elapsed_ms = self.elapsed.as_millis() as u64, "redis unreachable");
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
