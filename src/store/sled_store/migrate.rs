//! Opening a store with or without `CONFAB_DATA_KEY`, and the one-time migrations.
//!
//! - Schema 3 → 4 (any store, after the data key is applied: sealed rows open only
//!   with it): consecutive single-turn rows of one conversation are paired into one
//!   row under the first one's key (sealed again for it), since schema 4 writes an
//!   exchange's turns as one row — half the keys in sled's page table. Each pair is one
//!   batch entry (insert the pair, remove the second row), so a crash leaves a readable
//!   mix and the next open pairs what is left; `schema_version` = 4 is written last.
//! - Schema 2 → 3 (any store): the rows of every tree but `meta` move into the `rows`
//!   tree under their role's tag (`part.rs`), bytes unchanged (a value stays sealed for
//!   the same role and key; JSON values stay readable and are rewritten compact when
//!   next written). Copy first, flush, drop the old trees, flush, and only then write
//!   `schema_version`: a crash anywhere leaves version 2, and the next open copies
//!   again (the same bytes over the same keys) and finishes.
//! - Schema 1 → 2 (any store): `usernames` keys become per platform (`tg:name`).
//! - First open with a key (a plaintext store, or one encrypted by schema 1, where only
//!   text was sealed with an unsalted key): a salt is stored, `meta/key_check2` sealed,
//!   then every row of every personal tree is re-keyed and sealed for its row, the cache
//!   is emptied (its keys cannot be re-derived), and `meta/sealed = 2` marks the end.
//!   Each row moves in one atomic batch and an already sealed row is skipped, so a crash
//!   mid-way is finished by the next open. Nothing is dropped: a value that cannot be
//!   read stays a corrupt entry (a corrupt user record keeps refusing that user).

use sled::Batch;

use super::part::{Part, PARTS};

use super::layout::{conv_prefix_plain, parse_conv_prefix, SEP};
use super::{io, DumpRow, SledStore};
use crate::domain::UserRef;
use crate::store::codec::Codec as _;
use crate::store::crypto::{self, Keys, LegacyCipher};
use crate::store::{StoreError, StoreResult, Turn, SCHEMA_VERSION};

/// The schema of one tree with single-turn rows, which [`SledStore::upgrade_schema`]
/// leaves and [`SledStore::finish_schema`] takes to [`SCHEMA_VERSION`].
pub(super) const ONE_TREE: u32 = 3;

pub(super) const KEY_CHECK1: &str = "key_check";
pub(super) const KEY_CHECK2: &str = "key_check2";
pub(super) const KDF_SALT: &str = "kdf_salt";
pub(super) const SEALED: &str = "sealed";

/// The store's keys from `secret` and its salt row, checked against `key_check2`.
fn checked_keys(secret: &str, salt: &[u8], check: &[u8]) -> Result<Keys, String> {
    let keys = Keys::derive(secret, salt)?;
    match keys.open("meta", KEY_CHECK2.as_bytes(), check) {
        Ok(v) if v == crypto::CHECK2 => Ok(keys),
        _ => Err("CONFAB_DATA_KEY does not match the key this store was encrypted with".into()),
    }
}

/// The backup authenticator for rows of a backup (their `meta` rows carry the salt and
/// the key check): `None` for a backup of an unencrypted store; an error when the backup
/// is encrypted and `secret` is missing or wrong.
pub fn backup_auth_for_rows(
    rows: &[DumpRow],
    secret: Option<&str>,
) -> StoreResult<Option<crypto::BackupAuth>> {
    let meta = |name: &str| {
        rows.iter()
            .find(|(t, k, _)| t == "meta" && k.as_slice() == name.as_bytes())
            .map(|(_, _, v)| v.as_slice())
    };
    let Some(check) = meta(KEY_CHECK2) else {
        return Ok(None);
    };
    let fail = |reason: String| StoreError::Open {
        path: "backup".into(),
        reason,
    };
    let secret = secret
        .ok_or_else(|| fail("the backup is encrypted but CONFAB_DATA_KEY is not set".into()))?;
    let salt = meta(KDF_SALT).unwrap_or_default();
    let keys = checked_keys(secret, salt, check).map_err(fail)?;
    Ok(Some(keys.backup_auth()))
}

