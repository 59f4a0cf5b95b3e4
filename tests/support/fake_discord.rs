//! In-process fake of Discord's REST API and gateway, for integration tests.
//!
//! Include it with `#[path = "../support/fake_discord.rs"] mod fake_discord;`
//! and point serenity at it:
//!
//! ```text
//! let fake = FakeDiscord::start("tok", 1000, 4000).await;
//! let http = HttpBuilder::new("tok").proxy(&fake.api_url).ratelimiter_disabled(true).build();
//! let client = ClientBuilder::new_with_http(http, intents).event_handler(h).await?;
//! ```
//!
//! REST: serenity sends `http://127.0.0.1:PORT/api/v10/...`; every call is
//! recorded ([`FakeDiscord::calls`]), bot messages are recorded as
//! [`SentMessage`]s, and [`FakeDiscord::fail_next`] makes the next matching
//! call fail (e.g. a Discord-style 429). `Authorization: Bot <token>` is
//! checked (401 otherwise), except on `GET /gateway` (like Discord).
//!
//! Gateway: `GET /api/v10/gateway` answers `ws://127.0.0.1:PORT/gateway`;
//! the websocket sends HELLO, answers IDENTIFY with READY (op 2 with a wrong
//! token → close 4004), heartbeats with op 11, and RESUME (op 6) by replaying
//! every event after the client's sequence number, then RESUMED. Events the
//! tests inject (`send_dm`, `send_guild`, `send_interaction`, ...) get
//! increasing sequence numbers; while no session is connected they are queued
//! and delivered after the next RESUME (replay) or IDENTIFY (renumbered).
//!
//! The shared state is behind a std `Mutex` that is never held across an
//! await; each websocket connection has its own writer task fed by an
//! unbounded channel, so events are written in the order they were dispatched.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

/// Default heartbeat interval announced in HELLO (ms), Discord's usual value.
pub const HEARTBEAT_INTERVAL_MS: u64 = 41_250;
/// `attachment_size_limit` sent in interactions (serenity 0.12.5 requires it).
const ATTACHMENT_SIZE_LIMIT: u64 = 10 * 1024 * 1024;
/// MESSAGE_FLAGS EPHEMERAL.
const EPHEMERAL: u64 = 1 << 6;

/// One message the bot produced through REST.
#[derive(Clone, Debug)]
pub struct SentMessage {
    /// `"create"` (POST /channels/{id}/messages), `"edit"` (PATCH of a channel
    /// message or of an interaction's original / follow-up message),
    /// `"followup"` (POST /webhooks/{app}/{token}) or `"callback"` (interaction
    /// callback of type 4 or 7 carrying a message).
    pub kind: String,
    pub channel_id: u64,
    /// The created message's id; for edits the edited message; for a type 4
    /// callback the interaction's original message; for type 7 the component's message.
    pub message_id: u64,
    /// `content` of the body; for an edit without `content`, the previous content.
    pub content: String,
    /// A file part was uploaded (multipart/form-data).
    pub has_attachment: bool,
    /// File name of the first uploaded file.
    pub attachment_name: Option<String>,
    /// `components` of the body, if present.
    pub components: Option<Value>,
    /// Set for callbacks, follow-ups and edits of interaction messages.
    pub interaction_id: Option<u64>,
    /// `message_reference.message_id` of the body (a reply), if any.
    pub reply_to: Option<u64>,
    /// `flags` of the body contain EPHEMERAL (64).
    pub ephemeral: bool,
}

/// One REST call as received by the fake.
#[derive(Clone, Debug)]
pub struct ApiCall {
    pub method: String,
    /// Full path without the query, e.g. `/api/v10/channels/5/messages`.
    pub path: String,
    /// JSON body; for multipart the parsed `payload_json`; `Null` if none.
    pub body: Value,
    /// Status the fake answered with.
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
}

struct Identity {
    bot_id: u64,
    username: String,
    app_id: u64,
}

struct InteractionInfo {
    id: u64,
    channel_id: u64,
    guild_id: Option<u64>,
    /// Message created by the initial response (type 4/5) or `@original` edits.
    original_msg: Option<u64>,
    /// For component interactions: the message the component belongs to.
    source_msg: Option<u64>,
    responded: bool,
    created: Instant,
}

struct ChannelInfo {
    guild_id: Option<u64>,
    /// DM recipient (user id, username).
    recipient: Option<(u64, String)>,
}

#[derive(Clone)]
struct FailRule {
    method: String,
    path_contains: String,
    status: u16,
    body: Value,
    retry_after: Option<f64>,
    /// A rule for every matching call until then ([`FakeDiscord::fail_for`]), not once.
    until: Option<Instant>,
    /// A global 429: `"global": true` and `X-RateLimit-Global` / `-Scope: global`.
    global: bool,
}

enum Out {
    Text(String),
    Close(u16, String),
    /// Drop the TCP connection without a close frame.
    Abort,
}

struct FakeState {
    /// Token without the `Bot ` prefix.
    token: String,
    identity: Identity,
    gateway_url: String,
    heartbeat_ms: u64,
    heartbeats: usize,
    next_id: u64,
    down: bool,
    verbose: bool,

    // gateway
    conns: HashMap<u64, mpsc::UnboundedSender<Out>>,
    next_conn: u64,
    /// Connection of the current session that got READY / RESUMED.
    active: Option<u64>,
    sessions: u64,
    session_id: Option<String>,
    seq: u64,
    /// Every dispatch of the current session: (seq, serialized payload).
    log: Vec<(u64, String)>,
    /// Dispatched while no session was connected: re-sent after an IDENTIFY.
    orphans: Vec<(String, Value)>,
    identify_count: usize,
    /// The `shard` array of every IDENTIFY, in order (`[0, 1]` when it had none).
    identified_shards: Vec<[u64; 2]>,
    /// The shard each connection identified as, and that connection's own sequence
    /// (for dispatches sent to one shard, see [`FakeDiscord::send_guild_on_shard`]).
    conn_shards: HashMap<u64, (u64, u64)>,
    /// What `GET /gateway/bot` recommends.
    recommended_shards: u64,
    resume_count: usize,
    refuse_resume: bool,
    echo_own: bool,

    // REST
    messages: Vec<SentMessage>,
    /// Every message object known (sent by the bot or injected), by id.
    store: HashMap<u64, Value>,
    typing: HashMap<u64, usize>,
    commands: Vec<Value>,
    interaction_responses: Vec<(u64, Value)>,
    calls: Vec<ApiCall>,
    fail_rules: Vec<FailRule>,
    /// Interactions by token.
    interactions: HashMap<String, InteractionInfo>,
    channels: HashMap<u64, ChannelInfo>,
    usernames: HashMap<u64, String>,
    callback_deadline: Option<Duration>,
    /// Users who accept no DMs from the bot (see [`FakeDiscord::refuse_dms`]).
    refused_dms: Vec<u64>,
    /// Files users attached, by URL path (`/attachments/<channel>/<id>/<name>`).
    attachments: HashMap<String, Vec<u8>>,
}

type Shared = Arc<Mutex<FakeState>>;

