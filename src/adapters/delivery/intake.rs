//! Intake: received updates into the inbox and the queues ([`Delivery::take_in`]), and
//! the inbox replayed at start ([`Delivery::replay`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::{Admission, Delivery, Entry, Item, Outbound};
use crate::events::ErrorKind;

impl<P: Outbound> Delivery<P> {
    /// Queues the inbox's entries of this adapter (at start; a restarted intake calls
    /// it again: updates already queued or running are not queued twice). Waits for
    /// room when the inbox holds more than the queues take.
    pub async fn replay(self: &Arc<Self>, tracker: &TaskTracker) {
        let store = self.inbox.clone();
        let pending = match store.inbox_scan(&self.prefix) {
            Ok(p) => p,
            Err(e) => {
                return tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not read the inbox")
            }
        };
        if !pending.is_empty() {
            tracing::info!(bot = %self.bot, count = pending.len(), "replaying unanswered updates");
        }
        let stop = self.stop_token();
        for (key, bytes) in pending {
            let entry = match serde_json::from_slice::<Entry<P::Job>>(&bytes) {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::error!(error.kind = ErrorKind::StoreCorrupt.as_str(), key, error = %e, "corrupt inbox entry skipped");
                    let _ = store.inbox_remove(&key);
                    continue;
                }
            };
            let conv = P::inbound(&entry.job).conversation().to_string();
            while self.queue.room(&conv).is_err() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            let order = P::order(&entry.job);
            let span = self.update_span(&entry.job, true);
            let item = Item::Update { key, entry, span };
            let _ = self.push(item, conv, order, tracker);
        }
    }

    /// A received update: stored in the inbox under `key` and queued — or, when its
    /// conversation's queue or the adapter is full, not stored and answered with a busy
    /// notice. Returns whether it was accepted.
    pub fn admit(self: &Arc<Self>, key: String, job: P::Job, tracker: &TaskTracker) -> bool {
        self.take_in(key, job, tracker, false) == Admission::Queued
    }

    /// [`Delivery::admit`], telling what became of the update. `must_store`: for an
    /// intake the platform redelivers to (a webhook answering 5xx), an update the inbox
    /// did not take is not queued either. The caller flushes before acknowledging.
    pub fn take_in(
        self: &Arc<Self>,
        key: String,
        job: P::Job,
        tracker: &TaskTracker,
        must_store: bool,
    ) -> Admission {
        let conv = P::inbound(&job).conversation().to_string();
        if let Err(full) = self.queue.room(&conv) {
            self.busy(&job, full, tracker);
            return Admission::Refused;
        }
        let store = &self.inbox;
        let span = self.update_span(&job, false);
        let entry = Entry { job, panics: 0 };
        let stored = serde_json::to_vec(&entry)
            .map_err(|e| e.to_string())
            .and_then(|bytes| store.inbox_put(&key, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = &stored {
            tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not store or encode a received update");
        }
        if must_store && stored.is_err() {
            return Admission::NotStored;
        }
        let order = P::order(&entry.job);
        let item = Item::Update {
            key: key.clone(),
            entry,
            span,
        };
        match self.push(item, conv, order, tracker) {
            Ok(_) => Admission::Queued,
            Err((full, item)) => {
                // Filled up meanwhile (another intake task): nothing half-done.
                let _ = store.inbox_remove(&key);
                if let Item::Update { entry, .. } = item {
                    self.busy(&entry.job, full, tracker);
                }
                Admission::Refused
            }
        }
    }
}
