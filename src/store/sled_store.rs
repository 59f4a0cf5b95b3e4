//! The sled 0.34 implementation of [`Store`] — the only module that knows sled.
//!
//! Trees (values are JSON, so a corrupt entry can be detected; key layout and sealing
//! with a data key: [`super::layout`]):
//! - `turns`:      conversation prefix + u64 sequence (big-endian) → [`Turn`]
//! - `conv_index`: user + conversation prefix → conversation (export/forget without a full scan)
//! - `users`:      `tg:123` → [`UserRecord`];  `usernames`: `tg:name` (per platform) → `tg:123`
//! - `cache`:      32-byte key → [`CacheEntry`]; `cache_time`: created_at (BE) + key → () for TTL/eviction
//! - `audit`:      u64 sequence (BE) → [`AuditEntry`]
//! - `handled`:    update id → [`HandledEntry`]
//! - `meta`:       `schema_version`, key check and salt, engine and adapter state
//! - `inbox`:      adapter key → received update not yet answered (replayed at start)

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Db, Tree};

use super::crypto;
pub use super::flush::FlushCounts;
use super::flush::Flusher;
use super::layout::{parse_conv_prefix, time_key};
use super::*;

pub struct SledStore {
    pub(super) db: Db,
    pub(super) turns: Tree,
    pub(super) conv_index: Tree,
    pub(super) users: Tree,
    pub(super) usernames: Tree,
    pub(super) cache: Tree,
    pub(super) cache_time: Tree,
    pub(super) audit: Tree,
    pub(super) handled: Tree,
    pub(super) meta: Tree,
    pub(super) inbox: Tree,
    /// `cache.len()` is O(n) in sled; keep a running count.
    pub(super) cache_count: AtomicUsize,
    flusher: Flusher,
    /// Writers share it; a backup takes it exclusively while it reads one batch of
    /// rows (sled has no snapshot across trees), never for the whole copy.
    pub(super) gate: std::sync::RwLock<()>,
    /// Set with `CONFAB_DATA_KEY`: personal values sealed, ids and names in keys hashed.
    pub(super) keys: Option<crypto::Keys>,
}

/// One stored (tree, key, value).
pub type DumpRow = (String, Vec<u8>, Vec<u8>);

/// Where the next [`SledStore::dump_batch`] starts: a tree (index into the order
/// given) and the last key already copied from it.
#[derive(Debug, Clone, Default)]
pub struct DumpCursor {
    pub tree: usize,
    pub after: Option<Vec<u8>>,
}

/// Creates the store's directory owner-only (0700) and tightens an existing wider one:
/// the directory guards every file sled writes below it (the daemon's umask 0077 makes
/// those 0600 as well).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not make the data dir owner-only (chmod 700 it)");
        }
    }
    Ok(())
}

