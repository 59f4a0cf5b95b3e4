//! Discord adapter on serenity — the only module that imports serenity.
//!
//! serenity's `Client` runs the gateway (heartbeats, reconnect, RESUME); every REST call
//! goes through our own `Http` (one rate limiter for everything we send). Messages follow
//! the same delivery contract as Telegram: each one is written to the durable inbox before
//! it is handled, replayed from there after a crash, and removed once answered. A gateway
//! RESUME that replays an event is answered at most once: the engine's handled markers
//! make the second copy silent.
//!
//! serenity runs every event handler on its own task, started in any order, so two
//! messages of one conversation may reach us out of order. Intake is therefore synchronous
//! (inbox write + pending set, no await), each conversation keeps its pending work sorted
//! by snowflake id (creation order), and its `SerialQueue` worker waits a few milliseconds
//! (`SETTLE`) and then always takes the oldest. The inbox is flushed before a message is
//! handled (group commit).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serenity::all::{
    ApplicationId, ChannelId, Client, ClientBuilder, Command, CommandInteraction,
    CommandOptionType, ComponentInteraction, ConnectionStage, Context, CreateActionRow,
    CreateAllowedMentions, CreateAttachment, CreateButton, CreateCommand, CreateCommandOption,
    CreateInteractionResponse, CreateInteractionResponseFollowup, CreateInteractionResponseMessage,
    CreateMessage, EditMessage, EventHandler, GatewayIntents, GuildId, Http, HttpBuilder,
    HttpError, Interaction, Message, MessageId, Ready, ResumedEvent, ShardStageUpdateEvent, User,
    UserId,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::text::{char_len, split_message};
use super::{redact, stream_draft, DraftPut, SerialQueue, Throttle};
use crate::config::{BotConfig, Config, Secret};
use crate::domain::{Attachment, Button, Content, Inbound, Platform, Reply};
use crate::engine::commands::USER_COMMANDS;
use crate::engine::Engine;

/// Discord's message limit, in characters.
const DC_LIMIT: usize = 2000;
/// With this API URL serenity's own rate limiter stays on (it ignores any proxy).
const DEFAULT_API_URL: &str = "https://discord.com";
const SEND_ATTEMPTS: u32 = 5;
/// Streaming edits: at most one per this interval per message.
const EDIT_EVERY: Duration = Duration::from_secs(1);
/// Discord shows "typing…" for about 10 s per request.
const TYPING_EVERY: Duration = Duration::from_secs(8);
/// Our answer to a 429 (serenity's error keeps neither `retry_after` nor the headers).
const RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);
/// How long a conversation's worker waits before taking its oldest pending work.
const SETTLE: Duration = Duration::from_millis(10);
/// The slash command that talks to the assistant.
const ASK: &str = "ask";
/// The slash command for operators; its text goes to the engine as `/admin <command>`.
const ADMIN: &str = "admin";

/// A bot whose token was checked against the configured application id.
pub struct Verified {
    pub name: String,
    pub user_id: UserId,
    pub username: String,
    pub application_id: ApplicationId,
    http: Arc<Http>,
    token: Secret,
}

/// Why a Discord bot may not start (exit code 2: a configuration problem).
#[derive(Debug, thiserror::Error)]
#[error("bots/{bot}.toml: discord: {message}")]
pub struct IdentityError {
    pub bot: String,
    pub message: String,
}

/// The REST client. A non-default `discord.api_url` (a test fake or a proxy) needs
/// serenity's rate limiter off, because the limiter ignores the proxy; we then throttle
/// ourselves (see [`DiscordAdapter::throttle`]).
fn build_http(cfg: &Config, token: &Secret) -> Http {
    let builder = HttpBuilder::new(token.expose());
    if limiter_off(cfg) {
        builder
            .proxy(cfg.discord.api_url.clone())
            .ratelimiter_disabled(true)
            .build()
    } else {
        builder.build()
    }
}

