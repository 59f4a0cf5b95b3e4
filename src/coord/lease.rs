//! Expiring leases on Redis: `SET key token NX PX ttl` to take one, a compare-and-renew
//! script to keep it, a compare-and-delete script to give it back. A holder that dies
//! stops renewing and its lease frees itself after `ttl`.
//!
//! [`PollGate`] uses one per bot so exactly one instance polls it: the holder renews
//! every `renew_every`; standbys ask again every `retry_every`; a holder that cannot
//! renew stops polling before its lease could have expired.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::events::{CoordStats, LeaseAcquired, LeaseLost};
use super::CoordError;
use crate::events::Event;

/// Take the lease, or keep it when it is already ours (a renewal that errored).
const ACQUIRE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// One lease key and this holder's token.
pub struct Lease {
    conn: ConnectionManager,
    key: String,
    token: String,
    ttl: Duration,
    secret: Option<Arc<str>>,
}

impl Lease {
    pub(super) fn new(
        conn: ConnectionManager,
        key: String,
        ttl: Duration,
        secret: Option<Arc<str>>,
    ) -> Self {
        let token = format!("{:032x}", rand::random::<u128>());
        Self {
            conn,
            key,
            token,
            ttl,
            secret,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    async fn run(&self, script: &str) -> Result<bool, CoordError> {
        let mut conn = self.conn.clone();
        let ttl_ms = self.ttl.as_millis().max(1) as u64;
        let n: i64 = Script::new(script)
            .key(&self.key)
            .arg(&self.token)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| CoordError::redis(&e, self.secret.as_deref()))?;
        Ok(n == 1)
    }

    /// Takes the lease if it is free (or already ours). `false`: someone else holds it.
    pub async fn try_acquire(&self) -> Result<bool, CoordError> {
        self.run(ACQUIRE).await
    }

    /// Extends the lease by `ttl` if it is still ours.
    pub async fn renew(&self) -> Result<bool, CoordError> {
        self.run(RENEW).await
    }

    /// Gives the lease back if it is still ours.
    pub async fn release(&self) -> Result<bool, CoordError> {
        self.run(RELEASE).await
    }

    /// Keeps the (acquired) lease renewed every `every` until the returned [`Held`] is
    /// dropped (which releases it). `lost` is cancelled when the lease is taken by
    /// someone else, or could have expired because renewals failed; the loss is
    /// counted in `stats` when given (polling leases).
    pub fn keep(
        self: Arc<Self>,
        every: Duration,
        lost: CancellationToken,
        stats: Option<Arc<CoordStats>>,
    ) -> Held {
        let lease = self.clone();
        let task = tokio::spawn(async move {
            let reason = lease.renew_until_lost(every).await;
            // Counted before the holder is told, so whoever sees the cancellation
            // also sees the count.
            if let Some(stats) = stats {
                LeaseLost {
                    name: &lease.key,
                    reason,
                }
                .emit(&stats);
            }
            lost.cancel();
        });
        Held {
            lease: self,
            task: Some(task),
        }
    }

    /// Renews every `every`; returns why the lease is lost.
    async fn renew_until_lost(&self, every: Duration) -> &'static str {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => return "taken",
                Err(e) => {
                    tracing::warn!(lease = %self.key, error = %e, "lease renewal failed");
                    // Stop before the lease could expire and be taken by another.
                    if last_ok.elapsed() + every >= self.ttl {
                        return "unrenewable";
                    }
                }
            }
        }
    }
}

/// A lease kept alive in the background; dropping it stops renewing and releases it.
pub struct Held {
    lease: Arc<Lease>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return; // the runtime is going away: the lease expires by itself
        };
        let lease = self.lease.clone();
        handle.spawn(async move {
            if let Err(e) = lease.release().await {
                tracing::debug!(lease = %lease.key, error = %e, "lease release failed; it expires");
            }
        });
    }
}

/// Whether this instance may poll a bot now.
pub trait PollGate: Send + Sync {
    /// Waits until this instance may poll. The [`Turn`]'s token is cancelled when it
    /// must stop (its lease lost, or `stop`). `None` when `stop` came first.
    fn turn<'a>(&'a self, stop: &'a CancellationToken) -> BoxFuture<'a, Option<Turn>> {
        static UNWATCHED: AtomicBool = AtomicBool::new(false);
        self.wait_turn(stop, &UNWATCHED)
    }

    /// [`PollGate::turn`], telling the wait's health in `standby`: set while this
    /// instance stands by ready to take over (another instance holds the lease and
    /// Redis answers), cleared while the lease cannot be asked for. Readiness reads it.
    fn wait_turn<'a>(
        &'a self,
        stop: &'a CancellationToken,
        standby: &'a AtomicBool,
    ) -> BoxFuture<'a, Option<Turn>>;
}

/// A permission to poll; dropping it gives the lease back.
pub struct Turn {
    pub token: CancellationToken,
    _held: Option<Held>,
}

/// One process: always this instance's turn.
pub struct AlwaysPoll;

impl PollGate for AlwaysPoll {
    fn wait_turn<'a>(
        &'a self,
        stop: &'a CancellationToken,
        _standby: &'a AtomicBool,
    ) -> BoxFuture<'a, Option<Turn>> {
        let turn = (!stop.is_cancelled()).then(|| Turn {
            token: stop.child_token(),
            _held: None,
        });
        Box::pin(std::future::ready(turn))
    }
}

/// Timings of a polling lease (defaults: ttl 10 s, renew every 3 s, standbys ask every 1 s).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    pub ttl: Duration,
    pub renew_every: Duration,
    pub retry_every: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(3),
            retry_every: Duration::from_secs(1),
        }
    }
}

/// A polling lease on Redis: one instance polls a bot; the others stand by.
pub struct LeasedPoll {
    pub(super) lease: Arc<Lease>,
    pub(super) times: LeaseTimes,
    pub(super) stats: Arc<CoordStats>,
}

impl LeasedPoll {
    async fn acquire(&self, stop: &CancellationToken, standby: &AtomicBool) -> Option<()> {
        let mut refused = false;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.lease.try_acquire().await {
                Ok(true) => {
                    let name = self.lease.key();
                    LeaseAcquired {
                        name,
                        takeover: refused,
                    }
                    .emit(&self.stats);
                    return Some(());
                }
                Ok(false) => {
                    refused = true;
                    standby.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    standby.store(false, Ordering::Relaxed);
                    tracing::warn!(lease = %self.lease.key(), error = %e, "polling lease unavailable")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(self.times.retry_every) => {}
            }
        }
    }
}

impl PollGate for LeasedPoll {
    fn wait_turn<'a>(
        &'a self,
        stop: &'a CancellationToken,
        standby: &'a AtomicBool,
    ) -> BoxFuture<'a, Option<Turn>> {
        Box::pin(async move {
            self.acquire(stop, standby).await?;
            let token = stop.child_token();
            let every = self.times.renew_every;
            let stats = Some(self.stats.clone());
            let held = self.lease.clone().keep(every, token.clone(), stats);
            Some(Turn {
                token,
                _held: Some(held),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_process_always_polls_until_stopped() {
        let stop = CancellationToken::new();
        let turn = AlwaysPoll.turn(&stop).await.expect("a turn");
        assert!(!turn.token.is_cancelled());
        stop.cancel();
        assert!(turn.token.is_cancelled(), "the turn ends with the stop");
        assert!(AlwaysPoll.turn(&stop).await.is_none());
    }
}
