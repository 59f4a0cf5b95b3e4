//! [`MetaStore`] on sled: `meta` (small named values; also the schema version, the key
//! check and salt, and intake positions).

use super::{io, SledStore};
use crate::store::{MetaStore, StoreResult};

impl MetaStore for SledStore {
    fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.meta.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.meta.insert(key, value).map_err(io)?;
        Ok(())
    }

    fn meta_remove(&self, key: &str) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.meta.remove(key).map_err(io)?;
        Ok(())
    }
}
