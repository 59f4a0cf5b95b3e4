//! Operator interfaces outside the chat apps.

pub mod backup;
mod backup_file;
pub mod control;
pub mod http;
pub mod notify;
pub mod transfer;

/// Sets the process umask to 0077 so every file and socket confab creates (store,
/// control socket, backups) is the owner's alone, with or without systemd's `UMask=`.
/// Call first thing in `main`, before any thread or file exists.
pub fn restrict_umask() {
    // SAFETY: umask(2) only swaps the process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}
