//! Adapters translate platform updates into [`crate::domain::Inbound`] and replies back.
//! They decide no policy: that is the engine's job.

pub mod delivery;
pub mod discord;
pub mod events;
pub mod telegram;
pub mod terminal;
pub mod text;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Env, PlatformBot, Secret};
use crate::events::{ErrorKind, Event};
use events::TaskRestarted;

/// The typing indicator is shown only once an answer takes longer than this: quick
/// answers (cache hits, notices) need none, and each indicator is a platform API call.
pub const TYPING_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs the jobs of one key (a conversation) one at a time, oldest `order` first
/// (Telegram's update id, Discord's snowflake), different keys concurrently. A key's
/// worker exists only while it has jobs. Bounded: at most `max_per_key` jobs (waiting
/// and running) per key and `max_total` in all; [`SerialQueue::push`] refuses beyond
/// that. A job whose `order` is already waiting or running for its key is dropped (a
/// replayed update). A panicking job is caught and logged; its key's later jobs still run.
pub struct SerialQueue<T> {
    lanes: Arc<Mutex<Lanes<T>>>,
    max_per_key: usize,
    max_total: usize,
    /// Pause before each job: lets jobs that arrive in one burst but out of order land
    /// first, so the oldest is taken (Discord starts its event handlers in any order).
    settle: std::time::Duration,
}

struct Lanes<T> {
    by_key: HashMap<String, Lane<T>>,
    /// Jobs waiting or running, every key.
    total: usize,
}

struct Lane<T> {
    waiting: BTreeMap<u64, T>,
    running: Option<u64>,
}

impl<T> Lane<T> {
    fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.running.is_some())
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The conversation already has `max_per_key` jobs.
    Conversation,
    /// The adapter already has `max_total` jobs.
    Adapter,
}

impl<T> Clone for SerialQueue<T> {
    fn clone(&self) -> Self {
        Self {
            lanes: self.lanes.clone(),
            max_per_key: self.max_per_key,
            max_total: self.max_total,
            settle: self.settle,
        }
    }
}

impl<T: Send + 'static> SerialQueue<T> {
    pub fn new(max_per_key: usize, max_total: usize, settle: std::time::Duration) -> Self {
        Self {
            lanes: Arc::new(Mutex::new(Lanes {
                by_key: HashMap::new(),
                total: 0,
            })),
            max_per_key: max_per_key.max(1),
            max_total: max_total.max(1),
            settle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lanes<T>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether one more job of `key` would be accepted now.
    pub fn room(&self, key: &str) -> Result<(), Full> {
        Self::check(&self.lock(), key, self.max_per_key, self.max_total)
    }

    fn check(lanes: &Lanes<T>, key: &str, per_key: usize, total: usize) -> Result<(), Full> {
        if lanes.by_key.get(key).is_some_and(|l| l.len() >= per_key) {
            return Err(Full::Conversation);
        }
        if lanes.total >= total {
            return Err(Full::Adapter);
        }
        Ok(())
    }

    /// Queues `job` as number `order` of `key`; `run` runs it on `tracker`. `Ok(false)`:
    /// that order was already queued or running, so this copy was dropped. A full queue
    /// hands the job back.
    pub fn push<F, Fut>(
        &self,
        key: String,
        order: u64,
        job: T,
        tracker: &TaskTracker,
        run: F,
    ) -> Result<bool, (Full, T)>
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut lanes = self.lock();
        if let Some(lane) = lanes.by_key.get(&key) {
            if lane.running == Some(order) || lane.waiting.contains_key(&order) {
                return Ok(false);
            }
        }
        if let Err(full) = Self::check(&lanes, &key, self.max_per_key, self.max_total) {
            return Err((full, job));
        }
        lanes.total += 1;
        if let Some(lane) = lanes.by_key.get_mut(&key) {
            lane.waiting.insert(order, job);
            return Ok(true);
        }
        let lane = Lane {
            waiting: BTreeMap::from([(order, job)]),
            running: None,
        };
        lanes.by_key.insert(key.clone(), lane);
        drop(lanes);
        let (queue, settle) = (self.clone(), self.settle);
        tracker.spawn(async move {
            loop {
                if !settle.is_zero() {
                    tokio::time::sleep(settle).await;
                }
                let Some(job) = queue.next_of(&key) else {
                    break;
                };
                let done = AssertUnwindSafe(async { run(job).await }).catch_unwind();
                if done.await.is_err() {
                    tracing::error!(
                        error.kind = ErrorKind::Panic.as_str(),
                        "a queued job panicked; its conversation goes on"
                    );
                }
                queue.done(&key);
            }
        });
        Ok(true)
    }

    /// Takes the oldest job of `key`, or removes the key's lane when it has none.
    fn next_of(&self, key: &str) -> Option<T> {
        let mut lanes = self.lock();
        let lane = lanes.by_key.get_mut(key)?;
        match lane.waiting.pop_first() {
            Some((order, job)) => {
                lane.running = Some(order);
                Some(job)
            }
            None => {
                lanes.by_key.remove(key);
                None
            }
        }
    }

    fn done(&self, key: &str) {
        let mut lanes = self.lock();
        lanes.total = lanes.total.saturating_sub(1);
        if let Some(lane) = lanes.by_key.get_mut(key) {
            lane.running = None;
        }
    }

    /// Jobs waiting (not counting the ones running).
    pub fn queued(&self) -> usize {
        self.lock().by_key.values().map(|l| l.waiting.len()).sum()
    }

    /// Jobs waiting or running.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A restarted task's first wait; doubled per quick death up to the next constant.
const SUPERVISOR_BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const SUPERVISOR_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Restarts a dead long-running task (a poller, a gateway) with backoff until `stop`;
/// `connected` is false while it is down, so readiness reports it.
pub async fn supervise<F, Fut>(
    label: String,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
    stats: Arc<delivery::DeliveryStats>,
    make: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = SUPERVISOR_BACKOFF_FIRST;
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::spawn(make()).await;
        if stop.is_cancelled() {
            return;
        }
        connected.store(false, Ordering::Relaxed);
        if started.elapsed() > SUPERVISOR_BACKOFF_MAX {
            backoff = SUPERVISOR_BACKOFF_FIRST;
        }
        TaskRestarted {
            task: &label,
            panicked: result.as_ref().is_err_and(|e| e.is_panic()),
            retry_in: backoff,
        }
        .emit(&stats);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(SUPERVISOR_BACKOFF_MAX);
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

/// Why a bot may not start on a platform (exit code 2: a configuration problem).
#[derive(Debug, thiserror::Error)]
#[error("bots/{bot}.toml: {platform}: {message}")]
pub struct IdentityError {
    pub bot: String,
    pub platform: &'static str,
    pub message: String,
}

impl IdentityError {
    /// Builds the refusals of one bot's check on one platform from their texts.
    pub(crate) fn of<'a>(
        bot: &'a str,
        platform: &'static str,
    ) -> impl Fn(String) -> IdentityError + Copy + 'a {
        move |message| IdentityError {
            bot: bot.to_string(),
            platform,
            message,
        }
    }
}

