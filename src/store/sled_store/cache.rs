//! [`CacheStore`] on sled: `cache` (row key → entry) and `cache_time` (created_at +
//! row key → ()) for TTL and size-bound eviction; a running count, since sled's
//! `len()` is O(n).

use std::sync::atomic::Ordering;

use super::layout::time_key;
use super::{io, SledStore};
use crate::store::codec::Codec as _;
use crate::store::{CacheEntry, CacheStore, StoreResult};

impl SledStore {
    /// Removes a cache row by its stored key (and its `cache_time` row).
    pub(super) fn cache_remove_row(&self, row: &[u8; 32]) -> StoreResult<()> {
        let _gate = self.write_gate();
        if let Some(v) = self.cache.remove(row).map_err(io)? {
            self.cache_count.fetch_sub(1, Ordering::Relaxed);
            if let Some(old) = self.decode::<CacheEntry>("cache", row, &v) {
                self.cache_time
                    .remove(time_key(old.created_at, row))
                    .map_err(io)?;
            }
        }
        Ok(())
    }
}

impl CacheStore for SledStore {
    fn cache_get(&self, key: &[u8; 32]) -> StoreResult<Option<CacheEntry>> {
        let row = self.cache_row_key(key);
        Ok(self
            .cache
            .get(row)
            .map_err(io)?
            .and_then(|v| self.decode("cache", &row, &v)))
    }

    fn cache_put(&self, key: &[u8; 32], entry: &CacheEntry, max_entries: usize) -> StoreResult<()> {
        let _gate = self.write_gate();
        let row = self.cache_row_key(key);
        let old = self
            .cache
            .insert(row, self.encode("cache", &row, entry)?)
            .map_err(io)?;
        match old.and_then(|v| self.decode::<CacheEntry>("cache", &row, &v)) {
            Some(old) => {
                self.cache_time
                    .remove(time_key(old.created_at, &row))
                    .map_err(io)?;
            }
            None => {
                self.cache_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.cache_time
            .insert(time_key(entry.created_at, &row), &[] as &[u8])
            .map_err(io)?;
        // Evict the oldest entries beyond the bound.
        while self.cache_count.load(Ordering::Relaxed) > max_entries {
            let Some((tk, _)) = self.cache_time.pop_min().map_err(io)? else {
                break;
            };
            if tk.len() == 40 && self.cache.remove(&tk[8..]).map_err(io)?.is_some() {
                self.cache_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn cache_remove(&self, key: &[u8; 32]) -> StoreResult<()> {
        self.cache_remove_row(&self.cache_row_key(key))
    }

    fn cache_expire(&self, before: i64) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let end = (before.max(0) as u64).to_be_bytes();
        let mut n = 0;
        for item in self.cache_time.iter_before(&end) {
            let (tk, _) = item.map_err(io)?;
            self.cache_time.remove(&tk).map_err(io)?;
            if tk.len() == 40 && self.cache.remove(&tk[8..]).map_err(io)?.is_some() {
                self.cache_count.fetch_sub(1, Ordering::Relaxed);
                n += 1;
            }
        }
        Ok(n)
    }

    fn cache_clear(&self) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let n = self.cache.len();
        self.cache.clear().map_err(io)?;
        self.cache_time.clear().map_err(io)?;
        self.cache_count.store(0, Ordering::Relaxed);
        Ok(n)
    }

    fn cache_len(&self) -> usize {
        self.cache_count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::domain::{Platform, UserRef};

    #[test]
    fn cache_is_bounded_and_expires() {
        let (_dir, s) = temp_store();
        let origin = UserRef::new(Platform::Telegram, "1");
        for i in 0..5u8 {
            let e = CacheEntry {
                reply: format!("r{i}"),
                tokens: 1,
                reply_tokens: 1,
                created_at: 100 + i as i64,
                origin: origin.clone(),
                model: "m".into(),
            };
            s.cache_put(&[i; 32], &e, 3).unwrap();
        }
        assert_eq!(s.cache_len(), 3);
        assert!(s.cache_get(&[0; 32]).unwrap().is_none(), "oldest evicted");
        assert!(s.cache_get(&[4; 32]).unwrap().is_some());
        assert_eq!(s.cache_expire(104).unwrap(), 2);
        assert_eq!(s.cache_len(), 1);
    }

    #[test]
    fn cache_keys_are_hmacs_with_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_with_key(dir.path(), 8, 500, Some(KEY)).unwrap();
        let e = CacheEntry {
            reply: "r".into(),
            tokens: 1,
            reply_tokens: 1,
            created_at: 100,
            origin: tg("1"),
            model: "m".into(),
        };
        s.cache_put(&[3; 32], &e, 10).unwrap();
        assert_eq!(s.cache_get(&[3; 32]).unwrap(), Some(e));
        assert!(
            s.cache.get([3u8; 32]).unwrap().is_none(),
            "not under the plain hash"
        );
        s.cache_remove(&[3; 32]).unwrap();
        assert_eq!(s.cache_len(), 0);
        assert_eq!(s.cache_time.len(), 0);
    }
}
