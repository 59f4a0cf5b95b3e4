//! Faults: encryption at rest (and a wrong key), a corrupt store entry, the LLM down
//! for 30 s with the daemon recovering by itself.

use std::time::{Duration, Instant};

use confab::store::{SledStore, Store};

use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::fake_telegram::FakeTelegram;
use crate::harness::{msg, text, Root, TG_BOT_TOML, TG_TOKEN};
use crate::telegram::spawn_daemon;

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn with_key(root: &Root, key: &str) {
    std::fs::write(root.env_file(), format!("CONFAB_DATA_KEY={key}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_text_is_encrypted_at_rest_and_a_wrong_key_is_refused() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    with_key(&root, KEY);
    {
        let app = root.build();
        let r = app.engine.handle(&msg("1", "my secret is flamingo")).await;
        assert_eq!(text(&r), "echo: my secret is flamingo");
        for (tree, k, v) in app.sled().unwrap().dump().unwrap() {
            let row = format!(
                "{}{}",
                String::from_utf8_lossy(&k),
                String::from_utf8_lossy(&v)
            );
            assert!(!row.contains("flamingo"), "plaintext in {tree}: {row}");
        }
    }
    // the right key reads it back (memory works across the restart)
    {
        let app = root.build();
        app.engine.handle(&msg("1", "what is my secret?")).await;
        let last = llm.requests().pop().unwrap();
        assert!(last
            .messages
            .iter()
            .any(|(_, c)| c == "my secret is flamingo"));
    }
    // a wrong key, or none, is a clear start-up error
    with_key(&root, "a-different-key");
    let cfg = confab::config::load(&root.options()).unwrap();
    let err = confab::app::build(cfg)
        .err()
        .expect("wrong key refused")
        .to_string();
    let err = format!("{err:#}");
    assert!(err.contains("opening the store"), "{err}");
    let data = root.path().join("data");
    let e = SledStore::open_with_key(&data, 8, 500, Some("a-different-key"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not match"), "{e}");
    let e = SledStore::open(&data, 8, 500).err().unwrap();
    assert!(e.to_string().contains("CONFAB_DATA_KEY is not set"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_store_entry_is_skipped_and_the_daemon_keeps_serving() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    {
        let app = root.build();
        let mut first = msg("5", "first turn");
        first.update_id = None;
        app.engine.handle(&first).await;
    }
    // Damage user 5's stored turns on disk. (A damaged user record is refused rather than
    // skipped, so a ban cannot vanish: commands::a_corrupt_user_record_is_refused_not_reset.)
    {
        let store = SledStore::open(&root.path().join("data"), 8, 500).unwrap();
        for (tree, k, _) in store.dump().unwrap() {
            if tree == "turns" {
                store.raw_put(&tree, &k, b"\xff{garbage").unwrap();
            }
        }
        store.db().flush().unwrap();
    }
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(5, "C", "still there?");
    tg.send_private(6, "D", "hello");
    let sent = tg.wait_for_sent(2, Duration::from_secs(20)).await;
    let texts: Vec<&str> = sent.iter().map(|m| m.text.as_str()).collect();
    assert!(
        texts.contains(&"echo: still there?") && texts.contains(&"echo: hello"),
        "{texts:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("corrupt store entry skipped"), "{logs}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_down_for_30_seconds_then_recovery() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(
        &llm.base_url,
        &tg.api_url,
        "[limits]\nmessages_per_minute = 6000\nburst = 1000\n[llm]\nmax_retries = 1\nbreaker_failures = 3\nbreaker_cooldown_secs = 2\ntimeout_secs = 2\n",
        TG_BOT_TOML,
    );
    let log = root.path().join("daemon.log");
    let mut child = spawn_daemon(&root, &log, "info");
    tg.send_private(1, "W", "warm up");
    tg.wait_for_sent(1, Duration::from_secs(20)).await;
    let rss_before = rss_kib(child.id());

    // Down: connection refused for 15 s, then 500s for 15 s, while users keep writing.
    llm.shutdown();
    let start = Instant::now();
    let mut asked = 1usize;
    let mut user = 100i64;
    while start.elapsed() < Duration::from_secs(30) {
        if start.elapsed() > Duration::from_secs(15) && llm.request_count() == 1 {
            llm.set_default(Behavior::status(500));
            llm.restart().await.unwrap();
        }
        for _ in 0..5 {
            user += 1;
            tg.send_private(user, "U", "are you there?");
            asked += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sent = tg.wait_for_sent(asked, Duration::from_secs(30)).await;
    assert_eq!(
        sent.len(),
        asked,
        "every message got an answer (apology or notice)"
    );
    let unavailable = sent
        .iter()
        .filter(|m| m.text.contains("temporarily unavailable"))
        .count();
    let apologies = sent.iter().filter(|m| m.text.starts_with("Sorry")).count();
    let kinds: std::collections::BTreeMap<&str, usize> =
        sent.iter().fold(Default::default(), |mut m, s| {
            *m.entry(s.text.as_str()).or_default() += 1;
            m
        });
    // Every user got a short apology: "Sorry…" after retries, or "temporarily unavailable"
    // at once while the circuit was open (most of them).
    assert_eq!(apologies + unavailable + 1, sent.len(), "{kinds:?}");
    assert!(unavailable > asked / 2, "the circuit opened: {kinds:?}");
    assert!(
        llm.request_count() > 1,
        "half-open probes reached the LLM during the 500s"
    );
    // 500s reached the fake only as half-open probes, not one per user
    assert!(
        llm.request_count() < asked / 2,
        "{} LLM calls for {asked} messages",
        llm.request_count()
    );
    let rss_after = rss_kib(child.id());
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // Back up: the next probe closes the circuit and users are served again.
    llm.set_default(Behavior::Echo);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tg.send_private(9999, "R", "recovered?");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tg
            .sent_to(9999)
            .iter()
            .any(|m| m.text == "echo: recovered?")
        {
            break;
        }
        if Instant::now() > deadline {
            panic!("no recovery: {:?}", tg.sent_to(9999));
        }
        tg.send_private(9999, "R", "recovered?");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn store_trait_is_object_safe() {
    fn takes(_: &dyn Store) {}
    let dir = tempfile::tempdir().unwrap();
    takes(&SledStore::open(dir.path(), 8, 500).unwrap());
}
