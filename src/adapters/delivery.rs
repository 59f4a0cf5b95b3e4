//! One delivery machinery for every platform: inbox replay, bounded per-conversation
//! queues, panic containment, `engine.handle(_streaming)`, streaming drafts, sending
//! with background retries, and the finish (`mark_sent`, inbox removal, flush).
//!
//! A platform plugs in through [`Outbound`]: send a part, edit a part, send a file, show
//! typing, stream a draft — each call classified as sent or a [`SendError`]. Adapters keep
//! translation (platform update → [`Inbound`]) and rendering (formatting, buttons).
//!
//! Delivery contract:
//! - A received update is in the durable inbox before it is handled and leaves it once
//!   its reply was sent, refused for good, or given up on (see below).
//! - A send that fails transiently (5xx, timeouts, refused connections) is retried in the
//!   background with exponential backoff and full jitter (1 s doubling to 60 s); a 429
//!   waits exactly what the platform asked. The conversation's later updates wait behind
//!   it (order is kept); other conversations go on. After `delivery.max_retry_secs` the
//!   reply is given up: logged, counted (`delivery_failed`), marked handled and removed
//!   from the inbox, so nothing is left half-done. A shutdown during the waits leaves
//!   the update in the inbox for the next start.
//! - A permanent refusal (chat gone, bot blocked, bad request) is not retried: logged
//!   without text, counted (`delivery_failed`), marked handled, removed from the inbox.
//! - A `Personal` reply to an update from a shared place (group, guild channel) goes to
//!   the user's private chat ([`Outbound::private_chat`]); the place gets only a short
//!   note without content ([`PrivateNote`]), which says how to open a private chat when
//!   the platform refused it ([`SendError::Unreachable`]). The private chat is the
//!   reply's delivery target: the same retries, the same finish.
//! - A panic while handling one update is caught, logged with the update's key (no text)
//!   and counted (`update_panics`); the update is tried again, and after
//!   [`PANIC_TRIES`] panics (counted durably in its inbox entry) it is parked under
//!   [`PARKED`] so it cannot poison later starts.
//! - Every queue is bounded (`delivery.max_queue_per_chat`, `delivery.max_pending`): an
//!   update beyond the bound is not stored; the user gets [`BUSY_NOTICE`] at most once
//!   per conversation per minute, and it is counted (`overflow`).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{stream_draft, DraftPut, Full, SerialQueue};
use crate::domain::{Attachment, Button, Inbound, Reply};

mod intake;
mod platform;
mod private;
mod trace;
use crate::engine::Engine;
use crate::store::InboxStore;
pub use platform::{Part, Profile};
pub use private::PrivateNote;
use trace::{send_span, traced};

/// What a user whose update did not fit the queues is told.
pub const BUSY_NOTICE: &str = "I'm busy right now — please send that again in a minute.";
/// At most one busy notice per conversation per this interval.
const BUSY_EVERY: Duration = Duration::from_secs(60);
/// Panics while handling one update before it is parked.
pub const PANIC_TRIES: u32 = 3;
/// Inbox key prefix of parked updates (never replayed).
pub const PARKED: &str = "parked/";
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Streaming drafts: at most one edit per this interval.
const EDIT_EVERY: Duration = Duration::from_secs(1);
/// The longest wait a platform's 429 can impose on us; longer answers are cut to this.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// Why a platform call did not succeed, as the platform adapter classifies it.
#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// Rate limited: try again after this long (and not before).
    RetryAfter(Duration),
    /// 5xx, timeout, refused connection: try again later with backoff.
    Transient(String),
    /// Refused for good (chat gone, bot blocked, bad request): never retried.
    Permanent(String),
    /// The user cannot be written to privately (never opened a private chat with the
    /// bot, blocked it, or accepts no DMs): refused for good, never retried.
    Unreachable(String),
}

pub type SendResult<T> = Result<T, SendError>;

pub use super::events::{DeliveryCounts, DeliveryStats};
use super::events::{DeliveryFailed, GiveUp, Panicked, QueueOverflow, Refused};
use super::events::{SendRetrying, UpdatePanicked, UpdateParked};
use crate::events::{ErrorKind, Event};

