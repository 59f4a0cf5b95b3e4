//! The sled 0.34 implementation of [`Store`] — the only module that knows sled.
//!
//! Trees (all values are JSON, so a corrupt entry can be detected and skipped):
//! - `turns`:      conversation prefix + u64 sequence (big-endian) → [`Turn`]
//! - `conv_index`: user ref + 0 + conversation prefix → () (export/forget without a full scan)
//! - `users`:      `tg:123` → [`UserRecord`];  `usernames`: lowercase `@name` → `tg:123`
//! - `cache`:      32-byte key → [`CacheEntry`]; `cache_time`: created_at (BE) + key → () for TTL/eviction
//! - `audit`:      u64 sequence (BE) → [`AuditEntry`]
//! - `handled`:    update id → [`HandledEntry`]
//! - `meta`:       `schema_version` and adapter state
//! - `inbox`:      adapter key → received update not yet answered (replayed at start)

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Db, Tree};

use super::crypto;
use super::*;
use crate::domain::Platform;

const SEP: u8 = 0;

/// Trees whose values carry message text (encrypted at rest when a data key is set).
const SEALED_TREES: &[&str] = &["turns", "cache", "handled", "inbox"];

pub struct SledStore {
    db: Db,
    turns: Tree,
    conv_index: Tree,
    users: Tree,
    usernames: Tree,
    cache: Tree,
    cache_time: Tree,
    audit: Tree,
    handled: Tree,
    meta: Tree,
    inbox: Tree,
    /// `cache.len()` is O(n) in sled; keep a running count.
    cache_count: AtomicUsize,
    flusher: Flusher,
    /// Writers share it; a backup takes it exclusively while it reads one batch of
    /// rows (sled has no snapshot across trees), never for the whole copy.
    gate: std::sync::RwLock<()>,
    cipher: Option<crypto::Cipher>,
}

type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Group commit on one dedicated thread. Every waiter that arrives while a flush runs
/// is served by the next single `db.flush()`.
///
/// Why not `Db::flush_async`: sled 0.34 runs it on its small shared I/O pool, and with
/// more concurrent callers than pool threads every thread blocks in `make_stable`
/// waiting for a write that needs a pool thread — a deadlock (seen in our tests).
struct Flusher {
    tx: Option<std::sync::mpsc::Sender<FlushWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counts: Arc<FlushCounts>,
}

/// How well group commit works: flushes done and the callers they served.
#[derive(Debug, Default)]
pub struct FlushCounts {
    pub flushes: AtomicU64,
    pub waiters: AtomicU64,
    /// Group-commit window in microseconds (see [`SledStore::set_group_commit_window`]).
    window_us: AtomicU64,
}

