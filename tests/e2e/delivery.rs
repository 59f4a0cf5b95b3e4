//! Delivery faults while the daemon runs (SPEC §11): platform outages, 429s with
//! `retry_after` (Discord's global one too), permanent refusals, queue overflow and a
//! panicking update. Each ends with every reply delivered exactly once (or refused for
//! good), in order per conversation, without a restart. Real daemon, real clients,
//! the in-process fakes; waits are on events, never fixed sleeps before an assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use confab::store::{InboxStore, SledStore};
use serde_json::{json, Value};

use crate::fake_discord::FakeDiscord;
use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::{FakeTelegram, Fault};
use crate::harness::{
    Daemon, Root, DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN, TG_BOT_TOML, TG_TOKEN,
};

const NO_LIMITS: &str = "[limits]\nmessages_per_minute = 10000\nburst = 1000\n";
/// Long enough for a 20 s outage plus the longest backoff wait that can follow it (30 s).
const OUTAGE_WAIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(20);
const BUSY: &str = "I'm busy right now — please send that again in a minute.";

async fn telegram(extra: &str) -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, extra, TG_BOT_TOML);
    (llm, tg, root)
}

async fn discord(extra: &str) -> (FakeOpenAi, FakeDiscord, Root, Daemon) {
    let llm = FakeOpenAi::start().await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::discord(&llm.base_url, &dc.api_url, extra, DC_BOT_TOML);
    let daemon = Daemon::start(&root);
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");
    (llm, dc, root, daemon)
}

/// Every inbox entry left in the stopped daemon's store.
fn inbox(root: &Root) -> Vec<String> {
    let store = SledStore::open(&root.path().join("data"), 16, 500).expect("open store");
    let mut keys: Vec<String> = ["tg/", "dc/", "parked/"]
        .iter()
        .flat_map(|p| store.inbox_scan(p).expect("scan"))
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    keys
}