/// One platform's outbound side: rendering and sending. Every call is one attempt
/// (outbound throttling included); retries are the machinery's.
pub trait Outbound: Send + Sync + 'static {
    /// A received update as the inbox keeps it.
    type Job: Clone + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// A sent message's id (for streaming edits).
    type MsgId: Copy + Send + Sync + 'static;
    /// The platform's fixed facts, one value per platform.
    const PROFILE: Profile;

    fn inbound(job: &Self::Job) -> &Inbound;
    /// The job's place in its conversation, oldest first (update id, snowflake).
    fn order(job: &Self::Job) -> u64;
    /// A reply's text cut to the platform's message limit.
    fn split(&self, text: &str) -> Vec<String>;
    /// Runs before the update is handled (e.g. stop a button's spinner).
    fn before(&self, job: &Self::Job) -> impl Future<Output = ()> + Send;
    fn typing(&self, job: &Self::Job) -> impl Future<Output = ()> + Send;
    /// A streaming draft: `None` sends it, `Some(id)` edits it (plain text, one attempt).
    fn draft(
        &self,
        job: &Self::Job,
        id: Option<Self::MsgId>,
        text: String,
    ) -> impl Future<Output = DraftPut<Self::MsgId>> + Send;
    /// One part of a reply, formatted, with its buttons under it.
    fn send_part(
        &self,
        job: &Self::Job,
        part: Part<'_>,
    ) -> impl Future<Output = SendResult<()>> + Send;
    /// Turns the streamed draft into the final, formatted first part.
    fn edit_part(
        &self,
        job: &Self::Job,
        id: Self::MsgId,
        part: Part<'_>,
    ) -> impl Future<Output = SendResult<()>> + Send;
    fn send_file(
        &self,
        job: &Self::Job,
        file: &Attachment,
    ) -> impl Future<Output = SendResult<()>> + Send;
    /// The job aimed at the user's private chat (Telegram: the chat with the user's id;
    /// Discord: the DM channel, opened if needed), for a personal reply to an update
    /// from a shared place. One attempt.
    fn private_chat(&self, job: &Self::Job) -> impl Future<Output = SendResult<Self::Job>> + Send;
    /// Tells the shared place of `job` where its personal reply went (no content).
    fn private_note(
        &self,
        job: &Self::Job,
        note: PrivateNote,
    ) -> impl Future<Output = SendResult<()>> + Send;
}

/// An inbox entry: the adapter's job plus how often handling it panicked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry<J> {
    #[serde(flatten)]
    pub job: J,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub panics: u32,
    /// When it was received (Unix seconds; 0 in entries stored before this field).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub received: u64,
}

fn is_zero<N: Default + PartialEq>(n: &N) -> bool {
    *n == N::default()
}

/// Seconds since the Unix epoch (0 for a clock before it).
pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Work waiting for its conversation's turn.
pub enum Item<J> {
    /// A durable update (in the inbox under `key`), with its `update` span, opened when
    /// it was received (or replayed): the root of its trace.
    Update {
        key: String,
        entry: Entry<J>,
        span: tracing::Span,
    },
    /// Other work kept in order with the conversation's updates (e.g. a Discord
    /// interaction, which is not durable); a panic in it is caught and counted.
    Task(BoxFuture<'static, ()>),
}

/// How a reply ended.
#[derive(Debug, PartialEq)]
pub enum Failed {
    Permanent(String),
    /// The user's private chat refused it ([`SendError::Unreachable`]).
    Unreachable(String),
    /// Still failing when `delivery.max_retry_secs` ran out.
    Expired(String),
    /// Shutdown began while waiting to retry.
    Stopped,
}

/// The retry budget of one reply.
pub struct Retry {
    deadline: Instant,
    attempt: u32,
}

impl Retry {
    pub fn new(max: Duration) -> Self {
        let now = Instant::now();
        Retry {
            deadline: now.checked_add(max).unwrap_or(now + RETRY_AFTER_MAX),
            attempt: 0,
        }
    }

