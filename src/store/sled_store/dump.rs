//! Whole-store row access: backups, restores, and audits of what is stored.

use std::sync::atomic::Ordering;

use super::{io, SledStore, TREES};
use crate::store::codec::Codec as _;
use crate::store::{crypto, StoreError, StoreResult};

/// One stored (tree, key, value).
pub type DumpRow = (String, Vec<u8>, Vec<u8>);

/// Where the next [`SledStore::dump_batch`] starts: a tree (index into the order
/// given) and the last key already copied from it.
#[derive(Debug, Clone, Default)]
pub struct DumpCursor {
    pub tree: usize,
    pub after: Option<Vec<u8>>,
}

fn unknown_tree(name: &str) -> StoreError {
    StoreError::Corrupt {
        tree: "backup",
        reason: format!("unknown tree {name:?}"),
    }
}

impl SledStore {
    /// The authenticator for backups of this store (HMAC-SHA256 with a key derived from
    /// the data key); `None` without a data key. Verify with [`super::backup_auth_for_rows`].
    pub fn backup_auth(&self) -> Option<crypto::BackupAuth> {
        self.keys.as_ref().map(crypto::Keys::backup_auth)
    }

    /// The next batch of a backup: up to `max` rows of the trees named in `order`,
    /// starting after `from`; returns the rows and where the next batch starts (`None`
    /// when every tree is done). Writers pause only while one batch is read, so a batch
    /// is one point in time and the copy as a whole never stops them for long.
    pub fn dump_batch(
        &self,
        order: &[&str],
        from: &DumpCursor,
        max: usize,
    ) -> StoreResult<(Vec<DumpRow>, Option<DumpCursor>)> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut rows = Vec::new();
        let mut after = from.after.clone();
        for (i, name) in order.iter().enumerate().skip(from.tree) {
            let after = after.take();
            let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
                match (*name, self.part(name)) {
                    ("meta", _) => match after {
                        Some(k) => Box::new(self.meta.range::<&[u8], _>((
                            std::ops::Bound::Excluded(k.as_slice()),
                            std::ops::Bound::Unbounded,
                        ))),
                        None => Box::new(self.meta.iter()),
                    },
                    (_, Some(part)) => Box::new(part.iter_after(after.as_deref())),
                    (_, None) => return Err(unknown_tree(name)),
                };
            for item in iter {
                let (k, v) = item.map_err(io)?;
                rows.push((name.to_string(), k.to_vec(), v.to_vec()));
                if rows.len() >= max.max(1) {
                    let next = DumpCursor {
                        tree: i,
                        after: Some(k.to_vec()),
                    };
                    return Ok((rows, Some(next)));
                }
            }
        }
        Ok((rows, None))
    }

    /// Inserts rows (from a backup) into an empty store. Turns and audit entries are
    /// keyed by sequence numbers from `generate_id`; the generator is moved past every
    /// loaded one, so later writes sort after them and never reuse a key.
    pub fn load_rows(&self, rows: &[DumpRow]) -> StoreResult<()> {
        let mut max_seq = None;
        for (tree, k, _) in rows {
            if tree == "turns" || tree == "audit" {
                let tail = k.get(k.len().saturating_sub(8)..).unwrap_or_default();
                if let Ok(b) = <[u8; 8]>::try_from(tail) {
                    max_seq = max_seq.max(Some(u64::from_be_bytes(b)));
                }
            }
        }
        if let Some(max) = max_seq {
            while self.db.generate_id().map_err(io)? <= max {}
        }
        for (tree, k, v) in rows {
            match (tree.as_str(), self.part(tree)) {
                ("meta", _) => self.meta.insert(k.as_slice(), v.as_slice()).map(drop),
                (_, Some(part)) => part.insert(k.as_slice(), v.as_slice()).map(drop),
                (_, None) => return Err(unknown_tree(tree)),
            }
            .map_err(io)?;
        }
        self.cache_count.store(self.cache.len(), Ordering::Relaxed);
        self.db.flush().map_err(io)?;
        Ok(())
    }

    /// Every (tree, key, value) in the store as stored (sealed values stay sealed), for
    /// backups and for audits of what is on disk.
    pub fn dump(&self) -> StoreResult<Vec<DumpRow>> {
        let (rows, _) = self.dump_batch(TREES, &DumpCursor::default(), usize::MAX)?;
        Ok(rows)
    }

    /// One row of `tree` (a role, or `meta`) as stored, for tools and tests.
    pub fn raw_get(&self, tree: &str, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let v = match (tree, self.part(tree)) {
            ("meta", _) => self.meta.get(key),
            (_, Some(part)) => part.get(key),
            (_, None) => return Err(unknown_tree(tree)),
        };
        Ok(v.map_err(io)?.map(|v| v.to_vec()))
    }

    /// Writes one row of `tree` as given, bytes unchecked (tests plant damaged values).
    pub fn raw_put(&self, tree: &str, key: &[u8], value: &[u8]) -> StoreResult<()> {
        match (tree, self.part(tree)) {
            ("meta", _) => self.meta.insert(key, value).map(drop),
            (_, Some(part)) => part.insert(key, value).map(drop),
            (_, None) => return Err(unknown_tree(tree)),
        }
        .map_err(io)
    }

    /// Like [`SledStore::dump`] with every value decrypted that can be (tests, audits
    /// of what is stored about someone).
    pub fn dump_open(&self) -> StoreResult<Vec<DumpRow>> {
        Ok(self
            .dump()?
            .into_iter()
            .map(|(tree, k, v)| {
                let open = self.unseal(&tree, &k, &v).map(|p| p.into_owned());
                let v = open.unwrap_or(v);
                (tree, k, v)
            })
            .collect())
    }
}
