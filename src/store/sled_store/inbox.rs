//! [`InboxStore`] on sled: `inbox` (adapter key → received update not yet answered),
//! intake positions (rows of `meta` under the adapter's key, e.g. `tg_offset/<bot>`) and
//! `handled` (update id → [`HandledEntry`]).

use super::{io, SledStore};
use crate::store::codec::Codec as _;
use crate::store::{HandledEntry, InboxStore, StoreResult};

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
        for item in self.inbox.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(io)?;
            match (String::from_utf8(k.to_vec()), self.unseal("inbox", &k, &v)) {
                (Ok(key), Ok(value)) => out.push((key, value.into_owned())),
                _ => crate::store::codec::corrupt_skipped("inbox"),
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::temp_store;
    use super::*;
    use crate::store::MetaStore;

    /// An intake position is the `meta` row an older daemon wrote (Telegram's
    /// `tg_offset/<bot>`), so an upgraded daemon resumes where the old one stopped.
    #[test]
    fn intake_positions_are_the_meta_rows_older_daemons_wrote() {
        let (dir, s) = temp_store();
        s.meta_put("tg_offset/assistant", b"41").unwrap();
        let got = s.intake_position("tg_offset/assistant").unwrap();
        assert_eq!(got.as_deref(), Some(b"41".as_slice()));
        s.set_intake_position("tg_offset/assistant", b"42").unwrap();
        s.db.flush().unwrap();
        drop(s);
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        let got = s.meta_get("tg_offset/assistant").unwrap();
        assert_eq!(got.as_deref(), Some(b"42".as_slice()));
        assert_eq!(s.intake_position("tg_offset/other").unwrap(), None);
    }
}
