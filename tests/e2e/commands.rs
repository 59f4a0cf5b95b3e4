//! User and admin commands through the engine, on every platform path, with their
//! stored effects and the audit trail.

use confab::domain::{Content, Inbound, Platform, Reply, ReplyKind, UserRef};
use confab::store::{SledStore, Store};

use crate::fake_openai::FakeOpenAi;
use crate::harness::{text, Root};

const ADMINS: &str = "[admins]\ntelegram = [100]\ndiscord = [200]\n[limits]\nburst = 50\nmessages_per_minute = 600\n";

fn on(platform: Platform, user: &str, said: &str) -> Inbound {
    Inbound {
        bot: "assistant".into(),
        platform,
        update_id: None,
        chat_id: format!("chat-{user}"),
        user_id: user.into(),
        user_name: format!("N{user}"),
        username: (platform == Platform::Telegram).then(|| format!("name{user}")),
        is_private: true,
        forwarded: false,
        content: Content::Text(said.into()),
    }
}

fn admin_of(platform: Platform) -> &'static str {
    match platform {
        Platform::Telegram => "100",
        Platform::Discord => "200",
        Platform::Terminal => "operator",
    }
}

/// Every tree's keys and values, as text, for "nothing left about this user" checks.
fn dump_text(store: &SledStore) -> Vec<(String, String)> {
    store
        .dump()
        .unwrap()
        .into_iter()
        .map(|(tree, k, v)| {
            (
                tree,
                format!(
                    "{} => {}",
                    String::from_utf8_lossy(&k),
                    String::from_utf8_lossy(&v)
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn admin_commands_on_every_platform_path() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let app = root.build();
    let e = &app.engine;
    let store = &app.store;
    for platform in [Platform::Telegram, Platform::Discord, Platform::Terminal] {
        let admin = |cmd: &str| on(platform, admin_of(platform), cmd);
        // a user to act on, who has talked before (so @name7 is known)
        let victim = UserRef::new(Platform::Telegram, "7");
        e.handle(&on(Platform::Telegram, "7", "hello there")).await;

        type Effect = fn(&SledStore, &UserRef) -> bool;
        let table: Vec<(&str, &str, Effect)> = vec![
            ("/admin ban tg:7 spam", "Banned tg:7 (spam)", |s, u| {
                s.user(u)
                    .unwrap()
                    .unwrap()
                    .banned
                    .is_some_and(|b| b.reason == "spam")
            }),
            ("/admin unban @name7", "Unbanned tg:7", |s, u| {
                s.user(u).unwrap().unwrap().banned.is_none()
            }),
            (
                "/admin limit tg:7 10 2000",
                "tg:7: 10 messages/minute, 2000 tokens/day",
                |s, u| {
                    let r = s.user(u).unwrap().unwrap();
                    r.limit_per_minute == Some(10) && r.limit_daily_tokens == Some(2000)
                },
            ),
            (
                "/admin limit tg:7 reset",
                "back to the configured limits",
                |s, u| s.user(u).unwrap().unwrap().limit_per_minute.is_none(),
            ),
            ("/admin whois tg:7", "tg:7: N7 @name7", |_, _| true),
            (
                "/admin reset tg:7",
                "Cleared 2 messages in 1 conversations of tg:7",
                |s, u| {
                    s.user_conversations(u)
                        .unwrap()
                        .iter()
                        .all(|(_, t)| t.is_empty())
                },
            ),
            ("/admin cache stats", "Cache: ", |_, _| true),
            ("/admin cache clear", "Cache cleared", |s, _| {
                s.cache_len() == 0
            }),
            ("/admin stats", "Users ", |_, _| true),
            (
                "/admin maintenance on back soon",
                "Maintenance on",
                |_, _| true,
            ),
            ("/admin maintenance off", "Maintenance off", |_, _| true),
            ("/admin reload", "", |_, _| true),
            ("/admin audit 3", "/admin reload", |_, _| true),
            ("/admin limit tg:7 lots", "Usage: /admin", |_, _| true),
            (
                "/admin ban @nobody_known",
                "I don't know @nobody_known",
                |_, _| true,
            ),
        ];
        for (cmd, want, effect) in table {
            let reply = e.handle(&admin(cmd)).await;
            let got = text(&reply);
            assert!(got.contains(want), "{platform:?} {cmd}: {got}");
            assert!(effect(store, &victim), "{platform:?} {cmd}: stored effect");
        }
        // maintenance: non-admins get the message, admins are served
        e.handle(&admin("/admin maintenance on back soon")).await;
        assert_eq!(
            text(&e.handle(&on(Platform::Telegram, "8", "hi")).await),
            "back soon"
        );
        assert!(text(&e.handle(&admin("hi admin")).await).starts_with("echo:"));
        e.handle(&admin("/admin maintenance off")).await;
        // banned users get one notice and no LLM call
        e.handle(&admin("/admin ban tg:9")).await;
        let calls = llm.request_count();
        let first = e.handle(&on(Platform::Telegram, "9", "hi")).await;
        assert_eq!(text(&first), "You have been blocked from using this bot.");
        assert!(matches!(
            e.handle(&on(Platform::Telegram, "9", "hi?")).await,
            Reply::Silent
        ));
        assert_eq!(llm.request_count(), calls);
        e.handle(&admin("/admin unban tg:9")).await;
    }
    // every action is in the audit tree, with who, what, target and result
    let audit = store.audit_recent(500).unwrap();
    assert!(audit.iter().any(|a| a.actor == "tg:100"
        && a.command == "/admin ban tg:7 spam"
        && a.target.as_deref() == Some("tg:7")
        && a.result == "ok"));
    assert!(audit
        .iter()
        .any(|a| a.actor == "dc:200" && a.result == "bad arguments"));
    assert!(audit.iter().any(|a| a.actor == "cli:operator"));
}

#[tokio::test]
async fn audit_survives_a_restart() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    {
        let app = root.build();
        app.engine
            .handle(&on(Platform::Telegram, "100", "/admin cache clear"))
            .await;
    }
    let app = root.build();
    let out = text(
        &app.engine
            .handle(&on(Platform::Telegram, "100", "/admin audit"))
            .await,
    );
    assert!(out.contains("tg:100 /admin cache clear → ok"), "{out}");
}

#[tokio::test]
async fn every_admin_command_is_refused_for_non_admins_and_audited() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let app = root.build();
    let cmds = [
        "/admin stats",
        "/admin ban tg:1",
        "/admin unban tg:1",
        "/admin limit tg:1 5",
        "/admin limit tg:1 reset",
        "/admin reset tg:1",
        "/admin whois tg:1",
        "/admin cache stats",
        "/admin cache clear",
        "/admin reload",
        "/admin maintenance on",
        "/admin maintenance off",
        "/admin audit 5",
        "/admin nonsense",
    ];
    for (platform, user) in [(Platform::Telegram, "555"), (Platform::Discord, "666")] {
        for cmd in cmds {
            let r = app.engine.handle(&on(platform, user, cmd)).await;
            assert_eq!(
                text(&r),
                "Sorry, admin commands are for operators only.",
                "{cmd}"
            );
        }
    }
    let audit = app.store.audit_recent(100).unwrap();
    let refusals = audit
        .iter()
        .filter(|a| a.result == "refused: not an admin")
        .count();
    assert_eq!(refusals, cmds.len() * 2);
    assert!(app.engine.maintenance().is_none(), "nothing happened");
}

#[tokio::test]
async fn export_is_json_with_every_turn() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let app = root.build();
    let mut dm = on(Platform::Telegram, "5", "first question");
    app.engine.handle(&dm).await;
    dm.chat_id = "-100200".into(); // a group chat with the same bot
    dm.content = Content::Text("group question".into());
    app.engine.handle(&dm).await;
    let reply = app
        .engine
        .handle(&on(Platform::Telegram, "5", "/export"))
        .await;
    let Reply::Text {
        attachment: Some(file),
        kind,
        ..
    } = reply
    else {
        panic!("no attachment");
    };
    assert_eq!(kind, ReplyKind::Command);
    assert_eq!(file.file_name, "confab-export-tg-5.json");
    let doc: serde_json::Value = serde_json::from_slice(&file.bytes).expect("valid JSON");
    assert_eq!(doc["user"], "tg:5");
    let texts: Vec<String> = doc["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["turns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["text"].as_str().unwrap().to_string())
        })
        .collect();
    for want in [
        "first question",
        "echo: first question",
        "group question",
        "echo: group question",
    ] {
        assert!(texts.contains(&want.to_string()), "{texts:?}");
    }
    assert_eq!(doc["profile"]["usage"]["total_messages"], 2);
}

