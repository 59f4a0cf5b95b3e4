//! The Discord adapter end to end: the real serenity client against the fake REST API
//! and gateway.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_discord::{FakeDiscord, SentMessage};
use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::fake_telegram::FakeTelegram;
use crate::harness::{
    Daemon, Root, DC_APP_PRODUCTION, DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN, TG_TOKEN,
};

const WAIT: Duration = Duration::from_secs(20);
const NO_LIMITS: &str = "[limits]\nmessages_per_minute = 10000\nburst = 100\n";

async fn setup(extra: &str, bot_toml: &str) -> (FakeOpenAi, FakeDiscord, Root) {
    let llm = FakeOpenAi::start().await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::discord(&llm.base_url, &dc.api_url, extra, bot_toml);
    (llm, dc, root)
}

async fn start(root: &Root, dc: &FakeDiscord) -> Daemon {
    let daemon = Daemon::start(root);
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");
    daemon
}

/// Waits until a bot message satisfies `pred`; returns every message so far.
async fn wait_for(
    dc: &FakeDiscord,
    what: &str,
    pred: impl Fn(&SentMessage) -> bool,
) -> Vec<SentMessage> {
    let deadline = Instant::now() + WAIT;
    loop {
        let msgs = dc.messages();
        if msgs.iter().any(&pred) {
            return msgs;
        }
        assert!(Instant::now() < deadline, "no {what}: {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn contents(msgs: &[SentMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.content.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_conversation_with_memory_in_order() {
    let (llm, dc, root) = setup(NO_LIMITS, DC_BOT_TOML).await;
    // Slow enough for the typing indicator (shown once an answer takes > TYPING_AFTER).
    llm.set_latency(Duration::from_millis(1000));
    let daemon = start(&root, &dc).await;
    dc.send_dm(500, 42, "ann", "my name is Ann");
    let sent = dc.wait_for_messages(1, WAIT).await;
    assert_eq!(sent[0].content, "echo: my name is Ann");
    assert_eq!(sent[0].kind, "create");
    assert_eq!(sent[0].reply_to, None, "no quoting in a DM");
    llm.set_latency(Duration::from_millis(200));
    dc.send_dm(500, 42, "ann", "what is my name?");
    let sent = dc.wait_for_messages(2, WAIT).await;
    assert_eq!(sent[1].content, "echo: what is my name?");
    let req = llm.requests().pop().unwrap();
    assert_eq!(req.last_user(), Some("what is my name?"));
    let history: Vec<&str> = req.messages.iter().map(|(_, c)| c.as_str()).collect();
    assert!(
        history.contains(&"my name is Ann") && history.contains(&"echo: my name is Ann"),
        "the first exchange is remembered: {history:?}"
    );
    assert!(req
        .system()
        .unwrap_or_default()
        .contains("helping ann on discord"));
    assert!(dc.typing_count(500) >= 1, "typing shown while waiting");
    // A burst in one conversation is answered in order (serenity runs handlers concurrently).
    for i in 0..6 {
        dc.send_dm(501, 43, "bob", &format!("b{i}"));
    }
    wait_for(&dc, "sixth answer", |m| m.content == "echo: b5").await;
    let want: Vec<String> = (0..6).map(|i| format!("echo: b{i}")).collect();
    assert_eq!(contents(&dc.messages_in(501)), want);
    // Slash commands were registered at READY.
    let names: Vec<String> = dc
        .registered_commands()
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    for name in ["start", "help", "reset", "usage", "ask"] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_messages_need_a_mention_or_a_reply_to_the_bot() {
    let (llm, dc, root) = setup("", DC_BOT_TOML).await;
    let daemon = start(&root, &dc).await;
    let (guild, channel) = (77, 600);
    dc.send_guild(
        guild,
        channel,
        44,
        "gina",
        "just chatting, no bot here",
        false,
    );
    dc.send_guild(guild, channel, 44, "gina", "talking about <@2000>", false);
    let asked = dc.send_guild(guild, channel, 44, "gina", "what is 2+2?", true);
    let sent = dc.wait_for_messages(1, WAIT).await;
    assert_eq!(sent[0].content, "echo: what is 2+2?", "mention stripped");
    assert_eq!(sent[0].reply_to, Some(asked), "quotes the user in a guild");
    dc.send_guild_reply_to_bot(guild, channel, 44, "gina", "and 3+3?", sent[0].message_id);
    let sent = dc.wait_for_messages(2, WAIT).await;
    assert_eq!(sent[1].content, "echo: and 3+3?");
    // give any wrongly handled message time to show up
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dc.messages().len(), 2, "{:#?}", dc.messages());
    assert_eq!(llm.request_count(), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slash_commands_are_deferred_and_answered_by_follow_up() {
    let (llm, dc, root) = setup("", DC_BOT_TOML).await;
    let daemon = start(&root, &dc).await;
    dc.set_callback_deadline(Some(Duration::from_secs(3)));
    let help = dc.send_interaction("help", Value::Null, 45, "hal", 700, None);
    let msgs = wait_for(&dc, "help follow-up", |m| m.kind == "followup").await;
    let follow = msgs.iter().find(|m| m.kind == "followup").unwrap();
    assert_eq!(follow.interaction_id, Some(help));
    assert!(follow.content.contains("/reset"), "{}", follow.content);
    let responses = dc.interaction_responses();
    assert_eq!(responses.len(), 1);
    assert_eq!(
        (responses[0].0, responses[0].1["type"].clone()),
        (help, json!(5))
    );
    assert_eq!(llm.request_count(), 0, "commands need no LLM");

    // A slow LLM: the deferral beats the 3 s deadline, the answer follows.
    llm.set_latency(Duration::from_secs(4));
    let t0 = Instant::now();
    let ask = dc.send_interaction(
        "ask",
        json!({"prompt": "slow question"}),
        45,
        "hal",
        701,
        Some(9),
    );
    let msgs = wait_for(&dc, "ask follow-up", |m| m.interaction_id == Some(ask)).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "answered after the LLM"
    );
    let answer: Vec<_> = msgs
        .iter()
        .filter(|m| m.interaction_id == Some(ask))
        .collect();
    assert_eq!(answer.len(), 1, "{answer:#?}");
    assert_eq!(
        (answer[0].kind.as_str(), answer[0].content.as_str()),
        ("followup", "echo: slow question")
    );
    let callbacks: Vec<u16> = dc
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with("/callback"))
        .map(|c| c.status)
        .collect();
    assert_eq!(
        callbacks,
        vec![204, 204],
        "both deferrals within the deadline"
    );
    assert!(dc
        .interaction_responses()
        .iter()
        .any(|(id, body)| *id == ask && body["type"] == 5));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5000_character_answer_is_split_on_paragraphs_in_order() {
    let (llm, dc, root) = setup("", DC_BOT_TOML).await;
    let paragraphs: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "Paragraph {i}: {}",
                "lorem ipsum dolor sit amet ".repeat(18)
            )
        })
        .collect();
    let long = paragraphs.join("\n\n");
    assert!(long.chars().count() >= 5000, "{}", long.chars().count());
    llm.push(Behavior::Reply(long.clone()));
    let daemon = start(&root, &dc).await;
    dc.send_dm(510, 46, "lena", "tell me everything");
    dc.wait_for_messages(4, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let parts = dc.messages_in(510);
    // ≈500-character paragraphs: three fit in 2000, a fourth would not.
    assert_eq!(parts.len(), 4, "{:#?}", contents(&parts));
    for p in &parts {
        assert!(p.content.chars().count() <= 2000, "{}", p.content.len());
        assert!(
            p.content.starts_with("Paragraph "),
            "split on a paragraph boundary"
        );
        assert!(p.content.ends_with("amet "), "whole paragraphs only");
    }
    assert_eq!(
        contents(&parts).join("\n\n"),
        long,
        "all delivered, in order"
    );
    daemon.stop().await.unwrap();
}

/// A complete DM MESSAGE_CREATE, as Discord would replay it.
fn dm_event(id: u64, channel: u64, user: u64, username: &str, content: &str) -> Value {
    json!({
        "id": id.to_string(), "channel_id": channel.to_string(),
        "author": {"id": user.to_string(), "username": username, "discriminator": "0",
                   "global_name": username, "avatar": null, "bot": false, "public_flags": 0},
        "content": content, "timestamp": "2024-01-01T00:00:00.000000+00:00",
        "edited_timestamp": null, "tts": false, "mention_everyone": false, "mentions": [],
        "mention_roles": [], "attachments": [], "embeds": [], "reactions": [],
        "pinned": false, "type": 0, "flags": 0, "components": [],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_gateway_resumes_without_duplicate_replies() {
    let (llm, dc, root) = setup("", DC_BOT_TOML).await;
    let daemon = start(&root, &dc).await;
    let before = dc.send_dm(520, 47, "rita", "before the drop");
    dc.wait_for_messages(1, WAIT).await;
    dc.drop_connection();
    dc.send_dm(520, 47, "rita", "during the gap");
    let sent = dc.wait_for_messages(2, WAIT).await;
    assert_eq!(sent[1].content, "echo: during the gap");
    assert!(dc.resume_count() >= 1, "serenity resumed the session");
    assert_eq!(dc.identify_count(), 1, "no new session was needed");
    // Discord replays an event the bot already answered (e.g. after a RESUME from an
    // older sequence number): the second copy is silent.
    dc.send_raw_event(
        "MESSAGE_CREATE",
        dm_event(before, 520, 47, "rita", "before the drop"),
    );
    dc.send_dm(520, 47, "rita", "after");
    wait_for(&dc, "answer after the replay", |m| {
        m.content == "echo: after"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        contents(&dc.messages()),
        vec![
            "echo: before the drop",
            "echo: during the gap",
            "echo: after"
        ]
    );
    assert_eq!(llm.request_count(), 3);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_edits_one_message() {
    let bot = DC_BOT_TOML.replacen(
        "prompt = \"assistant\"\n",
        "prompt = \"assistant\"\nstream = true\n",
        1,
    );
    let (llm, dc, root) = setup("", &bot).await;
    let words: Vec<String> = "one two three four five six"
        .split(' ')
        .map(|w| format!("{w} "))
        .collect();
    llm.push(Behavior::Stream {
        chunks: words,
        gap: Duration::from_millis(400),
    });
    let daemon = start(&root, &dc).await;
    dc.send_dm(530, 48, "sam", "stream it");
    let msgs = wait_for(&dc, "final edit", |m| {
        m.content.trim() == "one two three four five six" && m.kind == "edit"
    })
    .await;
    let creates = msgs.iter().filter(|m| m.kind == "create").count();
    let edits = msgs.iter().filter(|m| m.kind == "edit").count();
    assert_eq!(creates, 1, "one message: {msgs:#?}");
    assert!(edits >= 2, "edited as tokens arrived: {msgs:#?}");
    assert!(msgs.iter().all(|m| m.message_id == msgs[0].message_id));
    daemon.stop().await.unwrap();
}

fn confab(root: &Root) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.args(["run", "--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_refusal_names_the_variable_and_the_production_app() {
    let llm = FakeOpenAi::start().await;
    // The token belongs to the production application.
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_PRODUCTION).await;
    let root = Root::discord(&llm.base_url, &dc.api_url, "", DC_BOT_TOML);
    let out = tokio::task::block_in_place(|| confab(&root).output().expect("run confab"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ASSISTANT_DISCORD_TOKEN"), "{err}");
    assert!(err.contains(&DC_APP_PRODUCTION.to_string()), "{err}");
    assert!(err.contains("production bot"), "{err}");
    assert!(!err.contains(DC_TOKEN), "token leaked: {err}");
    assert_eq!(dc.identify_count(), 0, "the gateway was never opened");
    assert_eq!(llm.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_serves_telegram_and_discord_with_separate_conversations() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::telegram_and_discord(&llm.base_url, &tg.api_url, &dc.api_url);
    let daemon = start(&root, &dc).await;
    tg.send_private(1, "Tina", "telegram secret word");
    let tg_sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(tg_sent[0].text, "echo: telegram secret word");
    dc.send_dm(540, 49, "dora", "discord hello");
    let dc_sent = dc.wait_for_messages(1, WAIT).await;
    assert_eq!(dc_sent[0].content, "echo: discord hello");
    let req = llm
        .requests()
        .into_iter()
        .find(|r| r.last_user() == Some("discord hello"))
        .expect("the Discord request");
    assert!(
        req.messages
            .iter()
            .all(|(_, c)| !c.contains("telegram secret")),
        "conversations are separate: {:?}",
        req.messages
    );
    assert!(req.system().unwrap_or_default().contains("on discord"));
    assert_eq!(tg.sent().len(), 1, "nothing crossed platforms");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_reaches_the_logs() {
    let (_llm, dc, root) = setup(NO_LIMITS, DC_BOT_TOML).await;
    let log = root.path().join("daemon.log");
    let mut child = confab(&root)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn confab");
    assert!(dc.wait_connected(WAIT).await);
    dc.send_dm(550, 50, "tom", "hello");
    dc.wait_for_messages(1, WAIT).await;
    // Provoke API errors: a refused send, a server error, a rate limit, then the API going away.
    dc.fail_next("POST", "/channels/551/messages", 401, Value::Null, None);
    dc.send_dm(551, 51, "tom", "refused");
    dc.fail_next("POST", "/channels/552/messages", 500, Value::Null, None);
    dc.send_dm(552, 52, "tom", "server error");
    dc.fail_next(
        "POST",
        "/channels/553/messages",
        429,
        Value::Null,
        Some(0.5),
    );
    dc.send_dm(553, 53, "tom", "rate limited");
    wait_for(&dc, "answer after the 429", |m| m.channel_id == 553).await;
    wait_for(&dc, "answer after the 500", |m| m.channel_id == 552).await;
    let calls: Vec<(Instant, u16)> = dc
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("/channels/553/messages"))
        .map(|c| (c.at, c.status))
        .collect();
    let statuses: Vec<u16> = calls.iter().map(|c| c.1).collect();
    assert_eq!(
        statuses,
        vec![429, 200],
        "the 429 was waited out and retried"
    );
    let waited = calls[1].0 - calls[0].0;
    assert!(
        waited >= Duration::from_millis(500),
        "retried {waited:?} after a 429 asking for 0.5 s"
    );
    dc.shutdown();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("discord refused the reply"),
        "the 401 was logged:\n{text}"
    );
    assert!(dc.messages_in(551).is_empty());
    let secret = DC_TOKEN.rsplit('.').next().unwrap();
    assert_eq!(text.matches(DC_TOKEN).count(), 0, "token in logs:\n{text}");
    assert_eq!(text.matches(secret).count(), 0, "token in logs:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buttons_and_files_work_through_interactions() {
    let (_llm, dc, root) = setup("", DC_BOT_TOML).await;
    let daemon = start(&root, &dc).await;
    dc.send_dm(560, 60, "fay", "remember me");
    dc.wait_for_messages(1, WAIT).await;
    // /export: the data arrives as a file.
    let export = dc.send_interaction("export", Value::Null, 60, "fay", 560, None);
    let msgs = wait_for(&dc, "export file", |m| {
        m.interaction_id == Some(export) && m.has_attachment
    })
    .await;
    assert!(msgs.iter().any(|m| m
        .attachment_name
        .as_deref()
        .is_some_and(|n| n.ends_with(".json"))));
    // /forget asks with buttons; pressing Confirm is the user sending `/forget confirm`.
    let forget = dc.send_interaction("forget", Value::Null, 60, "fay", 560, None);
    let msgs = wait_for(&dc, "forget question", |m| {
        m.interaction_id == Some(forget) && m.components.is_some()
    })
    .await;
    let question = msgs
        .iter()
        .find(|m| m.interaction_id == Some(forget) && m.components.is_some())
        .unwrap();
    let ids: Vec<String> = question.components.as_ref().unwrap()[0]["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["custom_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids, vec!["/forget confirm", "/forget cancel"]);
    let press = dc.send_component_interaction("/forget confirm", 60, 560, question.message_id);
    let msgs = wait_for(&dc, "forget done", |m| m.interaction_id == Some(press)).await;
    let done = msgs
        .iter()
        .find(|m| m.interaction_id == Some(press))
        .unwrap();
    assert!(
        !done.content.starts_with("Nothing to confirm"),
        "{}",
        done.content
    );
    assert!(dc
        .interaction_responses()
        .iter()
        .any(|(id, body)| *id == press && body["type"] == 6));
    daemon.stop().await.unwrap();
}
