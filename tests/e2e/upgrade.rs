//! Upgrading a store written by an older confab (issue 16): the fixtures in
//! `tests/fixtures/` were written by the daemon at an older commit (see the README
//! there). Unpacked into a fresh root, the daemon opens them, migrates them in place
//! and answers with their memory, bans, limits, usage and pending replies intact.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::{FakeTelegram, Fault};
use crate::harness::{wait_until, Daemon, Root, TG_BOT_TOML, TG_TOKEN};

const SETTINGS: &str = "[admins]\ntelegram = [100]\n[limits]\nburst = 50\nmessages_per_minute = 600\ncommands_burst = 100\n";
const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const ADMIN: i64 = 100;

fn fixture(schema: u32, sealed: bool) -> std::path::PathBuf {
    let name = if sealed { "sealed" } else { "plain" };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/store-v{schema}-{name}.tar.gz"))
}

async fn root(sealed: bool) -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, SETTINGS, TG_BOT_TOML);
    let key = if sealed {
        format!("CONFAB_DATA_KEY={KEY}\n")
    } else {
        String::new()
    };
    std::fs::write(
        root.env_file(),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n{key}"),
    )
    .expect("write env file");
    (llm, tg, root)
}

/// Sends `text` from `user` and waits for the one reply to their chat.
async fn ask(tg: &FakeTelegram, user: i64, name: &str, text: &str) -> String {
    let before = tg.sent_to(user).len();
    tg.send_private(user, name, text);
    wait_until(&format!("a reply to {text:?}"), || {
        tg.sent_to(user).len() > before
    })
    .await;
    tg.sent_to(user)
        .last()
        .map(|m| m.text.clone())
        .unwrap_or_default()
}

/// Writes the fixtures with the code of the commit it runs at (run it on that commit:
/// `CONFAB_FIXTURE_OUT=$PWD/tests/fixtures cargo test --test e2e upgrade::write_fixtures
/// -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes tests/fixtures; run by hand on the commit whose format they keep"]
async fn write_fixtures() {
    let out = std::env::var("CONFAB_FIXTURE_OUT").expect("CONFAB_FIXTURE_OUT");
    for sealed in [false, true] {
        let (llm, tg, root) = root(sealed).await;
        let daemon = Daemon::start(&root);
        assert!(ask(&tg, 3, "Ann", "my favourite colour is teal")
            .await
            .contains("teal"));
        assert!(ask(&tg, 3, "Ann", "and my pet is a newt")
            .await
            .contains("newt"));
        ask(&tg, 2, "Bob", "hello").await;
        ask(&tg, 5, "Cy", "what is rust?").await;
        assert!(ask(&tg, ADMIN, "Op", "/admin ban tg:2 spam")
            .await
            .contains("Banned"));
        ask(&tg, ADMIN, "Op", "/admin limit tg:3 7 4321").await;
        ask(&tg, 2, "Bob", "still there?").await; // the one ban notice
                                                  // A reply decided and stored but never delivered: Telegram is down.
        tg.fail_for(
            "sendMessage",
            Fault::Status(502, "Bad Gateway".into()),
            Duration::from_secs(3600),
        );
        let asked = llm.request_count();
        tg.send_private(4, "Dee", "keep this for later");
        wait_until("the pending reply's first attempt", || {
            llm.request_count() > asked && tg.attempts("sendMessage").iter().any(|(_, s)| *s == 502)
        })
        .await;
        daemon.stop().await.expect("clean stop");
        let name = if sealed { "sealed" } else { "plain" };
        let schema = confab::store::SCHEMA_VERSION;
        let tar = Path::new(&out).join(format!("store-v{schema}-{name}.tar.gz"));
        let status = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&tar)
            .arg("-C")
            .arg(root.path())
            .arg("data")
            .status()
            .expect("tar");
        assert!(status.success());
    }
}

/// Unpacks a fixture's `data/` into `root`.
fn unpack(root: &Root, schema: u32, sealed: bool) {
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(fixture(schema, sealed))
        .arg("-C")
        .arg(root.path())
        .status()
        .expect("tar");
    assert!(
        status.success(),
        "unpacked {}",
        fixture(schema, sealed).display()
    );
}

/// The fake Bot API starts counting updates at 1 again; the store remembers the old
/// offset. A first message with a high explicit id moves the fake's counter past it.
fn skip_old_update_ids(tg: &FakeTelegram) {
    tg.send_update(json!({
        "update_id": 10_000,
        "message": {
            "message_id": 10_000,
            "date": 1_700_000_000,
            "chat": { "id": 9, "type": "private", "first_name": "Eve" },
            "from": { "id": 9, "is_bot": false, "first_name": "Eve" },
            "text": "hello after the upgrade"
        }
    }));
}

