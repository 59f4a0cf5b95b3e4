//! Hostile input through the real daemon binary: a group message whose case folding shifts
//! byte offsets, and a flood of random and malformed updates through the fake Bot API and
//! the fake Discord gateway. Afterwards a normal message on each platform must be answered
//! and the daemon's stderr must hold no panic.
//!
//! The flood is built from a seeded RNG; the seed is printed, and `FLOOD_SEED=N` replays it.
//! Every Telegram update gets a valid `update_id` from the fake (Telegram always sends one;
//! without it no client can confirm the batch). Update kinds the bot did not ask for are
//! dropped by the fake, as Telegram does, so the unknown kinds here are mostly unknown
//! fields inside `message` / `callback_query`. Discord's READY / RESUMED are not injected
//! (they belong to the session handshake, which has its own tests).

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fake_discord::FakeDiscord;
use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{Root, DC_APP_STAGING, DC_BOT_ID, DC_TOKEN, TG_BOT_TOML, TG_TOKEN};
use crate::telegram::spawn_daemon;

const WAIT: Duration = Duration::from_secs(30);
/// The flood's own replies take a while on a busy 2-core machine.
const FLOOD_WAIT: Duration = Duration::from_secs(180);
const BOT: &str = "acme_staging_bot";

fn stop(mut child: Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
}

fn assert_no_panic(log: &Path, seed: Option<u64>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !text.contains("panicked"),
        "the daemon panicked (seed {seed:?}):\n{}",
        tail(&text)
    );
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until the fake Bot API sent something to `chat` that satisfies `pred`.
async fn wait_tg(tg: &FakeTelegram, chat: i64, limit: Duration, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if tg.sent_to(chat).iter().any(|m| pred(&m.text)) {
            return;
        }
        let texts: Vec<String> = tg.sent_to(chat).into_iter().map(|m| m.text).collect();
        assert!(
            Instant::now() < deadline,
            "no answer in chat {chat}: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_dc(dc: &FakeDiscord, channel: u64, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if dc.messages_in(channel).iter().any(|m| m.content == want) {
            return;
        }
        let got: Vec<String> = dc
            .messages_in(channel)
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert!(
            Instant::now() < deadline,
            "no {want:?} in {channel}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_folding_group_message_is_answered_and_intake_goes_on() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, BOT).await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    let log = root.path().join("daemon.log");
    let child = spawn_daemon(&root, &log, "info");
    // Lowercasing shrinks Ω (3 → 2 bytes) and grows İ (2 → 3 bytes): same total length,
    // shifted offsets. This one message used to kill the polling task for good.
    tg.send_group(-100777, 5, "Omega", &format!("ΩΩ @{BOT} İİ question"));
    tg.send_private(6, "Pia", "and a private question");
    wait_tg(&tg, -100777, WAIT, |t| t == "echo: ΩΩ İİ question").await;
    wait_tg(&tg, 6, WAIT, |t| t == "echo: and a private question").await;
    stop(child);
    assert_no_panic(&log, None);
}

// ----- the flood ------------------------------------------------------------------

/// Characters that break naive text handling: case folding that changes byte length,
/// combining marks, RTL and bidi controls, a ZWJ emoji, surrogate-adjacent code points,
/// NUL and BOM, and the markup characters the adapters and renderers look at.
const TROUBLE: &[&str] = &[
    "\u{130}",
    "\u{2126}",
    "\u{1E9E}",
    "ß",
    "e\u{301}",
    "\u{202E}",
    "\u{5D0}\u{5D1}",
    "👩\u{200D}💻",
    "\u{D7FF}",
    "\u{E000}",
    "\u{FFFD}",
    "\u{0}",
    "\u{FEFF}",
    "😀",
    "@",
    "/",
    "`",
    "```",
    "*",
    "_",
    "<",
    ">",
    "&",
    "\n",
    "\r\n",
    " ",
    "@acme_staging_bot",
    "<@1000>",
    "<@!1000>",
    "/start",
    "/admin ban tg:1",
    "/forget",
    "/help@acme_staging_bot",
];

fn wild_text(rng: &mut StdRng, max_chars: usize) -> String {
    let n = rng.random_range(0..=max_chars);
    let mut s = String::new();
    for _ in 0..n {
        match rng.random_range(0..4) {
            0 => s.push_str(TROUBLE.choose(rng).copied().unwrap_or("?")),
            1 => s.push(rng.random_range('a'..='z')),
            2 => {
                if let Some(c) = char::from_u32(rng.random_range(0..0x11_0000)) {
                    s.push(c);
                }
            }
            _ => s.push(' '),
        }
    }
    s
}

/// Something of any JSON type, for fields that should have another one.
fn wrong_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..8) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(-rng.random_range(1..i64::MAX)),
        3 => json!(u64::MAX),
        4 => json!(1e300),
        5 => json!(wild_text(rng, 8)),
        6 => json!([1, "two", null]),
        _ => json!({"unexpected": {"deeply": [1, {"nested": true}]}}),
    }
}