/// Polls `what` until it holds or `timeout` passes; panics with `describe()`.
async fn wait_until(
    timeout: Duration,
    mut what: impl FnMut() -> bool,
    describe: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !what() {
        assert!(Instant::now() < deadline, "timed out: {}", describe());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fake records a call's status just after answering it: calls of `method` once
/// every one has its status.
async fn tg_attempts(tg: &FakeTelegram, method: &str, n: usize) -> Vec<(Instant, u16)> {
    let done = |a: &[(Instant, u16)]| a.len() >= n && a.iter().all(|(_, s)| *s != 0);
    wait_until(
        WAIT,
        || done(&tg.attempts(method)),
        || format!("{:?}", tg.attempts(method)),
    )
    .await;
    tg.attempts(method)
}

/// Discord calls (arrival, status) whose method is `method` and path ends with `path`.
fn dc_calls(dc: &FakeDiscord, method: &str, path: &str) -> Vec<(Instant, u16)> {
    dc.calls()
        .into_iter()
        .filter(|c| c.method == method && c.path.ends_with(path))
        .map(|c| (c.at, c.status))
        .collect()
}

fn dc_texts(dc: &FakeDiscord, channel: u64) -> Vec<String> {
    dc.messages_in(channel)
        .into_iter()
        .map(|m| m.content)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_send_message_502_for_20_s_every_reply_once_in_order_without_restart() {
    let (_llm, tg, root) = telegram(NO_LIMITS).await;
    let daemon = Daemon::start(&root);
    tg.fail_for(
        "sendMessage",
        Fault::Status(502, "Bad Gateway".into()),
        Duration::from_secs(20),
    );
    let started = Instant::now();
    for round in 0..2 {
        for user in 1..=3i64 {
            tg.send_private(user, "U", &format!("u{user} m{round}"));
        }
    }
    // More users write while the first replies wait.
    wait_until(
        WAIT,
        || tg.count("sendMessage") >= 3,
        || format!("{:?}", tg.calls()),
    )
    .await;
    tg.send_private(4, "V", "u4 m0");
    let sent = tg.wait_for_sent(7, OUTAGE_WAIT).await;
    assert_eq!(sent.len(), 7, "every reply delivered: {sent:#?}");
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "not during the outage"
    );
    daemon.stop().await.expect("clean stop");
    for user in 1..=3i64 {
        let texts: Vec<String> = tg.sent_to(user).into_iter().map(|m| m.text).collect();
        let want: Vec<String> = (0..2).map(|r| format!("echo: u{user} m{r}")).collect();
        assert_eq!(texts, want, "once each, in order, for user {user}");
    }
    assert_eq!(tg.sent_to(4).len(), 1);
    assert_eq!(tg.sent().len(), 7, "nothing twice");
    assert!(inbox(&root).is_empty(), "{:?}", inbox(&root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_5xx_for_20_s_every_reply_once_in_order_without_restart() {
    let (_llm, dc, root, daemon) = discord(NO_LIMITS).await;
    dc.fail_for("POST", "/messages", 502, Duration::from_secs(20));
    let started = Instant::now();
    for round in 0..2 {
        for user in 1..=3u64 {
            dc.send_dm(600 + user, 60 + user, "dee", &format!("u{user} m{round}"));
        }
    }
    let msgs = dc.wait_for_messages(6, OUTAGE_WAIT).await;
    assert_eq!(msgs.len(), 6, "every reply delivered: {msgs:#?}");
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "not during the outage"
    );
    daemon.stop().await.expect("clean stop");
    for user in 1..=3u64 {
        let want: Vec<String> = (0..2).map(|r| format!("echo: u{user} m{r}")).collect();
        assert_eq!(dc_texts(&dc, 600 + user), want, "once each, in order");
        let failed = dc_calls(&dc, "POST", &format!("/channels/{}/messages", 600 + user));
        assert!(failed.iter().any(|(_, s)| *s == 502), "retried: {failed:?}");
    }
    assert_eq!(dc.messages().len(), 6, "nothing twice");
    assert!(inbox(&root).is_empty(), "{:?}", inbox(&root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_429_retry_after_3_s_is_waited_out() {
    let (_llm, tg, root) = telegram("").await;
    let daemon = Daemon::start(&root);
    tg.fail_next("sendMessage", Fault::RetryAfter(3));
    tg.send_private(3, "C", "hi");
    let sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].text, "echo: hi");
    let attempts = tg_attempts(&tg, "sendMessage", 2).await;
    let statuses: Vec<u16> = attempts.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, vec![429, 200]);
    let waited = attempts[1].0 - attempts[0].0;
    assert!(waited >= Duration::from_secs(3), "retried after {waited:?}");
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_429_retry_after_3_s_is_waited_out_and_a_global_one_pauses_every_send() {
    let (_llm, dc, root, daemon) = discord(NO_LIMITS).await;
    // A route's 429: the body says 3 s (the headers too).
    dc.fail_next(
        "POST",
        "/channels/560/messages",
        429,
        Value::Null,
        Some(3.0),
    );
    dc.send_dm(560, 56, "rae", "slow down");
    let msgs = dc.wait_for_messages(1, WAIT).await;
    assert_eq!(dc_texts(&dc, 560), vec!["echo: slow down"], "{msgs:#?}");
    let calls = dc_calls(&dc, "POST", "/channels/560/messages");
    assert_eq!(
        calls.iter().map(|c| c.1).collect::<Vec<_>>(),
        vec![429, 200]
    );
    let waited = calls[1].0 - calls[0].0;
    assert!(waited >= Duration::from_secs(3), "retried after {waited:?}");

    // A global 429 pauses every send of the bot, other conversations' too.
    dc.fail_next_global("POST", "/channels/570/messages", 3.0);
    dc.send_dm(570, 57, "gus", "first");
    wait_until(
        WAIT,
        || !dc_calls(&dc, "POST", "/channels/570/messages").is_empty(),
        || format!("{:#?}", dc.calls()),
    )
    .await;
    let limited = dc_calls(&dc, "POST", "/channels/570/messages")[0].0;
    dc.send_dm(571, 58, "hal", "second");
    wait_until(
        WAIT,
        || dc_texts(&dc, 570).len() == 1 && dc_texts(&dc, 571).len() == 1,
        || format!("{:#?}", dc.messages()),
    )
    .await;
    for channel in [570, 571] {
        let path = format!("/channels/{channel}/messages");
        let sent = dc_calls(&dc, "POST", &path);
        let (at, status) = *sent.last().expect("a send");
        assert_eq!(status, 200);
        assert!(
            at - limited >= Duration::from_secs(3),
            "{channel} sent {:?} after the global 429",
            at - limited
        );
    }
    assert_eq!(
        dc_calls(&dc, "POST", "/channels/571/messages").len(),
        1,
        "paused, not refused"
    );
    daemon.stop().await.expect("clean stop");
    assert!(inbox(&root).is_empty(), "{:?}", inbox(&root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_bot_is_not_retried_and_nothing_stays_in_the_inbox() {
    let (_llm, tg, root) = telegram(NO_LIMITS).await;
    let daemon = Daemon::start(&root);
    tg.fail_next(
        "sendMessage",
        Fault::Status(403, "Forbidden: bot was blocked by the user".into()),
    );
    tg.send_private(9, "B", "first");
    // The conversation is served in order: once the second reply is out, the first
    // one's refusal was handled.
    wait_until(
        WAIT,
        || tg.count("sendMessage") >= 1,
        || format!("{:?}", tg.calls()),
    )
    .await;
    tg.send_private(9, "B", "second");
    let sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].text, "echo: second");
    daemon.stop().await.expect("clean stop");
    let statuses: Vec<u16> = tg.attempts("sendMessage").iter().map(|a| a.1).collect();
    assert_eq!(
        statuses,
        vec![403, 200],
        "the refused reply was tried exactly once"
    );
    assert!(inbox(&root).is_empty(), "{:?}", inbox(&root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_conversation_queue_gets_one_busy_notice_and_the_queued_ones_are_answered() {
    let extra = format!("{NO_LIMITS}\n[delivery]\nmax_queue_per_chat = 3\n");
    let (llm, tg, root) = telegram(&extra).await;
    llm.set_latency(Duration::from_secs(2));
    let daemon = Daemon::start(&root);
    for i in 0..6 {
        tg.send_private(5, "Q", &format!("q{i}"));
    }
    let sent = tg.wait_for_sent(4, WAIT).await;
    daemon.stop().await.expect("clean stop");
    let texts: Vec<String> = tg.sent_to(5).into_iter().map(|m| m.text).collect();
    assert_eq!(
        texts.iter().filter(|t| *t == BUSY).count(),
        1,
        "one busy notice per minute: {sent:#?}"
    );
    let answers: Vec<&String> = texts.iter().filter(|t| *t != BUSY).collect();
    assert_eq!(
        answers,
        vec!["echo: q0", "echo: q1", "echo: q2"],
        "in order"
    );
    assert_eq!(
        llm.request_count(),
        3,
        "the refused ones never reached the LLM"
    );
    assert!(
        inbox(&root).is_empty(),
        "refused updates are not stored: {:?}",
        inbox(&root)
    );
}

async fn readyz(addr: SocketAddr) -> u16 {
    let client = reqwest13::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    match client.get(format!("http://{addr}/readyz")).send().await {
        Ok(resp) => resp.status().as_u16(),
        Err(e) => panic!("GET /readyz: {e}"),
    }
}

async fn wait_readyz(addr: SocketAddr, want: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = readyz(addr).await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed {status}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_panics_does_not_stop_intake_and_readyz_follows_the_poller() {
    let (_llm, tg, root) = telegram(NO_LIMITS).await;
    let (daemon, addr) = Daemon::start_with_ops(&root).await;
    let group = -100777;
    // Case folding changes byte lengths here (the ohm sign U+2126 shrinks, U+0130 grows,
    // the total stays the same): stripping the mention once panicked the polling task
    // for good. The entity's offset is in UTF-16 units, as Telegram sends it.
    let text = "\u{2126}\u{2126} @acme_staging_bot \u{130}\u{130} question";
    tg.send_update(json!({ "message": {
        "message_id": 900,
        "from": { "id": 7, "is_bot": false, "first_name": "Pia" },
        "date": 1_700_000_000,
        "chat": { "id": group, "type": "supergroup", "title": "G" },
        "text": text,
        "entities": [{ "type": "mention", "offset": 3, "length": 17 }],
    }}));
    tg.send_group(group, 7, "Pia", "@acme_staging_bot hello");
    wait_until(
        WAIT,
        || tg.sent_to(group).iter().any(|m| m.text == "echo: hello"),
        || format!("{:#?}", tg.sent()),
    )
    .await;
    wait_readyz(addr, 200).await;

    // The Bot API goes away: not ready while polling fails; ready and answering after.
    tg.shutdown();
    wait_readyz(addr, 503).await;
    tg.restart().await.expect("fake back");
    tg.send_private(8, "Ray", "back?");
    wait_until(
        WAIT,
        || tg.sent_to(8).iter().any(|m| m.text == "echo: back?"),
        || format!("{:#?}", tg.sent()),
    )
    .await;
    wait_readyz(addr, 200).await;
    daemon.stop().await.expect("clean stop");
}
