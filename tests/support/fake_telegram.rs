//! In-process fake of the Telegram Bot API, for integration tests.
//!
//! Include it with `#[path = "../support/fake_telegram.rs"] mod fake_telegram;`
//! and point the bot at it (`Bot::new(token).set_api_url(fake.api_url.parse()?)`).
//!
//! teloxide requests `{api_url}/bot{TOKEN}/{Method}` with PascalCase method
//! names (`/bot123:ABC/SendMessage`); method names are matched
//! case-insensitively and recorded lowercased. Every answer is Telegram's
//! envelope: `{"ok":true,"result":…}` or
//! `{"ok":false,"error_code":N,"description":"…","parameters":{"retry_after":N}?}`.
//!
//! * Unsupported methods get `400 Bad Request: method not found` — never a
//!   5xx, because teloxide sleeps 10 s before parsing any 5xx answer.
//! * A token other than the configured one gets `401 Unauthorized`.
//! * Updates injected with `send_*` are queued and delivered by `getUpdates`
//!   with real offset semantics (offset N confirms every update with id < N,
//!   a negative offset keeps only the last -N updates); an empty queue is
//!   long-polled (≤ 10 s) with a tokio `Notify`, never blocking the runtime.
//!   A newer `getUpdates` terminates a waiting older one with
//!   `409 Conflict: terminated by other getUpdates request` (as Telegram does).
//! * `sendMessage` / `editMessageText` validate `parse_mode: "HTML"` (allowed
//!   tags, nesting, `&` entities) and answer `400 Bad Request: can't parse
//!   entities: …` like Telegram; > 4096 UTF-16 units → `message is too long`.
//! * [`FakeTelegram::fail_next`] queues a [`Fault`] for the next call of one
//!   method (FIFO per method).
//!
//! The shared state is behind a std `Mutex` that is never held across an await.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};

/// Longest long poll the fake will hold (teloxide's HTTP client gives up at 17 s).
const MAX_LONG_POLL: Duration = Duration::from_secs(10);
/// Telegram's limit on a message text, in UTF-16 code units.
const MAX_TEXT_UTF16: usize = 4096;

/// An error the fake answers instead of handling the next call of a method.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 `Too Many Requests: retry after N` with `parameters.retry_after = N`
    /// (teloxide: `RequestError::RetryAfter`).
    RetryAfter(u64),
    /// 500 `Internal Server Error` (teloxide sleeps 10 s before parsing it!).
    ServerError,
    /// 400 `Bad Request: can't parse entities: Unsupported start tag "foo" at byte offset 0`.
    CantParseEntities,
    /// 400 with this description (e.g. `"Bad Request: chat not found"`).
    BadRequest(String),
    /// Any status with this description (e.g. `403`, `"Forbidden: bot was
    /// blocked by the user"`). Use 5xx sparingly (teloxide sleeps 10 s).
    Status(u16, String),
}

/// One message the bot sent or edited (only successful calls are recorded here;
/// failed ones are visible in [`FakeTelegram::calls`]).
#[derive(Clone, Debug)]
pub struct SentMessage {
    /// `"sendmessage"`, `"editmessagetext"` or `"senddocument"`.
    pub method: String,
    pub chat_id: i64,
    /// Id of the new message, or of the edited one.
    pub message_id: i64,
    /// The text exactly as sent (HTML markup included); the caption for documents.
    pub text: String,
    pub parse_mode: Option<String>,
    /// `reply_parameters.message_id` (or legacy `reply_to_message_id`).
    pub reply_to: Option<i64>,
    pub reply_markup: Option<Value>,
    /// sendDocument: the uploaded file's name (multipart `filename`).
    pub file_name: Option<String>,
    /// sendDocument: the uploaded bytes (None when a file_id / URL was sent).
    pub document: Option<Vec<u8>>,
}

/// One request as received (recorded when it arrives; `status` is filled in
/// when the answer is sent, so it is 0 while e.g. a long poll is pending).
#[derive(Clone, Debug)]
pub struct ApiCall {
    /// Lowercased method name (`"sendmessage"`, `"getupdates"`, …).
    pub method: String,
    /// The JSON body (query/multipart text fields are merged into an object;
    /// multipart bodies also get `"_multipart": {"content_type","body_len"}`).
    pub body: Value,
    pub status: u16,
    /// The label of an API URL ending in `/via/<label>` (tell clients apart).
    pub via: Option<String>,
    /// When the request arrived.
    pub at: std::time::Instant,
}

/// Raw text and markup of a message the bot sent (for "not modified" checks).
struct BotMsg {
    raw_text: String,
    reply_markup: Option<Value>,
}

struct TgState {
    token: String,
    bot_id: i64,
    bot_username: String,
    /// Unconfirmed updates, ascending `update_id`.
    updates: VecDeque<Value>,
    next_update_id: i64,
    next_message_id: i64,
    next_callback_id: i64,
    next_file_id: i64,
    /// `allowed_updates` of the last getUpdates that had it (persistent, like Telegram).
    allowed_updates: Option<Vec<String>>,
    /// Incremented per getUpdates call: a waiting poll whose generation is old
    /// answers 409 Conflict.
    poll_generation: u64,
    /// Chat objects seen in injected updates, by id.
    chats: HashMap<i64, Value>,
    /// Every message (injected or sent by the bot), as Message JSON, by (chat, id).
    messages: HashMap<(i64, i64), Value>,
    bot_messages: HashMap<(i64, i64), BotMsg>,
    sent: Vec<SentMessage>,
    calls: Vec<ApiCall>,
    /// Whether `calls` and `chat_actions` are recorded (see
    /// [`FakeTelegram::set_record_calls`]); `call_counts` is kept either way.
    record_calls: bool,
    /// Number of calls per lowercased method, wrong-token and failed ones included.
    call_counts: HashMap<String, usize>,
    commands: Vec<(String, String)>,
    chat_actions: Vec<(i64, String)>,
    faults: HashMap<String, VecDeque<Fault>>,
    /// Faults that answer every call of a method until a moment (see
    /// [`FakeTelegram::fail_for`]).
    outages: Vec<(String, Fault, std::time::Instant)>,
    /// Users whose private chat refuses the bot (see [`FakeTelegram::refuse_private`]).
    refused_private: Vec<i64>,
    down: bool,
    /// The registered webhook (setWebhook), if any: updates are then POSTed to it.
    webhook: Option<Webhook>,
    /// Every setWebhook call, in order.
    webhook_sets: Vec<Webhook>,
    /// Whether the pushing task runs (started by the first setWebhook).
    pusher: bool,
    /// Webhook POSTs per update id (each attempt, redeliveries included).
    deliveries: HashMap<i64, usize>,
    /// Update ids the webhook acknowledged with a 2xx, in order.
    acked: Vec<i64>,
    /// Files users sent (voice notes, photos), by `file_id`: (file_path, bytes).
    files: HashMap<String, (String, Vec<u8>)>,
    /// File downloads served (`/file/bot<token>/<path>`).
    downloads: usize,
    /// Every update pushed and acknowledged, by id (for [`FakeTelegram::redeliver`]).
    pushed: HashMap<i64, Value>,
}

/// A webhook as registered with setWebhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub secret_token: Option<String>,
    pub drop_pending_updates: Option<String>,
}

