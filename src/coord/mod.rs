//! Coordination between instances: rate limits, per-conversation ordering and the
//! Telegram polling lease. [`Coordination::local`] is one process (governor in memory,
//! local locks, always polling: the sled default, unchanged); [`Coordination::redis`]
//! shares all three through one Redis (GCRA in a server-side script, expiring leases).
//!
//! Only this module (and `store/redis_store/`) knows the `redis` crate. Redis errors
//! fail closed: a limiter that cannot decide refuses with the busy apology (no LLM spend
//! without a limit), a conversation lease not obtained within the bound likewise, and a
//! polling lease that cannot be renewed stops polling before it could expire.

pub mod events;
pub mod lease;
pub mod limiter;
pub mod ordering;
pub mod redis_limiter;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::engine::ordering::ConversationLocks;
use crate::store::crypto::IndexKey;
pub use events::CoordStats;
pub use lease::{AlwaysPoll, Lease, LeaseTimes, LeasedPoll, PollGate, Turn};
pub use limiter::{GovernorLimiter, RateCheck, RateDecision, RateLimiter};
pub use ordering::{
    ConversationOrdering, OrderingBusy, OrderingGuard, OrderingTimes, RedisOrdering,
};
pub use redis_limiter::RedisLimiter;

/// A Redis failure, its text scrubbed of the URL's password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis: {0}")]
pub struct CoordError(String);

impl CoordError {
    pub(crate) fn redis(e: &redis::RedisError, secret: Option<&str>) -> Self {
        let text = e.to_string();
        Self(match secret {
            Some(s) if !s.is_empty() => text.replace(s, "[REDACTED]"),
            _ => text,
        })
    }
}

/// A lazily connecting manager for `url` (each call bounded by `timeout`; the manager
/// reconnects by itself after errors), and the URL's password to scrub from errors.
pub(crate) fn connect(
    url: &str,
    timeout: Duration,
) -> Result<(ConnectionManager, Option<Arc<str>>), CoordError> {
    let secret: Option<Arc<str>> = url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(Arc::from));
    let err = |e: redis::RedisError| CoordError::redis(&e, secret.as_deref());
    let client = redis::Client::open(url).map_err(err)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(err)?;
    Ok((conn, secret))
}

/// The three coordinated pieces, local or on one Redis.
#[derive(Clone)]
pub struct Coordination {
    pub limiter: Arc<dyn RateLimiter>,
    pub ordering: Arc<dyn ConversationOrdering>,
    /// One LLM call in flight per user (the same machinery, keyed by user).
    pub user_calls: Arc<dyn ConversationOrdering>,
    polling: Polling,
    pub stats: Arc<CoordStats>,
}

#[derive(Clone)]
enum Polling {
    Always,
    Leased {
        conn: ConnectionManager,
        prefix: String,
        times: LeaseTimes,
        secret: Option<Arc<str>>,
        hide: Option<IndexKey>,
    },
}

/// Settings of [`Coordination::redis`] beyond the URL.
#[derive(Debug, Clone)]
pub struct RedisCoordination {
    /// Every key starts with it (`confab:<env>`: environments never share keys).
    pub prefix: String,
    /// Connect and response timeout of each Redis call.
    pub timeout: Duration,
    pub ordering: OrderingTimes,
    pub polling: LeaseTimes,
    /// The store's keyed id hash (with `CONFAB_DATA_KEY`): lease and limiter keys then
    /// carry hashes, never a Telegram/Discord id. `None`: readable keys.
    pub hide_ids: Option<IndexKey>,
}

impl RedisCoordination {
    pub fn new(prefix: impl Into<String>, timeout: Duration) -> Self {
        Self {
            prefix: prefix.into(),
            timeout,
            ordering: OrderingTimes::default(),
            polling: LeaseTimes::default(),
            hide_ids: None,
        }
    }
}

impl Coordination {
    /// One process: governor, local locks, always polling.
    pub fn local() -> Self {
        Self {
            limiter: Arc::new(GovernorLimiter::new()),
            ordering: Arc::new(ConversationLocks::default()),
            user_calls: Arc::new(ConversationLocks::default()),
            polling: Polling::Always,
            stats: Arc::default(),
        }
    }

    /// [`Coordination::redis_with`] with the default timings and the `confab` prefix.
    pub fn redis(url: &str, timeout: Duration) -> Result<Self, CoordError> {
        Self::redis_with(url, RedisCoordination::new("confab", timeout))
    }

    /// Every instance on the Redis at `url` shares limits, ordering and polling, through
    /// its own connection manager (connects lazily: an unreachable Redis shows as errors
    /// on use, never as a panic). Must be called inside a tokio runtime.
    pub fn redis_with(url: &str, settings: RedisCoordination) -> Result<Self, CoordError> {
        let (conn, secret) = connect(url, settings.timeout)?;
        let stats: Arc<CoordStats> = Arc::default();
        let prefix = settings.prefix;
        let hide = settings.hide_ids;
        let ordering = RedisOrdering::new(
            conn.clone(),
            prefix.clone(),
            settings.ordering,
            stats.clone(),
            secret.clone(),
        )
        .hiding_ids(hide.clone());
        let user_calls = RedisOrdering::new(
            conn.clone(),
            prefix.clone(),
            settings.ordering,
            stats.clone(),
            secret.clone(),
        )
        .for_users()
        .hiding_ids(hide.clone());
        let limiter =
            RedisLimiter::new(conn.clone(), prefix.clone(), stats.clone(), secret.clone())
                .hiding_ids(hide.clone());
        Ok(Self {
            limiter: Arc::new(limiter),
            ordering: Arc::new(ordering),
            user_calls: Arc::new(user_calls),
            polling: Polling::Leased {
                conn,
                prefix,
                times: settings.polling,
                secret,
                hide,
            },
            stats,
        })
    }

    /// Whether several instances share this coordination (Redis): the inbox is then
    /// shared too, and an instance may die with entries of it unanswered.
    pub fn is_shared(&self) -> bool {
        matches!(self.polling, Polling::Leased { .. })
    }

    /// Whether this instance may poll `name` (e.g. `telegram/<bot>`) now.
    pub fn poll_gate(&self, name: &str) -> Arc<dyn PollGate> {
        match &self.polling {
            Polling::Always => Arc::new(AlwaysPoll),
            Polling::Leased {
                conn,
                prefix,
                times,
                secret,
                ..
            } => {
                let key = format!("{prefix}:poll:{{{name}}}");
                let lease = Lease::new(conn.clone(), key, times.ttl, secret.clone());
                Arc::new(LeasedPoll {
                    lease: Arc::new(lease),
                    times: *times,
                    stats: self.stats.clone(),
                })
            }
        }
    }

    /// The lease of one conversation (Redis only): for tests and operators' tools.
    pub fn conversation_lease(&self, conversation: &str, ttl: Duration) -> Option<Lease> {
        match &self.polling {
            Polling::Always => None,
            Polling::Leased {
                conn,
                prefix,
                secret,
                hide,
                ..
            } => {
                let key = ordering::conversation_key(prefix, hide.as_ref(), conversation);
                Some(Lease::new(conn.clone(), key, ttl, secret.clone()))
            }
        }
    }

    /// "local" or "redis" (for logs).
    pub fn backend(&self) -> &'static str {
        match self.polling {
            Polling::Always => "local",
            Polling::Leased { .. } => "redis",
        }
    }
}