async fn an_old_store_is_migrated_and_serves_as_before(schema: u32, sealed: bool) {
    let (llm, tg, root) = root(sealed).await;
    unpack(&root, schema, sealed);
    let daemon = Daemon::start(&root);
    skip_old_update_ids(&tg);
    // The reply that was stored but never delivered is sent now, once, without the LLM.
    wait_until("the pending reply", || !tg.sent_to(4).is_empty()).await;
    wait_until("the new user's reply", || !tg.sent_to(9).is_empty()).await;
    let to_dee: Vec<String> = tg.sent_to(4).into_iter().map(|m| m.text).collect();
    assert_eq!(to_dee, ["echo: keep this for later"]);
    assert!(
        llm.requests()
            .iter()
            .all(|r| r.messages.iter().all(|(_, c)| !c.contains("keep this"))),
        "the stored reply, not a new LLM call"
    );
    // Memory: the next request carries the old turns.
    assert_eq!(
        ask(&tg, 3, "Ann", "what do you know about me?").await,
        "echo: what do you know about me?"
    );
    let last = llm.requests().into_iter().last().expect("a request");
    let said: Vec<&str> = last.messages.iter().map(|(_, c)| c.as_str()).collect();
    for old in [
        "my favourite colour is teal",
        "echo: my favourite colour is teal",
        "and my pet is a newt",
        "echo: and my pet is a newt",
    ] {
        assert!(said.contains(&old), "{old:?} in {said:?}");
    }
    // Limits and usage: the admin's override and the stored totals.
    let usage = ask(&tg, 3, "Ann", "/usage").await;
    assert!(
        usage.contains("7 messages per minute") && usage.contains("4321 tokens per day"),
        "{usage}"
    );
    let whois = ask(&tg, ADMIN, "Op", "/admin whois tg:3").await;
    assert!(
        whois.contains("messages total 3"),
        "old and new messages counted: {whois}"
    );
    let whois = ask(&tg, ADMIN, "Op", "/admin whois tg:2").await;
    assert!(whois.contains("BANNED by tg:100 (spam)"), "{whois}");
    let audit = ask(&tg, ADMIN, "Op", "/admin audit 10").await;
    assert!(audit.contains("/admin ban"), "{audit}");
    // The banned user stays banned (already told once: silence, no LLM call). Stopping
    // lets the update taken from Telegram finish first.
    let asked = llm.request_count();
    tg.send_private(2, "Bob", "let me back in");
    wait_until("the update taken", || tg.pending_updates() == 0).await;
    daemon.stop().await.expect("clean stop");
    assert!(tg.sent_to(2).is_empty(), "{:?}", tg.sent_to(2));
    assert_eq!(
        llm.request_count(),
        asked,
        "the banned user did not reach the LLM"
    );
    assert_eq!(tg.sent_to(4).len(), 1, "the pending reply only once");
    // The store was migrated in place, once: it reopens as it is, nothing left to do.
    let key = sealed.then_some(KEY);
    let store = confab::store::SledStore::open_with_key(&root.path().join("data"), 8, 500, key)
        .expect("reopen");
    let inbox = confab::store::InboxStore::inbox_scan(&store, "tg/").expect("inbox");
    assert!(
        inbox.is_empty(),
        "every update answered: {} left",
        inbox.len()
    );
    let version = confab::store::MetaStore::meta_get(&store, "schema_version").expect("meta");
    assert_eq!(
        version.as_deref(),
        Some(4u32.to_be_bytes().as_slice()),
        "schema 4"
    );
    // Every exchange is one compact row (0xC0 + postcard): the new one as written, the
    // old ones (one row per turn, JSON or 0xC1 + postcard) paired at open.
    let turns: Vec<Vec<u8>> = store
        .dump_open()
        .expect("dump")
        .into_iter()
        .filter(|(tree, _, _)| tree == "turns")
        .map(|(_, _, v)| v)
        .collect();
    let has = |v: &[u8], text: &str| String::from_utf8_lossy(v).contains(text);
    for question in ["what do you know about me", "my favourite colour is teal"] {
        let row = turns
            .iter()
            .find(|v| has(v, question))
            .unwrap_or_else(|| panic!("a row with {question:?}"));
        assert_eq!(
            row.first(),
            Some(&0xC0),
            "{question:?}: one compact exchange row"
        );
        assert!(
            has(row, &format!("echo: {question}")),
            "the answer in the same row"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_store_from_schema_2_is_migrated_and_serves_as_before() {
    an_old_store_is_migrated_and_serves_as_before(2, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_store_from_schema_2_is_migrated_and_serves_as_before() {
    an_old_store_is_migrated_and_serves_as_before(2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_store_from_schema_3_is_migrated_and_serves_as_before() {
    an_old_store_is_migrated_and_serves_as_before(3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_store_from_schema_3_is_migrated_and_serves_as_before() {
    an_old_store_is_migrated_and_serves_as_before(3, true).await;
}
