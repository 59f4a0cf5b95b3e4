//! Telegram adapter on teloxide — the only module that imports teloxide.
//!
//! Own long-polling loop (not teloxide's dispatcher) so that delivery is exactly what we
//! promise: each received update is written to the durable inbox *before* its offset is
//! confirmed to Telegram, replayed from there after a crash, and removed once answered.
//! The engine's handled-update markers make a replay answer at most once more (only a
//! reply that was being sent at the moment of the crash can repeat).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use teloxide::payloads::{
    EditMessageTextSetters, GetUpdatesSetters, SendDocumentSetters, SendMessageSetters,
};
use teloxide::requests::Requester;
use teloxide::types::{
    AllowedUpdate, BotCommand, CallbackQueryId, ChatAction, ChatId, InlineKeyboardButton,
    InlineKeyboardMarkup, InputFile, Me, MessageEntityKind, MessageId, ParseMode, ReplyParameters,
    UpdateKind,
};
use teloxide::{ApiError, Bot, RequestError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::text::{markdown_to_telegram_html, split_message, utf16_len};
use super::{redact, stream_draft, DraftPut, SerialQueue, Throttle};
use crate::config::{BotConfig, Config, Secret};
use crate::domain::{Attachment, Button, Content, Inbound, Platform, Reply};
use crate::engine::commands::USER_COMMANDS;
use crate::engine::Engine;

/// Telegram's limit is 4096; leave room for HTML entities added by formatting.
const SPLIT_AT: usize = 3800;
const TG_LIMIT: usize = 4096;
/// Long-poll timeout; teloxide's HTTP client gives up at 17 s.
const POLL_SECS: u32 = 10;
const SEND_ATTEMPTS: u32 = 5;
/// Streaming edits: at most one per this interval per chat.
const EDIT_EVERY: Duration = Duration::from_secs(1);

/// A bot whose token was checked against the configured identity.
pub struct Verified {
    pub name: String,
    pub bot: Bot,
    pub me: Me,
    token: Secret,
}

/// Why a Telegram bot may not start (exit code 2: a configuration problem).
#[derive(Debug, thiserror::Error)]
#[error("bots/{bot}.toml: telegram: {message}")]
pub struct IdentityError {
    pub bot: String,
    pub message: String,
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
    let err = |message: String| IdentityError {
        bot: bot_cfg.name.clone(),
        message,
    };
    let Some(tg) = &bot_cfg.telegram else {
        return Err(err("no [telegram] table".into()));
    };
    let (token, expected) = super::identity_inputs(
        cfg.env,
        tg.token.as_ref(),
        &tg.token_env,
        tg.username.as_deref(),
        "username",
    )
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
    if !found.eq_ignore_ascii_case(expected) {
        let is_other = tg
            .other_username
            .as_deref()
            .is_some_and(|other| other.eq_ignore_ascii_case(&found));
        let (whose, hint) = super::other_identity_note(cfg.env, is_other);
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
struct Job {
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
    engine: Arc<Engine>,
    throttle: Throttle,
    queue: SerialQueue<(String, Job)>,
    /// Set once polling works; read by readiness checks.
    pub connected: Arc<AtomicBool>,
}

/// Outcome of delivering a reply.
enum Delivery {
    Sent,
    /// Telegram refused for good (blocked by the user, chat gone): do not retry.
    Refused(String),
    /// Still failing after retries (network): keep the job for the next start.
    Failed(String),
}

impl TelegramAdapter {
    pub fn new(v: Verified, engine: Arc<Engine>) -> Arc<Self> {
        let cfg = engine.config();
        let t = &cfg.telegram;
        Arc::new(Self {
            name: v.name,
            bot: v.bot,
            me: v.me,
            token: v.token,
            throttle: Throttle::new(
                t.per_chat_per_minute,
                t.group_per_minute,
                t.global_per_second,
            ),
            engine,
            queue: SerialQueue::default(),
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    fn scrub(&self, e: &RequestError) -> String {
        redact(&format!("{e:?}"), self.token.expose())
    }

    fn inbox_prefix(&self) -> String {
        format!("tg/{}/", self.name)
    }

    fn offset_key(&self) -> String {
        format!("tg_offset/{}", self.name)
    }

    /// Registers commands, replays the inbox, then polls until `stop` is cancelled.
    /// Handlers run on `tracker` so shutdown can wait for in-flight replies.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, tracker: TaskTracker) {
        let commands: Vec<BotCommand> = USER_COMMANDS
            .iter()
            .map(|(c, d)| BotCommand::new(*c, *d))
            .collect();
        if let Err(e) = self.bot.set_my_commands(commands).await {
            tracing::warn!(bot = %self.name, error = %self.scrub(&e), "setMyCommands failed");
        }
        let store = self.engine.store().clone();
        match store.inbox_scan(&self.inbox_prefix()) {
            Ok(pending) => {
                if !pending.is_empty() {
                    tracing::info!(bot = %self.name, count = pending.len(), "replaying unanswered updates");
                }
                for (key, bytes) in pending {
                    match serde_json::from_slice::<Job>(&bytes) {
                        Ok(job) => self.dispatch(key, job, &tracker),
                        Err(e) => {
                            tracing::error!(key, error = %e, "corrupt inbox entry skipped");
                            let _ = store.inbox_remove(&key);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "could not read the inbox"),
        }
        let mut offset: i32 = store
            .meta_get(&self.offset_key())
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut backoff = Duration::from_millis(500);
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        loop {
            let poll = self
                .bot
                .get_updates()
                .offset(offset)
                .timeout(POLL_SECS)
                .allowed_updates(vec![AllowedUpdate::Message, AllowedUpdate::CallbackQuery]);
            let result = tokio::select! {
                _ = stop.cancelled() => break,
                _ = prune.tick() => { self.throttle.prune(); continue; }
                r = poll => r,
            };
            let updates = match result {
                Ok(u) => {
                    self.connected.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    u
                }
                Err(RequestError::RetryAfter(s)) => {
                    tokio::time::sleep(s.duration()).await;
                    continue;
                }
                Err(e) => {
                    self.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(bot = %self.name, error = %self.scrub(&e), retry_in = ?backoff, "getUpdates failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if updates.is_empty() {
                continue;
            }
            let mut jobs = Vec::new();
            for update in updates {
                offset = offset.max((update.id.0 as i32).saturating_add(1));
                if let Some(job) = self.translate(update.id.0, update.kind) {
                    jobs.push(job);
                }
            }
            // Durable before Telegram is told (by the next poll's offset) to forget them.
            let mut keyed = Vec::with_capacity(jobs.len());
            for job in jobs {
                let key = format!(
                    "{}{:020}",
                    self.inbox_prefix(),
                    job.inbound
                        .update_id
                        .as_deref()
                        .unwrap_or("0")
                        .parse::<u64>()
                        .unwrap_or(0)
                );
                match serde_json::to_vec(&job) {
                    Ok(bytes) => {
                        if let Err(e) = store.inbox_put(&key, &bytes) {
                            tracing::error!(error = %e, "could not store a received update");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "could not encode a received update"),
                }
                keyed.push((key, job));
            }
            if let Err(e) = store.flush().await {
                tracing::error!(error = %e, "store flush failed; not confirming updates");
                continue;
            }
            if let Err(e) = store.meta_put(&self.offset_key(), offset.to_string().as_bytes()) {
                tracing::error!(error = %e, "could not store the update offset");
            }
            for (key, job) in keyed {
                self.dispatch(key, job, &tracker);
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        tracing::info!(bot = %self.name, "telegram polling stopped");
    }

    fn dispatch(self: &Arc<Self>, key: String, job: Job, tracker: &TaskTracker) {
        let conv = job.inbound.conversation().to_string();
        let this = self.clone();
        self.queue
            .push(conv, (key, job), tracker, move |(key, job)| {
                let this = this.clone();
                async move { this.process(key, job).await }
            });
    }

    /// Platform update → `Inbound`, applying the group rules (mention, reply, command).
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
        let mut content = match msg.text() {
            Some(t) => Content::Text(t.to_string()),
            None => Content::NonText,
        };
        if !is_private {
            let text = msg.text().unwrap_or_default();
            let mentioned = msg
                .entities()
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
            if let Content::Text(t) = &mut content {
                *t = strip_mention(t, me_name);
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

    async fn process(self: Arc<Self>, key: String, job: Job) {
        let span = tracing::info_span!("update", platform = "telegram", bot = %self.name, update = job.inbound.update_id.as_deref().unwrap_or(""));
        tracing::Instrument::instrument(self.process_in_span(key, job), span).await
    }

    async fn process_in_span(self: Arc<Self>, key: String, job: Job) {
        if let Some(id) = &job.callback_id {
            // Stops the button's spinner; failure is cosmetic.
            let _ = self
                .bot
                .answer_callback_query(CallbackQueryId(id.clone()))
                .await;
        }
        let chat = ChatId(job.chat_id);
        let typing = self.spawn_typing(chat);
        let streaming = self
            .engine
            .config()
            .bot(&self.name)
            .is_some_and(|b| b.stream);
        let delivery = if streaming {
            let (tx, rx) = watch::channel(String::new());
            let editor = tokio::spawn(self.clone().stream_edits(job.clone(), rx));
            let reply = self.engine.handle_streaming(&job.inbound, Some(&tx)).await;
            drop(tx);
            typing.abort();
            let streamed = editor.await.ok().flatten();
            self.deliver(&job, &reply, streamed).await
        } else {
            let reply = self.engine.handle(&job.inbound).await;
            typing.abort();
            self.deliver(&job, &reply, None).await
        };
        let store = self.engine.store();
        match delivery {
            Delivery::Sent => tracing::info!("update answered"),
            Delivery::Refused(why) => {
                tracing::warn!(reason = %why, "telegram refused the reply; dropping it");
            }
            Delivery::Failed(why) => {
                // Left in the inbox: the next start answers it (the engine resends the stored reply).
                tracing::error!(reason = %why, "reply not delivered; kept for retry at next start");
                return;
            }
        }
        self.engine.mark_sent(&job.inbound);
        if let Err(e) = store.inbox_remove(&key) {
            tracing::error!(error = %e, "could not clear an answered update from the inbox");
        }
        // Durable "sent": after a crash, only a reply whose send was in flight can repeat.
        if let Err(e) = store.flush().await {
            tracing::error!(error = %e, "store flush failed after a reply");
        }
    }

    fn spawn_typing(self: &Arc<Self>, chat: ChatId) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(super::TYPING_AFTER).await;
            loop {
                // Telegram shows "typing…" for 5 s per action.
                let _ = this.bot.send_chat_action(chat, ChatAction::Typing).await;
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        })
    }

    /// Shows the reply growing: one message, edited at most once per `EDIT_EVERY`.
    /// Returns the streamed message's id, if one was sent.
    async fn stream_edits(
        self: Arc<Self>,
        job: Job,
        rx: watch::Receiver<String>,
    ) -> Option<MessageId> {
        let chat = ChatId(job.chat_id);
        let (this, job) = (&*self, &job);
        stream_draft(rx, TG_LIMIT, EDIT_EVERY, move |message, text| async move {
            this.throttle
                .wait(&job.chat_id.to_string(), job.is_group)
                .await;
            let result = match message {
                None => this.bot.send_message(chat, text).await.map(|m| m.id),
                Some(id) => this.bot.edit_message_text(chat, id, text).await.map(|_| id),
            };
            match result {
                Ok(id) => DraftPut::Shown(id),
                Err(RequestError::Api(ApiError::MessageNotModified)) => DraftPut::Unchanged,
                Err(e) => DraftPut::Failed(this.scrub(&e)),
            }
        })
        .await
    }

    async fn deliver(&self, job: &Job, reply: &Reply, streamed: Option<MessageId>) -> Delivery {
        let Reply::Text {
            text,
            attachment,
            buttons,
            ..
        } = reply
        else {
            return Delivery::Sent;
        };
        let keyboard = keyboard(buttons);
        let chat = ChatId(job.chat_id);
        let reply_to = job.is_group.then_some(MessageId(job.message_id));
        let mut parts = split_message(text, SPLIT_AT, utf16_len).into_iter();
        if let Some(id) = streamed {
            // Replace the streamed draft with the formatted first part.
            if let Some(first) = parts.next() {
                if let Err(why) = self.edit_formatted(job, id, &first).await {
                    tracing::debug!(reason = %why, "final edit failed; sending the reply normally");
                    parts = split_message(text, SPLIT_AT, utf16_len).into_iter();
                }
            }
        }
        let parts: Vec<String> = parts.collect();
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.into_iter().enumerate() {
            let markup = if i == last { keyboard.clone() } else { None };
            match self
                .send_formatted(job, chat, &part, reply_to, markup)
                .await
            {
                Delivery::Sent => {}
                other => return other,
            }
        }
        if let Some(a) = attachment {
            return self.send_document(job, chat, a).await;
        }
        Delivery::Sent
    }

    async fn edit_formatted(&self, job: &Job, id: MessageId, part: &str) -> Result<(), String> {
        let chat = ChatId(job.chat_id);
        let html = markdown_to_telegram_html(part);
        self.throttle
            .wait(&job.chat_id.to_string(), job.is_group)
            .await;
        let first = if utf16_len(&html) <= TG_LIMIT {
            self.bot
                .edit_message_text(chat, id, html)
                .parse_mode(ParseMode::Html)
                .await
        } else {
            self.bot.edit_message_text(chat, id, part.to_string()).await
        };
        match first {
            Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => Ok(()),
            Err(RequestError::Api(ApiError::CantParseEntities(_))) => {
                match self.bot.edit_message_text(chat, id, part.to_string()).await {
                    Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => Ok(()),
                    Err(e) => Err(self.scrub(&e)),
                }
            }
            Err(e) => Err(self.scrub(&e)),
        }
    }

    /// Sends one part as HTML; if Telegram rejects the entities, resends it as plain text.
    async fn send_formatted(
        &self,
        job: &Job,
        chat: ChatId,
        part: &str,
        reply_to: Option<MessageId>,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Delivery {
        let html = markdown_to_telegram_html(part);
        if utf16_len(&html) <= TG_LIMIT {
            let sent = self
                .send(
                    job,
                    chat,
                    &html,
                    Some(ParseMode::Html),
                    reply_to,
                    markup.clone(),
                )
                .await;
            match sent {
                Err(RequestError::Api(ApiError::CantParseEntities(_))) => {
                    tracing::debug!("formatting rejected; resending as plain text");
                }
                other => return self.delivery(other),
            }
        }
        let plain = self.send(job, chat, part, None, reply_to, markup).await;
        self.delivery(plain)
    }

    fn delivery(&self, result: Result<(), RequestError>) -> Delivery {
        match result {
            Ok(()) => Delivery::Sent,
            Err(
                e @ (RequestError::Network(_) | RequestError::Io(_) | RequestError::RetryAfter(_)),
            ) => Delivery::Failed(self.scrub(&e)),
            Err(e) => Delivery::Refused(self.scrub(&e)),
        }
    }

    /// One message with throttling; waits out 429s and retries network errors.
    async fn send(
        &self,
        job: &Job,
        chat: ChatId,
        text: &str,
        mode: Option<ParseMode>,
        reply_to: Option<MessageId>,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Result<(), RequestError> {
        let mut attempt = 0;
        loop {
            self.throttle
                .wait(&job.chat_id.to_string(), job.is_group)
                .await;
            let mut req = self.bot.send_message(chat, text.to_string());
            if let Some(mode) = mode {
                req = req.parse_mode(mode);
            }
            if let Some(id) = reply_to {
                req = req.reply_parameters(ReplyParameters::new(id).allow_sending_without_reply());
            }
            if let Some(m) = &markup {
                req = req.reply_markup(m.clone());
            }
            let err = match req.await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            attempt += 1;
            match &err {
                RequestError::RetryAfter(s) if attempt < SEND_ATTEMPTS => {
                    tracing::info!(wait = ?s.duration(), "telegram asked us to slow down");
                    tokio::time::sleep(s.duration()).await;
                }
                RequestError::Network(_) | RequestError::Io(_) if attempt < SEND_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(250 * 2u64.pow(attempt))).await;
                }
                _ => return Err(err),
            }
        }
    }

    async fn send_document(&self, job: &Job, chat: ChatId, a: &Attachment) -> Delivery {
        self.throttle
            .wait(&job.chat_id.to_string(), job.is_group)
            .await;
        let file = InputFile::memory(a.bytes.clone()).file_name(a.file_name.clone());
        let result = self
            .bot
            .send_document(chat, file)
            .caption(a.file_name.clone())
            .await;
        self.delivery(result.map(|_| ()))
    }
}

/// The engine's buttons as an inline keyboard (one row); the press sends the command back.
fn keyboard(buttons: &[Button]) -> Option<InlineKeyboardMarkup> {
    if buttons.is_empty() {
        return None;
    }
    let row: Vec<InlineKeyboardButton> = buttons
        .iter()
        .map(|b| InlineKeyboardButton::callback(b.label.clone(), b.command.clone()))
        .collect();
    Some(InlineKeyboardMarkup::new(vec![row]))
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