fn lock(state: &Shared) -> MutexGuard<'_, FakeState> {
    // A panicking test thread must not poison the fake for everyone else.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeState {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn bot_user(&self) -> Value {
        user_json(self.identity.bot_id, &self.identity.username, true)
    }

    fn username_of(&self, user_id: u64) -> String {
        self.usernames
            .get(&user_id)
            .cloned()
            .unwrap_or_else(|| format!("user{user_id}"))
    }

    /// Send one dispatch (op 0) with the next sequence number.
    fn dispatch(&mut self, t: &str, d: Value) {
        if self.session_id.is_none() || self.active.is_none() {
            if self.session_id.is_some() {
                // Part of the session: a RESUME replays it from the log.
                self.seq += 1;
                let text = json!({"op": 0, "s": self.seq, "t": t, "d": d.clone()}).to_string();
                self.log.push((self.seq, text));
            }
            self.orphans.push((t.to_string(), d));
            return;
        }
        self.seq += 1;
        let text = json!({"op": 0, "s": self.seq, "t": t, "d": d}).to_string();
        self.log.push((self.seq, text.clone()));
        let sent = self
            .active
            .and_then(|id| self.conns.get(&id))
            .map(|tx| tx.send(Out::Text(text)).is_ok())
            .unwrap_or(false);
        if !sent {
            // The connection is gone: a RESUME will replay it from the log.
            self.active = None;
        }
        if self.verbose {
            eprintln!("fake_discord: dispatch s={} {t}", self.seq);
        }
    }

    fn remember_user(&mut self, user_id: u64, username: &str) {
        self.usernames.insert(user_id, username.to_string());
    }
}

/// Handle to a running fake Discord. Dropping the last clone shuts it down.
#[derive(Clone)]
pub struct FakeDiscord {
    /// `http://127.0.0.1:PORT` (give it to `HttpBuilder::proxy`).
    pub api_url: String,
    pub addr: SocketAddr,
    state: Shared,
    stop: Arc<Mutex<Option<watch::Sender<bool>>>>,
}

impl FakeDiscord {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime. `token` may
    /// be given with or without the `Bot ` prefix.
    pub async fn start(token: &str, bot_user_id: u64, application_id: u64) -> FakeDiscord {
        let token = token.strip_prefix("Bot ").unwrap_or(token).to_string();
        let state: Shared = Arc::new(Mutex::new(FakeState {
            token,
            identity: Identity {
                bot_id: bot_user_id,
                username: "fakebot".to_string(),
                app_id: application_id,
            },
            gateway_url: String::new(),
            heartbeat_ms: HEARTBEAT_INTERVAL_MS,
            heartbeats: 0,
            next_id: 1_200_000_000_000_000_000,
            down: false,
            verbose: false,
            conns: HashMap::new(),
            next_conn: 0,
            active: None,
            sessions: 0,
            session_id: None,
            seq: 0,
            log: Vec::new(),
            orphans: Vec::new(),
            identify_count: 0,
            identified_shards: Vec::new(),
            conn_shards: HashMap::new(),
            recommended_shards: 1,
            resume_count: 0,
            refuse_resume: false,
            echo_own: false,
            messages: Vec::new(),
            store: HashMap::new(),
            typing: HashMap::new(),
            commands: Vec::new(),
            interaction_responses: Vec::new(),
            calls: Vec::new(),
            fail_rules: Vec::new(),
            interactions: HashMap::new(),
            channels: HashMap::new(),
            usernames: HashMap::new(),
            callback_deadline: None,
            refused_dms: Vec::new(),
            attachments: HashMap::new(),
        }));
        let (addr, stop) = spawn_server(SocketAddr::from(([127, 0, 0, 1], 0)), state.clone())
            .expect("fake_discord: cannot bind 127.0.0.1:0");
        FakeDiscord {
            api_url: format!("http://{addr}"),
            addr,
            state,
            stop: Arc::new(Mutex::new(Some(stop))),
        }
    }

    /// What `/users/@me`, `/applications/@me` and later READYs report.
    pub fn set_identity(&self, bot_user_id: u64, username: &str, application_id: u64) {
        let mut st = lock(&self.state);
        st.identity = Identity {
            bot_id: bot_user_id,
            username: username.to_string(),
            app_id: application_id,
        };
    }

    /// Print dispatches and REST calls to stderr.
    pub fn set_verbose(&self, on: bool) {
        lock(&self.state).verbose = on;
    }

    /// Like Discord, also dispatch MESSAGE_CREATE for the bot's own messages
    /// (created messages and follow-ups). Off by default.
    pub fn set_echo_own_messages(&self, on: bool) {
        lock(&self.state).echo_own = on;
    }

    /// Like Discord's 3 s rule: an interaction callback arriving later than
    /// this after the interaction was sent fails with 404 "Unknown interaction"
    /// (code 10062). Off (`None`) by default.
    pub fn set_callback_deadline(&self, deadline: Option<Duration>) {
        lock(&self.state).callback_deadline = deadline;
    }

    /// Heartbeat interval announced in the HELLO of later connections
    /// (default [`HEARTBEAT_INTERVAL_MS`]).
    pub fn set_heartbeat_interval(&self, ms: u64) {
        lock(&self.state).heartbeat_ms = ms;
    }

    // -----------------------------------------------------------------------
    // Gateway

    /// Heartbeats (op 1) received so far (each answered with op 11).
    pub fn heartbeat_count(&self) -> usize {
        lock(&self.state).heartbeats
    }

