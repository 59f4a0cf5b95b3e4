//! Persistent state behind role traits: [`ConversationStore`] (turns), [`UserStore`]
//! (users, usage, usernames, forget), [`CacheStore`], [`AuditStore`], [`InboxStore`]
//! (inbox, intake positions, handled markers: what adapters use) and [`MetaStore`], each
//! with [`Durable::flush`]. [`Store`] is all of them, for the engine.
//!
//! [`sled_store::SledStore`] (one process, embedded; backups and restores are its own
//! methods) and [`redis_store::RedisStore`] (several instances on one Redis) implement
//! the same roles, one file per role each.

pub(crate) mod codec;
pub mod crypto;
pub mod redis_store;
pub mod sled_store;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::domain::{ConversationKey, Platform, UserRef};

pub use crypto::{BackupAuth, BackupMac};
pub use redis_store::{RedisOptions, RedisStats, RedisStore};
pub use sled_store::{backup_auth_for_rows, SledStore, FORGOTTEN};

/// The store a daemon opened: every role behind [`Store`], plus the concrete backend
/// for what only one of them does (sled's backups, Redis's health and settings).
#[derive(Clone)]
pub enum Backend {
    Sled(std::sync::Arc<SledStore>),
    Redis(std::sync::Arc<RedisStore>),
}

impl Backend {
    /// Every role, for the engine.
    pub fn store(&self) -> std::sync::Arc<dyn Store> {
        match self {
            Backend::Sled(s) => s.clone(),
            Backend::Redis(r) => r.clone(),
        }
    }

    /// The sled store (backups, restores), if that is the backend.
    pub fn sled(&self) -> Option<&std::sync::Arc<SledStore>> {
        match self {
            Backend::Sled(s) => Some(s),
            Backend::Redis(_) => None,
        }
    }

    /// The Redis store, if that is the backend.
    pub fn redis(&self) -> Option<&std::sync::Arc<RedisStore>> {
        match self {
            Backend::Redis(r) => Some(r),
            Backend::Sled(_) => None,
        }
    }
}

/// What the control socket says to a backup request on Redis: the CLI reads Redis itself.
pub const REDIS_BACKUP_UNSUPPORTED: &str =
    "on redis the daemon does not stream backups: run `confab backup`, which reads Redis directly";

/// Bumped when the on-disk layout changes; `open` refuses a newer store and upgrades an
/// older one. 2: usernames indexed per platform. 3 (sled): every role's rows in one
/// tree, new values compact (version byte + postcard). 4 (sled): a `turns` row holds an
/// exchange's turns (its question and answer), not one turn.
pub const SCHEMA_VERSION: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    /// The store did not answer in time or could not be reached (a networked backend:
    /// Redis down or slow). Users get the busy apology; the update stays in the inbox.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store at {path} is schema version {found}, this confab understands up to {supported}; upgrade confab")]
    SchemaTooNew {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("could not open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("corrupt store entry in {tree}: {reason}")]
    Corrupt { tree: &'static str, reason: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

/// One stored message of a conversation. `tokens` is counted once, when stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub tokens: u32,
    /// Unix seconds.
    pub at: i64,
}

/// Per-user record: moderation, overrides and today's usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: Option<String>,
    pub username: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub banned: Option<Ban>,
    /// Admin override of messages/minute (burst stays the configured one).
    pub limit_per_minute: Option<u32>,
    pub limit_daily_tokens: Option<u64>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    pub reason: String,
    pub by: String,
    pub at: i64,
    /// Whether the user was already told (one notice, then silence).
    #[serde(default)]
    pub notified: bool,
}

/// Usage counters for one UTC day (`day` = days since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub day: i64,
    pub tokens: u64,
    pub messages: u64,
    /// The budget notice was sent on this day already.
    pub budget_notified: bool,
    pub total_tokens: u64,
    pub total_messages: u64,
    /// Seconds of audio transcribed today, and whether the audio budget notice was sent.
    #[serde(default)]
    pub audio_secs: u64,
    #[serde(default)]
    pub audio_notified: bool,
    /// Audio seconds and images ever read for this user.
    #[serde(default)]
    pub total_audio_secs: u64,
    #[serde(default)]
    pub total_images: u64,
}

