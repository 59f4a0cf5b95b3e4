//! The engine pipeline through the public API, against the fake LLM.

use std::sync::atomic::Ordering;
use std::time::Duration;

use confab::domain::{Content, Rejection, Reply, ReplyKind};
use confab::engine::{MSG_LLM_FAILED, MSG_LLM_UNAVAILABLE, MSG_NON_TEXT};

use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::harness::{msg, on_both_backends, text, Backend, Root};

on_both_backends!(
    answers_and_remembers_the_conversation,
    memory_survives_a_store_reopen,
    daily_budget_is_enforced_with_one_notice,
    cache_hit_makes_no_llm_call,
    trimming_keeps_the_newest_turns,
    duplicates_and_crash_redelivery,
    reset_and_usage_commands,
    sweeper_purges_old_turns_and_expired_cache,
);

fn kind(reply: &Reply) -> Option<ReplyKind> {
    match reply {
        Reply::Text { kind, .. } => Some(kind.clone()),
        Reply::Silent => None,
    }
}

async fn answers_and_remembers_the_conversation(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, "");
    let app = root.build();
    let r1 = app.engine.handle(&msg("1", "my name is Ann")).await;
    assert_eq!(text(&r1), "echo: my name is Ann");
    let r2 = app.engine.handle(&msg("1", "what is my name?")).await;
    assert_eq!(text(&r2), "echo: what is my name?");
    let last = llm.requests().pop().expect("a request");
    let contents: Vec<&str> = last.messages.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        contents,
        vec![
            "You are assistant, helping User1 on telegram.",
            "my name is Ann",
            "echo: my name is Ann",
            "what is my name?"
        ]
    );
    // another user has a separate memory
    app.engine.handle(&msg("2", "hello")).await;
    assert_eq!(llm.requests().pop().unwrap().messages.len(), 2);
}

async fn memory_survives_a_store_reopen(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, "");
    {
        let app = root.build();
        app.engine.handle(&msg("7", "remember the number 42")).await;
    } // app dropped: sled closed
    let app = root.build();
    app.engine.handle(&msg("7", "which number?")).await;
    let last = llm.requests().pop().unwrap();
    assert!(
        last.messages
            .iter()
            .any(|(_, c)| c == "remember the number 42"),
        "history after reopen: {:?}",
        last.messages
    );
}

/// Moves tokio's clock (which the rate limiter and the breaker read) forward by `d`,
/// without waiting. Only between requests: nothing may be in flight.
async fn jump(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d).await;
    tokio::time::resume();
}

#[tokio::test]
async fn rate_limit_notice_once_per_window() {
    let llm = FakeOpenAi::start().await;
    // One message a minute, burst 2: real time spent by the test cannot refill a slot.
    let root = Root::new(
        &llm.base_url,
        "[limits]\nmessages_per_minute = 1\nburst = 2\n",
    );
    let app = root.build();
    let mut replies = Vec::new();
    for i in 0..6 {
        replies.push(app.engine.handle(&msg("1", &format!("m{i}"))).await);
    }
    let kinds: Vec<_> = replies.iter().map(kind).collect();
    assert_eq!(kinds[0], Some(ReplyKind::Answer));
    assert_eq!(kinds[1], Some(ReplyKind::Answer));
    assert_eq!(kinds[2], Some(ReplyKind::Notice(Rejection::RateLimited)));
    assert!(
        text(&replies[2]).contains("Try again in 1m."),
        "{}",
        text(&replies[2])
    );
    assert_eq!(&kinds[3..], &[None, None, None], "one notice per window");
    assert_eq!(llm.request_count(), 2);
    // Just before the window ends: still limited, and still no second notice.
    jump(Duration::from_secs(58)).await;
    assert_eq!(kind(&app.engine.handle(&msg("1", "early")).await), None);
    // Once the window has passed, the user is served again, and a new burst gets a new notice.
    jump(Duration::from_secs(3)).await;
    let again = app.engine.handle(&msg("1", "later")).await;
    assert_eq!(kind(&again), Some(ReplyKind::Answer));
    let mut notices = 0;
    for i in 0..4 {
        let r = app.engine.handle(&msg("1", &format!("n{i}"))).await;
        if kind(&r) == Some(ReplyKind::Notice(Rejection::RateLimited)) {
            notices += 1;
        }
    }
    assert_eq!(notices, 1);
    assert_eq!(llm.request_count(), 3);
    // other users are unaffected
    assert_eq!(
        kind(&app.engine.handle(&msg("2", "hi")).await),
        Some(ReplyKind::Answer)
    );
}

