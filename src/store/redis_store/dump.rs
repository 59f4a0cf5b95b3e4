//! Whole-store row access on Redis for backups, restores and `confab migrate`.
//!
//! The representation is sled's: [`RedisStore::dump_rows`] turns the keyspace under
//! the prefix into (tree, key, value) rows exactly as the sled store would hold them
//! (`users` keyed `tg:123`, `turns` keyed conversation prefix + sequence, `conv_index`,
//! `usernames`, `cache` keyed by the 32-byte hash with its `cache_time` row, `audit`
//! keyed by a sequence, `handled`, `inbox`, `meta`), so one backup file restores into
//! either backend. [`RedisStore::load_rows`] reads such rows back through the store's
//! own writes (`conv_index`, `usernames` and `cache_time` follow from the rows they
//! index, so they are skipped). Rows are produced per user, per SCAN page and per
//! cache/audit page, never the whole keyspace at once.
//!
//! Encrypted stores (a data key) hash ids in keys differently on the two backends and
//! cannot be translated without the originals: both calls refuse them.

use super::audit::StreamRows;
use super::layout::parse_conversation;
use super::RedisStore;
use crate::domain::UserRef;
use crate::store::codec::{normalise_username, Codec};
use crate::store::sled_store::{conv_prefix_plain, parse_conv_prefix, time_key, DumpRow};
use crate::store::{
    AuditEntry, AuditStore, CacheEntry, CacheStore, ConversationStore, HandledEntry, InboxStore,
    MetaStore, StoreError, StoreResult, Turn, UserRecord, UserStore,
};

/// Rows a sink gets at most at once (a user's conversations may exceed it).
const PAGE: usize = 500;

/// Why an encrypted store cannot be copied across (see the module docs).
pub const ENCRYPTED_UNSUPPORTED: &str =
    "backup, restore and migrate of a Redis store need an unencrypted store for now (CONFAB_DATA_KEY unset)";

type Sink<'a> = &'a mut dyn FnMut(Vec<DumpRow>) -> StoreResult<()>;

fn bad(tree: &'static str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        tree,
        reason: reason.into(),
    }
}

