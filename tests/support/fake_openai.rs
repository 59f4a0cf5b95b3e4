//! In-process fake of an OpenAI-compatible chat completions server.
//!
//! Used by the integration tests (include it with
//! `#[path = "../support/fake_openai.rs"] mod fake_openai;`) and by
//! `examples/fake_openai.rs`, so confab can be run locally without a real LLM:
//!
//! ```text
//! cargo run --example fake_openai -- --port 8089
//! # then set llm.base_url = "http://127.0.0.1:8089/v1"
//! ```
//!
//! Behaviour is scripted: [`FakeOpenAi::push`] queues [`Behavior`]s that are
//! consumed one per chat completion request (FIFO, in arrival order); when the
//! queue is empty the default behaviour applies (initially [`Behavior::Echo`],
//! which replies `echo: <last user message>`).
//!
//! Everything is async: latency, delays and hangs are per-request sleeps, and
//! the shared state is behind a std `Mutex` that is never held across an await,
//! so thousands of concurrent slow requests are served in parallel.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// Model name used in responses when the request does not name one.
pub const DEFAULT_MODEL: &str = "fake-model";

/// What the fake does with one chat completion request.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Reply `echo: <last user message>` (deterministic; tests rely on this exact format).
    Echo,
    /// Reply with this fixed text.
    Reply(String),
    /// Answer with this HTTP status (e.g. 429, 500, 503), an optional
    /// `Retry-After: <secs>` header and an optional raw body (default: an
    /// OpenAI-style `{"error":{"message":..,"type":..,"param":..,"code":..}}`).
    Status {
        code: u16,
        retry_after: Option<u64>,
        body: Option<String>,
    },
    /// 400 with OpenAI's `context_length_exceeded` error.
    ContextLengthExceeded,
    /// 200 with a body that is not valid JSON (for stream requests: an SSE
    /// event whose data is not valid JSON).
    Malformed,
    /// 200, valid completion, but the content is `""`.
    Empty,
    /// 200, valid JSON, but `"choices": []`.
    NoChoices,
    /// Never answers (until the client gives up). Does not block other requests.
    Hang,
    /// Wait, then behave like the inner behaviour.
    Delay(Duration, Box<Behavior>),
    /// Answer as SSE (regardless of the request's `stream` flag) with these
    /// content chunks, sleeping `gap` between consecutive chunks.
    Stream { chunks: Vec<String>, gap: Duration },
    /// SSE: sends these content chunks, then a `data: {"error":{...}}` event,
    /// then closes the connection without `[DONE]`.
    StreamError { chunks: Vec<String> },
}

impl Behavior {
    /// Convenience: `Behavior::Reply(text.into())`.
    pub fn reply(text: impl Into<String>) -> Behavior {
        Behavior::Reply(text.into())
    }

    /// Convenience: a bare status with the default OpenAI-style error body.
    pub fn status(code: u16) -> Behavior {
        Behavior::Status {
            code,
            retry_after: None,
            body: None,
        }
    }

    /// Convenience: `Behavior::Delay(d, Box::new(inner))`.
    pub fn delay(d: Duration, inner: Behavior) -> Behavior {
        Behavior::Delay(d, Box::new(inner))
    }
}

/// One chat completion request as received by the fake.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `model` field ("" if missing).
    pub model: String,
    /// `(role, content)` for every message; array contents are flattened by
    /// concatenating their `text` parts.
    pub messages: Vec<(String, String)>,
    /// `stream` field (false if missing).
    pub stream: bool,
    pub temperature: Option<f64>,
    /// `max_tokens`, or `max_completion_tokens` if `max_tokens` is absent.
    pub max_tokens: Option<u64>,
    /// Raw `Authorization` header value (e.g. `"Bearer sk-..."`).
    pub authorization: Option<String>,
    /// The whole request body (`Value::Null` if it was not valid JSON).
    pub body: Value,
    /// Image content parts (`{"type":"image_url"}`) across all messages.
    pub images: usize,
}

impl RecordedRequest {
    /// Content of the last message with role `user`.
    pub fn last_user(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|(role, _)| role == "user")
            .map(|(_, content)| content.as_str())
    }

    /// Content of the first message with role `system`.
    pub fn system(&self) -> Option<&str> {
        self.messages
            .iter()
            .find(|(role, _)| role == "system")
            .map(|(_, content)| content.as_str())
    }
}

