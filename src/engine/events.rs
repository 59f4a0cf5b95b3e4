//! The engine's events (see [`crate::events`]): each logs and moves [`EngineStats`]
//! together. Fields are kinds, counts and durations, never message text.

use std::fmt::Display;
use std::time::Duration;

use super::stats::EngineStats;
use crate::domain::{Platform, Reply, ReplyKind};
use crate::events::{impl_event, ErrorKind};
use crate::llm::LlmError;

/// A message reached the engine.
pub struct MessageReceived {
    pub platform: Platform,
}

impl_event!(MessageReceived => EngineStats, |self, stats| {
    tracing::debug!(platform = self.platform.name(), "message received");
    stats.count_message(self.platform);
});

/// The engine decided a message's reply. Every message ends with exactly one.
pub struct ReplyDecided<'a> {
    pub reply: &'a Reply,
    /// Since the message reached the engine (the conversation's lock wait included).
    pub elapsed: Duration,
}

impl_event!(ReplyDecided<'_> => EngineStats, |self, stats| {
    let outcome = self.reply.outcome();
    let ms = self.elapsed.as_millis() as u64;
    tracing::debug!(outcome, elapsed_ms = ms, "reply decided");
    stats.count_outcome(outcome);
    // The latency histogram is about answers (fresh or cached), not notices.
    if let Reply::Text {
        kind: ReplyKind::Answer | ReplyKind::Cached,
        ..
    } = self.reply
    {
        stats.observe_latency(self.elapsed);
    }
});

/// An answered exchange (turns, pending reply, usage) was written atomically (one sled batch or one Redis script)
/// and made durable by the group-commit flush, in `elapsed`.
pub struct StoreWritten {
    pub elapsed: Duration,
}

impl_event!(StoreWritten => EngineStats, |self, stats| {
    let us = self.elapsed.as_micros() as u64;
    tracing::debug!(elapsed_us = us, "exchange stored");
    stats.store_write.observe(self.elapsed);
});

/// A redelivered update (counted as a duplicate either way).
pub enum Redelivered {
    /// Its reply was already sent: dropped.
    Dropped,
    /// Decided before a crash but never confirmed sent: its stored reply goes out
    /// again, without an LLM call.
    Resent,
}

impl_event!(Redelivered => EngineStats, |self, stats| {
    match self {
        Redelivered::Dropped => tracing::debug!("redelivered update dropped: its reply was sent"),
        Redelivered::Resent => tracing::info!("redelivered update: sending its stored reply again"),
    }
    stats.duplicates.add(1);
});

/// Which quota refused a message.
#[derive(Debug, Clone, Copy)]
pub enum Quota {
    Messages,
    Commands,
    /// The user's daily token budget is spent.
    DailyTokens,
}

/// A message refused by a quota: a rate limit or the daily token budget. `notice`: the
/// one notice of the window or day (else silence).
pub struct RateLimited {
    pub quota: Quota,
    pub notice: bool,
}

impl_event!(RateLimited => EngineStats, |self, stats| {
    let notice = self.notice;
    match self.quota {
        Quota::Messages => tracing::debug!(quota = "messages", notice, "rate limited"),
        Quota::Commands => tracing::debug!(quota = "commands", notice, "rate limited"),
        Quota::DailyTokens => tracing::debug!(notice, "daily token budget exhausted"),
    }
    stats.rate_limited.add(1);
});

/// A media message was read (transcribed, passed to the model) or refused.
pub struct MediaHandled {
    pub kind: crate::domain::MediaKind,
    pub outcome: super::media::MediaOutcome,
    /// Seconds of audio transcribed (0 unless read).
    pub audio_secs: u64,
}

impl_event!(MediaHandled => EngineStats, |self, stats| {
    let (kind, outcome) = (self.kind.as_str(), self.outcome.as_str());
    tracing::debug!(kind, outcome, audio_secs = self.audio_secs, "media handled");
    stats.media.count(self.kind, self.outcome);
    stats.media.audio_secs.add(self.audio_secs);
});

/// A reply served from the cache; the LLM tokens it had cost are saved.
pub struct CacheHit {
    pub tokens_saved: u64,
}

