//! User and admin commands through the engine, on every platform path, with their
//! stored effects and the audit trail.

use confab::domain::{Content, Inbound, Platform, Reply, ReplyKind, UserRef, Visibility};
use confab::store::{AuditStore, CacheStore, ConversationStore, SledStore, UserStore};

use crate::fake_openai::FakeOpenAi;
use crate::harness::{on_both_backends, stored_text, text, Backend, Root};

on_both_backends!(
    audit_survives_a_restart,
    forget_asks_then_deletes_everything_about_the_user,
    usernames_resolve_per_platform_and_renames_leave_nothing_stale,
    a_forwarded_admin_command_is_never_executed,
    maintenance_mode_survives_a_restart,
);

mod declared;

const ADMINS: &str = "[admins]\ntelegram = [100]\ndiscord = [200]\n[limits]\nburst = 50\nmessages_per_minute = 600\ncommands_burst = 100\n";

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

#[tokio::test]
async fn admin_commands_on_every_platform_path() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let app = root.build();
    let e = &app.engine;
    let store = app.sled().unwrap();
    for platform in [Platform::Telegram, Platform::Discord, Platform::Terminal] {
        let admin = |cmd: &str| on(platform, admin_of(platform), cmd);
        // a user to act on, who has talked before (so @name7 is known)
        let victim = UserRef::new(Platform::Telegram, "7");
        e.handle(&on(Platform::Telegram, "7", "hello there")).await;

        type Effect = fn(&SledStore, &UserRef) -> bool;
        let table: Vec<(&str, &str, Effect)> = vec![
            (
                "/admin ban tg:7 spam",
                "Banned tg:7 (@name7, \"N7\"): spam.",
                |s, u| {
                    s.user(u)
                        .unwrap()
                        .unwrap()
                        .banned
                        .is_some_and(|b| b.reason == "spam")
                },
            ),
            // a username on another platform than the admin's needs its prefix
            (
                "/admin unban tg:@name7",
                "Unbanned tg:7 (@name7, \"N7\").",
                |s, u| s.user(u).unwrap().unwrap().banned.is_none(),
            ),
            (
                "/admin limit tg:7 10 2000",
                "tg:7 (@name7, \"N7\"): 10 messages/minute, 2000 tokens/day",
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
                "Cleared 2 messages in 1 conversations of tg:7 (@name7",
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
            assert_eq!(reply.visibility(), Visibility::Personal, "{cmd}");
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

async fn audit_survives_a_restart(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, ADMINS);
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

async fn forget_asks_then_deletes_everything_about_the_user(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, ADMINS);
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
    for (tree, row) in stored_text(&app, backend) {
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

on_both_backends!(multi_thread: user_cli_exports_and_forgets_without_a_daemon);

/// `confab user …` with no daemon running opens the store itself: on Redis its calls
/// run on a blocking thread (`Handle::block_on` without `block_in_place`'s hand-off).
async fn user_cli_exports_and_forgets_without_a_daemon(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, ADMINS);
    {
        let app = root.build();
        app.engine
            .handle(&on(Platform::Telegram, "5550123", "cli question"))
            .await;
        // The scan below can see the user (nothing is sealed here): it is not vacuous.
        let rows = stored_text(&app, backend);
        for needle in ["5550123", "cli question", "echo: cli"] {
            assert!(rows.iter().any(|(_, r)| r.contains(needle)), "{needle}");
        }
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
    let out =
        tokio::task::block_in_place(|| run(&["user", "export", "tg:5550123", "--env", "staging"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(doc.to_string().contains("cli question"));
    let out =
        tokio::task::block_in_place(|| run(&["user", "forget", "tg:5550123", "--env", "staging"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Deleted: 2 messages"));
    let bad = tokio::task::block_in_place(|| run(&["user", "export", "bob", "--env", "staging"]));
    assert_eq!(bad.status.code(), Some(2));
    // Gone for real: an export finds nothing, and no stored row names the user or their text.
    let out =
        tokio::task::block_in_place(|| run(&["user", "export", "tg:5550123", "--env", "staging"]));
    let export = String::from_utf8_lossy(&out.stdout);
    assert!(!export.contains("cli question"), "{export}");
    let app = root.build();
    assert!(app
        .store
        .user(&UserRef::new(Platform::Telegram, "5550123"))
        .unwrap()
        .is_none());
    for (tree, row) in stored_text(&app, backend) {
        for needle in ["5550123", "cli question", "echo: cli"] {
            assert!(!row.contains(needle), "{tree}: {row}");
        }
    }
}

#[tokio::test]
async fn personal_output_is_personal_and_the_rest_public() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let app = root.build();
    let e = &app.engine;
    // asked in a group: the engine marks what only the asker may read
    let in_group = |user: &str, said: &str| {
        let mut m = on(Platform::Telegram, user, said);
        m.chat_id = "-100500".into();
        m.is_private = false;
        m
    };
    e.handle(&in_group("5", "hello")).await;
    for (user, cmd) in [
        ("5", "/export"),
        ("5", "/usage"),
        ("5", "/forget"),
        ("5", "/forget cancel"),
        ("5", "/forget confirm"),
        ("5", "/admin stats"), // refused, still personal
        ("100", "/admin whois tg:5"),
        ("100", "/admin stats"),
        ("100", "/admin audit 3"),
        ("100", "/admin ban tg:6 spam"),
        ("100", "/admin frob"),
        ("100", "/usage"),
    ] {
        let reply = e.handle(&in_group(user, cmd)).await;
        assert_eq!(reply.visibility(), Visibility::Personal, "{cmd}: {reply:?}");
    }
    for cmd in ["/help", "/start", "a question", "/reset", "/nonsense"] {
        let reply = e.handle(&in_group("7", cmd)).await;
        assert_eq!(reply.visibility(), Visibility::Public, "{cmd}");
    }
    // Discord too: the decision does not depend on the platform
    let reply = e
        .handle(&on(Platform::Discord, "200", "/admin stats"))
        .await;
    assert_eq!(reply.visibility(), Visibility::Personal);
}

/// A Discord user renamed to a Telegram VIP's username must not receive the VIP's
/// admin actions; a renamed user's old name resolves to nobody.
async fn usernames_resolve_per_platform_and_renames_leave_nothing_stale(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, ADMINS);
    let app = root.build();
    let e = &app.engine;
    let mut vip = on(Platform::Telegram, "10", "hi");
    vip.username = Some("vip".into());
    vip.user_name = "Ann".into();
    e.handle(&vip).await;
    // later, a Discord user takes the same name
    let mut impostor = on(Platform::Discord, "20", "hi");
    impostor.username = Some("VIP".into());
    impostor.user_name = "Mallory".into();
    e.handle(&impostor).await;

    let got = text(
        &e.handle(&on(Platform::Telegram, "100", "/admin limit @vip 99"))
            .await,
    );
    assert_eq!(got, "tg:10 (@vip, \"Ann\"): 99 messages/minute.");
    let rec = |p: Platform, id: &str| app.store.user(&UserRef::new(p, id)).unwrap().unwrap();
    assert_eq!(rec(Platform::Telegram, "10").limit_per_minute, Some(99));
    assert_eq!(rec(Platform::Discord, "20").limit_per_minute, None);
    // a Discord admin's @vip is the Discord user; tg:@vip names the Telegram one
    let got = text(
        &e.handle(&on(Platform::Discord, "200", "/admin limit @vip 3"))
            .await,
    );
    assert_eq!(got, "dc:20 (@VIP, \"Mallory\"): 3 messages/minute.");
    let got = text(
        &e.handle(&on(Platform::Discord, "200", "/admin whois tg:@vip"))
            .await,
    );
    assert!(got.starts_with("tg:10: Ann @vip"), "{got}");
    // from the terminal, @vip is ambiguous
    let got = text(
        &e.handle(&on(Platform::Terminal, "op", "/admin ban @vip"))
            .await,
    );
    assert_eq!(got, "@vip is tg:10 and dc:20: say tg:@vip or dc:@vip.");
    assert!(rec(Platform::Telegram, "10").banned.is_none());

    // the VIP renames: the old name no longer resolves, the new one does
    vip.username = Some("vip_new".into());
    vip.content = Content::Text("renamed".into());
    e.handle(&vip).await;
    let got = text(
        &e.handle(&on(Platform::Telegram, "100", "/admin ban @vip"))
            .await,
    );
    assert!(got.starts_with("I don't know @vip"), "{got}");
    let got = text(
        &e.handle(&on(Platform::Telegram, "100", "/admin unban @vip_new"))
            .await,
    );
    assert_eq!(got, "Unbanned tg:10 (@vip_new, \"Ann\").");
    // dropping the username drops it from the index too
    vip.username = None;
    e.handle(&vip).await;
    let got = text(
        &e.handle(&on(Platform::Telegram, "100", "/admin whois @vip_new"))
            .await,
    );
    assert!(got.starts_with("I don't know @vip_new"), "{got}");
}

/// Leaves a pending reply, an inbox entry, audit entries by and about the user and a
/// username, then `/forget`s: no tree may hold the id or any of the words afterwards.
async fn forget_leaves_nothing(backend: &Backend, data_key: Option<&str>) {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    if let Some(key) = data_key {
        std::fs::write(root.env_file(), format!("CONFAB_DATA_KEY=\"{key}\"\n")).unwrap();
    }
    root.use_backend(backend);
    let app = root.build();
    let encrypted = match backend {
        Backend::Sled => app.sled().unwrap().is_encrypted(),
        Backend::Redis(_) => app.backend.redis().unwrap().is_encrypted(),
    };
    assert_eq!(encrypted, data_key.is_some());
    let e = &app.engine;
    let user = |said: &str| on(Platform::Telegram, "4242", said);
    let mut m = user("a unique question about zebras");
    m.update_id = Some("90001".into());
    e.handle(&m).await; // answered, never confirmed sent: a pending reply
    e.handle(&user("another one")).await;
    e.handle(&user("/admin ban tg:1 flamingo plans")).await; // refused, audited
    for cmd in [
        "/admin ban @name4242 rude about okapis",
        "/admin unban tg:4242",
        "/admin whois tg:@name4242",
    ] {
        e.handle(&on(Platform::Telegram, "100", cmd)).await;
    }
    // an update of theirs waiting in the inbox (the adapters' job format)
    let mut waiting = user("still queued: narwhals");
    waiting.update_id = Some("90002".into());
    let job = serde_json::json!({ "inbound": waiting, "chat_id": 4242, "message_id": 9 });
    app.store
        .inbox_put(
            "tg/assistant/00000000000000090002",
            job.to_string().as_bytes(),
        )
        .unwrap();
    e.handle(&on(Platform::Telegram, "77", "keep me")).await;
    let before = stored_text(&app, backend);
    if data_key.is_none() || matches!(backend, Backend::Sled) {
        assert!(before.iter().any(|(_, r)| r.contains("zebras")), "seeded");
        assert!(before.iter().any(|(_, r)| r.contains("narwhals")), "seeded");
    }

    e.handle(&user("/forget")).await;
    let done = text(&e.handle(&user("/forget confirm")).await);
    assert!(
        done.starts_with("Deleted: 4 messages in 1 conversations"),
        "{done}"
    );
    for (tree, row) in stored_text(&app, backend) {
        for needle in [
            "4242",
            "zebras",
            "another one",
            "flamingo",
            "okapis",
            "narwhals",
            "name4242",
        ] {
            assert!(!row.contains(needle), "{needle} left in {tree}: {row}");
        }
    }
    // what admins did stays in the audit log, about nobody in particular
    let audit = app.store.audit_recent(20).unwrap();
    assert!(audit
        .iter()
        .any(|a| a.command == "/admin ban [redacted]"
            && a.target.as_deref() == Some("[forgotten user]")));
    // the other user is untouched
    let other = on(Platform::Telegram, "77", "").conversation();
    assert_eq!(app.store.all_turns(&other).unwrap().len(), 2);
}

async fn forget_leaves_no_trace_in_any_tree(backend: &Backend) {
    forget_leaves_nothing(backend, None).await;
}

async fn forget_leaves_no_trace_in_any_tree_of_an_encrypted_store(backend: &Backend) {
    forget_leaves_nothing(backend, Some("a long passphrase for the forget test")).await;
}

on_both_backends!(
    forget_leaves_no_trace_in_any_tree,
    forget_leaves_no_trace_in_any_tree_of_an_encrypted_store,
);

async fn a_forwarded_admin_command_is_never_executed(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, ADMINS);
    let app = root.build();
    let e = &app.engine;
    e.handle(&on(Platform::Telegram, "7", "hello")).await;
    // the admin forwards someone's message that reads like a command
    let mut fwd = on(Platform::Telegram, "100", "/admin ban tg:7 forwarded");
    fwd.forwarded = true;
    let reply = e.handle(&fwd).await;
    assert_eq!(text(&reply), "echo: /admin ban tg:7 forwarded");
    let victim = UserRef::new(Platform::Telegram, "7");
    assert!(app.store.user(&victim).unwrap().unwrap().banned.is_none());
    assert!(
        app.store.audit_recent(10).unwrap().is_empty(),
        "nothing ran"
    );
    // typed by the admin, it runs
    fwd.forwarded = false;
    e.handle(&fwd).await;
    assert!(app.store.user(&victim).unwrap().unwrap().banned.is_some());
}

async fn maintenance_mode_survives_a_restart(backend: &Backend) {
    let llm = FakeOpenAi::start().await;
    let root = Root::on(backend, &llm.base_url, ADMINS);
    {
        let app = root.build();
        let on_ = on(
            Platform::Telegram,
            "100",
            "/admin maintenance on back at noon",
        );
        app.engine.handle(&on_).await;
    }
    {
        let app = root.build();
        assert_eq!(app.engine.maintenance().as_deref(), Some("back at noon"));
        let got = text(&app.engine.handle(&on(Platform::Telegram, "8", "hi")).await);
        assert_eq!(got, "back at noon");
        assert_eq!(llm.request_count(), 0);
        let off = on(Platform::Telegram, "100", "/admin maintenance off");
        app.engine.handle(&off).await;
    }
    let app = root.build();
    assert_eq!(app.engine.maintenance(), None);
    let got = text(&app.engine.handle(&on(Platform::Telegram, "8", "hi")).await);
    assert_eq!(got, "echo: hi");
}

/// A banned user's record turns unreadable on disk: the user must not be served as a
/// new (unbanned) user — they get the internal-error notice, and the LLM is not asked.
#[tokio::test]
async fn a_corrupt_user_record_is_refused_not_reset() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    let data = root.path().join("data");
    {
        let app = root.build();
        let e = &app.engine;
        e.handle(&on(Platform::Telegram, "9", "hi")).await;
        e.handle(&on(Platform::Telegram, "100", "/admin ban tg:9 abuse"))
            .await;
    }
    {
        let store = SledStore::open(&data, 8, 500).unwrap();
        store.raw_put("users", b"tg:9", b"\xff{garbage").unwrap();
        store.db().flush().unwrap();
    }
    let app = root.build();
    let calls = llm.request_count();
    let victim = UserRef::new(Platform::Telegram, "9");
    assert!(
        app.store.user(&victim).is_err(),
        "an error, not an empty record"
    );
    for said in ["hi again", "/usage", "/export"] {
        let got = text(&app.engine.handle(&on(Platform::Telegram, "9", said)).await);
        assert_eq!(got, confab::engine::MSG_INTERNAL, "{said}");
    }
    assert_eq!(llm.request_count(), calls, "no LLM call");
    // an admin's change does not overwrite it either (the ban would be gone)
    let got = text(
        &app.engine
            .handle(&on(Platform::Telegram, "100", "/admin limit tg:9 5"))
            .await,
    );
    assert!(
        got.starts_with("Failed: corrupt store entry in users"),
        "{got}"
    );
    let raw = app.sled().unwrap().raw_get("users", b"tg:9").unwrap();
    assert_eq!(raw.as_deref(), Some(b"\xff{garbage".as_slice()));
    // everyone else is served
    let got = text(
        &app.engine
            .handle(&on(Platform::Telegram, "10", "hello"))
            .await,
    );
    assert_eq!(got, "echo: hello");
    // the operator's way out: forget the record
    confab::engine::admin::forget_user(&app.engine, &victim).unwrap();
    let got = text(&app.engine.handle(&on(Platform::Telegram, "9", "hi")).await);
    assert_eq!(got, "echo: hi");
}