    /// Exponential backoff with full jitter: a random wait up to 1 s, 2 s, 4 s … 30 s.
    fn backoff(&mut self) -> Duration {
        let cap = BACKOFF_FIRST
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let ms = rand::random_range(50..=cap.as_millis().max(51) as u64);
        Duration::from_millis(ms)
    }
}

/// Runs `op` until it succeeds, fails for good, the budget runs out or `stop` is
/// cancelled. Each wait is counted in `delivery_retries`.
pub async fn retrying<T, F, Fut>(
    retry: &mut Retry,
    stats: &DeliveryStats,
    stop: &CancellationToken,
    mut op: F,
) -> Result<T, Failed>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = SendResult<T>>,
{
    loop {
        let (wait, why) = match op().await {
            Ok(v) => return Ok(v),
            Err(SendError::Permanent(why)) => return Err(Failed::Permanent(why)),
            Err(SendError::Unreachable(why)) => return Err(Failed::Unreachable(why)),
            Err(SendError::RetryAfter(d)) => (d.min(RETRY_AFTER_MAX), "rate limited".into()),
            Err(SendError::Transient(why)) => (retry.backoff(), why),
        };
        let resume = Instant::now().checked_add(wait);
        if resume.is_none_or(|at| at > retry.deadline) {
            return Err(Failed::Expired(why));
        }
        SendRetrying { wait, reason: &why }.emit(stats);
        tokio::select! {
            _ = stop.cancelled() => return Err(Failed::Stopped),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Runs `attempt` with the entry's job, catching panics. Each panic is counted and
/// stored with the entry; after [`PANIC_TRIES`] the entry moves to [`PARKED`]. Returns
/// whether an attempt completed.
pub async fn guarded<J, F, Fut>(
    store: &dyn InboxStore,
    stats: &DeliveryStats,
    key: &str,
    entry: &mut Entry<J>,
    attempt: F,
) -> bool
where
    J: Clone + Serialize,
    F: Fn(J) -> Fut,
    Fut: Future<Output = ()>,
{
    while entry.panics < PANIC_TRIES {
        let job = entry.job.clone();
        let run = AssertUnwindSafe(async { attempt(job).await });
        if run.catch_unwind().await.is_ok() {
            return true;
        }
        entry.panics += 1;
        let at = Panicked::Handling {
            key,
            tries: entry.panics,
        };
        UpdatePanicked { at }.emit(stats);
        if entry.panics < PANIC_TRIES {
            match serde_json::to_vec(entry) {
                Ok(bytes) => {
                    if let Err(e) = store.inbox_put(key, &bytes) {
                        tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), key, error = %e, "could not store an update's panic count");
                    }
                }
                Err(e) => {
                    tracing::error!(error.kind = ErrorKind::Encode.as_str(), key, error = %e, "could not encode an inbox entry")
                }
            }
        }
    }
    park(store, stats, key, entry);
    false
}

fn park<J: Serialize>(store: &dyn InboxStore, stats: &DeliveryStats, key: &str, entry: &Entry<J>) {
    let parked = format!("{PARKED}{key}");
    match serde_json::to_vec(entry) {
        Ok(bytes) => {
            if let Err(e) = store.inbox_put(&parked, &bytes) {
                tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), key, error = %e, "could not park an update");
            }
        }
        Err(e) => {
            tracing::error!(error.kind = ErrorKind::Encode.as_str(), key, error = %e, "could not encode a parked update")
        }
    }
    if let Err(e) = store.inbox_remove(key) {
        tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), key, error = %e, "could not remove a parked update from the inbox");
    }
    UpdateParked {
        key: &parked,
        tries: PANIC_TRIES,
    }
    .emit(stats);
}

/// Aborts a helper task (streaming edits) when dropped, also on a panic.
struct Helper<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Helper<T> {
    async fn join(mut self) -> Option<T> {
        match self.0.take() {
            Some(handle) => handle.await.ok(),
            None => None,
        }
    }
}

impl<T> Drop for Helper<T> {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// What became of a received update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Stored (see [`Delivery::admit`] on a store failure) and queued, or already queued.
    Queued,
    /// A queue was full: not stored; the user gets a busy notice (at most one a minute).
    Refused,
    /// The inbox did not take it: neither stored nor queued.
    NotStored,
}

