//! [`MetaStore`] on Redis: the hash `P:meta` (small named values: maintenance mode,
//! intake positions, the key check and salt).

use super::RedisStore;
use crate::store::{MetaStore, StoreResult};

impl MetaStore for RedisStore {
    fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.hget(&self.meta_key(), key)
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.query(redis::cmd("HSET").arg(self.meta_key()).arg(key).arg(value))
    }

    fn meta_remove(&self, key: &str) -> StoreResult<()> {
        self.query(redis::cmd("HDEL").arg(self.meta_key()).arg(key))
    }
}
