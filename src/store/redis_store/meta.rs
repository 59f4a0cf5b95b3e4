//! [`MetaStore`] on Redis: the hash `P:meta` (small named values: maintenance mode,
//! intake positions, the key check and salt).

use super::RedisStore;
use crate::store::{MetaStore, StoreResult};

impl MetaStore for RedisStore {
    fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.hget(&self.meta_key(), key)
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        let (k, f, v) = (self.meta_key(), key.to_string(), value.to_vec());
        self.run(|mut c| async move {
            redis::cmd("HSET")
                .arg(k)
                .arg(f)
                .arg(v)
                .query_async::<()>(&mut c)
                .await
        })
    }

    fn meta_remove(&self, key: &str) -> StoreResult<()> {
        let (k, f) = (self.meta_key(), key.to_string());
        self.run(|mut c| async move {
            redis::cmd("HDEL")
                .arg(k)
                .arg(f)
                .query_async::<()>(&mut c)
                .await
        })
    }
}
