//! User data commands (`/export`, `/forget`) and operator commands (`/admin …`), with
//! every admin action — and every refused attempt — written to the audit tree.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use super::commands::{AdminCommand, ServiceAction, UserAction, UserArg};
use super::limits::{human_duration, limit_key, utc_day};
use super::{now_unix, Engine};
use crate::domain::{
    Attachment, Button, Inbound, Platform, Rejection, Reply, ReplyKind, UserRef, Visibility,
};
use crate::events::ErrorKind;
use crate::llm::BreakerState;
use crate::store::{AuditEntry, Ban, ForgetReport, StoreError, StoreResult, UserRecord};

/// How long a `/forget` waits for its confirmation.
pub const FORGET_WINDOW: Duration = Duration::from_secs(300);

/// Why an admin command that was allowed and understood could not be done.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Reload(String),
}

/// Everything stored about a user, as the JSON `/export` and `confab user export` return.
pub fn export_json(engine: &Engine, user: &UserRef) -> StoreResult<serde_json::Value> {
    let store = engine.store();
    let record = store.user(user)?;
    let conversations: Vec<_> = store
        .user_conversations(user)?
        .into_iter()
        .map(|(key, turns)| {
            json!({
                "bot": key.bot,
                "platform": key.platform,
                "chat": key.chat,
                "turns": turns,
            })
        })
        .collect();
    Ok(json!({
        "user": user.to_string(),
        "exported_at": chrono::Utc::now().to_rfc3339(),
        "profile": record,
        "conversations": conversations,
    }))
}

/// Deletes everything about a user: turns, record, usernames, cache entries they
/// originated, pending replies, their updates waiting in the inbox, limiter state, and
/// their id, names and words in the audit log. Used by `/forget` and `confab user forget`.
pub fn forget_user(engine: &Engine, user: &UserRef) -> StoreResult<ForgetReport> {
    let store = engine.store();
    let report = store.forget_user(user)?;
    forget_inbox(engine, user)?;
    for bot in &engine.config().bots {
        engine
            .limits()
            .reset(limit_key(&bot.name, &user.to_string()));
        engine
            .limits()
            .reset(limit_key(&bot.name, &super::commands_limit_user(user)));
    }
    engine.forget_requests_remove(user);
    Ok(report)
}

/// Runs store work that scans whole trees (forget, stats) without stalling the other
/// tasks of a runtime worker: on the multi-threaded runtime the worker hands its tasks
/// to others first (`block_in_place`). On a current-thread runtime it just runs.
pub(crate) fn offload<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `/admin ban` → "/admin ban": the command and its subcommand word, if it is one.
fn refused_command_name(text: &str) -> String {
    let mut words = text.split_whitespace();
    let first: String = words.next().unwrap_or("").chars().take(40).collect();
    let sub = words
        .next()
        .filter(|w| w.len() <= 16 && w.chars().all(|c| c.is_ascii_lowercase()));
    match sub {
        Some(sub) => format!("{first} {sub}"),
        None => first,
    }
}

/// Inbox entries are the adapters' JSON jobs, each with the domain `inbound` it carries.
/// The entry of the update being answered goes too (the adapter's remove is then a no-op).
fn forget_inbox(engine: &Engine, user: &UserRef) -> StoreResult<usize> {
    let store = engine.store();
    let platform = serde_json::to_value(user.platform).unwrap_or_default();
    let mut n = 0;
    for (key, bytes) in store.inbox_scan("")? {
        let Ok(job) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let inbound = &job["inbound"];
        if inbound["platform"] == platform && inbound["user_id"].as_str() == Some(&user.id) {
            store.inbox_remove(&key)?;
            n += 1;
        }
    }
    Ok(n)
}

pub fn describe_forget(r: &ForgetReport) -> String {
    format!(
        "Deleted: {} messages in {} conversations, {} cached replies{}.",
        r.turns,
        r.conversations,
        r.cache_entries,
        if r.user_record {
            ", your profile and usage"
        } else {
            ""
        }
    )
}

