//! The Redis implementation of the store's roles — the only module that knows Redis.
//! One file per role, like `sled_store/`: `conversations.rs`, `users.rs`, `cache.rs`,
//! `audit.rs`, `inbox.rs`, `meta.rs`; `forget.rs` (what `forget_user` removes),
//! `layout.rs` (key names, sealing), `identity.rs` (who a hashed user id is),
//! `dump.rs` + `sled_rows.rs` (rows in sled's encoding for backups and migrate),
//! `scripts.rs` (the server-side Lua scripts),
//! `events.rs` (the `confab_redis_*` counters and the events that move them).
//!
//! The role traits are synchronous (sled's calls are in-memory); each call here runs
//! its async Redis round trip through [`RedisStore::run`]: `block_in_place` +
//! `Handle::block_on` on a multi-thread runtime's worker, `Handle::block_on` on a
//! blocking thread, a [`StoreError`] on a current-thread runtime — never a panic.
//! Every round trip is bounded by `store.redis_timeout_ms` (our own timeout around the
//! connection manager's), so a Redis that is down or slow fails the call in time.

mod audit;
mod cache;
mod conversations;
mod dump;
pub mod events;
mod forget;
mod identity;
mod inbox;
mod layout;
mod meta;
mod scripts;
mod sled_rows;
mod users;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};
use tokio::runtime::{Handle, RuntimeFlavor};

pub use events::RedisStats;
use events::{CommandDone, Outcome};
pub use identity::UNNAMED;
pub use sled_rows::LoadIds;

use super::{crypto, Durable, StoreError, StoreResult};

/// How to reach Redis (from `[store]` and the `redis_url_env` secret).
pub struct RedisOptions {
    /// `redis://[user:pass@]host:port/db` or `rediss://…`: a secret, never logged.
    pub url: String,
    /// Every key starts with it (`confab:staging`): environments never share keys.
    pub prefix: String,
    /// Bounds each round trip and each connection attempt.
    pub timeout: Duration,
    /// The cache's native TTL (`cache.ttl_secs`).
    pub cache_ttl_secs: u64,
    /// `CONFAB_DATA_KEY`: personal values sealed, ids and names in keys hashed.
    pub data_key: Option<String>,
}

/// Every role of the store on one Redis (each role's methods in its own file).
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    cache_ttl_secs: u64,
    keys: Option<crypto::Keys>,
    stats: Arc<RedisStats>,
    /// Texts scrubbed from every error (the URL and its password).
    secrets: Vec<String>,
}

/// How long a handled marker lives (the sled store purges them after 7 days too).
pub(crate) const HANDLED_TTL_SECS: u64 = 7 * 86_400;

impl RedisStore {
    /// Connects (within the timeout) and checks the data key against the one the
    /// store was written with. Must run inside a tokio runtime.
    pub fn open(opts: RedisOptions) -> StoreResult<RedisStore> {
        let key = opts.data_key.clone();
        let mut store = Self::connect(opts)?;
        store.apply_key(key.as_deref())?;
        Ok(store)
    }

