//! Coordination events (see [`crate::events`]): each logs and moves [`CoordStats`]
//! together. Fields are lease names (bot or conversation ids) and error kinds; never
//! message text, never the Redis URL.

use super::CoordError;
use crate::events::{impl_event, Counter};

/// Counters the ops endpoint reads; moved only by the events below.
#[derive(Debug, Default)]
pub struct CoordStats {
    /// Rate-limit checks Redis could not answer (the user got the busy apology).
    pub limiter_errors: Counter,
    /// Messages refused because their conversation's lease stayed taken past the bound.
    pub ordering_timeouts: Counter,
    /// Polling leases this instance took after another holder had it (a takeover).
    pub lease_takeovers: Counter,
    /// Polling leases this instance lost (taken over, or not renewable in time).
    pub leases_lost: Counter,
}

/// The shared limiter could not decide: the message is refused (fail closed).
pub struct LimiterFailed<'a> {
    pub error: &'a CoordError,
}

impl_event!(LimiterFailed<'_> => CoordStats, |self, stats| {
    tracing::warn!(error = %self.error, "shared rate limiter unavailable; refusing with the busy notice");
    stats.limiter_errors.add(1);
});

/// A conversation's lease stayed taken (or Redis unreachable) past the waiting bound.
pub struct OrderingTimedOut;

impl_event!(OrderingTimedOut => CoordStats, |self, stats| {
    tracing::warn!("conversation lease not obtained in time; refusing with the busy notice");
    stats.ordering_timeouts.add(1);
});

/// This instance now holds a polling lease.
pub struct LeaseAcquired<'a> {
    pub name: &'a str,
    /// Someone else held it when this instance first asked.
    pub takeover: bool,
}

impl_event!(LeaseAcquired<'_> => CoordStats, |self, stats| {
    if self.takeover {
        tracing::warn!(lease = self.name, "took over the polling lease");
        stats.lease_takeovers.add(1);
    } else {
        tracing::info!(lease = self.name, "holding the polling lease");
    }
});

/// This instance lost a polling lease: it stops polling.
pub struct LeaseLost<'a> {
    pub name: &'a str,
    /// "taken" (another holder) or "unrenewable" (Redis did not answer in time).
    pub reason: &'static str,
}

impl_event!(LeaseLost<'_> => CoordStats, |self, stats| {
    tracing::warn!(lease = self.name, reason = self.reason, "lost the polling lease; polling stops");
    stats.leases_lost.add(1);
});
