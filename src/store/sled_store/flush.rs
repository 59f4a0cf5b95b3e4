//! Group commit of sled flushes on one dedicated thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sled::Db;

use crate::store::{StoreError, StoreResult};

type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Group commit on one dedicated thread. Every waiter that arrives while a flush runs
/// is served by the next single `db.flush()`.
///
/// Why not `Db::flush_async`: sled 0.34 runs it on its small shared I/O pool, and with
/// more concurrent callers than pool threads every thread blocks in `make_stable`
/// waiting for a write that needs a pool thread — a deadlock (seen in our tests).
pub(super) struct Flusher {
    pub(super) tx: Option<std::sync::mpsc::Sender<FlushWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub(super) counts: Arc<FlushCounts>,
}

/// How well group commit works: flushes done and the callers they served.
#[derive(Debug, Default)]
pub struct FlushCounts {
    pub flushes: AtomicU64,
    pub waiters: AtomicU64,
    /// Group-commit window in microseconds (see [`super::SledStore::set_group_commit_window`]).
    pub(super) window_us: AtomicU64,
}

impl Flusher {
    pub(super) fn start(db: Db) -> StoreResult<Self> {
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