    /// True once a session is connected: it IDENTIFIED and was sent READY, or
    /// RESUMED and was sent RESUMED, and its connection is still open.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if lock(&self.state).active.is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.state).active.is_some()
    }

    pub fn identify_count(&self) -> usize {
        lock(&self.state).identify_count
    }

    pub fn resume_count(&self) -> usize {
        lock(&self.state).resume_count
    }

    /// Current gateway session id (`sess-N`), once identified.
    pub fn session_id(&self) -> Option<String> {
        lock(&self.state).session_id.clone()
    }

    /// Sequence number of the last dispatch.
    pub fn last_seq(&self) -> u64 {
        lock(&self.state).seq
    }

    /// What `GET /gateway/bot` recommends as the shard count from now on (default 1).
    pub fn set_recommended_shards(&self, n: u64) {
        lock(&self.state).recommended_shards = n;
    }

    /// The `shard` array (`[id, total]`) of every IDENTIFY so far, in order.
    pub fn identified_shards(&self) -> Vec<[u64; 2]> {
        lock(&self.state).identified_shards.clone()
    }

    /// Waits until `n` IDENTIFYs arrived; returns their shard arrays.
    pub async fn wait_identified(&self, n: usize, timeout: Duration) -> Vec<[u64; 2]> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.identified_shards().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.identified_shards()
    }

    /// MESSAGE_CREATE mentioning the bot in a guild channel, sent only on the connection
    /// of `shard` (as Discord routes a guild's events to one shard), with that
    /// connection's own sequence numbers. `false` if no connection identified as `shard`.
    pub fn send_guild_on_shard(
        &self,
        shard: u64,
        guild_id: u64,
        channel_id: u64,
        user_id: u64,
        username: &str,
        content: &str,
    ) -> bool {
        let mut st = lock(&self.state);
        let Some((&conn, &(_, seq))) = st
            .conn_shards
            .iter()
            .filter(|(_, (s, _))| *s == shard)
            .max_by_key(|(c, _)| **c)
        else {
            return false;
        };
        let bot_id = st.identity.bot_id;
        let content = format!("<@{bot_id}> {content}");
        let mut msg = guild_message(&mut st, guild_id, channel_id, user_id, username, &content);
        let mut bot = st.bot_user();
        bot["member"] = partial_member_json();
        msg["mentions"] = json!([bot]);
        st.store.insert(msg_id(&msg), msg.clone());
        st.conn_shards.insert(conn, (shard, seq + 1));
        let text = json!({"op": 0, "s": seq + 1, "t": "MESSAGE_CREATE", "d": msg}).to_string();
        st.conns
            .get(&conn)
            .is_some_and(|tx| tx.send(Out::Text(text)).is_ok())
    }

    /// MESSAGE_CREATE in a DM channel (no `guild_id`). Returns the message id.
    pub fn send_dm(&self, channel_id: u64, user_id: u64, username: &str, content: &str) -> u64 {
        let mut st = lock(&self.state);
        st.remember_user(user_id, username);
        st.channels.insert(
            channel_id,
            ChannelInfo {
                guild_id: None,
                recipient: Some((user_id, username.to_string())),
            },
        );
        let id = st.new_id();
        let msg = message_json(id, channel_id, user_json(user_id, username, false), content);
        st.store.insert(id, msg.clone());
        st.dispatch("MESSAGE_CREATE", msg);
        id
    }

    /// MESSAGE_CREATE in a guild channel (with `guild_id` and `member`). With
    /// `mention_bot`, `mentions` holds the bot user and `<@BOT_ID> ` is
    /// prepended to the content unless it already mentions the bot.
    pub fn send_guild(
        &self,
        guild_id: u64,
        channel_id: u64,
        user_id: u64,
        username: &str,
        content: &str,
        mention_bot: bool,
    ) -> u64 {
        let mut st = lock(&self.state);
        let bot_id = st.identity.bot_id;
        let content = if mention_bot
            && !content.contains(&format!("<@{bot_id}>"))
            && !content.contains(&format!("<@!{bot_id}>"))
        {
            format!("<@{bot_id}> {content}")
        } else {
            content.to_string()
        };
        let mut msg = guild_message(&mut st, guild_id, channel_id, user_id, username, &content);
        if mention_bot {
            let mut bot = st.bot_user();
            bot["member"] = partial_member_json();
            msg["mentions"] = json!([bot]);
        }
        let id = msg_id(&msg);
        st.store.insert(id, msg.clone());
        st.dispatch("MESSAGE_CREATE", msg);
        id
    }

    /// MESSAGE_CREATE (type 19, reply) in a guild channel whose
    /// `message_reference` / `referenced_message` point at a bot message
    /// (`replied_message_id`; its content is taken from the record if known).
    /// `mentions` stays empty (a reply without ping).
    pub fn send_guild_reply_to_bot(
        &self,
        guild_id: u64,
        channel_id: u64,
        user_id: u64,
        username: &str,
        content: &str,
        replied_message_id: u64,
    ) -> u64 {
        let mut st = lock(&self.state);
        let mut msg = guild_message(&mut st, guild_id, channel_id, user_id, username, content);
        let referenced = match st.store.get(&replied_message_id) {
            Some(m) => m.clone(),
            None => message_json(
                replied_message_id,
                channel_id,
                st.bot_user(),
                "(earlier bot message)",
            ),
        };
        msg["type"] = json!(19);
        msg["message_reference"] = json!({
            "type": 0,
            "message_id": replied_message_id.to_string(),
            "channel_id": channel_id.to_string(),
            "guild_id": guild_id.to_string(),
        });
        msg["referenced_message"] = referenced;
        let id = msg_id(&msg);
        st.store.insert(id, msg.clone());
        st.dispatch("MESSAGE_CREATE", msg);
        id
    }

    /// INTERACTION_CREATE of type 2 (slash command). `options` is either
    /// Discord's array (`[{"name":"prompt","type":3,"value":"hi"}]`), an object
    /// shorthand (`{"prompt":"hi"}`: type inferred string 3 / integer 4 /
    /// boolean 5 / number 10) or `Null`. In a guild (`Some(guild_id)`) the user
    /// comes as `member`, otherwise as `user` (DM). Returns the interaction id;
    /// its token is `itok-<id>`.
    pub fn send_interaction(
        &self,
        name: &str,
        options: Value,
        user_id: u64,
        username: &str,
        channel_id: u64,
        guild_id: Option<u64>,
    ) -> u64 {
        let mut st = lock(&self.state);
        st.remember_user(user_id, username);
        st.channels.entry(channel_id).or_insert(ChannelInfo {
            guild_id,
            recipient: if guild_id.is_none() {
                Some((user_id, username.to_string()))
            } else {
                None
            },
        });
        let id = st.new_id();
        let token = format!("itok-{id}");
        let command_id = st
            .commands
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["id"].as_str().and_then(|s| s.parse::<u64>().ok()))
            .unwrap_or_else(|| st.new_id());
        let mut d = interaction_base(&st, id, &token, user_id, username, channel_id, guild_id);
        d["type"] = json!(2);
        d["data"] = json!({
            "id": command_id.to_string(),
            "name": name,
            "type": 1,
            "options": normalize_options(options),
        });
        st.interactions.insert(
            token,
            InteractionInfo {
                id,
                channel_id,
                guild_id,
                original_msg: None,
                source_msg: None,
                responded: false,
                created: Instant::now(),
            },
        );
        st.dispatch("INTERACTION_CREATE", d);
        id
    }

    /// INTERACTION_CREATE of type 3 (button click) on message `message_id`
    /// (taken from the record if the bot sent it). Guild or DM context is
    /// taken from what is known about `channel_id`; the username from earlier
    /// events of `user_id` (else `user<ID>`). Returns the interaction id
    /// (token `itok-<id>`).
    pub fn send_component_interaction(
        &self,
        custom_id: &str,
        user_id: u64,
        channel_id: u64,
        message_id: u64,
    ) -> u64 {
        let mut st = lock(&self.state);
        let username = st.username_of(user_id);
        let guild_id = st.channels.get(&channel_id).and_then(|c| c.guild_id);
        let id = st.new_id();
        let token = format!("itok-{id}");
        let message = match st.store.get(&message_id) {
            Some(m) => m.clone(),
            None => message_json(message_id, channel_id, st.bot_user(), ""),
        };
        let mut d = interaction_base(&st, id, &token, user_id, &username, channel_id, guild_id);
        d["type"] = json!(3);
        d["data"] = json!({"custom_id": custom_id, "component_type": 2});
        d["message"] = message;
        st.interactions.insert(
            token,
            InteractionInfo {
                id,
                channel_id,
                guild_id,
                original_msg: None,
                source_msg: Some(message_id),
                responded: false,
                created: Instant::now(),
            },
        );
        st.dispatch("INTERACTION_CREATE", d);
        id
    }

    /// Dispatch any event (`t`, `d`) with the next sequence number.
    pub fn send_raw_event(&self, t: &str, d: Value) {
        lock(&self.state).dispatch(t, d);
    }

    /// Drop the current gateway connection abruptly (TCP closed, no close
    /// frame). serenity reconnects and RESUMEs; events sent meanwhile are
    /// replayed after the resume, in order.
    pub fn drop_connection(&self) {
        self.end_connection(Out::Abort);
    }

    /// Close the current gateway connection with a close frame `code`
    /// (4000 = unknown error: serenity resumes; 4004 = authentication failed).
    pub fn close_connection(&self, code: u16) {
        self.end_connection(Out::Close(code, "fake_discord close".to_string()));
    }

    /// Refuse the next RESUME with op 9 (invalid session, not resumable):
    /// serenity then IDENTIFYs again (after its ~5 s shard restart); events
    /// queued meanwhile are delivered after the new READY. Does not itself
    /// disconnect: combine with [`drop_connection`](Self::drop_connection).
    pub fn invalidate_session(&self) {
        lock(&self.state).refuse_resume = true;
    }

    fn end_connection(&self, how: Out) {
        let mut st = lock(&self.state);
        if let Some(id) = st.active.take() {
            if let Some(tx) = st.conns.remove(&id) {
                let _ = tx.send(how);
            }
        }
    }

    // -----------------------------------------------------------------------
    // REST record

    /// Every message produced by the bot, in arrival order.
    pub fn messages(&self) -> Vec<SentMessage> {
        lock(&self.state).messages.clone()
    }

    pub fn messages_in(&self, channel_id: u64) -> Vec<SentMessage> {
        lock(&self.state)
            .messages
            .iter()
            .filter(|m| m.channel_id == channel_id)
            .cloned()
            .collect()
    }

    /// Waits until at least `n` messages were recorded (or the timeout), and
    /// returns all of them.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n || Instant::now() >= deadline {
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn clear_messages(&self) {
        lock(&self.state).messages.clear();
    }

    pub fn typing_count(&self, channel_id: u64) -> usize {
        lock(&self.state)
            .typing
            .get(&channel_id)
            .copied()
            .unwrap_or(0)
    }

    /// Body of the last `PUT /applications/{app}/commands` (plus commands
    /// created one by one with POST), as echoed back (with ids).
    pub fn registered_commands(&self) -> Vec<Value> {
        lock(&self.state).commands.clone()
    }

    /// Every interaction callback: (interaction id, body).
    pub fn interaction_responses(&self) -> Vec<(u64, Value)> {
        lock(&self.state).interaction_responses.clone()
    }

    pub fn calls(&self) -> Vec<ApiCall> {
        lock(&self.state).calls.clone()
    }

    /// `data.flags` of the interaction's callback (0 when absent), if it was answered.
    pub fn callback_flags(&self, interaction_id: u64) -> Option<u64> {
        lock(&self.state)
            .interaction_responses
            .iter()
            .find(|(id, _)| *id == interaction_id)
            .map(|(_, body)| body["data"]["flags"].as_u64().unwrap_or(0))
    }

    /// The DM channel the bot opened with `user_id` (POST /users/@me/channels) or
    /// that the user wrote from, if any.
    pub fn dm_channel_of(&self, user_id: u64) -> Option<u64> {
        lock(&self.state)
            .channels
            .iter()
            .find(|(_, c)| {
                c.guild_id.is_none() && c.recipient.as_ref().map(|r| r.0) == Some(user_id)
            })
            .map(|(id, _)| *id)
    }

    /// From now on, messages to `user_id`'s DM channel fail like Discord does for a
    /// user who allows no DMs: 403 `Cannot send messages to this user` (code 50007).
    pub fn refuse_dms(&self, user_id: u64) {
        lock(&self.state).refused_dms.push(user_id);
    }

    /// The next REST call whose method matches (case-insensitive; `"*"` = any)
    /// and whose path contains `path_contains` fails with `status`. `body`
    /// `Null` means a Discord-style default: for 429
    /// `{"message":"You are being rate limited.","retry_after":X,"global":false,"code":0}`
    /// (X = `retry_after`, default 1.0) with `Retry-After` and `X-RateLimit-*`
    /// headers; otherwise `{"message":"<status text>","code":0}`. Rules stack
    /// and each is used once.
    pub fn fail_next(
        &self,
        method: &str,
        path_contains: &str,
        status: u16,
        body: Value,
        retry_after: Option<f64>,
    ) {
        lock(&self.state).fail_rules.push(FailRule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            status,
            body,
            retry_after,
            until: None,
            global: false,
        });
    }

    /// Every REST call matching like [`fail_next`](Self::fail_next) fails with
    /// `status` for the next `duration` (an outage while the daemon runs).
    pub fn fail_for(&self, method: &str, path_contains: &str, status: u16, duration: Duration) {
        lock(&self.state).fail_rules.push(FailRule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            status,
            body: Value::Null,
            retry_after: None,
            until: Some(Instant::now() + duration),
            global: false,
        });
    }

    /// The next matching call gets a global 429 (`retry_after` seconds, body and
    /// headers): Discord's "the whole bot is rate limited".
    pub fn fail_next_global(&self, method: &str, path_contains: &str, retry_after: f64) {
        lock(&self.state).fail_rules.push(FailRule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            status: 429,
            body: Value::Null,
            retry_after: Some(retry_after),
            until: None,
            global: true,
        });
    }

    /// Close the listener, every websocket, and answer any REST call that
    /// still arrives with 503.
    pub fn shutdown(&self) {
        {
            let mut st = lock(&self.state);
            st.down = true;
            st.active = None;
            for (_, tx) in st.conns.drain() {
                let _ = tx.send(Out::Abort);
            }
        }
        if let Some(tx) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(true);
        }
    }
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        // Only the last handle stops the server.
        if Arc::strong_count(&self.stop) == 1 {
            self.shutdown();
        }
    }
}

