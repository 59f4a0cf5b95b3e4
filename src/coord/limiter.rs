//! The rate limiter behind [`RateLimiter`]: per key (a user on a bot), `per_minute` cells
//! per 60 s with `burst` at once (GCRA, governor's semantics), and one notice per window.
//!
//! [`GovernorLimiter`] is the in-process one (governor, keyed, on a tokio-time clock so
//! tests drive it with `tokio::time::pause()`); [`super::redis_limiter::RedisLimiter`]
//! is the same algorithm in one server-side script, shared by every instance.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Governor};

use super::CoordError;

/// Outcome of a rate-limit check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Over the limit; tell the user once (then stay silent until the window passes).
    Notify {
        retry_in: Duration,
    },
    Silent,
}

impl RateDecision {
    /// A refused cell: the notice when the user was not told yet in this window (its
    /// "try again in" figure is at least a second), else silence. Shared by every
    /// limiter so the notice-once rule is the same everywhere.
    pub fn refused(told_already: bool, retry_in: Duration) -> RateDecision {
        if told_already {
            RateDecision::Silent
        } else {
            RateDecision::Notify {
                retry_in: retry_in.max(Duration::from_secs(1)),
            }
        }
    }
}

/// A shared or local rate limiter. `check` is async (a network round trip on Redis);
/// an `Err` means the limiter could not decide (Redis unreachable): the engine then
/// refuses with the busy apology (fail closed: no LLM spend without a limit).
/// The answer of [`RateLimiter::check`], once the limiter has decided.
pub type RateCheck<'a> = BoxFuture<'a, Result<RateDecision, CoordError>>;

pub trait RateLimiter: Send + Sync {
    fn check(&self, key: u64, per_minute: u32, burst: u32) -> RateCheck<'_>;
    /// Forgets a key's notice state (`/forget`); its cells stay counted until they lapse.
    fn reset(&self, key: u64);
    /// Drops stale keys so memory stays bounded (run periodically); returns live keys.
    fn prune(&self) -> usize;
}

/// The time one cell takes to come back, as governor computes it for
/// `Quota::per_minute(per_minute)` (whole nanoseconds, rounded down; 0 counts as 1).
pub fn cell_nanos(per_minute: u32) -> u64 {
    let rate = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    let ns = Duration::from_secs(60).as_nanos() / u128::from(rate.get());
    (ns as u64).max(1)
}

/// A governor clock on tokio's time (controllable in tests, real otherwise).
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Keyed = Governor<u64, DefaultKeyedStateStore<u64>, TokioClock, NoOpMiddleware<Duration>>;

/// One keyed governor limiter per distinct quota (the default, bot overrides, admin
/// overrides), in this process.
pub struct GovernorLimiter {
    clock: TokioClock,
    limiters: Mutex<HashMap<(u32, u32), Arc<Keyed>>>,
    /// Key → the instant (clock time) until which the user was already told.
    notified: Mutex<HashMap<u64, Duration>>,
}

impl Default for GovernorLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl GovernorLimiter {
    pub fn new() -> Self {
        Self {
            clock: TokioClock::default(),
            limiters: Mutex::new(HashMap::new()),
            notified: Mutex::new(HashMap::new()),
        }
    }

    fn limiter(&self, per_minute: u32, burst: u32) -> Arc<Keyed> {
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((per_minute, burst))
            .or_insert_with(|| {
                let rate = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
                let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
                Arc::new(Governor::new(
                    Quota::per_minute(rate).allow_burst(burst),
                    DefaultKeyedStateStore::default(),
                    self.clock.clone(),
                ))
            })
            .clone()
    }

    /// The decision for one message now (synchronous: everything is in memory).
    pub fn check_now(&self, key: u64, per_minute: u32, burst: u32) -> RateDecision {
        let limiter = self.limiter(per_minute, burst);
        match limiter.check_key(&key) {
            Ok(()) => RateDecision::Allowed,
            Err(not_until) => {
                let now = self.clock.now();
                let retry_in = not_until.wait_time_from(now);
                let mut notified = self.notified.lock().unwrap_or_else(|p| p.into_inner());
                let told = notified.get(&key).is_some_and(|until| *until > now);
                if !told {
                    notified.insert(key, now + retry_in);
                }
                RateDecision::refused(told, retry_in)
            }
        }
    }

    /// Keys currently held by the limiters (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|l| l.len())
            .sum()
    }
}

impl RateLimiter for GovernorLimiter {
    fn check(&self, key: u64, per_minute: u32, burst: u32) -> RateCheck<'_> {
        let decision = self.check_now(key, per_minute, burst);
        Box::pin(std::future::ready(Ok(decision)))
    }

    /// governor has no per-key removal; its entry is an anonymous hash that `prune`
    /// drops once the window (≤ 1 min) lapses.
    fn reset(&self, key: u64) {
        self.notified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    fn prune(&self) -> usize {
        let now = self.clock.now();
        let limiters: Vec<Arc<Keyed>> = self
            .limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut live = 0;
        for l in limiters {
            l.retain_recent();
            l.shrink_to_fit();
            live += l.len();
        }
        let mut notified = self.notified.lock().unwrap_or_else(|p| p.into_inner());
        notified.retain(|_, until| *until > now);
        notified.shrink_to_fit();
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_notice_per_window() {
        let limits = GovernorLimiter::new();
        let k = 7;
        // 6/min, burst 2: two pass, then one notice, then silence
        assert_eq!(limits.check_now(k, 6, 2), RateDecision::Allowed);
        assert_eq!(limits.check_now(k, 6, 2), RateDecision::Allowed);
        assert!(matches!(
            limits.check_now(k, 6, 2),
            RateDecision::Notify { .. }
        ));
        assert_eq!(limits.check_now(k, 6, 2), RateDecision::Silent);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limits.check_now(k, 6, 2), RateDecision::Allowed);
        assert!(matches!(
            limits.check_now(k, 6, 2),
            RateDecision::Notify { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn prune_drops_idle_keys() {
        let limits = GovernorLimiter::new();
        for i in 0..1000 {
            limits.check_now(i, 60, 3);
        }
        assert_eq!(limits.tracked_keys(), 1000);
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(limits.prune(), 0);
    }

    #[test]
    fn a_refusal_notifies_once_with_at_least_a_second() {
        let short = Duration::from_millis(200);
        let expect = RateDecision::Notify {
            retry_in: Duration::from_secs(1),
        };
        assert_eq!(RateDecision::refused(false, short), expect);
        assert_eq!(RateDecision::refused(true, short), RateDecision::Silent);
    }

    #[test]
    fn cells_match_governor_quota() {
        assert_eq!(cell_nanos(6), 10_000_000_000);
        assert_eq!(cell_nanos(7), 8_571_428_571);
        assert_eq!(cell_nanos(0), 60_000_000_000);
    }
}