struct FakeState {
    script: VecDeque<Behavior>,
    default: Behavior,
    latency: Duration,
    requests: Vec<RecordedRequest>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: usize,
    max_in_flight: usize,
    next_id: u64,
    /// Set by `shutdown()`: any request that still slips in is refused with 503.
    down: bool,
    /// `/audio/transcriptions`: scripted behaviours (FIFO; else `Echo`) and requests.
    audio_script: VecDeque<Behavior>,
    transcriptions: Vec<Transcribed>,
    /// `/audio/speech`: scripted behaviours (FIFO; else OGG bytes) and request bodies.
    speech_script: VecDeque<Behavior>,
    speeches: Vec<Value>,
    verbose: bool,
}

type Shared = Arc<Mutex<FakeState>>;

fn lock(state: &Shared) -> MutexGuard<'_, FakeState> {
    // A panicking test thread must not poison the fake for everyone else.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to a running fake server. Dropping it (the last clone) shuts the
/// server down like [`FakeOpenAi::shutdown`].
#[derive(Clone)]
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
    /// The address actually bound (with the real port).
    pub addr: SocketAddr,
    state: Shared,
    /// Sender side of the graceful-shutdown signal of the current server.
    /// Kept out of `state` so the server tasks don't keep it alive.
    stop: Arc<Mutex<Option<watch::Sender<bool>>>>,
}

impl FakeOpenAi {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> FakeOpenAi {
        FakeOpenAi::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("fake_openai: cannot bind 127.0.0.1:0")
    }

    /// Binds `addr` (port 0 = any free port) and serves on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeOpenAi> {
        let state: Shared = Arc::new(Mutex::new(FakeState {
            script: VecDeque::new(),
            default: Behavior::Echo,
            latency: Duration::ZERO,
            in_flight: 0,
            max_in_flight: 0,
            requests: Vec::new(),
            next_id: 1,
            down: false,
            verbose: false,
            audio_script: VecDeque::new(),
            transcriptions: Vec::new(),
            speech_script: VecDeque::new(),
            speeches: Vec::new(),
        }));
        let (addr, stop) = spawn_server(addr, state.clone())?;
        Ok(FakeOpenAi {
            base_url: format!("http://{addr}/v1"),
            addr,
            state,
            stop: Arc::new(Mutex::new(Some(stop))),
        })
    }

    /// Queue one behaviour (FIFO; each chat request pops one).
    pub fn push(&self, b: Behavior) {
        lock(&self.state).script.push_back(b);
    }

    /// Queue the same behaviour `n` times.
    pub fn push_n(&self, n: usize, b: Behavior) {
        let mut st = lock(&self.state);
        for _ in 0..n {
            st.script.push_back(b.clone());
        }
    }

    /// Behaviour used when the script is empty (initially `Behavior::Echo`).
    pub fn set_default(&self, b: Behavior) {
        lock(&self.state).default = b;
    }

    /// Latency added before every chat response (including streamed ones).
    pub fn set_latency(&self, d: Duration) {
        lock(&self.state).latency = d;
    }

    /// Print a one-line summary of every chat request to stderr.
    pub fn set_verbose(&self, on: bool) {
        lock(&self.state).verbose = on;
    }

    /// Number of scripted behaviours not yet consumed.
    pub fn pending_behaviors(&self) -> usize {
        lock(&self.state).script.len()
    }

    /// Every chat completion request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }

    /// The most chat requests that were being answered at the same moment.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.state).max_in_flight
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state).requests.len()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    /// Stop accepting: the listener is closed (new connections are refused),
    /// idle keep-alive connections are closed, and any request that still
    /// reaches the fake gets `503` + `Connection: close`. In-flight requests
    /// (e.g. `Hang`) are left alone.
    pub fn shutdown(&self) {
        lock(&self.state).down = true;
        if let Some(tx) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(true);
        }
    }

    /// Bring the server back on the same address after [`shutdown`](Self::shutdown),
    /// keeping script, default, latency and recorded requests.
    pub async fn restart(&self) -> std::io::Result<()> {
        self.shutdown();
        // Let the old accept loop observe the signal and drop its listener.
        for _ in 0..100 {
            match spawn_server(self.addr, self.state.clone()) {
                Ok((_, stop)) => {
                    *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop);
                    lock(&self.state).down = false;
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
            format!("fake_openai: {} still in use", self.addr),
        ))
    }
}