async fn daily_budget_is_enforced_with_one_notice(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, "[limits]\ndaily_tokens = 30\n");
    let app = root.build();
    let first = app
        .engine
        .handle(&msg("1", "tell me a fairly long story about budgets"))
        .await;
    assert_eq!(kind(&first), Some(ReplyKind::Answer));
    let second = app.engine.handle(&msg("1", "more")).await;
    assert_eq!(
        kind(&second),
        Some(ReplyKind::Notice(Rejection::BudgetExhausted))
    );
    assert!(text(&second).contains("resets in"), "{}", text(&second));
    let third = app.engine.handle(&msg("1", "more please")).await;
    assert!(matches!(third, Reply::Silent));
    assert_eq!(llm.request_count(), 1);
    // `confab_rate_limited_total` says "refused by a rate limit or budget": the notice
    // and the silent refusal after it both count.
    let refused = app.engine.stats.rate_limited.load(Ordering::Relaxed);
    assert_eq!(refused, 2);
    assert_eq!(metric(&app, "rate_limited_total", &[]), 2.0);
    let usage = app.engine.handle(&msg("1", "/usage")).await;
    assert!(
        text(&usage).contains("30 tokens per day"),
        "{}",
        text(&usage)
    );
}

async fn cache_hit_makes_no_llm_call(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, "");
    let app = root.build();
    let a = app.engine.handle(&msg("1", "What is Rust?")).await;
    // same persona (the prompt names the user, so use a same-named user on another chat)
    let mut b_msg = msg("2", "what  is rust?");
    b_msg.user_name = "User1".into();
    let b = app.engine.handle(&b_msg).await;
    assert_eq!(kind(&a), Some(ReplyKind::Answer));
    assert_eq!(kind(&b), Some(ReplyKind::Cached));
    assert_eq!(text(&b), "echo: What is Rust?");
    assert_eq!(llm.request_count(), 1);
    let stats = &app.engine.stats;
    assert_eq!(
        stats.cache_hits.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        stats
            .cache_tokens_saved
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // The cached answer still becomes part of user 2's memory.
    let mut follow = msg("2", "and then?");
    follow.user_name = "User1".into();
    app.engine.handle(&follow).await;
    let last = llm.requests().pop().unwrap();
    assert!(last
        .messages
        .iter()
        .any(|(_, c)| c == "echo: What is Rust?"));
    // A different context never hits: user 1 asking again has history now.
    app.engine.handle(&msg("1", "What is Rust?")).await;
    assert_eq!(llm.request_count(), 3);
}