/// A cached LLM reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub reply: String,
    /// Tokens the original call cost (what a hit saves).
    pub tokens: u64,
    /// Tokens of the reply itself (0 in entries written before this field existed).
    #[serde(default)]
    pub reply_tokens: u64,
    pub created_at: i64,
    pub origin: UserRef,
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: i64,
    /// Who acted, e.g. `tg:123`.
    pub actor: String,
    pub command: String,
    pub target: Option<String>,
    /// `ok`, `refused`, or an error text.
    pub result: String,
}

/// State of one platform update, for at-most-once answering across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Handled {
    /// The reply is decided and stored (turns appended) but not confirmed sent.
    Pending { reply: String },
    /// The reply was sent.
    Sent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandledEntry {
    pub state: Handled,
    pub at: i64,
    /// Whose update it was (so `forget` finds pending replies to them).
    /// (Always written: the compact encoding has no optional fields.)
    #[serde(default)]
    pub user: Option<UserRef>,
}

/// What `forget` deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForgetReport {
    pub turns: usize,
    pub conversations: usize,
    pub user_record: bool,
    pub cache_entries: usize,
}

/// The first step of `forget` on every backend: clears each conversation of `user`,
/// counting its turns and itself into `report`, and returns the replies they got (to
/// find pending reply markers written before markers named users).
pub(crate) fn clear_conversations_of(
    store: &(impl ConversationStore + ?Sized),
    user: &UserRef,
    report: &mut ForgetReport,
) -> StoreResult<std::collections::HashSet<String>> {
    let mut replies = std::collections::HashSet::new();
    for (key, turns) in store.user_conversations(user)? {
        let theirs = turns.into_iter().filter(|t| t.role == Role::Assistant);
        replies.extend(theirs.map(|t| t.text));
        report.turns += store.clear_conversation(&key)?;
        report.conversations += 1;
    }
    Ok(replies)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    pub entries: usize,
}

/// What [`ConversationStore::record_exchange`] writes atomically.
pub struct Exchange<'a> {
    pub conversation: &'a ConversationKey,
    pub turns: &'a [Turn],
    pub handled: Option<(&'a str, &'a HandledEntry)>,
    /// The user whose record to update in the same batch (usage, names, last seen).
    pub user: Option<(&'a UserRef, UserUpdate<'a>)>,
}

/// A change to a user's record, applied inside a store batch.
pub type UserUpdate<'a> = &'a mut dyn FnMut(&mut UserRecord);

/// Makes writes durable; every role has it. Role methods are synchronous and fast
/// (in-memory tree operations); [`Durable::flush`] is the one slow, async step and is
/// shared by concurrent callers (group commit).
pub trait Durable: Send + Sync + 'static {
    /// Makes every write so far durable.
    fn flush(&self) -> BoxFuture<'_, StoreResult<()>>;
    /// The Redis round-trip counters, on the Redis backend (`confab_redis_*`).
    fn redis_stats(&self) -> Option<&RedisStats> {
        None
    }
}

