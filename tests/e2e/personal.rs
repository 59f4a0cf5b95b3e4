//! Personal output (`/export`, `/usage`, every `/admin` answer) never reaches a shared
//! place: from a Telegram group or a Discord guild channel it goes to the user's private
//! chat and the place gets a note without content (or how to open a private chat);
//! Discord slash commands answer it ephemerally.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_discord::{self, FakeDiscord};
use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::{self, FakeTelegram};
use crate::harness::{Daemon, Root, DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN};
use crate::harness::{TG_BOT_TOML, TG_TOKEN};

const WAIT: Duration = Duration::from_secs(20);
const ADMINS: &str = "[admins]\ntelegram = [100]\ndiscord = [200]\n";
const GROUP: i64 = -100777;
const TG_SENT: &str = "I've sent you the answer in a private message.";
const TG_REFUSED: &str = "To get this, open a private chat with me first: https://t.me/acme_staging_bot and send the command there.";

async fn telegram() -> (FakeOpenAi, FakeTelegram, Root, Daemon) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, ADMINS, TG_BOT_TOML);
    let daemon = Daemon::start(&root);
    (llm, tg, root, daemon)
}

/// Polls until a sent message satisfies `pred`; returns every message so far.
async fn tg_wait(
    tg: &FakeTelegram,
    what: &str,
    pred: impl Fn(&fake_telegram::SentMessage) -> bool,
) -> Vec<fake_telegram::SentMessage> {
    let deadline = Instant::now() + WAIT;
    loop {
        let sent = tg.sent();
        if sent.iter().any(&pred) {
            return sent;
        }
        assert!(Instant::now() < deadline, "no {what}: {sent:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `text` in the group as `user` and waits for the group's note quoting it;
/// returns the group's messages sent since.
async fn tg_group_command(
    tg: &FakeTelegram,
    user: i64,
    name: &str,
    text: &str,
    note: &str,
) -> Vec<fake_telegram::SentMessage> {
    let before = tg.sent().len();
    tg.send_group(GROUP, user, name, text);
    let deadline = Instant::now() + WAIT;
    loop {
        let in_group: Vec<_> = tg
            .sent_since(before)
            .into_iter()
            .filter(|m| m.chat_id == GROUP)
            .collect();
        if in_group.iter().any(|m| m.text.contains(note)) {
            return in_group;
        }
        assert!(Instant::now() < deadline, "no {note:?}: {:#?}", tg.sent());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_export_in_a_group_goes_to_the_private_chat() {
    let (_llm, tg, _root, daemon) = telegram().await;
    tg.send_private(5, "Gina", "my secret is 42");
    tg_wait(&tg, "private answer", |m| m.chat_id == 5).await;
    tg.send_group(GROUP, 5, "Gina", "@acme_staging_bot what is 2+2?");
    tg_wait(&tg, "group answer", |m| m.chat_id == GROUP).await;

    let in_group = tg_group_command(&tg, 5, "Gina", "/export", TG_SENT).await;
    assert_eq!(in_group.len(), 1, "only the note: {in_group:#?}");
    assert_eq!(in_group[0].method, "sendmessage");
    assert_eq!(in_group[0].text, format!("Gina, {TG_SENT}"));
    assert!(
        in_group[0].reply_to.is_some(),
        "the note quotes the command"
    );

    let private = tg.sent_to(5);
    let doc = private
        .iter()
        .find(|m| m.method == "senddocument")
        .expect("the export arrived in the private chat");
    assert!(doc
        .file_name
        .as_deref()
        .is_some_and(|n| n.ends_with(".json")));
    let data = String::from_utf8(doc.document.clone().unwrap_or_default()).unwrap_or_default();
    assert!(
        data.contains("my secret is 42"),
        "the DM history is in the file"
    );
    assert!(private
        .iter()
        .any(|m| m.text.starts_with("Here is everything")));
    // The group never saw a document, the DM history or the export's text.
    for m in tg.sent_to(GROUP) {
        assert_ne!(m.method, "senddocument", "{m:#?}");
        assert!(!m.text.contains("secret"), "{m:#?}");
        assert!(!m.text.contains("Here is everything"), "{m:#?}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_refused_private_chat_gets_only_the_how_to_note() {
    let (_llm, tg, _root, daemon) = telegram().await;
    tg.refuse_private(6);
    tg.send_group(GROUP, 6, "Hugo", "@acme_staging_bot my pin is 1234");
    tg_wait(&tg, "group answer", |m| m.chat_id == GROUP).await;

    let in_group = tg_group_command(&tg, 6, "Hugo", "/export", TG_REFUSED).await;
    assert_eq!(in_group.len(), 1, "only the note: {in_group:#?}");
    assert_eq!(in_group[0].text, TG_REFUSED);
    let in_group = tg_group_command(&tg, 6, "Hugo", "/usage", TG_REFUSED).await;
    assert_eq!(in_group.len(), 1, "only the note: {in_group:#?}");

    assert!(
        tg.sent_to(6).is_empty(),
        "the private chat refused everything"
    );
    // One attempt per reply (a refusal is not retried); the file was never sent.
    let tried: Vec<(String, u16)> = tg
        .calls()
        .into_iter()
        .filter(|c| c.body["chat_id"].as_i64() == Some(6))
        .map(|c| (c.method, c.status))
        .collect();
    let refused = ("sendmessage".to_string(), 403);
    assert_eq!(tried, vec![refused.clone(), refused], "{tried:#?}");
    assert_eq!(tg.count("senddocument"), 0);
    for m in tg.sent_to(GROUP) {
        assert_ne!(m.method, "senddocument", "{m:#?}");
        assert!(
            !m.text.contains("Limits") && !m.text.contains("Here is"),
            "{m:#?}"
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_usage_and_admin_stats_in_a_group_go_to_the_private_chat() {
    let (_llm, tg, _root, daemon) = telegram().await;
    let in_group = tg_group_command(&tg, 7, "Ida", "/usage", TG_SENT).await;
    assert_eq!(in_group.len(), 1, "{in_group:#?}");
    assert_eq!(in_group[0].text, format!("Ida, {TG_SENT}"));
    let usage = tg.sent_to(7);
    assert_eq!(usage.len(), 1, "{usage:#?}");
    assert!(usage[0].text.starts_with("Limits:"), "{}", usage[0].text);
    assert_eq!(usage[0].reply_to, None, "nothing quoted across chats");

    let in_group = tg_group_command(&tg, 100, "Ada", "/admin stats", TG_SENT).await;
    assert_eq!(in_group.len(), 1, "{in_group:#?}");
    let stats = tg.sent_to(100);
    assert_eq!(stats.len(), 1, "{stats:#?}");
    assert_ne!(stats[0].text, in_group[0].text);
    assert!(!stats[0].text.contains(TG_SENT), "{}", stats[0].text);

    let group: Vec<String> = tg.sent_to(GROUP).into_iter().map(|m| m.text).collect();
    assert_eq!(
        group,
        vec![format!("Ida, {TG_SENT}"), format!("Ada, {TG_SENT}")]
    );
    // In a private chat nothing changes: the answer comes right there.
    let before = tg.sent().len();
    tg.send_private(7, "Ida", "/usage");
    let sent = tg.wait_for_sent(before + 1, WAIT).await;
    assert_eq!(sent.len(), before + 1, "{sent:#?}");
    assert_eq!(sent[before].chat_id, 7);
    assert!(
        sent[before].text.starts_with("Limits:"),
        "{}",
        sent[before].text
    );
    assert_eq!(tg.sent_to(GROUP).len(), 2, "no note for a private chat");
    daemon.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Discord

const GUILD: u64 = 9;
const CHANNEL: u64 = 800;
const DC_SENT: &str = "I've sent you the answer in a direct message.";

async fn discord() -> (FakeOpenAi, FakeDiscord, Root, Daemon) {
    let llm = FakeOpenAi::start().await;
    let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
    let root = Root::discord(&llm.base_url, &dc.api_url, ADMINS, DC_BOT_TOML);
    let daemon = Daemon::start(&root);
    assert!(dc.wait_connected(WAIT).await, "the gateway session came up");
    (llm, dc, root, daemon)
}

async fn dc_wait(
    dc: &FakeDiscord,
    what: &str,
    pred: impl Fn(&fake_discord::SentMessage) -> bool,
) -> Vec<fake_discord::SentMessage> {
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

/// The bot's messages for interaction `id`.
fn answers(dc: &FakeDiscord, id: u64) -> Vec<fake_discord::SentMessage> {
    dc.messages()
        .into_iter()
        .filter(|m| m.interaction_id == Some(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_personal_slash_commands_are_ephemeral() {
    let (_llm, dc, _root, daemon) = discord().await;
    let export = dc.send_interaction("export", Value::Null, 72, "hal", CHANNEL, Some(GUILD));
    dc_wait(&dc, "export file", |m| {
        m.interaction_id == Some(export) && m.has_attachment
    })
    .await;
    assert_eq!(dc.callback_flags(export), Some(64), "deferred ephemerally");
    let sent = answers(&dc, export);
    assert!(sent.len() >= 2, "{sent:#?}");
    assert!(sent.iter().all(|m| m.ephemeral), "{sent:#?}");

    let usage = dc.send_interaction("usage", Value::Null, 72, "hal", CHANNEL, Some(GUILD));
    dc_wait(&dc, "usage", |m| m.interaction_id == Some(usage)).await;
    assert_eq!(dc.callback_flags(usage), Some(64));
    let sent = answers(&dc, usage);
    assert!(sent[0].content.starts_with("Limits:"), "{sent:#?}");
    assert!(sent.iter().all(|m| m.ephemeral), "{sent:#?}");

    let admin = dc.send_interaction(
        "admin",
        json!({"command": "stats"}),
        200,
        "ada",
        CHANNEL,
        Some(GUILD),
    );
    dc_wait(&dc, "admin stats", |m| m.interaction_id == Some(admin)).await;
    assert_eq!(dc.callback_flags(admin), Some(64));
    assert!(answers(&dc, admin).iter().all(|m| m.ephemeral));

    // /forget asks ephemerally; its button, pressed in the guild, answers in the DM and
    // tells only the presser where the answer went.
    let forget = dc.send_interaction("forget", Value::Null, 72, "hal", CHANNEL, Some(GUILD));
    dc_wait(&dc, "forget question", |m| {
        m.interaction_id == Some(forget) && m.components.is_some()
    })
    .await;
    assert_eq!(dc.callback_flags(forget), Some(64));
    let question = answers(&dc, forget);
    assert!(question.iter().all(|m| m.ephemeral), "{question:#?}");
    let buttons = question.iter().find(|m| m.components.is_some()).unwrap();
    let press = dc.send_component_interaction("/forget cancel", 72, CHANNEL, buttons.message_id);
    dc_wait(&dc, "press note", |m| m.interaction_id == Some(press)).await;
    let note = answers(&dc, press);
    assert_eq!(note.len(), 1, "{note:#?}");
    assert_eq!(
        (note[0].content.as_str(), note[0].ephemeral),
        (DC_SENT, true)
    );
    let dm = dc.dm_channel_of(72).expect("a DM channel was opened");
    let in_dm: Vec<String> = dc.messages_in(dm).into_iter().map(|m| m.content).collect();
    assert_eq!(in_dm, vec!["Cancelled: nothing was deleted.".to_string()]);

    // Public commands stay public.
    let help = dc.send_interaction("help", Value::Null, 72, "hal", CHANNEL, Some(GUILD));
    dc_wait(&dc, "help", |m| m.interaction_id == Some(help)).await;
    assert_eq!(dc.callback_flags(help), Some(0));
    assert!(answers(&dc, help).iter().all(|m| !m.ephemeral));
    assert!(dc
        .messages_in(CHANNEL)
        .iter()
        .all(|m| m.ephemeral || m.interaction_id == Some(help)));

    // A personal answer to a publicly deferred command: the public "thinking…" becomes
    // a note, the answer an ephemeral follow-up.
    let ask = dc.send_interaction(
        "ask",
        json!({"prompt": "/usage"}),
        72,
        "hal",
        CHANNEL,
        Some(GUILD),
    );
    dc_wait(&dc, "usage through ask", |m| {
        m.interaction_id == Some(ask) && m.content.starts_with("Limits:")
    })
    .await;
    assert_eq!(dc.callback_flags(ask), Some(0));
    for m in answers(&dc, ask) {
        assert!(
            m.ephemeral || (m.kind == "edit" && !m.content.contains("Limits")),
            "{m:#?}"
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_personal_text_commands_in_a_guild_go_to_the_dm() {
    let (_llm, dc, _root, daemon) = discord().await;
    let asked = dc.send_guild(GUILD, CHANNEL, 70, "gus", "/usage", true);
    dc_wait(&dc, "note", |m| m.channel_id == CHANNEL).await;
    let dm = dc.dm_channel_of(70).expect("a DM channel was opened");
    let in_dm = dc.messages_in(dm);
    assert_eq!(in_dm.len(), 1, "{in_dm:#?}");
    assert!(
        in_dm[0].content.starts_with("Limits:"),
        "{}",
        in_dm[0].content
    );
    assert_eq!(
        in_dm[0].reply_to, None,
        "nothing referenced across channels"
    );
    let in_channel = dc.messages_in(CHANNEL);
    assert_eq!(in_channel.len(), 1, "{in_channel:#?}");
    assert_eq!(in_channel[0].content, DC_SENT);
    assert_eq!(in_channel[0].reply_to, Some(asked));
    let opened = dc
        .calls()
        .into_iter()
        .find(|c| c.path.ends_with("/users/@me/channels"))
        .expect("POST /users/@me/channels");
    assert_eq!(opened.body["recipient_id"], json!("70"));
    let notes = dc
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with(&format!("/channels/{CHANNEL}/messages")))
        .collect::<Vec<_>>();
    assert_eq!(
        notes[0].body["allowed_mentions"],
        json!({"parse": [], "users": [], "roles": [], "replied_user": true}),
        "as strict as every reply"
    );

    // DMs closed: the channel learns how to allow them, and nothing personal.
    dc.refuse_dms(71);
    dc.send_guild(GUILD, CHANNEL, 71, "ivy", "my pin is 1234", true);
    dc_wait(&dc, "answer", |m| m.content.contains("my pin")).await;
    dc.send_guild(GUILD, CHANNEL, 71, "ivy", "/export", true);
    let msgs = dc_wait(&dc, "refusal note", |m| {
        m.channel_id == CHANNEL && m.content.contains("allow direct messages")
    })
    .await;
    assert!(msgs.iter().all(|m| !m.has_attachment), "{msgs:#?}");
    let dm = dc.dm_channel_of(71).expect("a DM channel was opened");
    assert!(dc.messages_in(dm).is_empty());
    let in_channel = dc.messages_in(CHANNEL);
    assert!(
        in_channel.iter().all(|m| !m.content.contains("Here is")),
        "{in_channel:#?}"
    );
    daemon.stop().await.unwrap();
}
