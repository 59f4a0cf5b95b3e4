//! Discord adapter on serenity — the only module that imports serenity.
//!
//! serenity's `Client` runs the gateway (heartbeats, reconnect, RESUME). Replies go out
//! through serenity's request builder and its rate limiter (default URL) or straight to
//! the configured URL (limiter off), so a 429's `retry_after` (body or headers) and its
//! `global` flag reach our delivery machinery (`delivery.rs`): a global 429 pauses every
//! send of the bot. Messages follow the same delivery contract as Telegram: each one is
//! written to the durable inbox before it is handled, replayed from there after a crash,
//! and removed once answered. A gateway RESUME that replays an event is answered at most
//! once: the engine's handled markers make the second copy silent.
//!
//! serenity runs every event handler on its own task, started in any order, so two
//! messages of one conversation may reach us out of order. Intake is therefore synchronous
//! (inbox write + queue, no await), each conversation's queue is ordered by snowflake id
//! (creation order), and its worker waits a few milliseconds (`SETTLE`) and then always
//! takes the oldest. The inbox is flushed before a message is handled (group commit).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use serenity::all::{
    ApplicationId, ChannelId, Client, ClientBuilder, Command, CommandOptionType, ConnectionStage,
    Context, CreateActionRow, CreateAttachment, CreateButton, CreateCommand, CreateCommandOption,
    CreateInteractionResponseFollowup, EventHandler, GatewayIntents, Http, HttpBuilder, HttpError,
    Interaction, Message, MessageId, Ready, ResumedEvent, ShardStageUpdateEvent, User, UserId,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::delivery::{Delivery, DeliveryStats, Failed, PrivateNote, BUSY_NOTICE};
use super::events::{Panicked, QueueOverflow, Refused, UpdatePanicked};
use super::text::{char_len, split_message};
use super::{redact, IdentityError, Throttle};
use crate::config::{BotConfig, Config, Secret};
use crate::domain::{Attachment, Button, Content, Inbound, Platform, Reply, Visibility};
use crate::engine::commands::{self, Arg};
use crate::engine::Engine;
use crate::events::{ErrorKind, Event};

mod interact;
mod media;
mod rest;
mod shards;
use interact::Interact;
use rest::{mentions, DcOut};

/// Discord's message limit, in characters.
const DC_LIMIT: usize = 2000;
/// A 429 that names no wait (serenity's limiter passes no details on).
const RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);
/// How long a conversation's worker waits before taking its oldest pending work.
const SETTLE: Duration = Duration::from_millis(10);
/// The slash command that talks to the assistant.
const ASK: &str = commands::ASK.name;
/// What a public "thinking…" becomes when the answer turned out to be personal.
const ANSWERED_PRIVATELY: &str = "Only you can see the answer.";

/// Slash commands whose answer is declared personal: they are deferred ephemerally,
/// since the defer must go out (within 3 s) before the answer exists. A personal
/// answer to any other command is kept private too (see [`DiscordAdapter::follow_up`]).
fn is_personal_command(name: &str) -> bool {
    commands::slash_commands().any(|c| c.name == name && c.visibility == Visibility::Personal)
}

/// A bot whose token was checked against the configured application id.
pub struct Verified {
    pub name: String,
    pub user_id: UserId,
    pub username: String,
    pub application_id: ApplicationId,
    http: Arc<Http>,
    token: Secret,
}

