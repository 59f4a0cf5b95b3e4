//! Backup files and directories on disk: a private temp file renamed into place,
//! `--keep` pruning that deletes only confab's own backups, and the sibling directory a
//! restore fills before it replaces the data dir.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::backup::BackupError;

/// What a finished backup holds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(format!("{}: {e}", path.display()))
}

/// Creates `dir` (and parents) owner-only.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A backup being written: a uniquely named temp file next to its final name, created
/// exclusively (`O_EXCL`), mode 0600, never through a symlink (`O_NOFOLLOW`); removed
/// unless [`BackupFile::finish`] renames it into place.
pub struct BackupFile {
    temp: PathBuf,
    file: Option<File>,
    target: PathBuf,
    /// `--keep`: the file name pattern to prune, as (stem, extension).
    keep: Option<(usize, String, String)>,
    done: bool,
}

impl BackupFile {
    /// With `keep`, the backup is named `<stem>-<UTC time>.<ext>` next to `out` and only
    /// the newest `keep` of that pattern stay; without, it is `out` itself.
    pub fn create(out: &Path, keep: Option<usize>) -> Result<BackupFile, BackupError> {
        let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("confab");
        let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("backup");
        let target = match keep {
            Some(_) => out.with_file_name(format!(
                "{stem}-{}.{ext}",
                chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
            )),
            None => out.to_path_buf(),
        };
        let dir = parent_of(&target);
        private_dir(dir).map_err(io_at(dir))?;
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BackupError::Io(format!("{}: not a file name", out.display())))?;
        let temp = dir.join(format!(
            ".{name}.{}.{:016x}.partial",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(io_at(&temp))?;
        Ok(BackupFile {
            temp,
            file: Some(file),
            target,
            keep: keep.map(|n| (n, stem.to_string(), ext.to_string())),
            done: false,
        })
    }

    /// The temp file to write the backup into.
    pub fn file(&mut self) -> Result<&mut File, BackupError> {
        self.file
            .as_mut()
            .ok_or_else(|| BackupError::Io("backup file already closed".into()))
    }

    /// Syncs, verifies (checksum and every row), renames into place, then prunes.
    pub fn finish(mut self) -> Result<Summary, BackupError> {
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(io_at(&self.temp))?;
        }
        let rows = super::backup::verify(&self.temp)?;
        let bytes = std::fs::metadata(&self.temp)
            .map_err(io_at(&self.temp))?
            .len();
        std::fs::rename(&self.temp, &self.target).map_err(io_at(&self.target))?;
        self.done = true;
        if let Ok(d) = File::open(parent_of(&self.target)) {
            let _ = d.sync_all();
        }
        if let Some((keep, stem, ext)) = &self.keep {
            prune(parent_of(&self.target), stem, ext, *keep).map_err(io_at(&self.target))?;
        }
        Ok(Summary {
            path: self.target.clone(),
            rows,
            bytes,
        })
    }
}

impl Drop for BackupFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// `<stem>-YYYYMMDDTHHMMSSZ.<ext>`: the names `--keep` writes, and the only ones it deletes.
pub fn is_backup_name(name: &str, stem: &str, ext: &str) -> bool {
    let Some(time) = name
        .strip_prefix(stem)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(ext))
        .and_then(|r| r.strip_suffix('.'))
    else {
        return false;
    };
    time.len() == 16
        && time.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

/// A regular file (not a symlink) that starts like a confab backup.
fn looks_like_backup(path: &Path) -> bool {
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    let mut magic = [0u8; 16];
    regular
        && OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && (magic.starts_with(b"CONFAB-BACKUP 1\n") || magic.starts_with(b"CONFAB-BACKUP 2\n"))
}

fn prune(dir: &Path, stem: &str, ext: &str, keep: usize) -> std::io::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| is_backup_name(n, stem, ext))
        })
        .map(|e| e.path())
        .filter(|p| looks_like_backup(p))
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(keep);
    for old in files.into_iter().take(excess) {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

/// A new directory next to `data_dir` (`.<name>.<what>-<pid>`), removed on drop unless
/// it replaced `data_dir`.
pub struct Sibling {
    path: PathBuf,
    done: bool,
}

fn sibling_path(data_dir: &Path, what: &str) -> Result<PathBuf, BackupError> {
    let name = data_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BackupError::Io(format!("{}: not a directory name", data_dir.display())))?;
    Ok(data_dir.with_file_name(format!(".{name}.{what}-{}", std::process::id())))
}

impl Sibling {
    /// A sibling for filling `data_dir` anew, once `data_dir` is found empty or the
    /// operator forced the replacement (`verb`: what the refusal says, e.g. "restore").
    pub fn for_empty(data_dir: &Path, force: bool, verb: &str) -> Result<Sibling, BackupError> {
        let non_empty = std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some());
        if non_empty && !force {
            return Err(BackupError::Io(format!(
                "{} is not empty; {verb} into an empty data dir, or pass --force to replace it",
                data_dir.display()
            )));
        }
        Sibling::create(data_dir, verb)
    }

    pub fn create(data_dir: &Path, what: &str) -> Result<Sibling, BackupError> {
        let path = sibling_path(data_dir, what)?;
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_at(&path))?;
        }
        private_dir(&path).map_err(io_at(&path))?;
        Ok(Sibling { path, done: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Swaps this directory in for `data_dir` (two renames; the old one is put back if
    /// the second fails), then deletes the old data.
    pub fn replace(mut self, data_dir: &Path) -> Result<(), BackupError> {
        let old = sibling_path(data_dir, "old")?;
        let had_old = std::fs::symlink_metadata(data_dir).is_ok();
        if had_old {
            std::fs::rename(data_dir, &old).map_err(io_at(data_dir))?;
        }
        if let Err(e) = std::fs::rename(&self.path, data_dir) {
            if had_old {
                let _ = std::fs::rename(&old, data_dir);
            }
            return Err(io_at(data_dir)(e));
        }
        self.done = true;
        if had_old {
            if let Err(e) = std::fs::remove_dir_all(&old) {
                tracing::warn!(dir = %old.display(), error = %e, "restored; could not delete the previous data");
            }
        }
        Ok(())
    }
}

impl Drop for Sibling {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_keep_writes_are_backup_names() {
        let ok = |n| is_backup_name(n, "confab-production", "backup");
        assert!(ok("confab-production-20260101T000000Z.backup"));
        assert!(!ok("confab-production-notes.backup"));
        assert!(!ok("confab-production-20260101T000000Z.backup.partial"));
        assert!(!ok("confab-production-2026010xT000000Z.backup"));
        assert!(!ok("confab-production-20260101T000000Z.txt"));
        assert!(!ok("confab-production-x-20260101T000000Z.backup"));
    }
}
