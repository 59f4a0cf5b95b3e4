//! Per-conversation ordering: one message of a conversation at a time, conversations in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// A lock per active conversation; entries are removed when the last holder leaves,
/// so the map only holds conversations with a message in flight.
#[derive(Default)]
pub struct ConversationLocks {
    map: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Held while one message of a conversation is handled; dropping it lets the next one in.
pub struct ConversationGuard<'a> {
    locks: &'a ConversationLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ConversationLocks {
    /// Waits until this conversation is free (FIFO: tokio's mutex is fair).
    pub async fn acquire(&self, key: String) -> ConversationGuard<'_> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        ConversationGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }

    pub fn active(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for ConversationGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own reference left: nobody holds or waits for this lock.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serialises_one_key_and_cleans_up() {
        let locks = Arc::new(ConversationLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.acquire("a".into()).await;
        let (l2, o2) = (locks.clone(), order.clone());
        let waiter = tokio::spawn(async move {
            let _t = l2.acquire("a".into()).await;
            o2.lock().unwrap().push(2);
        });
        // a different conversation is not blocked
        drop(locks.acquire("b".into()).await);
        tokio::task::yield_now().await;
        order.lock().unwrap().push(1);
        drop(first);
        waiter.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec![1, 2]);
        assert_eq!(locks.active(), 0);
    }
}