impl Drop for FakeOpenAi {
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
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Large backlog: tests open ~1000 connections at once.
    let listener = socket.listen(4096)?;
    let local = listener.local_addr()?;

    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .route("/audio/transcriptions", post(transcriptions))
        .route("/v1/audio/speech", post(speech))
        .route("/audio/speech", post(speech))
        .route("/v1/models", get(list_models))
        .route("/models", get(list_models))
        .fallback(not_found)
        .with_state(state);

    let (tx, mut rx) = watch::channel(false);
    tokio::spawn(async move {
        let signal = async move {
            // Completes on `true` or when the sender is dropped.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // axum drops the listener as soon as the signal fires, then drains.
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await;
    });
    Ok((local, tx))
}

// ---------------------------------------------------------------------------
// Handlers

/// Per-request facts the response builders need.
struct Ctx {
    id: String,
    model: String,
    created: u64,
    stream: bool,
    include_usage: bool,
    prompt_tokens: u64,
    last_user: String,
    images: usize,
}

/// Counts a request as in flight until its answer is built.
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = lock(&self.0);
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

async fn chat_completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let value = parsed.clone().unwrap_or(Value::Null);
    let rec = record_from(&value, &headers);

    let (behavior, latency, id) = {
        let mut st = lock(&state);
        if st.down {
            let mut resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "fake_openai is shut down",
                "server_error",
                None,
                None,
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.requests.push(rec.clone());
        if parsed.is_none() {
            if st.verbose {
                eprintln!("fake_openai: #{id} invalid JSON body -> 400");
            }
            return error_response(
                StatusCode::BAD_REQUEST,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
                None,
            );
        }
        let behavior = match st.script.pop_front() {
            Some(b) => b,
            None => st.default.clone(),
        };
        if st.verbose {
            eprintln!(
                "fake_openai: #{id} model={:?} stream={} messages={} last_user={:?} -> {:?}",
                rec.model,
                rec.stream,
                rec.messages.len(),
                rec.last_user().unwrap_or(""),
                behavior
            );
        }
        st.in_flight += 1;
        st.max_in_flight = st.max_in_flight.max(st.in_flight);
        (behavior, st.latency, id)
    };
    let _answering = InFlight(state.clone());

    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let prompt_chars: usize = rec.messages.iter().map(|(_, c)| c.chars().count()).sum();
    let ctx = Ctx {
        id: format!("chatcmpl-{id}"),
        model: if rec.model.is_empty() {
            DEFAULT_MODEL.to_string()
        } else {
            rec.model.clone()
        },
        created: unix_now(),
        stream: rec.stream,
        include_usage: value
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        prompt_tokens: tokens_for(prompt_chars),
        last_user: rec.last_user().unwrap_or("").to_string(),
        images: rec.images,
    };
    respond(behavior, ctx).await
}

async fn respond(mut behavior: Behavior, ctx: Ctx) -> Response {
    while let Behavior::Delay(d, inner) = behavior {
        tokio::time::sleep(d).await;
        behavior = *inner;
    }
    match behavior {
        Behavior::Delay(..) => unreachable!(),
        Behavior::Echo if ctx.images > 0 => {
            let text = format!("echo: {} images: {}", ctx.last_user, ctx.images);
            completion(&ctx, text)
        }
        Behavior::Echo => {
            let text = format!("echo: {}", ctx.last_user);
            completion(&ctx, text)
        }
        Behavior::Reply(text) => completion(&ctx, text),
        Behavior::Empty => completion(&ctx, String::new()),
        Behavior::NoChoices => {
            if ctx.stream {
                let chunk = chunk_json(&ctx, vec![], ctx.include_usage.then_some(Value::Null));
                sse_response(vec![SseItem::Event(chunk), SseItem::Done])
            } else {
                let mut v = completion_json(&ctx, "");
                v["choices"] = json!([]);
                json_response(StatusCode::OK, &v)
            }
        }
        Behavior::Malformed => {
            if ctx.stream {
                sse_response(
                    vec![
                        SseItem::Raw(format!(
                            "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"delta\": oops\n\n",
                            ctx.id
                        )),
                        SseItem::Done,
                    ],
                )
            } else {
                raw_response(
                    StatusCode::OK,
                    "application/json",
                    format!(
                        "{{\"id\":\"{}\",\"object\":\"chat.completion\",\"choices\":[{{\"message\": <html>oops",
                        ctx.id
                    ),
                )
            }
        }
        Behavior::Status {
            code,
            retry_after,
            body,
        } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = match body {
                Some(b) => {
                    let ct = if serde_json::from_str::<Value>(&b).is_ok() {
                        "application/json"
                    } else if b.trim_start().starts_with('<') {
                        "text/html; charset=utf-8"
                    } else {
                        "text/plain; charset=utf-8"
                    };
                    raw_response(status, ct, b)
                }
                None => default_error_for(status, &ctx.model),
            };
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
        Behavior::ContextLengthExceeded => error_response(
            StatusCode::BAD_REQUEST,
            &format!(
                "This model's maximum context length is 8192 tokens. However, your messages resulted in {} tokens. Please reduce the length of the messages.",
                ctx.prompt_tokens.max(8193)
            ),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        Behavior::Hang => futures::future::pending::<Response>().await,
        Behavior::Stream { chunks, gap } => stream_text(&ctx, chunks, gap, false),
        Behavior::StreamError { chunks } => stream_text(&ctx, chunks, Duration::ZERO, true),
    }
}

async fn list_models() -> Response {
    let created = unix_now();
    let data: Vec<Value> = [DEFAULT_MODEL, "gpt-4o-mini", "gpt-4o"]
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "confab-fake"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("Unknown request URL: {method} {}.", uri.path()),
        "invalid_request_error",
        None,
        Some("unknown_url"),
    )
}

// ---------------------------------------------------------------------------
// Request parsing

fn record_from(v: &Value, headers: &HeaderMap) -> RecordedRequest {
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .map(|m| {
                    let role = m
                        .get("role")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    (role, content_text(m.get("content")))
                })
                .collect()
        })
        .unwrap_or_default();
    RecordedRequest {
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        messages,
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        temperature: v.get("temperature").and_then(Value::as_f64),
        max_tokens: v
            .get("max_tokens")
            .and_then(Value::as_u64)
            .or_else(|| v.get("max_completion_tokens").and_then(Value::as_u64)),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string),
        body: v.clone(),
        images: count_images(v),
    }
}