impl SledStore {
    /// Moves the rows of schema-2 trees into `rows` (see the module docs).
    fn move_to_rows(&self) -> StoreResult<()> {
        let names = self.db.tree_names();
        let mut moved = 0usize;
        for (name, _) in PARTS {
            if !names.iter().any(|n| n.as_ref() == name.as_bytes()) {
                continue;
            }
            let Some(part) = self.part(name) else {
                continue;
            };
            let tree = self.db.open_tree(name).map_err(io)?;
            let mut batch = Batch::default();
            let mut pending = 0;
            for item in tree.iter() {
                let (k, v) = item.map_err(io)?;
                part.put(&mut batch, &k, v);
                pending += 1;
                moved += 1;
                if pending >= 1000 {
                    part.apply(std::mem::take(&mut batch)).map_err(io)?;
                    pending = 0;
                }
            }
            part.apply(batch).map_err(io)?;
        }
        self.db.flush().map_err(io)?;
        for (name, _) in PARTS {
            if names.iter().any(|n| n.as_ref() == name.as_bytes()) {
                self.db.drop_tree(name).map_err(io)?;
            }
        }
        self.db.flush().map_err(io)?;
        if moved > 0 {
            tracing::info!(
                rows = moved,
                "store moved to one tree (schema 3, one-time migration)"
            );
        }
        Ok(())
    }

