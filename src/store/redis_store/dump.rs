//! Whole-store row access on Redis for backups, restores and `confab migrate`.
//!
//! The representation is sled's: [`RedisStore::dump_rows`] turns the keyspace under
//! the prefix into (tree, key, value) rows exactly as a sled store with the same data
//! key would hold them (`users` keyed `tg:123`, `turns` keyed conversation prefix +
//! sequence, `conv_index`, `usernames`, `cache` keyed by the 32-byte hash with its
//! `cache_time` row, `audit` keyed by a sequence, `handled`, `inbox`, `meta`; hashed
//! and sealed with a data key, see `sled_rows.rs`), so one backup file restores into
//! either backend. [`RedisStore::load_rows`] reads such rows back through the store's
//! own writes (`conv_index`, `usernames` and `cache_time` follow from the rows they
//! index, so they are skipped). Rows are produced per user, per SCAN page and per
//! cache/audit page, never the whole keyspace at once.
//!
//! Encrypted stores: a user's sled row key needs their id, which the Redis key only
//! holds hashed — the sealed identity (`identity.rs`) names it. A dump fails, naming
//! how many, when users written before identities existed cannot be named
//! ([`super::UNNAMED`]). Loading needs the ids learnt first ([`LoadIds`]) and the
//! source's salt ([`RedisStore::adopting_key`]).

use super::audit::StreamRows;
use super::identity::Identity;
use super::layout::{parse_conversation, unhex32};
use super::sled_rows::LoadIds;
use super::RedisStore;
use crate::domain::UserRef;
use crate::store::codec::{turns_from_plain, Codec, TURNS_PER_ROW};
use crate::store::sled_store::{time_key, DumpRow};
use crate::store::{
    AuditEntry, AuditStore, CacheEntry, ConversationStore, HandledEntry, InboxStore, MetaStore,
    StoreError, StoreResult, Turn, UserRecord, UserStore,
};

/// Rows a sink gets at most at once (a user's conversations may exceed it).
const PAGE: usize = 500;

type Sink<'a> = &'a mut dyn FnMut(Vec<DumpRow>) -> StoreResult<()>;

fn bad(tree: &'static str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        tree,
        reason: reason.into(),
    }
}