/// The tree names, for tools that walk the whole store (backup, tests).
pub const TREES: &[&str] = &[
    "turns",
    "conv_index",
    "users",
    "usernames",
    "cache",
    "cache_time",
    "audit",
    "handled",
    "meta",
    "inbox",
];

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SledStore {
    /// Opens (or creates) the store. `cache_capacity_mb` bounds sled's page cache
    /// (its default is 1 GB); `flush_every_ms` is the background flush period.
    pub fn open(dir: &Path, cache_capacity_mb: u64, flush_every_ms: u64) -> StoreResult<SledStore> {
        Self::open_with_key(dir, cache_capacity_mb, flush_every_ms, None)
    }

    /// Like [`SledStore::open`], encrypting everything personal with `key` (from
    /// `CONFAB_DATA_KEY`; see [`super::migrate`] for the first open of an older store).
    /// A key that does not match the store's, or a missing key for an encrypted store,
    /// is an error here — never garbage later.
    pub fn open_with_key(
        dir: &Path,
        cache_capacity_mb: u64,
        flush_every_ms: u64,
        key: Option<&str>,
    ) -> StoreResult<SledStore> {
        let mut store = Self::open_plain(dir, cache_capacity_mb, flush_every_ms)?;
        store.apply_key(&dir.display().to_string(), key)?;
        Ok(store)
    }

    fn open_db(dir: &Path, cache_capacity_mb: u64, flush_every_ms: u64) -> StoreResult<Db> {
        let path = dir.display().to_string();
        create_private_dir(dir).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_mb.saturating_mul(1024 * 1024))
            .flush_every_ms(Some(flush_every_ms.max(1)));
        // sled releases its file lock from a background thread after the previous holder
        // closed (a restart, a reopen) — on a busy disk that took over 2 s in CI: wait up
        // to 10 s before calling it taken.
        let mut attempts = 0;
        loop {
            match config.open() {
                Ok(db) => return Ok(db),
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && attempts < 200 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(StoreError::Open {
                        path,
                        reason: match &e {
                            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                                "another process (a running confab?) holds the store's lock"
                                    .to_string()
                            }
                            other => other.to_string(),
                        },
                    })
                }
            }
        }
    }

    fn open_plain(
        dir: &Path,
        cache_capacity_mb: u64,
        flush_every_ms: u64,
    ) -> StoreResult<SledStore> {
        let path = dir.display().to_string();
        let db = Self::open_db(dir, cache_capacity_mb, flush_every_ms)?;
        let t = |name: &str| db.open_tree(name).map_err(io);
        let store = SledStore {
            turns: t("turns")?,
            conv_index: t("conv_index")?,
            users: t("users")?,
            usernames: t("usernames")?,
            cache: t("cache")?,
            cache_time: t("cache_time")?,
            audit: t("audit")?,
            handled: t("handled")?,
            meta: t("meta")?,
            inbox: t("inbox")?,
            cache_count: AtomicUsize::new(0),
            flusher: Flusher::start(db.clone())?,
            gate: std::sync::RwLock::new(()),
            keys: None,
            db,
        };
        store.check_schema(&path)?;
        store
            .cache_count
            .store(store.cache.len(), Ordering::Relaxed);
        Ok(store)
    }

    fn check_schema(&self, path: &str) -> StoreResult<()> {
        match self.meta.get("schema_version").map_err(io)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        tree: "meta",
                        reason: "schema_version is not a u32".into(),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        path: path.to_string(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found < SCHEMA_VERSION {
                    self.upgrade_schema(found)?;
                }
                Ok(())
            }
            None => {
                self.meta
                    .insert("schema_version", &SCHEMA_VERSION.to_be_bytes())
                    .map_err(io)?;
                Ok(())
            }
        }
    }

    /// Under load, a flush waits up to `window` for more callers to share it (group
    /// commit). Zero flushes at once. `store.group_commit_us` in the config.
    pub fn set_group_commit_window(&self, window: Duration) {
        self.flusher
            .counts
            .window_us
            .store(window.as_micros() as u64, Ordering::Relaxed);
    }

    /// Group-commit counters (flushes and the callers each one served).
    pub fn flush_counts(&self) -> &FlushCounts {
        &self.flusher.counts
    }

    /// The underlying database, for backup/restore (sled's export/import).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether values are sealed with a data key.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    pub(super) fn write_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn scan_turns<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = (sled::IVec, Turn)> + 'a {
        self.turns
            .scan_prefix(prefix)
            .filter_map(|item| match item {
                Ok((k, v)) => self.decode::<Turn>("turns", &k, &v).map(|t| (k, t)),
                Err(e) => {
                    tracing::error!(tree = "turns", error = %e, "store read failed");
                    None
                }
            })
    }

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

/// The `users` row change made inside [`SledStore::record_exchange`]'s transaction.
type UserChange = (Option<String>, UserRecord);

impl Store for SledStore {
    fn record_exchange(&self, exchange: Exchange<'_>) -> StoreResult<()> {
        let Exchange {
            conversation: key,
            turns,
            handled,
            user,
        } = exchange;
        let _gate = self.write_gate();
        let prefix = self.conv_prefix(key);
        let mut rows = Vec::with_capacity(turns.len());
        for turn in turns {
            let seq = self.db.generate_id().map_err(io)?;
            let mut k = prefix.clone();
            k.extend_from_slice(&seq.to_be_bytes());
            let v = self.encode("turns", &k, turn)?;
            rows.push((k, v));
        }
        let handled_row = match handled {
            Some((id, entry)) => Some((
                id.as_bytes().to_vec(),
                self.encode("handled", id.as_bytes(), entry)?,
            )),
            None => None,
        };
        let (idx, idx_value) = self.index_row(key);
        let idx_value = self.seal("conv_index", &idx, &idx_value);
        let (user_ref, update) = match user {
            Some((u, f)) => (Some(u), Some(f)),
            None => (None, None),
        };
        let user_row = user_ref.map(|u| self.user_key(u));
        // sled retries the closure on conflicts and wants `Fn`: borrow through cells.
        let update = std::cell::RefCell::new(update);
        // (username before, record after) of the user, from the attempt that committed.
        let user_change = std::cell::RefCell::new(None::<UserChange>);
        (&self.turns, &self.handled, &self.conv_index, &self.users)
            .transaction(|(turns_t, handled_t, index_t, users_t)| {
                for (k, v) in &rows {
                    turns_t.insert(k.as_slice(), v.as_slice())?;
                }
                if let Some((k, v)) = &handled_row {
                    handled_t.insert(k.as_slice(), v.as_slice())?;
                }
                // The index row is written once per conversation, not once per message.
                if index_t.get(idx.as_slice())?.is_none() {
                    index_t.insert(idx.as_slice(), idx_value.as_slice())?;
                }
                if let (Some(k), Some(f)) = (&user_row, update.borrow_mut().as_mut()) {
                    // A corrupt record aborts: never replaced by a fresh one (a lifted ban).
                    let old: Option<UserRecord> = match users_t.get(k.as_slice())? {
                        Some(v) => Some(
                            self.decode_strict("users", k, &v)
                                .map_err(ConflictableTransactionError::Abort)?,
                        ),
                        None => None,
                    };
                    let before = old.as_ref().and_then(|r| r.username.clone());
                    let mut rec = old.unwrap_or_default();
                    f(&mut rec);
                    let bytes = self
                        .encode("users", k, &rec)
                        .map_err(ConflictableTransactionError::Abort)?;
                    users_t.insert(k.as_slice(), bytes)?;
                    *user_change.borrow_mut() = Some((before, rec));
                }
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e: TransactionError<StoreError>| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Io(format!("append turns: {e}")),
            })?;
        if let (Some(u), Some((before, rec))) = (user_ref, user_change.into_inner()) {
            self.reindex_username(u, before.as_deref(), rec.username.as_deref())?;
        }
        Ok(())
    }

