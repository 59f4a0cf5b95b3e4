//! Backups: every store tree streamed into one file, with a SHA-256 trailer that
//! `restore` checks before it touches anything.
//!
//! Layout (version 2): `CONFAB-BACKUP 2\n`, a JSON header line (`schema`, `created_at`),
//! then per row the byte 1, u16 tree-name length, name, u32 key length, key, u32 value
//! length, value (all big-endian); then the byte 0 and the u64 row count; for an
//! encrypted store (header `"mac": true`) the HMAC-SHA256 of everything so far under a
//! key derived from `CONFAB_DATA_KEY` ([`crate::store::BackupAuth`]); then the SHA-256 of
//! everything before it. Restoring with a data key requires a valid HMAC, so a backup
//! edited without the key (a planted cache entry, a deleted ban) is refused. Version 1
//! files (rows untagged, the row count in the header, no HMAC) still restore.
//!
//! Consistency: the store is read in batches of [`BATCH_ROWS`] rows; writers pause
//! while one batch is read (a batch is one point in time) and run between batches, so
//! a backup never stops them for the whole copy and never holds more than a batch in
//! memory. Every row is a committed value; a write made while the backup runs may or
//! may not be in it. Trees are copied in [`ORDER`]: rows that need another row come
//! first (turns before their `conv_index` entry, cache entries before `cache_time`,
//! usernames before users, the adapters' offsets in `meta` before the `inbox`, the inbox
//! before the `handled` markers), so a row in the backup has the rows it needs unless
//! those were deleted while the backup ran, and no received update is lost between
//! offset and inbox.
//!
//! Reading never trusts a length: each is checked against what is left of the file
//! before anything is allocated.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::store::sled_store::{DumpCursor, DumpRow, TREES};
use crate::store::{backup_auth_for_rows, BackupAuth, BackupMac, SledStore, SCHEMA_VERSION};

pub use super::backup_file::{BackupFile, Summary};

const MAGIC: &[u8] = b"CONFAB-BACKUP 2\n";
const MAGIC_V1: &[u8] = b"CONFAB-BACKUP 1\n";
const TAG_ROW: u8 = 1;
const TAG_END: u8 = 0;
const SUM_LEN: u64 = 32;
const MAX_HEADER: u64 = 4096;
/// Rows read per pause of the writers.
pub const BATCH_ROWS: usize = 512;
/// Rows (or bytes) a restore inserts per flush.
const RESTORE_BATCH_ROWS: usize = 4096;
const RESTORE_BATCH_BYTES: usize = 8 << 20;

/// Tree order of a backup (see the module docs); every tree of the store, once.
pub const ORDER: &[&str] = &[
    "turns",
    "conv_index",
    "cache",
    "cache_time",
    "usernames",
    "users",
    "audit",
    "meta",
    "inbox",
    "handled",
];

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a confab backup (bad header)")]
    NotABackup,
    #[error("backup is damaged: checksum mismatch")]
    Checksum,
    #[error("backup is truncated or malformed: {0}")]
    Malformed(String),
    #[error("backup is from a newer confab (schema {0}); upgrade confab first")]
    TooNew(u32),
    #[error("backup is not authentic: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Io(String),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Header {
    schema: u32,
    created_at: String,
    /// Version 1 only: the row count (version 2 ends with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rows: Option<u64>,
    /// An HMAC (keyed by the data key) follows the row count.
    #[serde(default)]
    mac: bool,
}

const MAC_LEN: u64 = 32;

/// Appends the backup format to a buffer piece by piece, hashing as it goes.
pub struct Encoder {
    hasher: Sha256,
    mac: Option<BackupMac>,
    rows: u64,
}

impl Encoder {
    /// Magic and header; with `auth` (an encrypted store) the file will carry an HMAC.
    pub fn start(out: &mut Vec<u8>, auth: Option<&BackupAuth>) -> Encoder {
        let at = out.len();
        out.extend_from_slice(MAGIC);
        let header = Header {
            schema: SCHEMA_VERSION,
            created_at: chrono::Utc::now().to_rfc3339(),
            rows: None,
            mac: auth.is_some(),
        };
        // Serialising plain fields cannot fail; an empty header would fail restore.
        out.extend_from_slice(&serde_json::to_vec(&header).unwrap_or_default());
        out.push(b'\n');
        let mut enc = Encoder {
            hasher: Sha256::new(),
            mac: auth.map(BackupAuth::start),
            rows: 0,
        };
        enc.absorb(&out[at..]);
        enc
    }

