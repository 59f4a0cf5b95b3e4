//! [`InboxStore`] on sled: `inbox` (adapter key → received update not yet answered),
//! intake positions (rows of `meta` under the adapter's key, e.g. `tg_offset/<bot>`) and
//! `handled` (update id → [`HandledEntry`]).

use super::{io, SledStore};
use crate::store::{HandledEntry, InboxStore, MetaStore, StoreResult};

impl InboxStore for SledStore {
    fn inbox_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.inbox
            .insert(key, self.seal("inbox", key.as_bytes(), value))
            .map_err(io)?;
        Ok(())
    }

    fn inbox_remove(&self, key: &str) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.inbox.remove(key).map_err(io)?;
        Ok(())
    }

    fn inbox_scan(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.inbox.scan_prefix(prefix) {
            let (k, v) = item.map_err(io)?;
            match (String::from_utf8(k.to_vec()), self.unseal("inbox", &k, &v)) {
                (Ok(key), Ok(value)) => out.push((key, value.into_owned())),
                _ => tracing::error!(tree = "inbox", "unreadable inbox entry skipped"),
            }
        }
        Ok(out)
    }

    fn intake_position(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.meta_get(key)
    }

    fn set_intake_position(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.meta_put(key, value)
    }

    fn handled(&self, update: &str) -> StoreResult<Option<HandledEntry>> {
        let k = update.as_bytes();
        Ok(self
            .handled
            .get(k)
            .map_err(io)?
            .and_then(|v| self.decode("handled", k, &v)))
    }

    fn set_handled(&self, update: &str, entry: &HandledEntry) -> StoreResult<()> {
        let _gate = self.write_gate();
        let k = update.as_bytes();
        self.handled
            .insert(k, self.encode("handled", k, entry)?)
            .map_err(io)?;
        Ok(())
    }

    fn purge_handled_before(&self, before: i64) -> StoreResult<usize> {
        self.purge_older(&self.handled, "handled", before, |h: &HandledEntry| h.at)
    }
}