impl TgState {
    /// The fault of an outage of `method` still running, if any.
    fn outage_fault(&mut self, method: &str) -> Option<Fault> {
        let now = std::time::Instant::now();
        self.outages.retain(|(_, _, until)| *until > now);
        self.outages
            .iter()
            .find(|(m, _, _)| m == method)
            .map(|(_, f, _)| f.clone())
    }
}

struct Inner {
    state: Mutex<TgState>,
    /// Signalled on every new update (and on shutdown / a newer getUpdates).
    updates_changed: Notify,
    /// Signalled on every recorded SentMessage.
    sent_changed: Notify,
}

type Shared = Arc<Inner>;

fn lock(inner: &Inner) -> MutexGuard<'_, TgState> {
    // A panicking test thread must not poison the fake for everyone else.
    inner.state.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(1_700_000_000)
}

/// Handle to a running fake Bot API. Dropping the last clone shuts it down.
#[derive(Clone)]
pub struct FakeTelegram {
    /// `http://127.0.0.1:PORT` (give it to `Bot::set_api_url`).
    pub api_url: String,
    /// The address actually bound.
    pub addr: SocketAddr,
    inner: Shared,
    /// Sender of the graceful-shutdown signal of the current server; kept out
    /// of `inner` so the server tasks don't keep it alive.
    stop: Arc<Mutex<Option<watch::Sender<bool>>>>,
}

impl FakeTelegram {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime. The bot id
    /// is the token's prefix before `:` (`"123:ABC"` → 123; 1 if not numeric).
    pub async fn start(token: &str, bot_username: &str) -> FakeTelegram {
        let bot_id = token
            .split(':')
            .next()
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(TgState {
                token: token.to_string(),
                bot_id,
                bot_username: bot_username.to_string(),
                updates: VecDeque::new(),
                next_update_id: 1,
                next_message_id: 1,
                next_callback_id: 1,
                next_file_id: 1,
                allowed_updates: None,
                poll_generation: 0,
                chats: HashMap::new(),
                messages: HashMap::new(),
                bot_messages: HashMap::new(),
                sent: Vec::new(),
                calls: Vec::new(),
                record_calls: true,
                call_counts: HashMap::new(),
                commands: Vec::new(),
                chat_actions: Vec::new(),
                faults: HashMap::new(),
                outages: Vec::new(),
                refused_private: Vec::new(),
                down: false,
                webhook: None,
                webhook_sets: Vec::new(),
                pusher: false,
                deliveries: HashMap::new(),
                acked: Vec::new(),
                pushed: HashMap::new(),
                files: HashMap::new(),
                downloads: 0,
            }),
            updates_changed: Notify::new(),
            sent_changed: Notify::new(),
        });
        let (addr, stop) = spawn_server(SocketAddr::from(([127, 0, 0, 1], 0)), inner.clone())
            .expect("fake_telegram: cannot bind 127.0.0.1:0");
        FakeTelegram {
            api_url: format!("http://{addr}"),
            addr,
            inner,
            stop: Arc::new(Mutex::new(Some(stop))),
        }
    }

    fn st(&self) -> MutexGuard<'_, TgState> {
        lock(&self.inner)
    }

    /// The bot's numeric id (from the token).
    pub fn bot_id(&self) -> i64 {
        self.st().bot_id
    }

    /// What `getMe` returns as `username` from now on.
    pub fn set_bot_username(&self, name: &str) {
        self.st().bot_username = name.to_string();
    }

    // ----- injecting updates ------------------------------------------------

    /// A private text message from `user_id` (chat id = user id). Returns the update_id.
    pub fn send_private(&self, user_id: i64, first_name: &str, text: &str) -> i64 {
        let mut st = self.st();
        let chat = private_chat(user_id, first_name);
        let msg = st.new_user_message(chat, user_id, first_name, text, None);
        self.push_update(st, json!({ "message": msg }))
    }

    /// A text message in supergroup `chat_id` (pass a negative id, e.g.
    /// `-1001234`). Every `@<bot_username>` in `text` gets a `mention` entity.
    pub fn send_group(&self, chat_id: i64, user_id: i64, first_name: &str, text: &str) -> i64 {
        let mut st = self.st();
        let chat = group_chat(chat_id);
        let msg = st.new_user_message(chat, user_id, first_name, text, None);
        self.push_update(st, json!({ "message": msg }))
    }

    /// A group message replying to the bot's message `replied_message_id`
    /// (its text is the one the bot sent, if the fake knows it).
    pub fn send_group_reply_to_bot(
        &self,
        chat_id: i64,
        user_id: i64,
        first_name: &str,
        text: &str,
        replied_message_id: i64,
    ) -> i64 {
        let mut st = self.st();
        let chat = group_chat(chat_id);
        let replied = st.bot_message_json(chat_id, replied_message_id, &chat);
        let msg = st.new_user_message(chat, user_id, first_name, text, Some(replied));
        self.push_update(st, json!({ "message": msg }))
    }

    /// A sticker message (no text) in a private chat (`private`, chat id =
    /// `chat_id`, normally the user id) or in supergroup `chat_id`.
    pub fn send_sticker(&self, chat_id: i64, user_id: i64, first_name: &str, private: bool) -> i64 {
        let mut st = self.st();
        let chat = if private {
            private_chat(chat_id, first_name)
        } else {
            group_chat(chat_id)
        };
        let id = st.take_message_id();
        let fid = st.take_file_id();
        let msg = json!({
            "message_id": id,
            "from": user_json(user_id, first_name),
            "date": now_unix(),
            "chat": chat,
            "sticker": {
                "file_id": format!("sticker-{fid}"),
                "file_unique_id": format!("ustk-{fid}"),
                "file_size": 1024,
                "width": 512,
                "height": 512,
                "type": "regular",
                "is_animated": false,
                "is_video": false,
                "emoji": "👍",
                "set_name": "FakeStickers"
            }
        });
        st.remember_message(&msg);
        self.push_update(st, json!({ "message": msg }))
    }

    /// A raw update; `update_id` is assigned if missing (an explicit one also
    /// moves the counter past it). Returns the update_id.
    pub fn send_update(&self, update: Value) -> i64 {
        let st = self.st();
        self.push_update(st, update)
    }

    /// A callback query (inline keyboard button press) on message `message_id`
    /// in `chat_id` (private if positive, supergroup if negative).
    pub fn send_callback_query(
        &self,
        user_id: i64,
        chat_id: i64,
        message_id: i64,
        data: &str,
    ) -> i64 {
        let mut st = self.st();
        let chat = st.chat_json(chat_id);
        let message = st.bot_message_json(chat_id, message_id, &chat);
        let cb_id = st.next_callback_id;
        st.next_callback_id += 1;
        let first_name = chat
            .get("first_name")
            .and_then(Value::as_str)
            .filter(|_| chat_id == user_id)
            .unwrap_or("User")
            .to_string();
        let cq = json!({
            "id": format!("cbq-{cb_id}"),
            "from": user_json(user_id, &first_name),
            "message": message,
            "chat_instance": format!("ci{chat_id}"),
            "data": data,
        });
        self.push_update(st, json!({ "callback_query": cq }))
    }

    fn push_update(&self, mut st: MutexGuard<'_, TgState>, mut update: Value) -> i64 {
        if !update.is_object() {
            update = json!({ "unknown": update });
        }
        let id = match update.get("update_id").and_then(Value::as_i64) {
            Some(id) => {
                st.next_update_id = st.next_update_id.max(id + 1);
                id
            }
            None => {
                let id = st.next_update_id;
                st.next_update_id += 1;
                update["update_id"] = json!(id);
                id
            }
        };
        // Keep the queue sorted by id (explicit ids may arrive out of order); the usual
        // case, a new highest id, is an append without a scan.
        let pos = match st.updates.back() {
            Some(last) if update_id(last) > id => st
                .updates
                .iter()
                .position(|u| update_id(u) > id)
                .unwrap_or(st.updates.len()),
            _ => st.updates.len(),
        };
        st.updates.insert(pos, update);
        drop(st);
        self.inner.updates_changed.notify_waiters();
        id
    }

    // ----- what the bot did --------------------------------------------------

    /// Every successful sendMessage / editMessageText / sendDocument, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.st().sent.clone()
    }

    pub fn sent_to(&self, chat_id: i64) -> Vec<SentMessage> {
        self.st()
            .sent
            .iter()
            .filter(|m| m.chat_id == chat_id)
            .cloned()
            .collect()
    }

    /// Every request (wrong-token and failed ones included), in arrival order.
    pub fn calls(&self) -> Vec<ApiCall> {
        self.st().calls.clone()
    }

    /// Number of calls of `method` (case-insensitive).
    pub fn count(&self, method: &str) -> usize {
        let m = method.to_ascii_lowercase();
        let st = self.st();
        if !st.record_calls {
            return st.call_counts.get(&m).copied().unwrap_or(0);
        }
        st.calls.iter().filter(|c| c.method == m).count()
    }

    /// Whether to keep the per-call logs ([`calls`](Self::calls) and
    /// [`chat_actions`](Self::chat_actions)); on by default. Load generators turn it
    /// off (before any traffic) so 100k messages don't pile up request bodies: then
    /// `calls()` / `chat_actions()` stay empty and [`count`](Self::count) answers from
    /// per-method counters, which are kept either way.
    pub fn set_record_calls(&self, on: bool) {
        self.st().record_calls = on;
    }

    /// Number of messages in [`sent`](Self::sent), without cloning them.
    pub fn sent_len(&self) -> usize {
        self.st().sent.len()
    }

    /// The entries of [`sent`](Self::sent) from index `from` on (empty if there are
    /// none yet): lets a caller that polls repeatedly clone only what is new.
    pub fn sent_since(&self, from: usize) -> Vec<SentMessage> {
        let st = self.st();
        st.sent.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Waits until more than `from` messages were sent (or `timeout`) and returns
    /// only the new ones, like [`sent_since`](Self::sent_since) (possibly empty).
    pub async fn wait_for_sent_since(&self, from: usize, timeout: Duration) -> Vec<SentMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.sent_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.st().sent.len() > from {
                return self.sent_since(from);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.sent_since(from);
            }
        }
    }

    /// Waits until at least `n` messages were sent (see [`sent`](Self::sent));
    /// returns whatever is there when that happens or at `timeout`.
    pub async fn wait_for_sent(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.sent_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.st();
                if st.sent.len() >= n {
                    return st.sent.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.sent();
            }
        }
    }

    /// The list of the last setMyCommands (empty after deleteMyCommands).
    pub fn commands(&self) -> Vec<(String, String)> {
        self.st().commands.clone()
    }

    /// Every sendChatAction as (chat_id, action).
    pub fn chat_actions(&self) -> Vec<(i64, String)> {
        self.st().chat_actions.clone()
    }

    /// Updates not yet confirmed by a getUpdates offset.
    pub fn pending_updates(&self) -> usize {
        self.st().updates.len()
    }

    // ----- fault injection & lifecycle ----------------------------------------

    /// The next call of `method` (case-insensitive) gets `fault` instead of
    /// being handled (FIFO per method). The call is recorded with the error status.
    pub fn fail_next(&self, method: &str, fault: Fault) {
        self.st()
            .faults
            .entry(method.to_ascii_lowercase())
            .or_default()
            .push_back(fault);
    }

    /// Every call of `method` (case-insensitive) gets `fault` for the next `duration`
    /// (an outage while the daemon runs), after any [`fail_next`](Self::fail_next) faults.
    pub fn fail_for(&self, method: &str, fault: Fault, duration: Duration) {
        let until = std::time::Instant::now() + duration;
        self.st()
            .outages
            .push((method.to_ascii_lowercase(), fault, until));
    }

    /// From now on, sending to `user_id`'s private chat fails like Telegram does for a
    /// user who never started the bot: 403 `Forbidden: bot can't initiate conversation
    /// with a user`.
    pub fn refuse_private(&self, user_id: i64) {
        self.st().refused_private.push(user_id);
    }

    /// Arrival times and statuses of the calls of `method`, in order.
    pub fn attempts(&self, method: &str) -> Vec<(std::time::Instant, u16)> {
        let m = method.to_ascii_lowercase();
        self.st()
            .calls
            .iter()
            .filter(|c| c.method == m)
            .map(|c| (c.at, c.status))
            .collect()
    }

    /// Stop accepting: the listener closes (new connections are refused),
    /// waiting long polls return `[]` at once, and any request that still
    /// arrives gets `503` + `Connection: close`.
    pub fn shutdown(&self) {
        self.st().down = true;
        self.inner.updates_changed.notify_waiters();
        if let Some(tx) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(true);
        }
    }

    /// Serve again on the same address after [`shutdown`](Self::shutdown),
    /// keeping all state (queued updates, records, faults).
    pub async fn restart(&self) -> std::io::Result<()> {
        self.shutdown();
        for _ in 0..100 {
            match spawn_server(self.addr, self.inner.clone()) {
                Ok((_, stop)) => {
                    *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop);
                    self.st().down = false;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("fake_telegram: {} still in use", self.addr),
        ))
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        // Only the last handle stops the server.
        if Arc::strong_count(&self.stop) == 1 {
            self.shutdown();
        }
    }
}

