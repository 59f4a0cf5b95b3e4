//! Backups: a point-in-time copy of every store tree in one file, with a SHA-256 trailer
//! checked before anything is restored.
//!
//! Layout: `CONFAB-BACKUP 1\n`, a JSON header line, then per row: u16 tree-name length,
//! name, u32 key length, key, u32 value length, value (all big-endian); for an encrypted
//! store (header `"mac": true`) the HMAC-SHA256 of all that under a key derived from
//! `CONFAB_DATA_KEY` ([`crate::store::BackupAuth`]); then the SHA-256 of everything before it.
//! Restoring with a data key requires a valid HMAC, so a backup edited without the key
//! (a planted cache entry, a deleted ban) is refused.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::store::sled_store::DumpRow;
use crate::store::{backup_auth_for_rows, BackupAuth, SledStore, SCHEMA_VERSION};

const MAGIC: &[u8] = b"CONFAB-BACKUP 1\n";

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
    rows: u64,
    /// An HMAC (keyed by the data key) follows the rows.
    #[serde(default)]
    mac: bool,
}

/// Serialises rows into backup bytes (header, rows, HMAC with `auth`, checksum).
pub fn encode(rows: &[DumpRow], auth: Option<&BackupAuth>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    let header = Header {
        schema: SCHEMA_VERSION,
        created_at: chrono::Utc::now().to_rfc3339(),
        rows: rows.len() as u64,
        mac: auth.is_some(),
    };
    out.extend_from_slice(
        serde_json::to_string(&header)
            .unwrap_or_default()
            .as_bytes(),
    );
    out.push(b'\n');
    for (tree, k, v) in rows {
        out.extend_from_slice(&(tree.len() as u16).to_be_bytes());
        out.extend_from_slice(tree.as_bytes());
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    if let Some(auth) = auth {
        let tag = auth.mac(&out);
        out.extend_from_slice(&tag);
    }
    let sum: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&sum);
    out
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], BackupError> {
    if buf.len() < n {
        return Err(BackupError::Malformed("unexpected end".into()));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// Verifies the checksum and, with `data_key`, the HMAC; then parses the rows. With a
/// data key set, a backup without a valid HMAC is refused; an authenticated backup
/// needs the key.
pub fn decode_authenticated(
    bytes: &[u8],
    data_key: Option<&str>,
) -> Result<Vec<DumpRow>, BackupError> {
    let (rows, signed) = parse(bytes)?;
    let auth = backup_auth_for_rows(&rows, data_key)
        .map_err(|e| BackupError::Unauthenticated(e.to_string()))?;
    match (auth, signed) {
        (Some(auth), Some((body, tag))) if auth.verify(body, tag) => Ok(rows),
        (Some(_), Some(_)) => Err(BackupError::Unauthenticated(
            "HMAC mismatch (changed, or made with another CONFAB_DATA_KEY)".into(),
        )),
        (Some(_), None) => Err(BackupError::Unauthenticated(
            "it is from an encrypted store but carries no HMAC".into(),
        )),
        (None, None) if data_key.is_some() => Err(BackupError::Unauthenticated(
            "it carries no HMAC, but CONFAB_DATA_KEY is set (a backup of an unencrypted store: restore it with CONFAB_DATA_KEY unset if you trust it; the next start with the key encrypts it)".into(),
        )),
        (None, Some(_)) => Err(BackupError::Unauthenticated(
            "it carries an HMAC but its key check is missing".into(),
        )),
        (None, None) => Ok(rows),
    }
}

/// Verifies the checksum and parses the rows (integrity only; see [`decode_authenticated`]).
pub fn decode(bytes: &[u8]) -> Result<Vec<DumpRow>, BackupError> {
    parse(bytes).map(|(rows, _)| rows)
}

/// The rows, and (signed bytes, HMAC) when the header says there is an HMAC.
type Parsed<'a> = (Vec<DumpRow>, Option<(&'a [u8], &'a [u8])>);

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, BackupError> {
    if !bytes.starts_with(MAGIC) || bytes.len() < MAGIC.len() + 32 {
        return Err(BackupError::NotABackup);
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(BackupError::Checksum);
    }
    let mut rest = &body[MAGIC.len()..];
    let nl = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BackupError::Malformed("no header".into()))?;
    let header: Header = serde_json::from_slice(&rest[..nl])
        .map_err(|e| BackupError::Malformed(format!("header: {e}")))?;
    if header.schema > SCHEMA_VERSION {
        return Err(BackupError::TooNew(header.schema));
    }
    rest = &rest[nl + 1..];
    let mut signed = None;
    if header.mac {
        // The HMAC is the last 32 bytes before the checksum, inside `rest`.
        let Some(rows_len) = rest.len().checked_sub(32) else {
            return Err(BackupError::Malformed("no HMAC".into()));
        };
        rest = &rest[..rows_len];
        signed = Some(body.split_at(body.len() - 32));
    }
    let mut rows = Vec::with_capacity(header.rows as usize);
    while !rest.is_empty() {
        let b = take(&mut rest, 2)?;
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        let tree = String::from_utf8(take(&mut rest, n)?.to_vec())
            .map_err(|_| BackupError::Malformed("tree name".into()))?;
        let len = |rest: &mut &[u8]| -> Result<usize, BackupError> {
            let b = take(rest, 4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let kl = len(&mut rest)?;
        let k = take(&mut rest, kl)?.to_vec();
        let vl = len(&mut rest)?;
        let v = take(&mut rest, vl)?.to_vec();
        rows.push((tree, k, v));
    }
    if rows.len() as u64 != header.rows {
        return Err(BackupError::Malformed("row count".into()));
    }
    Ok((rows, signed))
}

/// Writes a backup file atomically (temp file, fsync, rename) and keeps the newest
/// `keep` files of the same stem when `keep` is given.
pub fn write_file(
    bytes: &[u8],
    out: &Path,
    keep: Option<usize>,
) -> Result<std::path::PathBuf, BackupError> {
    use std::io::Write;
    let io = |e: std::io::Error| BackupError::Io(format!("{}: {e}", out.display()));
    // With --keep, each run gets its own timestamped name next to `out`.
    let target = match keep {
        Some(_) => {
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("confab");
            let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("backup");
            out.with_file_name(format!(
                "{stem}-{}.{ext}",
                chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
            ))
        }
        None => out.to_path_buf(),
    };
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = target.with_extension("partial");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &target).map_err(io)?;
    if let Some(keep) = keep {
        prune(out, keep).map_err(io)?;
    }
    Ok(target)
}

fn prune(out: &Path, keep: usize) -> std::io::Result<()> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("confab");
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{stem}-")) && !n.ends_with(".partial"))
        })
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(keep);
    for old in files.into_iter().take(excess) {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

/// Restores a verified (and, with `data_key`, authenticated) backup into `data_dir`,
/// which must be empty unless `force`.
pub fn restore(
    bytes: &[u8],
    data_dir: &Path,
    force: bool,
    cache_mb: u64,
    data_key: Option<&str>,
) -> Result<usize, BackupError> {
    let rows = decode_authenticated(bytes, data_key)?;
    let io = |e: std::io::Error| BackupError::Io(format!("{}: {e}", data_dir.display()));
    let non_empty = std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some());
    if non_empty {
        if !force {
            return Err(BackupError::Io(format!(
                "{} is not empty; restore into an empty data dir, or pass --force to replace it",
                data_dir.display()
            )));
        }
        std::fs::remove_dir_all(data_dir).map_err(io)?;
    }
    let store =
        SledStore::open(data_dir, cache_mb, 500).map_err(|e| BackupError::Io(e.to_string()))?;
    store
        .load_rows(&rows)
        .map_err(|e| BackupError::Io(e.to_string()))?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detection() {
        let rows = vec![
            ("turns".to_string(), b"k1".to_vec(), b"v1".to_vec()),
            ("users".to_string(), b"tg:1".to_vec(), vec![0u8; 300]),
        ];
        let bytes = encode(&rows, None);
        assert_eq!(decode(&bytes).unwrap(), rows);
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(matches!(decode(&bad), Err(BackupError::Checksum)));
        assert!(matches!(decode(b"hello"), Err(BackupError::NotABackup)));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 5]),
            Err(BackupError::Checksum)
        ));
    }
}
