//! The Telegram adapter end to end: the real teloxide client against the fake Bot API.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::fake_telegram::{FakeTelegram, Fault};
use crate::harness::{Daemon, Root, TG_BOT_TOML, TG_TOKEN};

const WAIT: Duration = Duration::from_secs(20);

async fn setup(extra: &str, bot_toml: &str) -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, extra, bot_toml);
    (llm, tg, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_users_three_messages_in_order_with_memory() {
    let (llm, tg, root) = setup("", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    for round in 0..3 {
        for user in 1..=100i64 {
            tg.send_private(user, &format!("U{user}"), &format!("u{user} m{round}"));
        }
    }
    let sent = tg.wait_for_sent(300, Duration::from_secs(60)).await;
    assert_eq!(sent.len(), 300, "every message answered");
    for user in 1..=100i64 {
        let texts: Vec<String> = tg.sent_to(user).into_iter().map(|m| m.text).collect();
        let want: Vec<String> = (0..3).map(|r| format!("echo: u{user} m{r}")).collect();
        assert_eq!(texts, want, "order for user {user}");
    }
    // memory: each user's third request carried the first two exchanges
    for req in llm.requests() {
        if let Some(q) = req.last_user().filter(|q| q.ends_with(" m2")) {
            let user = q.split_whitespace().next().unwrap_or_default().to_string();
            assert!(
                req.messages.iter().any(|(_, c)| *c == format!("{user} m0")),
                "{q}"
            );
            assert_eq!(
                req.messages.len(),
                6,
                "system + 2 exchanges + question for {q}"
            );
        }
    }
    // the first name reaches the prompt
    let first = llm.requests().into_iter().next().unwrap();
    assert!(
        first.system().unwrap_or_default().contains("helping U"),
        "{:?}",
        first.system()
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_rules_mention_reply_and_commands() {
    let (llm, tg, root) = setup("", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    let group = -100123;
    tg.send_group(group, 5, "Gina", "just chatting, no bot here");
    tg.send_group(group, 5, "Gina", "/help@other_bot");
    tg.send_sticker(group, 5, "Gina", false);
    tg.send_group(group, 5, "Gina", "@acme_staging_bot what is 2+2?");
    let sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].text, "echo: what is 2+2?");
    assert!(sent[0].reply_to.is_some(), "quotes the user in a group");
    tg.send_group_reply_to_bot(group, 5, "Gina", "and 3+3?", sent[0].message_id);
    tg.send_group(group, 5, "Gina", "/help");
    let sent = tg.wait_for_sent(3, WAIT).await;
    assert_eq!(sent[1].text, "echo: and 3+3?");
    assert!(sent[2].text.contains("/reset"), "{}", sent[2].text);
    // give any wrongly handled message time to show up
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tg.sent().len(), 3, "{:#?}", tg.sent());
    assert_eq!(llm.request_count(), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_registered_start_answered_typing_shown() {
    let (llm, tg, root) = setup("", TG_BOT_TOML).await;
    // Slow enough for the typing indicator (shown once an answer takes > TYPING_AFTER).
    llm.set_latency(Duration::from_millis(1000));
    let daemon = Daemon::start(&root);
    tg.send_private(9, "Nina", "/start");
    tg.send_private(9, "Nina", "hello");
    let sent = tg.wait_for_sent(2, WAIT).await;
    assert!(sent[0].text.starts_with("Hi Nina!"), "{}", sent[0].text);
    assert_eq!(sent[1].text, "echo: hello");
    let names: Vec<String> = tg.commands().into_iter().map(|(c, _)| c).collect();
    assert_eq!(
        names,
        vec!["start", "help", "reset", "usage", "export", "forget"]
    );
    assert!(tg.chat_actions().contains(&(9, "typing".to_string())));
    tg.send_sticker(9, 9, "Nina", true);
    let sent = tg.wait_for_sent(3, WAIT).await;
    assert_eq!(
        sent[2].text,
        "I can read text, voice messages and images, but not this kind of message."
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_answer_is_split_and_formatting_falls_back_to_plain() {
    let (llm, tg, root) = setup("", TG_BOT_TOML).await;
    let paragraph = format!("**Point** {}", "lorem ipsum dolor sit amet ".repeat(36));
    let long = vec![paragraph; 10].join("\n\n"); // ≈ 10,000 chars
    assert!(long.chars().count() > 9_500);
    llm.push(Behavior::Reply(long.clone()));
    let daemon = Daemon::start(&root);
    tg.send_private(1, "A", "tell me everything");
    let sent = tg.wait_for_sent(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent_all = tg.sent_to(1);
    assert!(
        sent.len() >= 3 && sent_all.len() <= 4,
        "{} parts",
        sent_all.len()
    );
    for m in &sent_all {
        assert!(m.text.encode_utf16().count() <= 4096);
        assert_eq!(m.parse_mode.as_deref(), Some("HTML"));
        assert!(
            m.text.starts_with("<b>Point</b>"),
            "split on a paragraph boundary"
        );
    }
    // Telegram rejects the entities once: the same part arrives as plain text.
    llm.push(Behavior::Reply("**bold** answer".into()));
    tg.fail_next("sendMessage", Fault::CantParseEntities);
    tg.send_private(2, "B", "format please");
    let sent = tg.wait_for_sent(sent_all.len() + 1, WAIT).await;
    let last = sent.last().unwrap();
    assert_eq!(
        (last.text.as_str(), last.parse_mode.clone()),
        ("**bold** answer", None)
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_429_is_honoured() {
    let (_llm, tg, root) = setup("", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    tg.fail_next("sendMessage", Fault::RetryAfter(1));
    let t0 = std::time::Instant::now();
    tg.send_private(3, "C", "hi");
    let sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].text, "echo: hi");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "waited the retry_after"
    );
    // The fake records a call's status just after answering it: give it a moment.
    let statuses = |tg: &FakeTelegram| -> Vec<u16> {
        tg.calls()
            .into_iter()
            .filter(|c| c.method == "sendmessage")
            .map(|c| c.status)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while statuses(&tg).contains(&0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = statuses(&tg);
    assert_eq!(statuses, vec![429, 200]);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_edits_one_message() {
    let bot = TG_BOT_TOML.replacen(
        "prompt = \"assistant\"\n",
        "prompt = \"assistant\"\nstream = true\n",
        1,
    );
    let (llm, tg, root) = setup("", &bot).await;
    let words: Vec<String> = "one two three four five six"
        .split(' ')
        .map(|w| format!("{w} "))
        .collect();
    llm.push(Behavior::Stream {
        chunks: words,
        gap: Duration::from_millis(400),
    });
    let daemon = Daemon::start(&root);
    tg.send_private(4, "D", "stream it");
    // wait for the final edit
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let msgs = tg.sent_to(4);
        if msgs
            .last()
            .is_some_and(|m| m.text.trim() == "one two three four five six")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{msgs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let msgs = tg.sent_to(4);
    let sends = msgs.iter().filter(|m| m.method == "sendmessage").count();
    let edits = msgs
        .iter()
        .filter(|m| m.method == "editmessagetext")
        .count();
    assert_eq!(sends, 1, "one message: {msgs:#?}");
    assert!(edits >= 2, "edited as tokens arrived: {msgs:#?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_refusal_names_the_variable_and_the_bot() {
    let llm = FakeOpenAi::start().await;
    // The token belongs to the production bot.
    let tg = FakeTelegram::start(TG_TOKEN, "acme_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    let out = tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["run", "--env", "staging", "--root"])
            .arg(root.path())
            .arg("--env-file")
            .arg(root.env_file())
            .output()
            .expect("run confab");
        drop(root);
        out
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ASSISTANT_TELEGRAM_TOKEN"), "{err}");
    assert!(err.contains("@acme_bot"), "{err}");
    assert!(err.contains("production bot"), "{err}");
    assert!(!err.contains(TG_TOKEN), "token leaked: {err}");
    assert_eq!(llm.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_asks_telegram_who_the_token_is() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    let check = |root: &Root| {
        Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["check", "--env", "staging", "--online", "--root"])
            .arg(root.path())
            .arg("--env-file")
            .arg(root.env_file())
            .output()
            .expect("run confab check")
    };
    let ok = tokio::task::block_in_place(|| check(&root));
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(tg.count("getMe"), 1);
    tg.set_bot_username("someone_elses_bot");
    let bad = tokio::task::block_in_place(|| check(&root));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("@someone_elses_bot") && err.contains("ASSISTANT_TELEGRAM_TOKEN"),
        "{err}"
    );
    // check never starts polling or sends anything
    assert_eq!(tg.count("getUpdates") + tg.sent().len(), 0);
}

/// Spawns the real daemon; logs go to `log`.
pub(crate) fn spawn_daemon(
    root: &Root,
    log: &std::path::Path,
    rust_log: &str,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["run", "--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(log)
                .expect("log file"),
        )
        .spawn()
        .expect("spawn confab")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_and_repeats_at_most_the_one_in_flight() {
    let (llm, tg, root) = setup(
        "[limits]\nmessages_per_minute = 10000\nburst = 100\n",
        TG_BOT_TOML,
    )
    .await;
    llm.set_latency(Duration::from_millis(150));
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    let mut asked = Vec::new();
    for i in 0..30i64 {
        for user in 1..=4i64 {
            asked.push((user, format!("q{i} from {user}")));
            tg.send_private(user, "K", &format!("q{i} from {user}"));
        }
    }
    // Kill -9 while replies are flowing.
    tg.wait_for_sent(25, WAIT).await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let before = tg.sent().len();
    let mut child = spawn_daemon(&root, &log, "info");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut counts: HashMap<String, usize> = HashMap::new();
    loop {
        counts.clear();
        for m in tg.sent() {
            *counts.entry(m.text).or_default() += 1;
        }
        let answered = asked
            .iter()
            .filter(|(_, q)| counts.contains_key(&format!("echo: {q}")))
            .count();
        if answered == asked.len() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = child.kill();
    let _ = child.wait();
    let unanswered: Vec<_> = asked
        .iter()
        .filter(|(_, q)| !counts.contains_key(&format!("echo: {q}")))
        .collect();
    assert!(
        unanswered.is_empty(),
        "unanswered after restart: {unanswered:?}\nlog:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    // At most the replies whose send was in flight at the kill (one per conversation).
    assert!(
        duplicates.len() <= 4,
        "duplicates: {duplicates:?} (sent before kill: {before})"
    );
    assert_eq!(tg.sent().len(), asked.len() + duplicates.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_reaches_the_logs() {
    let (llm, tg, root) = setup("", TG_BOT_TOML).await;
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "debug");
    tg.send_private(1, "T", "hello");
    tg.wait_for_sent(1, WAIT).await;
    // Provoke API errors: refused sends, a rate limit, an LLM failure, then the API going away.
    tg.fail_next(
        "sendMessage",
        Fault::BadRequest("Bad Request: chat not found".into()),
    );
    tg.send_private(2, "T", "second");
    tg.fail_next("sendMessage", Fault::RetryAfter(1));
    tg.send_private(3, "T", "third");
    llm.push_n(4, Behavior::status(500));
    tg.send_private(4, "T", "fourth");
    tg.wait_for_sent(3, WAIT).await;
    tg.shutdown();
    // The outage reaches the log at once when the next poll's connection is refused, or
    // up to ~10 s later when it rides a kept-alive connection, gets the fake's 503 and
    // teloxide sleeps before reporting it (DEPENDENCY-FACTS): wait for the line.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let logged = || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("getUpdates failed"));
    while !logged() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("getUpdates failed"),
        "the outage was logged:\n{text}"
    );
    let secret_half = TG_TOKEN.split_once(':').unwrap().1;
    assert_eq!(text.matches(TG_TOKEN).count(), 0, "token in logs:\n{text}");
    assert_eq!(
        text.matches(secret_half).count(),
        0,
        "token in logs:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_document_forget_button_and_cli_while_running() {
    let (_llm, tg, root) = setup("", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    tg.send_private(61, "Eve", "remember the word pelican");
    tg.wait_for_sent(1, WAIT).await;
    // /export arrives as a document that parses as JSON with the user's turns
    tg.send_private(61, "Eve", "/export");
    let sent = tg.wait_for_sent(3, WAIT).await;
    let doc = sent
        .iter()
        .find(|m| m.method == "senddocument")
        .expect("a document");
    assert_eq!(doc.file_name.as_deref(), Some("confab-export-tg-61.json"));
    let json: serde_json::Value = serde_json::from_slice(doc.document.as_deref().unwrap()).unwrap();
    assert!(json.to_string().contains("remember the word pelican"));
    // the operator CLI works while the daemon holds the store (control socket)
    let out = crate::harness::cli_export(&root, "tg:61").await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pelican"));
    // /forget shows an inline Confirm button; pressing it deletes the data
    tg.send_private(61, "Eve", "/forget");
    let sent = tg.wait_for_sent(4, WAIT).await;
    let ask = sent.last().unwrap();
    let markup = ask.reply_markup.clone().expect("inline keyboard");
    assert_eq!(
        markup["inline_keyboard"][0][0]["callback_data"],
        "/forget confirm"
    );
    tg.send_callback_query(61, 61, ask.message_id, "/forget confirm");
    let sent = tg.wait_for_sent(5, WAIT).await;
    assert!(
        sent.last().unwrap().text.starts_with("Deleted: 2 messages"),
        "{:?}",
        sent.last()
    );
    assert_eq!(tg.count("answerCallbackQuery"), 1);
    // and the data is gone: an export through the running daemon finds none of it
    let out = crate::harness::cli_export(&root, "tg:61").await;
    assert_eq!(out.status.code(), Some(0));
    let export: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(export["conversations"], serde_json::json!([]), "{export}");
    assert!(export["profile"].is_null(), "{export}");
    assert!(!export.to_string().contains("pelican"), "{export}");
    daemon.stop().await.unwrap();
}