    fn absorb(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        if let Some(mac) = &mut self.mac {
            mac.update(bytes);
        }
    }

    pub fn row(
        &mut self,
        out: &mut Vec<u8>,
        tree: &str,
        k: &[u8],
        v: &[u8],
    ) -> Result<(), BackupError> {
        let too_long =
            |what: &str| BackupError::Malformed(format!("{what} too long for the format"));
        let tree_len = u16::try_from(tree.len()).map_err(|_| too_long("tree name"))?;
        let k_len = u32::try_from(k.len()).map_err(|_| too_long("key"))?;
        let v_len = u32::try_from(v.len()).map_err(|_| too_long("value"))?;
        let at = out.len();
        out.push(TAG_ROW);
        out.extend_from_slice(&tree_len.to_be_bytes());
        out.extend_from_slice(tree.as_bytes());
        out.extend_from_slice(&k_len.to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&v_len.to_be_bytes());
        out.extend_from_slice(v);
        self.absorb(&out[at..]);
        self.rows += 1;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// End marker, row count, the HMAC (encrypted stores) and the checksum.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        let at = out.len();
        out.push(TAG_END);
        out.extend_from_slice(&self.rows.to_be_bytes());
        self.absorb(&out[at..]);
        if let Some(mac) = self.mac.take() {
            let tag = mac.finish();
            out.extend_from_slice(&tag);
            self.hasher.update(tag);
        }
        out.extend_from_slice(&self.hasher.finalize());
    }
}

/// A backup of a store as a sequence of byte chunks (header, one chunk per batch of
/// rows, trailer). Each [`Chunks::next_chunk`] reads one batch: call it off the async
/// runtime (`spawn_blocking`).
pub struct Chunks {
    store: Arc<SledStore>,
    encoder: Option<Encoder>,
    cursor: Option<DumpCursor>,
    header: Option<Vec<u8>>,
}

impl Chunks {
    pub fn new(store: Arc<SledStore>) -> Chunks {
        let mut header = Vec::new();
        let encoder = Encoder::start(&mut header, store.backup_auth().as_ref());
        Chunks {
            store,
            encoder: Some(encoder),
            cursor: Some(DumpCursor::default()),
            header: Some(header),
        }
    }

    /// The next bytes of the backup; `None` after the trailer.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, BackupError> {
        if let Some(h) = self.header.take() {
            return Ok(Some(h));
        }
        let mut out = Vec::new();
        if let (Some(from), Some(enc)) = (self.cursor.take(), self.encoder.as_mut()) {
            let (rows, next) = self
                .store
                .dump_batch(ORDER, &from, BATCH_ROWS)
                .map_err(|e| BackupError::Io(e.to_string()))?;
            for (tree, k, v) in &rows {
                enc.row(&mut out, tree, k, v)?;
            }
            self.cursor = next;
            if self.cursor.is_some() {
                return Ok(Some(out));
            }
        }
        match self.encoder.take() {
            Some(enc) => {
                enc.finish(&mut out);
                Ok(Some(out))
            }
            None => Ok(None),
        }
    }
}

/// The backup bytes of `rows`, in memory (small stores, tests); with `auth` signed.
pub fn encode(rows: &[DumpRow], auth: Option<&BackupAuth>) -> Result<Vec<u8>, BackupError> {
    let mut out = Vec::new();
    let mut enc = Encoder::start(&mut out, auth);
    for (tree, k, v) in rows {
        enc.row(&mut out, tree, k, v)?;
    }
    enc.finish(&mut out);
    Ok(out)
}

