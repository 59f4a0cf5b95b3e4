//! Telegram adapter on teloxide — the only module that imports teloxide.
//!
//! Own long-polling loop (not teloxide's dispatcher) so that delivery is exactly what we
//! promise: each received update is written to the durable inbox *before* its offset is
//! confirmed to Telegram, replayed from there after a crash, and removed once answered.
//! The engine's handled-update markers make a replay answer at most once more (only a
//! reply that was being sent at the moment of the crash can repeat). Queuing, retries
//! and the finish are `delivery.rs`'s; this module translates and renders (`TgOut`).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use teloxide::payloads::GetUpdatesSetters;
use teloxide::requests::Requester;
use teloxide::types::{BotCommand, Me, MessageEntityKind, Update, UpdateKind};
use teloxide::{ApiError, Bot, RequestError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::{Admission, Delivery, DeliveryStats};
use super::events::{Panicked, UpdatePanicked};
use super::{redact, IdentityError, Throttle};
use crate::config::{BotConfig, Config, Secret, TelegramMode};
use crate::domain::{Content, Inbound, Media, Platform};
use crate::engine::commands;
use crate::engine::Engine;
use crate::events::{ErrorKind, Event};
use crate::store::InboxStore;

mod media;
mod out;
pub mod webhook;
use out::{scrub, TgOut};

/// Telegram's limit is 4096; leave room for HTML entities added by formatting.
const SPLIT_AT: usize = 3800;
const TG_LIMIT: usize = 4096;
/// Long-poll timeout; teloxide's HTTP client gives up at 17 s.
const POLL_SECS: u32 = 10;

/// A bot whose token was checked against the configured identity.
pub struct Verified {
    pub name: String,
    pub bot: Bot,
    pub me: Me,
    token: Secret,
}

fn tg_bot(cfg: &Config, token: &Secret) -> Result<Bot, String> {
    let url = reqwest_url(&cfg.telegram.api_url)?;
    // teloxide's settings (timeouts, nodelay), plus a bound on idle keep-alive
    // connections: a burst of replies must not leave hundreds of sockets and their
    // buffers behind (SPEC §13 memory).
    let client = teloxide::net::default_reqwest_settings()
        .pool_max_idle_per_host(IDLE_CONNECTIONS)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        // reqwest's error text names no URL or token here (nothing was requested yet)
        .map_err(|e| format!("building the Telegram HTTP client: {e}"))?;
    Ok(Bot::with_client(token.expose(), client).set_api_url(url))
}

/// Idle keep-alive connections kept to the Bot API.
const IDLE_CONNECTIONS: usize = 256;

fn reqwest_url(s: &str) -> Result<url::Url, String> {
    url::Url::parse(s).map_err(|e| format!("telegram.api_url {s:?}: {e}"))
}

/// Asks Telegram who the token belongs to (getMe) and refuses a token of another bot —
/// above all, a production token in staging.
pub async fn verify(cfg: &Config, bot_cfg: &BotConfig) -> Result<Verified, IdentityError> {
    let err = IdentityError::of(&bot_cfg.name, "telegram");
    let (tg, token, expected) =
        super::identity_inputs(cfg.env, bot_cfg.telegram.as_ref(), "telegram", "username")
            .map_err(err)?;
    let bot = tg_bot(cfg, &token).map_err(err)?;
    let me = match bot.get_me().await {
        Ok(me) => me,
        Err(RequestError::Api(ApiError::InvalidToken)) => {
            return Err(err(format!(
                "the token in {} was refused by Telegram (Unauthorized)",
                tg.token_env
            )))
        }
        Err(e) => {
            return Err(err(format!(
                "could not ask Telegram who the token in {} belongs to: {}",
                tg.token_env,
                redact(&format!("{e:?}"), token.expose())
            )))
        }
    };
    let found = me.user.username.clone().unwrap_or_default();
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if let Some((whose, hint)) = super::identity_mismatch(cfg.env, tg, expected, &found, same) {
        return Err(err(format!(
            "the token in {} belongs to @{found}{whose}, but {} expects @{expected}{hint}",
            tg.token_env, cfg.env
        )));
    }
    Ok(Verified {
        name: bot_cfg.name.clone(),
        bot,
        me,
        token,
    })
}

/// A received update, as kept in the durable inbox until answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    inbound: Inbound,
    chat_id: i64,
    /// The user's message; replies in groups quote it.
    message_id: i32,
    is_group: bool,
    /// Set when the job is a button press (answered with answerCallbackQuery).
    #[serde(default)]
    callback_id: Option<String>,
}