/// The machinery for one adapter (one bot on one platform).
pub struct Delivery<P: Outbound> {
    out: Arc<P>,
    engine: Arc<Engine>,
    /// The engine's store, as the one role delivery uses.
    inbox: Arc<dyn InboxStore>,
    stats: Arc<DeliveryStats>,
    queue: SerialQueue<Item<P::Job>>,
    bot: String,
    /// Inbox key prefix of this adapter's updates, e.g. `tg/assistant/`.
    prefix: String,
    max_retry: Duration,
    max_pending: usize,
    /// Intake's stop token: retries give up waiting when it is cancelled.
    stop: Mutex<CancellationToken>,
    /// When each conversation last got a busy notice.
    notices: Mutex<HashMap<String, Instant>>,
    /// Whether [`Delivery::watch_orphans`] runs (once, across intake restarts).
    watching: std::sync::atomic::AtomicBool,
}

impl<P: Outbound> Delivery<P> {
    /// `settle`: see [`SerialQueue`] (zero unless the platform delivers out of order).
    pub fn new(
        out: Arc<P>,
        engine: Arc<Engine>,
        stats: Arc<DeliveryStats>,
        bot: &str,
        prefix: String,
        settle: Duration,
    ) -> Arc<Self> {
        let cfg = engine.config();
        let d = &cfg.delivery;
        Arc::new(Delivery {
            out,
            queue: SerialQueue::new(d.max_queue_per_chat, d.max_pending, settle),
            max_retry: Duration::from_secs(d.max_retry_secs),
            max_pending: d.max_pending,
            inbox: engine.store().clone(),
            engine: engine.clone(),
            stats,
            bot: bot.to_string(),
            prefix,
            stop: Mutex::new(CancellationToken::new()),
            notices: Mutex::new(HashMap::new()),
            watching: Default::default(),
        })
    }

    pub fn out(&self) -> &Arc<P> {
        &self.out
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The inbox role of the engine's store (inbox, intake positions, flush).
    pub fn inbox(&self) -> &Arc<dyn InboxStore> {
        &self.inbox
    }

    pub fn stats(&self) -> &Arc<DeliveryStats> {
        &self.stats
    }

    /// From now on, retry waits end when `stop` is cancelled (call at intake start).
    pub fn attach(&self, stop: CancellationToken) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = stop;
    }

    fn stop_token(&self) -> CancellationToken {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Jobs waiting or running.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Whether the adapter's intake should pause (`delivery.max_pending` reached).
    pub fn saturated(&self) -> bool {
        self.queue.len() >= self.max_pending
    }

    /// Whether one more job of `conversation` fits now.
    pub fn room(&self, conversation: &str) -> Result<(), Full> {
        self.queue.room(conversation)
    }

    fn push(
        self: &Arc<Self>,
        item: Item<P::Job>,
        conv: String,
        order: u64,
        tracker: &TaskTracker,
    ) -> Result<bool, (Full, Item<P::Job>)> {
        let this = self.clone();
        self.queue.push(conv, order, item, tracker, move |item| {
            this.clone().run_item(item)
        })
    }

    /// Queues non-durable work (see [`Item::Task`]) behind the conversation's updates.
    pub fn enqueue_task(
        self: &Arc<Self>,
        conversation: String,
        order: u64,
        task: BoxFuture<'static, ()>,
        tracker: &TaskTracker,
    ) -> Result<(), Full> {
        self.push(Item::Task(task), conversation, order, tracker)
            .map(|_| ())
            .map_err(|(full, _)| full)
    }

    /// Counts an overflow and tells the user, at most once per conversation per minute.
    pub fn busy(self: &Arc<Self>, job: &P::Job, full: Full, tracker: &TaskTracker) {
        let bot = &self.bot;
        if !self.notice_due(&P::inbound(job).conversation().to_string()) {
            let refused = Refused::Silently;
            QueueOverflow { bot, full, refused }.emit(&self.stats);
            return;
        }
        let refused = Refused::Noticed;
        QueueOverflow { bot, full, refused }.emit(&self.stats);
        let (out, job) = (self.out.clone(), job.clone());
        tracker.spawn(async move {
            if let Err(e) = out.send_part(&job, Part::plain(BUSY_NOTICE)).await {
                tracing::debug!(error = ?e, "busy notice not delivered");
            }
        });
    }

    /// Whether a busy notice may go to `conversation` now (and records it). The record
    /// is bounded: when it is full of recent notices, no more are sent.
    pub fn notice_due(&self, conversation: &str) -> bool {
        const MAX_RECORDED: usize = 10_000;
        let now = Instant::now();
        let mut notices = self.notices.lock().unwrap_or_else(|p| p.into_inner());
        if notices
            .get(conversation)
            .is_some_and(|t| now.duration_since(*t) < BUSY_EVERY)
        {
            return false;
        }
        if notices.len() >= MAX_RECORDED {
            notices.retain(|_, t| now.duration_since(*t) < BUSY_EVERY);
            if notices.len() >= MAX_RECORDED {
                return false;
            }
        }
        notices.insert(conversation.to_string(), now);
        true
    }

    fn run_item(self: Arc<Self>, item: Item<P::Job>) -> BoxFuture<'static, ()> {
        match item {
            Item::Update { key, entry, span } => {
                self.run_update(key, entry).instrument(span).boxed()
            }
            Item::Task(task) => async move {
                if AssertUnwindSafe(task).catch_unwind().await.is_err() {
                    let at = Panicked::HandlingInteraction { bot: &self.bot };
                    UpdatePanicked { at }.emit(&self.stats);
                }
            }
            .boxed(),
        }
    }