/// An entity offset or length: small and plausible, past the end, inside a surrogate
/// pair, or large enough to overflow `offset + length`.
fn wild_offset(rng: &mut StdRng) -> Value {
    match rng.random_range(0..6) {
        0..=2 => json!(rng.random_range(0..40u64)),
        3 => json!(rng.random_range(40..100_000u64)),
        4 => json!(u64::MAX - rng.random_range(0..4u64)),
        _ => json!(u32::MAX),
    }
}

fn tg_chat(rng: &mut StdRng, user: i64) -> Value {
    match rng.random_range(0..4) {
        0 => json!({"id": user, "type": "private", "first_name": "F"}),
        1 => json!({"id": -100_000 - user, "type": "supergroup", "title": wild_text(rng, 5)}),
        2 => json!({"id": -user, "type": "group", "title": "g"}),
        _ => json!({"id": -1_000_000_000_000i64 - user, "type": "channel", "title": "c"}),
    }
}

fn tg_message(rng: &mut StdRng) -> Value {
    let user = rng.random_range(1..=40i64);
    let text = if rng.random_range(0..40) == 0 {
        "x".repeat(100_000)
    } else {
        wild_text(rng, 60)
    };
    let mut msg = json!({
        "message_id": rng.random_range(-5..1_000_000i64),
        "date": 1_700_000_000,
        "chat": tg_chat(rng, user),
        "from": {"id": user, "is_bot": rng.random_range(0..10) == 0, "first_name": wild_text(rng, 6)},
        "text": text,
    });
    if rng.random_bool(0.5) {
        let entities: Vec<Value> = (0..rng.random_range(1..4))
            .map(|_| {
                let kind = [
                    "mention",
                    "bot_command",
                    "bold",
                    "text_mention",
                    "url",
                    "nonsense",
                ]
                .choose(rng)
                .copied()
                .unwrap_or("mention");
                let mut e =
                    json!({"type": kind, "offset": wild_offset(rng), "length": wild_offset(rng)});
                if kind == "text_mention" {
                    e["user"] =
                        json!({"id": rng.random_range(1..3u64), "is_bot": true, "first_name": "B"});
                }
                e
            })
            .collect();
        msg["entities"] = json!(entities);
    }
    if rng.random_bool(0.2) {
        msg["reply_to_message"] = json!({"message_id": 1, "date": 0, "chat": msg["chat"].clone(),
            "from": {"id": 1, "is_bot": true, "first_name": "Bot", "username": BOT}});
    }
    if rng.random_bool(0.2) {
        let field = wild_text(rng, 5);
        msg[field.as_str()] = wrong_value(rng);
    }
    msg
}

/// Damages a well-formed message: a missing field or a field of the wrong type.
fn damage(rng: &mut StdRng, msg: &mut Value) {
    let fields = ["message_id", "date", "chat", "from", "text", "entities"];
    let field = fields.choose(rng).copied().unwrap_or("chat");
    if rng.random_bool(0.5) {
        if let Some(m) = msg.as_object_mut() {
            m.remove(field);
        }
    } else {
        msg[field] = wrong_value(rng);
    }
}

