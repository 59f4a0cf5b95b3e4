//! Adapters translate platform updates into [`crate::domain::Inbound`] and replies back.
//! They decide no policy: that is the engine's job.

pub mod discord;
pub mod telegram;
pub mod terminal;
pub mod text;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::task::TaskTracker;

/// The typing indicator is shown only once an answer takes longer than this: quick
/// answers (cache hits, notices) need none, and each indicator is a platform API call.
pub const TYPING_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs jobs of one key (a conversation) strictly in order, different keys concurrently.
/// A key's worker exists only while it has queued jobs.
pub struct SerialQueue<T> {
    queues: Arc<Mutex<HashMap<String, VecDeque<T>>>>,
}

impl<T> Clone for SerialQueue<T> {
    fn clone(&self) -> Self {
        Self {
            queues: self.queues.clone(),
        }
    }
}

impl<T> Default for SerialQueue<T> {
    fn default() -> Self {
        Self {
            queues: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Send + 'static> SerialQueue<T> {
    pub fn push<F, Fut>(&self, key: String, job: T, tracker: &TaskTracker, run: F)
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = map.get_mut(&key) {
            q.push_back(job);
            return;
        }
        map.insert(key.clone(), VecDeque::from([job]));
        drop(map);
        let queues = self.queues.clone();
        tracker.spawn(async move {
            loop {
                let next = {
                    let mut map = queues.lock().unwrap_or_else(|p| p.into_inner());
                    match map.get_mut(&key).and_then(|q| q.pop_front()) {
                        Some(job) => job,
                        None => {
                            map.remove(&key);
                            break;
                        }
                    }
                };
                run(next).await;
            }
        });
    }

    /// Jobs waiting (not counting the ones running).
    pub fn queued(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(VecDeque::len)
            .sum()
    }
}

/// Outbound throttling to stay inside a platform's limits: per chat, per group chat,
/// and for the whole bot. Waits rather than fails.
pub struct Throttle {
    per_chat: DefaultKeyedRateLimiter<String>,
    per_group: DefaultKeyedRateLimiter<String>,
    global: DefaultDirectRateLimiter,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Throttle {
    pub fn new(per_chat_per_minute: u32, group_per_minute: u32, global_per_second: u32) -> Self {
        Self {
            // Short bursts are fine on both platforms; the sustained rate is what counts.
            per_chat: RateLimiter::keyed(
                Quota::per_minute(nz(per_chat_per_minute)).allow_burst(nz(3)),
            ),
            per_group: RateLimiter::keyed(
                Quota::per_minute(nz(group_per_minute)).allow_burst(nz(5)),
            ),
            global: RateLimiter::direct(Quota::per_second(nz(global_per_second))),
        }
    }

    pub async fn wait(&self, chat: &str, is_group: bool) {
        let key = chat.to_string();
        self.per_chat.until_key_ready(&key).await;
        if is_group {
            self.per_group.until_key_ready(&key).await;
        }
        self.global.until_ready().await;
    }

    /// Drops idle chats' state (run periodically).
    pub fn prune(&self) {
        for l in [&self.per_chat, &self.per_group] {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// What a platform made of one streaming draft update.
pub enum DraftPut<Id> {
    /// Sent (first time) or edited; the message's id.
    Shown(Id),
    /// The platform says nothing changed.
    Unchanged,
    /// Give up streaming; the final reply is still delivered normally.
    Failed(String),
}

/// Shows a reply growing: one message, sent on the first text and then edited at most
/// once per `every`, cut to `limit` characters. `put(None, text)` sends, `put(Some(id),
/// text)` edits. Returns the draft's id, if one was shown.
pub async fn stream_draft<Id, F, Fut>(
    mut rx: tokio::sync::watch::Receiver<String>,
    limit: usize,
    every: std::time::Duration,
    mut put: F,
) -> Option<Id>
where
    Id: Copy,
    F: FnMut(Option<Id>, String) -> Fut,
    Fut: Future<Output = DraftPut<Id>>,
{
    let mut message = None;
    let mut shown = String::new();
    loop {
        let closed = rx.changed().await.is_err();
        let text: String = rx.borrow_and_update().chars().take(limit).collect();
        if !text.trim().is_empty() && text != shown {
            match put(message, text.clone()).await {
                DraftPut::Shown(id) => {
                    message = Some(id);
                    shown = text;
                }
                DraftPut::Unchanged => {}
                DraftPut::Failed(why) => {
                    tracing::debug!(reason = %why, "streaming edit failed");
                    return message;
                }
            }
        }
        if closed {
            return message;
        }
        tokio::time::sleep(every).await;
    }
}

/// Replaces every occurrence of a secret in a string (error texts can carry URLs, and
/// Telegram URLs carry the token).
/// The token and the expected identity a platform's start-up identity check needs, or
/// the refusal text naming what is missing. `what` names the identity key (`username`).
pub(crate) fn identity_inputs<'a>(
    env: crate::config::Env,
    token: Option<&crate::config::Secret>,
    token_env: &str,
    expected: Option<&'a str>,
    what: &str,
) -> Result<(crate::config::Secret, &'a str), String> {
    let token = token.ok_or_else(|| format!("environment variable {token_env} is not set"))?;
    let expected = expected.ok_or_else(|| format!("no {env} identity configured ({what})"))?;
    Ok((token.clone(), expected))
}

/// The two ends of a wrong-identity refusal: who the token belongs to when it is the
/// other environment's bot (`is_other`), and the warning against production tokens in
/// staging that goes last.
pub(crate) fn other_identity_note(
    env: crate::config::Env,
    is_other: bool,
) -> (String, &'static str) {
    if !is_other {
        return (String::new(), "");
    }
    let whose = format!(" — that is the {} bot", env.other());
    let hint = if env == crate::config::Env::Staging {
        "; never use production tokens in staging"
    } else {
        ""
    };
    (whose, hint)
}

pub fn redact(text: &str, secret: &str) -> String {
    if secret.len() < 4 {
        return text.to_string();
    }
    let mut out = text.replace(secret, "[REDACTED]");
    // The part after "123456:" alone is the secret half of a Telegram token.
    if let Some((_, tail)) = secret.split_once(':') {
        if tail.len() >= 8 {
            out = out.replace(tail, "[REDACTED]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serial_queue_keeps_order_per_key() {
        let tracker = TaskTracker::new();
        let q = SerialQueue::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..20u32 {
            let seen = seen.clone();
            q.push(format!("k{}", i % 2), i, &tracker, move |job| {
                let seen = seen.clone();
                async move {
                    tokio::task::yield_now().await;
                    seen.lock().unwrap().push(job);
                }
            });
        }
        tracker.close();
        tracker.wait().await;
        let seen = seen.lock().unwrap();
        let evens: Vec<u32> = seen.iter().copied().filter(|n| n % 2 == 0).collect();
        assert_eq!(evens, (0..20).step_by(2).collect::<Vec<_>>());
        assert_eq!(seen.len(), 20);
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn redacts_tokens() {
        let t = "123456:ABCdefGHIjklMNOpqr";
        assert_eq!(
            redact(
                "POST https://api.telegram.org/bot123456:ABCdefGHIjklMNOpqr/GetMe",
                t
            ),
            "POST https://api.telegram.org/bot[REDACTED]/GetMe"
        );
        assert_eq!(redact("x ABCdefGHIjklMNOpqr y", t), "x [REDACTED] y");
    }
}