    /// Brings a store older than schema 3 to [`ONE_TREE`] (the version is written last);
    /// [`SledStore::finish_schema`] takes it the rest of the way once the keys are known.
    pub(super) fn upgrade_schema(&self, found: u32) -> StoreResult<()> {
        if found < 3 {
            self.move_to_rows()?;
        }
        if found < 2 {
            let mut batch = Batch::default();
            for item in self.usernames.iter() {
                let (k, v) = item.map_err(io)?;
                // Schema-1 keys are bare names; usernames never contain ':'.
                if k.contains(&b':') {
                    continue;
                }
                let user = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<UserRef>().ok());
                let name = String::from_utf8_lossy(&k).to_string();
                self.usernames.del(&mut batch, &k);
                if let Some(user) = user {
                    let new = self.username_key(user.platform, &name);
                    self.usernames.put(&mut batch, &new, v);
                }
            }
            self.usernames.apply(batch).map_err(io)?;
        }
        self.set_schema(ONE_TREE)
    }

    fn set_schema(&self, version: u32) -> StoreResult<()> {
        self.meta
            .insert("schema_version", &version.to_be_bytes())
            .map_err(io)?;
        self.db.flush().map_err(io)?;
        Ok(())
    }

    /// Schema 3 → 4, after [`SledStore::apply_key`] (sealed rows open only with the keys):
    /// see the module docs. `schema_version` is written last.
    pub(super) fn finish_schema(&self) -> StoreResult<()> {
        let version = self.meta.get("schema_version").map_err(io)?;
        let version = version
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes);
        if version.is_some_and(|v| v >= SCHEMA_VERSION) {
            return Ok(());
        }
        let grouped = self.group_turn_rows()?;
        if grouped > 0 {
            tracing::info!(
                rows = grouped,
                "turns grouped by exchange (schema 4, one-time migration)"
            );
        }
        self.set_schema(SCHEMA_VERSION)
    }

    /// Pairs consecutive single-turn rows of one conversation into one row (the first
    /// row's key); returns how many pairs. Each pair is one atomic batch entry.
    fn group_turn_rows(&self) -> StoreResult<usize> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut batch = Batch::default();
        let (mut pending, mut grouped) = (0, 0);
        // A single-turn row still waiting for the next row of its conversation.
        let mut held: Option<(sled::IVec, Turn)> = None;
        let conversation = |k: &[u8]| k.len().checked_sub(8).map(|n| k[..n].to_vec());
        for item in self.turns.iter() {
            let (k, v) = item.map_err(io)?;
            let single = match self.decode_turns(&k, &v) {
                Some(mut row) if row.len() == 1 => row.pop(),
                _ => None,
            };
            match (held.take(), single) {
                (Some((first, a)), Some(b)) if conversation(&first) == conversation(&k) => {
                    let v = self.encode_turns(&first, &[a, b])?;
                    self.turns.put(&mut batch, &first, v);
                    self.turns.del(&mut batch, &k);
                    pending += 1;
                    grouped += 1;
                }
                (_, Some(t)) => held = Some((k, t)),
                (_, None) => {}
            }
            if pending >= 1000 {
                self.turns.apply(std::mem::take(&mut batch)).map_err(io)?;
                pending = 0;
            }
        }
        self.turns.apply(batch).map_err(io)?;
        self.db.flush().map_err(io)?;
        Ok(grouped)
    }

    /// Applies `CONFAB_DATA_KEY` (see the module docs). Wrong or missing keys are errors.
    pub(super) fn apply_key(&mut self, path: &str, secret: Option<&str>) -> StoreResult<()> {
        let fail = |reason: &str| StoreError::Open {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        let check1 = self.meta.get(KEY_CHECK1).map_err(io)?;
        let check2 = self.meta.get(KEY_CHECK2).map_err(io)?;
        let Some(secret) = secret else {
            if check1.is_some() || check2.is_some() {
                return Err(fail(
                    "the store is encrypted but CONFAB_DATA_KEY is not set",
                ));
            }
            return Ok(());
        };
        let legacy = LegacyCipher::from_secret(secret);
        if let (None, Some(c1)) = (&check2, &check1) {
            if legacy.open(c1).ok().as_deref() != Some(crypto::CHECK) {
                return Err(fail(
                    "CONFAB_DATA_KEY does not match the key this store was encrypted with",
                ));
            }
        }
        let salt = match self.meta.get(KDF_SALT).map_err(io)? {
            Some(s) => s.to_vec(),
            None => {
                let s = crypto::new_salt().to_vec();
                self.meta.insert(KDF_SALT, s.as_slice()).map_err(io)?;
                s
            }
        };
        let keys = match &check2 {
            Some(c) => checked_keys(secret, &salt, c).map_err(|r| fail(&r))?,
            None => {
                let keys = Keys::derive(secret, &salt).map_err(|r| fail(&r))?;
                let check = keys.seal("meta", KEY_CHECK2.as_bytes(), crypto::CHECK2);
                self.meta.insert(KEY_CHECK2, check).map_err(io)?;
                keys
            }
        };
        self.keys = Some(keys);
        if self.meta.get(SEALED).map_err(io)?.as_deref() != Some(b"2".as_slice()) {
            self.migrate_to_sealed(&legacy)?;
            self.meta.remove(KEY_CHECK1).map_err(io)?;
            self.meta.insert(SEALED, b"2".as_slice()).map_err(io)?;
            self.db.flush().map_err(io)?;
        }
        Ok(())
    }

    fn migrate_to_sealed(&self, legacy: &LegacyCipher) -> StoreResult<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.cache.clear().map_err(io)?;
        self.cache_time.clear().map_err(io)?;
        let trees: [(&'static str, &Part); 7] = [
            ("turns", &self.turns),
            ("conv_index", &self.conv_index),
            ("users", &self.users),
            ("usernames", &self.usernames),
            ("audit", &self.audit),
            ("handled", &self.handled),
            ("inbox", &self.inbox),
        ];
        let mut moved = 0usize;
        for (name, tree) in trees {
            let mut batch = Batch::default();
            let mut pending = 0;
            for item in tree.iter() {
                let (k, v) = item.map_err(io)?;
                if crypto::is_sealed(&v) {
                    continue; // done by an earlier, interrupted run
                }
                // Unreadable CFE1 values stay as they are (corrupt either way).
                let plain = match crypto::is_sealed_v1(&v) {
                    true => legacy.open(&v).unwrap_or_else(|_| v.to_vec()),
                    false => v.to_vec(),
                };
                let (nk, nv) = self
                    .rekey(name, &k, plain)
                    .unwrap_or_else(|p| (k.to_vec(), p));
                if nk.as_slice() != k.as_ref() {
                    tree.del(&mut batch, &k);
                }
                let sealed = self.seal(name, &nk, &nv);
                tree.put(&mut batch, &nk, sealed);
                pending += 1;
                moved += 1;
                if pending >= 1000 {
                    tree.apply(std::mem::take(&mut batch)).map_err(io)?;
                    pending = 0;
                }
            }
            tree.apply(batch).map_err(io)?;
        }
        self.cache_count
            .store(0, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(rows = moved, "store encrypted at rest (one-time migration)");
        Ok(())
    }

    /// The sealed-layout key (and value) of a plaintext-layout row; `Err(value)` when the
    /// key cannot be parsed (the row then stays where it is).
    fn rekey(&self, tree: &str, k: &[u8], v: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>), Vec<u8>> {
        match tree {
            "turns" => {
                let Some(split) = k.len().checked_sub(8) else {
                    return Err(v);
                };
                let (prefix, seq) = k.split_at(split);
                let Some(conv) = parse_conv_prefix(prefix) else {
                    return Err(v);
                };
                Ok(([self.conv_prefix(&conv).as_slice(), seq].concat(), v))
            }
            "conv_index" => {
                let Some(at) = k.iter().position(|b| *b == SEP) else {
                    return Err(v);
                };
                match parse_conv_prefix(&k[at + 1..]) {
                    Some(conv) => {
                        let (nk, nv) = self.index_row(&conv);
                        debug_assert_eq!(nv, conv_prefix_plain(&conv));
                        Ok((nk, nv))
                    }
                    None => Err(v),
                }
            }
            "users" => match std::str::from_utf8(k).ok().and_then(|s| s.parse().ok()) {
                Some(user) => Ok((self.user_key(&user), v)),
                None => Err(v),
            },
            "usernames" => {
                let user = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<UserRef>().ok());
                let name = String::from_utf8_lossy(k);
                let name = name.split_once(':').map_or(&*name, |(_, n)| n);
                match user {
                    Some(u) => Ok((self.username_key(u.platform, name), v)),
                    None => Err(v),
                }
            }
            _ => Ok((k.to_vec(), v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::layout;
    use super::*;
    use crate::domain::Platform;
    use crate::store::{ConversationStore, UserStore};

    /// A schema-1 store, encrypted the old way (text sealed as `CFE1` under the unsalted
    /// key, everything else plain, usernames not per platform), opened with the key.
    #[test]
    fn an_old_encrypted_store_is_migrated_once_and_completely() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = crypto::LegacyCipher::from_secret("old passphrase");
        {
            let s = SledStore::open(dir.path(), 8, 500).unwrap();
            let u = tg("7");
            let rec = serde_json::to_vec(&banned("sock puppet")).unwrap();
            s.users.insert("tg:7", rec).unwrap();
            s.usernames.insert("ann", "tg:7").unwrap();
            let prefix = layout::conv_prefix_plain(&key("7"));
            for (i, t) in ["first secret", "second secret"].iter().enumerate() {
                let mut k = prefix.clone();
                k.extend_from_slice(&(i as u64).to_be_bytes());
                let v = legacy.seal(&serde_json::to_vec(&turn(t, 1)).unwrap());
                s.turns.insert(k, v).unwrap();
            }
            let mut idx = u.to_string().into_bytes();
            idx.push(0);
            idx.extend_from_slice(&prefix);
            s.conv_index.insert(idx, &[] as &[u8]).unwrap();
            s.meta
                .insert("key_check", legacy.seal(crypto::CHECK))
                .unwrap();
            s.meta
                .insert("schema_version", &1u32.to_be_bytes())
                .unwrap();
            s.db.flush().unwrap();
        }
        let wrong = SledStore::open_with_key(dir.path(), 8, 500, Some("other"));
        assert!(wrong.err().unwrap().to_string().contains("does not match"));
        let check = |s: &SledStore| {
            let u = tg("7");
            let rec = s.user(&u).unwrap().unwrap();
            assert_eq!(rec.banned.unwrap().reason, "sock puppet");
            assert_eq!(
                s.find_username(Platform::Telegram, "@Ann").unwrap(),
                Some(u.clone())
            );
            assert_eq!(s.find_username(Platform::Discord, "ann").unwrap(), None);
            let convs = s.user_conversations(&u).unwrap();
            let texts: Vec<_> = convs[0].1.iter().map(|t| t.text.as_str()).collect();
            assert_eq!(texts, ["first secret", "second secret"]);
            for (tree, k, v) in s.dump().unwrap() {
                let row = format!(
                    "{}{}",
                    String::from_utf8_lossy(&k),
                    String::from_utf8_lossy(&v)
                );
                for needle in ["secret", "sock", "ann", "Ann", "tg:7"] {
                    assert!(!row.contains(needle), "{needle} in {tree}: {row}");
                }
            }
        };
        {
            let s = SledStore::open_with_key(dir.path(), 8, 500, Some("old passphrase")).unwrap();
            check(&s);
            assert!(s.meta.get("key_check").unwrap().is_none(), "old check gone");
            // an interrupted migration: a row still in the old form, marker not yet set
            s.meta.remove("sealed").unwrap();
            let rec = serde_json::to_vec(&banned("late")).unwrap();
            s.users.insert("tg:8", rec).unwrap();
            s.db.flush().unwrap();
        }
        let s = SledStore::open_with_key(dir.path(), 8, 500, Some("old passphrase")).unwrap();
        check(&s);
        assert_eq!(
            s.user(&tg("8")).unwrap().unwrap().banned.unwrap().reason,
            "late"
        );
        drop(s);
        let none = SledStore::open(dir.path(), 8, 500).err().unwrap();
        assert!(
            none.to_string().contains("CONFAB_DATA_KEY is not set"),
            "{none}"
        );
    }

    /// A schema-2 store (one tree per role, JSON values) moves into `rows` at open; a
    /// move interrupted before `schema_version` was written is redone by the next open.
    #[test]
    fn a_schema_2_store_moves_into_one_tree_and_an_interrupted_move_finishes() {
        let dir = tempfile::tempdir().unwrap();
        fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
            serde_json::to_vec(v).unwrap()
        }
        let old_user = |db: &sled::Db, id: &str, reason: &str| {
            let t = db.open_tree("users").unwrap();
            t.insert(format!("tg:{id}"), json(&banned(reason))).unwrap();
        };
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert("schema_version", &2u32.to_be_bytes()).unwrap();
            old_user(&db, "7", "spam");
            let prefix = layout::conv_prefix_plain(&key("7"));
            let turns = db.open_tree("turns").unwrap();
            for (i, t) in ["one", "two"].iter().enumerate() {
                let k = [prefix.as_slice(), &(i as u64).to_be_bytes()].concat();
                turns.insert(k, json(&turn(t, 1))).unwrap();
            }
            let idx = [b"tg:7\0".as_slice(), &prefix].concat();
            db.open_tree("conv_index")
                .unwrap()
                .insert(idx, &[])
                .unwrap();
            db.flush().unwrap();
        }
        let check = |s: &SledStore, ids: &[&str]| {
            for id in ids {
                let rec = s.user(&tg(id)).unwrap().unwrap();
                assert!(rec.banned.is_some(), "tg:{id} still banned");
            }
            let convs = s.user_conversations(&tg("7")).unwrap();
            let texts: Vec<_> = convs[0].1.iter().map(|t| t.text.as_str()).collect();
            assert_eq!(texts, ["one", "two"]);
            let names = s.db.tree_names();
            assert!(
                !names.iter().any(|n| n.as_ref() == b"users"),
                "old trees dropped"
            );
            let v = s.meta.get("schema_version").unwrap().unwrap();
            assert_eq!(v.as_ref(), SCHEMA_VERSION.to_be_bytes());
        };
        {
            let s = SledStore::open(dir.path(), 8, 500).unwrap();
            check(&s, &["7"]);
            // a crash after copying but before the version was written
            s.meta
                .insert("schema_version", &2u32.to_be_bytes())
                .unwrap();
            old_user(&s.db, "8", "late");
            s.db.flush().unwrap();
        }
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        check(&s, &["7", "8"]);
        assert_eq!(s.user_count().unwrap(), 2);
    }

    /// A schema-3 store (one row per turn) has consecutive turns of a conversation
    /// paired at open, sealed or not; an interrupted pairing is finished by the next open.
    #[test]
    fn schema_3_turn_rows_are_paired_into_exchanges_once() {
        for secret in [None, Some(KEY)] {
            let dir = tempfile::tempdir().unwrap();
            let write_singles = |s: &SledStore, conv: &str, texts: &[&str]| {
                let prefix = s.conv_prefix(&key(conv));
                for t in texts {
                    let id = s.db.generate_id().unwrap();
                    let k = [prefix.as_slice(), &id.to_be_bytes()].concat();
                    let v = s.encode_turns(&k, &[turn(t, 1)]).unwrap();
                    s.turns.insert(k, v).unwrap();
                }
            };
            {
                let s = SledStore::open_with_key(dir.path(), 8, 500, secret).unwrap();
                write_singles(&s, "1", &["q1", "a1", "q2", "a2", "q3"]);
                write_singles(&s, "2", &["only"]);
                let prefix = s.conv_prefix(&key("2"));
                s.turns
                    .insert(
                        [prefix.as_slice(), &u64::MAX.to_be_bytes()].concat(),
                        b"\xff{bad".as_slice(),
                    )
                    .unwrap();
                s.set_schema(ONE_TREE).unwrap();
            }
            let rows = |s: &SledStore, conv: &str| -> Vec<usize> {
                s.turns
                    .scan_prefix(&s.conv_prefix(&key(conv)))
                    .map(|item| {
                        let (k, v) = item.unwrap();
                        s.decode_turns(&k, &v).map_or(0, |t| t.len())
                    })
                    .collect()
            };
            let texts = |s: &SledStore, conv: &str| -> Vec<String> {
                s.all_turns(&key(conv))
                    .unwrap()
                    .into_iter()
                    .map(|t| t.text)
                    .collect()
            };
            {
                let s = SledStore::open_with_key(dir.path(), 8, 500, secret).unwrap();
                assert_eq!(rows(&s, "1"), [2, 2, 1], "key {secret:?}");
                assert_eq!(texts(&s, "1"), ["q1", "a1", "q2", "a2", "q3"]);
                // the corrupt row stays (and stays unreadable); the lone turn is kept
                assert_eq!(rows(&s, "2"), [1, 0]);
                assert_eq!(texts(&s, "2"), ["only"]);
                let v = s.meta.get("schema_version").unwrap().unwrap();
                assert_eq!(v.as_ref(), SCHEMA_VERSION.to_be_bytes());
                // a crash before the version was written: more single rows, version 3
                write_singles(&s, "1", &["a3", "q4", "a4"]);
                s.set_schema(ONE_TREE).unwrap();
            }
            let s = SledStore::open_with_key(dir.path(), 8, 500, secret).unwrap();
            assert_eq!(rows(&s, "1"), [2, 2, 2, 2], "key {secret:?}");
            assert_eq!(
                texts(&s, "1"),
                ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"]
            );
            let v = s.meta.get("schema_version").unwrap().unwrap();
            assert_eq!(v.as_ref(), SCHEMA_VERSION.to_be_bytes());
        }
    }

    #[test]
    fn a_schema_1_store_gets_per_platform_usernames() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8, 500).unwrap();
            s.usernames.insert("vip", "dc:20").unwrap();
            s.meta
                .insert("schema_version", &1u32.to_be_bytes())
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        assert_eq!(
            s.find_username(Platform::Discord, "VIP").unwrap(),
            Some(UserRef::new(Platform::Discord, "20"))
        );
        assert_eq!(s.find_username(Platform::Telegram, "vip").unwrap(), None);
        let v = s.meta.get("schema_version").unwrap().unwrap();
        assert_eq!(v.as_ref(), SCHEMA_VERSION.to_be_bytes());
    }
}