/// The REST client. A non-default `discord.api_url` (a test fake or a proxy) needs
/// serenity's rate limiter off, because the limiter ignores the proxy; we then throttle
/// ourselves (see [`DcOut`]).
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
    cfg.discord.api_url.trim_end_matches('/') != crate::config::defaults::DISCORD.api_url
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
    let err = IdentityError::of(&bot_cfg.name, "discord");
    let (dc, token, expected) = super::identity_inputs(
        cfg.env,
        bot_cfg.discord.as_ref(),
        "discord",
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
    if let Some((whose, hint)) =
        super::identity_mismatch(cfg.env, dc, expected, &found, |a, b| a == b)
    {
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
pub struct Job {
    inbound: Inbound,
    channel_id: ChannelId,
    /// The user's message; replies in guilds reference it.
    message_id: MessageId,
    is_group: bool,
}

pub struct DiscordAdapter {
    name: String,
    user_id: UserId,
    application_id: ApplicationId,
    token: Secret,
    delivery: Arc<Delivery<DcOut>>,
    commands_registered: AtomicBool,
    /// True while the gateway session is up; read by readiness checks.
    pub connected: Arc<AtomicBool>,
}

impl DiscordAdapter {
    pub fn new(v: Verified, engine: Arc<Engine>, stats: Arc<DeliveryStats>) -> Arc<Self> {
        let cfg = engine.config();
        let d = &cfg.discord;
        let throttle = limiter_off(&cfg).then(|| {
            Throttle::new(
                d.per_chat_per_minute,
                d.group_per_minute,
                d.global_per_second,
            )
        });
        let out = Arc::new(DcOut::new(
            v.http,
            v.token.clone(),
            v.application_id,
            throttle,
        ));
        let files = Arc::new(media::DcMedia::new(&d.api_url));
        engine.set_media_source(Platform::Discord, &v.name, files);
        let prefix = format!("dc/{}/", v.name);
        let delivery = Delivery::new(out, engine, stats, &v.name, prefix, SETTLE);
        Arc::new(Self {
            name: v.name,
            user_id: v.user_id,
            application_id: v.application_id,
            token: v.token,
            delivery,
            commands_registered: AtomicBool::new(false),
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The bot's name (its `bots/<name>.toml`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn scrub(&self, e: &serenity::Error) -> String {
        redact(&format!("{e:?}"), self.token.expose())
    }

    fn http(&self) -> &Http {
        &self.delivery.out().http
    }

    fn engine(&self) -> &Arc<Engine> {
        self.delivery.engine()
    }

    /// Replays the inbox, then runs the gateway until `stop` is cancelled. Handlers run
    /// on `tracker` so shutdown can wait for in-flight replies.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, tracker: TaskTracker) {
        self.delivery.attach(stop.clone());
        self.delivery.watch_orphans(&tracker);
        self.delivery.replay(&tracker).await;
        let mut backoff = Duration::from_secs(1);
        while !stop.is_cancelled() {
            let started = Instant::now();
            match self.clone().gateway(&stop, &tracker).await {
                Ok(()) if stop.is_cancelled() => break,
                Ok(()) => {
                    tracing::warn!(bot = %self.name, retry_in = ?backoff, "discord gateway stopped; reconnecting")
                }
                Err(e) => {
                    tracing::error!(error.kind = ErrorKind::Platform.as_str(), bot = %self.name, error = %e, retry_in = ?backoff, "discord gateway failed; reconnecting")
                }
            }
            self.connected.store(false, Ordering::Relaxed);
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
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

    /// One gateway client, until it ends or `stop` (then `Ok`). Errors are redacted.
    async fn gateway(
        self: Arc<Self>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), String> {
        let intents = GatewayIntents::GUILD_MESSAGES
            | GatewayIntents::DIRECT_MESSAGES
            | GatewayIntents::MESSAGE_CONTENT;
        let http = build_http(&self.engine().config(), &self.token);
        http.set_application_id(self.application_id);
        let handler = Handler {
            adapter: self.clone(),
            tracker: tracker.clone(),
        };
        let mut client: Client = ClientBuilder::new_with_http(http, intents)
            .event_handler(handler)
            .await
            .map_err(|e| format!("building the client: {}", self.scrub(&e)))?;
        let shards = client.shard_manager.clone();
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        let layout = self.engine().config().discord_shards;
        tracing::info!(bot = %self.name, shards = %shards::describe(layout), "discord gateway starting");
        let start = shards::start(&mut client, layout);
        tokio::pin!(start);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    shards.shutdown_all().await;
                    return Ok(());
                }
                _ = prune.tick() => {
                    if let Some(t) = &self.delivery.out().throttle {
                        t.prune();
                    }
                }
                r = &mut start => return r.map_err(|e| self.scrub(&e)),
            }
        }
    }

    /// MESSAGE_CREATE → inbox → queue. Synchronous on purpose: serenity starts the
    /// handler tasks of a burst in any order, and the sooner each message is in its
    /// conversation's queue, the surer the oldest-first order.
    fn intake(self: &Arc<Self>, msg: Message, tracker: &TaskTracker) {
        let id = msg.id.get();
        let job = match std::panic::catch_unwind(AssertUnwindSafe(|| self.translate(&msg))) {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(_) => {
                let at = Panicked::Translating {
                    bot: &self.name,
                    update: id,
                };
                UpdatePanicked { at }.emit(self.delivery.stats());
                return;
            }
        };
        let key = format!("dc/{}/{:020}", self.name, id);
        self.delivery.admit(key, job, tracker);
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
        let content = match media::of_message(msg, &text) {
            Some(media) => Content::Media(media),
            None if text.trim().is_empty() => Content::NonText,
            None => Content::Text(text),
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

    /// Global slash commands, as declared: every command (`admin` takes its text as one
    /// option) and `ask`. Registered once per process (at the first READY); Discord
    /// keeps them across restarts.
    async fn register_commands(&self) {
        if self.commands_registered.swap(true, Ordering::SeqCst) {
            return;
        }
        let commands: Vec<CreateCommand> = commands::slash_commands()
            .map(|spec| {
                let command = CreateCommand::new(spec.name).description(spec.help);
                spec.args
                    .iter()
                    .fold(command, |c, arg| c.add_option(slash_option(arg)))
            })
            .collect();
        if let Err(e) = Command::set_global_commands(self.http(), commands).await {
            self.commands_registered.store(false, Ordering::SeqCst);
            tracing::warn!(bot = %self.name, error = %self.scrub(&e), "registering slash commands failed");
        }
    }

    /// INTERACTION_CREATE (slash command or button press): acknowledge at once
    /// (Discord's 3-second deadline), then queue the answer behind the conversation's
    /// earlier messages — or, when the queue is full, answer with the busy notice.
    async fn intake_interaction(self: Arc<Self>, it: Interact, tracker: TaskTracker) {
        if it.user().bot {
            return;
        }
        if let Err(e) = it.acknowledge(self.http()).await {
            // Expired, or already acknowledged (a replayed event): nothing more to do.
            tracing::warn!(bot = %self.name, error = %redact(&self.scrub(&e), it.token()), "could not acknowledge an interaction");
            return;
        }
        let conv = self.interaction_inbound(&it).conversation().to_string();
        let id = it.id();
        if let Err(full) = self.delivery.room(&conv) {
            let (bot, refused) = (&self.name, Refused::InteractionNoticed);
            QueueOverflow { bot, full, refused }.emit(self.delivery.stats());
            let f = CreateInteractionResponseFollowup::new().content(BUSY_NOTICE);
            let _ = self.delivery.out().followup(&it, f, None).await;
            return;
        }
        let span =
            tracing::info_span!("update", platform = "discord", bot = %self.name, update = id);
        let task = self.clone().answer_interaction(it).instrument(span).boxed();
        if let Err(full) = self.delivery.enqueue_task(conv, id, task, &tracker) {
            // Filled up between the check and now; the follow-up is lost with the task.
            let (bot, refused) = (&self.name, Refused::InteractionDropped);
            QueueOverflow { bot, full, refused }.emit(self.delivery.stats());
        }
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
        let reply = self.engine().handle(&inbound).await;
        let personal = reply.visibility() == Visibility::Personal;
        let result = match (&reply, it.guild_message()) {
            (Reply::Silent, _) => it
                .nothing_to_say(self.http())
                .await
                .map_err(|e| Failed::Permanent(self.scrub(&e))),
            // A button pressed in a guild channel: the answer goes to the user's DM.
            (_, Some(message)) if personal => {
                self.answer_in_dm(&it, &inbound, &reply, message).await
            }
            _ => self.follow_up(&it, &reply, personal).await,
        };
        // A follow-up cannot be retried after a restart (the interaction expires).
        let outcome = result.map_err(|f| match f {
            Failed::Permanent(why) => Failed::Permanent(redact(&why, it.token())),
            Failed::Unreachable(why) => Failed::Unreachable(redact(&why, it.token())),
            Failed::Expired(why) => Failed::Expired(redact(&why, it.token())),
            other => other,
        });
        self.delivery.conclude(outcome, &inbound, None).await;
    }

    /// The reply as follow-ups of the interaction: parts, buttons under the last, then
    /// the file. A personal answer to a slash command is ephemeral (flags 64) — if its
    /// command was deferred publicly, the public "thinking…" first becomes a note.
    async fn follow_up(&self, it: &Interact, reply: &Reply, personal: bool) -> Result<(), Failed> {
        let Some(r) = reply.rendered() else {
            return Ok(());
        };
        let out = self.delivery.out();
        let mut retry = self.delivery.retry_budget();
        let is_command = matches!(it, Interact::Command(_));
        let ephemeral = is_command && (personal || it.defers_ephemerally());
        if is_command && personal && !it.defers_ephemerally() {
            self.delivery
                .send_retrying(&mut retry, || out.edit_original(it, ANSWERED_PRIVATELY))
                .await?;
        }
        let parts = split_message(r.text, DC_LIMIT, char_len);
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.iter().enumerate() {
            let mut f = CreateInteractionResponseFollowup::new()
                .content(part.clone())
                .allowed_mentions(mentions())
                .ephemeral(ephemeral);
            if i == last && !r.buttons.is_empty() {
                f = f.components(components(r.buttons));
            }
            self.delivery
                .send_retrying(&mut retry, || out.followup(it, f.clone(), None))
                .await?;
        }
        if let Some(a) = r.attachment {
            let f = CreateInteractionResponseFollowup::new()
                .content(a.file_name.clone())
                .ephemeral(ephemeral);
            self.delivery
                .send_retrying(&mut retry, || out.followup(it, f.clone(), Some(a)))
                .await?;
        }
        Ok(())
    }

    /// A personal answer to a button pressed in a guild channel: to the user's DM; the
    /// presser alone is told where it went (an ephemeral follow-up, no content).
    async fn answer_in_dm(
        &self,
        it: &Interact,
        inbound: &Inbound,
        reply: &Reply,
        message: MessageId,
    ) -> Result<(), Failed> {
        let (channel, _) = it.place();
        let job = Job {
            inbound: inbound.clone(),
            channel_id: channel,
            message_id: message,
            is_group: true,
        };
        let out = self.delivery.out();
        let note = |n| {
            let f = CreateInteractionResponseFollowup::new()
                .content(private_note_text(n))
                .allowed_mentions(mentions())
                .ephemeral(true);
            async move { out.followup(it, f, None).await }
        };
        self.delivery.deliver_privately(&job, reply, note).await
    }
}

/// The note in a guild channel whose personal answer went to the user's DM: never the
/// answer.
fn private_note_text(note: PrivateNote) -> &'static str {
    match note {
        PrivateNote::Sent => "I've sent you the answer in a direct message.",
        PrivateNote::Refused => {
            "I can't send you a direct message, and this answer is for you only. To get it, allow direct messages from this server's members (click the server name → Privacy Settings → Direct Messages) and send the command again."
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

fn attachment(a: &Attachment) -> CreateAttachment {
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
        let a = self.adapter.clone();
        let intake = AssertUnwindSafe(a.intake_interaction(it, self.tracker.clone()));
        if self
            .tracker
            .track_future(intake.catch_unwind())
            .await
            .is_err()
        {
            let a = &self.adapter;
            let at = Panicked::TakingInInteraction { bot: &a.name };
            UpdatePanicked { at }.emit(a.delivery.stats());
        }
    }

    async fn ready(&self, _ctx: Context, ready: Ready) {
        let a = &self.adapter;
        a.connected.store(true, Ordering::Relaxed);
        let shard = ready.shard.map(|s| format!("{}/{}", s.id, s.total));
        tracing::info!(bot = %a.name, user = %ready.user.name, shard = ?shard, "discord gateway connected");
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

/// A declared argument as a slash-command option. Every option is a string: the
/// engine reads the values as the words after the command's name.
fn slash_option(arg: &Arg) -> CreateCommandOption {
    let option = CreateCommandOption::new(
        CommandOptionType::String,
        arg.name().to_lowercase(),
        arg.help(),
    )
    .required(!arg.optional());
    arg.choices()
        .into_iter()
        .fold(option, |o, choice| o.add_string_choice(choice, choice))
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
