//! Limiter keys and the UTC-day budget helpers. The rate limiters themselves (governor in
//! process, GCRA on Redis, one notice per window) live in [`crate::coord`].

use sha2::{Digest, Sha256};

pub use crate::coord::limiter::{GovernorLimiter as Limits, RateDecision, TokioClock};

/// A compact key for a (bot, user) pair: governor keeps ≈36 bytes per key. The first
/// 8 bytes (big-endian) of SHA-256 over the length-prefixed parts: the same value in
/// every build and version, so instances of a rolling deploy share one Redis limiter
/// key per user (std's `DefaultHasher` is not stable across releases).
pub fn limit_key(bot: &str, user: &str) -> u64 {
    let mut h = Sha256::new();
    for part in [bot, user] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
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
    fn limiter_keys_are_the_same_in_every_build() {
        // Pinned: a change here splits a rolling deploy's limits in two.
        assert_eq!(limit_key("assistant", "tg:42"), 0xcb7a_b480_f9c7_68a8);
        assert_ne!(limit_key("a", "bc"), limit_key("ab", "c"));
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