pub struct TelegramAdapter {
    name: String,
    bot: Bot,
    me: Me,
    token: Secret,
    delivery: Arc<Delivery<TgOut>>,
    /// Whether this instance may poll now (always, or while it holds the bot's lease).
    poll_gate: Arc<dyn crate::coord::PollGate>,
    /// Set once polling works (or while standing by healthy for the polling lease);
    /// read by readiness checks.
    pub connected: Arc<AtomicBool>,
}

impl TelegramAdapter {
    pub fn new(v: Verified, engine: Arc<Engine>, stats: Arc<DeliveryStats>) -> Arc<Self> {
        let cfg = engine.config();
        let t = &cfg.telegram;
        let out = Arc::new(TgOut {
            bot: v.bot.clone(),
            token: v.token.clone(),
            username: v.me.user.username.clone().unwrap_or_default(),
            throttle: Throttle::new(
                t.per_chat_per_minute,
                t.group_per_minute,
                t.global_per_second,
            ),
        });
        let prefix = format!("tg/{}/", v.name);
        let poll_gate = engine
            .coordination()
            .poll_gate(&format!("telegram/{}", v.name));
        let files = media::TgMedia {
            bot: v.bot.clone(),
            token: v.token.clone(),
        };
        engine.set_media_source(Platform::Telegram, &v.name, Arc::new(files));
        let delivery = Delivery::new(out, engine, stats, &v.name, prefix, Duration::ZERO);
        Arc::new(Self {
            name: v.name,
            bot: v.bot,
            me: v.me,
            token: v.token,
            delivery,
            poll_gate,
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The bot's name (its `bots/<name>.toml`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn scrub(&self, e: &RequestError) -> String {
        scrub(e, &self.token)
    }

    fn inbox_key(&self, update_id: u32) -> String {
        format!("tg/{}/{:020}", self.name, update_id)
    }

    fn offset_key(&self) -> String {
        format!("tg_offset/{}", self.name)
    }

    /// Registers commands, replays the inbox, then polls until `stop` is cancelled.
    /// Handlers run on `tracker` so shutdown can wait for in-flight replies. A restart
    /// (after a panic) replays again; updates already queued are not queued twice.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, tracker: TaskTracker) {
        self.delivery.attach(stop.clone());
        self.delivery.watch_orphans(&tracker);
        // The menu everyone sees: the user commands, as declared.
        let commands: Vec<BotCommand> = commands::user_commands()
            .map(|spec| BotCommand::new(spec.name, spec.help))
            .collect();
        if let Err(e) = self.bot.set_my_commands(commands).await {
            tracing::warn!(bot = %self.name, error = %self.scrub(&e), "setMyCommands failed");
        }
        if let TelegramMode::Webhook(hook) = &self.delivery.engine().config().telegram_mode {
            self.delivery.replay(&tracker).await;
            return self.run_webhook(hook, stop).await;
        }
        // A webhook left by webhook mode would make getUpdates fail (409).
        if let Err(e) = self.bot.delete_webhook().await {
            tracing::warn!(bot = %self.name, error = %self.scrub(&e), "deleteWebhook failed");
        }
        // With Redis coordination one instance polls a bot (a lease) and the others
        // stand by; each turn starts from the stored offset and replays the inbox (a
        // takeover answers what the previous holder received but never answered). A
        // healthy standby reads as connected (ready to take over); a holder as long as
        // its getUpdates works.
        while let Some(turn) = self.poll_gate.wait_turn(&stop, &self.connected).await {
            self.delivery.replay(&tracker).await;
            self.poll(&turn.token, &tracker).await;
        }
        self.connected.store(false, Ordering::Relaxed);
        tracing::info!(bot = %self.name, "telegram polling stopped");
    }

    /// Long-polls until `held` is cancelled (shutdown, or the polling lease lost).
    async fn poll(&self, held: &CancellationToken, tracker: &TaskTracker) {
        let store = self.delivery_store();
        let mut offset: i32 = store
            .intake_position(&self.offset_key())
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut backoff = Duration::from_millis(500);
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        while !held.is_cancelled() {
            // Bounded intake: no new updates while the queues are full.
            if self.delivery.saturated() {
                tokio::select! {
                    _ = held.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
            let poll = self
                .bot
                .get_updates()
                .offset(offset)
                .timeout(POLL_SECS)
                .allowed_updates(webhook::ALLOWED);
            let result = tokio::select! {
                _ = held.cancelled() => break,
                _ = prune.tick() => { self.delivery.out().throttle.prune(); continue; }
                r = poll => r,
            };
            let updates = match result {
                Ok(u) => {
                    self.connected.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    u
                }
                Err(e) => {
                    let wait = match &e {
                        RequestError::RetryAfter(s) => s.duration(),
                        _ => {
                            self.connected.store(false, Ordering::Relaxed);
                            tracing::warn!(bot = %self.name, error = %self.scrub(&e), retry_in = ?backoff, "getUpdates failed");
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            backoff / 2
                        }
                    };
                    tokio::select! {
                        _ = held.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            offset = self.intake(updates, offset, tracker).await;
        }
    }

    fn delivery_store(&self) -> Arc<dyn InboxStore> {
        self.delivery.inbox().clone()
    }

    /// One getUpdates batch: translate, store in the inbox and queue (or refuse with a
    /// busy notice), then confirm the new offset. Returns the new offset.
    async fn intake(&self, updates: Vec<Update>, mut offset: i32, tracker: &TaskTracker) -> i32 {
        if updates.is_empty() {
            return offset;
        }
        for update in updates {
            let id = update.id.0;
            offset = offset.max(i32::try_from(id).unwrap_or(i32::MAX).saturating_add(1));
            // Durable before Telegram is told (by the next poll's offset) to forget it.
            self.take(update, tracker, false);
        }
        let store = self.delivery_store();
        if let Err(e) = store.flush().await {
            tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "store flush failed; not confirming updates");
            return offset;
        }
        if let Err(e) = store.set_intake_position(&self.offset_key(), offset.to_string().as_bytes())
        {
            tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not store the update offset");
        }
        offset
    }

    /// One received update (polled or pushed): translated (a panic there is caught and
    /// counted, the update skipped) and admitted to the inbox and queue. `None`: nothing
    /// for the bot. `must_store`: see [`Delivery::take_in`].
    fn take(&self, update: Update, tracker: &TaskTracker, must_store: bool) -> Option<Admission> {
        let id = update.id.0;
        let translated =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.translate(id, update.kind)));
        match translated {
            Ok(Some(job)) => {
                let key = self.inbox_key(id);
                Some(self.delivery.take_in(key, job, tracker, must_store))
            }
            Ok(None) => None,
            Err(_) => {
                let at = Panicked::Translating {
                    bot: &self.name,
                    update: u64::from(id),
                };
                UpdatePanicked { at }.emit(self.delivery.stats());
                None
            }
        }
    }

    fn translate(&self, update_id: u32, kind: UpdateKind) -> Option<Job> {
        let msg = match kind {
            UpdateKind::Message(msg) => msg,
            UpdateKind::CallbackQuery(q) => return self.translate_button(update_id, q),
            _ => return None,
        };
        let from = msg.from.as_ref()?;
        if from.is_bot {
            return None;
        }
        let is_private = msg.chat.is_private();
        let me_name = self.me.user.username.as_deref().unwrap_or_default();
        let mut content = match (msg.text(), media::of_message(&msg)) {
            (Some(t), _) => Content::Text(t.to_string()),
            (None, Some(media)) => Content::Media(media),
            (None, None) => Content::NonText,
        };
        if !is_private {
            // A caption mentions the bot like a text does.
            let text = msg.text().or(msg.caption()).unwrap_or_default();
            let mentioned = msg
                .entities()
                .or(msg.caption_entities())
                .unwrap_or_default()
                .iter()
                .any(|e| match &e.kind {
                    MessageEntityKind::Mention => entity_text(text, e.offset, e.length)
                        .is_some_and(|t| t.trim_start_matches('@').eq_ignore_ascii_case(me_name)),
                    MessageEntityKind::TextMention { user } => user.id == self.me.user.id,
                    _ => false,
                });
            let replied_to_me = msg
                .reply_to_message()
                .and_then(|r| r.from.as_ref())
                .is_some_and(|u| u.id == self.me.user.id);
            let command_for_me = msg.text().is_some_and(|t| {
                let first = t.split_whitespace().next().unwrap_or("");
                first.starts_with('/')
                    && first
                        .split_once('@')
                        .is_none_or(|(_, to)| to.eq_ignore_ascii_case(me_name))
            });
            if !(mentioned || replied_to_me || command_for_me) {
                return None;
            }
            match &mut content {
                Content::Text(t) => *t = strip_mention(t, me_name),
                Content::Media(Media {
                    caption: Some(c), ..
                }) => *c = strip_mention(c, me_name),
                _ => {}
            }
        }
        Some(Job {
            inbound: Inbound {
                bot: self.name.clone(),
                platform: Platform::Telegram,
                update_id: Some(update_id.to_string()),
                chat_id: msg.chat.id.0.to_string(),
                user_id: from.id.0.to_string(),
                user_name: from.first_name.clone(),
                username: from.username.clone(),
                is_private,
                forwarded: msg.forward_origin().is_some(),
                content,
            },
            chat_id: msg.chat.id.0,
            message_id: msg.id.0,
            is_group: !is_private,
            callback_id: None,
        })
    }

    /// A press on one of our buttons is the user sending the button's command.
    fn translate_button(&self, update_id: u32, q: teloxide::types::CallbackQuery) -> Option<Job> {
        let data = q.data.clone()?;
        let message = q.message.as_ref()?;
        let chat = message.chat();
        Some(Job {
            inbound: Inbound {
                bot: self.name.clone(),
                platform: Platform::Telegram,
                update_id: Some(update_id.to_string()),
                chat_id: chat.id.0.to_string(),
                user_id: q.from.id.0.to_string(),
                user_name: q.from.first_name.clone(),
                username: q.from.username.clone(),
                is_private: chat.is_private(),
                forwarded: false,
                content: Content::Text(data),
            },
            chat_id: chat.id.0,
            message_id: message.id().0,
            is_group: !chat.is_private(),
            callback_id: Some(q.id.0.clone()),
        })
    }
}

/// Removes every `@me` (ASCII case-insensitive, the whole username) from a group message so
/// the LLM sees only the question. It works on the original text's char boundaries: a
/// lowercased copy can have other byte offsets (`Ω` shrinks, `İ` grows), so nothing is ever
/// sliced at an offset found in another string.
pub(crate) fn strip_mention(text: &str, me: &str) -> String {
    if me.is_empty() {
        return text.to_string();
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        // '@' is one byte, so `at + 1` is a char boundary; `get` refuses any other.
        let after = &rest[at + 1..];
        let tail = after
            .get(..me.len())
            .filter(|name| name.eq_ignore_ascii_case(me))
            .and_then(|_| after.get(me.len()..))
            .filter(|tail| !tail.starts_with(name_char));
        out.push_str(&rest[..at]);
        match tail {
            Some(tail) => {
                out.push(' ');
                rest = tail;
            }
            None => {
                out.push('@');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    let joined = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.is_empty() {
        text.to_string()
    } else {
        joined
    }
}

/// The text a message entity covers. Telegram counts `offset` and `length` in UTF-16 code
/// units; `None` when they do not land on the text's char boundaries (or overflow), so a
/// malformed entity is ignored instead of panicking (teloxide's `parse_entities` asserts).
pub(crate) fn entity_text(text: &str, offset: usize, length: usize) -> Option<&str> {
    let end = offset.checked_add(length)?;
    let mut start_byte = None;
    let mut units = 0usize;
    let ends = text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')));
    for (byte, c) in ends {
        if units == offset {
            start_byte = Some(byte);
        }
        if units == end {
            return text.get(start_byte?..byte);
        }
        if units > end {
            return None;
        }
        units += c.len_utf16();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_mention() {
        assert_eq!(
            strip_mention("@Acme_Bot what is 2+2?", "acme_bot"),
            "what is 2+2?"
        );
        assert_eq!(strip_mention("hey @acme_bot, hi", "acme_bot"), "hey , hi");
        assert_eq!(strip_mention("@acme_bot", "acme_bot"), "@acme_bot");
        assert_eq!(
            strip_mention("@acme_botx @ACME_BOT!", "acme_bot"),
            "@acme_botx !"
        );
    }

    #[test]
    fn strips_the_mention_between_case_folding_characters() {
        // Lowercasing shrinks Ω (3 → 2 bytes) and grows İ (2 → 3 bytes): equal total
        // lengths, shifted offsets. This panicked the polling task.
        assert_eq!(
            strip_mention("ΩΩ @acme_bot İİ question", "acme_bot"),
            "ΩΩ İİ question"
        );
        assert_eq!(strip_mention("İ@Acme_Bot", "acme_bot"), "İ");
    }

    #[test]
    fn entity_text_counts_utf16_and_refuses_bad_offsets() {
        let t = "😀 @acme_bot hi";
        assert_eq!(entity_text(t, 3, 9), Some("@acme_bot"));
        assert_eq!(entity_text(t, 1, 2), None, "inside a surrogate pair");
        assert_eq!(entity_text(t, 3, 999), None);
        assert_eq!(entity_text(t, usize::MAX, 2), None);
        assert_eq!(entity_text(t, 0, 0), Some(""));
        assert_eq!(entity_text(t, 15, 0), Some(""));
    }
}
