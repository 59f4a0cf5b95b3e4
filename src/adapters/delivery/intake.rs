//! Intake: received updates into the inbox and the queues ([`Delivery::take_in`]), and
//! the inbox replayed at start ([`Delivery::replay`]) and, across instances, whenever
//! entries are left unanswered ([`Delivery::watch_orphans`]).

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
        self.replay_older_than(None, tracker).await;
    }

    /// With shared coordination (Redis) and `delivery.orphan_replay_secs` above 0: every
    /// that many seconds, queues the shared inbox's entries older than that. An entry
    /// another live instance is answering stays with it (its claim, see
    /// [`Delivery::run_update`]); one whose instance died (kill -9 after acknowledging a
    /// webhook, a Discord shard's instance gone) is answered here, without waiting for
    /// an instance to start. Call after [`Delivery::attach`]: ends with intake.
    pub fn watch_orphans(self: &Arc<Self>, tracker: &TaskTracker) {
        let secs = self.engine.config().delivery.orphan_replay_secs;
        if secs == 0
            || !self.engine.coordination().is_shared()
            || self
                .watching
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let every = Duration::from_secs(secs);
        let (this, tasks, stop) = (self.clone(), tracker.clone(), self.stop_token());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                this.replay_older_than(Some(every), &tasks).await;
            }
            this.watching
                .store(false, std::sync::atomic::Ordering::Relaxed);
        });
    }

    /// [`Delivery::replay`] of the entries received at least `age` ago (all: `None`).
    async fn replay_older_than(self: &Arc<Self>, age: Option<Duration>, tracker: &TaskTracker) {
        let store = self.inbox.clone();
        let pending = match store.inbox_scan(&self.prefix) {
            Ok(p) => p,
            Err(e) => {
                return tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not read the inbox")
            }
        };
        let newest = age.map(|age| super::unix_secs().saturating_sub(age.as_secs()));
        let mut due = Vec::new();
        for (key, bytes) in pending {
            match serde_json::from_slice::<Entry<P::Job>>(&bytes) {
                Ok(entry) if newest.is_some_and(|newest| entry.received > newest) => {}
                Ok(entry) => due.push((key, entry)),
                Err(e) => {
                    tracing::error!(error.kind = ErrorKind::StoreCorrupt.as_str(), key, error = %e, "corrupt inbox entry skipped");
                    let _ = store.inbox_remove(&key);
                }
            }
        }
        if !due.is_empty() {
            let count = due.len();
            match age {
                None => tracing::info!(bot = %self.bot, count, "replaying unanswered updates"),
                Some(_) => {
                    tracing::info!(bot = %self.bot, count, "replaying inbox entries left unanswered (an instance that received them may be gone)")
                }
            }
        }
        let stop = self.stop_token();
        for (key, entry) in due {
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
        let entry = Entry {
            job,
            panics: 0,
            received: super::unix_secs(),
        };
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