impl_event!(CacheHit => EngineStats, |self, stats| {
    tracing::debug!(tokens_saved = self.tokens_saved, "cache hit");
    stats.cache_hits.add(1);
    stats.cache_tokens_saved.add(self.tokens_saved);
});

/// No fresh cache entry for this context: the LLM is asked.
pub struct CacheMiss;

impl_event!(CacheMiss => EngineStats, |self, stats| {
    tracing::debug!("cache miss");
    stats.cache_misses.add(1);
});

/// The model said the context is too long: retried once with half the history.
pub struct ContextTooLong {
    pub history_tokens: u64,
}

impl_event!(ContextTooLong => EngineStats, |self, stats| {
    tracing::warn!(
        history_tokens = self.history_tokens,
        "context too long for the model; retrying with half the history"
    );
    stats.context_retries.add(1);
});

/// The LLM call failed after its retries; the user gets an apology.
pub struct LlmFailed<'a> {
    pub error: &'a LlmError,
}

impl_event!(LlmFailed<'_> => EngineStats, |self, stats| {
    let kind = self.error.kind();
    tracing::warn!(error = %self.error, kind, "LLM call failed; apologising");
    stats.llm_failures.add(kind, 1);
});

/// What failed inside confab itself (not the user, not the LLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternalCause {
    /// A store read or write while deciding: the user got the internal-error notice.
    Store,
    /// The system prompt did not render: the internal-error notice.
    Prompt,
    /// A message for a bot that is not configured (removed by a reload): silence.
    UnknownBot,
    /// A cache entry could not be stored: the reply still went out.
    CacheWrite,
    /// A sent reply could not be marked sent: a redelivery may send it again.
    MarkSent,
}

impl InternalCause {
    /// Every cause, in declaration order (`cause as usize` indexes it).
    pub const ALL: [InternalCause; 5] = [
        InternalCause::Store,
        InternalCause::Prompt,
        InternalCause::UnknownBot,
        InternalCause::CacheWrite,
        InternalCause::MarkSent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InternalCause::Store => "store",
            InternalCause::Prompt => "prompt",
            InternalCause::UnknownBot => "unknown_bot",
            InternalCause::CacheWrite => "cache_write",
            InternalCause::MarkSent => "mark_sent",
        }
    }

    /// The `error.kind` its log line carries.
    pub fn error_kind(self) -> ErrorKind {
        match self {
            InternalCause::Store | InternalCause::CacheWrite | InternalCause::MarkSent => {
                ErrorKind::StoreIo
            }
            InternalCause::Prompt => ErrorKind::Prompt,
            InternalCause::UnknownBot => ErrorKind::Config,
        }
    }

    fn message(self) -> &'static str {
        match self {
            InternalCause::Store => "store failure while handling a message",
            InternalCause::Prompt => "prompt rendering failed",
            InternalCause::UnknownBot => "message for a bot that is not configured",
            InternalCause::CacheWrite => "could not store a cache entry",
            InternalCause::MarkSent => "could not record a sent reply",
        }
    }
}

/// One of our own failures, with its error (store and template errors name no
/// message text).
pub struct InternalError<'a> {
    pub cause: InternalCause,
    pub error: &'a dyn Display,
}

impl_event!(InternalError<'_> => EngineStats, |self, stats| {
    let cause = self.cause.as_str();
    let kind = self.cause.error_kind().as_str();
    tracing::error!(error.kind = kind, cause, error = %self.error, "{}", self.cause.message());
    stats.count_internal(self.cause);
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    #[test]
    fn every_cause_indexes_its_own_counter() {
        for (i, cause) in InternalCause::ALL.iter().enumerate() {
            assert_eq!(*cause as usize, i, "{cause:?}");
        }
        let stats = EngineStats::default();
        InternalError {
            cause: InternalCause::Prompt,
            error: &"boom",
        }
        .emit(&stats);
        assert_eq!(stats.internal_errors(InternalCause::Prompt), 1);
        assert_eq!(stats.internal_errors(InternalCause::Store), 0);
    }
}
