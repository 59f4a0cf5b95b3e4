//! The sled 0.34 implementation of the store's roles — the only module that knows sled.
//! One file per role: `conversations.rs`, `users.rs`, `cache.rs`, `audit.rs`, `inbox.rs`,
//! `meta.rs`; this file opens the database and implements [`Durable`] (`flush.rs`: group
//! commit). `layout.rs`: row keys and sealing; `migrate.rs`: schema and key migrations;
//! `forget.rs`: what `forget_user` removes; `dump.rs`: backups and restores.
//!
//! Two sled trees (schema 3 and 4): `meta`, and `rows`, which holds every role's rows under a
//! one-byte tag per role (`part.rs`), so one answered message is one `apply_batch` on one
//! tree. Values are a version byte + postcard (`codec.rs`; older JSON values still read),
//! so a corrupt entry can be detected; key layout and sealing with a data key:
//! `layout.rs`. The roles (each a [`part::Part`], named like the trees of schema 2):
//! - `turns`:      conversation prefix + u64 sequence (big-endian) → the turns of one
//!   exchange (schema 4; one [`Turn`](crate::store::Turn) per row before)
//! - `conv_index`: user + conversation prefix → conversation (export/forget without a full scan)
//! - `users`:      `tg:123` → user record;  `usernames`: `tg:name` (per platform) → `tg:123`
//! - `cache`:      32-byte key → cache entry; `cache_time`: created_at (BE) + key → () for TTL/eviction
//! - `audit`:      u64 sequence (BE) → audit entry
//! - `handled`:    update id → handled entry
//! - `meta`:       `schema_version`, key check and salt, engine state, intake positions
//! - `inbox`:      adapter key → received update not yet answered (replayed at start)

mod audit;
mod cache;
mod conversations;
mod dump;
mod flush;
mod forget;
mod inbox;
mod layout;
mod meta;
mod migrate;
mod part;
mod users;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use sled::{Db, Tree};

use part::Part;

pub use dump::{DumpCursor, DumpRow};
pub use flush::FlushCounts;
use flush::Flusher;
pub(in crate::store) use forget::scrub_audit_entry;
pub use forget::FORGOTTEN;
pub(crate) use layout::{conv_prefix_plain, parse_conv_prefix, time_key};
pub use migrate::backup_auth_for_rows;

use super::crypto;
use super::{Durable, StoreError, StoreResult, SCHEMA_VERSION};
use crate::store::codec::Codec as _;

/// Every role of the store on one sled database (each role's methods in its own file).
pub struct SledStore {
    db: Db,
    turns: Part,
    conv_index: Part,
    users: Part,
    usernames: Part,
    cache: Part,
    cache_time: Part,
    audit: Part,
    handled: Part,
    meta: Tree,
    inbox: Part,
    /// Read-modify-writes of one user record (usage, bans) are serialised by a stripe
    /// of these (the hot path writes a batch, not a transaction).
    user_locks: [std::sync::Mutex<()>; USER_LOCKS],
    /// `cache.len()` is O(n) in sled; keep a running count.
    cache_count: AtomicUsize,
    flusher: Flusher,
    /// Writers share it; a backup takes it exclusively while it reads one batch of
    /// rows (sled has no snapshot across trees), never for the whole copy.
    gate: std::sync::RwLock<()>,
    /// Set with `CONFAB_DATA_KEY`: personal values sealed, ids and names in keys hashed.
    keys: Option<crypto::Keys>,
}