#[tokio::test]
async fn user_scoped_cache_does_not_cross_users() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[cache]\nscope = \"user\"\n");
    let app = root.build();
    let mut a = msg("1", "hi");
    a.user_name = "Same".into();
    let mut b = msg("2", "hi");
    b.user_name = "Same".into();
    app.engine.handle(&a).await;
    let rb = app.engine.handle(&b).await;
    assert_eq!(kind(&rb), Some(ReplyKind::Answer));
    assert_eq!(llm.request_count(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_then_recover() {
    let llm = FakeOpenAi::start().await;
    llm.push_n(2, Behavior::status(500));
    let root = Root::new(&llm.base_url, "[llm]\nmax_retries = 3\n");
    let app = root.build();
    let r = app.engine.handle(&msg("1", "hello")).await;
    assert_eq!(text(&r), "echo: hello");
    assert_eq!(llm.request_count(), 3);
}

#[tokio::test]
async fn retry_after_is_honoured_on_429() {
    let llm = FakeOpenAi::start().await;
    llm.push(Behavior::Status {
        code: 429,
        retry_after: Some(1),
        body: None,
    });
    let root = Root::new(&llm.base_url, "[llm]\nmax_retries = 1\n");
    let app = root.build();
    let t0 = std::time::Instant::now();
    let r = app.engine.handle(&msg("1", "hello")).await;
    assert_eq!(text(&r), "echo: hello");
    // Not a timing goal: proof the Retry-After second was waited rather than a 10 ms backoff.
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(llm.request_count(), 2);
}

#[tokio::test]
async fn persistent_failure_apologises_and_caches_nothing() {
    let llm = FakeOpenAi::start().await;
    llm.set_default(Behavior::status(503));
    let root = Root::new(
        &llm.base_url,
        "[llm]\nmax_retries = 2\nbreaker_failures = 100\n",
    );
    let app = root.build();
    let r = app.engine.handle(&msg("1", "hello")).await;
    assert_eq!(text(&r), MSG_LLM_FAILED);
    assert_eq!(llm.request_count(), 3);
    assert_eq!(app.store.cache_len(), 0);
    // the failed exchange is not stored as memory
    llm.set_default(Behavior::Echo);
    app.engine.handle(&msg("1", "again")).await;
    assert_eq!(llm.requests().pop().unwrap().messages.len(), 2);
}

#[tokio::test]
async fn malformed_and_empty_answers_apologise_and_cache_nothing() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[llm]\nmax_retries = 0\n");
    let app = root.build();
    for b in [Behavior::Malformed, Behavior::Empty, Behavior::NoChoices] {
        llm.push(b.clone());
        let r = app.engine.handle(&msg("1", "hello")).await;
        assert_eq!(text(&r), MSG_LLM_FAILED, "{b:?}");
    }
    assert_eq!(app.store.cache_len(), 0);
}

#[tokio::test]
async fn circuit_opens_and_answers_at_once() {
    let llm = FakeOpenAi::start().await;
    llm.set_default(Behavior::status(500));
    let root = Root::new(
        &llm.base_url,
        "[llm]\nmax_retries = 0\nbreaker_failures = 2\nbreaker_cooldown_secs = 3600\n",
    );
    let app = root.build();
    for u in ["1", "2"] {
        assert_eq!(
            text(&app.engine.handle(&msg(u, "hi")).await),
            MSG_LLM_FAILED
        );
    }
    let calls = llm.request_count();
    let r = app.engine.handle(&msg("3", "hi")).await;
    assert_eq!(text(&r), MSG_LLM_UNAVAILABLE);
    assert_eq!(kind(&r), Some(ReplyKind::Notice(Rejection::LlmUnavailable)));
    assert_eq!(
        llm.request_count(),
        calls,
        "no LLM call while the circuit is open"
    );
}

#[tokio::test]
async fn circuit_recovers_through_a_half_open_probe() {
    let llm = FakeOpenAi::start().await;
    llm.set_default(Behavior::status(500));
    let root = Root::new(
        &llm.base_url,
        "[llm]\nmax_retries = 0\nbreaker_failures = 1\nbreaker_cooldown_secs = 60\n",
    );
    let app = root.build();
    assert_eq!(
        text(&app.engine.handle(&msg("1", "hi")).await),
        MSG_LLM_FAILED
    );
    assert_eq!(
        text(&app.engine.handle(&msg("2", "hi")).await),
        MSG_LLM_UNAVAILABLE
    );
    llm.set_default(Behavior::Echo);
    // Still open just before the cool-down ends: no probe, no LLM call.
    jump(Duration::from_secs(58)).await;
    let calls = llm.request_count();
    assert_eq!(
        text(&app.engine.handle(&msg("3", "hi")).await),
        MSG_LLM_UNAVAILABLE
    );
    assert_eq!(llm.request_count(), calls);
    // After it, one probe goes through and closes the circuit.
    jump(Duration::from_secs(3)).await;
    assert_eq!(text(&app.engine.handle(&msg("3", "hi")).await), "echo: hi");
    assert_eq!(text(&app.engine.handle(&msg("4", "hi")).await), "echo: hi");
}

#[tokio::test]
async fn timeout_is_honoured() {
    let llm = FakeOpenAi::start().await;
    llm.push(Behavior::Hang);
    let root = Root::new(&llm.base_url, "[llm]\ntimeout_secs = 1\nmax_retries = 1\n");
    let app = root.build();
    let r = app.engine.handle(&msg("1", "hello")).await;
    // the hung attempt timed out and the retry answered
    assert_eq!(text(&r), "echo: hello");
    assert_eq!(llm.request_count(), 2);
}

async fn trimming_keeps_the_newest_turns(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(
        backend,
        &llm.base_url,
        "[memory]\nmax_context_tokens = 80\n[limits]\nburst = 100\n",
    );
    let app = root.build();
    for i in 0..12 {
        app.engine
            .handle(&msg("1", &format!("message number {i} about apples")))
            .await;
    }
    let last = llm.requests().pop().unwrap();
    let contents: Vec<&str> = last.messages.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(contents.last(), Some(&"message number 11 about apples"));
    assert!(
        contents.contains(&"echo: message number 10 about apples"),
        "{contents:?}"
    );
    assert!(
        !contents.contains(&"message number 0 about apples"),
        "{contents:?}"
    );
    assert!(
        contents.len() < 24,
        "history was trimmed: {}",
        contents.len()
    );
    // everything is still stored
    let key = msg("1", "").conversation();
    assert_eq!(app.store.all_turns(&key).unwrap().len(), 24);
}

#[tokio::test]
async fn context_length_error_trims_harder_and_retries_once() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[limits]\nburst = 100\n");
    let app = root.build();
    for i in 0..4 {
        app.engine.handle(&msg("1", &format!("turn {i}"))).await;
    }
    llm.push(Behavior::ContextLengthExceeded);
    let r = app.engine.handle(&msg("1", "final")).await;
    assert_eq!(text(&r), "echo: final");
    let reqs = llm.requests();
    let (failed, retried) = (&reqs[reqs.len() - 2], &reqs[reqs.len() - 1]);
    assert!(retried.messages.len() < failed.messages.len());
}