impl Engine {
    pub(super) fn export(&self, inbound: &Inbound) -> StoreResult<Reply> {
        let user = inbound.user();
        let doc = export_json(self, &user)?;
        let bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|e| StoreError::Io(format!("encode export: {e}")))?;
        let turns: usize = doc["conversations"].as_array().map_or(0, |c| {
            c.iter()
                .map(|c| c["turns"].as_array().map_or(0, Vec::len))
                .sum()
        });
        Ok(Reply::Text {
            text: format!("Here is everything stored about you ({turns} messages)."),
            kind: ReplyKind::Command,
            attachment: Some(Attachment {
                file_name: format!("confab-export-{}-{}.json", user.platform.prefix(), user.id),
                bytes,
                voice: false,
            }),
            buttons: Vec::new(),
            // `commands::COMMANDS` decides who may read it.
            visibility: Visibility::default(),
        })
    }

    pub(super) fn forget(&self, inbound: &Inbound, confirm: Option<bool>) -> StoreResult<Reply> {
        let user = inbound.user();
        let text = match confirm {
            None => {
                self.forget_requests_insert(user);
                return Ok(Reply::Text {
                    text: format!(
                        "This deletes all your data: every conversation with me, your usage and cached answers. It cannot be undone.\nPress Confirm, or send /forget confirm within {}.",
                        human_duration(FORGET_WINDOW.as_secs())
                    ),
                    kind: ReplyKind::Command,
                    attachment: None,
                    buttons: vec![
                        Button {
                            label: "Confirm: delete my data".into(),
                            command: "/forget confirm".into(),
                        },
                        Button {
                            label: "Cancel".into(),
                            command: "/forget cancel".into(),
                        },
                    ],
                    visibility: Visibility::default(),
                });
            }
            Some(false) => {
                self.forget_requests_remove(&user);
                "Cancelled: nothing was deleted.".to_string()
            }
            Some(true) if self.forget_requests_take(&user) => {
                let report = offload(|| forget_user(self, &user))?;
                tracing::info!(target: "audit", "a user deleted their data");
                describe_forget(&report)
            }
            Some(true) => "Nothing to confirm: send /forget first.".to_string(),
        };
        Ok(Reply::text(text, ReplyKind::Command))
    }

    fn audit(&self, actor: &UserRef, command: &str, target: Option<String>, result: &str) {
        let entry = AuditEntry {
            at: now_unix(),
            actor: actor.to_string(),
            command: command.to_string(),
            target,
            result: result.to_string(),
        };
        if let Err(e) = self.store().audit_append(&entry) {
            tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not write the audit log");
        }
    }

    /// Finds the user an admin means. `@name` looks on the admin's own platform (both,
    /// from the terminal); `tg:@name` / `dc:@name` on the one named. `Ok(Err(text))`
    /// is the answer when nobody (or more than one user) matches.
    fn resolve(&self, arg: &UserArg, from: Platform) -> StoreResult<Result<UserRef, String>> {
        let (platform, name) = match arg {
            UserArg::Ref(r) => return Ok(Ok(r.clone())),
            UserArg::Username { platform, name } => (*platform, name),
        };
        let platforms: &[Platform] = match (platform, from) {
            (Some(Platform::Telegram), _) | (None, Platform::Telegram) => &[Platform::Telegram],
            (Some(Platform::Discord), _) | (None, Platform::Discord) => &[Platform::Discord],
            _ => &[Platform::Telegram, Platform::Discord],
        };
        let mut found = Vec::new();
        for p in platforms {
            found.extend(self.store().find_username(*p, name)?);
        }
        Ok(match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!(
                "I don't know {arg}: use tg:<id> or dc:<id>, or tg:@name / dc:@name for another platform."
            )),
            _ => Err(format!(
                "@{name} is {}: say tg:@{name} or dc:@{name}.",
                found
                    .iter()
                    .map(UserRef::to_string)
                    .collect::<Vec<_>>()
                    .join(" and ")
            )),
        })
    }

    /// `tg:123 (@vip, "Ann")`: whom an admin answer is about.
    fn describe(&self, user: &UserRef) -> String {
        match self.store().user(user) {
            Ok(Some(r)) => {
                let mut parts = Vec::new();
                parts.extend(r.username.map(|u| format!("@{u}")));
                parts.extend(r.name.map(|n| format!("{n:?}")));
                match parts.is_empty() {
                    true => user.to_string(),
                    false => format!("{user} ({})", parts.join(", ")),
                }
            }
            Ok(None) => format!("{user} (never seen)"),
            Err(_) => format!("{user} (record unreadable)"),
        }
    }

    /// An operator command from someone who is not one: a security log line, an audit
    /// entry and a refusal.
    pub(super) fn refuse_admin(&self, inbound: &Inbound, text: &str) -> Reply {
        let actor = inbound.user();
        tracing::warn!(target: "security", actor = %actor, "admin command refused for a non-admin");
        // Only the command's name: a stranger's text is not ours to keep.
        self.audit(
            &actor,
            &refused_command_name(text),
            None,
            "refused: not an admin",
        );
        Reply::notice(
            Rejection::NotAdmin,
            "Sorry, admin commands are for operators only.",
        )
    }

    /// `/admin …` from an operator: every attempt is audited, and every answer about a
    /// user names whom it resolved.
    pub(super) fn admin(
        &self,
        inbound: &Inbound,
        text: &str,
        parsed: Result<AdminCommand, String>,
    ) -> StoreResult<Reply> {
        let actor = inbound.user();
        let command_text: String = text.chars().take(200).collect();
        let cmd = match parsed {
            Ok(cmd) => cmd,
            Err(usage) => {
                self.audit(&actor, &command_text, None, "bad arguments");
                return Ok(Reply::notice(Rejection::BadCommand, usage));
            }
        };
        let (target, outcome) = match &cmd {
            AdminCommand::OnUser { user: arg, action } => {
                let user = match self.resolve(arg, actor.platform)? {
                    Ok(user) => user,
                    Err(msg) => {
                        self.audit(&actor, &command_text, Some(arg.to_string()), "unknown user");
                        return Ok(Reply::notice(Rejection::BadCommand, msg));
                    }
                };
                let outcome = self.run_on_user(&actor, action, &user);
                (Some(user), outcome)
            }
            AdminCommand::Service(action) => (None, self.run_service(action)),
        };
        let (reply, result) = match outcome {
            Ok(reply) => (reply, "ok".to_string()),
            Err(e) => (format!("Failed: {e}"), format!("error: {e}")),
        };
        self.audit(
            &actor,
            &command_text,
            target.as_ref().map(UserRef::to_string),
            &result,
        );
        Ok(Reply::text(reply, ReplyKind::Command))
    }

    /// The admin commands about one user; every answer names whom it resolved.
    fn run_on_user(
        &self,
        actor: &UserRef,
        action: &UserAction,
        user: &UserRef,
    ) -> Result<String, AdminError> {
        let store = self.store();
        let who = self.describe(user);
        let update = |f: &mut dyn FnMut(&mut UserRecord)| store.update_user(user, f);
        Ok(match action {
            UserAction::Ban { reason } => {
                let reason = match reason.is_empty() {
                    true => "no reason given".to_string(),
                    false => reason.clone(),
                };
                update(&mut |r| {
                    r.banned = Some(Ban {
                        reason: reason.clone(),
                        by: actor.to_string(),
                        at: now_unix(),
                        notified: false,
                    })
                })?;
                format!("Banned {who}: {reason}.")
            }
            UserAction::Unban => {
                update(&mut |r| r.banned = None)?;
                format!("Unbanned {who}.")
            }
            UserAction::Limit {
                per_minute,
                daily_tokens,
            } => {
                update(&mut |r| {
                    r.limit_per_minute = Some(*per_minute);
                    if daily_tokens.is_some() {
                        r.limit_daily_tokens = *daily_tokens;
                    }
                })?;
                match daily_tokens {
                    Some(d) => format!("{who}: {per_minute} messages/minute, {d} tokens/day."),
                    None => format!("{who}: {per_minute} messages/minute."),
                }
            }
            UserAction::LimitReset => {
                update(&mut |r| {
                    r.limit_per_minute = None;
                    r.limit_daily_tokens = None;
                })?;
                format!("{who}: back to the configured limits.")
            }
            UserAction::Reset => {
                let mut turns = 0;
                let convs = store.user_conversations(user)?;
                for (key, _) in &convs {
                    turns += store.clear_conversation(key)?;
                }
                format!(
                    "Cleared {turns} messages in {} conversations of {who}.",
                    convs.len()
                )
            }
            UserAction::Whois => self.whois_text(user)?,
        })
    }

    /// The admin commands about the whole service.
    fn run_service(&self, action: &ServiceAction) -> Result<String, AdminError> {
        let store = self.store();
        Ok(match action {
            ServiceAction::Stats => offload(|| self.stats_text())?,
            ServiceAction::CacheStats => {
                let s = &self.stats;
                let (hits, misses) = (
                    s.cache_hits.load(Ordering::Relaxed),
                    s.cache_misses.load(Ordering::Relaxed),
                );
                format!(
                    "Cache: {} entries, {hits} hits, {misses} misses ({}), {} tokens saved.",
                    store.cache_len(),
                    percent(hits, hits + misses),
                    s.cache_tokens_saved.load(Ordering::Relaxed)
                )
            }
            ServiceAction::CacheClear => {
                let n = store.cache_clear()?;
                format!("Cache cleared ({n} entries).")
            }
            ServiceAction::Reload => {
                self.reload_now().map_err(AdminError::Reload)?;
                let cfg = self.config();
                format!(
                    "Reloaded: {} bots, {} prompts.",
                    cfg.bots.len(),
                    cfg.prompts.len()
                )
            }
            ServiceAction::MaintenanceOn { message } => {
                let msg = message.clone().unwrap_or_else(|| {
                    "The assistant is down for maintenance. Please try again later.".into()
                });
                self.set_maintenance(Some(msg.clone()));
                format!("Maintenance on. Non-admins now get: {msg}")
            }
            ServiceAction::MaintenanceOff => {
                self.set_maintenance(None);
                "Maintenance off.".to_string()
            }
            ServiceAction::Audit { n } => audit_text(&store.audit_recent(*n)?),
        })
    }

    fn stats_text(&self) -> StoreResult<String> {
        let store = self.store();
        let today = utc_day(now_unix());
        let (mut users, mut active_today, mut messages_today) = (0u64, 0u64, 0u64);
        store.for_each_user(&mut |r| {
            users += 1;
            if r.usage.day == today {
                active_today += 1;
                messages_today += r.usage.messages;
            }
        })?;
        let s = &self.stats;
        let outcomes = s
            .outcomes()
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let (hits, misses) = (
            s.cache_hits.load(Ordering::Relaxed),
            s.cache_misses.load(Ordering::Relaxed),
        );
        let llm = &self.llm().stats;
        let circuit = match self.llm().breaker_state() {
            BreakerState::Closed => "closed",
            BreakerState::Open => "OPEN",
            BreakerState::HalfOpen => "half-open",
        };
        let images: u64 = s
            .media
            .snapshot()
            .iter()
            .filter(|((kind, outcome), _)| *kind == "image" && *outcome == "read")
            .map(|(_, n)| n)
            .sum();
        let p95 = s
            .latency_quantile(0.95)
            .map_or("n/a".to_string(), |v| format!("≤ {v} s"));
        Ok(format!(
            "Uptime {}\nUsers {users} ({active_today} active today), messages today {messages_today}\nReplies: {}\nCache hit rate {} ({hits} hits), {} tokens saved\nLLM calls {}, errors {}, retries {}; circuit {circuit}\np95 reply latency {p95}\nMedia: {} s of audio transcribed, {images} images read",
            human_duration(self.uptime().as_secs()),
            if outcomes.is_empty() { "none yet".to_string() } else { outcomes },
            percent(hits, hits + misses),
            s.cache_tokens_saved.load(Ordering::Relaxed),
            llm.requests.load(Ordering::Relaxed),
            llm.errors.load(Ordering::Relaxed),
            llm.retries.load(Ordering::Relaxed),
            s.media.audio_secs.get(),
        ))
    }

    fn whois_text(&self, user: &UserRef) -> StoreResult<String> {
        let store = self.store();
        let Some(r) = store.user(user)? else {
            return Ok(format!("{user}: never seen."));
        };
        let convs = store.user_conversations(user)?;
        let turns: usize = convs.iter().map(|(_, t)| t.len()).sum();
        let date = |t: i64| {
            chrono::DateTime::from_timestamp(t, 0)
                .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "-".into())
        };
        let today = utc_day(now_unix());
        Ok(format!(
            "{user}: {}{}\nfirst seen {}, last seen {}\n{} conversations, {turns} stored messages\ntokens today {}, total {}; messages total {}\nlimits: {}\n{}",
            r.name.as_deref().unwrap_or("(no name)"),
            r.username.as_ref().map(|u| format!(" @{u}")).unwrap_or_default(),
            date(r.first_seen),
            date(r.last_seen),
            convs.len(),
            if r.usage.day == today { r.usage.tokens } else { 0 },
            r.usage.total_tokens,
            r.usage.total_messages,
            match (r.limit_per_minute, r.limit_daily_tokens) {
                (None, None) => "configured defaults".to_string(),
                (p, d) => format!(
                    "{} msg/min, {} tokens/day",
                    p.map_or("default".into(), |v| v.to_string()),
                    d.map_or("default".into(), |v| v.to_string())
                ),
            },
            match &r.banned {
                Some(b) => format!("BANNED by {} ({})", b.by, b.reason),
                None => "not banned".to_string(),
            }
        ))
    }
}

fn audit_text(entries: &[AuditEntry]) -> String {
    if entries.is_empty() {
        return "The audit log is empty.".to_string();
    }
    entries
        .iter()
        .map(|e| {
            let when = chrono::DateTime::from_timestamp(e.at, 0)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            format!(
                "{when} {} {}{} → {}",
                e.actor,
                e.command,
                e.target
                    .as_ref()
                    .map(|t| format!(" [{t}]"))
                    .unwrap_or_default(),
                e.result
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "n/a".to_string()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

#[cfg(test)]
mod offload_tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// With one runtime worker, a whole-tree scan run through `offload` must not stall
    /// the other tasks (a plain blocking call would hold the only worker).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_long_scan_does_not_stall_the_runtime() {
        let scan = tokio::spawn(async {
            // Queued on this worker while it runs the scan.
            let flag = Arc::new(AtomicBool::new(false));
            let seen = flag.clone();
            tokio::spawn(async move { seen.store(true, Ordering::SeqCst) });
            super::offload(|| {
                let until = Instant::now() + Duration::from_secs(5);
                while !flag.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                flag.load(Ordering::SeqCst)
            })
        });
        let progressed = scan.await.expect("scan task");
        assert!(progressed, "other tasks ran while the scan blocked");
    }
}