    /// Runs inside the update's span (see [`Delivery::run_item`]). Across instances
    /// (Redis) one instance at a time runs an inbox entry: a replay at start waits while
    /// another instance still answers it (its send retried included), then finds it
    /// answered instead of sending its stored reply a second time.
    async fn run_update(self: Arc<Self>, key: String, mut entry: Entry<P::Job>) {
        let coordination = self.engine.coordination();
        // Redis not answering: handled anyway (the engine then gives the busy apology).
        let _claim = match coordination.ordering.acquire(format!("claim:{key}")).await {
            Ok(claim) => Some(claim),
            Err(busy) if busy.held_elsewhere => {
                return tracing::info!(
                    "another instance is still answering this update; it stays in the inbox"
                );
            }
            Err(_) => None,
        };
        let store = self.inbox.clone();
        let this = &self;
        let key = &key;
        guarded(&*store, &self.stats, key, &mut entry, |job| async move {
            this.clone().handle(key, job).await
        })
        .await;
    }

    /// Handle → deliver → finish, for one update.
    async fn handle(self: Arc<Self>, key: &str, job: P::Job) {
        if P::PROFILE.flush_before_handling {
            if let Err(e) = self.inbox.flush().await {
                tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "store flush failed for a received update");
            }
        }
        self.out.before(&job).await;
        let inbound = P::inbound(&job);
        let streaming = self
            .engine
            .config()
            .bot(&self.bot)
            .is_some_and(|b| b.stream);
        let (reply, streamed) = if streaming {
            let (tx, rx) = watch::channel(String::new());
            let editor = self.spawn_editor(job.clone(), rx);
            let handled = self.engine.handle_streaming(inbound, Some(&tx));
            let reply = self.with_typing(&job, handled).await;
            drop(tx);
            (reply, editor.join().await.flatten())
        } else {
            let reply = self.with_typing(&job, self.engine.handle(inbound)).await;
            (reply, None)
        };
        let outcome = self.deliver(&job, &reply, streamed).await;
        self.conclude(outcome, inbound, Some(key)).await;
    }

    /// Runs `work`; once it has taken [`super::TYPING_AFTER`], the typing indicator is
    /// shown (renewed every `typing_every`) until it ends. A fast answer sends no chat
    /// action. Polled in the caller's task: no task spawned per message.
    async fn with_typing<T>(&self, job: &P::Job, work: impl Future<Output = T>) -> T {
        let typing = async {
            tokio::time::sleep(super::TYPING_AFTER).await;
            loop {
                self.out.typing(job).await;
                tokio::time::sleep(P::PROFILE.typing_every).await;
            }
        };
        let (work, typing) = (std::pin::pin!(work), std::pin::pin!(typing));
        match futures::future::select(work, typing).await {
            futures::future::Either::Left((out, _typing)) => out,
            futures::future::Either::Right((_, work)) => work.await,
        }
    }

    /// Shows the reply growing (see [`stream_draft`]); the task returns the draft's id.
    fn spawn_editor(&self, job: P::Job, rx: watch::Receiver<String>) -> Helper<Option<P::MsgId>> {
        let out = self.out.clone();
        let editor = async move {
            let (out, job) = (&*out, &job);
            stream_draft(
                rx,
                P::PROFILE.draft_limit,
                EDIT_EVERY,
                move |id, text| async move {
                    let method = if id.is_some() {
                        "edit_draft"
                    } else {
                        "send_draft"
                    };
                    let span = send_span(P::PROFILE.platform, method);
                    out.draft(job, id, text).instrument(span).await
                },
            )
            .await
        };
        Helper(Some(tokio::spawn(editor.in_current_span())))
    }

    /// Sends a reply to the job's own chat: split, the streamed draft edited into the
    /// first part, buttons under the last, then the file; each call retried per
    /// [`retrying`].
    async fn deliver_here(
        &self,
        job: &P::Job,
        reply: &Reply,
        streamed: Option<P::MsgId>,
    ) -> Result<(), Failed> {
        let Some(r) = reply.rendered() else {
            return Ok(());
        };
        let (stats, stop) = (&*self.stats, self.stop_token());
        let mut retry = Retry::new(self.max_retry);
        let mut parts = self.out.split(r.text);
        if let (Some(id), Some(first)) = (streamed, parts.first().cloned()) {
            let buttons: &[Button] = if parts.len() == 1 { r.buttons } else { &[] };
            let part = Part {
                text: &first,
                buttons,
            };
            let edit = retrying(&mut retry, stats, &stop, || {
                traced::<P, _>("edit_part", self.out.edit_part(job, id, part))
            });
            match edit.await {
                Ok(()) => {
                    parts.remove(0);
                }
                Err(Failed::Permanent(why)) => {
                    tracing::debug!(reason = %why, "final edit failed; sending the reply normally");
                }
                Err(other) => return Err(other),
            }
        }
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.iter().enumerate() {
            let buttons: &[Button] = if i == last { r.buttons } else { &[] };
            let part = Part {
                text: part,
                buttons,
            };
            retrying(&mut retry, stats, &stop, || {
                traced::<P, _>("send_part", self.out.send_part(job, part))
            })
            .await?;
        }
        if let Some(a) = r.attachment {
            let send = || traced::<P, _>("send_file", self.out.send_file(job, a));
            retrying(&mut retry, stats, &stop, send).await?;
        }
        Ok(())
    }

    /// Logs and counts how a reply ended; unless shutdown interrupted it, the update
    /// is finished (marked handled, out of the inbox).
    pub async fn conclude(
        &self,
        outcome: Result<(), Failed>,
        inbound: &Inbound,
        key: Option<&str>,
    ) {
        match outcome {
            Ok(()) => tracing::info!("update answered"),
            Err(Failed::Permanent(why) | Failed::Unreachable(why)) => {
                let why_not = GiveUp::Refused {
                    platform: P::PROFILE.platform,
                };
                DeliveryFailed {
                    why: why_not,
                    reason: &why,
                }
                .emit(&self.stats);
            }
            Err(Failed::Expired(why)) => {
                let why_not = GiveUp::Expired {
                    max_retry_secs: self.max_retry.as_secs(),
                };
                DeliveryFailed {
                    why: why_not,
                    reason: &why,
                }
                .emit(&self.stats);
            }
            Err(Failed::Stopped) => {
                tracing::info!("shutting down while retrying; the update stays in the inbox for the next start");
                return;
            }
        }
        self.finish(inbound, key).await;
    }

    /// Marks the reply sent, clears the inbox entry and makes both durable.
    pub async fn finish(&self, inbound: &Inbound, key: Option<&str>) {
        let store = &self.inbox;
        self.engine.mark_sent(inbound);
        if let Some(key) = key {
            if let Err(e) = store.inbox_remove(key) {
                tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "could not clear an answered update from the inbox");
            }
        }
        // Durable "sent": after a crash, only a reply whose send was in flight can repeat.
        if let Err(e) = store.flush().await {
            tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "store flush failed after a reply");
        }
    }

    /// The retry policy for platform calls outside [`Delivery::deliver`] (e.g. Discord
    /// interaction follow-ups).
    pub async fn send_retrying<T, F, Fut>(&self, retry: &mut Retry, mut op: F) -> Result<T, Failed>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = SendResult<T>>,
    {
        let op = || traced::<P, _>("send", op());
        retrying(retry, &self.stats, &self.stop_token(), op).await
    }

    pub fn retry_budget(&self) -> Retry {
        Retry::new(self.max_retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// An operation that fails with `errors` in turn, then succeeds; counts calls.
    fn scripted(
        errors: Vec<SendError>,
        calls: &AtomicU32,
    ) -> impl FnMut() -> futures::future::Ready<SendResult<&'static str>> + '_ {
        let mut errors = errors.into_iter();
        move || {
            calls.fetch_add(1, Ordering::Relaxed);
            futures::future::ready(match errors.next() {
                Some(e) => Err(e),
                None => Ok("sent"),
            })
        }
    }

    fn transient() -> SendError {
        SendError::Transient("502".into())
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_backoff_until_sent() {
        let (stats, stop, calls) = (
            DeliveryStats::default(),
            CancellationToken::new(),
            AtomicU32::new(0),
        );
        let mut retry = Retry::new(Duration::from_secs(600));
        let op = scripted(vec![transient(), transient(), transient()], &calls);
        let started = Instant::now();
        assert_eq!(retrying(&mut retry, &stats, &stop, op).await, Ok("sent"));
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert_eq!(stats.snapshot().delivery_retries, 3);
        // Full jitter: each wait at most 1 s, 2 s, 4 s.
        assert!(
            started.elapsed() <= Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_waits_exactly_what_the_platform_asked() {
        let (stats, stop, calls) = (
            DeliveryStats::default(),
            CancellationToken::new(),
            AtomicU32::new(0),
        );
        let mut retry = Retry::new(Duration::from_secs(600));
        let op = scripted(vec![SendError::RetryAfter(Duration::from_secs(3))], &calls);
        let started = Instant::now();
        assert_eq!(retrying(&mut retry, &stats, &stop, op).await, Ok("sent"));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_refusal_is_tried_once() {
        let (stats, stop, calls) = (
            DeliveryStats::default(),
            CancellationToken::new(),
            AtomicU32::new(0),
        );
        let mut retry = Retry::new(Duration::from_secs(600));
        let op = scripted(vec![SendError::Permanent("403 blocked".into())], &calls);
        let got = retrying(&mut retry, &stats, &stop, op).await;
        assert_eq!(got, Err(Failed::Permanent("403 blocked".into())));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(stats.snapshot().delivery_retries, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_when_the_budget_runs_out_or_shutdown_begins() {
        let (stats, stop, calls) = (
            DeliveryStats::default(),
            CancellationToken::new(),
            AtomicU32::new(0),
        );
        let mut retry = Retry::new(Duration::from_secs(120));
        let started = Instant::now();
        let op = scripted(vec![transient(); 1000], &calls);
        let got = retrying(&mut retry, &stats, &stop, op).await;
        assert_eq!(got, Err(Failed::Expired("502".into())));
        assert!(started.elapsed() <= Duration::from_secs(120));
        assert!(
            calls.load(Ordering::Relaxed) >= 4,
            "backoff grows: a handful of tries"
        );

        let mut retry = Retry::new(Duration::from_secs(120));
        let op = scripted(vec![transient(); 1000], &calls);
        let cancel = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            cancel.cancel();
        });
        assert_eq!(
            retrying(&mut retry, &stats, &stop, op).await,
            Err(Failed::Stopped)
        );
    }

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), 16, 500).expect("store");
        (dir, store)
    }

    /// Jobs are structs (an inbox entry flattens them).
    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    struct Job {
        n: u32,
    }

    fn put(store: &dyn InboxStore, key: &str, n: u32) -> Entry<Job> {
        let entry = Entry {
            job: Job { n },
            panics: 0,
            received: 0,
        };
        store
            .inbox_put(key, &serde_json::to_vec(&entry).expect("json"))
            .expect("put");
        entry
    }

    #[tokio::test]
    async fn a_panicking_update_is_counted_tried_three_times_then_parked() {
        let (_dir, store) = store();
        let store: Arc<dyn InboxStore> = Arc::new(store);
        let stats = Arc::new(DeliveryStats::default());
        let (tracker, queue) = (TaskTracker::new(), SerialQueue::new(10, 10, Duration::ZERO));
        let done = Arc::new(Mutex::new(Vec::new()));
        let tries = Arc::new(AtomicU32::new(0));
        for job in 1..=3u32 {
            let key = format!("tg/bot/{job}");
            let entry = put(&*store, &key, job);
            let (store, stats, done, tries) =
                (store.clone(), stats.clone(), done.clone(), tries.clone());
            let run = move |(key, mut entry): (String, Entry<Job>)| {
                let (store, stats, done, tries) =
                    (store.clone(), stats.clone(), done.clone(), tries.clone());
                async move {
                    guarded(&*store, &stats, &key, &mut entry, |Job { n: job }| {
                        let (done, tries, store) = (done.clone(), tries.clone(), store.clone());
                        async move {
                            if job == 2 {
                                tries.fetch_add(1, Ordering::Relaxed);
                                panic!("job 2 always panics");
                            }
                            done.lock().unwrap().push(job);
                            let _ = store.inbox_remove(&format!("tg/bot/{job}"));
                        }
                    })
                    .await;
                }
            };
            queue
                .push("conv".into(), u64::from(job), (key, entry), &tracker, run)
                .ok();
        }
        tracker.close();
        tracker.wait().await;
        assert_eq!(
            *done.lock().unwrap(),
            vec![1, 3],
            "the others were still answered, in order"
        );
        assert_eq!(tries.load(Ordering::Relaxed), PANIC_TRIES);
        let counts = stats.snapshot();
        assert_eq!((counts.update_panics, counts.updates_parked), (3, 1));
        assert!(
            store.inbox_scan("tg/bot/").expect("scan").is_empty(),
            "nothing left to replay"
        );
        let parked = store.inbox_scan(PARKED).expect("scan");
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].0, "parked/tg/bot/2");
        let entry: Entry<Job> = serde_json::from_slice(&parked[0].1).expect("json");
        assert_eq!((entry.job.n, entry.panics), (2, PANIC_TRIES));
    }

    #[tokio::test]
    async fn the_panic_count_survives_a_restart() {
        let (_dir, store) = store();
        let stats = DeliveryStats::default();
        let key = "dc/bot/7";
        let mut entry = put(&store, key, 7);
        entry.panics = 2; // two panics before the last start
        let tries = AtomicU32::new(0);
        let ran = guarded(&store, &stats, key, &mut entry, |_| {
            tries.fetch_add(1, Ordering::Relaxed);
            async { panic!("still broken") }
        })
        .await;
        assert!(!ran);
        assert_eq!(
            tries.load(Ordering::Relaxed),
            1,
            "one more try, then parked"
        );
        assert!(store.inbox_scan("dc/bot/").expect("scan").is_empty());

        // A panic that goes away: the count is stored with the entry, not parked.
        let mut entry = put(&store, key, 8);
        let first = AtomicBool::new(true);
        let ran = guarded(&store, &stats, key, &mut entry, |_| {
            let again = first.swap(false, Ordering::Relaxed);
            async move { assert!(!again, "panics once") }
        })
        .await;
        assert!(ran);
        let stored = store.inbox_scan("dc/bot/").expect("scan");
        let entry: Entry<Job> = serde_json::from_slice(&stored[0].1).expect("json");
        assert_eq!(entry.panics, 1);
    }
}