#[tokio::test]
async fn bad_input_gets_clear_notices() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[limits]\nmax_input_chars = 10\n");
    let app = root.build();
    let long = app.engine.handle(&msg("1", "this is far too long")).await;
    assert_eq!(
        text(&long),
        "Your message is too long (20 chars, limit 10). Please shorten it."
    );
    let mut sticker = msg("1", "");
    sticker.content = Content::NonText;
    assert_eq!(text(&app.engine.handle(&sticker).await), MSG_NON_TEXT);
    sticker.is_private = false;
    assert!(matches!(app.engine.handle(&sticker).await, Reply::Silent));
    let unknown = app.engine.handle(&msg("1", "/frobnicate")).await;
    assert!(text(&unknown).contains("/help"), "{}", text(&unknown));
    assert_eq!(llm.request_count(), 0);
}

async fn duplicates_and_crash_redelivery(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, "");
    let app = root.build();
    let m = msg("1", "hello");
    let r = app.engine.handle(&m).await;
    assert_eq!(text(&r), "echo: hello");
    // Redelivered before the send was confirmed (crash between decide and send):
    // the same reply again, no new LLM call, no duplicate turns.
    let again = app.engine.handle(&m).await;
    assert_eq!(text(&again), "echo: hello");
    assert_eq!(llm.request_count(), 1);
    app.engine.mark_sent(&m);
    assert!(matches!(app.engine.handle(&m).await, Reply::Silent));
    assert_eq!(app.store.all_turns(&m.conversation()).unwrap().len(), 2);
}