    fn recent_turns(&self, key: &ConversationKey, max_tokens: usize) -> StoreResult<Vec<Turn>> {
        let mut used = 0usize;
        let mut out = Vec::new();
        for (_, turn) in self.scan_turns(&self.conv_prefix(key)).rev() {
            used += turn.tokens as usize;
            if used > max_tokens {
                break;
            }
            out.push(turn);
        }
        out.reverse();
        Ok(out)
    }

    fn all_turns(&self, key: &ConversationKey) -> StoreResult<Vec<Turn>> {
        Ok(self
            .scan_turns(&self.conv_prefix(key))
            .map(|(_, t)| t)
            .collect())
    }

    fn user_conversations(&self, user: &UserRef) -> StoreResult<Vec<(ConversationKey, Vec<Turn>)>> {
        let prefix = self.index_user_prefix(user);
        let mut out = Vec::new();
        for item in self.conv_index.scan_prefix(&prefix) {
            let (k, v) = item.map_err(io)?;
            // Without a key the conversation is the rest of the row's key (value empty).
            let conv = if v.is_empty() && self.keys.is_none() {
                Ok(k.get(prefix.len()..).unwrap_or_default().to_vec())
            } else {
                self.unseal("conv_index", &k, &v).map(|c| c.into_owned())
            };
            match conv.ok().and_then(|c| parse_conv_prefix(&c)) {
                Some(key) => {
                    let turns = self.all_turns(&key)?;
                    out.push((key, turns));
                }
                None => tracing::error!(tree = "conv_index", "corrupt index entry skipped"),
            }
        }
        Ok(out)
    }

