//! Telegram webhook mode end to end (SPEC §14): the fake Bot API records setWebhook and
//! POSTs each update to the registered URL with the secret header, redelivering on
//! non-2xx with backoff, as Telegram does.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{wait_exit, Daemon, Root, TG_BOT_TOML, TG_TOKEN};
use crate::telegram::spawn_daemon;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "hook_Secret-0123456789";

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A Telegram root in webhook mode; returns it with the public URL configured.
fn webhook_root(llm: &FakeOpenAi, tg: &FakeTelegram, extra: &str) -> (Root, String) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hooks");
    let settings = format!(
        "{extra}\n[telegram]\napi_url = {api:?}\nglobal_per_second = 10000\nper_chat_per_minute = 6000\ngroup_per_minute = 6000\nmode = \"webhook\"\nwebhook_url = {url:?}\nwebhook_bind = \"127.0.0.1:{port}\"\nwebhook_secret_env = \"HOOK_SECRET\"\n",
        api = tg.api_url
    );
    let root = Root::with_bot(&llm.base_url, &settings, TG_BOT_TOML);
    std::fs::write(
        root.path().join(".env.test"),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nHOOK_SECRET={SECRET}\n"),
    )
    .expect("write env file");
    (root, url)
}

async fn setup(extra: &str) -> (FakeOpenAi, FakeTelegram, Root, String) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let (root, url) = webhook_root(&llm, &tg, extra);
    (llm, tg, root, url)
}

