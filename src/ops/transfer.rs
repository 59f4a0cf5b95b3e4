//! Backups of a Redis store and `confab migrate` between the backends.
//!
//! One representation serves both backends: rows in sled's (tree, key, value)
//! encoding. The Redis store produces and consumes them itself
//! (`RedisStore::dump_rows` / `load_rows`, streamed page by page), so a backup file
//! (the version-2 format of [`super::backup`]) made on either backend restores into
//! either, and `migrate` is the same row stream without the file.
//!
//! Encrypted stores (a data key) copy too: the rows are those a sled store with the
//! same key material would hold (hashed ids, values sealed for their sled rows; the
//! HMAC of a backup file as sled's). Loading into Redis first makes the target prefix
//! take the source's salt and key check ([`RedisStore::adopting_key`]) so both hash
//! ids alike, then learns what the source's hashed keys stand for from its
//! `conv_index` and `usernames` rows ([`LoadIds`], one pass before the copy).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::backup::{BackupError, Checked, Encoder, ORDER};
use crate::store::redis_store::LoadIds;
use crate::store::sled_store::{DumpCursor, DumpRow};
use crate::store::{Backend, RedisStore, SledStore};

fn io(e: impl std::fmt::Display) -> BackupError {
    BackupError::Io(e.to_string())
}

/// Streams a whole Redis store into `w` as a backup file (with a data key, signed with
/// the HMAC a sled store with the same key material would use).
pub fn write_redis(store: &RedisStore, w: &mut impl std::io::Write) -> Result<(), BackupError> {
    let write = |w: &mut dyn std::io::Write, b: &[u8]| {
        w.write_all(b)
            .map_err(|e| BackupError::Io(format!("writing the backup: {e}")))
    };
    let mut buf = Vec::new();
    let auth = store.backup_auth();
    let mut enc = Encoder::start(&mut buf, auth.as_ref());
    write(w, &buf)?;
    let mut failed = None;
    store
        .dump_rows(&mut |rows| {
            buf.clear();
            let done = rows
                .iter()
                .try_for_each(|(t, k, v)| enc.row(&mut buf, t, k, v))
                .and_then(|_| write(w, &buf));
            done.map_err(|e| {
                let text = e.to_string();
                failed = Some(e);
                crate::store::StoreError::Io(text)
            })
        })
        .map_err(|e| failed.take().unwrap_or_else(|| io(e)))?;
    buf.clear();
    enc.finish(&mut buf);
    write(w, &buf)
}

/// Restores a backup (from either backend) into the Redis store's prefix, which must
/// be empty unless `force` (then only this prefix's keys are deleted, never FLUSHDB).
/// The file is checked completely before anything is touched.
pub fn restore_redis(
    from: &Path,
    store: &RedisStore,
    force: bool,
    data_key: Option<&str>,
) -> Result<u64, BackupError> {
    let checked = Checked::open(from, data_key)?;
    let mut meta = Vec::new();
    if store.is_encrypted() {
        checked.scan(&mut |batch| {
            meta.extend(batch.into_iter().filter(|(t, _, _)| t == "meta"));
            Ok(())
        })?;
    }
    let adopted = make_room(store, force, &meta, data_key)?;
    let target = adopted.as_ref().unwrap_or(store);
    let mut ids = LoadIds::default();
    if target.is_encrypted() {
        checked.scan(&mut |batch| {
            target.learn_ids(&mut ids, &batch);
            Ok(())
        })?;
    }
    checked.rows(&mut |batch| target.load_rows(&batch, &ids).map_err(io))
}

/// Empties the target prefix (it must be empty, or only hold the key material its
/// opening wrote, unless `force`). With a data key, returns the target adopting the
/// source's key material (`meta` rows `kdf_salt`, `key_check2`).
fn make_room(
    store: &RedisStore,
    force: bool,
    source_meta: &[DumpRow],
    data_key: Option<&str>,
) -> Result<Option<RedisStore>, BackupError> {
    let empty = match store.is_encrypted() {
        true => store.holds_only_key_material(),
        false => store.prefix_is_empty(),
    };
    if !empty.map_err(io)? {
        if !force {
            return Err(BackupError::Io(
                "the Redis prefix already holds keys; restore into an empty prefix, or pass --force to replace them".into(),
            ));
        }
        store.clear_prefix().map_err(io)?;
    }
    if !store.is_encrypted() {
        return Ok(None);
    }
    let meta = |name: &str| {
        source_meta
            .iter()
            .find(|(t, k, _)| t == "meta" && k.as_slice() == name.as_bytes())
            .map(|(_, _, v)| v.as_slice())
    };
    let (Some(check), Some(secret)) = (meta("key_check2"), data_key) else {
        return Err(BackupError::Io(
            "the source is not encrypted but CONFAB_DATA_KEY is set: copy it with the key unset (the next start with the key encrypts a sled store)".into(),
        ));
    };
    store
        .adopting_key(meta("kdf_salt"), check, secret)
        .map(Some)
        .map_err(io)
}

/// The source's key material as `meta` rows (none without a data key).
fn key_material(from: &Backend) -> Result<Vec<DumpRow>, BackupError> {
    let store = from.store();
    let mut rows = Vec::new();
    for name in ["kdf_salt", "key_check2"] {
        if let Some(v) = store.meta_get(name).map_err(io)? {
            rows.push(("meta".to_string(), name.as_bytes().to_vec(), v));
        }
    }
    Ok(rows)
}