#[tokio::test]
async fn forget_asks_then_deletes_everything_about_the_user() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let app = root.build();
    let e = &app.engine;
    let mut m = on(Platform::Telegram, "4242", "a unique question about zebras");
    m.update_id = Some("90001".into());
    e.handle(&m).await;
    e.mark_sent(&m);
    e.handle(&on(Platform::Telegram, "4242", "another one"))
        .await;
    e.handle(&on(Platform::Telegram, "100", "/admin limit tg:4242 9"))
        .await;
    // someone else, whose data must stay
    e.handle(&on(Platform::Telegram, "77", "keep me")).await;
    assert_eq!(
        text(
            &e.handle(&on(Platform::Telegram, "4242", "/forget confirm"))
                .await
        ),
        "Nothing to confirm: send /forget first."
    );
    let ask = e.handle(&on(Platform::Telegram, "4242", "/forget")).await;
    let Reply::Text {
        buttons, text: t, ..
    } = &ask
    else {
        panic!()
    };
    assert!(t.contains("cannot be undone"), "{t}");
    assert_eq!(buttons[0].command, "/forget confirm");
    let done = text(
        &e.handle(&on(Platform::Telegram, "4242", "/forget confirm"))
            .await,
    );
    assert_eq!(
        done,
        "Deleted: 4 messages in 1 conversations, 2 cached replies, your profile and usage."
    );
    for (tree, row) in dump_text(&app.store) {
        for needle in ["4242", "zebras", "another one", "name4242"] {
            assert!(!row.contains(needle), "{tree}: {row}");
        }
    }
    // the other user is untouched
    assert_eq!(
        app.store
            .all_turns(&on(Platform::Telegram, "77", "").conversation())
            .unwrap()
            .len(),
        2
    );
    assert!(app
        .store
        .audit_recent(10)
        .unwrap()
        .iter()
        .any(|a| a.target.as_deref() == Some("[forgotten user]")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_cli_exports_and_forgets_without_a_daemon() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    {
        let app = root.build();
        app.engine
            .handle(&on(Platform::Telegram, "31", "cli question"))
            .await;
    }
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(args)
            .arg("--root")
            .arg(root.path())
            .arg("--env-file")
            .arg(root.env_file())
            .output()
            .expect("run confab")
    };
    let out = tokio::task::block_in_place(|| run(&["user", "export", "tg:31", "--env", "staging"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(doc.to_string().contains("cli question"));
    let out = tokio::task::block_in_place(|| run(&["user", "forget", "tg:31", "--env", "staging"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Deleted: 2 messages"));
    let bad = tokio::task::block_in_place(|| run(&["user", "export", "bob", "--env", "staging"]));
    assert_eq!(bad.status.code(), Some(2));
    let app = root.build();
    assert!(app
        .store
        .user(&UserRef::new(Platform::Telegram, "31"))
        .unwrap()
        .is_none());
}
