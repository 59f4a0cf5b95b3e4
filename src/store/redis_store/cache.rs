//! [`CacheStore`] on Redis: `P:cache:K` (the entry, with Redis's native TTL of
//! `cache.ttl_secs`) and `P:cache_index` (a sorted set of K by created_at) for
//! `cache_len`, size-bound eviction (oldest first) and `cache_expire`.

use super::RedisStore;
use crate::store::codec::Codec as _;
use crate::store::{CacheEntry, CacheStore, StoreResult};

impl RedisStore {
    /// Removes entries by id (their key and their index member); returns how many
    /// index members went.
    pub(super) fn cache_remove_ids(&self, ids: &[String]) -> StoreResult<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = ids.iter().map(|id| self.cache_key(id)).collect();
        let (index, ids) = (self.cache_index_key(), ids.to_vec());
        let (_, n): (i64, usize) = self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(keys)
                .cmd("ZREM")
                .arg(index)
                .arg(ids)
                .query_async(&mut c)
                .await
        })?;
        Ok(n)
    }

    /// Stores an entry under its cache id (`P:cache:<id>`, indexed by `created_at`),
    /// evicting the oldest past `max_entries`.
    pub(super) fn cache_put_id(
        &self,
        id: String,
        entry: &CacheEntry,
        max_entries: usize,
    ) -> StoreResult<()> {
        let k = self.cache_key(&id);
        let value = self.encode("cache", &k, entry)?;
        let (index, ttl, at) = (
            self.cache_index_key(),
            self.cache_ttl_secs,
            entry.created_at,
        );
        let idx = index.clone();
        let (_, _, len): ((), i64, usize) = self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(&k)
                .arg(value)
                .arg("EX")
                .arg(ttl)
                .cmd("ZADD")
                .arg(&idx)
                .arg(at)
                .arg(&id)
                .cmd("ZCARD")
                .arg(&idx)
                .query_async(&mut c)
                .await
        })?;
        if len > max_entries {
            let excess = len - max_entries;
            let popped: Vec<(String, f64)> =
                self.query(redis::cmd("ZPOPMIN").arg(index).arg(excess))?;
            let ids: Vec<String> = popped.into_iter().map(|(id, _)| id).collect();
            self.cache_remove_ids(&ids)?;
        }
        Ok(())
    }

    /// Every cache id in the index, oldest first.
    pub(super) fn cache_ids(&self) -> StoreResult<Vec<String>> {
        let index = self.cache_index_key();
        self.query(redis::cmd("ZRANGE").arg(index).arg(0).arg(-1))
    }
}

impl CacheStore for RedisStore {
    fn cache_get(&self, key: &[u8; 32]) -> StoreResult<Option<CacheEntry>> {
        let k = self.cache_key(&self.cache_id(key));
        let raw: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&k))?;
        Ok(raw.and_then(|v| self.decode("cache", &k, &v)))
    }

    fn cache_put(&self, key: &[u8; 32], entry: &CacheEntry, max_entries: usize) -> StoreResult<()> {
        self.cache_put_id(self.cache_id(key), entry, max_entries)
    }

    fn cache_remove(&self, key: &[u8; 32]) -> StoreResult<()> {
        self.cache_remove_ids(&[self.cache_id(key)]).map(|_| ())
    }

    fn cache_expire(&self, before: i64) -> StoreResult<usize> {
        let index = self.cache_index_key();
        let ids: Vec<String> = self.query(
            redis::cmd("ZRANGE")
                .arg(index)
                .arg("-inf")
                .arg(format!("({before}"))
                .arg("BYSCORE"),
        )?;
        self.cache_remove_ids(&ids)
    }

    fn cache_clear(&self) -> StoreResult<usize> {
        let ids = self.cache_ids()?;
        self.cache_remove_ids(&ids)
    }

    fn cache_len(&self) -> usize {
        let index = self.cache_index_key();
        self.query(redis::cmd("ZCARD").arg(index)).unwrap_or(0)
    }
}
