//! The conversation engine: one platform-neutral pipeline for every bot and adapter.
//!
//! **Architecture Invariant:** this module imports no platform SDK, no sled and no
//! async-openai; it speaks [`crate::domain`], [`crate::store::Store`] and [`crate::llm`].

pub mod admin;
pub mod bpe;
pub mod cache;
pub mod commands;
pub mod events;
pub mod limits;
pub mod media;
pub mod ordering;
pub mod prompt;
mod stages;
pub mod stats;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{BotConfig, Config};
use crate::coord::{Coordination, RateLimiter};
use crate::domain::{Inbound, Platform, Rejection, Reply, UserRef};
use crate::events::{ErrorKind, Event};
use crate::llm::ResilientLlm;
use crate::store::{Handled, HandledEntry, Store, StoreError, UserRecord};
use events::{InternalCause, InternalError, MessageReceived, ReplyDecided};
use prompt::{Prompts, Tokenizer};
use stages::{Internal, Stop};
use stats::EngineStats;

pub const MSG_NON_TEXT: &str =
    "I can read text, voice messages and images, but not this kind of message.";
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
    /// Rate limits, per-conversation ordering and one LLM call in flight per user
    /// (across all their conversations and bots): local, or shared through Redis.
    coord: Coordination,
    maintenance: RwLock<Option<String>>,
    started: Instant,
    reloader: RwLock<Option<Reloader>>,
    /// Token counts of rendered system prompts (they repeat: one per bot, user name and day).
    system_tokens: Mutex<HashMap<u64, usize>>,
    /// Users who asked `/forget` and have until this instant to confirm.
    forget_requests: Mutex<HashMap<UserRef, Instant>>,
    /// Where each adapter's files are fetched from, by platform and bot.
    media_sources: RwLock<HashMap<(Platform, String), Arc<dyn media::MediaSource>>>,
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

impl Engine {
    /// An engine alone in its process ([`Coordination::local`]).
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        llm: Arc<ResilientLlm>,
    ) -> Result<Self, EngineError> {
        Self::with_coordination(config, store, llm, Coordination::local())
    }

    /// An engine whose rate limits and conversation ordering come from `coord`.
    pub fn with_coordination(
        config: Config,
        store: Arc<dyn Store>,
        llm: Arc<ResilientLlm>,
        coord: Coordination,
    ) -> Result<Self, EngineError> {
        let prompts = Prompts::new(&config.prompts)?;
        let tokenizer = Tokenizer::load().map_err(EngineError::Tokenizer)?;
        let maintenance = match store.meta_get(MAINTENANCE_KEY) {
            Ok(m) => m.map(|b| String::from_utf8_lossy(&b).into_owned()),
            Err(e) => {
                tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not read the stored maintenance mode");
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
            coord,
            maintenance: RwLock::new(maintenance),
            started: Instant::now(),
            reloader: RwLock::new(None),
            system_tokens: Mutex::new(HashMap::new()),
            forget_requests: Mutex::new(HashMap::new()),
            media_sources: RwLock::new(HashMap::new()),
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

    pub fn limits(&self) -> &dyn RateLimiter {
        self.coord.limiter.as_ref()
    }

    pub fn coordination(&self) -> &Coordination {
        &self.coord
    }

    /// Registers how a bot's files are fetched on a platform (its adapter does).
    pub fn set_media_source(
        &self,
        platform: Platform,
        bot: &str,
        source: Arc<dyn media::MediaSource>,
    ) {
        let mut sources = self
            .media_sources
            .write()
            .unwrap_or_else(|p| p.into_inner());
        sources.insert((platform, bot.to_string()), source);
    }

    fn media_source(&self, platform: Platform, bot: &str) -> Option<Arc<dyn media::MediaSource>> {
        let sources = self.media_sources.read().unwrap_or_else(|p| p.into_inner());
        sources.get(&(platform, bot.to_string())).cloned()
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
            tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not store the maintenance mode; it lasts until a restart");
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
        MessageReceived {
            platform: inbound.platform,
        }
        .emit(&self.stats);
        let conversation = inbound.conversation().to_string();
        let reply = match self.coord.ordering.acquire(conversation).await {
            Ok(_guard) => self.decide_or_apologise(inbound, partial).await,
            Err(_) => Reply::notice(Rejection::Busy, MSG_BUSY),
        };
        ReplyDecided {
            reply: &reply,
            elapsed: started.elapsed(),
        }
        .emit(&self.stats);
        reply
    }

    /// [`Engine::decide`], with an internal failure turned into its notice.
    async fn decide_or_apologise(
        &self,
        inbound: &Inbound,
        partial: Option<&watch::Sender<String>>,
    ) -> Reply {
        match self.decide(inbound, partial).await {
            Ok(reply) | Err(Stop::Reply(reply)) => reply,
            Err(Stop::Internal(failure)) => {
                let (cause, error): (_, &dyn std::fmt::Display) = match &failure {
                    Internal::Store(e) => (InternalCause::Store, e),
                    Internal::Prompt(e) => (InternalCause::Prompt, e),
                };
                InternalError { cause, error }.emit(&self.stats);
                match failure {
                    // A networked store that is down or slow: like a full LLM queue, it
                    // is worth sending again in a minute.
                    Internal::Store(StoreError::Unavailable(_)) => {
                        Reply::notice(Rejection::Busy, MSG_BUSY)
                    }
                    _ => Reply::notice(Rejection::Internal, MSG_INTERNAL),
                }
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
                let cause = InternalCause::MarkSent;
                InternalError { cause, error: &e }.emit(&self.stats);
            }
        }
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
            limiter_keys: self.coord.limiter.prune(),
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
        r.usage.audio_secs = 0;
        r.usage.audio_notified = false;
    }
}