/// Conversations: stored turns, per-user conversation index, clearing and retention.
pub trait ConversationStore: Durable {
    /// Append turns to a conversation; optionally record the update as `Pending` in the
    /// same atomic batch, so a crash can never store the turns without the reply (or vice versa).
    fn append_turns(
        &self,
        key: &ConversationKey,
        turns: &[Turn],
        handled: Option<(&str, &HandledEntry)>,
    ) -> StoreResult<()> {
        self.record_exchange(Exchange {
            conversation: key,
            turns,
            handled,
            user: None,
        })
    }
    /// One answered message as one atomic batch: the turns, the `Pending` reply and the
    /// user's usage (the engine's hot path: one write batch, then one shared flush).
    fn record_exchange(&self, exchange: Exchange<'_>) -> StoreResult<()>;
    /// The newest turns whose token counts sum to at most `max_tokens`, oldest first.
    fn recent_turns(&self, key: &ConversationKey, max_tokens: usize) -> StoreResult<Vec<Turn>>;
    /// All turns of a conversation, oldest first.
    fn all_turns(&self, key: &ConversationKey) -> StoreResult<Vec<Turn>>;
    /// Every conversation a user has (on any bot or chat) with its turns.
    fn user_conversations(&self, user: &UserRef) -> StoreResult<Vec<(ConversationKey, Vec<Turn>)>>;
    /// Deletes a conversation's turns; returns how many.
    fn clear_conversation(&self, key: &ConversationKey) -> StoreResult<usize>;
    /// Deletes every turn older than `before` (unix seconds); returns how many.
    fn purge_turns_before(&self, before: i64) -> StoreResult<usize>;
}

/// Users and usage: user records (moderation, overrides, usage), usernames, and
/// forgetting a user.
pub trait UserStore: Durable {
    /// A user's record; `None` if never seen. An unreadable record is an error (never
    /// an empty record: that would lift a ban).
    fn user(&self, user: &UserRef) -> StoreResult<Option<UserRecord>>;
    fn put_user(&self, user: &UserRef, record: &UserRecord) -> StoreResult<()>;
    /// Read-modify-write of a user record, atomic against concurrent updates. An
    /// unreadable record is left as it is and returned as an error.
    fn update_user(
        &self,
        user: &UserRef,
        f: &mut dyn FnMut(&mut UserRecord),
    ) -> StoreResult<UserRecord>;
    fn user_count(&self) -> StoreResult<usize>;
    /// Visits every user record (admin stats); corrupt records are skipped.
    fn for_each_user(&self, f: &mut dyn FnMut(&UserRecord)) -> StoreResult<()>;
    /// The user who now has `@username` (case-insensitive) on `platform`.
    fn find_username(&self, platform: Platform, username: &str) -> StoreResult<Option<UserRef>>;
    /// Deletes everything stored about a user, in every role: turns in every
    /// conversation, the user record and usernames, every cache entry the user
    /// originated, pending replies to them, and their id, usernames and words in the
    /// audit log (entries stay, naming [`FORGOTTEN`]). Adapter-owned inbox entries are
    /// the caller's (the engine's).
    fn forget_user(&self, user: &UserRef) -> StoreResult<ForgetReport>;
}

/// The response cache, keyed by the engine's 32-byte hash.
pub trait CacheStore: Durable {
    fn cache_get(&self, key: &[u8; 32]) -> StoreResult<Option<CacheEntry>>;
    /// Insert, then evict the oldest entries beyond `max_entries`.
    fn cache_put(&self, key: &[u8; 32], entry: &CacheEntry, max_entries: usize) -> StoreResult<()>;
    fn cache_remove(&self, key: &[u8; 32]) -> StoreResult<()>;
    /// Deletes entries created before `before`; returns how many.
    fn cache_expire(&self, before: i64) -> StoreResult<usize>;
    fn cache_clear(&self) -> StoreResult<usize>;
    fn cache_len(&self) -> usize;
}

/// The audit log of admin actions, in write order.
pub trait AuditStore: Durable {
    fn audit_append(&self, entry: &AuditEntry) -> StoreResult<()>;
    /// The newest `n` entries, newest first.
    fn audit_recent(&self, n: usize) -> StoreResult<Vec<AuditEntry>>;
    /// Deletes entries written before `before` (unix seconds); returns how many.
    fn audit_purge_before(&self, before: i64) -> StoreResult<usize>;
}

/// Intake: the durable inbox of received-but-unanswered platform updates
/// (adapter-owned bytes, so that a crash between receiving and answering loses
/// nothing), where each adapter's intake resumes, and the handled markers that make
/// answering at most once. The one role adapters depend on; intake positions are
/// [`MetaStore`] rows on every backend.
pub trait InboxStore: MetaStore {
    fn inbox_put(&self, key: &str, value: &[u8]) -> StoreResult<()>;
    fn inbox_remove(&self, key: &str) -> StoreResult<()>;
    /// Every inbox entry whose key starts with `prefix`, in key order.
    fn inbox_scan(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>>;

    /// Where an adapter's intake resumes (e.g. a Telegram getUpdates offset).
    fn intake_position(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.meta_get(key)
    }
    fn set_intake_position(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.meta_put(key, value)
    }

    fn handled(&self, update: &str) -> StoreResult<Option<HandledEntry>>;
    fn set_handled(&self, update: &str, entry: &HandledEntry) -> StoreResult<()>;
    /// Deletes handled markers older than `before`; returns how many.
    fn purge_handled_before(&self, before: i64) -> StoreResult<usize>;
}

/// Small named values (e.g. the engine's maintenance mode).
pub trait MetaStore: Durable {
    fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()>;
    fn meta_remove(&self, key: &str) -> StoreResult<()>;
}

/// All persistent state: every role, for the one component that needs them all (the
/// engine). Others take the narrower role (`Arc<dyn Store>` upcasts to any of them).
pub trait Store:
    ConversationStore + UserStore + CacheStore + AuditStore + InboxStore + MetaStore
{
}

impl<T> Store for T where
    T: ConversationStore + UserStore + CacheStore + AuditStore + InboxStore + MetaStore + ?Sized
{
}