fn limiter_off(cfg: &Config) -> bool {
    cfg.discord.api_url.trim_end_matches('/') != DEFAULT_API_URL
}

fn status_of(e: &serenity::Error) -> Option<u16> {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => Some(r.status_code.as_u16()),
        _ => None,
    }
}

/// Asks Discord who the token belongs to (`/users/@me`, `/oauth2/applications/@me`) and
/// refuses a token of another application — above all, a production token in staging.
pub async fn verify(cfg: &Config, bot_cfg: &BotConfig) -> Result<Verified, IdentityError> {
    let err = |message: String| IdentityError {
        bot: bot_cfg.name.clone(),
        message,
    };
    let Some(dc) = &bot_cfg.discord else {
        return Err(err("no [discord] table".into()));
    };
    let (token, expected) = super::identity_inputs(
        cfg.env,
        dc.token.as_ref(),
        &dc.token_env,
        dc.application_id.as_deref(),
        "application_id",
    )
    .map_err(err)?;
    let http = build_http(cfg, &token);
    let failed = |e: serenity::Error| {
        if status_of(&e) == Some(401) {
            err(format!(
                "the token in {} was refused by Discord (401 Unauthorized)",
                dc.token_env
            ))
        } else {
            err(format!(
                "could not ask Discord who the token in {} belongs to: {}",
                dc.token_env,
                redact(&format!("{e:?}"), token.expose())
            ))
        }
    };
    let user = http.get_current_user().await.map_err(failed)?;
    let app = http.get_current_application_info().await.map_err(failed)?;
    let found = app.id.get().to_string();
    if found != expected {
        let is_other = dc.other_application_id.as_deref() == Some(found.as_str());
        let (whose, hint) = super::other_identity_note(cfg.env, is_other);
        return Err(err(format!(
            "the token in {} belongs to application {found} (bot {}){whose}, but {} expects application {expected}{hint}",
            dc.token_env, user.name, cfg.env
        )));
    }
    http.set_application_id(app.id);
    Ok(Verified {
        name: bot_cfg.name.clone(),
        user_id: user.id,
        username: user.name.clone(),
        application_id: app.id,
        http: Arc::new(http),
        token,
    })
}

/// A received message, as kept in the durable inbox until answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    inbound: Inbound,
    channel_id: ChannelId,
    /// The user's message; replies in guilds reference it.
    message_id: MessageId,
    is_group: bool,
}

/// Work waiting for its conversation's turn.
enum Work {
    Message {
        key: String,
        job: Box<Job>,
    },
    /// A slash command or button press, already acknowledged (not in the inbox: it
    /// expires after 15 minutes).
    Interaction(Interact),
}

/// Outcome of delivering a reply.
enum Delivery {
    Sent,
    /// Discord refused for good (no access, unknown channel): do not retry.
    Refused(String),
    /// Still failing after retries (network, 5xx, 429): keep the job for the next start.
    Failed(String),
}

enum Retry {
    RateLimited,
    Transient,
    Never,
}

fn classify(e: &serenity::Error) -> Retry {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => match r.status_code.as_u16() {
            429 => Retry::RateLimited,
            500..=599 => Retry::Transient,
            _ => Retry::Never,
        },
        serenity::Error::Http(HttpError::Request(_)) | serenity::Error::Io(_) => Retry::Transient,
        _ => Retry::Never,
    }
}

type Pending = HashMap<String, BTreeMap<u64, Work>>;

pub struct DiscordAdapter {
    name: String,
    user_id: UserId,
    application_id: ApplicationId,
    http: Arc<Http>,
    token: Secret,
    engine: Arc<Engine>,
    /// Our outbound throttling; `None` while serenity's own rate limiter is on.
    throttle: Option<Throttle>,
    queue: SerialQueue<String>,
    pending: Mutex<Pending>,
    commands_registered: AtomicBool,
    /// True while the gateway session is up; read by readiness checks.
    pub connected: Arc<AtomicBool>,
}