impl Flusher {
    fn start(db: Db) -> StoreResult<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<FlushWaiter>();
        let counts = Arc::new(FlushCounts::default());
        let c = counts.clone();
        let thread = std::thread::Builder::new()
            .name("confab-flush".into())
            .spawn(move || {
                // Under load (the last flush served several callers), wait up to the
                // window for more callers before flushing: fewer, fuller flushes. A lone
                // caller never waits.
                let mut busy = false;
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    let window = Duration::from_micros(c.window_us.load(Ordering::Relaxed));
                    if busy && !window.is_zero() {
                        let deadline = Instant::now() + window;
                        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                            match rx.recv_timeout(left) {
                                Ok(w) => batch.push(w),
                                Err(_) => break,
                            }
                        }
                    }
                    batch.extend(rx.try_iter());
                    busy = batch.len() > 1;
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    c.flushes.fetch_add(1, Ordering::Relaxed);
                    c.waiters.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for waiter in batch {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .map_err(|e| StoreError::Io(format!("starting the flush thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            counts,
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the channel ends the thread; joining releases its handle on the
        // database so the store can be reopened at once.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn conv_prefix(key: &ConversationKey) -> Vec<u8> {
    let mut p = Vec::with_capacity(key.bot.len() + key.chat.len() + key.user.len() + 8);
    for part in [
        key.bot.as_bytes(),
        key.platform.prefix().as_bytes(),
        key.chat.as_bytes(),
        key.user.as_bytes(),
    ] {
        p.extend_from_slice(part);
        p.push(SEP);
    }
    p
}

fn parse_conv_prefix(p: &[u8]) -> Option<ConversationKey> {
    let parts: Vec<&[u8]> = p.split(|b| *b == SEP).collect();
    // four parts plus the empty tail after the last separator
    if parts.len() != 5 {
        return None;
    }
    let s = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    let platform = match parts[1] {
        b"tg" => Platform::Telegram,
        b"dc" => Platform::Discord,
        b"cli" => Platform::Terminal,
        _ => return None,
    };
    Some(ConversationKey {
        bot: s(parts[0])?,
        platform,
        chat: s(parts[2])?,
        user: s(parts[3])?,
    })
}

fn user_key(user: &UserRef) -> Vec<u8> {
    user.to_string().into_bytes()
}

fn index_key(user: &UserRef, prefix: &[u8]) -> Vec<u8> {
    let mut k = user_key(user);
    k.push(SEP);
    k.extend_from_slice(prefix);
    k
}

fn time_key(at: i64, key: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    k.extend_from_slice(&(at.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// Replaces `needle` where it is not part of a longer id (`tg:1` must not match `tg:12`).
fn replace_whole(hay: &str, needle: &str, with: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = hay;
    let mut hit = false;
    while let Some(pos) = rest.find(needle) {
        let end = pos + needle.len();
        let longer = rest[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric());
        out.push_str(&rest[..pos]);
        out.push_str(if longer { needle } else { with });
        hit |= !longer;
        rest = &rest[end..];
    }
    out.push_str(rest);
    hit.then_some(out)
}

impl SledStore {
    /// Opens (or creates) the store. `cache_capacity_mb` bounds sled's page cache
    /// (its default is 1 GB); `flush_every_ms` is the background flush period.
    pub fn open(dir: &Path, cache_capacity_mb: u64, flush_every_ms: u64) -> StoreResult<SledStore> {
        Self::open_with_key(dir, cache_capacity_mb, flush_every_ms, None)
    }

    /// Like [`SledStore::open`], encrypting message text with `key` (from `CONFAB_DATA_KEY`).
    /// A key that does not match the store's, or a missing key for an encrypted store,
    /// is an error here — never garbage later.
    pub fn open_with_key(
        dir: &Path,
        cache_capacity_mb: u64,
        flush_every_ms: u64,
        key: Option<&str>,
    ) -> StoreResult<SledStore> {
        let mut store = Self::open_plain(dir, cache_capacity_mb, flush_every_ms)?;
        let check = store.meta.get("key_check").map_err(io)?;
        match (key, check) {
            (None, Some(_)) => {
                return Err(StoreError::Open {
                    path: dir.display().to_string(),
                    reason: "the store is encrypted but CONFAB_DATA_KEY is not set".into(),
                })
            }
            (None, None) => {}
            (Some(k), check) => {
                let cipher = crypto::Cipher::from_secret(k);
                match check {
                    Some(sealed) => {
                        if cipher.open(&sealed).ok().as_deref() != Some(crypto::CHECK) {
                            return Err(StoreError::Open {
                                path: dir.display().to_string(),
                                reason: "CONFAB_DATA_KEY does not match the key this store was encrypted with".into(),
                            });
                        }
                    }
                    None => {
                        store
                            .meta
                            .insert("key_check", cipher.seal(crypto::CHECK))
                            .map_err(io)?;
                    }
                }
                store.cipher = Some(cipher);
            }
        }
        Ok(store)
    }

    fn open_plain(
        dir: &Path,
        cache_capacity_mb: u64,
        flush_every_ms: u64,
    ) -> StoreResult<SledStore> {
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
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && attempts < 200 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(StoreError::Open {
                        path: path.clone(),
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
        };
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
            cipher: None,
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

    /// The underlying database, for backup/restore (sled's export/import).
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

    pub fn db(&self) -> &Db {
        &self.db
    }

    fn encode<T: Serialize>(&self, tree: &'static str, v: &T) -> StoreResult<Vec<u8>> {
        let plain = serde_json::to_vec(v).map_err(|e| StoreError::Io(format!("encode: {e}")))?;
        Ok(self.seal(tree, plain))
    }

    /// Decodes a value; a corrupt one is logged and skipped (`None`) so the daemon keeps serving.
    fn decode<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Option<T> {
        let plain = match self.unseal(bytes) {
            Ok(p) => p,
            Err(reason) => {
                tracing::error!(tree, key = %String::from_utf8_lossy(key), %reason, "unreadable store entry skipped");
                return None;
            }
        };
        match serde_json::from_slice(&plain) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(tree, key = %String::from_utf8_lossy(key), error = %e, "corrupt store entry skipped");
                None
            }
        }
    }

    /// Encrypts values of the trees that hold message text, when a data key is set.
    fn seal(&self, tree: &str, plain: Vec<u8>) -> Vec<u8> {
        match &self.cipher {
            Some(c) if SEALED_TREES.contains(&tree) => c.seal(&plain),
            _ => plain,
        }
    }

    fn unseal<'a>(&self, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String> {
        if !crypto::is_sealed(bytes) {
            return Ok(std::borrow::Cow::Borrowed(bytes));
        }
        match &self.cipher {
            Some(c) => c.open(bytes).map(std::borrow::Cow::Owned),
            None => Err("encrypted, but no data key is set".into()),
        }
    }

    fn write_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
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
            let tree = self.db.open_tree(name).map_err(io)?;
            let iter = match after.take() {
                Some(k) => tree.range::<&[u8], _>((
                    std::ops::Bound::Excluded(k.as_slice()),
                    std::ops::Bound::Unbounded,
                )),
                None => tree.iter(),
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

    /// Inserts rows (from a backup) into an empty store.
    pub fn load_rows(&self, rows: &[DumpRow]) -> StoreResult<()> {
        for (tree, k, v) in rows {
            if !TREES.contains(&tree.as_str()) {
                return Err(StoreError::Corrupt {
                    tree: "backup",
                    reason: format!("unknown tree {tree:?}"),
                });
            }
            self.db
                .open_tree(tree)
                .map_err(io)?
                .insert(k.as_slice(), v.as_slice())
                .map_err(io)?;
        }
        self.cache_count.store(self.cache.len(), Ordering::Relaxed);
        self.db.flush().map_err(io)?;
        Ok(())
    }

    /// Every (tree, key, value) in the store, for tests and audits of what is stored.
    pub fn dump(&self) -> StoreResult<Vec<DumpRow>> {
        let mut out = Vec::new();
        for name in TREES {
            let tree = self.db.open_tree(name).map_err(io)?;
            for item in tree.iter() {
                let (k, v) = item.map_err(io)?;
                out.push((name.to_string(), k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
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

    fn index_username(&self, user: &UserRef, record: &UserRecord) -> StoreResult<()> {
        if let Some(name) = &record.username {
            let name = name.trim_start_matches('@').to_lowercase();
            if !name.is_empty() {
                self.usernames
                    .insert(name.as_bytes(), user_key(user))
                    .map_err(io)?;
            }
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn record_exchange(&self, exchange: Exchange<'_>) -> StoreResult<()> {
        let Exchange {
            conversation: key,
            turns,
            handled,
            user,
        } = exchange;
        let _gate = self.write_gate();
        let prefix = conv_prefix(key);
        let mut rows = Vec::with_capacity(turns.len());
        for turn in turns {
            let seq = self.db.generate_id().map_err(io)?;
            let mut k = prefix.clone();
            k.extend_from_slice(&seq.to_be_bytes());
            rows.push((k, self.encode("turns", turn)?));
        }
        let handled_row = match handled {
            Some((id, entry)) => Some((id.as_bytes().to_vec(), self.encode("handled", entry)?)),
            None => None,
        };
        let idx = index_key(&key.user_ref(), &prefix);
        let (user_ref, update) = match user {
            Some((u, f)) => (Some(u), Some(f)),
            None => (None, None),
        };
        let user_row = user_ref.map(user_key);
        // sled retries the closure on conflicts and wants `Fn`: borrow through cells.
        let update = std::cell::RefCell::new(update);
        // (username before, record after) of the user, from the attempt that committed.
        let user_change = std::cell::RefCell::new(None::<(Option<String>, UserRecord)>);
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
                    index_t.insert(idx.as_slice(), &[] as &[u8])?;
                }
                if let (Some(k), Some(f)) = (&user_row, update.borrow_mut().as_mut()) {
                    let old: Option<UserRecord> = users_t
                        .get(k.as_slice())?
                        .and_then(|v| self.decode("users", k, &v));
                    let before = old.as_ref().and_then(|r| r.username.clone());
                    let mut rec = old.unwrap_or_default();
                    f(&mut rec);
                    let bytes = self
                        .encode("users", &rec)
                        .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
                    users_t.insert(k.as_slice(), bytes)?;
                    *user_change.borrow_mut() = Some((before, rec));
                }
                Ok::<(), ConflictableTransactionError<String>>(())
            })
            .map_err(|e: TransactionError<String>| {
                StoreError::Io(format!("append turns: {e:?}"))
            })?;
        if let (Some(u), Some((before, rec))) = (user_ref, user_change.into_inner()) {
            if rec.username != before {
                self.index_username(u, &rec)?;
            }
        }
        Ok(())
    }

    fn recent_turns(&self, key: &ConversationKey, max_tokens: usize) -> StoreResult<Vec<Turn>> {
        let mut used = 0usize;
        let mut out = Vec::new();
        for (_, turn) in self.scan_turns(&conv_prefix(key)).rev() {
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
        Ok(self.scan_turns(&conv_prefix(key)).map(|(_, t)| t).collect())
    }

    fn user_conversations(&self, user: &UserRef) -> StoreResult<Vec<(ConversationKey, Vec<Turn>)>> {
        let mut prefix = user_key(user);
        prefix.push(SEP);
        let mut out = Vec::new();
        for item in self.conv_index.scan_prefix(&prefix) {
            let (k, _) = item.map_err(io)?;
            let conv = &k[prefix.len()..];
            match parse_conv_prefix(conv) {
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
        let prefix = conv_prefix(key);
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for item in self.turns.scan_prefix(&prefix).keys() {
            batch.remove(item.map_err(io)?);
            n += 1;
        }
        self.turns.apply_batch(batch).map_err(io)?;
        self.conv_index
            .remove(index_key(&key.user_ref(), &prefix))
            .map_err(io)?;
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
        let key = user_key(user);
        Ok(self
            .users
            .get(&key)
            .map_err(io)?
            .and_then(|v| self.decode("users", &key, &v)))
    }

    fn put_user(&self, user: &UserRef, record: &UserRecord) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.users
            .insert(user_key(user), self.encode("users", record)?)
            .map_err(io)?;
        self.index_username(user, record)
    }

    fn update_user(
        &self,
        user: &UserRef,
        f: &mut dyn FnMut(&mut UserRecord),
    ) -> StoreResult<UserRecord> {
        let _gate = self.write_gate();
        let key = user_key(user);
        let mut result = UserRecord::default();
        let mut encode_err = None;
        let mut username_before = None;
        self.users
            .fetch_and_update(&key, |old| {
                let mut rec: UserRecord = old
                    .and_then(|v| self.decode("users", &key, v))
                    .unwrap_or_default();
                username_before = rec.username.clone();
                f(&mut rec);
                let bytes = match serde_json::to_vec(&rec) {
                    Ok(b) => b,
                    Err(e) => {
                        encode_err = Some(e.to_string());
                        return old.map(|o| o.to_vec());
                    }
                };
                result = rec;
                Some(bytes)
            })
            .map_err(io)?;
        if let Some(e) = encode_err {
            return Err(StoreError::Io(format!("encode user: {e}")));
        }
        if result.username != username_before {
            self.index_username(user, &result)?;
        }
        Ok(result)
    }

    fn user_count(&self) -> StoreResult<usize> {
        Ok(self.users.len())
    }

    fn for_each_user(&self, f: &mut dyn FnMut(&UserRef, &UserRecord)) -> StoreResult<()> {
        for item in self.users.iter() {
            let (k, v) = item.map_err(io)?;
            let user = String::from_utf8(k.to_vec())
                .ok()
                .and_then(|s| s.parse().ok());
            match (user, self.decode::<UserRecord>("users", &k, &v)) {
                (Some(user), Some(rec)) => f(&user, &rec),
                _ => tracing::error!(tree = "users", "corrupt user entry skipped"),
            }
        }
        Ok(())
    }

    fn audit_redact(&self, user: &str, replacement: &str) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let mut n = 0;
        for item in self.audit.iter() {
            let (k, v) = item.map_err(io)?;
            let Some(mut e) = self.decode::<AuditEntry>("audit", &k, &v) else {
                continue;
            };
            let mut changed = false;
            for field in [&mut e.actor, &mut e.command, &mut e.result]
                .into_iter()
                .chain(e.target.as_mut())
            {
                if let Some(new) = replace_whole(field, user, replacement) {
                    *field = new;
                    changed = true;
                }
            }
            if changed {
                self.audit
                    .insert(k, self.encode("audit", &e)?)
                    .map_err(io)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn find_username(&self, username: &str) -> StoreResult<Option<UserRef>> {
        let name = username.trim_start_matches('@').to_lowercase();
        Ok(self
            .usernames
            .get(name.as_bytes())
            .map_err(io)?
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
            .and_then(|s| s.parse().ok()))
    }

    fn cache_get(&self, key: &[u8; 32]) -> StoreResult<Option<CacheEntry>> {
        Ok(self
            .cache
            .get(key)
            .map_err(io)?
            .and_then(|v| self.decode("cache", key, &v)))
    }

    fn cache_put(&self, key: &[u8; 32], entry: &CacheEntry, max_entries: usize) -> StoreResult<()> {
        let _gate = self.write_gate();
        let old = self
            .cache
            .insert(key, self.encode("cache", entry)?)
            .map_err(io)?;
        match old.and_then(|v| self.decode::<CacheEntry>("cache", key, &v)) {
            Some(old) => {
                self.cache_time
                    .remove(time_key(old.created_at, key))
                    .map_err(io)?;
            }
            None => {
                self.cache_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.cache_time
            .insert(time_key(entry.created_at, key), &[] as &[u8])
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
        let _gate = self.write_gate();
        if let Some(v) = self.cache.remove(key).map_err(io)? {
            self.cache_count.fetch_sub(1, Ordering::Relaxed);
            if let Some(old) = self.decode::<CacheEntry>("cache", key, &v) {
                self.cache_time
                    .remove(time_key(old.created_at, key))
                    .map_err(io)?;
            }
        }
        Ok(())
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
        let seq = self.db.generate_id().map_err(io)?;
        self.audit
            .insert(seq.to_be_bytes(), self.encode("audit", entry)?)
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

    fn handled(&self, update: &str) -> StoreResult<Option<HandledEntry>> {
        Ok(self
            .handled
            .get(update.as_bytes())
            .map_err(io)?
            .and_then(|v| self.decode("handled", update.as_bytes(), &v)))
    }

    fn set_handled(&self, update: &str, entry: &HandledEntry) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.handled
            .insert(update.as_bytes(), self.encode("handled", entry)?)
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

    fn inbox_put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        let _gate = self.write_gate();
        self.inbox
            .insert(key, self.seal("inbox", value.to_vec()))
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
            match (String::from_utf8(k.to_vec()), self.unseal(&v)) {
                (Ok(key), Ok(value)) => out.push((key, value.into_owned())),
                _ => tracing::error!(tree = "inbox", "unreadable inbox entry skipped"),
            }
        }
        Ok(out)
    }

    fn forget_user(&self, user: &UserRef) -> StoreResult<ForgetReport> {
        let mut report = ForgetReport::default();
        for (key, _) in self.user_conversations(user)? {
            report.turns += self.clear_conversation(&key)?;
            report.conversations += 1;
        }
        let ukey = user_key(user);
        let gate = self.write_gate();
        if let Some(v) = self.users.remove(&ukey).map_err(io)? {
            report.user_record = true;
            if let Some(rec) = self.decode::<UserRecord>("users", &ukey, &v) {
                if let Some(name) = rec.username {
                    let name = name.trim_start_matches('@').to_lowercase();
                    self.usernames.remove(name.as_bytes()).map_err(io)?;
                }
            }
        }
        // Any leftover username pointing at this user (renamed users).
        for item in self.usernames.iter() {
            let (k, v) = item.map_err(io)?;
            if v.as_ref() == ukey.as_slice() {
                self.usernames.remove(k).map_err(io)?;
            }
        }
        drop(gate);
        for item in self.cache.iter() {
            let (k, v) = item.map_err(io)?;
            let Ok(key) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            if self
                .decode::<CacheEntry>("cache", &k, &v)
                .is_some_and(|e| &e.origin == user)
            {
                self.cache_remove(&key)?;
                report.cache_entries += 1;
            }
        }
        Ok(report)
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
        let mut bad = conv_prefix(&k);
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
}