fn tg_update(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0..=3 => json!({"message": tg_message(rng)}),
        4 | 5 => {
            let mut m = tg_message(rng);
            damage(rng, &mut m);
            json!({"message": m})
        }
        6 => json!({"edited_message": tg_message(rng)}),
        7 => json!({"channel_post": tg_message(rng)}),
        8 => {
            let mut q = json!({"id": wild_text(rng, 4), "chat_instance": "ci",
                "from": {"id": rng.random_range(1..=40i64), "is_bot": false, "first_name": "Q"}});
            if rng.random_bool(0.5) {
                q["data"] = json!(wild_text(rng, 30));
            }
            if rng.random_bool(0.3) {
                q["message"] = tg_message(rng);
            }
            json!({"callback_query": q})
        }
        9 => json!({"message": wrong_value(rng)}),
        10 => {
            let kind = wild_text(rng, 8);
            json!({ kind: wrong_value(rng) })
        }
        _ => wrong_value(rng),
    }
}

fn dc_message(rng: &mut StdRng) -> Value {
    let user = rng.random_range(1..=40u64);
    let content = if rng.random_range(0..40) == 0 {
        "y".repeat(100_000)
    } else {
        wild_text(rng, 60)
    };
    let mut msg = json!({
        "id": rng.random_range(1..u64::MAX / 2).to_string(),
        "channel_id": (900 + user).to_string(),
        "author": {"id": user.to_string(), "username": wild_text(rng, 6), "discriminator": "0",
            "global_name": null, "avatar": null, "bot": rng.random_range(0..10) == 0},
        "content": content,
        "timestamp": "2024-01-01T00:00:00.000000+00:00",
        "edited_timestamp": null, "tts": false, "mention_everyone": false,
        "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
        "pinned": false, "type": 0, "flags": 0, "components": [],
    });
    if rng.random_bool(0.5) {
        msg["guild_id"] = json!(rng.random_range(1..5u64).to_string());
    }
    if rng.random_bool(0.4) {
        let mention = match rng.random_range(0..3) {
            0 => json!({"id": DC_BOT_ID.to_string(), "username": "fakebot", "bot": true,
                "discriminator": "0", "avatar": null}),
            1 => json!({"id": "-1", "username": null}),
            _ => wrong_value(rng),
        };
        msg["mentions"] = json!([mention]);
    }
    if rng.random_bool(0.3) {
        let fields = [
            "id",
            "channel_id",
            "author",
            "content",
            "timestamp",
            "mentions",
            "type",
        ];
        let field = fields.choose(rng).copied().unwrap_or("id");
        if rng.random_bool(0.5) {
            if let Some(m) = msg.as_object_mut() {
                m.remove(field);
            }
        } else {
            msg[field] = wrong_value(rng);
        }
    }
    msg
}

fn dc_event(rng: &mut StdRng) -> (String, Value) {
    match rng.random_range(0..10) {
        0..=5 => ("MESSAGE_CREATE".into(), dc_message(rng)),
        6 => ("MESSAGE_UPDATE".into(), dc_message(rng)),
        7 => ("MESSAGE_CREATE".into(), wrong_value(rng)),
        8 => ("INTERACTION_CREATE".into(), wrong_value(rng)),
        _ => (
            format!("FAKE_{}", rng.random_range(0..1000)),
            wrong_value(rng),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_updates_leaves_both_platforms_answering() {
    let seed = std::env::var("FLOOD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("flood seed: {seed} (replay with FLOOD_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, BOT).await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::telegram_and_discord(&llm.base_url, &tg.api_url, &dc.api_url);
    let log = root.path().join("daemon.log");
    let child = spawn_daemon(&root, &log, "info");
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");
    for _ in 0..1000 {
        tg.send_update(tg_update(&mut rng));
        let (t, d) = dc_event(&mut rng);
        dc.send_raw_event(&t, d);
    }
    tg.send_private(777_001, "Norma", "a normal question");
    dc.send_dm(777_002, 777_003, "norma", "a normal question");
    wait_tg(&tg, 777_001, FLOOD_WAIT, |t| t == "echo: a normal question").await;
    wait_dc(&dc, 777_002, "echo: a normal question", FLOOD_WAIT).await;
    eprintln!(
        "flood: {} Telegram sends, {} Discord messages, {} LLM calls",
        tg.sent().len(),
        dc.messages().len(),
        llm.request_count()
    );
    stop(child);
    if std::env::var_os("FLOOD_LOG").is_some() {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert_no_panic(&log, Some(seed));
}