/// Streams a whole store into `w` (no daemon running: the CLI holds the store).
pub fn write_store(store: Arc<SledStore>, w: &mut impl std::io::Write) -> Result<(), BackupError> {
    let mut chunks = Chunks::new(store);
    while let Some(bytes) = chunks.next_chunk()? {
        w.write_all(&bytes)
            .map_err(|e| BackupError::Io(format!("writing the backup: {e}")))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The part of a backup file before the checksum, read with every length checked
/// against what is left of it.
struct Body<R> {
    r: R,
    left: u64,
}

impl<R: BufRead> Body<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, BackupError> {
        if n > self.left {
            return Err(BackupError::Malformed(format!(
                "{what}: length {n} runs past the end of the file"
            )));
        }
        let mut buf = Vec::new();
        (&mut self.r)
            .take(n)
            .read_to_end(&mut buf)
            .map_err(|e| BackupError::Io(format!("reading the backup: {e}")))?;
        if buf.len() as u64 != n {
            return Err(BackupError::Malformed(format!("{what}: unexpected end")));
        }
        self.left -= n;
        Ok(buf)
    }

    fn int<const N: usize>(&mut self, what: &str) -> Result<[u8; N], BackupError> {
        let b = self.bytes(N as u64, what)?;
        <[u8; N]>::try_from(b.as_slice()).map_err(|_| BackupError::Malformed(what.into()))
    }

    fn header(&mut self) -> Result<Header, BackupError> {
        let mut line = Vec::new();
        (&mut self.r)
            .take(MAX_HEADER.min(self.left))
            .read_until(b'\n', &mut line)
            .map_err(|e| BackupError::Io(format!("reading the backup: {e}")))?;
        self.left -= line.len() as u64;
        if line.pop() != Some(b'\n') {
            return Err(BackupError::Malformed("no header line".into()));
        }
        let header: Header = serde_json::from_slice(&line)
            .map_err(|e| BackupError::Malformed(format!("header: {e}")))?;
        if header.schema > SCHEMA_VERSION {
            return Err(BackupError::TooNew(header.schema));
        }
        Ok(header)
    }

    fn row(&mut self) -> Result<DumpRow, BackupError> {
        let n = u16::from_be_bytes(self.int("tree name length")?);
        let name = self.bytes(n.into(), "tree name")?;
        let tree = TREES
            .iter()
            .find(|t| t.as_bytes() == name.as_slice())
            .ok_or_else(|| {
                BackupError::Malformed(format!("unknown tree {:?}", String::from_utf8_lossy(&name)))
            })?;
        let k_len = u32::from_be_bytes(self.int("key length")?);
        let k = self.bytes(k_len.into(), "key")?;
        let v_len = u32::from_be_bytes(self.int("value length")?);
        let v = self.bytes(v_len.into(), "value")?;
        Ok((tree.to_string(), k, v))
    }
}

/// Opens a backup and checks its magic and checksum (one streaming pass).
fn open_verified(path: &Path) -> Result<(std::fs::File, u64, Version), BackupError> {
    let io = |e: std::io::Error| BackupError::Io(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut magic = [0u8; 16];
    if len < MAGIC.len() as u64 + SUM_LEN || file.read_exact(&mut magic).is_err() {
        return Err(BackupError::NotABackup);
    }
    let version = match &magic[..] {
        m if m == MAGIC => Version::V2,
        m if m == MAGIC_V1 => Version::V1,
        _ => return Err(BackupError::NotABackup),
    };
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let body = len - SUM_LEN;
    let mut hasher = Sha256::new();
    std::io::copy(&mut (&mut file).take(body), &mut hasher).map_err(io)?;
    let mut sum = [0u8; SUM_LEN as usize];
    file.read_exact(&mut sum).map_err(io)?;
    if hasher.finalize().as_slice() != sum {
        return Err(BackupError::Checksum);
    }
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok((file, body, version))
}

/// Parses every row of a checksum-verified backup, handing them to `sink` in batches.
/// Returns the row count and the HMAC, when the backup carries one.
fn read_rows(
    file: std::fs::File,
    body: u64,
    version: Version,
    sink: &mut dyn FnMut(Vec<DumpRow>) -> Result<(), BackupError>,
) -> Result<(u64, Option<Vec<u8>>), BackupError> {
    let mut b = Body {
        r: BufReader::new(file),
        left: body,
    };
    b.bytes(MAGIC.len() as u64, "magic")?;
    let header = b.header()?;
    let (mut count, mut batch, mut batch_bytes) = (0u64, Vec::new(), 0usize);
    loop {
        let row = match version {
            Version::V1 if b.left == 0 => break,
            Version::V1 => b.row()?,
            Version::V2 => match b.int::<1>("row tag")?[0] {
                TAG_ROW => b.row()?,
                TAG_END => break,
                t => return Err(BackupError::Malformed(format!("unknown row tag {t}"))),
            },
        };
        count += 1;
        batch_bytes += row.1.len() + row.2.len();
        batch.push(row);
        if batch.len() >= RESTORE_BATCH_ROWS || batch_bytes >= RESTORE_BATCH_BYTES {
            sink(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    let expected = match version {
        Version::V1 => header.rows,
        Version::V2 => Some(u64::from_be_bytes(b.int("row count")?)),
    };
    let tag = match (version, header.mac) {
        (Version::V2, true) => Some(b.bytes(MAC_LEN, "HMAC")?),
        _ => None,
    };
    if expected != Some(count) || b.left != 0 {
        return Err(BackupError::Malformed("row count".into()));
    }
    if !batch.is_empty() {
        sink(batch)?;
    }
    Ok((count, tag))
}

/// With a data key, a backup must carry a valid HMAC under the key its own `meta` rows
/// name (salt and key check); without one, an authenticated backup is refused too.
fn authenticate(
    file: &std::fs::File,
    body: u64,
    version: Version,
    data_key: Option<&str>,
) -> Result<(), BackupError> {
    let io = |e: std::io::Error| BackupError::Io(format!("reading the backup: {e}"));
    let rewind = |mut f: &std::fs::File| f.seek(SeekFrom::Start(0)).map(|_| ()).map_err(io);
    let mut meta = Vec::new();
    let (_, tag) = read_rows(file.try_clone().map_err(io)?, body, version, &mut |batch| {
        meta.extend(batch.into_iter().filter(|(t, _, _)| t == "meta"));
        Ok(())
    })?;
    rewind(file)?;
    let auth = backup_auth_for_rows(&meta, data_key)
        .map_err(|e| BackupError::Unauthenticated(e.to_string()))?;
    let unauthentic = |why: &str| Err(BackupError::Unauthenticated(why.into()));
    match (auth, tag) {
        (Some(auth), Some(tag)) => {
            let mut mac = auth.start();
            let mut signed = file.take(body - MAC_LEN);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = signed.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                mac.update(&buf[..n]);
            }
            rewind(file)?;
            if mac.verify(&tag) {
                Ok(())
            } else {
                unauthentic("HMAC mismatch (changed, or made with another CONFAB_DATA_KEY)")
            }
        }
        (Some(_), None) => unauthentic("it is from an encrypted store but carries no HMAC"),
        (None, None) if data_key.is_some() => unauthentic(
            "it carries no HMAC, but CONFAB_DATA_KEY is set (a backup of an unencrypted store: restore it with CONFAB_DATA_KEY unset if you trust it; the next start with the key encrypts it)",
        ),
        (None, Some(_)) => unauthentic("it carries an HMAC but its key check is missing"),
        (None, None) => Ok(()),
    }
}

/// A backup file whose checksum (and HMAC, see [`authenticate`]) has been checked.
pub struct Checked {
    file: std::fs::File,
    body: u64,
    version: Version,
}

impl Checked {
    /// Checks `from` completely before anything is touched.
    pub fn open(from: &Path, data_key: Option<&str>) -> Result<Checked, BackupError> {
        let (file, body, version) = open_verified(from)?;
        authenticate(&file, body, version, data_key)?;
        Ok(Checked {
            file,
            body,
            version,
        })
    }

    /// Reads every row (a pass before [`Checked::rows`]: the key material and ids an
    /// encrypted Redis restore needs first), then rewinds.
    pub fn scan(
        &self,
        sink: &mut dyn FnMut(Vec<DumpRow>) -> Result<(), BackupError>,
    ) -> Result<(), BackupError> {
        let io = |e: std::io::Error| BackupError::Io(format!("reading the backup: {e}"));
        let file = self.file.try_clone().map_err(io)?;
        read_rows(file, self.body, self.version, sink)?;
        (&self.file).seek(SeekFrom::Start(0)).map_err(io)?;
        Ok(())
    }

    /// Hands every row to `sink` in batches; returns the row count.
    pub fn rows(
        self,
        sink: &mut dyn FnMut(Vec<DumpRow>) -> Result<(), BackupError>,
    ) -> Result<u64, BackupError> {
        read_rows(self.file, self.body, self.version, sink).map(|(n, _)| n)
    }
}

/// Checks a backup file completely (checksum, then every row) without keeping rows.
pub fn verify(path: &Path) -> Result<u64, BackupError> {
    let (file, body, version) = open_verified(path)?;
    read_rows(file, body, version, &mut |_| Ok(())).map(|(count, _)| count)
}

/// Restores a backup into `data_dir`, which must be empty unless `force`. The file is
/// checked first; the rows go into a new sibling directory, which replaces `data_dir`
/// only once every row is in and flushed: a failed restore leaves `data_dir` as it was.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    force: bool,
    cache_mb: u64,
    data_key: Option<&str>,
) -> Result<u64, BackupError> {
    let (file, body, version) = open_verified(from)?;
    authenticate(&file, body, version, data_key)?;
    let staging = super::backup_file::Sibling::for_empty(data_dir, force, "restore")?;
    let rows = {
        let store = SledStore::open(staging.path(), cache_mb, 500)
            .map_err(|e| BackupError::Io(e.to_string()))?;
        read_rows(file, body, version, &mut |batch| {
            store
                .load_rows(&batch)
                .map_err(|e| BackupError::Io(e.to_string()))
        })?
        .0
    };
    staging.replace(data_dir)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backup_order_names_every_tree_once() {
        let mut order = ORDER.to_vec();
        let mut trees = TREES.to_vec();
        order.sort_unstable();
        trees.sort_unstable();
        assert_eq!(order, trees);
    }

    fn encode(rows: &[(&str, &[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = Encoder::start(&mut out, None);
        for (t, k, v) in rows {
            enc.row(&mut out, t, k, v).unwrap();
        }
        enc.finish(&mut out);
        out
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let bytes = encode(&[("turns", b"k1", b"v1"), ("users", b"tg:1", &[0u8; 300])]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(verify(&path).unwrap(), 2);
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(verify(&path), Err(BackupError::Checksum)));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(verify(&path), Err(BackupError::NotABackup)));
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(verify(&path), Err(BackupError::Checksum)));
    }

    /// A file with a valid checksum whose lengths and counts lie.
    fn sealed(body: Vec<u8>) -> Vec<u8> {
        let mut out = body;
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    #[test]
    fn crafted_lengths_and_counts_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let v1 = |header: &str, rows: &[u8]| {
            let mut b = MAGIC_V1.to_vec();
            b.extend_from_slice(header.as_bytes());
            b.push(b'\n');
            b.extend_from_slice(rows);
            sealed(b)
        };
        let huge = format!(r#"{{"schema":1,"created_at":"x","rows":{}}}"#, u64::MAX);
        let cases = [
            v1(&huge, &[]),
            v1(
                &huge,
                &[0, 5, b't', b'u', b'r', b'n', b's', 0xff, 0xff, 0xff, 0xff],
            ),
            v1(r#"{"schema":1,"created_at":"x","rows":0}"#, &[0xff, 0xff]),
            v1(
                r#"{"schema":1,"created_at":"x","rows":1}"#,
                &[0, 4, b'n', b'o', b'p', b'e', 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            sealed([MAGIC, b"{\"schema\":1,\"created_at\":\"x\"}\n", &[7]].concat()),
            sealed(
                [
                    MAGIC,
                    b"{\"schema\":1,\"created_at\":\"x\"}\n",
                    &[0],
                    &u64::MAX.to_be_bytes(),
                ]
                .concat(),
            ),
            sealed([MAGIC, b"no header line".as_slice()].concat()),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            std::fs::write(&path, bytes).unwrap();
            match verify(&path) {
                Err(BackupError::Malformed(_)) => {}
                other => panic!("case {i}: {other:?}"),
            }
        }
    }
}