impl RedisStore {
    fn refuse_encrypted(&self) -> StoreResult<()> {
        match self.keys {
            Some(_) => Err(StoreError::Io(ENCRYPTED_UNSUPPORTED.into())),
            None => Ok(()),
        }
    }

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
        self.refuse_encrypted()?;
        let mut seq = 0u64;
        self.dump_users(&mut seq, sink)?;
        self.dump_cache(sink)?;
        self.dump_audit(sink)?;
        let meta: Vec<(String, Vec<u8>)> = {
            let k = self.meta_key();
            self.run(|mut c| async move { redis::cmd("HGETALL").arg(k).query_async(&mut c).await })?
        };
        sink(
            meta.into_iter()
                .map(|(k, v)| ("meta".to_string(), k.into_bytes(), v))
                .collect(),
        )?;
        self.dump_inbox(sink)?;
        self.dump_handled(sink)
    }

    fn dump_users(&self, seq: &mut u64, sink: Sink<'_>) -> StoreResult<()> {
        let set = self.users_key();
        let mut cursor = 0u64;
        loop {
            let (next, ids): (u64, Vec<String>) =
                self.query(&collection_page("SSCAN", &set, cursor))?;
            for id in ids {
                sink(self.user_rows(&id, seq)?)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// A user's record, username and conversations as sled rows.
    fn user_rows(&self, id: &str, seq: &mut u64) -> StoreResult<Vec<DumpRow>> {
        let (platform, raw_id) = id.split_once(':').ok_or_else(|| bad("users", "user id"))?;
        let plain = super::percent_decode(raw_id).map_err(|_| bad("users", "user id"))?;
        let user: UserRef = format!("{platform}:{plain}")
            .parse()
            .map_err(|_| bad("users", "user id"))?;
        let mut rows = Vec::new();
        let convs: Vec<(String, Vec<u8>)> = {
            let k = self.convs_key(&user);
            self.run(|mut c| async move { redis::cmd("HGETALL").arg(k).query_async(&mut c).await })?
        };
        for (_, text) in convs {
            let Some(conv) = std::str::from_utf8(&text).ok().and_then(parse_conversation) else {
                continue;
            };
            let prefix = conv_prefix_plain(&conv);
            for turn in self.all_turns(&conv)? {
                *seq += 1;
                let mut k = prefix.clone();
                k.extend_from_slice(&seq.to_be_bytes());
                rows.push(("turns".into(), k, json(&turn)?));
            }
            let mut idx = user.to_string().into_bytes();
            idx.push(0);
            idx.extend_from_slice(&prefix);
            rows.push(("conv_index".into(), idx, Vec::new()));
        }
        if let Some(raw) = self.get_raw(self.user_key(&user))? {
            let rec: UserRecord = self.decode_strict("users", &self.user_key(&user), &raw)?;
            if let Some(name) = rec.username.as_deref().map(normalise_username) {
                let k = format!("{}:{name}", user.platform.prefix());
                rows.push((
                    "usernames".into(),
                    k.into_bytes(),
                    user.to_string().into_bytes(),
                ));
            }
            rows.push(("users".into(), user.to_string().into_bytes(), raw));
        }
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
            let (Some(v), Some(hash)) = (v, unhex(id)) else {
                continue;
            };
            let Some(entry) = self.decode::<CacheEntry>("cache", key, &v) else {
                continue;
            };
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
                if self.decode::<AuditEntry>("audit", &key, &v).is_some() {
                    rows.push(("audit".into(), seq.to_be_bytes().to_vec(), v));
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
            sink(
                page.into_iter()
                    .map(|(k, v)| ("inbox".to_string(), k.into_bytes(), v))
                    .collect(),
            )?;
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
                if let Some(v) = self.get_raw(key)? {
                    rows.push(("handled".to_string(), id.into_bytes(), v));
                }
            }
            sink(rows)
        })
    }

    /// Writes rows in sled's encoding (from a backup or a sled store) into this store.
    pub fn load_rows(&self, rows: &[DumpRow]) -> StoreResult<()> {
        self.refuse_encrypted()?;
        let mut turns: Vec<Turn> = Vec::new();
        let mut conv: Option<Vec<u8>> = None;
        for (tree, k, v) in rows {
            if tree != "turns" || conv.as_deref() != k.get(..k.len().saturating_sub(8)) {
                self.flush_turns(conv.take(), &mut turns)?;
            }
            match tree.as_str() {
                "turns" => {
                    conv = k.get(..k.len().saturating_sub(8)).map(<[u8]>::to_vec);
                    turns.push(from_json("turns", v)?);
                }
                "users" => {
                    let user: UserRef = std::str::from_utf8(k)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("users", "user id"))?;
                    self.put_user(&user, &from_json::<UserRecord>("users", v)?)?;
                }
                "cache" => {
                    let hash: [u8; 32] =
                        k.as_slice().try_into().map_err(|_| bad("cache", "key"))?;
                    let entry: CacheEntry = from_json("cache", v)?;
                    self.cache_put(&hash, &entry, usize::MAX)?;
                }
                "audit" => self.audit_append(&from_json::<AuditEntry>("audit", v)?)?,
                "handled" => self.set_handled(
                    &utf8("handled", k)?,
                    &from_json::<HandledEntry>("handled", v)?,
                )?,
                "inbox" => self.inbox_put(&utf8("inbox", k)?, v)?,
                "meta" => self.meta_put(&utf8("meta", k)?, v)?,
                "conv_index" | "usernames" | "cache_time" => {}
                _ => return Err(bad("backup", "unknown tree")),
            }
        }
        self.flush_turns(conv, &mut turns)
    }

    fn flush_turns(&self, conv: Option<Vec<u8>>, turns: &mut Vec<Turn>) -> StoreResult<()> {
        let Some(prefix) = conv else {
            return Ok(());
        };
        let key = parse_conv_prefix(&prefix).ok_or_else(|| bad("turns", "conversation key"))?;
        self.append_turns(&key, turns, None)?;
        turns.clear();
        Ok(())
    }
}

/// One page of an SSCAN / HSCAN over the collection at `key`.
fn collection_page(command: &str, key: &str, cursor: u64) -> redis::Cmd {
    let mut cmd = redis::cmd(command);
    cmd.arg(key).arg(cursor).arg("COUNT").arg(PAGE);
    cmd
}

fn json<T: serde::Serialize>(v: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Io(format!("encode: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(tree: &'static str, v: &[u8]) -> StoreResult<T> {
    crate::store::codec::from_plain(tree, v)
}

fn utf8(tree: &'static str, k: &[u8]) -> StoreResult<String> {
    String::from_utf8(k.to_vec()).map_err(|_| bad(tree, "key is not UTF-8"))
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