async fn reset_and_usage_commands(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, "");
    let app = root.build();
    app.engine.handle(&msg("1", "remember me")).await;
    let r = app.engine.handle(&msg("1", "/reset")).await;
    assert_eq!(text(&r), "Done: I forgot this conversation (2 messages).");
    app.engine.handle(&msg("1", "who am I?")).await;
    assert_eq!(llm.requests().pop().unwrap().messages.len(), 2);
    let u = app.engine.handle(&msg("1", "/usage")).await;
    assert!(
        text(&u).contains("6 messages per minute (burst 3)"),
        "{}",
        text(&u)
    );
}

#[tokio::test]
async fn streaming_publishes_partial_text() {
    let llm = FakeOpenAi::start().await;
    llm.push(Behavior::Stream {
        chunks: vec!["Hel".into(), "lo ".into(), "there".into()],
        gap: Duration::from_millis(20),
    });
    let root = Root::with_bot(&llm.base_url, "", "prompt = \"assistant\"\nstream = true\n");
    let app = root.build();
    let (tx, mut rx) = tokio::sync::watch::channel(String::new());
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            seen.push(rx.borrow_and_update().clone());
        }
        seen
    });
    let m = msg("1", "hi");
    let r = app.engine.handle_streaming(&m, Some(&tx)).await;
    drop(tx);
    assert_eq!(text(&r), "Hello there");
    let seen = seen.await.unwrap();
    assert!(seen.len() >= 2, "partial updates: {seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("Hello there"));
    assert!(llm.requests()[0].stream);
}

#[tokio::test]
async fn broken_stream_apologises() {
    let llm = FakeOpenAi::start().await;
    llm.push(Behavior::StreamError {
        chunks: vec!["partial".into()],
    });
    let root = Root::with_bot(
        &llm.base_url,
        "[llm]\nmax_retries = 0\n",
        "prompt = \"assistant\"\nstream = true\n",
    );
    let app = root.build();
    let (tx, _rx) = tokio::sync::watch::channel(String::new());
    let r = app
        .engine
        .handle_streaming(&msg("1", "hi"), Some(&tx))
        .await;
    assert_eq!(text(&r), MSG_LLM_FAILED);
    assert_eq!(app.store.cache_len(), 0);
}

#[tokio::test]
async fn one_conversation_in_order_many_in_parallel() {
    let llm = FakeOpenAi::start().await;
    // Long enough that every conversation's first question is sent before any answer returns.
    llm.set_latency(Duration::from_secs(2));
    let root = Root::new(
        &llm.base_url,
        "[limits]\nmessages_per_minute = 600\nburst = 50\n[llm]\nmax_concurrent = 64\n",
    );
    let app = root.build();
    // 20 users × 3 messages, all handed to the engine at once, in this order: the order
    // inside a conversation must come from the engine, not from the test's timing.
    let messages: Vec<_> = (0..3)
        .flat_map(|i| (0..20).map(move |u| msg(&format!("u{u}"), &format!("q{i}"))))
        .collect();
    let replies = futures::future::join_all(messages.iter().map(|m| app.engine.handle(m))).await;
    for r in &replies {
        assert_eq!(kind(r), Some(ReplyKind::Answer), "{}", text(r));
    }
    for u in 0..20 {
        let key = msg(&format!("u{u}"), "").conversation();
        let turns = app.store.all_turns(&key).unwrap();
        let users: Vec<&str> = turns.iter().step_by(2).map(|t| t.text.as_str()).collect();
        assert_eq!(users, vec!["q0", "q1", "q2"], "order for u{u}");
        // each reply follows its own question
        for pair in turns.chunks(2) {
            assert_eq!(pair[1].text, format!("echo: {}", pair[0].text));
        }
    }
    // In parallel: the first 20 LLM requests were the 20 conversations' first questions.
    let first: std::collections::HashSet<String> = llm
        .requests()
        .iter()
        .take(20)
        .map(|r| r.system().unwrap_or_default().to_string())
        .collect();
    let questions: Vec<String> = llm
        .requests()
        .iter()
        .take(20)
        .map(|r| r.last_user().unwrap_or_default().to_string())
        .collect();
    assert_eq!(first.len(), 20, "20 different users: {first:?}");
    assert!(questions.iter().all(|q| q == "q0"), "{questions:?}");
}

