//! Issue 11 hardening through the public API: the LLM slot discipline (one slot per call,
//! bounded waits), hostile prompts (failed attempts charged, one request counted once
//! by the breaker, one call per user), the commands quota, the audit's refusal rows and
//! retention, and the ops endpoint's header timeout and connection cap.

use std::net::SocketAddr;
use std::time::Duration;

use confab::domain::{Inbound, Reply};
use confab::engine::{MSG_BUSY, MSG_LLM_UNAVAILABLE};
use confab::store::AuditEntry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::harness::{msg, text, Root};

const WAIT: Duration = Duration::from_secs(60);

/// A message of `user` in chat `chat` (a group when it differs from the user).
fn in_chat(user: &str, chat: &str, body: &str) -> Inbound {
    let mut m = msg(user, body);
    m.chat_id = chat.into();
    m.is_private = chat == user;
    m
}

async fn streamed(engine: &confab::engine::Engine, inbound: Inbound) -> Reply {
    let (tx, _rx) = tokio::sync::watch::channel(String::new());
    engine.handle_streaming(&inbound, Some(&tx)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_with_more_users_than_llm_slots_answers_everyone() {
    // Regression: a stream took one slot and its first attempt a second one, so with
    // a single slot (llama.cpp) every streamed call waited for itself forever.
    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_millis(50));
    let root = Root::with_bot(
        &llm.base_url,
        "[llm]\nmax_concurrent = 1\n",
        "prompt = \"assistant\"\nstream = true\n",
    );
    let app = root.build();
    let calls = (1..=4).map(|u| {
        let engine = app.engine.clone();
        tokio::spawn(async move { streamed(&engine, msg(&u.to_string(), "hi there")).await })
    });
    let replies = tokio::time::timeout(WAIT, futures::future::join_all(calls))
        .await
        .expect("streamed replies must not hang");
    for r in replies {
        assert_eq!(text(&r.expect("task")), "echo: hi there");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_an_llm_slot_is_bounded_then_the_user_gets_the_busy_apology() {
    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_secs(4));
    let root = Root::new(
        &llm.base_url,
        "[llm]\nmax_concurrent = 1\nqueue_timeout_secs = 1\n",
    );
    let app = root.build();
    let first = {
        let engine = app.engine.clone();
        tokio::spawn(async move { engine.handle(&msg("1", "slow question")).await })
    };
    // Wait until the first call holds the only slot.
    while llm.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = app.engine.handle(&msg("2", "another question")).await;
    assert_eq!(text(&second), MSG_BUSY);
    assert_eq!(text(&first.await.expect("task")), "echo: slow question");
    assert_eq!(
        llm.request_count(),
        1,
        "the busy call never reached the LLM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_has_one_llm_call_in_flight_across_their_conversations() {
    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_secs(4));
    let root = Root::new(&llm.base_url, "[llm]\nqueue_timeout_secs = 1\n");
    let app = root.build();
    let first = {
        let engine = app.engine.clone();
        tokio::spawn(async move { engine.handle(&in_chat("1", "1", "question in a DM")).await })
    };
    while llm.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The same user in a group, and another user, at the same time.
    let (group_msg, other_msg) = (
        in_chat("1", "-100", "question in a group"),
        in_chat("2", "-100", "my own question"),
    );
    let (same_user, other_user) =
        tokio::join!(app.engine.handle(&group_msg), app.engine.handle(&other_msg),);
    assert_eq!(text(&same_user), MSG_BUSY);
    assert_eq!(text(&other_user), "echo: my own question");
    assert_eq!(text(&first.await.expect("task")), "echo: question in a DM");
    // The busy apology is counted where `confab_llm_busy_total` reads it.
    let busy = &app.engine.llm().stats.busy_rejections;
    assert_eq!(busy.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Tokens used today, as `/usage` tells the user.
async fn used_today(engine: &confab::engine::Engine, user: &str) -> u64 {
    let usage = text(&engine.handle(&msg(user, "/usage")).await);
    let after = usage
        .split("Used today: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no usage figure in {usage:?}"));
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {usage:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_hostile_prompts_are_charged_and_do_not_open_the_circuit_for_everyone() {
    let llm = FakeOpenAi::start().await;
    llm.set_default(Behavior::Hang);
    let root = Root::new(
        &llm.base_url,
        "[llm]\ntimeout_secs = 1\nmax_retries = 2\nbreaker_failures = 5\n",
    );
    let app = root.build();
    for n in 0..2 {
        let essay = format!("write a 20000 word essay, part {n}");
        let r = app.engine.handle(&msg("66", &essay)).await;
        assert_ne!(text(&r), format!("echo: {essay}"));
    }
    assert_eq!(llm.request_count(), 6, "three attempts per message");
    // Every attempt asked for a bounded answer (default max_tokens).
    assert!(llm.requests().iter().all(|r| r.max_tokens == Some(1024)));
    // The prompts of the timed-out attempts were paid for: they count.
    assert!(used_today(&app.engine, "66").await > 0);
    // Two requests are two failures, not six: everyone else is still served.
    llm.set_default(Behavior::Echo);
    let other = app.engine.handle(&msg("67", "hello")).await;
    assert_ne!(text(&other), MSG_LLM_UNAVAILABLE);
    assert_eq!(text(&other), "echo: hello");
}

#[tokio::test]
async fn a_broken_stream_charges_what_was_generated() {
    let llm = FakeOpenAi::start().await;
    llm.set_default(Behavior::StreamError {
        chunks: vec!["Once upon a time ".into(), "there was a long essay".into()],
    });
    let root = Root::with_bot(
        &llm.base_url,
        "[llm]\nmax_retries = 0\n",
        "prompt = \"assistant\"\nstream = true\n",
    );
    let app = root.build();
    let r = streamed(&app.engine, msg("70", "tell me a story")).await;
    assert!(!text(&r).contains("essay"), "{}", text(&r));
    assert!(used_today(&app.engine, "70").await > 0);
}

#[tokio::test]
async fn commands_have_their_own_quota_with_one_notice() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(
        &llm.base_url,
        "[limits]\ncommands_per_minute = 1\ncommands_burst = 3\n",
    );
    let app = root.build();
    let mut replies = Vec::new();
    for _ in 0..6 {
        replies.push(text(&app.engine.handle(&msg("5", "/help")).await));
    }
    assert!(
        replies[..3].iter().all(|r| r.contains("/reset")),
        "{replies:?}"
    );
    assert!(replies[3].contains("Try again in"), "{replies:?}");
    assert!(replies[4..].iter().all(|r| r == "<silent>"), "{replies:?}");
    // Chat messages keep their own quota.
    assert_eq!(text(&app.engine.handle(&msg("5", "hi")).await), "echo: hi");
}

#[tokio::test]
async fn a_refused_admin_command_keeps_only_its_name_and_old_audit_rows_are_purged() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[audit]\nretention_days = 30\n");
    let app = root.build();
    let store = app.engine.store().clone();
    let old = AuditEntry {
        at: confab::engine::now_unix() - 31 * 86_400,
        actor: "tg:1".into(),
        command: "/admin stats".into(),
        target: None,
        result: "ok".into(),
    };
    store.audit_append(&old).expect("append");
    let r = app
        .engine
        .handle(&msg("9", "/admin ban tg:5 my secret reason 0xdeadbeef"))
        .await;
    assert!(text(&r).contains("operators only"));
    let rows = store.audit_recent(10).expect("audit");
    let refusal = rows.first().expect("a refusal row");
    assert_eq!(refusal.command, "/admin ban");
    assert_eq!(refusal.actor, "tg:9");
    let everything = format!("{rows:?}");
    assert!(!everything.contains("secret"), "{everything}");

    let report = app.engine.sweep().expect("sweep");
    assert_eq!(report.audit_purged, 1);
    let rows = store.audit_recent(10).expect("audit");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].command, "/admin ban");
}

async fn ops_endpoint() -> (
    SocketAddr,
    tokio_util::sync::CancellationToken,
    Root,
    FakeOpenAi,
) {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    let app = root.build();
    let stop = tokio_util::sync::CancellationToken::new();
    let readiness = std::sync::Arc::new(confab::ops::http::Readiness::default());
    let server = confab::ops::http::start(
        "127.0.0.1:0".parse().expect("addr"),
        app.engine.clone(),
        app.delivery.clone(),
        readiness,
        stop.clone(),
    )
    .await
    .expect("ops endpoint");
    (server.addr, stop, root, llm)
}

/// Reads until the peer closes; the bytes read. Well under hyper's own 30 s default
/// (which applies only when a timer is configured), well over our 5 s.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the server must close the connection");
    out
}

#[tokio::test]
async fn the_ops_endpoint_drops_a_client_that_never_finishes_its_headers() {
    let (addr, stop, _root, _llm) = ops_endpoint().await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let got = read_to_close(&mut slow).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "no answer to half a request"
    );
    stop.cancel();
}

#[tokio::test]
async fn the_ops_endpoint_caps_open_connections() {
    let (addr, stop, _root, _llm) = ops_endpoint().await;
    let cap = confab::ops::http::MAX_CONNECTIONS;
    let mut idle = Vec::new();
    for _ in 0..cap {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        idle.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let got = read_to_close(&mut extra).await;
    assert!(
        got.is_empty(),
        "over the cap: closed without an answer, got {:?}",
        String::from_utf8_lossy(&got)
    );
    drop(idle);
    // Slots come back: a new client is served again.
    let mut ok = None;
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let got = read_to_close(&mut s).await;
        if !got.is_empty() {
            ok = Some(String::from_utf8_lossy(&got).to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok
        .expect("served after the idle ones left")
        .contains("200 OK"));
    stop.cancel();
}