/// Image content parts in the request's messages.
fn count_images(v: &Value) -> usize {
    let Some(msgs) = v.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    msgs.iter()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("image_url"))
        .count()
}

/// A message `content`: a string, or an array of parts whose `text`s are concatenated.
fn content_text(c: Option<&Value>) -> String {
    match c {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                _ => p.get("text").and_then(Value::as_str),
            })
            .collect(),
        Some(other) => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Response building

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// ≈ chars / 4, at least 1.
/// The usage (prompt, completion tokens) the fake reports for `rec` answered with
/// `reply` (non-streamed), for tests that compare what the client saw.
pub fn reported_usage(rec: &RecordedRequest, reply: &str) -> (u64, u64) {
    let prompt_chars: usize = rec.messages.iter().map(|(_, c)| c.chars().count()).sum();
    (tokens_for(prompt_chars), tokens_for(reply.chars().count()))
}

fn tokens_for(chars: usize) -> u64 {
    ((chars / 4) as u64).max(1)
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn completion_json(ctx: &Ctx, text: &str) -> Value {
    let completion = tokens_for(text.chars().count());
    json!({
        "id": ctx.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "system_fingerprint": "fp_fake",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "finish_reason": "stop",
            "logprobs": null,
        }],
        "usage": usage_json(ctx.prompt_tokens, completion),
    })
}