fn spawn_server(
    addr: SocketAddr,
    state: Shared,
) -> std::io::Result<(SocketAddr, watch::Sender<bool>)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let local = listener.local_addr()?;
    lock(&state).gateway_url = format!("ws://{local}/gateway");

    let app = Router::new()
        .route("/gateway", get(gateway_ws))
        .fallback(rest)
        .with_state(state);

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

fn now_iso() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m as u32,
        d as u32,
    )
}

fn user_json(id: u64, username: &str, bot: bool) -> Value {
    json!({
        "id": id.to_string(),
        "username": username,
        "discriminator": "0",
        "global_name": if bot { Value::Null } else { json!(username) },
        "avatar": null,
        "bot": bot,
        "public_flags": 0,
    })
}

fn partial_member_json() -> Value {
    json!({
        "roles": [],
        "joined_at": "2024-01-01T00:00:00.000000+00:00",
        "deaf": false,
        "mute": false,
        "flags": 0,
        "nick": null,
        "avatar": null,
        "premium_since": null,
        "pending": false,
    })
}

/// A complete Message object (every field serenity 0.12.5 requires).
fn message_json(id: u64, channel_id: u64, author: Value, content: &str) -> Value {
    json!({
        "id": id.to_string(),
        "channel_id": channel_id.to_string(),
        "author": author,
        "content": content,
        "timestamp": now_iso(),
        "edited_timestamp": null,
        "tts": false,
        "mention_everyone": false,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "reactions": [],
        "pinned": false,
        "type": 0,
        "flags": 0,
        "components": [],
    })
}