    /// Connects and pings, without touching the data key (`confab check`).
    pub fn connect(opts: RedisOptions) -> StoreResult<RedisStore> {
        let secrets = secrets_of(&opts.url);
        let scrub = |e: &dyn std::fmt::Display| scrub(&e.to_string(), &secrets);
        let client = redis::Client::open(opts.url.as_str()).map_err(|e| StoreError::Open {
            path: "redis".into(),
            reason: format!("bad Redis URL: {}", scrub(&e)),
        })?;
        // The manager reconnects in the background after a dropped connection: one
        // attempt per reconnect (no hidden retry loop), each bounded by the timeout;
        // our own timeout around every call bounds the rest.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(opts.timeout))
            .set_response_timeout(Some(opts.timeout));
        if Handle::try_current().is_err() {
            return Err(StoreError::Open {
                path: "redis".into(),
                reason: "the Redis store needs a tokio runtime".into(),
            });
        }
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            StoreError::Open {
                path: "redis".into(),
                reason: scrub(&e),
            }
        })?;
        let store = RedisStore {
            conn,
            prefix: opts.prefix,
            timeout: opts.timeout,
            cache_ttl_secs: opts.cache_ttl_secs.max(1),
            keys: None,
            stats: Arc::default(),
            secrets,
        };
        store.ping().map_err(|e| StoreError::Open {
            path: "redis".into(),
            reason: format!("Redis is unreachable: {e}"),
        })?;
        Ok(store)
    }

    /// The `confab_redis_*` counters.
    pub fn stats(&self) -> &Arc<RedisStats> {
        &self.stats
    }

    /// Whether values are sealed with a data key.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The keyed hash the store names ids with (`None` without a data key), for
    /// coordination's lease and limiter keys under the same prefix.
    pub fn index_key(&self) -> Option<crypto::IndexKey> {
        self.keys.as_ref().map(crypto::Keys::index_key)
    }

    /// One round trip (PING).
    pub fn ping(&self) -> StoreResult<()> {
        self.query::<()>(&redis::cmd("PING"))
    }

    /// `CONFIG GET` of the persistence settings (`appendonly`, `appendfsync`); an
    /// empty list when the server refuses CONFIG (a managed Redis may).
    pub fn persistence(&self) -> StoreResult<Vec<(String, String)>> {
        let mut out = Vec::new();
        for name in ["appendonly", "appendfsync", "save"] {
            let got: RedisResult<Vec<String>> = self.run_raw(|mut c| async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            });
            match got {
                Ok(v) => out.extend(v.chunks(2).filter_map(|p| match p {
                    [k, v] => Some((k.clone(), v.clone())),
                    _ => None,
                })),
                Err(e)
                    if e.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {}
                Err(e) => return Err(self.error(&e)),
            }
        }
        Ok(out)
    }

    /// Runs one Redis round trip (a command, pipeline or script) synchronously,
    /// bounded by the timeout and counted.
    pub(crate) fn run<T, F, Fut>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send,
        T: Send,
    {
        self.run_raw(f).map_err(|e| self.error(&e))
    }

    /// Runs one command (`redis::cmd(..).arg(..)`) and converts its answer.
    pub(crate) fn query<T: redis::FromRedisValue + Send>(
        &self,
        cmd: &redis::Cmd,
    ) -> StoreResult<T> {
        let cmd = cmd.clone();
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
    }

    fn run_raw<T, F, Fut>(&self, f: F) -> RedisResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send,
        T: Send,
    {
        let handle = Handle::try_current().map_err(|_| no_runtime("no tokio runtime"))?;
        if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return Err(no_runtime(
                "the Redis store needs tokio's multi-thread runtime (a current-thread runtime cannot block)",
            ));
        }
        let fut = f(self.conn.clone());
        let timeout = self.timeout;
        let bounded = async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from Redis within {} ms", timeout.as_millis()),
                ))),
            }
        };
        let started = Instant::now();
        // On a worker: hand the worker's other tasks off, then block this thread. On a
        // blocking thread (spawn_blocking, the control socket) block_in_place just runs it.
        let result = tokio::task::block_in_place(|| handle.block_on(bounded));
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) if unreachable(e) => Outcome::Unreachable,
            Err(_) => Outcome::Error,
        };
        events::emit(
            CommandDone {
                outcome,
                elapsed: started.elapsed(),
            },
            &self.stats,
        );
        result
    }

    /// A Redis error as a store error, the URL and password scrubbed.
    fn error(&self, e: &RedisError) -> StoreError {
        let text = format!("redis: {}", scrub(&e.to_string(), &self.secrets));
        if unreachable(e) {
            StoreError::Unavailable(text)
        } else {
            StoreError::Io(text)
        }
    }
}

/// No answer: timed out, refused or dropped connection (not a command Redis refused).
fn unreachable(e: &RedisError) -> bool {
    e.is_timeout() || e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped()
}

fn no_runtime(why: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Client, why))
}

/// The URL and its password (percent-decoded too), to scrub from error texts.
fn secrets_of(url: &str) -> Vec<String> {
    let mut out = vec![url.to_string()];
    if let Ok(u) = url::Url::parse(url) {
        if let Some(p) = u.password().filter(|p| !p.is_empty()) {
            out.push(p.to_string());
            if let Ok(d) = percent_decode(p) {
                out.push(d);
            }
        }
    }
    out.retain(|s| s.len() >= 3);
    out
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// `text` with every secret replaced.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), "[redacted]");
        }
    }
    out
}

impl Durable for RedisStore {
    /// A write returns only after Redis acknowledged it; what survives a Redis crash is
    /// Redis's persistence (`appendonly yes`, `appendfsync everysec` or `always`).
    fn flush(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }

    fn redis_stats(&self) -> Option<&RedisStats> {
        Some(&self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_and_its_password_are_scrubbed() {
        let url = "redis://app:s3cr%2Fet@10.0.0.1:6379/0";
        let secrets = secrets_of(url);
        let text = format!("failed {url} with s3cr/et and s3cr%2Fet");
        let out = scrub(&text, &secrets);
        assert!(!out.contains("s3cr"), "{out}");
    }

    #[test]
    fn a_current_thread_runtime_is_an_error_not_a_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let err = RedisStore::open(RedisOptions {
                url: "redis://127.0.0.1:1/0".into(),
                prefix: "t".into(),
                timeout: Duration::from_millis(200),
                cache_ttl_secs: 60,
                data_key: None,
            })
            .err()
            .unwrap();
            assert!(err.to_string().contains("multi-thread"), "{err}");
        });
    }
}