fn spawn_server(
    addr: SocketAddr,
    inner: Shared,
) -> std::io::Result<(SocketAddr, watch::Sender<bool>)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let local = listener.local_addr()?;

    let app = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(inner);

    let (tx, mut rx) = watch::channel(false);
    tokio::spawn(async move {
        let signal = async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await;
    });
    Ok((local, tx))
}

// ---------------------------------------------------------------------------
// JSON builders

fn user_json(id: i64, first_name: &str) -> Value {
    json!({ "id": id, "is_bot": false, "first_name": first_name, "language_code": "en" })
}

fn private_chat(id: i64, first_name: &str) -> Value {
    json!({ "id": id, "type": "private", "first_name": first_name })
}

fn group_chat(id: i64) -> Value {
    json!({ "id": id, "type": "supergroup", "title": format!("Group {id}") })
}

fn update_id(u: &Value) -> i64 {
    u.get("update_id").and_then(Value::as_i64).unwrap_or(0)
}

/// The update's kind: its first key other than `update_id`.
fn update_kind(u: &Value) -> Option<&str> {
    u.as_object()?
        .keys()
        .find(|k| k.as_str() != "update_id")
        .map(String::as_str)
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// `mention` entities for every `@username` (ASCII case-insensitive, whole word) in `text`.
/// Matches on the text's own char boundaries (a lowercased copy can have other offsets).
fn mention_entities(text: &str, username: &str) -> Vec<Value> {
    let mut out = Vec::new();
    if username.is_empty() {
        return out;
    }
    let name_len = username.len() + 1;
    for (start, _) in text.match_indices('@') {
        let Some(candidate) = text.get(start + 1..start + name_len) else {
            continue;
        };
        let end = start + name_len;
        let boundary = text[end..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if candidate.eq_ignore_ascii_case(username) && boundary {
            out.push(json!({
                "type": "mention",
                "offset": utf16_len(&text[..start]),
                "length": utf16_len(&text[start..end]),
            }));
        }
    }
    out
}

impl TgState {
    fn take_message_id(&mut self) -> i64 {
        let id = self.next_message_id;
        self.next_message_id += 1;
        id
    }

    fn take_file_id(&mut self) -> i64 {
        let id = self.next_file_id;
        self.next_file_id += 1;
        id
    }

    fn bot_user(&self) -> Value {
        json!({
            "id": self.bot_id,
            "is_bot": true,
            "first_name": "Fake Bot",
            "username": self.bot_username,
        })
    }

    fn me(&self) -> Value {
        json!({
            "id": self.bot_id,
            "is_bot": true,
            "first_name": "Fake Bot",
            "username": self.bot_username,
            "can_join_groups": true,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
            "can_connect_to_business": false,
            "has_main_web_app": false,
        })
    }

    /// The chat object for `chat_id`: as seen in an injected update, else
    /// synthesized (positive = private, negative = supergroup).
    fn chat_json(&self, chat_id: i64) -> Value {
        if let Some(c) = self.chats.get(&chat_id) {
            return c.clone();
        }
        if chat_id > 0 {
            private_chat(chat_id, "User")
        } else {
            group_chat(chat_id)
        }
    }

    fn remember_message(&mut self, msg: &Value) {
        let chat = msg["chat"].clone();
        let chat_id = chat["id"].as_i64().unwrap_or(0);
        let id = msg["message_id"].as_i64().unwrap_or(0);
        self.chats.entry(chat_id).or_insert(chat);
        let mut stored = msg.clone();
        if let Some(o) = stored.as_object_mut() {
            o.remove("reply_to_message"); // Telegram never nests replies
        }
        self.messages.insert((chat_id, id), stored);
    }

    fn new_user_message(
        &mut self,
        chat: Value,
        user_id: i64,
        first_name: &str,
        text: &str,
        reply_to: Option<Value>,
    ) -> Value {
        let id = self.take_message_id();
        let mut msg = json!({
            "message_id": id,
            "from": user_json(user_id, first_name),
            "date": now_unix(),
            "chat": chat,
            "text": text,
        });
        let mut entities = Vec::new();
        if text.starts_with('/') {
            let cmd_len = text.find(char::is_whitespace).unwrap_or(text.len());
            entities.push(json!({ "type": "bot_command", "offset": 0, "length": utf16_len(&text[..cmd_len]) }));
        }
        entities.extend(mention_entities(text, &self.bot_username));
        if !entities.is_empty() {
            msg["entities"] = Value::Array(entities);
        }
        if let Some(r) = reply_to {
            msg["reply_to_message"] = r;
        }
        self.remember_message(&msg);
        msg
    }

    /// Message JSON for a message (normally the bot's) in `chat_id`: the stored
    /// one if known, else a plausible bot text message.
    fn bot_message_json(&self, chat_id: i64, message_id: i64, chat: &Value) -> Value {
        if let Some(m) = self.messages.get(&(chat_id, message_id)) {
            return m.clone();
        }
        json!({
            "message_id": message_id,
            "from": self.bot_user(),
            "date": now_unix(),
            "chat": chat,
            "text": "(bot message)",
        })
    }

    fn collect_updates(&mut self, limit: usize) -> Vec<Value> {
        let allowed = self.allowed_updates.clone();
        if let Some(allowed) = allowed.filter(|a| !a.is_empty()) {
            // Telegram never creates updates of types the bot did not ask for.
            self.updates
                .retain(|u| update_kind(u).is_none_or(|k| allowed.iter().any(|a| a == k)));
        }
        self.updates.iter().take(limit).cloned().collect()
    }
}

// ---------------------------------------------------------------------------
// HTML validation (Telegram's parse_mode "HTML")

const ALLOWED_TAGS: &[&str] = &[
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "code",
    "pre",
    "a",
    "tg-spoiler",
    "blockquote",
    "span",
    "tg-emoji",
];

/// Returns the visible text, or the part of the error after
/// `Bad Request: can't parse entities: `.
fn parse_html(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut stack: Vec<String> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' => {
                let Some(rel) = text[i..].find('>') else {
                    return Err(format!(
                        "Can't find end of the tag starting at byte offset {i}"
                    ));
                };
                let inner = &text[i + 1..i + rel];
                if let Some(name) = inner.strip_prefix('/') {
                    let name = name.trim().to_ascii_lowercase();
                    match stack.pop() {
                        None => {
                            return Err(format!(
                                "Unexpected end tag at byte offset {i}"
                            ))
                        }
                        Some(open) if open != name => {
                            return Err(format!(
                                "Unmatched end tag at byte offset {i}, expected \"</{open}>\", found \"</{name}>\""
                            ))
                        }
                        Some(_) => {}
                    }
                } else {
                    let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
                    let name = inner[..name_end].trim_end_matches('/').to_ascii_lowercase();
                    let attrs = &inner[name_end..];
                    let ok = ALLOWED_TAGS.contains(&name.as_str())
                        && match name.as_str() {
                            "a" => attrs.contains("href="),
                            "span" => attrs.contains("tg-spoiler"),
                            "tg-emoji" => attrs.contains("emoji-id="),
                            _ => true,
                        };
                    if !ok {
                        return Err(format!(
                            "Unsupported start tag \"{name}\" at byte offset {i}"
                        ));
                    }
                    stack.push(name);
                }
                i += rel + 1;
            }
            b'&' => {
                let rest = &text[i + 1..];
                let semi = rest.find(';').filter(|&p| p <= 10);
                let decoded = semi.and_then(|p| {
                    let ent = &rest[..p];
                    let c = match ent {
                        "amp" => Some('&'),
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "quot" => Some('"'),
                        "apos" => Some('\''),
                        _ => {
                            let num = ent.strip_prefix('#')?;
                            let code = match num.strip_prefix(['x', 'X']) {
                                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                                None => num.parse::<u32>().ok()?,
                            };
                            char::from_u32(code)
                        }
                    }?;
                    Some((c, p))
                });
                match decoded {
                    Some((c, p)) => {
                        out.push(c);
                        i += p + 2;
                    }
                    None => {
                        return Err(format!(
                            "Character entity expected at byte offset {i}: escape '&' as &amp;"
                        ))
                    }
                }
            }
            _ => {
                // Copy one whole UTF-8 character.
                let ch = text[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    if let Some(open) = stack.pop() {
        return Err(format!(
            "Can't find end tag corresponding to start tag \"{open}\""
        ));
    }
    Ok(out)
}

/// Validates `text` for `parse_mode`; returns the visible text or a 400 description.
fn check_text(text: &str, parse_mode: Option<&str>) -> Result<String, String> {
    let visible = match parse_mode {
        Some(pm) if pm.eq_ignore_ascii_case("html") => {
            parse_html(text).map_err(|e| format!("Bad Request: can't parse entities: {e}"))?
        }
        _ => text.to_string(),
    };
    if visible.trim().is_empty() {
        return Err("Bad Request: message text is empty".into());
    }
    if utf16_len(&visible) > MAX_TEXT_UTF16 {
        return Err("Bad Request: message is too long".into());
    }
    Ok(visible)
}

// ---------------------------------------------------------------------------
// Request parsing

/// `chat_id` as an integer (JSON number or numeric string).
fn chat_id_of(body: &Value) -> Option<i64> {
    match body.get("chat_id")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn i64_field(body: &Value, key: &str) -> Option<i64> {
    match body.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn str_field(body: &Value, key: &str) -> Option<String> {
    body.get(key).and_then(Value::as_str).map(str::to_string)
}

fn reply_to_of(body: &Value) -> Option<i64> {
    body.get("reply_parameters")
        .and_then(|r| i64_field(r, "message_id"))
        .or_else(|| i64_field(body, "reply_to_message_id"))
}

/// An inline keyboard from the request, if any (only those appear in Message).
fn inline_markup_of(body: &Value) -> Option<Value> {
    body.get("reply_markup")
        .filter(|m| m.get("inline_keyboard").is_some())
        .cloned()
}

struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
}

fn find_bytes(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn header_param(line: &str, key: &str) -> Option<String> {
    // e.g. `form-data; name="document"; filename="a.txt"`
    let pat = format!("{key}=\"");
    let mut search = 0;
    while let Some(p) = line[search..].find(&pat) {
        let start = search + p;
        // make sure `name=` is not the tail of `filename=`
        let prev = line[..start].chars().last();
        if prev.is_none_or(|c| c == ' ' || c == ';') {
            let vstart = start + pat.len();
            let vend = line[vstart..].find('"').map(|e| vstart + e)?;
            return Some(line[vstart..vend].to_string());
        }
        search = start + pat.len();
    }
    None
}

/// A small multipart/form-data scanner (enough for reqwest's encoding).
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<Part> {
    let delim = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let Some(mut pos) = find_bytes(body, &delim, 0) else {
        return parts;
    };
    loop {
        let after = pos + delim.len();
        if body[after..].starts_with(b"--") {
            break; // closing delimiter
        }
        let hstart = after
            + if body[after..].starts_with(b"\r\n") {
                2
            } else {
                0
            };
        let Some(hend) = find_bytes(body, b"\r\n\r\n", hstart) else {
            break;
        };
        let next_delim = [b"\r\n".as_slice(), &delim].concat();
        let Some(next) = find_bytes(body, &next_delim, hend + 4) else {
            break;
        };
        let headers = String::from_utf8_lossy(&body[hstart..hend]).to_string();
        let mut part = Part {
            name: String::new(),
            filename: None,
            content_type: None,
            data: body[hend + 4..next].to_vec(),
        };
        for line in headers.split("\r\n") {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("content-disposition:") {
                part.name = header_param(line, "name").unwrap_or_default();
                part.filename = header_param(line, "filename");
            } else if lower.starts_with("content-type:") {
                part.content_type = Some(line["content-type:".len()..].trim().to_string());
            }
        }
        parts.push(part);
        pos = next + 2;
    }
    parts
}

/// A file uploaded with the request.
struct Upload {
    file_name: Option<String>,
    data: Vec<u8>,
}

/// Request body as JSON (+ the uploaded file, for multipart).
fn parse_body(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> (Value, Option<Upload>, bool) {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut obj = Map::new();
    if let Ok(Query(q)) = Query::<HashMap<String, String>>::try_from_uri(uri) {
        for (k, v) in q {
            obj.insert(k, Value::String(v));
        }
    }
    let mut upload = None;
    let mut valid = true;
    if ctype
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        let boundary = ctype
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .to_string();
        let parts = parse_multipart(body, &boundary);
        let mut files: Vec<&Part> = Vec::new();
        for p in &parts {
            if p.filename.is_some() {
                files.push(p);
                continue;
            }
            let text = String::from_utf8_lossy(&p.data).to_string();
            let value = if text.starts_with('{') || text.starts_with('[') {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            } else {
                Value::String(text)
            };
            obj.insert(p.name.clone(), value);
        }
        // teloxide sends `document=attach://<id>` plus a part named `<id>`.
        let wanted = obj
            .get("document")
            .and_then(Value::as_str)
            .and_then(|s| s.strip_prefix("attach://"))
            .map(str::to_string);
        let file = files
            .iter()
            .find(|p| Some(&p.name) == wanted.as_ref())
            .or_else(|| files.iter().find(|p| p.name == "document"))
            .or_else(|| files.first());
        if let Some(f) = file {
            upload = Some(Upload {
                file_name: f.filename.clone().filter(|n| !n.is_empty()),
                data: f.data.clone(),
            });
            obj.insert(
                "document".into(),
                json!({ "file_name": f.filename, "len": f.data.len(), "content_type": f.content_type }),
            );
        }
        obj.insert(
            "_multipart".into(),
            json!({ "content_type": ctype, "body_len": body.len() }),
        );
    } else if !body.is_empty() {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => obj.extend(m),
            Ok(other) => {
                obj.insert("_body".into(), other);
            }
            Err(_) => {
                valid = false;
                obj.insert(
                    "_raw".into(),
                    Value::String(String::from_utf8_lossy(body).into()),
                );
            }
        }
    }
    (Value::Object(obj), upload, valid)
}

// ---------------------------------------------------------------------------
// Responses

fn ok(result: Value) -> (u16, Value) {
    (200, json!({ "ok": true, "result": result }))
}

fn err(code: u16, description: &str) -> (u16, Value) {
    (
        code,
        json!({ "ok": false, "error_code": code, "description": description }),
    )
}

fn fault_response(f: &Fault) -> (u16, Value) {
    match f {
        Fault::RetryAfter(n) => (
            429,
            json!({
                "ok": false,
                "error_code": 429,
                "description": format!("Too Many Requests: retry after {n}"),
                "parameters": { "retry_after": n },
            }),
        ),
        Fault::ServerError => err(500, "Internal Server Error"),
        Fault::CantParseEntities => err(
            400,
            "Bad Request: can't parse entities: Unsupported start tag \"foo\" at byte offset 0",
        ),
        Fault::BadRequest(d) => err(400, d),
        Fault::Status(code, d) => err(*code, d),
    }
}

fn into_response((code, body): (u16, Value), close: bool) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    let mut resp = (status, axum::Json(body)).into_response();
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

// ---------------------------------------------------------------------------
// Handler

/// `/via/<label>/bot…/m` → (`Some(label)`, `/bot…/m`); other paths are kept.
fn split_via(path: &str) -> (Option<String>, String) {
    match path
        .strip_prefix("/via/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((label, rest)) => (Some(label.to_string()), format!("/{rest}")),
        None => (None, path.to_string()),
    }
}

async fn handle(
    State(inner): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (via, path) = split_via(uri.path());
    if let Some(rest) = path.strip_prefix("/file/bot") {
        return download_file(&inner, rest);
    }
    let (token, method) = match path
        .strip_prefix("/bot")
        .and_then(|rest| rest.rsplit_once('/'))
    {
        Some((t, m)) if !m.is_empty() => (t.to_string(), m.to_ascii_lowercase()),
        _ => return into_response(err(404, "Not Found"), false),
    };
    let (json_body, upload, valid) = parse_body(&uri, &headers, &body);

    // Record the call, pick a fault.
    let (idx, fault, authorized, down) = {
        let mut st = lock(&inner);
        *st.call_counts.entry(method.clone()).or_default() += 1;
        let idx = st.record_calls.then(|| {
            st.calls.push(ApiCall {
                method: method.clone(),
                body: json_body.clone(),
                status: 0,
                via: via.clone(),
                at: std::time::Instant::now(),
            });
            st.calls.len() - 1
        });
        let authorized = token == st.token;
        let fault = if authorized && !st.down {
            st.faults
                .get_mut(&method)
                .and_then(VecDeque::pop_front)
                .or_else(|| st.outage_fault(&method))
        } else {
            None
        };
        (idx, fault, authorized, st.down)
    };

    let (code, resp_body, close) = if down {
        let (c, b) = err(503, "Service Unavailable: fake_telegram is shut down");
        (c, b, true)
    } else if !authorized {
        let (c, b) = err(401, "Unauthorized");
        (c, b, false)
    } else if let Some(f) = fault {
        let (c, b) = fault_response(&f);
        (c, b, false)
    } else if !valid {
        let (c, b) = err(400, "Bad Request: can't parse JSON body");
        (c, b, false)
    } else if let Some((c, b)) = refused_private(&inner, &method, &json_body) {
        (c, b, false)
    } else {
        let (c, b) = dispatch(&inner, &method, &json_body, upload).await;
        (c, b, false)
    };

    if let Some(idx) = idx {
        lock(&inner).calls[idx].status = code;
    }
    into_response((code, resp_body), close)
}

/// A message to a private chat that [`FakeTelegram::refuse_private`] closed.
fn refused_private(inner: &Shared, method: &str, body: &Value) -> Option<(u16, Value)> {
    let sends = ["sendmessage", "senddocument", "editmessagetext"];
    let chat = chat_id_of(body)?;
    let refused = sends.contains(&method) && lock(inner).refused_private.contains(&chat);
    refused.then(|| {
        err(
            403,
            "Forbidden: bot can't initiate conversation with a user",
        )
    })
}

async fn dispatch(
    inner: &Shared,
    method: &str,
    body: &Value,
    upload: Option<Upload>,
) -> (u16, Value) {
    match method {
        "getupdates" if lock(inner).webhook.is_none() => get_updates(inner, body).await,
        "getme" => ok(lock(inner).me()),
        "getupdates" if lock(inner).webhook.is_some() => err(
            409,
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
        ),
        "getwebhookinfo" => {
            let st = lock(inner);
            let url = st.webhook.as_ref().map(|w| w.url.clone()).unwrap_or_default();
            ok(json!({ "url": url, "has_custom_certificate": false, "pending_update_count": st.updates.len() }))
        }
        "setwebhook" => set_webhook(inner, body),
        "deletewebhook" => {
            lock(inner).webhook = None;
            ok(json!(true))
        }
        "close" | "logout" | "answercallbackquery" | "deletemessage" => ok(json!(true)),
        "sendmessage" => send_message(inner, body),
        "editmessagetext" => edit_message_text(inner, body),
        "senddocument" => send_document(inner, body, upload),
        "getfile" => get_file(inner, body),
        "sendvoice" => send_voice(inner, body, upload),
        "sendchataction" => {
            let Some(chat_id) = chat_id_of(body) else {
                return err(400, "Bad Request: chat_id is empty");
            };
            let action = str_field(body, "action").unwrap_or_default();
            let mut st = lock(inner);
            if st.record_calls {
                st.chat_actions.push((chat_id, action));
            }
            ok(json!(true))
        }
        "setmycommands" => {
            let list: Vec<(String, String)> = body
                .get("commands")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            (
                                str_field(c, "command").unwrap_or_default(),
                                str_field(c, "description").unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            lock(inner).commands = list;
            ok(json!(true))
        }
        "deletemycommands" => {
            lock(inner).commands.clear();
            ok(json!(true))
        }
        "getmycommands" => {
            let list: Vec<Value> = lock(inner)
                .commands
                .iter()
                .map(|(c, d)| json!({ "command": c, "description": d }))
                .collect();
            ok(Value::Array(list))
        }
        _ => err(400, "Bad Request: method not found"),
    }
}

async fn get_updates(inner: &Shared, body: &Value) -> (u16, Value) {
    let offset = i64_field(body, "offset").unwrap_or(0);
    let limit = i64_field(body, "limit").unwrap_or(100).clamp(1, 100) as usize;
    let timeout = Duration::from_secs(i64_field(body, "timeout").unwrap_or(0).max(0) as u64)
        .min(MAX_LONG_POLL);

    let generation = {
        let mut st = lock(inner);
        if let Some(list) = body.get("allowed_updates").and_then(Value::as_array) {
            st.allowed_updates = Some(
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            );
        }
        if offset > 0 {
            st.updates.retain(|u| update_id(u) >= offset);
        } else if offset < 0 {
            let keep = offset.unsigned_abs() as usize;
            while st.updates.len() > keep {
                st.updates.pop_front();
            }
        }
        st.poll_generation += 1;
        st.poll_generation
    };
    // Wake an older waiting poll so it can answer 409.
    inner.updates_changed.notify_waiters();

    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = inner.updates_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = lock(inner);
            if st.poll_generation != generation {
                return err(
                    409,
                    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
                );
            }
            let batch = st.collect_updates(limit);
            if !batch.is_empty() || st.down || tokio::time::Instant::now() >= deadline {
                return ok(Value::Array(batch));
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            let batch = lock(inner).collect_updates(limit);
            return ok(Value::Array(batch));
        }
    }
}

fn send_message(inner: &Shared, body: &Value) -> (u16, Value) {
    let Some(chat_id) = chat_id_of(body) else {
        return err(400, "Bad Request: chat not found");
    };
    let text = str_field(body, "text").unwrap_or_default();
    let parse_mode = str_field(body, "parse_mode");
    let visible = match check_text(&text, parse_mode.as_deref()) {
        Ok(v) => v,
        Err(d) => return err(400, &d),
    };
    let reply_to = reply_to_of(body);
    let markup = inline_markup_of(body);

    let result = {
        let mut st = lock(inner);
        let id = st.take_message_id();
        let chat = st.chat_json(chat_id);
        let mut msg = json!({
            "message_id": id,
            "from": st.bot_user(),
            "date": now_unix(),
            "chat": chat,
            "text": visible,
        });
        if let Some(r) = reply_to.and_then(|r| st.messages.get(&(chat_id, r)).cloned()) {
            msg["reply_to_message"] = r;
        }
        if let Some(m) = &markup {
            msg["reply_markup"] = m.clone();
        }
        st.remember_message(&msg);
        st.bot_messages.insert(
            (chat_id, id),
            BotMsg {
                raw_text: text.clone(),
                reply_markup: markup.clone(),
            },
        );
        st.sent.push(SentMessage {
            method: "sendmessage".into(),
            chat_id,
            message_id: id,
            text,
            parse_mode,
            reply_to,
            reply_markup: body.get("reply_markup").cloned(),
            file_name: None,
            document: None,
        });
        msg
    };
    inner.sent_changed.notify_waiters();
    ok(result)
}

fn edit_message_text(inner: &Shared, body: &Value) -> (u16, Value) {
    let text = str_field(body, "text").unwrap_or_default();
    let parse_mode = str_field(body, "parse_mode");
    let visible = match check_text(&text, parse_mode.as_deref()) {
        Ok(v) => v,
        Err(d) => return err(400, &d),
    };
    if body.get("inline_message_id").is_some() {
        return ok(json!(true));
    }
    let (Some(chat_id), Some(message_id)) = (chat_id_of(body), i64_field(body, "message_id"))
    else {
        return err(400, "Bad Request: message to edit not found");
    };
    let markup = inline_markup_of(body);

    let result = {
        let mut st = lock(inner);
        let Some(prev) = st.bot_messages.get(&(chat_id, message_id)) else {
            return if st.messages.contains_key(&(chat_id, message_id)) {
                err(400, "Bad Request: message can't be edited")
            } else {
                err(400, "Bad Request: message to edit not found")
            };
        };
        if prev.raw_text == text && prev.reply_markup == markup {
            return err(
                400,
                "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
            );
        }
        let chat = st.chat_json(chat_id);
        let mut msg = st
            .messages
            .get(&(chat_id, message_id))
            .cloned()
            .unwrap_or_else(|| json!({ "message_id": message_id, "from": st.bot_user(), "date": now_unix(), "chat": chat }));
        msg["text"] = json!(visible);
        msg["edit_date"] = json!(now_unix());
        match &markup {
            Some(m) => msg["reply_markup"] = m.clone(),
            None => {
                if let Some(o) = msg.as_object_mut() {
                    o.remove("reply_markup");
                }
            }
        }
        st.remember_message(&msg);
        st.bot_messages.insert(
            (chat_id, message_id),
            BotMsg {
                raw_text: text.clone(),
                reply_markup: markup.clone(),
            },
        );
        st.sent.push(SentMessage {
            method: "editmessagetext".into(),
            chat_id,
            message_id,
            text,
            parse_mode,
            reply_to: None,
            reply_markup: body.get("reply_markup").cloned(),
            file_name: None,
            document: None,
        });
        msg
    };
    inner.sent_changed.notify_waiters();
    ok(result)
}

fn send_document(inner: &Shared, body: &Value, upload: Option<Upload>) -> (u16, Value) {
    let Some(chat_id) = chat_id_of(body) else {
        return err(400, "Bad Request: chat not found");
    };
    let caption = str_field(body, "caption");
    let parse_mode = str_field(body, "parse_mode");
    if let Some(c) = &caption {
        if parse_mode
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("html"))
        {
            if let Err(e) = parse_html(c) {
                return err(400, &format!("Bad Request: can't parse entities: {e}"));
            }
        }
    }
    let (file_name, data) = match upload {
        Some(u) => (u.file_name, Some(u.data)),
        None => match body.get("document").and_then(Value::as_str) {
            Some(_) => (None, None), // file_id or URL
            None => return err(400, "Bad Request: there is no document in the request"),
        },
    };
    if data.as_ref().is_some_and(|d| d.is_empty()) {
        return err(400, "Bad Request: file must be non-empty");
    }
    let reply_to = reply_to_of(body);
    let markup = inline_markup_of(body);

    let result = {
        let mut st = lock(inner);
        let id = st.take_message_id();
        let fid = st.take_file_id();
        let chat = st.chat_json(chat_id);
        let mut doc = json!({
            "file_id": format!("doc-{fid}"),
            "file_unique_id": format!("udoc-{fid}"),
            "file_size": data.as_ref().map_or(0, Vec::len),
        });
        if let Some(n) = &file_name {
            doc["file_name"] = json!(n);
        }
        let mut msg = json!({
            "message_id": id,
            "from": st.bot_user(),
            "date": now_unix(),
            "chat": chat,
            "document": doc,
        });
        if let Some(c) = &caption {
            msg["caption"] = json!(c);
        }
        if let Some(r) = reply_to.and_then(|r| st.messages.get(&(chat_id, r)).cloned()) {
            msg["reply_to_message"] = r;
        }
        if let Some(m) = &markup {
            msg["reply_markup"] = m.clone();
        }
        st.remember_message(&msg);
        st.sent.push(SentMessage {
            method: "senddocument".into(),
            chat_id,
            message_id: id,
            text: caption.unwrap_or_default(),
            parse_mode,
            reply_to,
            reply_markup: body.get("reply_markup").cloned(),
            file_name,
            document: data,
        });
        msg
    };
    inner.sent_changed.notify_waiters();
    ok(result)
}

// ---------------------------------------------------------------------------
// Webhook: like Telegram, once setWebhook named a URL every queued update is POSTed
// there (oldest first, one at a time) with the secret header, and redelivered with
// backoff until the endpoint answers 2xx.

/// Redelivery backoff: first wait, and the longest.
const PUSH_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

fn set_webhook(inner: &Shared, body: &Value) -> (u16, Value) {
    let url = str_field(body, "url").unwrap_or_default();
    let hook = Webhook {
        url: url.clone(),
        secret_token: str_field(body, "secret_token"),
        drop_pending_updates: body.get("drop_pending_updates").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
    };
    let start = {
        let mut st = lock(inner);
        if let Some(list) = body.get("allowed_updates").and_then(Value::as_array) {
            st.allowed_updates = Some(
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            );
        }
        st.webhook_sets.push(hook.clone());
        st.webhook = (!url.is_empty()).then_some(hook);
        !std::mem::replace(&mut st.pusher, true)
    };
    if start {
        tokio::spawn(push_loop(inner.clone()));
    }
    inner.updates_changed.notify_waiters();
    ok(json!(true))
}

/// POSTs the oldest queued update to the webhook until it is acknowledged, then the
/// next; ends when the fake shuts down.
async fn push_loop(inner: Shared) {
    let client = reqwest::Client::new();
    let mut backoff = PUSH_BACKOFF.0;
    loop {
        let notified = inner.updates_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut st = lock(&inner);
            if st.down {
                return;
            }
            let hook = st.webhook.clone();
            let first = hook
                .as_ref()
                .and_then(|_| st.collect_updates(1).into_iter().next());
            hook.zip(first)
        };
        let Some((hook, update)) = next else {
            notified.await;
            continue;
        };
        let id = update_id(&update);
        *lock(&inner).deliveries.entry(id).or_default() += 1;
        let body = update.to_string().into_bytes();
        let status = post(&client, &hook.url, hook.secret_token.as_deref(), body).await;
        if (200..300).contains(&status) {
            let mut st = lock(&inner);
            if st.updates.front().is_some_and(|u| update_id(u) == id) {
                st.updates.pop_front();
            }
            st.acked.push(id);
            st.pushed.insert(id, update);
            backoff = PUSH_BACKOFF.0;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(PUSH_BACKOFF.1);
        }
    }
}

/// One POST; the status, or 0 when the endpoint could not be reached.
async fn post(client: &reqwest::Client, url: &str, secret: Option<&str>, body: Vec<u8>) -> u16 {
    let mut req = client
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .timeout(Duration::from_secs(60))
        .body(body);
    if let Some(secret) = secret {
        req = req.header("X-Telegram-Bot-Api-Secret-Token", secret);
    }
    match req.send().await {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

impl FakeTelegram {
    /// The webhook as last registered (`None` without one, or after deleteWebhook).
    pub fn webhook(&self) -> Option<Webhook> {
        self.st().webhook.clone()
    }

    /// Every setWebhook call, in order.
    pub fn webhook_sets(&self) -> Vec<Webhook> {
        self.st().webhook_sets.clone()
    }

    /// Webhook POSTs of update `id` so far (redeliveries included).
    pub fn deliveries(&self, id: i64) -> usize {
        self.st().deliveries.get(&id).copied().unwrap_or(0)
    }

    /// Whether the webhook acknowledged update `id` (answered 2xx).
    pub fn acked(&self, id: i64) -> bool {
        self.st().acked.contains(&id)
    }

    /// Waits until update `id` is acknowledged; false after `limit`.
    pub async fn wait_acked(&self, id: i64, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if self.acked(id) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.acked(id)
    }

    /// Pushes an update that was already acknowledged once more (Telegram does that when
    /// it missed the answer). Returns false if `id` was never pushed.
    pub fn redeliver(&self, id: i64) -> bool {
        let mut st = self.st();
        let Some(update) = st.pushed.get(&id).cloned() else {
            return false;
        };
        let pos = st
            .updates
            .iter()
            .position(|u| update_id(u) > id)
            .unwrap_or(st.updates.len());
        st.updates.insert(pos, update);
        drop(st);
        self.inner.updates_changed.notify_waiters();
        true
    }

    /// POSTs `body` straight to the registered webhook with `secret` (not queued, not
    /// redelivered) and returns the status (0: unreachable; 404 without a webhook).
    pub async fn post_webhook(&self, body: &[u8], secret: Option<&str>) -> u16 {
        let Some(hook) = self.webhook() else {
            return 404;
        };
        post(&reqwest::Client::new(), &hook.url, secret, body.to_vec()).await
    }
}

// ---------------------------------------------------------------------------
// Media: voice notes, audio, photos and documents users send; getFile and downloads.

/// One media message a test injects (see [`FakeTelegram::send_media`]).
#[derive(Clone, Debug)]
pub struct MediaMsg {
    /// The message key: `voice`, `audio`, `video_note`, `photo` or `document`.
    pub kind: &'static str,
    pub bytes: Vec<u8>,
    /// Declared duration (voice, audio, video_note).
    pub duration: u32,
    pub mime: Option<String>,
    pub caption: Option<String>,
    /// Declared `file_size`; default the real length.
    pub declared_size: Option<u64>,
    /// A reply to this message of the bot.
    pub reply_to_bot: Option<i64>,
}

impl MediaMsg {
    /// A voice note (OGG/Opus) of `duration` seconds.
    pub fn voice(bytes: &[u8], duration: u32) -> MediaMsg {
        MediaMsg {
            kind: "voice",
            bytes: bytes.to_vec(),
            duration,
            mime: Some("audio/ogg".into()),
            caption: None,
            declared_size: None,
            reply_to_bot: None,
        }
    }

    /// A photo with an optional caption.
    pub fn photo(bytes: &[u8], caption: Option<&str>) -> MediaMsg {
        MediaMsg {
            kind: "photo",
            bytes: bytes.to_vec(),
            duration: 0,
            mime: None,
            caption: caption.map(str::to_string),
            declared_size: None,
            reply_to_bot: None,
        }
    }
}

impl FakeTelegram {
    /// A media message from `user_id` in `chat_id` (private when `private`, else a
    /// supergroup). Its file is served by `getFile` and the file URL. Returns the update id.
    pub fn send_media(
        &self,
        chat_id: i64,
        user_id: i64,
        first_name: &str,
        private: bool,
        m: MediaMsg,
    ) -> i64 {
        let mut st = self.st();
        let chat = if private {
            private_chat(chat_id, first_name)
        } else {
            group_chat(chat_id)
        };
        let id = st.take_message_id();
        let fid = st.take_file_id();
        let file_id = format!("{}-{fid}", m.kind);
        let path = format!("{}/file_{fid}", m.kind);
        let size = m.declared_size.unwrap_or(m.bytes.len() as u64);
        st.files.insert(file_id.clone(), (path, m.bytes.clone()));
        let mut file = json!({
            "file_id": file_id,
            "file_unique_id": format!("u{fid}"),
            "file_size": size,
        });
        match m.kind {
            "voice" | "audio" => file["duration"] = json!(m.duration),
            "video_note" => {
                file["duration"] = json!(m.duration);
                file["length"] = json!(240);
            }
            _ => {}
        }
        if let Some(mime) = &m.mime {
            file["mime_type"] = json!(mime);
        }
        let mut msg = json!({
            "message_id": id,
            "from": user_json(user_id, first_name),
            "date": now_unix(),
            "chat": chat.clone(),
        });
        if m.kind == "photo" {
            file["width"] = json!(64);
            file["height"] = json!(64);
            msg["photo"] = json!([file]);
        } else {
            msg[m.kind] = file;
        }
        if let Some(c) = &m.caption {
            msg["caption"] = json!(c);
            let entities = mention_entities(c, &st.bot_username);
            if !entities.is_empty() {
                msg["caption_entities"] = Value::Array(entities);
            }
        }
        if let Some(replied) = m.reply_to_bot {
            msg["reply_to_message"] = st.bot_message_json(chat_id, replied, &chat);
        }
        st.remember_message(&msg);
        self.push_update(st, json!({ "message": msg }))
    }

    /// File downloads served so far.
    pub fn downloads(&self) -> usize {
        self.st().downloads
    }
}

fn get_file(inner: &Shared, body: &Value) -> (u16, Value) {
    let id = str_field(body, "file_id").unwrap_or_default();
    let st = lock(inner);
    match st.files.get(&id) {
        Some((path, bytes)) => ok(json!({
            "file_id": id,
            "file_unique_id": format!("u-{id}"),
            "file_size": bytes.len(),
            "file_path": path,
        })),
        None => err(400, "Bad Request: invalid file_id"),
    }
}

/// `/file/bot<token>/<file_path>`: the file's bytes (a `download` fault answers instead).
fn download_file(inner: &Shared, rest: &str) -> Response {
    let mut st = lock(inner);
    let Some((token, path)) = rest.split_once('/') else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if token != st.token {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(f) = st.faults.get_mut("download").and_then(VecDeque::pop_front) {
        let (code, _) = fault_response(&f);
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        return status.into_response();
    }
    // teloxide pushes the file path as one URL segment: its `/` arrives as `%2F`.
    let path = path.replace("%2F", "/").replace("%2f", "/");
    let found = st
        .files
        .values()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| b.clone());
    match found {
        Some(bytes) => {
            st.downloads += 1;
            (StatusCode::OK, bytes).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// sendVoice: recorded as a sent message (`method` "sendvoice", the audio in `document`).
fn send_voice(inner: &Shared, body: &Value, upload: Option<Upload>) -> (u16, Value) {
    let Some(chat_id) = chat_id_of(body) else {
        return err(400, "Bad Request: chat not found");
    };
    let Some(upload) = upload.filter(|u| !u.data.is_empty()) else {
        return err(400, "Bad Request: there is no voice in the request");
    };
    let result = {
        let mut st = lock(inner);
        let id = st.take_message_id();
        let fid = st.take_file_id();
        let chat = st.chat_json(chat_id);
        let msg = json!({
            "message_id": id,
            "from": st.bot_user(),
            "date": now_unix(),
            "chat": chat,
            "voice": {
                "file_id": format!("bvoice-{fid}"),
                "file_unique_id": format!("ubvoice-{fid}"),
                "file_size": upload.data.len(),
                "duration": 1,
                "mime_type": "audio/ogg",
            },
        });
        st.remember_message(&msg);
        st.sent.push(SentMessage {
            method: "sendvoice".into(),
            chat_id,
            message_id: id,
            text: String::new(),
            parse_mode: None,
            reply_to: reply_to_of(body),
            reply_markup: None,
            file_name: upload.file_name,
            document: Some(upload.data),
        });
        msg
    };
    inner.sent_changed.notify_waiters();
    ok(result)
}
