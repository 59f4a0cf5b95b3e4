//! The delivery machinery's events (see [`crate::events`]): each logs and moves
//! [`DeliveryStats`] together. Fields are ids, kinds and durations; never message text
//! (a panic's payload can hold text: it is never logged).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Full;
use crate::events::{impl_event, Counter, ErrorKind};

/// Counters of the delivery machinery, shared by every adapter of the process; moved
/// only by the events below.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Sends waited out and tried again (transient errors and 429s).
    pub delivery_retries: Counter,
    /// Replies given up: refused for good, or still failing after `max_retry_secs`.
    pub delivery_failed: Counter,
    /// Panics caught while translating or handling one update.
    pub update_panics: Counter,
    /// Updates moved out of the inbox after repeated panics.
    pub updates_parked: Counter,
    /// Updates refused because a queue was full (the user got a busy notice).
    pub overflow: Counter,
    /// Poller / gateway tasks restarted after they died.
    pub task_restarts: Counter,
    /// Telegram webhook requests answered 200 without an update: unparseable bodies.
    pub webhook_malformed: Counter,
    /// Telegram webhook requests refused 401: a missing or wrong secret token.
    pub webhook_unauthorized: Counter,
}

/// A point-in-time copy of [`DeliveryStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub delivery_retries: u64,
    pub delivery_failed: u64,
    pub update_panics: u64,
    pub updates_parked: u64,
    pub overflow: u64,
    pub task_restarts: u64,
    pub webhook_malformed: u64,
    pub webhook_unauthorized: u64,
}

impl DeliveryStats {
    pub fn snapshot(&self) -> DeliveryCounts {
        let get = |c: &Counter| c.load(Ordering::Relaxed);
        DeliveryCounts {
            delivery_retries: get(&self.delivery_retries),
            delivery_failed: get(&self.delivery_failed),
            update_panics: get(&self.update_panics),
            updates_parked: get(&self.updates_parked),
            overflow: get(&self.overflow),
            task_restarts: get(&self.task_restarts),
            webhook_malformed: get(&self.webhook_malformed),
            webhook_unauthorized: get(&self.webhook_unauthorized),
        }
    }
}

/// A send failed and is tried again after `wait`.
pub struct SendRetrying<'a> {
    pub wait: Duration,
    pub reason: &'a str,
}

impl_event!(SendRetrying<'_> => DeliveryStats, |self, stats| {
    let reason = self.reason;
    tracing::info!(retry_in = ?self.wait, %reason, "send failed; retrying");
    stats.delivery_retries.add(1);
});

/// Why a reply was given up.
pub enum GiveUp {
    /// The platform refused it for good (chat gone, bot blocked, bad request).
    Refused { platform: &'static str },
    /// Still failing after `delivery.max_retry_secs`.
    Expired { max_retry_secs: u64 },
}

/// A reply was given up.
pub struct DeliveryFailed<'a> {
    pub why: GiveUp,
    pub reason: &'a str,
}

impl_event!(DeliveryFailed<'_> => DeliveryStats, |self, stats| {
    let reason = self.reason;
    match self.why {
        GiveUp::Refused { platform } => {
            tracing::warn!(%reason, "{platform} refused the reply; dropping it");
        }
        GiveUp::Expired { max_retry_secs } => tracing::error!(
            error.kind = ErrorKind::DeliveryExpired.as_str(),
            %reason,
            max_retry_secs,
            "reply still not delivered after delivery.max_retry_secs; giving up"
        ),
    }
    stats.delivery_failed.add(1);
});