/// A `chat.completion.chunk`; `usage` is `None` to omit the field.
fn chunk_json(ctx: &Ctx, choices: Vec<Value>, usage: Option<Value>) -> Value {
    let mut v = json!({
        "id": ctx.id,
        "object": "chat.completion.chunk",
        "created": ctx.created,
        "model": ctx.model,
        "system_fingerprint": "fp_fake",
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

fn delta_choice(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
}

/// Full reply: JSON, or SSE word by word when the request asked for a stream.
fn completion(ctx: &Ctx, text: String) -> Response {
    if ctx.stream {
        stream_text(ctx, split_words(&text), Duration::ZERO, false)
    } else {
        json_response(StatusCode::OK, &completion_json(ctx, &text))
    }
}

/// Splits into words, each keeping its trailing whitespace (concatenation == input).
fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_ws = false;
    for ch in s.chars() {
        if prev_ws && !ch.is_whitespace() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
        prev_ws = ch.is_whitespace();
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

enum SseItem {
    /// `data: <json>\n\n`
    Event(Value),
    /// Sent verbatim.
    Raw(String),
    /// `data: [DONE]\n\n`
    Done,
    /// Sleep before the next item.
    Sleep(Duration),
}

fn stream_text(ctx: &Ctx, chunks: Vec<String>, gap: Duration, error: bool) -> Response {
    let null_usage = || ctx.include_usage.then_some(Value::Null);
    let mut items = Vec::new();
    items.push(SseItem::Event(chunk_json(
        ctx,
        vec![delta_choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        )],
        null_usage(),
    )));
    let mut chars = 0;
    for (i, c) in chunks.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            items.push(SseItem::Sleep(gap));
        }
        chars += c.chars().count();
        items.push(SseItem::Event(chunk_json(
            ctx,
            vec![delta_choice(json!({"content": c}), None)],
            null_usage(),
        )));
    }
    if error {
        items.push(SseItem::Event(json!({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": null,
            "code": null,
        }})));
        // Close without [DONE].
        return sse_response(items);
    }
    items.push(SseItem::Event(chunk_json(
        ctx,
        vec![delta_choice(json!({}), Some("stop"))],
        null_usage(),
    )));
    if ctx.include_usage {
        items.push(SseItem::Event(chunk_json(
            ctx,
            vec![],
            Some(usage_json(ctx.prompt_tokens, tokens_for(chars))),
        )));
    }
    items.push(SseItem::Done);
    sse_response(items)
}