fn msg_id(msg: &Value) -> u64 {
    msg["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn guild_message(
    st: &mut FakeState,
    guild_id: u64,
    channel_id: u64,
    user_id: u64,
    username: &str,
    content: &str,
) -> Value {
    st.remember_user(user_id, username);
    st.channels.insert(
        channel_id,
        ChannelInfo {
            guild_id: Some(guild_id),
            recipient: None,
        },
    );
    let id = st.new_id();
    let mut msg = message_json(id, channel_id, user_json(user_id, username, false), content);
    msg["guild_id"] = json!(guild_id.to_string());
    msg["member"] = partial_member_json();
    msg
}

/// Fields common to every interaction (type and data are added by the caller).
fn interaction_base(
    st: &FakeState,
    id: u64,
    token: &str,
    user_id: u64,
    username: &str,
    channel_id: u64,
    guild_id: Option<u64>,
) -> Value {
    let user = user_json(user_id, username, false);
    let mut d = json!({
        "id": id.to_string(),
        "application_id": st.identity.app_id.to_string(),
        "channel_id": channel_id.to_string(),
        "token": token,
        "version": 1,
        "app_permissions": "0",
        "locale": "en-US",
        "entitlements": [],
        "authorizing_integration_owners": {},
        "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
    });
    match guild_id {
        Some(g) => {
            let mut member = partial_member_json();
            member["user"] = user;
            member["permissions"] = json!("0");
            d["member"] = member;
            d["guild_id"] = json!(g.to_string());
            d["guild_locale"] = json!("en-US");
            d["context"] = json!(0);
            d["channel"] = json!({"id": channel_id.to_string(), "type": 0, "name": format!("channel-{channel_id}"), "guild_id": g.to_string()});
        }
        None => {
            d["user"] = user.clone();
            d["context"] = json!(1);
            d["channel"] = json!({"id": channel_id.to_string(), "type": 1, "recipients": [user]});
        }
    }
    d
}

fn normalize_options(options: Value) -> Value {
    match options {
        Value::Null => json!([]),
        Value::Array(a) => Value::Array(a),
        Value::Object(map) => Value::Array(
            map.into_iter()
                .map(|(name, value)| {
                    let kind = match &value {
                        Value::Bool(_) => 5,
                        Value::Number(n) if n.is_i64() || n.is_u64() => 4,
                        Value::Number(_) => 10,
                        _ => 3,
                    };
                    json!({"name": name, "type": kind, "value": value})
                })
                .collect(),
        ),
        other => json!([{"name": "value", "type": 3, "value": other}]),
    }
}

// ---------------------------------------------------------------------------
// Gateway

async fn gateway_ws(State(state): State<Shared>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| run_connection(state, socket))
}

async fn run_connection(state: Shared, socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let (conn_id, heartbeat_ms) = {
        let mut st = lock(&state);
        if st.down {
            return;
        }
        st.next_conn += 1;
        let id = st.next_conn;
        st.conns.insert(id, tx.clone());
        (id, st.heartbeat_ms)
    };
    let _ = tx.send(Out::Text(
        json!({"op": 10, "s": null, "t": null, "d": {"heartbeat_interval": heartbeat_ms}})
            .to_string(),
    ));
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Text(text)) => {
                    if sink.send(WsMessage::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(Out::Close(code, reason)) => {
                    let frame = CloseFrame { code, reason: reason.into() };
                    let _ = sink.send(WsMessage::Close(Some(frame))).await;
                    break;
                }
                Some(Out::Abort) | None => break,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(WsMessage::Text(text))) => handle_op(&state, conn_id, &tx, text.as_str()),
                Some(Ok(WsMessage::Binary(_))) | Some(Ok(WsMessage::Ping(_))) | Some(Ok(WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
            },
        }
    }
    let mut st = lock(&state);
    st.conns.remove(&conn_id);
    st.conn_shards.remove(&conn_id);
    if st.active == Some(conn_id) {
        st.active = None;
    }
    // Dropping sink + stream closes the TCP connection.
}

