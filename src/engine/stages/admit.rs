//! The stages before any LLM work: dedupe, gate (ban, maintenance, non-text), command,
//! admit (length, rate limit, daily budget).

use super::{stop, MessageCtx, Step};
use crate::domain::{Content, Rejection, Reply, ReplyKind};
use crate::engine::events::Redelivered;
use crate::engine::events::{Quota, RateLimited};
use crate::engine::limits::{human_duration, limit_key, secs_until_reset, utc_day, RateDecision};
use crate::engine::{commands, commands_limit_user, now_unix, roll_day, Engine};
use crate::engine::{MSG_BANNED, MSG_BUSY, MSG_NON_TEXT};
use crate::events::Event;
use crate::store::{Handled, HandledEntry, Usage};

impl Engine {
    /// Dedupe: an update already answered stops here. One sent before stays silent;
    /// one decided and stored before a crash but never confirmed sent gets its stored
    /// reply again, without asking the LLM (and without storing the turns twice).
    #[tracing::instrument(level = "debug", name = "dedupe", skip_all)]
    pub(super) fn dedupe(&self, update_key: Option<&str>) -> Step {
        let Some(key) = update_key else {
            return Ok(());
        };
        match self.store.handled(key)? {
            Some(HandledEntry {
                state: Handled::Sent,
                ..
            }) => {
                Redelivered::Dropped.emit(&self.stats);
                stop(Reply::Silent)
            }
            Some(HandledEntry {
                state: Handled::Pending { reply },
                ..
            }) => {
                Redelivered::Resent.emit(&self.stats);
                stop(Reply::text(reply, ReplyKind::Answer))
            }
            None => Ok(()),
        }
    }