impl DiscordAdapter {
    pub fn new(v: Verified, engine: Arc<Engine>) -> Arc<Self> {
        let cfg = engine.config();
        let d = &cfg.discord;
        let throttle = limiter_off(&cfg).then(|| {
            Throttle::new(
                d.per_chat_per_minute,
                d.group_per_minute,
                d.global_per_second,
            )
        });
        Arc::new(Self {
            name: v.name,
            user_id: v.user_id,
            application_id: v.application_id,
            http: v.http,
            token: v.token,
            engine,
            throttle,
            queue: SerialQueue::default(),
            pending: Mutex::new(HashMap::new()),
            commands_registered: AtomicBool::new(false),
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    fn scrub(&self, e: &serenity::Error) -> String {
        redact(&format!("{e:?}"), self.token.expose())
    }

    fn inbox_prefix(&self) -> String {
        format!("dc/{}/", self.name)
    }

    /// Replays the inbox, then runs the gateway until `stop` is cancelled. Handlers run
    /// on `tracker` so shutdown can wait for in-flight replies.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, tracker: TaskTracker) {
        self.replay_inbox(&tracker);
        let intents = GatewayIntents::GUILD_MESSAGES
            | GatewayIntents::DIRECT_MESSAGES
            | GatewayIntents::MESSAGE_CONTENT;
        let mut backoff = Duration::from_secs(1);
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        'outer: loop {
            let http = build_http(&self.engine.config(), &self.token);
            http.set_application_id(self.application_id);
            let handler = Handler {
                adapter: self.clone(),
                tracker: tracker.clone(),
            };
            let built = ClientBuilder::new_with_http(http, intents)
                .event_handler(handler)
                .await;
            let mut client: Client = match built {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(bot = %self.name, error = %self.scrub(&e), "could not build the Discord client");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            };
            let shards = client.shard_manager.clone();
            let started = tokio::time::Instant::now();
            let result = {
                let start = client.start();
                tokio::pin!(start);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            shards.shutdown_all().await;
                            break 'outer;
                        }
                        _ = prune.tick() => {
                            if let Some(t) = &self.throttle {
                                t.prune();
                            }
                        }
                        r = &mut start => break r,
                    }
                }
            };
            self.connected.store(false, Ordering::Relaxed);
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            match result {
                Ok(()) => {
                    tracing::warn!(bot = %self.name, retry_in = ?backoff, "discord gateway stopped; reconnecting")
                }
                Err(e) => {
                    tracing::error!(bot = %self.name, error = %self.scrub(&e), retry_in = ?backoff, "discord gateway failed; reconnecting")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
        self.connected.store(false, Ordering::Relaxed);
        tracing::info!(bot = %self.name, "discord gateway stopped");
    }

    fn replay_inbox(self: &Arc<Self>, tracker: &TaskTracker) {
        let store = self.engine.store().clone();
        match store.inbox_scan(&self.inbox_prefix()) {
            Ok(pending) => {
                if !pending.is_empty() {
                    tracing::info!(bot = %self.name, count = pending.len(), "replaying unanswered messages");
                }
                for (key, bytes) in pending {
                    match serde_json::from_slice::<Job>(&bytes) {
                        Ok(job) => {
                            let id = job.message_id.get();
                            let conv = job.inbound.conversation().to_string();
                            self.enqueue(
                                id,
                                conv,
                                Work::Message {
                                    key,
                                    job: Box::new(job),
                                },
                                tracker,
                            );
                        }
                        Err(e) => {
                            tracing::error!(key, error = %e, "corrupt inbox entry skipped");
                            let _ = store.inbox_remove(&key);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "could not read the inbox"),
        }
    }

    /// Adds work to its conversation and wakes the conversation's worker. The same id
    /// twice (a gateway replay while the first copy still waits) is queued once.
    fn enqueue(self: &Arc<Self>, id: u64, conv: String, work: Work, tracker: &TaskTracker) {
        let fresh = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.entry(conv.clone())
                .or_default()
                .insert(id, work)
                .is_none()
        };
        if fresh {
            let this = self.clone();
            self.queue.push(conv.clone(), conv, tracker, move |conv| {
                let this = this.clone();
                async move { this.next(conv).await }
            });
        }
    }

    /// Runs the oldest pending work of one conversation.
    async fn next(self: Arc<Self>, conv: String) {
        // Let the handler tasks of the same burst (started by serenity in any order) land.
        tokio::time::sleep(SETTLE).await;
        let work = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let work = p.get_mut(&conv).and_then(|m| m.pop_first()).map(|(_, w)| w);
            if p.get(&conv).is_some_and(BTreeMap::is_empty) {
                p.remove(&conv);
            }
            work
        };
        match work {
            // A span per update, attached to the future (not entered across awaits).
            Some(Work::Message { key, job }) => {
                // The inbox entry is durable before the message is handled (group commit).
                if let Err(e) = self.engine.store().flush().await {
                    tracing::error!(error = %e, "store flush failed for a received message");
                }
                let span = tracing::info_span!("update", platform = "discord", bot = %self.name, update = %job.message_id);
                self.process(key, *job).instrument(span).await
            }
            Some(Work::Interaction(it)) => {
                let span = tracing::info_span!("update", platform = "discord", bot = %self.name, update = it.id());
                self.answer_interaction(it).instrument(span).await
            }
            None => {}
        }
    }

    /// MESSAGE_CREATE → inbox → queue. Synchronous on purpose: serenity starts the
    /// handler tasks of a burst in any order, and the sooner each message is in its
    /// conversation's pending set, the surer the oldest-first order.
    fn intake(self: &Arc<Self>, msg: Message, tracker: &TaskTracker) {
        let Some(job) = self.translate(&msg) else {
            return;
        };
        let store = self.engine.store();
        let key = format!("{}{:020}", self.inbox_prefix(), msg.id.get());
        match serde_json::to_vec(&job) {
            Ok(bytes) => {
                if let Err(e) = store.inbox_put(&key, &bytes) {
                    tracing::error!(error = %e, "could not store a received message");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode a received message"),
        }
        let conv = job.inbound.conversation().to_string();
        let work = Work::Message {
            key,
            job: Box::new(job),
        };
        self.enqueue(msg.id.get(), conv, work, tracker);
    }

    /// Platform message → `Inbound`, applying the guild rules (mention or reply to the bot).
    fn translate(&self, msg: &Message) -> Option<Job> {
        if msg.author.bot || msg.webhook_id.is_some() {
            return None;
        }
        let is_private = msg.guild_id.is_none();
        let mut text = msg.content.clone();
        if !is_private {
            let me = self.user_id.get();
            let tags = [format!("<@{me}>"), format!("<@!{me}>")];
            let mentioned = msg.mentions.iter().any(|u| u.id == self.user_id)
                || tags.iter().any(|t| text.contains(t.as_str()));
            let replied_to_me = msg
                .referenced_message
                .as_ref()
                .is_some_and(|r| r.author.id == self.user_id);
            if !(mentioned || replied_to_me) {
                return None;
            }
            text = strip_mention(&text, &tags);
        }
        let content = if text.trim().is_empty() {
            Content::NonText
        } else {
            Content::Text(text)
        };
        Some(Job {
            inbound: self.inbound(
                msg.id.get(),
                msg.channel_id,
                &msg.author,
                is_private,
                content,
            ),
            channel_id: msg.channel_id,
            message_id: msg.id,
            is_group: !is_private,
        })
    }

    fn inbound(
        &self,
        id: u64,
        channel: ChannelId,
        author: &User,
        is_private: bool,
        content: Content,
    ) -> Inbound {
        Inbound {
            bot: self.name.clone(),
            platform: Platform::Discord,
            update_id: Some(id.to_string()),
            chat_id: channel.get().to_string(),
            user_id: author.id.get().to_string(),
            user_name: author
                .global_name
                .clone()
                .unwrap_or_else(|| author.name.clone()),
            username: Some(author.name.clone()),
            is_private,
            forwarded: false,
            content,
        }
    }

    fn streaming(&self) -> bool {
        self.engine
            .config()
            .bot(&self.name)
            .is_some_and(|b| b.stream)
    }

    async fn process(self: Arc<Self>, key: String, job: Job) {
        let typing = self.spawn_typing(job.channel_id);
        let delivery = if self.streaming() {
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
        match delivery {
            Delivery::Sent => {}
            Delivery::Refused(why) => {
                tracing::warn!(reason = %why, "discord refused the reply; dropping it");
            }
            Delivery::Failed(why) => {
                // Left in the inbox: the next start answers it (the engine resends the stored reply).
                tracing::error!(reason = %why, "reply not delivered; kept for retry at next start");
                return;
            }
        }
        self.finish(&job.inbound, Some(&key)).await;
    }

    /// Marks the reply sent, clears the inbox entry and makes both durable.
    async fn finish(&self, inbound: &Inbound, inbox_key: Option<&str>) {
        let store = self.engine.store();
        self.engine.mark_sent(inbound);
        if let Some(key) = inbox_key {
            if let Err(e) = store.inbox_remove(key) {
                tracing::error!(error = %e, "could not clear an answered message from the inbox");
            }
        }
        // Durable "sent": after a crash, only a reply whose send was in flight can repeat.
        if let Err(e) = store.flush().await {
            tracing::error!(error = %e, "store flush failed after a reply");
        }
    }

    fn spawn_typing(&self, channel: ChannelId) -> tokio::task::JoinHandle<()> {
        let http = self.http.clone();
        tokio::spawn(async move {
            tokio::time::sleep(super::TYPING_AFTER).await;
            loop {
                let _ = http.broadcast_typing(channel).await;
                tokio::time::sleep(TYPING_EVERY).await;
            }
        })
    }

    async fn throttle_wait(&self, chat: ChannelId, is_group: bool) {
        if let Some(t) = &self.throttle {
            t.wait(&chat.get().to_string(), is_group).await;
        }
    }

    /// One REST call with throttling; waits out 429s and retries network errors and 5xx.
    async fn with_retry<T, F, Fut>(
        &self,
        chat: ChannelId,
        is_group: bool,
        mut op: F,
    ) -> Result<T, serenity::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = serenity::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            self.throttle_wait(chat, is_group).await;
            let err = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            attempt += 1;
            if attempt >= SEND_ATTEMPTS {
                return Err(err);
            }
            match classify(&err) {
                Retry::RateLimited => {
                    tracing::info!(wait = ?RATE_LIMIT_WAIT, "discord asked us to slow down");
                    tokio::time::sleep(RATE_LIMIT_WAIT).await;
                }
                Retry::Transient => {
                    tokio::time::sleep(Duration::from_millis(250 * 2u64.pow(attempt))).await;
                }
                Retry::Never => return Err(err),
            }
        }
    }

    fn delivery(&self, result: Result<(), serenity::Error>) -> Delivery {
        match result {
            Ok(()) => Delivery::Sent,
            Err(e) => match classify(&e) {
                Retry::Never => Delivery::Refused(self.scrub(&e)),
                _ => Delivery::Failed(self.scrub(&e)),
            },
        }
    }

    /// No `@everyone`, role or user pings from LLM text; a reply still notifies its author.
    fn mentions() -> CreateAllowedMentions {
        CreateAllowedMentions::new().replied_user(true)
    }

    fn new_message(job: &Job, content: &str) -> CreateMessage {
        let mut m = CreateMessage::new()
            .content(content)
            .allowed_mentions(Self::mentions());
        if job.is_group {
            m = m.reference_message((job.channel_id, job.message_id));
        }
        m
    }

    /// Shows the reply growing: one message, edited at most once per `EDIT_EVERY`.
    /// Returns the streamed message's id, if one was sent.
    async fn stream_edits(
        self: Arc<Self>,
        job: Job,
        rx: watch::Receiver<String>,
    ) -> Option<MessageId> {
        let (this, job) = (&*self, &job);
        stream_draft(rx, DC_LIMIT, EDIT_EVERY, move |message, text| async move {
            this.throttle_wait(job.channel_id, job.is_group).await;
            let result = match message {
                None => job
                    .channel_id
                    .send_message(&*this.http, Self::new_message(job, &text))
                    .await
                    .map(|m| m.id),
                Some(id) => job
                    .channel_id
                    .edit_message(&*this.http, id, EditMessage::new().content(text))
                    .await
                    .map(|_| id),
            };
            match result {
                Ok(id) => DraftPut::Shown(id),
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
        let mut parts = split_message(text, DC_LIMIT, char_len);
        // The buttons go under the last part.
        let rows = (!buttons.is_empty()).then(|| components(buttons));
        if let Some(id) = streamed.filter(|_| !parts.is_empty()) {
            // The streamed draft becomes the final first part.
            let first = parts.remove(0);
            let edit = self
                .with_retry(job.channel_id, job.is_group, || {
                    let mut e = EditMessage::new().content(first.clone());
                    if let (true, Some(rows)) = (parts.is_empty(), &rows) {
                        e = e.components(rows.clone());
                    }
                    job.channel_id.edit_message(&*self.http, id, e)
                })
                .await;
            if let Err(e) = edit {
                tracing::debug!(error = %self.scrub(&e), "final edit failed; sending the reply normally");
                parts = split_message(text, DC_LIMIT, char_len);
            }
        }
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.iter().enumerate() {
            let sent = self
                .with_retry(job.channel_id, job.is_group, || {
                    let mut m = Self::new_message(job, part);
                    if let (true, Some(rows)) = (i == last, &rows) {
                        m = m.components(rows.clone());
                    }
                    job.channel_id.send_message(&*self.http, m)
                })
                .await;
            match self.delivery(sent.map(|_| ())) {
                Delivery::Sent => {}
                other => return other,
            }
        }
        if let Some(a) = attachment {
            let sent = self
                .with_retry(job.channel_id, job.is_group, || {
                    job.channel_id.send_message(
                        &*self.http,
                        Self::new_message(job, &a.file_name).add_file(file(a)),
                    )
                })
                .await;
            return self.delivery(sent.map(|_| ()));
        }
        Delivery::Sent
    }

    /// Global slash commands: the user commands, `ask` and `admin`. Registered once per
    /// process (at the first READY); Discord keeps them across restarts.
    async fn register_commands(&self) {
        if self.commands_registered.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut commands: Vec<CreateCommand> = USER_COMMANDS
            .iter()
            .map(|(name, desc)| CreateCommand::new(*name).description(*desc))
            .collect();
        commands.push(
            CreateCommand::new(ASK)
                .description("Ask the assistant")
                .add_option(
                    CreateCommandOption::new(CommandOptionType::String, "prompt", "Your message")
                        .required(true),
                ),
        );
        commands.push(
            CreateCommand::new(ADMIN)
                .description("Operator commands (admins only)")
                .add_option(CreateCommandOption::new(
                    CommandOptionType::String,
                    "command",
                    "e.g. stats, ban dc:123 spam, maintenance on",
                )),
        );
        if let Err(e) = Command::set_global_commands(&*self.http, commands).await {
            self.commands_registered.store(false, Ordering::SeqCst);
            tracing::warn!(bot = %self.name, error = %self.scrub(&e), "registering slash commands failed");
        }
    }

    /// INTERACTION_CREATE (slash command or button press): acknowledge at once
    /// (Discord's 3-second deadline), then queue the work behind the conversation's
    /// earlier messages.
    async fn intake_interaction(self: Arc<Self>, it: Interact, tracker: TaskTracker) {
        if it.user().bot {
            return;
        }
        if let Err(e) = it.acknowledge(&self.http).await {
            // Expired, or already acknowledged (a replayed event): nothing more to do.
            tracing::warn!(bot = %self.name, error = %redact(&self.scrub(&e), it.token()), "could not acknowledge an interaction");
            return;
        }
        let conv = self.interaction_inbound(&it).conversation().to_string();
        self.enqueue(it.id(), conv, Work::Interaction(it), &tracker);
    }

    /// What the engine sees: the prompt for `/ask`, `/<name> <options>` for other slash
    /// commands, the button's command for a button press.
    fn interaction_inbound(&self, it: &Interact) -> Inbound {
        let text = match it {
            Interact::Command(cmd) => {
                let values: Vec<&str> = cmd
                    .data
                    .options
                    .iter()
                    .filter_map(|o| o.value.as_str())
                    .collect();
                if cmd.data.name == ASK {
                    values.join(" ")
                } else {
                    std::iter::once(format!("/{}", cmd.data.name))
                        .chain(values.iter().map(|v| v.to_string()))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            }
            Interact::Component(c) => c.data.custom_id.clone(),
        };
        let content = if text.trim().is_empty() {
            Content::NonText
        } else {
            Content::Text(text)
        };
        let (channel, guild) = it.place();
        self.inbound(it.id(), channel, it.user(), guild.is_none(), content)
    }

    async fn answer_interaction(self: Arc<Self>, it: Interact) {
        let inbound = self.interaction_inbound(&it);
        let reply = self.engine.handle(&inbound).await;
        let (channel, guild) = it.place();
        let is_group = guild.is_some();
        let result = match &reply {
            Reply::Text {
                text,
                attachment,
                buttons,
                ..
            } => {
                let parts = split_message(text, DC_LIMIT, char_len);
                let last = parts.len().saturating_sub(1);
                let mut result = Ok(());
                for (i, part) in parts.iter().enumerate() {
                    result = self
                        .with_retry(channel, is_group, || {
                            let mut f = CreateInteractionResponseFollowup::new()
                                .content(part.clone())
                                .allowed_mentions(Self::mentions());
                            if i == last && !buttons.is_empty() {
                                f = f.components(components(buttons));
                            }
                            it.followup(&self.http, f)
                        })
                        .await;
                    if result.is_err() {
                        break;
                    }
                }
                if let (Ok(()), Some(a)) = (&result, attachment) {
                    result = self
                        .with_retry(channel, is_group, || {
                            let f = CreateInteractionResponseFollowup::new()
                                .content(a.file_name.clone())
                                .add_file(file(a));
                            it.followup(&self.http, f)
                        })
                        .await;
                }
                result
            }
            Reply::Silent => it.nothing_to_say(&self.http).await,
        };
        if let Err(e) = result {
            // A follow-up cannot be retried after a restart (the interaction expires).
            tracing::warn!(reason = %redact(&self.scrub(&e), it.token()), "interaction reply not delivered");
        }
        self.finish(&inbound, None).await;
    }
}

/// An interaction we answer: a slash command, or a press on one of our buttons.
enum Interact {
    Command(Box<CommandInteraction>),
    Component(Box<ComponentInteraction>),
}

impl Interact {
    fn id(&self) -> u64 {
        match self {
            Interact::Command(c) => c.id.get(),
            Interact::Component(c) => c.id.get(),
        }
    }

    fn user(&self) -> &User {
        match self {
            Interact::Command(c) => &c.user,
            Interact::Component(c) => &c.user,
        }
    }

    fn token(&self) -> &str {
        match self {
            Interact::Command(c) => &c.token,
            Interact::Component(c) => &c.token,
        }
    }

    fn place(&self) -> (ChannelId, Option<GuildId>) {
        match self {
            Interact::Command(c) => (c.channel_id, c.guild_id),
            Interact::Component(c) => (c.channel_id, c.guild_id),
        }
    }

    /// A slash command shows "thinking…" until the follow-up; a button press is
    /// acknowledged without changing its message.
    async fn acknowledge(&self, http: &Http) -> serenity::Result<()> {
        match self {
            Interact::Command(c) => {
                let defer =
                    CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new());
                c.create_response(http, defer).await
            }
            Interact::Component(c) => {
                c.create_response(http, CreateInteractionResponse::Acknowledge)
                    .await
            }
        }
    }

    async fn followup(
        &self,
        http: &Http,
        f: CreateInteractionResponseFollowup,
    ) -> serenity::Result<()> {
        match self {
            Interact::Command(c) => c.create_followup(http, f).await.map(|_| ()),
            Interact::Component(c) => c.create_followup(http, f).await.map(|_| ()),
        }
    }

    /// The engine has nothing to say (e.g. a repeated over-limit message).
    async fn nothing_to_say(&self, http: &Http) -> serenity::Result<()> {
        match self {
            // Removes the "thinking…" message.
            Interact::Command(c) => c.delete_response(http).await,
            // The original response is the message with the buttons: keep it.
            Interact::Component(_) => Ok(()),
        }
    }
}

/// The engine's buttons as message components (rows of at most 5); a press sends the
/// button's command back as a component interaction.
fn components(buttons: &[Button]) -> Vec<CreateActionRow> {
    buttons
        .chunks(5)
        .take(5)
        .map(|row| {
            CreateActionRow::Buttons(
                row.iter()
                    .map(|b| CreateButton::new(b.command.clone()).label(b.label.clone()))
                    .collect(),
            )
        })
        .collect()
}

fn file(a: &Attachment) -> CreateAttachment {
    CreateAttachment::bytes(a.bytes.clone(), a.file_name.clone())
}

/// Removes `<@BOTID>` / `<@!BOTID>` so the LLM sees only the question.
pub(crate) fn strip_mention(text: &str, tags: &[String]) -> String {
    let mut out = text.to_string();
    for t in tags {
        out = out.replace(t.as_str(), " ");
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// serenity's event handler: thin, everything happens on the adapter.
struct Handler {
    adapter: Arc<DiscordAdapter>,
    tracker: TaskTracker,
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn message(&self, _ctx: Context, msg: Message) {
        self.adapter.intake(msg, &self.tracker);
    }

    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let it = match interaction {
            Interaction::Command(c) => Interact::Command(Box::new(c)),
            Interaction::Component(c) => Interact::Component(Box::new(c)),
            _ => return,
        };
        {
            let a = self.adapter.clone();
            self.tracker
                .track_future(a.intake_interaction(it, self.tracker.clone()))
                .await;
        }
    }

    async fn ready(&self, _ctx: Context, ready: Ready) {
        let a = &self.adapter;
        a.connected.store(true, Ordering::Relaxed);
        tracing::info!(bot = %a.name, user = %ready.user.name, "discord gateway connected");
        a.register_commands().await;
    }

    async fn resume(&self, _ctx: Context, _event: ResumedEvent) {
        self.adapter.connected.store(true, Ordering::Relaxed);
        tracing::info!(bot = %self.adapter.name, "discord gateway resumed");
    }

    async fn shard_stage_update(&self, _ctx: Context, event: ShardStageUpdateEvent) {
        self.adapter
            .connected
            .store(event.new == ConnectionStage::Connected, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_mention() {
        let tags = ["<@1000>".to_string(), "<@!1000>".to_string()];
        assert_eq!(strip_mention("<@1000> what is 2+2?", &tags), "what is 2+2?");
        assert_eq!(strip_mention("hey <@!1000>, hi", &tags), "hey , hi");
        assert_eq!(strip_mention("<@1000>", &tags), "");
        assert_eq!(strip_mention("ask <@2000> too", &tags), "ask <@2000> too");
    }
}