/// Stripes of [`SledStore`]'s user-record locks.
const USER_LOCKS: usize = 64;

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
        store.finish_schema()?;
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
        // closed (a restart, a reopen) — on a busy 2-core machine running the whole test
        // suite that took over 10 s: wait up to 30 s before calling it taken.
        let mut attempts = 0;
        loop {
            match config.open() {
                Ok(db) => return Ok(db),
                Err(e) if lock_taken(&e) && attempts < 600 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(StoreError::Open {
                        path,
                        reason: if lock_taken(&e) {
                            "another process (a running confab?) holds the store's lock".to_string()
                        } else {
                            e.to_string()
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
        let rows = db.open_tree(part::ROWS).map_err(io)?;
        let t = |name: &str| -> StoreResult<Part> {
            let tag = part::PARTS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, tag)| *tag)
                .ok_or_else(|| StoreError::Io(format!("no part {name}")))?;
            Ok(Part::new(rows.clone(), tag))
        };
        let store = SledStore {
            turns: t("turns")?,
            conv_index: t("conv_index")?,
            users: t("users")?,
            usernames: t("usernames")?,
            cache: t("cache")?,
            cache_time: t("cache_time")?,
            audit: t("audit")?,
            handled: t("handled")?,
            meta: db.open_tree("meta").map_err(io)?,
            inbox: t("inbox")?,
            user_locks: std::array::from_fn(|_| std::sync::Mutex::new(())),
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
                if found < migrate::ONE_TREE {
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

    fn write_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock of `user_key`'s stripe: held around every read-modify-write of a user
    /// record (a poisoned lock still serialises: its data is `()`).
    fn user_lock(&self, user_key: &[u8]) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user_key.hash(&mut h);
        let stripe = &self.user_locks[(h.finish() % USER_LOCKS as u64) as usize];
        stripe.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The role named `name` (a tree of schema 2), for whole-store tools.
    fn part(&self, name: &str) -> Option<&Part> {
        Some(match name {
            "turns" => &self.turns,
            "conv_index" => &self.conv_index,
            "users" => &self.users,
            "usernames" => &self.usernames,
            "cache" => &self.cache,
            "cache_time" => &self.cache_time,
            "audit" => &self.audit,
            "handled" => &self.handled,
            "inbox" => &self.inbox,
            _ => return None,
        })
    }

    /// Deletes the rows of `tree` written before `before` (by `at` of their value) and
    /// the unreadable ones (they can never be served again); returns how many.
    fn purge_older<T: DeserializeOwned>(
        &self,
        tree: &Part,
        name: &'static str,
        before: i64,
        at: fn(&T) -> i64,
    ) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let mut n = 0;
        for item in tree.iter() {
            let (k, v) = item.map_err(io)?;
            let old = self
                .decode::<T>(name, &k, &v)
                .is_none_or(|row| at(&row) < before);
            if old {
                tree.remove(k).map_err(io)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Durable for SledStore {
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

/// Shared by the tests of every role.
/// Whether opening failed because another holder has the store's file lock. sled 0.34
/// reports it as an `Other` I/O error "could not acquire lock on …" (not `WouldBlock`).
fn lock_taken(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().starts_with("could not acquire lock")
        }
        _ => false,
    }
}

#[cfg(test)]
mod fixtures {
    use super::SledStore;
    use crate::domain::{ConversationKey, Platform, UserRef};
    use crate::store::{Ban, Role, Turn, UserRecord};

    pub(super) const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    /// A fresh store in a temp dir (dropped with the dir).
    pub(super) fn temp_store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8, 500).unwrap();
        (dir, s)
    }

    pub(super) fn key(user: &str) -> ConversationKey {
        ConversationKey {
            bot: "assistant".into(),
            platform: Platform::Telegram,
            chat: "100".into(),
            user: user.into(),
        }
    }

    pub(super) fn turn(text: &str, tokens: u32) -> Turn {
        Turn {
            role: Role::User,
            text: text.into(),
            tokens,
            at: 1_700_000_000,
        }
    }

    pub(super) fn tg(id: &str) -> UserRef {
        UserRef::new(Platform::Telegram, id)
    }

    pub(super) fn banned(reason: &str) -> UserRecord {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_recognised_and_waited_for_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = SledStore::open(dir.path(), 8, 500).unwrap();
        let again = sled::Config::new().path(dir.path()).open();
        assert!(
            matches!(&again, Err(e) if lock_taken(e)),
            "{:?}",
            again.err()
        );
        // The holder closes a little later: the second open waits for it instead of
        // failing at once.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let reopened = SledStore::open(dir.path(), 8, 500);
        closer.join().unwrap();
        assert!(reopened.is_ok(), "{:?}", reopened.err());
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