    /// Gate: ban and maintenance come before anything else a user can trigger; then
    /// only text goes on (a note in private chats, silence in groups).
    #[tracing::instrument(level = "debug", name = "gate", skip_all)]
    pub(super) fn gate<'a>(&self, m: &mut MessageCtx<'a>) -> Step {
        m.record = self.store.user(&m.user)?;
        if let Some(ban) = m.record.as_ref().and_then(|r| r.banned.as_ref()) {
            if ban.notified {
                return stop(Reply::Silent);
            }
            self.store.update_user(&m.user, &mut |r| {
                if let Some(b) = r.banned.as_mut() {
                    b.notified = true;
                }
            })?;
            return stop(Reply::notice(Rejection::Banned, MSG_BANNED));
        }
        if let Some(msg) = self.maintenance() {
            if !m.admin {
                return stop(Reply::notice(Rejection::Maintenance, msg));
            }
        }
        let inbound: &'a crate::domain::Inbound = m.inbound;
        match &inbound.content {
            Content::Text(t) if !t.trim().is_empty() => {
                m.text = t.as_str();
                Ok(())
            }
            // Read after admit (the media stage): its text is not known yet.
            Content::Media(_) => Ok(()),
            _ if inbound.is_private => stop(Reply::notice(Rejection::NonText, MSG_NON_TEXT)),
            _ => stop(Reply::Silent),
        }
    }

    /// Command (route): a command is run and its answer ends the pipeline. Forwarded text
    /// is someone else's words: never run as a command. Commands have their own, more
    /// generous quota: cheap, but not free.
    #[tracing::instrument(level = "debug", name = "route", skip_all)]
    pub(super) async fn route(&self, m: &MessageCtx<'_>) -> Step {
        let Some(cmd) = commands::parse(m.text).filter(|_| !m.inbound.forwarded) else {
            return Ok(());
        };
        if !m.admin {
            let key = limit_key(&m.inbound.bot, &commands_limit_user(&m.user));
            let limits = &m.cfg.limits;
            let (per_minute, burst) = (limits.commands_per_minute, limits.commands_burst);
            self.rate_gate(Quota::Commands, key, per_minute, burst)
                .await?;
        }
        let reply = self.command(cmd, m.inbound, m.text, m.cfg, m.bot, m.record.as_ref())?;
        stop(reply)
    }

    /// Admit: the length check, then (for non-admins) the per-user rate limit and the
    /// daily token budget, each with one notice per window.
    #[tracing::instrument(level = "debug", name = "admit", skip_all)]
    pub(super) async fn admit(&self, m: &MessageCtx<'_>) -> Step {
        self.length_gate(m)?;
        if m.admin {
            return Ok(());
        }
        let limits = self.effective_limits(m.cfg, m.bot, m.record.as_ref());
        let key = limit_key(&m.inbound.bot, &m.user.to_string());
        self.rate_gate(Quota::Messages, key, limits.per_minute, limits.burst)
            .await?;
        self.budget_gate(m, limits.daily_tokens)
    }

    /// The length check (again after a voice note was transcribed).
    pub(super) fn length_gate(&self, m: &MessageCtx<'_>) -> Step {
        let chars = m.text.chars().count();
        let max = m.cfg.limits.max_input_chars;
        if chars > max {
            return stop(Reply::notice(
                Rejection::TooLong,
                format!(
                    "Your message is too long ({chars} chars, limit {max}). Please shorten it."
                ),
            ));
        }
        Ok(())
    }

    /// Goes on while the user has tokens left today; else one notice per day, then silence.
    fn budget_gate(&self, m: &MessageCtx<'_>, daily_tokens: u64) -> Step {
        let now = now_unix();
        let today = utc_day(now);
        let usage = todays_usage(m, today);
        if usage.map_or(0, |u| u.tokens) < daily_tokens {
            return Ok(());
        }
        let notified = usage.is_some_and(|u| u.budget_notified);
        self.day_spent(m, notified, |u| u.budget_notified = true, |reset| {
            format!(
                "You've used today's token budget ({daily_tokens} tokens). It resets in {} (midnight UTC).",
                human_duration(reset)
            )
        })
    }

    /// A daily budget is used up: the notice once per UTC day (`mark` records it in the
    /// user's usage; `notice` gets the seconds until midnight UTC), then silence.
    pub(super) fn day_spent(
        &self,
        m: &MessageCtx<'_>,
        notified: bool,
        mark: fn(&mut Usage),
        notice: impl FnOnce(u64) -> String,
    ) -> Step {
        let quota = Quota::DailyTokens;
        if notified {
            let notice = false;
            RateLimited { quota, notice }.emit(&self.stats);
            return stop(Reply::Silent);
        }
        let now = now_unix();
        let today = utc_day(now);
        self.store.update_user(&m.user, &mut |r| {
            roll_day(r, today);
            mark(&mut r.usage);
        })?;
        RateLimited {
            quota,
            notice: true,
        }
        .emit(&self.stats);
        stop(Reply::notice(
            Rejection::BudgetExhausted,
            notice(secs_until_reset(now) as u64),
        ))
    }

    /// Goes on while the key is within its quota; else the one notice per window, then
    /// silence. A shared limiter that cannot decide refuses with the busy apology.
    async fn rate_gate(&self, quota: Quota, key: u64, per_minute: u32, burst: u32) -> Step {
        let checked = self.coord.limiter.check(key, per_minute, burst).await;
        let Ok(decision) = checked else {
            // counted by the limiter (LimiterFailed): fail closed
            return stop(Reply::notice(Rejection::Busy, MSG_BUSY));
        };
        match decision {
            RateDecision::Allowed => Ok(()),
            RateDecision::Notify { retry_in } => {
                let notice = true;
                RateLimited { quota, notice }.emit(&self.stats);
                stop(Reply::notice(
                    Rejection::RateLimited,
                    format!(
                        "You're sending messages too fast. Try again in {}.",
                        human_duration(retry_in.as_secs_f64().ceil() as u64)
                    ),
                ))
            }
            RateDecision::Silent => {
                let notice = false;
                RateLimited { quota, notice }.emit(&self.stats);
                stop(Reply::Silent)
            }
        }
    }
}

/// The user's usage record, if it is of `today` (a UTC day number).
pub(super) fn todays_usage<'m>(m: &'m MessageCtx<'_>, today: i64) -> Option<&'m Usage> {
    m.record
        .as_ref()
        .map(|r| &r.usage)
        .filter(|u| u.day == today)
}
