//! The conversation engine: one platform-neutral pipeline for every bot and adapter.
//!
//! **Architecture Invariant:** this module imports no platform SDK, no sled and no
//! async-openai; it speaks [`crate::domain`], [`crate::store::Store`] and [`crate::llm`].

pub mod admin;
pub mod bpe;
pub mod cache;
pub mod commands;
pub mod limits;
pub mod ordering;
pub mod prompt;
pub mod stats;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{BotConfig, CacheScope, Config};
use crate::domain::{Content, Inbound, Platform, Rejection, Reply, ReplyKind, UserRef};
use crate::llm::{ChatMessage, ChatRequest, ChatResponse, ChatRole, LlmError, ResilientLlm};
use crate::store::{
    CacheEntry, Exchange, Handled, HandledEntry, Role, Store, StoreError, Turn, UserRecord,
};
use commands::Command;
use limits::{human_duration, limit_key, secs_until_reset, utc_day, Limits, RateDecision};
use ordering::ConversationLocks;
use prompt::{PromptVars, Prompts, Tokenizer};
use stats::EngineStats;

pub const MSG_NON_TEXT: &str = "I can only read text for now.";
pub const MSG_LLM_UNAVAILABLE: &str =
    "The assistant is temporarily unavailable. Please try again in a few minutes.";
pub const MSG_LLM_FAILED: &str =
    "Sorry, I couldn't get an answer right now. Please try again in a moment.";
pub const MSG_BANNED: &str = "You have been blocked from using this bot.";
pub const MSG_INTERNAL: &str = "Sorry, something went wrong on my side. Please try again.";
pub const MSG_BUSY: &str =
    "I'm busy with many conversations right now. Please send that again in a minute.";
/// `meta` key holding the maintenance message while maintenance mode is on.
const MAINTENANCE_KEY: &str = "engine/maintenance";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    #[error("{0}")]
    Tokenizer(String),
}

/// Produces a fresh configuration for `/admin reload` (and SIGHUP): the app re-reads files.
pub type Reloader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Settings that `reload` swaps as a whole (bots and prompts; SIGHUP / `/admin reload`).
struct Settings {
    config: Arc<Config>,
    prompts: Prompts,
}

pub struct Engine {
    settings: RwLock<Arc<Settings>>,
    store: Arc<dyn Store>,
    llm: Arc<ResilientLlm>,
    tokenizer: Tokenizer,
    limits: Limits,
    locks: ConversationLocks,
    /// One LLM call in flight per user, across all their conversations and bots.
    user_calls: ConversationLocks,
    maintenance: RwLock<Option<String>>,
    started: Instant,
    reloader: RwLock<Option<Reloader>>,
    /// Token counts of rendered system prompts (they repeat: one per bot, user name and day).
    system_tokens: Mutex<HashMap<u64, usize>>,
    /// Users who asked `/forget` and have until this instant to confirm.
    forget_requests: Mutex<HashMap<UserRef, Instant>>,
    pub stats: EngineStats,
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The per-message limits in force for a user on a bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub per_minute: u32,
    pub burst: u32,
    pub daily_tokens: u64,
}

/// What `handle` decided before the adapter sends it.
struct Decided {
    reply: Reply,
}