/// The start of every platform's start-up identity check: the bot's table for the
/// platform, its token and the identity this environment expects, or the refusal text
/// naming what is missing. `what` names the identity key (`username`).
pub(crate) fn identity_inputs<'a>(
    env: Env,
    table: Option<&'a PlatformBot>,
    platform: &str,
    what: &str,
) -> Result<(&'a PlatformBot, Secret, &'a str), String> {
    let p = table.ok_or_else(|| format!("no [{platform}] table"))?;
    let token = p.token.as_ref();
    let token = token.ok_or_else(|| format!("environment variable {} is not set", p.token_env))?;
    let expected = p.identity.as_deref();
    let expected = expected.ok_or_else(|| format!("no {env} identity configured ({what})"))?;
    Ok((p, token.clone(), expected))
}

/// Whether the identity the platform reported (`found`) is not the one this environment
/// expects (`same` compares two identities): then the two ends of the refusal, as
/// [`other_identity_note`] words them.
pub(crate) fn identity_mismatch(
    env: Env,
    p: &PlatformBot,
    expected: &str,
    found: &str,
    same: impl Fn(&str, &str) -> bool,
) -> Option<(String, &'static str)> {
    if same(found, expected) {
        return None;
    }
    let is_other = p.other_identity.as_deref().is_some_and(|o| same(o, found));
    Some(other_identity_note(env, is_other))
}

/// The two ends of a wrong-identity refusal: who the token belongs to when it is the
/// other environment's bot (`is_other`), and the warning against production tokens in
/// staging that goes last.
fn other_identity_note(env: Env, is_other: bool) -> (String, &'static str) {
    if !is_other {
        return (String::new(), "");
    }
    let whose = format!(" — that is the {} bot", env.other());
    let hint = if env == Env::Staging {
        "; never use production tokens in staging"
    } else {
        ""
    };
    (whose, hint)
}

