//! Per-user rate limits (governor, keyed) with one notice per window, and the UTC-day budget.
//!
//! The limiter clock reads `tokio::time::Instant`, so tests drive it with `tokio::time::pause()`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

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

type Keyed = RateLimiter<u64, DefaultKeyedStateStore<u64>, TokioClock, NoOpMiddleware<Duration>>;

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

/// One keyed limiter per distinct quota (the default, bot overrides, admin overrides).
pub struct Limits {
    clock: TokioClock,
    limiters: Mutex<HashMap<(u32, u32), Arc<Keyed>>>,
    /// Key → the instant (clock time) until which the user was already told.
    notified: Mutex<HashMap<u64, Duration>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

/// A compact key for a (bot, user) pair: governor keeps ≈36 bytes per key.
pub fn limit_key(bot: &str, user: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bot.hash(&mut h);
    user.hash(&mut h);
    h.finish()
}

impl Limits {
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
                Arc::new(RateLimiter::new(
                    Quota::per_minute(rate).allow_burst(burst),
                    DefaultKeyedStateStore::default(),
                    self.clock.clone(),
                ))
            })
            .clone()
    }

    pub fn check(&self, key: u64, per_minute: u32, burst: u32) -> RateDecision {
        let limiter = self.limiter(per_minute, burst);
        match limiter.check_key(&key) {
            Ok(()) => RateDecision::Allowed,
            Err(not_until) => {
                let now = self.clock.now();
                let retry_in = not_until.wait_time_from(now);
                let mut notified = self.notified.lock().unwrap_or_else(|p| p.into_inner());
                match notified.get(&key) {
                    Some(until) if *until > now => RateDecision::Silent,
                    _ => {
                        notified.insert(key, now + retry_in);
                        RateDecision::Notify {
                            retry_in: retry_in.max(Duration::from_secs(1)),
                        }
                    }
                }
            }
        }
    }

    /// Forgets a user's notice state (`/forget`). governor has no per-key removal; its
    /// entry is an anonymous hash that `prune` drops once the window (≤ 1 min) lapses.
    pub fn reset(&self, key: u64) {
        self.notified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// Drops stale keys so memory stays bounded (run periodically).
    pub fn prune(&self) -> usize {
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

/// Days since the Unix epoch for a unix timestamp (the UTC day the budget counts).
pub fn utc_day(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(86_400)
}

/// Seconds until the next UTC midnight.
pub fn secs_until_reset(unix_secs: i64) -> i64 {
    86_400 - unix_secs.rem_euclid(86_400)
}

/// "2h 5m", "45s" — for notices.
pub fn human_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) if s == 0 => format!("{m}m"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_notice_per_window() {
        let limits = Limits::new();
        let k = limit_key("b", "u");
        // 6/min, burst 2: two pass, then one notice, then silence
        assert_eq!(limits.check(k, 6, 2), RateDecision::Allowed);
        assert_eq!(limits.check(k, 6, 2), RateDecision::Allowed);
        assert!(matches!(limits.check(k, 6, 2), RateDecision::Notify { .. }));
        assert_eq!(limits.check(k, 6, 2), RateDecision::Silent);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limits.check(k, 6, 2), RateDecision::Allowed);
        assert!(matches!(limits.check(k, 6, 2), RateDecision::Notify { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn prune_drops_idle_keys() {
        let limits = Limits::new();
        for i in 0..1000 {
            limits.check(i, 60, 3);
        }
        assert_eq!(limits.tracked_keys(), 1000);
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(limits.prune(), 0);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(120), "2m");
        assert_eq!(human_duration(125), "2m 5s");
        assert_eq!(human_duration(7500), "2h 5m");
        assert_eq!(secs_until_reset(86_400 * 3 + 3600), 82_800);
        assert_eq!(utc_day(86_400 * 3 + 5), 3);
    }
}