impl RedisStore {
    /// One SCAN page of keys matching `pattern`.
    fn scan_page(&self, cursor: u64, pattern: &str) -> StoreResult<(u64, Vec<String>)> {
        let pattern = pattern.to_string();
        self.run(|mut c| async move {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut c)
                .await
        })
    }

    /// Calls `f` with each SCAN page of keys matching `rest` under the prefix.
    fn each_page(
        &self,
        rest: &str,
        f: &mut dyn FnMut(Vec<String>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let pattern = self.pattern(rest);
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan_page(cursor, &pattern)?;
            f(keys)?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// True when no key under the prefix exists.
    pub fn prefix_is_empty(&self) -> StoreResult<bool> {
        let mut empty = true;
        self.each_page("*", &mut |keys| {
            empty &= keys.is_empty();
            Ok(())
        })?;
        Ok(empty)
    }

    /// Deletes every key under the prefix (SCAN + UNLINK; never FLUSHDB); returns how many.
    pub fn clear_prefix(&self) -> StoreResult<usize> {
        let mut n = 0;
        self.each_page("*", &mut |keys| {
            if keys.is_empty() {
                return Ok(());
            }
            n += keys.len();
            self.run(|mut c| async move {
                redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async::<()>(&mut c)
                    .await
            })
        })?;
        Ok(n)
    }

    fn get_raw(&self, key: String) -> StoreResult<Option<Vec<u8>>> {
        self.run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
    }

    /// Every row of the store in sled's encoding, handed to `sink` page by page.
    pub fn dump_rows(&self, sink: Sink<'_>) -> StoreResult<()> {
        let mut seq = 0u64;
        self.dump_users(&mut seq, sink)?;
        self.dump_cache(sink)?;
        self.dump_audit(sink)?;
        sink(self.meta_rows()?)?;
        self.dump_inbox(sink)?;
        self.dump_handled(sink)
    }

    /// `P:meta` as rows; with a data key also sled's `sealed` = `2` (every value is
    /// sealed already: a sled store restored from these rows must not convert them).
    fn meta_rows(&self) -> StoreResult<Vec<DumpRow>> {
        let meta: Vec<(String, Vec<u8>)> = {
            let k = self.meta_key();
            self.run(|mut c| async move { redis::cmd("HGETALL").arg(k).query_async(&mut c).await })?
        };
        let mut rows: Vec<DumpRow> = meta
            .into_iter()
            .map(|(k, v)| ("meta".to_string(), k.into_bytes(), v))
            .collect();
        if self.keys.is_some() && !rows.iter().any(|(_, k, _)| k == SEALED) {
            rows.push(("meta".into(), SEALED.to_vec(), b"2".to_vec()));
        }
        Ok(rows)
    }

    fn dump_users(&self, seq: &mut u64, sink: Sink<'_>) -> StoreResult<()> {
        let set = self.users_key();
        let (mut cursor, mut unnamed) = (0u64, 0usize);
        loop {
            let (next, ids): (u64, Vec<String>) =
                self.query(&collection_page("SSCAN", &set, cursor))?;
            for id in ids {
                match self.identity(&id)? {
                    Some(Identity::User(user)) => sink(self.user_rows(&id, &user, seq)?)?,
                    Some(Identity::RowKey(k)) => sink(self.record_row(&id, &k)?)?,
                    None => unnamed += 1,
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        match unnamed {
            0 => Ok(()),
            n => Err(StoreError::Io(format!("{n} {}", super::UNNAMED))),
        }
    }

    /// The `users` row of user id `uid` under sled row key `key` (none without a record).
    fn record_row(&self, uid: &str, key: &[u8]) -> StoreResult<Vec<DumpRow>> {
        let record_key = self.key(&format!("user:{{{uid}}}"));
        let Some(raw) = self.get_raw(record_key.clone())? else {
            return Ok(Vec::new());
        };
        let rec: UserRecord = self.decode_strict("users", &record_key, &raw)?;
        let value = self.sled_form().encode("users", key, &rec)?;
        Ok(vec![("users".into(), key.to_vec(), value)])
    }

    /// A user's record, username and conversations as sled rows.
    fn user_rows(&self, uid: &str, user: &UserRef, seq: &mut u64) -> StoreResult<Vec<DumpRow>> {
        let form = self.sled_form();
        let mut rows = Vec::new();
        let convs = self.key(&format!("convs:{{{uid}}}"));
        let index: Vec<(String, Vec<u8>)> = self.query(redis::cmd("HGETALL").arg(&convs))?;
        for (id, sealed) in index {
            let conv = self
                .unseal("conv_index", &format!("{convs}/{id}"), &sealed)
                .ok()
                .and_then(|v| std::str::from_utf8(&v).ok().and_then(parse_conversation));
            let Some(conv) = conv else {
                crate::store::codec::corrupt_skipped("conv_index");
                continue;
            };
            let prefix = form.conv_prefix(&conv);
            for row in self.all_turns(&conv)?.chunks(TURNS_PER_ROW) {
                *seq += 1;
                let k = [prefix.as_slice(), &seq.to_be_bytes()].concat();
                let v = form.encode_turns(&k, row)?;
                rows.push(("turns".into(), k, v));
            }
            let (k, v) = form.index_row(&conv);
            rows.push(("conv_index".into(), k, v));
        }
        let user_key = form.user_key(user);
        let record = self.record_row(uid, &user_key)?;
        if let Some((_, _, v)) = record.first() {
            let plain = form.open("users", &user_key, v)?;
            let rec: UserRecord = from_json("users", &plain)?;
            if let Some(name) = rec.username.as_deref() {
                let (k, v) = form.username_row(user, name);
                rows.push(("usernames".into(), k, v));
            }
        }
        rows.extend(record);
        Ok(rows)
    }

    fn dump_cache(&self, sink: Sink<'_>) -> StoreResult<()> {
        let mut start = 0usize;
        loop {
            let index = self.cache_index_key();
            let stop = start + PAGE - 1;
            let page: Vec<String> = self.run(|mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(index)
                    .arg(start)
                    .arg(stop)
                    .query_async(&mut c)
                    .await
            })?;
            if page.is_empty() {
                return Ok(());
            }
            start += page.len();
            sink(self.cache_rows(&page)?)?;
        }
    }

    fn cache_rows(&self, page: &[String]) -> StoreResult<Vec<DumpRow>> {
        let keys: Vec<String> = page.iter().map(|id| self.cache_key(id)).collect();
        let ks = keys.clone();
        let values: Vec<Option<Vec<u8>>> =
            self.run(|mut c| async move { redis::cmd("MGET").arg(ks).query_async(&mut c).await })?;
        let mut rows = Vec::new();
        for ((id, key), v) in page.iter().zip(&keys).zip(values) {
            let (Some(v), Some(hash)) = (v, unhex32(id)) else {
                continue;
            };
            let Some(entry) = self.decode::<CacheEntry>("cache", key, &v) else {
                continue;
            };
            let v = self.sled_form().encode("cache", &hash, &entry)?;
            rows.push(("cache".into(), hash.to_vec(), v));
            rows.push((
                "cache_time".into(),
                time_key(entry.created_at, &hash),
                Vec::new(),
            ));
        }
        Ok(rows)
    }

    /// The audit stream in pages (`XRANGE (last + COUNT n`), keyed by a sequence.
    fn dump_audit(&self, sink: Sink<'_>) -> StoreResult<()> {
        let key = self.audit_key();
        let (mut from, mut seq) = ("-".to_string(), 0u64);
        loop {
            let (k, f) = (key.clone(), from.clone());
            let page: StreamRows = self.run(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(k)
                    .arg(f)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut c)
                    .await
            })?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            from = format!("({last}");
            let mut rows = Vec::new();
            for (_, fields) in page {
                let Some((_, v)) = fields.into_iter().find(|(f, _)| f == "e") else {
                    continue;
                };
                if let Some(entry) = self.decode::<AuditEntry>("audit", &key, &v) {
                    let k = seq.to_be_bytes().to_vec();
                    let v = self.sled_form().encode("audit", &k, &entry)?;
                    rows.push(("audit".into(), k, v));
                    seq += 1;
                }
            }
            sink(rows)?;
        }
    }

    /// The inbox hash in HSCAN pages.
    fn dump_inbox(&self, sink: Sink<'_>) -> StoreResult<()> {
        let hash = self.inbox_key();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<(String, Vec<u8>)>) =
                self.query(&collection_page("HSCAN", &hash, cursor))?;
            let mut rows = Vec::new();
            for (k, v) in page {
                match self.unseal("inbox", &format!("{hash}/{k}"), &v) {
                    Ok(plain) => {
                        let v = self.sled_form().seal("inbox", k.as_bytes(), &plain);
                        rows.push(("inbox".to_string(), k.into_bytes(), v));
                    }
                    Err(_) => crate::store::codec::corrupt_skipped("inbox"),
                }
            }
            sink(rows)?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    fn dump_handled(&self, sink: Sink<'_>) -> StoreResult<()> {
        let prefix = self.key("handled:");
        self.each_page("handled:*", &mut |keys| {
            let mut rows = Vec::new();
            for key in keys {
                let Some(id) = key
                    .strip_prefix(&prefix)
                    .and_then(|e| super::percent_decode(e).ok())
                else {
                    continue;
                };
                let raw = self.get_raw(key.clone())?;
                if let Some(entry) =
                    raw.and_then(|v| self.decode::<HandledEntry>("handled", &key, &v))
                {
                    let v = self.sled_form().encode("handled", id.as_bytes(), &entry)?;
                    rows.push(("handled".to_string(), id.into_bytes(), v));
                }
            }
            sink(rows)
        })
    }

    /// Writes rows in sled's encoding (from a backup or a sled store) into this store;
    /// with a data key the rows must be sealed under this store's keys (same salt) and
    /// `ids` must hold what the batch's hashed keys stand for ([`RedisStore::learn_ids`]).
    pub fn load_rows(&self, rows: &[DumpRow], ids: &LoadIds) -> StoreResult<()> {
        let form = self.sled_form();
        let mut turns: Vec<Turn> = Vec::new();
        let mut conv: Option<Vec<u8>> = None;
        for (tree, k, v) in rows {
            let prefix = k.get(..k.len().saturating_sub(8));
            if tree != "turns" || conv.as_deref() != prefix {
                self.flush_turns(conv.take(), &mut turns, ids)?;
            }
            match tree.as_str() {
                "turns" => {
                    conv = prefix.map(<[u8]>::to_vec);
                    turns.extend(turns_from_plain(&form.open("turns", k, v)?)?);
                }
                "users" => {
                    let rec: UserRecord = from_json("users", &form.open("users", k, v)?)?;
                    match self.user_of(k, ids) {
                        Some(user) => self.put_user(&user, &rec)?,
                        None if self.keys.is_some() => self.put_unnamed_user(k, &rec)?,
                        None => return Err(bad("users", "user id")),
                    }
                }
                "cache" => {
                    let hash: [u8; 32] =
                        k.as_slice().try_into().map_err(|_| bad("cache", "key"))?;
                    let entry: CacheEntry = from_json("cache", &form.open("cache", k, v)?)?;
                    // With a data key sled's row key is already the keyed hash (the id).
                    let id = match self.keys {
                        Some(_) => super::layout::hex(&hash),
                        None => self.cache_id(&hash),
                    };
                    self.cache_put_id(id, &entry, usize::MAX)?;
                }
                "audit" => {
                    let entry: AuditEntry = from_json("audit", &form.open("audit", k, v)?)?;
                    self.audit_append(&entry)?
                }
                "handled" => self.set_handled(
                    &utf8("handled", k)?,
                    &from_json::<HandledEntry>("handled", &form.open("handled", k, v)?)?,
                )?,
                "inbox" => self.inbox_put(&utf8("inbox", k)?, &form.open("inbox", k, v)?)?,
                // The key material is this store's own (adopted from the source).
                "meta" if self.keys.is_some() && is_key_material(k) => {}
                "meta" => self.meta_put(&utf8("meta", k)?, v)?,
                "conv_index" | "usernames" | "cache_time" => {}
                _ => return Err(bad("backup", "unknown tree")),
            }
        }
        self.flush_turns(conv, &mut turns, ids)
    }

    fn flush_turns(
        &self,
        conv: Option<Vec<u8>>,
        turns: &mut Vec<Turn>,
        ids: &LoadIds,
    ) -> StoreResult<()> {
        let Some(prefix) = conv else {
            return Ok(());
        };
        let Some(key) = self.conversation_of(&prefix, ids) else {
            // Hashed turns whose conversation no index row names (cleared while a
            // backup ran): nothing can say where they belong.
            if self.keys.is_none() {
                return Err(bad("turns", "conversation key"));
            }
            tracing::warn!(
                turns = turns.len(),
                "sealed turns of a conversation with no index entry skipped"
            );
            turns.clear();
            return Ok(());
        };
        self.append_turns(&key, turns, None)?;
        turns.clear();
        Ok(())
    }

    /// A user only an encrypted sled row key names: stored under the Redis id that key
    /// implies (its first 16 bytes), with the row key as identity for later backups.
    fn put_unnamed_user(&self, row_key: &[u8], rec: &UserRecord) -> StoreResult<()> {
        let key32: [u8; 32] = row_key.try_into().map_err(|_| bad("users", "user key"))?;
        let uid = super::layout::hex(&key32[..16]);
        let record_key = self.key(&format!("user:{{{uid}}}"));
        let value = self.encode("users", &record_key, rec)?;
        let users = self.users_key();
        let (ident_key, ident) = self.identity_entry(&uid, &Identity::RowKey(key32));
        // One transaction: never a record without the identity that names it.
        self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(record_key)
                .arg(value)
                .cmd("SADD")
                .arg(users)
                .arg(uid)
                .cmd("SET")
                .arg(ident_key)
                .arg(ident)
                .query_async::<()>(&mut c)
                .await
        })
    }
}

/// sled's `meta` row saying every value is sealed in the current format.
const SEALED: &[u8] = b"sealed";

/// `meta` rows holding the data key's salt and key check.
fn is_key_material(k: &[u8]) -> bool {
    k == b"kdf_salt" || k == b"key_check2"
}

/// One page of an SSCAN / HSCAN over the collection at `key`.
fn collection_page(command: &str, key: &str, cursor: u64) -> redis::Cmd {
    let mut cmd = redis::cmd(command);
    cmd.arg(key).arg(cursor).arg("COUNT").arg(PAGE);
    cmd
}

fn from_json<T: serde::de::DeserializeOwned>(tree: &'static str, v: &[u8]) -> StoreResult<T> {
    crate::store::codec::from_plain(tree, v)
}

fn utf8(tree: &'static str, k: &[u8]) -> StoreResult<String> {
    String::from_utf8(k.to_vec()).map_err(|_| bad(tree, "key is not UTF-8"))
}