/// Where a panic was caught.
pub enum Panicked<'a> {
    /// Handling an inbox update (`tries` so far).
    Handling { key: &'a str, tries: u32 },
    /// Translating a platform update into an `Inbound` (the update is skipped).
    Translating { bot: &'a str, update: u64 },
    /// Taking in a Discord interaction (skipped).
    TakingInInteraction { bot: &'a str },
    /// Answering a Discord interaction.
    HandlingInteraction { bot: &'a str },
}

/// A panic was caught while translating or handling one update.
pub struct UpdatePanicked<'a> {
    pub at: Panicked<'a>,
}

impl_event!(UpdatePanicked<'_> => DeliveryStats, |self, stats| {
    let kind = ErrorKind::Panic.as_str();
    match self.at {
        Panicked::Handling { key, tries } => {
            tracing::error!(error.kind = kind, key, tries, "handling an update panicked")
        }
        Panicked::Translating { bot, update } => tracing::error!(
            error.kind = kind,
            bot,
            update,
            "translating an update panicked; skipped"
        ),
        Panicked::TakingInInteraction { bot } => tracing::error!(
            error.kind = kind,
            bot,
            "taking in an interaction panicked; skipped"
        ),
        Panicked::HandlingInteraction { bot } => {
            tracing::error!(error.kind = kind, bot, "handling an interaction panicked")
        }
    }
    stats.update_panics.add(1);
});

/// An update moved to `parked/…` after `tries` panics.
pub struct UpdateParked<'a> {
    pub key: &'a str,
    pub tries: u32,
}

impl_event!(UpdateParked<'_> => DeliveryStats, |self, stats| {
    let (key, tries) = (self.key, self.tries);
    let kind = ErrorKind::Panic.as_str();
    tracing::error!(error.kind = kind, key, tries, "update parked after repeated panics");
    stats.updates_parked.add(1);
});

/// What became of an update refused for a full queue.
pub enum Refused {
    /// The user gets the busy notice (at most once per conversation per minute).
    Noticed,
    /// A notice went to this conversation recently: refused silently.
    Silently,
    /// A Discord interaction answered with the busy notice.
    InteractionNoticed,
    /// A Discord interaction whose queue filled up after the check: dropped.
    InteractionDropped,
}

/// An update refused because a queue was full.
pub struct QueueOverflow<'a> {
    pub bot: &'a str,
    pub full: Full,
    pub refused: Refused,
}

impl_event!(QueueOverflow<'_> => DeliveryStats, |self, stats| {
    let (bot, full) = (self.bot, self.full);
    match self.refused {
        Refused::Noticed => {
            tracing::warn!(bot, ?full, "queue full; update refused with a busy notice")
        }
        Refused::Silently => tracing::debug!(bot, ?full, "queue full; update refused"),
        Refused::InteractionNoticed => tracing::warn!(
            bot,
            ?full,
            "queue full; interaction answered with a busy notice"
        ),
        Refused::InteractionDropped => {
            tracing::warn!(bot, ?full, "queue full; interaction dropped")
        }
    }
    stats.overflow.add(1);
});

/// A poller or gateway task ended (`panicked` or stopped) and restarts after `retry_in`.
pub struct TaskRestarted<'a> {
    pub task: &'a str,
    pub panicked: bool,
    pub retry_in: Duration,
}

impl_event!(TaskRestarted<'_> => DeliveryStats, |self, stats| {
    if self.panicked {
        let kind = ErrorKind::Panic.as_str();
        tracing::error!(error.kind = kind, task = self.task, retry_in = ?self.retry_in, "task panicked; restarting");
    } else {
        tracing::warn!(task = self.task, retry_in = ?self.retry_in, "task stopped; restarting");
    }
    stats.task_restarts.add(1);
});

/// Why the Telegram webhook turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookRefusal {
    /// A body that is no update (answered 200 so Telegram does not redeliver it).
    Malformed,
    /// No or a wrong `X-Telegram-Bot-Api-Secret-Token` (answered 401).
    Unauthorized,
}

/// A webhook request that carried no update we could take.
pub struct WebhookRefused<'a> {
    pub bot: &'a str,
    pub why: WebhookRefusal,
}

impl_event!(WebhookRefused<'_> => DeliveryStats, |self, stats| {
    match self.why {
        WebhookRefusal::Malformed => {
            tracing::warn!(bot = self.bot, "telegram webhook: a body that is no update; ignored");
            stats.webhook_malformed.add(1);
        }
        WebhookRefusal::Unauthorized => {
            tracing::warn!(target: "security", bot = self.bot, "telegram webhook: missing or wrong secret token; refused");
            stats.webhook_unauthorized.add(1);
        }
    }
});