impl Engine {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        llm: Arc<ResilientLlm>,
    ) -> Result<Self, EngineError> {
        let prompts = Prompts::new(&config.prompts)?;
        let tokenizer = Tokenizer::load().map_err(EngineError::Tokenizer)?;
        let maintenance = match store.meta_get(MAINTENANCE_KEY) {
            Ok(m) => m.map(|b| String::from_utf8_lossy(&b).into_owned()),
            Err(e) => {
                tracing::error!(error = %e, "could not read the stored maintenance mode");
                None
            }
        };
        if maintenance.is_some() {
            tracing::warn!("maintenance mode is on (kept from before the restart)");
        }
        Ok(Self {
            settings: RwLock::new(Arc::new(Settings {
                config: Arc::new(config),
                prompts,
            })),
            store,
            llm,
            tokenizer,
            limits: Limits::new(),
            locks: ConversationLocks::default(),
            user_calls: ConversationLocks::default(),
            maintenance: RwLock::new(maintenance),
            started: Instant::now(),
            reloader: RwLock::new(None),
            system_tokens: Mutex::new(HashMap::new()),
            forget_requests: Mutex::new(HashMap::new()),
            stats: EngineStats::default(),
        })
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.settings().config.clone()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn llm(&self) -> &Arc<ResilientLlm> {
        &self.llm
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Swaps in new bots and prompts (the store, limits and connections stay).
    pub fn reload(&self, config: Config) -> Result<(), EngineError> {
        let prompts = Prompts::new(&config.prompts)?;
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Settings {
            config: Arc::new(config),
            prompts,
        });
        tracing::info!("configuration reloaded");
        Ok(())
    }

    pub fn set_reloader(&self, reloader: Reloader) {
        *self.reloader.write().unwrap_or_else(|p| p.into_inner()) = Some(reloader);
    }

    /// Re-reads bots and prompts through the reloader (`/admin reload`, SIGHUP).
    pub fn reload_now(&self) -> Result<(), String> {
        let fresh = {
            let r = self.reloader.read().unwrap_or_else(|p| p.into_inner());
            match r.as_ref() {
                Some(load) => load()?,
                None => return Err("reload is not available in this mode".into()),
            }
        };
        self.reload(fresh).map_err(|e| e.to_string())
    }

    fn forget_requests_insert(&self, user: UserRef) {
        let mut m = self
            .forget_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, until| *until > now);
        m.insert(user, now + admin::FORGET_WINDOW);
    }

    /// True (and consumed) when the user asked `/forget` within the window.
    fn forget_requests_take(&self, user: &UserRef) -> bool {
        let mut m = self
            .forget_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.remove(user).is_some_and(|until| until > Instant::now())
    }

    fn forget_requests_remove(&self, user: &UserRef) {
        self.forget_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }

    /// Turns maintenance mode on (with the message non-admins get) or off. It is kept
    /// in the store, so it survives a restart.
    pub fn set_maintenance(&self, message: Option<String>) {
        let stored = match &message {
            Some(m) => self.store.meta_put(MAINTENANCE_KEY, m.as_bytes()),
            None => self.store.meta_remove(MAINTENANCE_KEY),
        };
        if let Err(e) = stored {
            tracing::error!(error = %e, "could not store the maintenance mode; it lasts until a restart");
        }
        *self.maintenance.write().unwrap_or_else(|p| p.into_inner()) = message;
    }

    pub fn maintenance(&self) -> Option<String> {
        self.maintenance
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_admin(&self, user: &UserRef) -> bool {
        let cfg = self.config();
        match user.platform {
            Platform::Telegram => user.id.parse().is_ok_and(|id| cfg.is_admin_telegram(id)),
            Platform::Discord => user.id.parse().is_ok_and(|id| cfg.is_admin_discord(id)),
            // `confab chat` runs with shell access to the data: the operator.
            Platform::Terminal => true,
        }
    }

    pub fn effective_limits(
        &self,
        cfg: &Config,
        bot: &BotConfig,
        record: Option<&UserRecord>,
    ) -> EffectiveLimits {
        let mut l = EffectiveLimits {
            per_minute: cfg.limits.messages_per_minute,
            burst: cfg.limits.burst,
            daily_tokens: cfg.limits.daily_tokens,
        };
        if let Some(b) = &bot.limits {
            l.per_minute = b.messages_per_minute.unwrap_or(l.per_minute);
            l.burst = b.burst.unwrap_or(l.burst);
            l.daily_tokens = b.daily_tokens.unwrap_or(l.daily_tokens);
        }
        if let Some(r) = record {
            l.per_minute = r.limit_per_minute.unwrap_or(l.per_minute);
            l.daily_tokens = r.limit_daily_tokens.unwrap_or(l.daily_tokens);
        }
        l
    }

    /// The durable id of an update, unique across bots and platforms.
    fn update_key(inbound: &Inbound) -> Option<String> {
        inbound
            .update_id
            .as_ref()
            .map(|id| format!("{}/{}/{}", inbound.bot, inbound.platform.prefix(), id))
    }

    /// Handles one inbound message and returns what to send. After the adapter has sent
    /// it, it calls [`Engine::mark_sent`].
    pub async fn handle(&self, inbound: &Inbound) -> Reply {
        self.handle_streaming(inbound, None).await
    }

    /// Like [`Engine::handle`]; for bots with `stream = true`, the text so far is
    /// published on `partial` as it arrives (the returned reply is always complete).
    pub async fn handle_streaming(
        &self,
        inbound: &Inbound,
        partial: Option<&watch::Sender<String>>,
    ) -> Reply {
        let started = Instant::now();
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let _guard = self.locks.acquire(inbound.conversation().to_string()).await;
        let reply = match self.decide(inbound, partial).await {
            Ok(d) => d.reply,
            Err(e) => {
                tracing::error!(error = %e, "store failure while handling a message");
                Reply::notice(Rejection::Internal, MSG_INTERNAL)
            }
        };
        self.stats.outcome(reply.outcome());
        if let Reply::Text { kind, .. } = &reply {
            if matches!(kind, ReplyKind::Answer | ReplyKind::Cached) {
                self.stats.observe_latency(started.elapsed());
            }
        }
        reply
    }

    /// `None` when the key is within its quota; else the one notice per window, then silence.
    fn rate_gate(&self, key: u64, per_minute: u32, burst: u32) -> Option<Reply> {
        match self.limits.check(key, per_minute, burst) {
            RateDecision::Allowed => None,
            RateDecision::Notify { retry_in } => {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                Some(Reply::notice(
                    Rejection::RateLimited,
                    format!(
                        "You're sending messages too fast. Try again in {}.",
                        human_duration(retry_in.as_secs_f64().ceil() as u64)
                    ),
                ))
            }
            RateDecision::Silent => {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                Some(Reply::Silent)
            }
        }
    }

    /// Tokens of a rendered system prompt, counted once per distinct text (bounded memo).
    fn system_tokens(&self, system: &str) -> usize {
        use std::hash::{BuildHasher, RandomState};
        static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let h = HASHER.get_or_init(RandomState::new).hash_one(system);
        let memo = self.system_tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&n) = memo.get(&h) {
            return n;
        }
        drop(memo);
        let n = self.tokenizer.count(system);
        let mut memo = self.system_tokens.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() >= 4096 {
            memo.clear();
        }
        memo.insert(h, n);
        n
    }

    /// Records that the reply to this update reached the platform.
    pub fn mark_sent(&self, inbound: &Inbound) {
        if let Some(key) = Self::update_key(inbound) {
            let entry = HandledEntry {
                state: Handled::Sent,
                at: now_unix(),
                user: None,
            };
            if let Err(e) = self.store.set_handled(&key, &entry) {
                tracing::error!(error = %e, "could not record a sent reply");
            }
        }
    }

    async fn decide(
        &self,
        inbound: &Inbound,
        partial: Option<&watch::Sender<String>>,
    ) -> Result<Decided, StoreError> {
        let done = |reply: Reply| Ok(Decided { reply });
        let update_key = Self::update_key(inbound);
        if let Some(key) = &update_key {
            match self.store.handled(key)? {
                Some(HandledEntry {
                    state: Handled::Sent,
                    ..
                }) => {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    return done(Reply::Silent);
                }
                // Decided and stored before a crash, never confirmed sent: send it again
                // without asking the LLM (and without storing the turns twice).
                Some(HandledEntry {
                    state: Handled::Pending { reply },
                    ..
                }) => return done(Reply::text(reply, ReplyKind::Answer)),
                None => {}
            }
        }

        let settings = self.settings();
        let cfg = &settings.config;
        let Some(bot) = cfg.bot(&inbound.bot) else {
            tracing::error!(bot = %inbound.bot, "message for a bot that is not configured");
            return done(Reply::Silent);
        };
        let user = inbound.user();
        let admin = self.is_admin(&user);
        let record = self.store.user(&user)?;

        // Ban and maintenance come before anything else a user can trigger.
        if let Some(ban) = record.as_ref().and_then(|r| r.banned.as_ref()) {
            if ban.notified {
                return done(Reply::Silent);
            }
            self.store.update_user(&user, &mut |r| {
                if let Some(b) = r.banned.as_mut() {
                    b.notified = true;
                }
            })?;
            return done(Reply::notice(Rejection::Banned, MSG_BANNED));
        }
        if let Some(msg) = self.maintenance() {
            if !admin {
                return done(Reply::notice(Rejection::Maintenance, msg));
            }
        }

        let text = match &inbound.content {
            Content::Text(t) if !t.trim().is_empty() => t.as_str(),
            _ => {
                return done(if inbound.is_private {
                    Reply::notice(Rejection::NonText, MSG_NON_TEXT)
                } else {
                    Reply::Silent
                });
            }
        };

        // Forwarded text is someone else's words: never run as a command.
        if let Some(cmd) = commands::parse(text).filter(|_| !inbound.forwarded) {
            // Commands have their own, more generous quota: cheap, but not free.
            if !admin {
                let key = limit_key(&inbound.bot, &commands_limit_user(&user));
                let (per_minute, burst) =
                    (cfg.limits.commands_per_minute, cfg.limits.commands_burst);
                if let Some(reply) = self.rate_gate(key, per_minute, burst) {
                    return done(reply);
                }
            }
            return self
                .command(cmd, inbound, text, cfg, bot, record.as_ref())
                .map(|reply| Decided { reply });
        }

        let chars = text.chars().count();
        if chars > cfg.limits.max_input_chars {
            return done(Reply::notice(
                Rejection::TooLong,
                format!(
                    "Your message is too long ({chars} chars, limit {}). Please shorten it.",
                    cfg.limits.max_input_chars
                ),
            ));
        }

        let limits = self.effective_limits(cfg, bot, record.as_ref());
        if !admin {
            let key = limit_key(&inbound.bot, &user.to_string());
            if let Some(reply) = self.rate_gate(key, limits.per_minute, limits.burst) {
                return done(reply);
            }

            let now = now_unix();
            let today = utc_day(now);
            let usage = record.as_ref().map(|r| &r.usage);
            let used_today = usage.filter(|u| u.day == today).map_or(0, |u| u.tokens);
            if used_today >= limits.daily_tokens {
                let already = usage.is_some_and(|u| u.day == today && u.budget_notified);
                if already {
                    return done(Reply::Silent);
                }
                self.store.update_user(&user, &mut |r| {
                    roll_day(r, today);
                    r.usage.budget_notified = true;
                })?;
                return done(Reply::notice(
                    Rejection::BudgetExhausted,
                    format!(
                        "You've used today's token budget ({} tokens). It resets in {} (midnight UTC).",
                        limits.daily_tokens,
                        human_duration(secs_until_reset(now) as u64)
                    ),
                ));
            }
        }

        self.answer(
            inbound,
            cfg,
            &settings.prompts,
            bot,
            text,
            update_key.as_deref(),
            partial,
        )
        .await
        .map(|reply| Decided { reply })
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        inbound: &Inbound,
        cfg: &Config,
        prompts: &Prompts,
        bot: &BotConfig,
        text: &str,
        update_key: Option<&str>,
        partial: Option<&watch::Sender<String>>,
    ) -> Result<Reply, StoreError> {
        let user = inbound.user();
        let conv = inbound.conversation();
        let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let system = match prompts.render(
            &bot.prompt,
            &PromptVars {
                bot_name: &bot.name,
                user_name: &inbound.user_name,
                platform: inbound.platform.name(),
                date: &date,
            },
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "prompt rendering failed");
                return Ok(Reply::notice(Rejection::Internal, MSG_INTERNAL));
            }
        };
        let system_tokens = self.system_tokens(&system);
        let user_tokens = self.tokenizer.count(text);
        let mut history_budget = cfg
            .memory
            .max_context_tokens
            .saturating_sub(system_tokens + user_tokens);

        let model = bot.model.clone().unwrap_or_else(|| cfg.llm.model.clone());
        let temperature = bot.temperature.or(cfg.llm.temperature);
        let max_tokens = bot.max_tokens.or(cfg.llm.max_tokens);
        let stream = bot.stream && partial.is_some();

        let mut tried_shorter = false;
        loop {
            let history = self.store.recent_turns(&conv, history_budget)?;
            let history_tokens: u64 = history.iter().map(|t| t.tokens as u64).sum();
            let context: Vec<ChatMessage> = history
                .iter()
                .map(|t| {
                    let role = match t.role {
                        Role::User => ChatRole::User,
                        Role::Assistant => ChatRole::Assistant,
                    };
                    ChatMessage::new(role, t.text.clone())
                })
                .collect();

            let cache_key = cfg.cache.enabled.then(|| {
                let scope_user = (cfg.cache.scope == CacheScope::User).then_some(&user);
                cache::key(&cache::KeyInput {
                    model: &model,
                    temperature,
                    max_tokens,
                    system: &system,
                    context: &context,
                    question: text,
                    user: scope_user,
                })
            });
            if let Some(key) = &cache_key {
                let now = now_unix();
                match self.store.cache_get(key)? {
                    Some(hit) if now - hit.created_at < cfg.cache.ttl_secs as i64 => {
                        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .cache_tokens_saved
                            .fetch_add(hit.tokens, Ordering::Relaxed);
                        if let Some(p) = partial {
                            p.send_replace(hit.reply.clone());
                        }
                        let reply_tokens = match hit.reply_tokens {
                            0 => self.tokenizer.count(&hit.reply) as u64,
                            n => n,
                        };
                        self.remember(
                            inbound,
                            text,
                            user_tokens,
                            &hit.reply,
                            reply_tokens,
                            update_key,
                            0,
                        )
                        .await?;
                        return Ok(Reply::text(hit.reply, ReplyKind::Cached));
                    }
                    _ => {
                        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }

            let mut messages = Vec::with_capacity(context.len() + 2);
            messages.push(ChatMessage::new(ChatRole::System, system.clone()));
            messages.extend(context);
            messages.push(ChatMessage::new(ChatRole::User, text));
            let request = ChatRequest {
                model: model.clone(),
                messages,
                temperature,
                max_tokens,
            };
            let prompt_estimate = (system_tokens + user_tokens) as u64 + history_tokens;
            let (result, wasted) = self
                .call_llm(&user, request, partial.filter(|_| stream), prompt_estimate)
                .await;
            if result.is_err() && wasted > 0 {
                // Failed attempts may have been paid for: they count against the budget.
                self.charge(&user, wasted)?;
            }
            match result {
                Ok(resp) => {
                    let prompt_tokens = if resp.prompt_tokens > 0 {
                        resp.prompt_tokens
                    } else {
                        (system_tokens + user_tokens) as u64 + history_tokens
                    };
                    let completion_tokens = if resp.completion_tokens > 0 {
                        resp.completion_tokens
                    } else {
                        self.tokenizer.count(&resp.text) as u64
                    };
                    let cost = prompt_tokens + completion_tokens + wasted;
                    if let Some(key) = &cache_key {
                        let entry = CacheEntry {
                            reply: resp.text.clone(),
                            tokens: cost,
                            reply_tokens: completion_tokens,
                            created_at: now_unix(),
                            origin: user.clone(),
                            model: model.clone(),
                        };
                        if let Err(e) = self.store.cache_put(key, &entry, cfg.cache.max_entries) {
                            tracing::error!(error = %e, "could not store a cache entry");
                        }
                    }
                    self.remember(
                        inbound,
                        text,
                        user_tokens,
                        &resp.text,
                        completion_tokens,
                        update_key,
                        cost,
                    )
                    .await?;
                    return Ok(Reply::text(resp.text, ReplyKind::Answer));
                }
                Err(LlmError::ContextLength) if !tried_shorter && history_tokens > 0 => {
                    // Our count is cl100k's; the model's differs. Halve what we sent.
                    tracing::warn!(
                        "context too long for the model; retrying with half the history"
                    );
                    tried_shorter = true;
                    history_budget = (history_tokens / 2) as usize;
                }
                Err(LlmError::CircuitOpen) => {
                    return Ok(Reply::notice(
                        Rejection::LlmUnavailable,
                        MSG_LLM_UNAVAILABLE,
                    ));
                }
                Err(LlmError::Busy) => {
                    return Ok(Reply::notice(Rejection::Busy, MSG_BUSY));
                }
                Err(e) => {
                    tracing::warn!(error = %e, kind = e.kind(), "LLM call failed; apologising");
                    return Ok(Reply::notice(Rejection::LlmFailed, MSG_LLM_FAILED));
                }
            }
        }
    }

    /// One LLM call for `user` (at most one in flight per user; waiting for it is bounded
    /// like waiting for an LLM slot). Returns the result and the tokens spent on attempts
    /// that failed — the prompt of each failed attempt, plus whatever a broken stream
    /// had already produced — which the caller charges to the user.
    async fn call_llm(
        &self,
        user: &UserRef,
        request: ChatRequest,
        partial: Option<&watch::Sender<String>>,
        prompt_estimate: u64,
    ) -> (Result<ChatResponse, LlmError>, u64) {
        let wait = Duration::from_secs(self.config().llm.queue_timeout_secs);
        let Ok(_mine) = tokio::time::timeout(wait, self.user_calls.acquire(user.to_string())).await
        else {
            return (Err(LlmError::Busy), 0);
        };
        match partial {
            None => {
                let billed = self.llm.complete_billed(request).await;
                let wasted = billed.billable_failures as u64 * prompt_estimate;
                (billed.result, wasted)
            }
            Some(p) => self.stream_call(request, p, prompt_estimate).await,
        }
    }

    async fn stream_call(
        &self,
        request: ChatRequest,
        partial: &watch::Sender<String>,
        prompt_estimate: u64,
    ) -> (Result<ChatResponse, LlmError>, u64) {
        let billed = self.llm.stream(request).await;
        let mut wasted = billed.billable_failures as u64 * prompt_estimate;
        let mut deltas = match billed.result {
            Ok(d) => d,
            Err(e) => return (Err(e), wasted),
        };
        let mut text = String::new();
        while let Some(item) = deltas.next().await {
            match item {
                Ok(delta) => {
                    text.push_str(&delta);
                    partial.send_replace(text.clone());
                }
                Err(e) => {
                    // The endpoint generated (and bills) what it streamed before failing.
                    wasted += prompt_estimate + self.tokenizer.count(&text) as u64;
                    return (Err(e), wasted);
                }
            }
        }
        if text.trim().is_empty() {
            wasted += prompt_estimate;
            return (
                Err(LlmError::BadResponse("empty streamed answer".into())),
                wasted,
            );
        }
        let response = ChatResponse {
            text,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        (Ok(response), wasted)
    }

    /// Adds tokens to the user's usage today without storing any turn.
    fn charge(&self, user: &UserRef, tokens: u64) -> Result<(), StoreError> {
        let today = utc_day(now_unix());
        self.store.update_user(user, &mut |r| {
            roll_day(r, today);
            r.usage.tokens += tokens;
            r.usage.total_tokens += tokens;
        })?;
        Ok(())
    }

    /// Appends both turns, the pending reply and the user's usage in one atomic batch and
    /// makes it durable (group commit). Only then may the reply be sent.
    #[allow(clippy::too_many_arguments)]
    async fn remember(
        &self,
        inbound: &Inbound,
        text: &str,
        user_tokens: usize,
        reply: &str,
        reply_tokens: u64,
        update_key: Option<&str>,
        cost: u64,
    ) -> Result<(), StoreError> {
        let now = now_unix();
        let turns = [
            Turn {
                role: Role::User,
                text: text.to_string(),
                tokens: user_tokens as u32,
                at: now,
            },
            Turn {
                role: Role::Assistant,
                text: reply.to_string(),
                tokens: reply_tokens.min(u32::MAX as u64) as u32,
                at: now,
            },
        ];
        let pending = HandledEntry {
            state: Handled::Pending {
                reply: reply.to_string(),
            },
            at: now,
            user: Some(inbound.user()),
        };
        let today = utc_day(now);
        let mut book = |r: &mut UserRecord| {
            roll_day(r, today);
            if r.first_seen == 0 {
                r.first_seen = now;
            }
            r.last_seen = now;
            if r.name.as_deref() != Some(inbound.user_name.as_str()) {
                r.name = Some(inbound.user_name.clone());
            }
            // A platform with usernames says when one was dropped, too.
            if inbound.platform != Platform::Terminal && r.username != inbound.username {
                r.username = inbound.username.clone();
            }
            r.usage.tokens += cost;
            r.usage.messages += 1;
            r.usage.total_tokens += cost;
            r.usage.total_messages += 1;
        };
        let user = inbound.user();
        self.store.record_exchange(Exchange {
            conversation: &inbound.conversation(),
            turns: &turns,
            handled: update_key.map(|k| (k, &pending)),
            user: Some((&user, &mut book)),
        })?;
        self.store.flush().await
    }

    fn command(
        &self,
        cmd: Command,
        inbound: &Inbound,
        text: &str,
        cfg: &Config,
        bot: &BotConfig,
        record: Option<&UserRecord>,
    ) -> Result<Reply, StoreError> {
        let cmd_is_personal = matches!(cmd, Command::Usage);
        let reply = match cmd {
            Command::Start => format!(
                "Hi {}! I'm {}, an AI assistant. Just write to me.\n\n{}",
                inbound.user_name,
                bot.name,
                commands::help_text()
            ),
            Command::Help => commands::help_text(),
            Command::Reset => {
                let n = self.store.clear_conversation(&inbound.conversation())?;
                format!("Done: I forgot this conversation ({n} messages).")
            }
            Command::Usage => {
                let limits = self.effective_limits(cfg, bot, record);
                let now = now_unix();
                let today = utc_day(now);
                let used = record
                    .filter(|r| r.usage.day == today)
                    .map_or(0, |r| r.usage.tokens);
                if self.is_admin(&inbound.user()) {
                    format!("You are an admin: no limits apply. Tokens used today: {used}.")
                } else {
                    format!(
                        "Limits: {} messages per minute (burst {}), {} tokens per day.\nUsed today: {} tokens ({} left). The budget resets in {} (midnight UTC).",
                        limits.per_minute,
                        limits.burst,
                        limits.daily_tokens,
                        used,
                        limits.daily_tokens.saturating_sub(used),
                        human_duration(secs_until_reset(now) as u64)
                    )
                }
            }
            // Personal output: only the asking user may read it.
            Command::Export => return self.export(inbound).map(Reply::personal),
            Command::Forget { confirm } => {
                return self.forget(inbound, confirm).map(Reply::personal)
            }
            Command::Admin(parsed) => {
                return self.admin(inbound, text, parsed).map(Reply::personal)
            }
            Command::Unknown(name) => {
                return Ok(Reply::notice(
                    Rejection::BadCommand,
                    format!("Unknown command /{name}.\n{}", commands::help_text()),
                ))
            }
        };
        let reply = Reply::text(reply, ReplyKind::Command);
        Ok(match cmd_is_personal {
            true => reply.personal(),
            false => reply,
        })
    }

    /// Periodic housekeeping: memory retention, cache expiry, limiter pruning, old
    /// handled-update markers. Returns a summary for the log.
    pub fn sweep(&self) -> Result<SweepReport, StoreError> {
        let cfg = self.config();
        let now = now_unix();
        let retention = cfg.memory.retention_days as i64 * 86_400;
        Ok(SweepReport {
            turns_purged: self.store.purge_turns_before(now - retention)?,
            cache_expired: self.store.cache_expire(now - cfg.cache.ttl_secs as i64)?,
            // A redelivered update older than a week is not a redelivery worth catching.
            handled_purged: self.store.purge_handled_before(now - 7 * 86_400)?,
            audit_purged: self
                .store
                .audit_purge_before(now - cfg.audit.retention_days as i64 * 86_400)?,
            limiter_keys: self.limits.prune(),
        })
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub turns_purged: usize,
    pub cache_expired: usize,
    pub handled_purged: usize,
    pub audit_purged: usize,
    pub limiter_keys: usize,
}

/// The limiter identity of a user's commands (a quota apart from their messages).
pub(crate) fn commands_limit_user(user: &UserRef) -> String {
    format!("cmd:{user}")
}

/// Starts a new usage day when the UTC date changed.
fn roll_day(r: &mut UserRecord, today: i64) {
    if r.usage.day != today {
        r.usage.day = today;
        r.usage.tokens = 0;
        r.usage.messages = 0;
        r.usage.budget_notified = false;
    }
}