/// Every row of `from`, page by page, to `sink`.
fn each_batch(
    from: &Backend,
    sink: &mut dyn FnMut(Vec<DumpRow>) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    match from {
        Backend::Sled(s) => {
            let mut cursor = Some(DumpCursor::default());
            while let Some(at) = cursor.take() {
                let (rows, next) = s
                    .dump_batch(ORDER, &at, super::backup::BATCH_ROWS)
                    .map_err(io)?;
                sink(rows)?;
                cursor = next;
            }
            Ok(())
        }
        Backend::Redis(r) => {
            let mut failed = None;
            r.dump_rows(&mut |rows| {
                sink(rows).map_err(|e| {
                    let text = e.to_string();
                    failed = Some(e);
                    crate::store::StoreError::Io(text)
                })
            })
            .map_err(|e| failed.take().unwrap_or_else(|| io(e)))
        }
    }
}

/// Copies every row of `from` into `to` (empty); returns how many. `ids`: what the
/// source's hashed keys stand for (a Redis target with a data key).
pub fn copy(from: &Backend, to: &Backend, ids: &LoadIds) -> Result<u64, BackupError> {
    let mut n = 0u64;
    each_batch(from, &mut |rows| {
        n += rows.len() as u64;
        match to {
            Backend::Sled(s) => s.load_rows(&rows).map_err(io),
            Backend::Redis(r) => r.load_rows(&rows, ids).map_err(io),
        }
    })?;
    Ok(n)
}

/// The roles `migrate` compares, with the tree that holds each.
pub const ROLES: &[(&str, &str)] = &[
    ("turns", "turns"),
    ("conversations", "conv_index"),
    ("users", "users"),
    ("usernames", "usernames"),
    ("cache entries", "cache"),
    ("audit entries", "audit"),
    ("inbox", "inbox"),
    ("handled markers", "handled"),
    ("meta", "meta"),
];

/// Rows per role (meta without sled's own `schema_version`).
pub fn counts(b: &Backend) -> Result<BTreeMap<&'static str, u64>, BackupError> {
    let mut by_tree: BTreeMap<String, u64> = BTreeMap::new();
    each_batch(b, &mut |rows| {
        for (tree, k, _) in rows {
            if !(tree == "meta" && k == b"schema_version") {
                *by_tree.entry(tree).or_default() += 1;
            }
        }
        Ok(())
    })?;
    Ok(ROLES
        .iter()
        .map(|(role, tree)| (*role, by_tree.get(*tree).copied().unwrap_or(0)))
        .collect())
}

/// The per-role table `migrate` prints, and whether every count matches.
pub fn table(
    names: (&str, &str),
    from: &BTreeMap<&'static str, u64>,
    to: &BTreeMap<&'static str, u64>,
) -> (String, bool) {
    let mut out = format!("{:<16} {:>10} {:>10}\n", "role", names.0, names.1);
    let mut same = true;
    for (role, _) in ROLES {
        let (a, b) = (from.get(role).copied(), to.get(role).copied());
        let mark = if a == b { "" } else { "  MISMATCH" };
        same &= a == b;
        out.push_str(&format!(
            "{role:<16} {:>10} {:>10}{mark}\n",
            a.unwrap_or(0),
            b.unwrap_or(0)
        ));
    }
    (out, same)
}

/// `migrate --to sled`: the copy goes into a sibling of `data_dir` that replaces it
/// only once every row is in and the counts match. `data_dir` must be empty unless
/// `force`.
pub fn migrate_to_sled(
    from: &Backend,
    data_dir: &Path,
    force: bool,
    open: &dyn Fn(&Path) -> Result<SledStore, BackupError>,
) -> Result<(u64, String, bool), BackupError> {
    let staging = super::backup_file::Sibling::for_empty(data_dir, force, "migrate")?;
    let (rows, text, same) = {
        let to = Backend::Sled(Arc::new(open(staging.path())?));
        let rows = copy(from, &to, &LoadIds::default())?;
        let (text, same) = table(("redis", "sled"), &counts(from)?, &counts(&to)?);
        (rows, text, same)
    };
    if same {
        staging.replace(data_dir)?;
    }
    Ok((rows, text, same))
}

/// `migrate --to redis`: the prefix must be empty unless `force` (then only its keys
/// are deleted). `data_key`: `CONFAB_DATA_KEY`, which both stores share.
pub fn migrate_to_redis(
    from: &Backend,
    to: Arc<RedisStore>,
    force: bool,
    data_key: Option<&str>,
) -> Result<(u64, String, bool), BackupError> {
    let source_meta = match to.is_encrypted() {
        true => key_material(from)?,
        false => Vec::new(),
    };
    let to = match make_room(&to, force, &source_meta, data_key)? {
        Some(adopted) => Arc::new(adopted),
        None => to,
    };
    let mut ids = LoadIds::default();
    if to.is_encrypted() {
        each_batch(from, &mut |rows| {
            to.learn_ids(&mut ids, &rows);
            Ok(())
        })?;
    }
    let to = Backend::Redis(to);
    let rows = copy(from, &to, &ids)?;
    let (text, same) = table(("sled", "redis"), &counts(from)?, &counts(&to)?);
    Ok((rows, text, same))
}