/// Streams `items` as `text/event-stream` from a spawned producer task
/// (stops early if the client goes away).
fn sse_response(items: Vec<SseItem>) -> Response {
    let (tx, rx) = mpsc::channel::<String>(16);
    tokio::spawn(async move {
        for item in items {
            let text = match item {
                SseItem::Event(v) => format!("data: {v}\n\n"),
                SseItem::Raw(s) => s,
                SseItem::Done => "data: [DONE]\n\n".to_string(),
                SseItem::Sleep(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
            };
            if tx.send(text).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|s| (Ok::<_, Infallible>(s), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    raw_response(status, "application/json", v.to_string())
}

fn raw_response(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn default_error_for(status: StatusCode, model: &str) -> Response {
    let (message, kind, code): (String, &str, Option<&str>) = match status.as_u16() {
        400 => ("Bad request.".into(), "invalid_request_error", None),
        401 => (
            "Incorrect API key provided: sk-fake***. You can find your API key at https://platform.openai.com/account/api-keys.".into(),
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => (
            "You are not allowed to access this resource.".into(),
            "invalid_request_error",
            Some("permission_denied"),
        ),
        404 => (
            format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        ),
        429 => (
            format!("Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s."),
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500 => (
            "The server had an error while processing your request. Sorry about that!".into(),
            "server_error",
            None,
        ),
        502 => ("Bad gateway.".into(), "server_error", None),
        503 => (
            "The engine is currently overloaded, please try again later.".into(),
            "server_error",
            None,
        ),
        n if n >= 500 => (format!("Fake server error {n}."), "server_error", None),
        n => (format!("Fake error {n}."), "invalid_request_error", None),
    };
    error_response(status, &message, kind, None, code)
}

// ---------------------------------------------------------------------------
// Audio: `POST /audio/transcriptions` (multipart).

/// One transcription request as received.
#[derive(Clone, Debug)]
pub struct Transcribed {
    pub model: String,
    pub file_name: String,
    pub bytes: Vec<u8>,
}

impl FakeOpenAi {
    /// Queues a behaviour for the next transcription (`Echo` answers
    /// `heard: <the uploaded bytes as UTF-8>`; `Reply(t)` answers `t`; statuses,
    /// `Hang` and `Delay` as for chat).
    pub fn push_audio(&self, b: Behavior) {
        lock(&self.state).audio_script.push_back(b);
    }

    /// Every transcription request so far.
    pub fn transcriptions(&self) -> Vec<Transcribed> {
        lock(&self.state).transcriptions.clone()
    }
}

async fn transcriptions(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = ctype
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_string();
    let mut rec = Transcribed {
        model: String::new(),
        file_name: String::new(),
        bytes: Vec::new(),
    };
    for (name, file_name, data) in multipart_parts(&body, &boundary) {
        match name.as_str() {
            "model" => rec.model = String::from_utf8_lossy(&data).into_owned(),
            "file" => {
                rec.file_name = file_name.unwrap_or_default();
                rec.bytes = data;
            }
            _ => {}
        }
    }
    if rec.model.is_empty() || rec.file_name.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "model and file are required",
            "invalid_request_error",
            None,
            None,
        );
    }
    let heard = format!("heard: {}", String::from_utf8_lossy(&rec.bytes));
    let mut behavior = {
        let mut st = lock(&state);
        st.transcriptions.push(rec);
        st.audio_script.pop_front().unwrap_or(Behavior::Echo)
    };
    while let Behavior::Delay(d, inner) = behavior {
        tokio::time::sleep(d).await;
        behavior = *inner;
    }
    match behavior {
        Behavior::Echo => json_response(StatusCode::OK, &json!({ "text": heard })),
        Behavior::Reply(text) => json_response(StatusCode::OK, &json!({ "text": text })),
        Behavior::Empty => json_response(StatusCode::OK, &json!({ "text": "" })),
        Behavior::Hang => futures::future::pending::<Response>().await,
        Behavior::Malformed => raw_response(StatusCode::OK, "application/json", "{oops".into()),
        other => {
            let ctx = Ctx {
                id: "audio".into(),
                model: DEFAULT_MODEL.into(),
                created: unix_now(),
                stream: false,
                include_usage: false,
                prompt_tokens: 0,
                last_user: String::new(),
                images: 0,
            };
            respond(other, ctx).await
        }
    }
}

/// `(name, filename, data)` of each part of a multipart/form-data body.
fn multipart_parts(body: &[u8], boundary: &str) -> Vec<(String, Option<String>, Vec<u8>)> {
    let delim = format!("--{boundary}").into_bytes();
    let find = |from: usize, pat: &[u8]| {
        body.get(from..)
            .and_then(|b| b.windows(pat.len()).position(|w| w == pat))
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let Some(mut pos) = find(0, &delim) else {
        return parts;
    };
    loop {
        let start = pos + delim.len();
        if body.get(start..start + 2) == Some(b"--") {
            break;
        }
        let Some(head_end) = find(start, b"\r\n\r\n") else {
            break;
        };
        let next_delim = [b"\r\n".as_slice(), &delim].concat();
        let Some(next) = find(head_end + 4, &next_delim) else {
            break;
        };
        let head = String::from_utf8_lossy(&body[start..head_end]).into_owned();
        let param = |key: &str| {
            let pat = format!("{key}=\"");
            let at = head.find(&pat)? + pat.len();
            let end = head[at..].find('"')? + at;
            Some(head[at..end].to_string())
        };
        let name = param(" name")
            .or_else(|| param(";name"))
            .unwrap_or_default();
        parts.push((name, param("filename"), body[head_end + 4..next].to_vec()));
        pos = next + 2;
    }
    parts
}

// ---------------------------------------------------------------------------
// Audio: `POST /audio/speech`.

/// What the fake speaks: `OggS` (an OGG page's magic) followed by the input text, so a
/// test can see what was spoken.
pub fn spoken_audio(input: &str) -> Vec<u8> {
    [b"OggS".as_slice(), input.as_bytes()].concat()
}

impl FakeOpenAi {
    /// Queues a behaviour for the next speech request (statuses, `Hang`, `Delay`).
    pub fn push_speech(&self, b: Behavior) {
        lock(&self.state).speech_script.push_back(b);
    }

    /// Every speech request body so far (`model`, `voice`, `input`, `response_format`).
    pub fn speeches(&self) -> Vec<Value> {
        lock(&self.state).speeches.clone()
    }
}

async fn speech(State(state): State<Shared>, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let input = v
        .get("input")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let scripted = {
        let mut st = lock(&state);
        st.speeches.push(v);
        st.speech_script.pop_front()
    };
    match scripted {
        None => {
            let mut resp = (StatusCode::OK, spoken_audio(&input)).into_response();
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/ogg"));
            resp
        }
        Some(b) => {
            let ctx = Ctx {
                id: "speech".into(),
                model: DEFAULT_MODEL.into(),
                created: unix_now(),
                stream: false,
                include_usage: false,
                prompt_tokens: 0,
                last_user: String::new(),
                images: 0,
            };
            respond(b, ctx).await
        }
    }
}
