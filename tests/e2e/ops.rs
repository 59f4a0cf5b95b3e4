//! Operations with the real binary: backup while running and restore, SIGTERM with a
//! reply in flight, SIGHUP reloading the prompt.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use confab::store::SledStore;

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{Root, TG_BOT_TOML, TG_TOKEN};
use crate::telegram::spawn_daemon;

const WAIT: Duration = Duration::from_secs(20);

fn confab(root: &Root, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .args(["--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .output()
        .expect("run confab")
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn setup() -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    (llm, tg, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_running_then_restore_gives_every_tree_back() {
    let (_llm, tg, root) = setup().await;
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    for u in 1..=5 {
        tg.send_private(u, "B", &format!("backup me {u}"));
    }
    tg.wait_for_sent(5, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = root.path().join("b/confab.backup");
    let out =
        tokio::task::block_in_place(|| confab(&root, &["backup", "--out", file.to_str().unwrap()]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256 verified"));
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );

    let data = root.path().join("data");
    let before = SledStore::open(&data, 8, 500).unwrap().dump().unwrap();
    assert!(before
        .iter()
        .any(|(t, _, v)| t == "turns" && String::from_utf8_lossy(v).contains("backup me 3")));
    // restore refuses a non-empty data dir without --force
    let out = tokio::task::block_in_place(|| {
        confab(&root, &["restore", "--from", file.to_str().unwrap()])
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    std::fs::remove_dir_all(&data).unwrap();
    let out = tokio::task::block_in_place(|| {
        confab(&root, &["restore", "--from", file.to_str().unwrap()])
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = SledStore::open(&data, 8, 500).unwrap().dump().unwrap();
    assert_eq!(before, after, "every tree equal after restore");

    // a damaged backup is rejected and nothing is touched
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    let bad = root.path().join("bad.backup");
    std::fs::write(&bad, bytes).unwrap();
    let out = tokio::task::block_in_place(|| {
        confab(
            &root,
            &["restore", "--force", "--from", bad.to_str().unwrap()],
        )
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        SledStore::open(&data, 8, 500).unwrap().dump().unwrap(),
        after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_reply_in_flight_and_exits_0() {
    let (llm, tg, root) = setup().await;
    llm.set_latency(Duration::from_secs(3));
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "S", "slow question");
    let deadline = Instant::now() + WAIT;
    while llm.request_count() == 0 {
        assert!(Instant::now() < deadline, "the LLM was never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    let code = tokio::task::block_in_place(|| wait_exit(&mut child, WAIT));
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let sent = tg.sent_to(1);
    assert_eq!(
        sent.last().map(|m| m.text.as_str()),
        Some("echo: slow question")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_prompt() {
    let (llm, tg, root) = setup().await;
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "H", "before");
    tg.wait_for_sent(1, WAIT).await;
    std::fs::write(
        root.path().join("prompts/assistant.md"),
        "You are a pirate named {{bot_name}}.",
    )
    .unwrap();
    signal(&child, "-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    tg.send_private(1, "H", "after");
    tg.wait_for_sent(2, WAIT).await;
    let systems: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| r.system().unwrap_or_default().to_string())
        .collect();
    assert!(systems[0].starts_with("You are assistant"), "{systems:?}");
    assert_eq!(systems[1], "You are a pirate named assistant.");
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_data_dir_is_a_clear_start_up_error() {
    let (_llm, _tg, root) = setup().await;
    // data_dir is a file: nobody (not even root) can create a store below it
    std::fs::write(root.path().join("data"), "not a directory").unwrap();
    let out = tokio::task::block_in_place(|| confab(&root, &["chat"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("opening the store in") && err.contains("data"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_style_json_logs_carry_env_and_update_span_but_no_text() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(
        &llm.base_url,
        &tg.api_url,
        "[log]\nformat = \"json\"\n",
        TG_BOT_TOML,
    );
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "J", "a very private kiwi question");
    tg.wait_for_sent(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("kiwi"),
        "message text logged at info:\n{text}"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3);
    assert!(lines.iter().all(|l| l["env"] == "staging"), "{text}");
    let answered = lines
        .iter()
        .find(|l| l["message"] == "update answered")
        .unwrap_or_else(|| panic!("no per-update line:\n{text}"));
    assert_eq!(answered["span"]["platform"], "telegram");
    assert_eq!(answered["span"]["bot"], "assistant");
    assert!(answered["span"]["update"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
}

/// Every form a secret can take in a log line: as text, and as the hex or decimal bytes
/// of a websocket frame dump.
fn leaks(log: &str, secret: &str) -> Vec<&'static str> {
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let dec = secret
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut found = Vec::new();
    if log.contains(secret) {
        found.push("text");
    }
    if log.contains(&hex) {
        found.push("hex bytes");
    }
    if log.contains(&dec) {
        found.push("decimal bytes");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_trace_never_prints_the_discord_token_or_an_interaction_token() {
    use crate::fake_discord::FakeDiscord;
    use crate::harness::{DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN};
    let llm = FakeOpenAi::start().await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::discord(&llm.base_url, &dc.api_url, "", DC_BOT_TOML);
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "trace");
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");
    dc.send_dm(500, 42, "ann", "hello there");
    dc.wait_for_messages(1, WAIT).await;
    let id = dc.send_interaction("usage", serde_json::Value::Null, 42, "ann", 500, None);
    let deadline = Instant::now() + WAIT;
    while !dc.interaction_responses().iter().any(|(i, _)| *i == id) {
        assert!(
            Instant::now() < deadline,
            "the interaction was never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| wait_exit(&mut child, WAIT)),
        Some(0)
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.lines().count() > 20, "trace logging is on:\n{text}");
    let token_part = DC_TOKEN.split('.').next_back().unwrap_or(DC_TOKEN);
    for (what, secret) in [
        ("bot token", DC_TOKEN),
        ("bot token's secret part", token_part),
        ("interaction token", &format!("itok-{id}")),
    ] {
        let found = leaks(&text, secret);
        assert!(found.is_empty(), "{what} in the log as {found:?}");
    }
}

#[tokio::test]
async fn an_llm_error_that_echoes_the_api_key_never_carries_it() {
    use crate::fake_openai::Behavior;
    use confab::llm::{ChatMessage, ChatRequest, ChatRole, LlmProvider, OpenAiProvider};
    let key = "sk-proj-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";
    let llm = FakeOpenAi::start().await;
    let body = serde_json::json!({"error": {
        "message": format!("Incorrect API key provided: {key}. You can find your API key at ..."),
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    let provider = OpenAiProvider::new(&llm.base_url, key, Duration::from_secs(5)).unwrap();
    let request = || ChatRequest {
        model: "m".into(),
        messages: vec![ChatMessage::new(ChatRole::User, "hi".to_string())],
        temperature: None,
        max_tokens: None,
    };
    for stream in [false, true] {
        llm.push(Behavior::Status {
            code: 401,
            retry_after: None,
            body: Some(body.to_string()),
        });
        let err = if stream {
            match provider.stream(request()).await {
                Err(e) => e,
                Ok(mut s) => match futures::StreamExt::next(&mut s).await {
                    Some(Err(e)) => e,
                    other => panic!(
                        "stream: expected an error, got {:?}",
                        other.map(|r| r.is_ok())
                    ),
                },
            }
        } else {
            provider.complete(request()).await.unwrap_err()
        };
        let text = format!("{err} / {err:?}");
        assert!(!text.contains(key), "stream={stream}: {text}");
        assert!(text.contains("[REDACTED]"), "stream={stream}: {text}");
    }
}
