//! The shared rate limiter: GCRA in one server-side Lua script, with governor's exact
//! arithmetic (a cell every `floor(60 s / per_minute)` ns, `burst` cells at once, the
//! wait until the next cell), the notice-once state beside it, and the time read from
//! the Redis server (`TIME`), so instance clocks do not matter.
//!
//! Keys (hash-tagged per user key, so both live in one Cluster slot):
//! `<prefix>:rl:{<key>}:<per_minute>:<burst>` holds the theoretical arrival time (one per
//! quota, as governor keeps one limiter per quota) and `<prefix>:rln:{<key>}` the instant
//! until which the user was told. `<key>` is the engine's stable limiter key
//! (`engine::limits::limit_key`) in hex, or with a data key the hex of the store's
//! keyed hash of it (so the key name cannot be matched to an id by trying ids). Both expire when they stop mattering (a state whose
//! arrival time has passed is the same as none), so nothing needs pruning.
//!
//! Times are kept as `"<unix secs> <ns after that second>"` and computed in ns relative
//! to the current second: every number stays an exact integer in Lua's doubles.

use redis::aio::ConnectionManager;
use redis::Script;

use super::events::{CoordStats, LimiterFailed};
use super::limiter::{cell_nanos, RateCheck, RateDecision, RateLimiter};
use super::CoordError;
use crate::events::Event;
use crate::store::crypto::IndexKey;
use std::sync::Arc;
use std::time::Duration;

const GCRA: &str = r#"
local t = tonumber(ARGV[1])
local tau = t * (tonumber(ARGV[2]) - 1)
local now_s, now_ns
if ARGV[3] ~= '' then
  now_s = tonumber(ARGV[3])
  now_ns = tonumber(ARGV[4])
else
  local tm = redis.call('TIME')
  now_s = tonumber(tm[1])
  now_ns = tonumber(tm[2]) * 1000
end
local extra = tonumber(ARGV[5])
local function load(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local s, rel = string.match(v, '^(%-?%d+) (%-?%d+)$')
  if not s then return nil end
  return (tonumber(s) - now_s) * 1e9 + tonumber(rel)
end
local function store(key, at)
  local ttl = math.ceil((at - now_ns) / 1e6) + extra
  if ttl < 1 then ttl = 1 end
  redis.call('SET', key, string.format('%.0f %.0f', now_s, at), 'PX', ttl)
end
local tat = load(KEYS[1]) or now_ns
local earliest = tat - tau
if now_ns < earliest then
  local wait = earliest - now_ns
  local told = load(KEYS[2])
  if told and told > now_ns then
    return {0, wait, 1}
  end
  store(KEYS[2], earliest)
  return {0, wait, 0}
end
local nxt = tat
if now_ns > nxt then nxt = now_ns end
store(KEYS[1], nxt + t)
return {1, 0, 0}
"#;

/// A point in time given to the script instead of the server's clock (tests only).
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub secs: u64,
    pub nanos: u32,
}

/// GCRA on Redis, shared by every instance on it.
pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
    script: Script,
    stats: Arc<CoordStats>,
    secret: Option<Arc<str>>,
    hide: Option<IndexKey>,
}

impl RedisLimiter {
    pub(super) fn new(
        conn: ConnectionManager,
        prefix: String,
        stats: Arc<CoordStats>,
        secret: Option<Arc<str>>,
    ) -> Self {
        Self {
            conn,
            prefix,
            script: Script::new(GCRA),
            stats,
            secret,
            hide: None,
        }
    }

    /// Names keys with the store's keyed hash (`CONFAB_DATA_KEY` set).
    pub fn hiding_ids(mut self, hide: Option<IndexKey>) -> Self {
        self.hide = hide;
        self
    }

    /// The hash-tagged part of a user's keys.
    fn slot(&self, key: u64) -> String {
        match &self.hide {
            Some(k) => k.hex16(b"limit", &key.to_be_bytes()),
            None => format!("{key:016x}"),
        }
    }

    /// A limiter with its own connection to `url` (keys under `prefix`), counting its
    /// failures in `stats`.
    pub fn open(
        url: &str,
        prefix: &str,
        timeout: Duration,
        stats: Arc<CoordStats>,
    ) -> Result<Self, CoordError> {
        let (conn, secret) = super::connect(url, timeout)?;
        Ok(Self::new(conn, prefix.to_string(), stats, secret))
    }

    fn state_key(&self, key: u64, per_minute: u32, burst: u32) -> String {
        format!(
            "{}:rl:{{{}}}:{per_minute}:{burst}",
            self.prefix,
            self.slot(key)
        )
    }

    fn notice_key(&self, key: u64) -> String {
        format!("{}:rln:{{{}}}", self.prefix, self.slot(key))
    }

    /// One check at `at` (the server's time when `None`). With `at` given, keys live a
    /// minute longer than they matter, so a test's made-up clock can run behind real time.
    pub async fn check_at(
        &self,
        key: u64,
        per_minute: u32,
        burst: u32,
        at: Option<At>,
    ) -> Result<RateDecision, CoordError> {
        let burst = burst.max(1);
        let (secs, nanos, extra) = match at {
            Some(a) => (a.secs.to_string(), a.nanos.to_string(), 60_000),
            None => (String::new(), String::new(), 0),
        };
        let mut conn = self.conn.clone();
        let (allowed, wait_ns, told): (i64, i64, i64) = self
            .script
            .key(self.state_key(key, per_minute, burst))
            .key(self.notice_key(key))
            .arg(cell_nanos(per_minute))
            .arg(burst)
            .arg(secs)
            .arg(nanos)
            .arg(extra)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| CoordError::redis(&e, self.secret.as_deref()))?;
        if allowed == 1 {
            return Ok(RateDecision::Allowed);
        }
        let wait = Duration::from_nanos(wait_ns.max(0) as u64);
        Ok(RateDecision::refused(told == 1, wait))
    }
}

impl RateLimiter for RedisLimiter {
    fn check(&self, key: u64, per_minute: u32, burst: u32) -> RateCheck<'_> {
        Box::pin(async move {
            let result = self.check_at(key, per_minute, burst, None).await;
            if let Err(error) = &result {
                LimiterFailed { error }.emit(&self.stats);
            }
            result
        })
    }

    /// Drops the notice state (like governor's limiter: the cells stay counted until
    /// their key expires). Runs in the background: `/forget` is synchronous.
    fn reset(&self, key: u64) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime to reset a shared limiter key on");
            return;
        };
        let (mut conn, key) = (self.conn.clone(), self.notice_key(key));
        let secret = self.secret.clone();
        handle.spawn(async move {
            let done: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
            if let Err(e) = done {
                let error = CoordError::redis(&e, secret.as_deref());
                tracing::warn!(%error, "could not reset a shared limiter key");
            }
        });
    }

    /// Nothing to prune: every key expires on the server.
    fn prune(&self) -> usize {
        0
    }
}