async fn sweeper_purges_old_turns_and_expired_cache(backend: &Backend) {
    use confab::store::{CacheEntry, Role, Turn};
    let llm = FakeOpenAi::start().await;
    let root = Root::on(
        backend,
        &llm.base_url,
        "[memory]\nretention_days = 1\n[cache]\nttl_secs = 60\n",
    );
    let app = root.build();
    let now = confab::engine::now_unix();
    let m = msg("1", "");
    let old = Turn {
        role: Role::User,
        text: "ancient".into(),
        tokens: 1,
        at: now - 3 * 86_400,
    };
    let fresh = Turn {
        role: Role::User,
        text: "recent".into(),
        tokens: 1,
        at: now,
    };
    app.store
        .append_turns(&m.conversation(), &[old, fresh], None)
        .unwrap();
    let entry = |at| CacheEntry {
        reply: "r".into(),
        tokens: 1,
        reply_tokens: 1,
        created_at: at,
        origin: m.user(),
        model: "m".into(),
    };
    app.store
        .cache_put(&[1; 32], &entry(now - 3600), 100)
        .unwrap();
    app.store.cache_put(&[2; 32], &entry(now), 100).unwrap();
    let report = app.engine.sweep().unwrap();
    assert_eq!((report.turns_purged, report.cache_expired), (1, 1));
    let left: Vec<String> = app
        .store
        .all_turns(&m.conversation())
        .unwrap()
        .into_iter()
        .map(|t| t.text)
        .collect();
    assert_eq!(left, vec!["recent"]);
    assert!(app.store.cache_get(&[1; 32]).unwrap().is_none());
    assert!(app.store.cache_get(&[2; 32]).unwrap().is_some());
}

/// The value of the one sample line `name{labels…}` in the engine's metrics, where every
/// `key="value"` in `labels` appears.
fn metric(app: &confab::app::App, name: &str, labels: &[&str]) -> f64 {
    let registry =
        confab::ops::http::registry(app.engine.clone(), app.delivery.clone()).expect("registry");
    let body = confab::ops::http::render(&registry).expect("render");
    let found: Vec<f64> = body
        .lines()
        .filter(|l| {
            l.starts_with(&format!("confab_{name}{{")) || l.starts_with(&format!("confab_{name} "))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?} in:\n{body}");
    found[0]
}

/// A store failure gets the internal-error notice, like an LLM failure gets its apology,
/// but the metrics tell them apart: `internal_errors_total{cause="store"}` versus
/// `llm_failed_replies_total{kind=…}`, and separate reply outcomes.
#[tokio::test]
async fn store_failures_and_llm_failures_are_told_apart_in_metrics() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    let data = root.path().join("data");
    {
        let app = root.build();
        app.engine.handle(&msg("5", "hi")).await;
    }
    {
        let store = confab::store::SledStore::open(&data, 8, 500).expect("open");
        store
            .raw_put("users", b"tg:5", b"\xff{garbage")
            .expect("insert");
        store.db().flush().expect("flush");
    }
    let app = root.build();
    let broken = app.engine.handle(&msg("5", "hello again")).await;
    assert_eq!(kind(&broken), Some(ReplyKind::Notice(Rejection::Internal)));
    llm.push(Behavior::status(400));
    let failed = app.engine.handle(&msg("6", "hello")).await;
    assert_eq!(kind(&failed), Some(ReplyKind::Notice(Rejection::LlmFailed)));

    assert_eq!(
        metric(&app, "internal_errors_total", &["cause=\"store\""]),
        1.0
    );
    assert_eq!(
        metric(&app, "internal_errors_total", &["cause=\"prompt\""]),
        0.0
    );
    assert_eq!(
        metric(&app, "replies_total", &["outcome=\"internal\""]),
        1.0
    );
    assert_eq!(
        metric(&app, "replies_total", &["outcome=\"llm_failed\""]),
        1.0
    );
    assert_eq!(
        metric(&app, "llm_failed_replies_total", &["kind=\"rejected\""]),
        1.0
    );
}