fn handle_op(state: &Shared, conn_id: u64, tx: &mpsc::UnboundedSender<Out>, text: &str) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        let _ = tx.send(Out::Close(4002, "Error while decoding payload.".into()));
        return;
    };
    let mut st = lock(state);
    if st.verbose {
        eprintln!("fake_discord: gateway <- op {}", v["op"]);
    }
    let token_ok = |st: &FakeState, d: &Value| {
        let t = d["token"].as_str().unwrap_or("");
        t.strip_prefix("Bot ").unwrap_or(t) == st.token
    };
    match v["op"].as_u64() {
        Some(1) => {
            st.heartbeats += 1;
            let _ = tx.send(Out::Text(json!({"op": 11}).to_string()));
        }
        Some(2) => {
            if !token_ok(&st, &v["d"]) {
                let _ = tx.send(Out::Close(4004, "Authentication failed.".into()));
                return;
            }
            st.identify_count += 1;
            let shard = match v["d"]["shard"].as_array().map(Vec::as_slice) {
                Some([id, total]) => [id.as_u64().unwrap_or(0), total.as_u64().unwrap_or(1)],
                _ => [0, 1],
            };
            st.identified_shards.push(shard);
            st.conn_shards.insert(conn_id, (shard[0], 1));
            st.sessions += 1;
            let session_id = format!("sess-{}", st.sessions);
            st.session_id = Some(session_id.clone());
            st.seq = 1;
            let ready = json!({
                "op": 0, "s": 1, "t": "READY",
                "d": {
                    "v": 10,
                    "user": {
                        "id": st.identity.bot_id.to_string(),
                        "username": st.identity.username,
                        "discriminator": "0",
                        "global_name": null,
                        "avatar": null,
                        "bot": true,
                        "verified": true,
                        "mfa_enabled": false,
                        "flags": 0,
                    },
                    "guilds": [],
                    "session_id": session_id,
                    "resume_gateway_url": st.gateway_url,
                    "shard": shard,
                    "application": {"id": st.identity.app_id.to_string(), "flags": 0},
                    "private_channels": [],
                }
            })
            .to_string();
            st.log = vec![(1, ready.clone())];
            let _ = tx.send(Out::Text(ready));
            st.active = Some(conn_id);
            // Events injected while nobody was connected.
            let orphans = std::mem::take(&mut st.orphans);
            for (t, d) in orphans {
                st.dispatch(&t, d);
            }
        }
        Some(6) => {
            let d = &v["d"];
            if !token_ok(&st, d) {
                let _ = tx.send(Out::Close(4004, "Authentication failed.".into()));
                return;
            }
            let same_session =
                st.session_id.is_some() && d["session_id"].as_str() == st.session_id.as_deref();
            if !same_session || st.refuse_resume {
                st.refuse_resume = false;
                let _ = tx.send(Out::Text(json!({"op": 9, "d": false}).to_string()));
                return;
            }
            st.resume_count += 1;
            let from = d["seq"].as_u64().unwrap_or(0);
            for (s, text) in st.log.iter() {
                if *s > from {
                    let _ = tx.send(Out::Text(text.clone()));
                }
            }
            let resumed =
                json!({"op": 0, "s": st.seq, "t": "RESUMED", "d": {"_trace": ["fake_discord"]}});
            let _ = tx.send(Out::Text(resumed.to_string()));
            st.orphans.clear();
            st.active = Some(conn_id);
        }
        // 3 presence update, 4 voice state, 8 request guild members: ignored.
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// REST

fn json_response(status: u16, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn no_content() -> (u16, Option<Value>) {
    (204, None)
}

fn error(status: u16, message: &str, code: u64) -> (u16, Option<Value>) {
    (status, Some(json!({"message": message, "code": code})))
}

/// The parsed request body: JSON (or `payload_json` of a multipart body) and
/// the uploaded file names.
struct ParsedBody {
    json: Value,
    files: Vec<String>,
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> ParsedBody {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ctype.starts_with("multipart/form-data") {
        if let Some(boundary) = ctype
            .split(';')
            .map(str::trim)
            .find_map(|p| p.strip_prefix("boundary="))
        {
            return parse_multipart(body, boundary.trim_matches('"'));
        }
    }
    ParsedBody {
        json: serde_json::from_slice(body).unwrap_or(Value::Null),
        files: Vec::new(),
    }
}

/// Minimal multipart/form-data scan: finds `payload_json` and the file names.
fn parse_multipart(body: &[u8], boundary: &str) -> ParsedBody {
    let mut out = ParsedBody {
        json: Value::Null,
        files: Vec::new(),
    };
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut parts = Vec::new();
    let mut pos = 0;
    let mut starts = Vec::new();
    while let Some(i) = find(&body[pos..], delim) {
        starts.push(pos + i);
        pos += i + delim.len();
    }
    for w in starts.windows(2) {
        parts.push(&body[w[0] + delim.len()..w[1]]);
    }
    for part in parts {
        let Some(hend) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..hend]).to_string();
        let mut content = &part[hend + 4..];
        if content.ends_with(b"\r\n") {
            content = &content[..content.len() - 2];
        }
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .unwrap_or("");
        let param = |key: &str| -> Option<String> {
            let pat = format!("{key}=\"");
            let start = disposition.find(&pat)? + pat.len();
            let end = disposition[start..].find('"')? + start;
            Some(disposition[start..end].to_string())
        };
        if let Some(filename) = param("filename") {
            out.files.push(filename);
        } else if param("name").as_deref() == Some("payload_json") {
            out.json = serde_json::from_slice(content).unwrap_or(Value::Null);
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_u64(s: &str) -> Option<u64> {
    s.parse().ok()
}

async fn rest(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let parsed = parse_body(&headers, &body);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();

    let mut st = lock(&state);
    if st.down {
        let mut resp = json_response(
            503,
            &json!({"message": "fake_discord is shut down", "code": 0}),
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }

    // Scripted failure?
    let now = Instant::now();
    st.fail_rules
        .retain(|r| r.until.is_none_or(|until| until > now));
    let rule = st.fail_rules.iter().position(|r| {
        (r.method == "*" || r.method.eq_ignore_ascii_case(method.as_str()))
            && path.contains(&r.path_contains)
    });
    if let Some(i) = rule {
        let r = if st.fail_rules[i].until.is_some() {
            st.fail_rules[i].clone()
        } else {
            st.fail_rules.remove(i)
        };
        let retry = r.retry_after.unwrap_or(1.0);
        let body = if !r.body.is_null() {
            r.body
        } else if r.status == 429 {
            json!({"message": "You are being rate limited.", "retry_after": retry, "global": r.global, "code": 0})
        } else {
            let reason = StatusCode::from_u16(r.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error");
            json!({"message": format!("{}: {reason}", r.status), "code": 0})
        };
        st.calls.push(ApiCall {
            method: method.to_string(),
            path: path.clone(),
            body: parsed.json,
            status: r.status,
            at: now,
        });
        if st.verbose {
            eprintln!("fake_discord: {method} {path} -> {} (scripted)", r.status);
        }
        let mut resp = json_response(r.status, &body);
        if r.status == 429 || r.retry_after.is_some() {
            let h = resp.headers_mut();
            let secs = format!("{retry}");
            let ceil = format!("{}", retry.ceil() as u64);
            h.insert("retry-after", HeaderValue::from_str(&ceil).unwrap());
            h.insert("x-ratelimit-limit", HeaderValue::from_static("5"));
            h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
            h.insert(
                "x-ratelimit-reset-after",
                HeaderValue::from_str(&secs).unwrap(),
            );
            h.insert("x-ratelimit-bucket", HeaderValue::from_static("fakebucket"));
            if r.global {
                h.insert("x-ratelimit-global", HeaderValue::from_static("true"));
                h.insert("x-ratelimit-scope", HeaderValue::from_static("global"));
            } else {
                h.insert("x-ratelimit-scope", HeaderValue::from_static("user"));
            }
        }
        return resp;
    }

    // Attachments are public (signed URLs on Discord's CDN): no token.
    if method == Method::GET && path.starts_with("/attachments/") {
        return match st.attachments.get(&path) {
            Some(bytes) => {
                axum::response::IntoResponse::into_response((StatusCode::OK, bytes.clone()))
            }
            None => axum::response::IntoResponse::into_response(StatusCode::NOT_FOUND),
        };
    }
    let rel = path
        .strip_prefix("/api/v10")
        .or_else(|| path.strip_prefix("/api/v9"))
        .or_else(|| path.strip_prefix("/api"))
        .unwrap_or(&path)
        .to_string();
    let segs: Vec<&str> = rel.trim_matches('/').split('/').collect();
    let public = method == Method::GET && segs == ["gateway"];
    let (status, resp_body) = if !public && auth != format!("Bot {}", st.token) {
        error(401, "401: Unauthorized", 0)
    } else {
        route(&mut st, &method, &segs, &parsed)
    };
    st.calls.push(ApiCall {
        method: method.to_string(),
        path: path.clone(),
        body: parsed.json,
        status,
        at: Instant::now(),
    });
    if st.verbose {
        eprintln!("fake_discord: {method} {path} -> {status}");
    }
    drop(st);
    match resp_body {
        Some(b) => json_response(status, &b),
        None => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT);
            resp
        }
    }
}

/// Records one bot message and returns the Message object to answer with.
#[allow(clippy::too_many_arguments)]
fn record_message(
    st: &mut FakeState,
    kind: &str,
    channel_id: u64,
    message_id: u64,
    body: &ParsedBody,
    interaction_id: Option<u64>,
    webhook: bool,
) -> Value {
    let b = &body.json;
    let previous = st.store.get(&message_id).cloned();
    let content = match b["content"].as_str() {
        Some(c) => c.to_string(),
        None => previous
            .as_ref()
            .and_then(|p| p["content"].as_str())
            .unwrap_or("")
            .to_string(),
    };
    let flags = b["flags"].as_u64().unwrap_or(0);
    let reply_to = b["message_reference"]["message_id"]
        .as_str()
        .and_then(parse_u64)
        .or_else(|| b["message_reference"]["message_id"].as_u64());
    st.messages.push(SentMessage {
        kind: kind.to_string(),
        channel_id,
        message_id,
        content: content.clone(),
        has_attachment: !body.files.is_empty(),
        attachment_name: body.files.first().cloned(),
        components: b.get("components").cloned(),
        interaction_id,
        reply_to,
        ephemeral: flags & EPHEMERAL != 0,
    });
    let mut msg = message_json(message_id, channel_id, st.bot_user(), &content);
    if let Some(p) = &previous {
        msg["timestamp"] = p["timestamp"].clone();
        msg["edited_timestamp"] = json!(now_iso());
    }
    msg["flags"] = json!(flags);
    if !body.files.is_empty() {
        let atts: Vec<Value> = body
            .files
            .iter()
            .enumerate()
            .map(|(i, name)| {
                json!({
                    "id": (message_id + 1 + i as u64).to_string(),
                    "filename": name,
                    "size": 1,
                    "url": format!("https://cdn.example.invalid/attachments/{channel_id}/{message_id}/{name}"),
                    "proxy_url": format!("https://media.example.invalid/attachments/{channel_id}/{message_id}/{name}"),
                })
            })
            .collect();
        msg["attachments"] = json!(atts);
    } else if let Some(p) = &previous {
        msg["attachments"] = p["attachments"].clone();
    }
    if let Some(r) = reply_to {
        msg["type"] = json!(19);
        msg["message_reference"] =
            json!({"type": 0, "message_id": r.to_string(), "channel_id": channel_id.to_string()});
    }
    if webhook {
        msg["webhook_id"] = json!(st.identity.app_id.to_string());
        msg["application_id"] = json!(st.identity.app_id.to_string());
    }
    st.store.insert(message_id, msg.clone());
    let is_new = previous.is_none() && kind != "callback";
    if st.echo_own && is_new && flags & EPHEMERAL == 0 {
        let mut ev = msg.clone();
        if let Some(g) = st.channels.get(&channel_id).and_then(|c| c.guild_id) {
            ev["guild_id"] = json!(g.to_string());
            ev["member"] = partial_member_json();
        }
        st.dispatch("MESSAGE_CREATE", ev);
    }
    msg
}

fn route(
    st: &mut FakeState,
    method: &Method,
    segs: &[&str],
    body: &ParsedBody,
) -> (u16, Option<Value>) {
    let app_id = st.identity.app_id;
    let is_app = |s: &str| parse_u64(s) == Some(app_id);
    match (method.as_str(), segs) {
        ("GET", ["gateway"]) => (200, Some(json!({"url": st.gateway_url}))),
        ("GET", ["gateway", "bot"]) => (
            200,
            Some(json!({
                "url": st.gateway_url,
                "shards": st.recommended_shards,
                "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1},
            })),
        ),
        ("GET", ["users", "@me"]) => {
            let mut u = st.bot_user();
            u["verified"] = json!(true);
            u["mfa_enabled"] = json!(false);
            u["flags"] = json!(0);
            u["banner"] = Value::Null;
            u["accent_color"] = Value::Null;
            (200, Some(u))
        }
        ("GET", ["oauth2", "applications", "@me"]) | ("GET", ["applications", "@me"]) => (
            200,
            Some(json!({
                "id": app_id.to_string(),
                "name": st.identity.username,
                "icon": null,
                "description": "",
                "rpc_origins": [],
                "bot_public": false,
                "bot_require_code_grant": false,
                "owner": user_json(1, "owner", false),
                "verify_key": "0000000000000000000000000000000000000000000000000000000000000000",
                "team": null,
                "flags": 0,
                "bot": st.bot_user(),
            })),
        ),
        ("POST", ["users", "@me", "channels"]) => {
            let Some(uid) = body.json["recipient_id"]
                .as_str()
                .and_then(parse_u64)
                .or_else(|| body.json["recipient_id"].as_u64())
            else {
                return error(400, "Invalid Form Body", 50035);
            };
            let existing = st
                .channels
                .iter()
                .find(|(_, c)| c.recipient.as_ref().map(|r| r.0) == Some(uid))
                .map(|(id, _)| *id);
            let cid = match existing {
                Some(c) => c,
                None => {
                    let c = st.new_id();
                    let name = st.username_of(uid);
                    st.channels.insert(
                        c,
                        ChannelInfo {
                            guild_id: None,
                            recipient: Some((uid, name)),
                        },
                    );
                    c
                }
            };
            let name = st.username_of(uid);
            (200, Some(dm_channel_json(cid, uid, &name)))
        }
        ("GET", ["channels", cid]) => {
            let Some(cid) = parse_u64(cid) else {
                return error(404, "Unknown Channel", 10003);
            };
            match st.channels.get(&cid) {
                Some(ChannelInfo {
                    guild_id: Some(g), ..
                }) => (
                    200,
                    Some(json!({
                        "id": cid.to_string(),
                        "type": 0,
                        "guild_id": g.to_string(),
                        "name": format!("channel-{cid}"),
                        "position": 0,
                        "permission_overwrites": [],
                        "nsfw": false,
                        "topic": null,
                        "last_message_id": null,
                        "parent_id": null,
                        "rate_limit_per_user": 0,
                        "flags": 0,
                    })),
                ),
                Some(ChannelInfo {
                    recipient: Some((uid, name)),
                    ..
                }) => (200, Some(dm_channel_json(cid, *uid, name))),
                _ => (200, Some(dm_channel_json(cid, 1, "someone"))),
            }
        }
        ("POST", ["channels", cid, "messages"]) => {
            let Some(cid) = parse_u64(cid) else {
                return error(404, "Unknown Channel", 10003);
            };
            if dm_refused(st, cid) {
                return error(403, "Cannot send messages to this user", 50007);
            }
            let id = st.new_id();
            let msg = record_message(st, "create", cid, id, body, None, false);
            (200, Some(msg))
        }
        ("PATCH", ["channels", cid, "messages", mid]) => {
            let (Some(cid), Some(mid)) = (parse_u64(cid), parse_u64(mid)) else {
                return error(404, "Unknown Message", 10008);
            };
            let msg = record_message(st, "edit", cid, mid, body, None, false);
            (200, Some(msg))
        }
        ("GET", ["channels", _, "messages", mid]) => {
            match parse_u64(mid).and_then(|m| st.store.get(&m)) {
                Some(m) => (200, Some(m.clone())),
                None => error(404, "Unknown Message", 10008),
            }
        }
        ("DELETE", ["channels", _, "messages", _]) => no_content(),
        ("PUT", ["channels", _, "messages", _, "reactions", _, "@me"])
        | ("DELETE", ["channels", _, "messages", _, "reactions", _, "@me"]) => no_content(),
        ("POST", ["channels", cid, "typing"]) => {
            let Some(cid) = parse_u64(cid) else {
                return error(404, "Unknown Channel", 10003);
            };
            *st.typing.entry(cid).or_insert(0) += 1;
            no_content()
        }
        ("PUT", ["applications", app, "commands"]) if is_app(app) => {
            let list = body.json.as_array().cloned().unwrap_or_default();
            let echoed: Vec<Value> = list
                .into_iter()
                .map(|c| command_json(st, c, None))
                .collect();
            st.commands = echoed.clone();
            (200, Some(Value::Array(echoed)))
        }
        ("POST", ["applications", app, "commands"]) if is_app(app) => {
            let c = command_json(st, body.json.clone(), None);
            st.commands.retain(|old| old["name"] != c["name"]);
            st.commands.push(c.clone());
            (201, Some(c))
        }
        ("GET", ["applications", app, "commands"]) if is_app(app) => {
            (200, Some(Value::Array(st.commands.clone())))
        }
        ("PUT", ["applications", app, "guilds", gid, "commands"]) if is_app(app) => {
            let g = parse_u64(gid);
            let list = body.json.as_array().cloned().unwrap_or_default();
            let echoed: Vec<Value> = list.into_iter().map(|c| command_json(st, c, g)).collect();
            (200, Some(Value::Array(echoed)))
        }
        ("POST", ["interactions", iid, token, "callback"]) => {
            interaction_callback(st, parse_u64(iid).unwrap_or(0), token, body)
        }
        ("POST", ["webhooks", app, token]) if is_app(app) => {
            let Some(info) = st.interactions.get(*token) else {
                return error(404, "Unknown Webhook", 10015);
            };
            let (iid, cid) = (info.id, info.channel_id);
            let id = st.new_id();
            let msg = record_message(st, "followup", cid, id, body, Some(iid), true);
            (200, Some(msg))
        }
        ("GET", ["webhooks", app, token, "messages", which]) if is_app(app) => {
            let Some(info) = st.interactions.get(*token) else {
                return error(404, "Unknown Webhook", 10015);
            };
            let mid = if *which == "@original" {
                info.original_msg
            } else {
                parse_u64(which)
            };
            match mid.and_then(|m| st.store.get(&m)) {
                Some(m) => (200, Some(m.clone())),
                None => error(404, "Unknown Message", 10008),
            }
        }
        ("PATCH", ["webhooks", app, token, "messages", which]) if is_app(app) => {
            let Some(info) = st.interactions.get(*token) else {
                return error(404, "Unknown Webhook", 10015);
            };
            let (iid, cid, original) = (info.id, info.channel_id, info.original_msg);
            let mid = if *which == "@original" {
                match original {
                    Some(m) => m,
                    None => {
                        let m = st.new_id();
                        if let Some(info) = st.interactions.get_mut(*token) {
                            info.original_msg = Some(m);
                        }
                        m
                    }
                }
            } else {
                match parse_u64(which) {
                    Some(m) => m,
                    None => return error(404, "Unknown Message", 10008),
                }
            };
            let msg = record_message(st, "edit", cid, mid, body, Some(iid), true);
            (200, Some(msg))
        }
        ("DELETE", ["webhooks", app, _, "messages", _]) if is_app(app) => no_content(),
        _ => error(404, "404: Not Found", 0),
    }
}

/// Whether `cid` is the DM channel of a user [`FakeDiscord::refuse_dms`] named.
fn dm_refused(st: &FakeState, cid: u64) -> bool {
    st.channels
        .get(&cid)
        .and_then(|c| c.recipient.as_ref())
        .is_some_and(|(uid, _)| st.refused_dms.contains(uid))
}

fn dm_channel_json(cid: u64, uid: u64, name: &str) -> Value {
    json!({
        "id": cid.to_string(),
        "type": 1,
        "last_message_id": null,
        "recipients": [user_json(uid, name, false)],
        "flags": 0,
    })
}

fn command_json(st: &mut FakeState, mut c: Value, guild_id: Option<u64>) -> Value {
    let id = st.new_id();
    let app = st.identity.app_id.to_string();
    if let Some(obj) = c.as_object_mut() {
        obj.insert("id".into(), json!(id.to_string()));
        obj.insert("application_id".into(), json!(app));
        obj.insert("version".into(), json!(id.to_string()));
        obj.entry("type").or_insert(json!(1));
        obj.entry("description").or_insert(json!(""));
        obj.entry("default_member_permissions")
            .or_insert(Value::Null);
        obj.entry("nsfw").or_insert(json!(false));
        if let Some(g) = guild_id {
            obj.insert("guild_id".into(), json!(g.to_string()));
        }
    }
    c
}

fn interaction_callback(
    st: &mut FakeState,
    iid: u64,
    token: &str,
    body: &ParsedBody,
) -> (u16, Option<Value>) {
    let deadline = st.callback_deadline;
    let Some(info) = st.interactions.get_mut(token) else {
        return error(404, "Unknown interaction", 10062);
    };
    if info.id != iid || deadline.is_some_and(|d| info.created.elapsed() > d) {
        return error(404, "Unknown interaction", 10062);
    }
    if info.responded {
        return error(400, "Interaction has already been acknowledged.", 40060);
    }
    info.responded = true;
    let (cid, source) = (info.channel_id, info.source_msg);
    let kind = body.json["type"].as_u64().unwrap_or(0);
    // 4 = message, 5 = deferred message, 6 = deferred update, 7 = update message.
    let message_id = match kind {
        4 | 5 => {
            let m = st.new_id();
            if let Some(info) = st.interactions.get_mut(token) {
                info.original_msg = Some(m);
            }
            Some(m)
        }
        6 | 7 => {
            if let Some(info) = st.interactions.get_mut(token) {
                info.original_msg = source;
            }
            source
        }
        _ => None,
    };
    st.interaction_responses.push((iid, body.json.clone()));
    if matches!(kind, 4 | 7) {
        let data = ParsedBody {
            json: body
                .json
                .get("data")
                .cloned()
                .unwrap_or(Value::Object(Map::new())),
            files: body.files.clone(),
        };
        let mid = message_id.unwrap_or_else(|| st.new_id());
        record_message(st, "callback", cid, mid, &data, Some(iid), true);
    } else if kind == 5 {
        // The deferred message exists (empty, "thinking") until edited.
        if let Some(m) = message_id {
            let mut msg = message_json(m, cid, st.bot_user(), "");
            msg["flags"] = json!(1u64 << 7); // LOADING
            st.store.insert(m, msg);
        }
    }
    no_content()
}

// ---------------------------------------------------------------------------
// Attachments users send (voice messages, audio files, images).

/// One attachment a test sends (see [`FakeDiscord::send_attachment`]).
#[derive(Clone, Debug)]
pub struct DcAttachment {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
    /// Set for a voice message (and then flags 8192 on the message).
    pub duration_secs: Option<f64>,
    /// Declared `size`; default the real length.
    pub declared_size: Option<u64>,
}

impl DcAttachment {
    /// A voice message (OGG/Opus) of `secs` seconds.
    pub fn voice(bytes: &[u8], secs: f64) -> DcAttachment {
        DcAttachment {
            filename: "voice-message.ogg".into(),
            content_type: "audio/ogg".into(),
            bytes: bytes.to_vec(),
            duration_secs: Some(secs),
            declared_size: None,
        }
    }

    /// A PNG image.
    pub fn image(bytes: &[u8]) -> DcAttachment {
        DcAttachment {
            filename: "picture.png".into(),
            content_type: "image/png".into(),
            bytes: bytes.to_vec(),
            duration_secs: None,
            declared_size: None,
        }
    }
}

impl FakeDiscord {
    /// MESSAGE_CREATE with one attachment, served at its URL under the fake's base URL.
    /// `guild`: `Some((guild_id, mention_bot, reply_to))` for a guild channel, `None`
    /// for a DM. Returns the message id.
    pub fn send_attachment(
        &self,
        channel_id: u64,
        user_id: u64,
        username: &str,
        content: &str,
        guild: Option<(u64, bool, Option<u64>)>,
        a: DcAttachment,
    ) -> u64 {
        let mut msg_and_id = None;
        if let Some((guild_id, mention, reply_to)) = guild {
            // Build it like the text helpers do, then add the attachment below.
            let mut st = lock(&self.state);
            let bot_id = st.identity.bot_id;
            let content = if mention {
                format!("<@{bot_id}> {content}")
            } else {
                content.to_string()
            };
            let mut msg = guild_message(&mut st, guild_id, channel_id, user_id, username, &content);
            if mention {
                let mut bot = st.bot_user();
                bot["member"] = partial_member_json();
                msg["mentions"] = json!([bot]);
            }
            if let Some(replied) = reply_to {
                let referenced = st.store.get(&replied).cloned().unwrap_or_else(|| {
                    message_json(replied, channel_id, st.bot_user(), "(earlier bot message)")
                });
                msg["type"] = json!(19);
                msg["message_reference"] = json!({
                    "type": 0,
                    "message_id": replied.to_string(),
                    "channel_id": channel_id.to_string(),
                    "guild_id": guild_id.to_string(),
                });
                msg["referenced_message"] = referenced;
            }
            let id = msg_id(&msg);
            msg_and_id = Some((st, msg, id));
        }
        let (mut st, mut msg, id) = match msg_and_id {
            Some(x) => x,
            None => {
                let mut st = lock(&self.state);
                st.remember_user(user_id, username);
                st.channels.insert(
                    channel_id,
                    ChannelInfo {
                        guild_id: None,
                        recipient: Some((user_id, username.to_string())),
                    },
                );
                let id = st.new_id();
                let author = user_json(user_id, username, false);
                let msg = message_json(id, channel_id, author, content);
                (st, msg, id)
            }
        };
        let att_id = st.new_id();
        let path = format!("/attachments/{channel_id}/{att_id}/{}", a.filename);
        let url = format!("http://{}{path}", self.addr);
        let mut att = json!({
            "id": att_id.to_string(),
            "filename": a.filename,
            "size": a.declared_size.unwrap_or(a.bytes.len() as u64),
            "url": url,
            "proxy_url": url,
            "content_type": a.content_type,
        });
        if let Some(secs) = a.duration_secs {
            att["duration_secs"] = json!(secs);
            att["waveform"] = json!("AAAA");
            msg["flags"] = json!(8192);
        }
        msg["attachments"] = json!([att]);
        st.attachments.insert(path, a.bytes);
        st.store.insert(id, msg.clone());
        st.dispatch("MESSAGE_CREATE", msg);
        id
    }
}