/// Replaces every occurrence of a secret in a string (error texts can carry URLs, and
/// Telegram URLs carry the token).
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
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    fn queue<T: Send + 'static>(per_key: usize, total: usize) -> SerialQueue<T> {
        SerialQueue::new(per_key, total, std::time::Duration::ZERO)
    }

    #[tokio::test]
    async fn serial_queue_keeps_order_per_key() {
        let tracker = TaskTracker::new();
        let q = queue(100, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..20u32 {
            let seen = seen.clone();
            let pushed = q.push(
                format!("k{}", i % 2),
                u64::from(i),
                i,
                &tracker,
                move |job| {
                    let seen = seen.clone();
                    async move {
                        tokio::task::yield_now().await;
                        seen.lock().unwrap().push(job);
                    }
                },
            );
            assert_eq!(pushed.ok(), Some(true));
        }
        tracker.close();
        tracker.wait().await;
        let seen = seen.lock().unwrap();
        let evens: Vec<u32> = seen.iter().copied().filter(|n| n % 2 == 0).collect();
        assert_eq!(evens, (0..20).step_by(2).collect::<Vec<_>>());
        assert_eq!(seen.len(), 20);
        assert_eq!(q.queued(), 0);
        assert!(q.is_empty());
    }

    /// A job that never finishes until `gate` opens.
    fn blocked(
        gate: Arc<tokio::sync::Notify>,
        seen: Arc<Mutex<Vec<u32>>>,
    ) -> impl Fn(u32) -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static {
        move |job| {
            let (gate, seen) = (gate.clone(), seen.clone());
            async move {
                gate.notified().await;
                seen.lock().unwrap().push(job);
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn serial_queue_is_bounded_per_key_and_in_all_and_drops_replays() {
        let tracker = TaskTracker::new();
        let q = queue(3, 5);
        let gate = Arc::new(tokio::sync::Notify::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let run = || blocked(gate.clone(), seen.clone());
        for i in 0..3u32 {
            assert_eq!(
                q.push("a".into(), u64::from(i), i, &tracker, run()).ok(),
                Some(true)
            );
        }
        // The same update again (a replay) is dropped, whether waiting or running.
        tokio::task::yield_now().await;
        assert_eq!(q.push("a".into(), 0, 0, &tracker, run()).ok(), Some(false));
        assert_eq!(q.push("a".into(), 2, 2, &tracker, run()).ok(), Some(false));
        // A fourth job of the conversation does not fit; another conversation's does.
        let refused = q.push("a".into(), 3, 3, &tracker, run());
        assert!(matches!(refused, Err((Full::Conversation, 3))));
        assert_eq!(q.room("a"), Err(Full::Conversation));
        for i in 10..12u32 {
            assert_eq!(
                q.push("b".into(), u64::from(i), i, &tracker, run()).ok(),
                Some(true)
            );
        }
        // Five in all: a third conversation waits too.
        assert_eq!(q.len(), 5);
        assert!(matches!(
            q.push("c".into(), 20, 20, &tracker, run()),
            Err((Full::Adapter, 20))
        ));
        // Drained, everything ran once, in order per conversation.
        while !q.is_empty() {
            gate.notify_waiters();
            tokio::task::yield_now().await;
        }
        tracker.close();
        tracker.wait().await;
        let seen = seen.lock().unwrap().clone();
        let a: Vec<u32> = seen.iter().copied().filter(|n| *n < 10).collect();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(seen.len(), 5);
        assert_eq!(q.room("c"), Ok(()));
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_its_conversation() {
        let tracker = TaskTracker::new();
        let q = queue(10, 10);
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3u32 {
            let seen = seen.clone();
            let run = move |job: u32| {
                let seen = seen.clone();
                async move {
                    assert_ne!(job, 1, "job 1 panics");
                    seen.lock().unwrap().push(job);
                }
            };
            q.push("k".into(), u64::from(i), i, &tracker, run).ok();
        }
        tracker.close();
        tracker.wait().await;
        assert_eq!(*seen.lock().unwrap(), vec![0, 2]);
        assert!(q.is_empty());
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

    #[tokio::test(start_paused = true)]
    async fn a_dead_task_is_restarted_and_reported_down_meanwhile() {
        let calls = Arc::new(AtomicU32::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let (stop, stats) = (
            CancellationToken::new(),
            Arc::new(delivery::DeliveryStats::default()),
        );
        let make = {
            let (calls, connected, stop) = (calls.clone(), connected.clone(), stop.clone());
            move || {
                let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                let (connected, stop) = (connected.clone(), stop.clone());
                async move {
                    connected.store(true, Ordering::Relaxed);
                    assert!(n > 1, "the first run dies");
                    stop.cancelled().await
                }
            }
        };
        let label = "telegram/bot".to_string();
        let task = tokio::spawn(supervise(
            label,
            connected.clone(),
            stop.clone(),
            stats.clone(),
            make,
        ));
        while calls.load(Ordering::Relaxed) < 1 || connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Down between the panic and the restart (1 s later).
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        while calls.load(Ordering::Relaxed) < 2 || !connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.snapshot().task_restarts, 1);
        stop.cancel();
        task.await.expect("supervisor ends with stop");
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}
