//! Limiter keys and the UTC-day budget helpers. The rate limiters themselves (governor in
//! process, GCRA on Redis, one notice per window) live in [`crate::coord`].

use std::hash::{Hash, Hasher};

pub use crate::coord::limiter::{GovernorLimiter as Limits, RateDecision, TokioClock};

/// A compact key for a (bot, user) pair: governor keeps ≈36 bytes per key.
pub fn limit_key(bot: &str, user: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bot.hash(&mut h);
    user.hash(&mut h);
    h.finish()
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