async fn wait_webhook(tg: &FakeTelegram) {
    let deadline = Instant::now() + WAIT;
    while tg.webhook().is_none() {
        assert!(Instant::now() < deadline, "setWebhook was never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `chat` got a message with exactly `text`.
async fn wait_reply(tg: &FakeTelegram, chat: i64, text: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let texts: Vec<String> = tg.sent_to(chat).into_iter().map(|m| m.text).collect();
        if texts.iter().any(|t| t == text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in chat {chat}: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn private_update(user: i64, text: &str) -> serde_json::Value {
    json!({
        "update_id": 900_000 + user,
        "message": {
            "message_id": 77, "date": 1_700_000_000,
            "chat": { "id": user, "type": "private", "first_name": "Eve" },
            "from": { "id": user, "is_bot": false, "first_name": "Eve" },
            "text": text
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_webhook_names_the_url_and_secret_and_a_pushed_update_is_answered() {
    let (llm, tg, root, url) = setup("").await;
    let daemon = Daemon::start(&root);
    wait_webhook(&tg).await;
    let hook = tg.webhook().expect("webhook");
    assert_eq!(hook.url, format!("{url}/telegram/assistant"));
    assert_eq!(hook.secret_token.as_deref(), Some(SECRET));
    assert_eq!(hook.drop_pending_updates.as_deref(), Some("false"));
    assert_eq!(tg.count("getupdates"), 0, "no polling in webhook mode");
    let id = tg.send_private(41, "Ann", "hello over the hook");
    wait_reply(&tg, 41, "echo: hello over the hook").await;
    assert!(tg.acked(id));
    assert_eq!(tg.deliveries(id), 1);
    assert_eq!(llm.request_count(), 1);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_secret_gets_401_and_nothing_is_answered() {
    let (llm, tg, root, url) = setup("").await;
    let (daemon, ops) = Daemon::start_with_ops(&root).await;
    wait_webhook(&tg).await;
    let body = private_update(42, "sneaky").to_string();
    assert_eq!(
        tg.post_webhook(body.as_bytes(), Some("wrong_secret")).await,
        401
    );
    assert_eq!(tg.post_webhook(body.as_bytes(), None).await, 401);
    let almost = &SECRET[..SECRET.len() - 1];
    assert_eq!(tg.post_webhook(body.as_bytes(), Some(almost)).await, 401);
    // Another bot's path, or another method, is nothing.
    let client = reqwest::Client::new();
    let other = client
        .post(format!("{url}/telegram/other"))
        .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(other.status().as_u16(), 404);
    // A later, correct update is answered; the refused one never is.
    tg.send_private(43, "Bob", "proper");
    wait_reply(&tg, 43, "echo: proper").await;
    assert!(tg.sent_to(42).is_empty(), "{:?}", tg.sent_to(42));
    assert!(llm
        .requests()
        .iter()
        .all(|r| r.last_user() != Some("sneaky")));
    let metrics = client
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("confab_telegram_webhook_unauthorized_total{env=\"staging\"} 3"),
        "{metrics}"
    );
    daemon.stop().await.expect("clean stop");
}

/// Seeded hostile bodies: not JSON, JSON that is no update, updates with wrong types.
fn hostile_body(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..8) {
        0 => (0..rng.random_range(0..512))
            .map(|_| rng.random())
            .collect(),
        1 => b"{\"update_id\": ".to_vec(),
        2 => json!({ "message": { "text": "no id" } })
            .to_string()
            .into_bytes(),
        3 => json!({ "update_id": "seven", "message": {} })
            .to_string()
            .into_bytes(),
        4 => json!([1, 2, 3]).to_string().into_bytes(),
        5 => json!({ "update_id": -1, "message": { "chat": 5, "text": ["x"] } })
            .to_string()
            .into_bytes(),
        6 => Vec::new(),
        _ => {
            let text: String = (0..rng.random_range(1..64))
                .map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('\u{fffd}'))
                .collect();
            json!({ "update_id": rng.random_range(1..i64::from(i32::MAX)), "message": { "message_id": 1, "date": 0, "text": text,
                "chat": { "id": "x", "type": "private" } } })
            .to_string()
            .into_bytes()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_200_are_counted_and_later_updates_are_answered() {
    let (_llm, tg, root, _url) = setup("").await;
    let (daemon, ops) = Daemon::start_with_ops(&root).await;
    wait_webhook(&tg).await;
    let seed: u64 = std::env::var("FLOOD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("webhook flood seed {seed} (FLOOD_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..300 {
        let body = hostile_body(&mut rng);
        let status = tg.post_webhook(&body, Some(SECRET)).await;
        // 200: Telegram would redeliver anything else forever.
        assert_eq!(
            status,
            200,
            "body {i} (seed {seed}): {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    tg.send_private(44, "Cy", "still there?");
    wait_reply(&tg, 44, "echo: still there?").await;
    let metrics = reqwest::Client::new()
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let malformed: u64 = metrics
        .lines()
        .find(|l| l.starts_with("confab_telegram_webhook_malformed_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        malformed >= 200,
        "most hostile bodies are no update: {malformed}"
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_update_that_was_answered_is_not_answered_again() {
    let (llm, tg, root, _url) = setup("").await;
    let daemon = Daemon::start(&root);
    wait_webhook(&tg).await;
    let id = tg.send_private(45, "Di", "only once");
    wait_reply(&tg, 45, "echo: only once").await;
    assert!(tg.redeliver(id));
    let deadline = Instant::now() + WAIT;
    while tg.deliveries(id) < 2 || tg.pending_updates() > 0 {
        assert!(Instant::now() < deadline, "the redelivery was not taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A later message in the same chat is answered after the redelivery was handled.
    tg.send_private(45, "Di", "and then");
    wait_reply(&tg, 45, "echo: and then").await;
    let texts: Vec<String> = tg.sent_to(45).into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["echo: only once", "echo: and then"]);
    assert_eq!(llm.request_count(), 2);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_update_survives_kill_9_and_is_answered_after_restart() {
    let (llm, tg, root, _url) = setup("").await;
    // The reply cannot be ready before the kill.
    llm.set_latency(Duration::from_secs(600));
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    wait_webhook(&tg).await;
    let id = tg.send_private(46, "Ed", "keep me");
    assert!(tg.wait_acked(id, WAIT).await, "the update was acknowledged");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(
        tg.sent_to(46).is_empty(),
        "nothing was answered before the kill"
    );
    llm.set_latency(Duration::ZERO);
    let mut child = spawn_daemon(&root, &log, "info");
    wait_reply(&tg, 46, "echo: keep me").await;
    // Answered from the inbox: Telegram never sent it again.
    assert_eq!(tg.deliveries(id), 1);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdin(Stdio::null())
        .status();
    assert_eq!(wait_exit(&mut child, WAIT), Some(0));
}

#[tokio::test]
async fn check_explains_bad_webhook_settings() {
    let tg_api = "http://127.0.0.1:9";
    let settings = format!("[telegram]\napi_url = {tg_api:?}\nmode = \"webhook\"\n");
    let root = Root::with_bot("http://127.0.0.1:9/v1", &settings, TG_BOT_TOML);
    std::fs::write(
        root.path().join(".env.test"),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n"),
    )
    .expect("env file");
    let check = |root: &Root| {
        Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["check", "--env", "staging", "--root"])
            .arg(root.path())
            .arg("--env-file")
            .arg(root.env_file())
            .env_remove("RUST_LOG")
            .output()
            .expect("run confab check")
    };
    let out = check(&root);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in [
        "config/staging.toml: telegram.webhook_url: required with mode = \"webhook\"",
        "config/staging.toml: telegram.webhook_secret_env: environment variable TELEGRAM_WEBHOOK_SECRET is not set",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let settings = format!(
        "[telegram]\napi_url = {tg_api:?}\nmode = \"webhook\"\nwebhook_url = \"https://bot.example.com\"\n"
    );
    let root = Root::with_bot("http://127.0.0.1:9/v1", &settings, TG_BOT_TOML);
    std::fs::write(
        root.path().join(".env.test"),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nTELEGRAM_WEBHOOK_SECRET=\"has spaces/and:colons\"\n"),
    )
    .expect("env file");
    let out = check(&root);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("config/staging.toml: telegram.webhook_secret_env: the secret in TELEGRAM_WEBHOOK_SECRET must be 1 to 256 characters of A-Z, a-z, 0-9, `_` and `-`"),
        "{err}"
    );
    assert!(
        !err.contains("has spaces"),
        "the secret is never echoed: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_answer_503_and_telegrams_redelivery_is_answered_later() {
    let (llm, tg, root, _url) = setup("[delivery]\nmax_pending = 1\n").await;
    // Long enough for the second update to find the queue full (it is refused until then).
    llm.set_latency(Duration::from_secs(4));
    let daemon = Daemon::start(&root);
    wait_webhook(&tg).await;
    let first = tg.send_private(47, "Flo", "first");
    let second = tg.send_private(48, "Gus", "second");
    wait_reply(&tg, 47, "echo: first").await;
    wait_reply(&tg, 48, "echo: second").await;
    assert_eq!(tg.deliveries(first), 1);
    assert!(
        tg.deliveries(second) >= 2,
        "refused (503) while the queue was full, then redelivered: {}",
        tg.deliveries(second)
    );
    assert_eq!(llm.request_count(), 2);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_mode_deletes_a_webhook_left_behind_and_answers() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    // A webhook left by an earlier run in webhook mode: getUpdates answers 409 meanwhile.
    let status = reqwest::Client::new()
        .post(format!("{}/bot{TG_TOKEN}/setWebhook", tg.api_url))
        .header("content-type", "application/json")
        .body(json!({ "url": "http://127.0.0.1:9/old" }).to_string())
        .send()
        .await
        .expect("setWebhook")
        .status();
    assert!(status.is_success());
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    let daemon = Daemon::start(&root);
    tg.send_private(49, "Hal", "polling again");
    wait_reply(&tg, 49, "echo: polling again").await;
    assert!(tg.webhook().is_none(), "deleteWebhook was called");
    daemon.stop().await.expect("clean stop");
}