    fn clear_conversation(&self, key: &ConversationKey) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let prefix = self.conv_prefix(key);
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for item in self.turns.scan_prefix(&prefix).keys() {
            batch.remove(item.map_err(io)?);
            n += 1;
        }
        self.turns.apply_batch(batch).map_err(io)?;
        self.conv_index.remove(self.index_row(key).0).map_err(io)?;
        Ok(n)
    }

    fn purge_turns_before(&self, before: i64) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let mut n = 0;
        for item in self.turns.iter() {
            let (k, v) = item.map_err(io)?;
            // A corrupt turn can never be served again; purge it too.
            let old = self
                .decode::<Turn>("turns", &k, &v)
                .is_none_or(|t| t.at < before);
            if old {
                self.turns.remove(k).map_err(io)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn user(&self, user: &UserRef) -> StoreResult<Option<UserRecord>> {
        let key = self.user_key(user);
        match self.users.get(&key).map_err(io)? {
            Some(v) => self.decode_strict("users", &key, &v).map(Some),
            None => Ok(None),
        }
    }

    fn put_user(&self, user: &UserRef, record: &UserRecord) -> StoreResult<()> {
        let _gate = self.write_gate();
        let key = self.user_key(user);
        let bytes = self.encode("users", &key, record)?;
        let old = self.users.insert(&key, bytes).map_err(io)?;
        let before = old.and_then(|v| self.decode::<UserRecord>("users", &key, &v));
        self.reindex_username(
            user,
            before.and_then(|r| r.username).as_deref(),
            record.username.as_deref(),
        )
    }

    fn update_user(
        &self,
        user: &UserRef,
        f: &mut dyn FnMut(&mut UserRecord),
    ) -> StoreResult<UserRecord> {
        let _gate = self.write_gate();
        let key = self.user_key(user);
        let mut result = UserRecord::default();
        let mut failed = None;
        let mut username_before = None;
        self.users
            .fetch_and_update(&key, |old| {
                failed = None; // sled may retry the closure
                               // A corrupt record is left as it is and reported, never replaced.
                let mut rec: UserRecord = match old.map(|v| self.decode_strict("users", &key, v)) {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => {
                        failed = Some(e);
                        return old.map(|o| o.to_vec());
                    }
                    None => UserRecord::default(),
                };
                username_before = rec.username.clone();
                f(&mut rec);
                match self.encode("users", &key, &rec) {
                    Ok(bytes) => {
                        result = rec;
                        Some(bytes)
                    }
                    Err(e) => {
                        failed = Some(e);
                        old.map(|o| o.to_vec())
                    }
                }
            })
            .map_err(io)?;
        if let Some(e) = failed {
            return Err(e);
        }
        self.reindex_username(user, username_before.as_deref(), result.username.as_deref())?;
        Ok(result)
    }

    fn user_count(&self) -> StoreResult<usize> {
        Ok(self.users.len())
    }

    fn for_each_user(&self, f: &mut dyn FnMut(&UserRecord)) -> StoreResult<()> {
        for item in self.users.iter() {
            let (k, v) = item.map_err(io)?;
            if let Some(rec) = self.decode::<UserRecord>("users", &k, &v) {
                f(&rec);
            }
        }
        Ok(())
    }

    fn find_username(&self, platform: Platform, username: &str) -> StoreResult<Option<UserRef>> {
        let key = self.username_key(platform, username);
        let Some(v) = self.usernames.get(&key).map_err(io)? else {
            return Ok(None);
        };
        let found = self
            .unseal("usernames", &key, &v)
            .ok()
            .and_then(|v| String::from_utf8(v.into_owned()).ok())
            .and_then(|s| s.parse::<UserRef>().ok())
            .filter(|u| u.platform == platform);
        if found.is_none() {
            tracing::error!(tree = "usernames", "corrupt store entry skipped");
        }
        Ok(found)
    }

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
        for item in self.cache_time.range(..end.as_slice()) {
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

    fn audit_append(&self, entry: &AuditEntry) -> StoreResult<()> {
        let _gate = self.write_gate();
        let seq = self.db.generate_id().map_err(io)?.to_be_bytes();
        self.audit
            .insert(seq, self.encode("audit", &seq, entry)?)
            .map_err(io)?;
        Ok(())
    }

    fn audit_recent(&self, n: usize) -> StoreResult<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for item in self.audit.iter().rev() {
            if out.len() >= n {
                break;
            }
            let (k, v) = item.map_err(io)?;
            if let Some(e) = self.decode("audit", &k, &v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn audit_purge_before(&self, before: i64) -> StoreResult<usize> {
        let mut n = 0;
        // Keys are a growing sequence, so entries are in write order: stop at the first
        // one young enough to keep. Small batches keep the writer gate short.
        loop {
            let _gate = self.write_gate();
            let mut batch = 0;
            let mut done = true;
            for item in self.audit.iter() {
                let (k, v) = item.map_err(io)?;
                let old = self
                    .decode::<AuditEntry>("audit", &k, &v)
                    .is_none_or(|e| e.at < before);
                if !old {
                    break;
                }
                self.audit.remove(k).map_err(io)?;
                n += 1;
                batch += 1;
                if batch == 1000 {
                    done = false;
                    break;
                }
            }
            if done {
                return Ok(n);
            }
        }
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
        let _gate = self.write_gate();
        let mut n = 0;
        for item in self.handled.iter() {
            let (k, v) = item.map_err(io)?;
            let old = self
                .decode::<HandledEntry>("handled", &k, &v)
                .is_none_or(|h| h.at < before);
            if old {
                self.handled.remove(k).map_err(io)?;
                n += 1;
            }
        }
        Ok(n)
    }

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

    fn forget_user(&self, user: &UserRef) -> StoreResult<ForgetReport> {
        self.forget(user)
    }

    fn flush(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = self.flusher.tx.as_ref().map(|t| t.send(tx).is_ok());
            if sent != Some(true) {
                return Err(StoreError::Io("the flush thread has stopped".into()));
            }
            match rx.await {
                Ok(result) => result.map_err(StoreError::Io),
                Err(_) => Err(StoreError::Io("the flush thread has stopped".into())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout;
    use super::*;

    fn key(user: &str) -> ConversationKey {
        ConversationKey {
            bot: "assistant".into(),
            platform: Platform::Telegram,
            chat: "100".into(),
            user: user.into(),
        }
    }

    fn turn(text: &str, tokens: u32) -> Turn {
        Turn {
            role: Role::User,
            text: text.into(),
            tokens,
            at: 1_700_000_000,
        }
    }

    #[test]
    fn recent_turns_keeps_the_newest_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        let k = key("1");
        for i in 0..10 {
            s.append_turns(&k, &[turn(&format!("t{i}"), 10)], None)
                .unwrap();
        }
        // another conversation sharing a prefix must not leak in
        s.append_turns(&key("10"), &[turn("other", 1)], None)
            .unwrap();
        let got: Vec<String> = s
            .recent_turns(&k, 35)
            .unwrap()
            .into_iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(got, vec!["t7", "t8", "t9"]);
        assert_eq!(s.all_turns(&k).unwrap().len(), 10);
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
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
    fn corrupt_turn_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        let k = key("1");
        s.append_turns(&k, &[turn("a", 1)], None).unwrap();
        let mut bad = s.conv_prefix(&k);
        bad.extend_from_slice(&u64::MAX.to_be_bytes());
        s.turns.insert(bad, b"{not json".as_slice()).unwrap();
        let got = s.recent_turns(&k, 100).unwrap();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8, 500).unwrap();
            s.meta
                .insert("schema_version", &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            s.db.flush().unwrap();
        }
        let err = SledStore::open(dir.path(), 8, 500).err().unwrap();
        assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    }

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn tg(id: &str) -> UserRef {
        UserRef::new(Platform::Telegram, id)
    }

    fn banned(reason: &str) -> UserRecord {
        UserRecord {
            name: Some("Ann".into()),
            username: Some("ann".into()),
            banned: Some(Ban {
                reason: reason.into(),
                by: "tg:1".into(),
                at: 1,
                notified: false,
            }),
            ..UserRecord::default()
        }
    }

    #[test]
    fn a_corrupt_user_record_is_an_error_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        let u = tg("5");
        s.users
            .insert(s.user_key(&u), b"{broken".as_slice())
            .unwrap();
        assert!(matches!(
            s.user(&u),
            Err(StoreError::Corrupt { tree: "users", .. })
        ));
        assert!(s.update_user(&u, &mut |r| r.banned = None).is_err());
        let mut book = |r: &mut UserRecord| r.usage.messages += 1;
        let exchange = Exchange {
            conversation: &key("5"),
            turns: &[turn("hi", 1)],
            handled: None,
            user: Some((&u, &mut book)),
        };
        assert!(s.record_exchange(exchange).is_err());
        assert!(s.all_turns(&key("5")).unwrap().is_empty(), "all or nothing");
        let raw = s.users.get(s.user_key(&u)).unwrap().unwrap();
        assert_eq!(raw.as_ref(), b"{broken");
        // the error (it is logged) never quotes the stored value
        let secret = br#"{"name":"Zanzibar","first_seen":"Zanzibar"}"#;
        s.users.insert(s.user_key(&u), secret.as_slice()).unwrap();
        let err = s.user(&u).unwrap_err().to_string();
        assert!(!err.contains("Zanzibar"), "{err}");
        assert!(
            err.starts_with("corrupt store entry in users: Data error"),
            "{err}"
        );
    }

    #[test]
    fn with_a_key_plaintext_and_moved_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_with_key(dir.path(), 8, 500, Some(KEY)).unwrap();
        let (a, b) = (tg("1"), tg("2"));
        s.put_user(&a, &banned("spam")).unwrap();
        s.put_user(&b, &UserRecord::default()).unwrap();
        // a plaintext record planted in place of b's: refused, not trusted
        let plain = serde_json::to_vec(&UserRecord::default()).unwrap();
        s.users.insert(s.user_key(&a), plain).unwrap();
        assert!(s.user(&a).is_err());
        // b's sealed record moved onto a's key does not open either
        let sealed_b = s.users.get(s.user_key(&b)).unwrap().unwrap();
        s.users.insert(s.user_key(&a), sealed_b).unwrap();
        assert!(s.user(&a).is_err());
        // a plaintext turn is skipped like any corrupt entry
        let mut k = s.conv_prefix(&key("1"));
        k.extend_from_slice(&1u64.to_be_bytes());
        s.turns
            .insert(k, serde_json::to_vec(&turn("planted", 1)).unwrap())
            .unwrap();
        assert!(s.all_turns(&key("1")).unwrap().is_empty());
    }

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
