//! Per-conversation ordering: one message of a conversation at a time, conversations in
//! parallel. In one process that is [`ConversationLocks`] (a fair local lock per
//! conversation); across instances [`RedisOrdering`] adds an expiring Redis lease per
//! conversation on top of the same local lock, so a dead instance's lease frees itself.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::events::{CoordStats, OrderingTimedOut};
use super::lease::{Held, Lease};
use crate::engine::ordering::{ConversationGuard, ConversationLocks};
use crate::events::Event;
use crate::store::crypto::IndexKey;

/// The conversation stayed taken past the waiting bound (or Redis did not answer):
/// the engine refuses the message with the busy apology.
#[derive(Debug, thiserror::Error)]
#[error("the conversation is busy elsewhere")]
pub struct OrderingBusy {
    /// The last try found the lease held by another holder (`false`: Redis did not
    /// answer it).
    pub held_elsewhere: bool,
}

/// Held while one message of a conversation is handled; dropping it lets the next in.
pub struct OrderingGuard<'a> {
    // Dropped first: the lease is released before the next local waiter asks for it.
    _lease: Option<Held>,
    _local: ConversationGuard<'a>,
}

pub trait ConversationOrdering: Send + Sync {
    /// Waits for the conversation (FIFO among this instance's waiters).
    fn acquire(&self, key: String) -> BoxFuture<'_, Result<OrderingGuard<'_>, OrderingBusy>>;
}

impl ConversationOrdering for ConversationLocks {
    fn acquire(&self, key: String) -> BoxFuture<'_, Result<OrderingGuard<'_>, OrderingBusy>> {
        Box::pin(async move {
            Ok(OrderingGuard {
                _lease: None,
                _local: ConversationLocks::acquire(self, key).await,
            })
        })
    }
}

/// Timings of conversation leases: expiry (a dead holder's lease frees itself after
/// it), renewal while held, and the longest wait before the busy apology.
#[derive(Debug, Clone, Copy)]
pub struct OrderingTimes {
    pub ttl: Duration,
    pub renew_every: Duration,
    pub max_wait: Duration,
}

impl Default for OrderingTimes {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            max_wait: Duration::from_secs(30),
        }
    }
}

/// The local lock, then a Redis lease `<prefix>:conv:{<conversation>}` (the
/// conversation hashed with a data key, see [`lease_name`]); waiters retry
/// with a short backoff (10 ms doubling to 200 ms) until `max_wait`.
pub struct RedisOrdering {
    local: ConversationLocks,
    conn: ConnectionManager,
    /// `<prefix>:conv` for conversations, `<prefix>:calls` for a user's LLM calls.
    prefix: String,
    times: OrderingTimes,
    stats: Arc<CoordStats>,
    secret: Option<Arc<str>>,
    hide: Option<IndexKey>,
}

impl RedisOrdering {
    pub(super) fn new(
        conn: ConnectionManager,
        prefix: String,
        times: OrderingTimes,
        stats: Arc<CoordStats>,
        secret: Option<Arc<str>>,
    ) -> Self {
        Self {
            local: ConversationLocks::default(),
            conn,
            prefix: format!("{prefix}:conv"),
            times,
            stats,
            secret,
            hide: None,
        }
    }

    /// Names leases with the store's keyed hash (`CONFAB_DATA_KEY` set).
    pub(super) fn hiding_ids(mut self, hide: Option<IndexKey>) -> Self {
        self.hide = hide;
        self
    }

    /// The same machinery keyed `<prefix>:calls:{<user>}` (not `user:`: that is the
    /// store's user record): one LLM call in flight per
    /// user across instances.
    pub(super) fn for_users(mut self) -> Self {
        if let Some(base) = self.prefix.strip_suffix(":conv") {
            self.prefix = format!("{base}:calls");
        }
        self
    }

    /// The lease of one conversation, unheld.
    pub fn lease(&self, conversation: &str) -> Lease {
        let name = lease_name(self.hide.as_ref(), conversation);
        let key = format!("{}:{{{name}}}", self.prefix);
        Lease::new(self.conn.clone(), key, self.times.ttl, self.secret.clone())
    }

    async fn take(&self, conversation: &str) -> Result<Held, OrderingBusy> {
        let lease = Arc::new(self.lease(conversation));
        let deadline = Instant::now() + self.times.max_wait;
        let mut backoff = Duration::from_millis(10);
        loop {
            let held_elsewhere = match lease.try_acquire().await {
                Ok(true) => break,
                Ok(false) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "conversation lease unavailable");
                    false
                }
            };
            let now = Instant::now();
            if now >= deadline {
                OrderingTimedOut.emit(&self.stats);
                return Err(OrderingBusy { held_elsewhere });
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 10);
            tokio::time::sleep((backoff + jitter).min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        // Losing it mid-message (Redis gone for a whole ttl) is logged by the renewer;
        // the message in hand is finished.
        let lost = CancellationToken::new();
        Ok(lease.keep(self.times.renew_every, lost, None))
    }
}

/// `<prefix>:conv:{<conversation>}` (hash-tagged: one Cluster slot per conversation).
pub(super) fn conversation_key(
    prefix: &str,
    hide: Option<&IndexKey>,
    conversation: &str,
) -> String {
    format!("{prefix}:conv:{{{}}}", lease_name(hide, conversation))
}

/// What a lease key carries for `name` (a conversation, a user, `claim:<update>`):
/// `name` as is, or with a data key the hex of the store's keyed hash of it, so no key
/// name reveals a Telegram/Discord id.
fn lease_name(hide: Option<&IndexKey>, name: &str) -> String {
    match hide {
        Some(k) => k.hex16(b"lease", name.as_bytes()),
        None => name.to_string(),
    }
}

impl ConversationOrdering for RedisOrdering {
    fn acquire(&self, key: String) -> BoxFuture<'_, Result<OrderingGuard<'_>, OrderingBusy>> {
        Box::pin(async move {
            let local = self.local.acquire(key.clone()).await;
            let held = self.take(&key).await?;
            Ok(OrderingGuard {
                _lease: Some(held),
                _local: local,
            })
        })
    }
}
