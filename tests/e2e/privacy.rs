//! Privacy of what is stored: with `CONFAB_DATA_KEY` nothing personal is readable on
//! disk (also after migrating a plaintext store), backups are authenticated with the
//! key, and a forwarded `/admin` text is never run (through the Telegram adapter).

use std::time::Duration;

use confab::domain::{Content, Inbound, Platform};
use confab::ops::backup::{self, BackupError};
use confab::store::{SledStore, UserStore};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{text, Daemon, Root, TG_BOT_TOML, TG_TOKEN};

const ADMINS: &str = "[admins]\ntelegram = [100]\n";
const HEX_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn set_key(root: &Root, key: &str) {
    std::fs::write(root.env_file(), format!("CONFAB_DATA_KEY=\"{key}\"\n")).unwrap();
}

fn said(user: &str, name: &str, username: &str, words: &str) -> Inbound {
    Inbound {
        bot: "assistant".into(),
        platform: Platform::Telegram,
        update_id: None,
        chat_id: user.into(),
        user_id: user.into(),
        user_name: name.into(),
        username: Some(username.into()),
        is_private: true,
        forwarded: false,
        content: Content::Text(words.into()),
    }
}

fn admin(words: &str) -> Inbound {
    said("100", "Op", "op", words)
}

/// Words that must never be readable on disk in the scenario below.
const SECRETS: &[&str] = &[
    "zanzibar",
    "zq_hidden",
    "flamingos",
    "sock puppet",
    "echo:",
    "cached words",
];

/// Every raw row (keys and values as stored), lowercased.
fn raw_rows(store: &SledStore) -> Vec<(String, String)> {
    crate::harness::rows_as_text(store.dump().unwrap())
        .into_iter()
        .map(|(tree, row)| (tree, row.to_lowercase()))
        .collect()
}

fn assert_nothing_personal(store: &SledStore) {
    for (tree, row) in raw_rows(store) {
        for s in SECRETS {
            assert!(!row.contains(s), "{s:?} readable in {tree}: {row}");
        }
    }
}

/// A name, a username, message text, a ban reason and a cached question.
async fn populate(app: &confab::app::App) {
    let e = &app.engine;
    let r = e
        .handle(&said(
            "31",
            "Zanzibar Quill",
            "zq_hidden",
            "what do flamingos eat",
        ))
        .await;
    assert_eq!(text(&r), "echo: what do flamingos eat");
    e.handle(&said("33", "Bo", "bo", "cached words")).await;
    let r = e
        .handle(&admin("/admin ban @zq_hidden sock puppet ring"))
        .await;
    assert!(text(&r).starts_with("Banned tg:31"), "{}", text(&r));
}

#[tokio::test]
async fn with_a_key_no_tree_holds_anything_personal_in_the_clear() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    // a passphrase (Argon2id), not a raw key
    set_key(&root, "correct horse battery staple");
    {
        let app = root.build();
        populate(&app).await;
        assert_nothing_personal(app.sled().unwrap());
    }
    // and everything still works after a restart with the same key
    let app = root.build();
    assert_nothing_personal(app.sled().unwrap());
    let e = &app.engine;
    let who = text(&e.handle(&admin("/admin whois @zq_hidden")).await);
    assert!(who.contains("Zanzibar Quill @zq_hidden"), "{who}");
    assert!(who.contains("BANNED by tg:100 (sock puppet ring)"), "{who}");
    let r = e
        .handle(&said("31", "Zanzibar Quill", "zq_hidden", "hi"))
        .await;
    assert_eq!(text(&r), "You have been blocked from using this bot.");
    // the cache (keys are HMACs now) still hits for the same context
    e.handle(&said("33", "Bo", "bo", "/reset")).await;
    let calls = llm.request_count();
    let r = e.handle(&said("33", "Bo", "bo", "cached words")).await;
    assert_eq!(text(&r), "echo: cached words");
    assert_eq!(llm.request_count(), calls, "served from the cache");
}

#[tokio::test]
async fn a_plaintext_store_is_encrypted_on_the_first_start_with_a_key() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    {
        let app = root.build();
        assert!(!app.sled().unwrap().is_encrypted());
        populate(&app).await;
        let rows = raw_rows(app.sled().unwrap());
        assert!(
            rows.iter().any(|(_, r)| r.contains("zanzibar")),
            "plain before"
        );
    }
    set_key(&root, HEX_KEY);
    let app = root.build();
    assert!(app.sled().unwrap().is_encrypted());
    assert_nothing_personal(app.sled().unwrap());
    // nothing was lost: the ban, the name, the username, the memory
    let who = text(&app.engine.handle(&admin("/admin whois @zq_hidden")).await);
    assert!(who.contains("BANNED by tg:100 (sock puppet ring)"), "{who}");
    app.engine
        .handle(&said("33", "Bo", "bo", "what did I say?"))
        .await;
    let last = llm.requests().pop().unwrap();
    assert!(last.messages.iter().any(|(_, c)| c == "cached words"));
    drop(app);
    // without the key it no longer opens
    std::fs::write(root.env_file(), "").unwrap();
    let cfg = confab::config::load(&root.options()).unwrap();
    assert!(confab::app::build(cfg).is_err());
}

/// Re-signs the SHA-256 trailer, as anyone can without the key.
fn resum(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - 32;
    let sum: [u8; 32] = Sha256::digest(&bytes[..body]).into();
    bytes[body..].copy_from_slice(&sum);
    bytes
}

#[tokio::test]
async fn a_backup_edited_without_the_key_is_refused() {
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, ADMINS);
    set_key(&root, HEX_KEY);
    let app = root.build();
    populate(&app).await;
    let rows = app.sled().unwrap().dump().unwrap();
    let auth = app
        .sled()
        .unwrap()
        .backup_auth()
        .expect("an encrypted store signs its backups");
    let good = backup::encode(&rows, Some(&auth)).unwrap();
    let restore = |bytes: &[u8], key: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backup.confab");
        std::fs::write(&file, bytes).unwrap();
        let r = backup::restore(&file, &dir.path().join("data"), false, 8, key);
        (dir, r)
    };

    // the authentic backup restores, and opens with the key
    let (dir, r) = restore(&good, Some(HEX_KEY));
    assert_eq!(r.unwrap(), rows.len() as u64);
    let restored =
        SledStore::open_with_key(&dir.path().join("data"), 8, 500, Some(HEX_KEY)).unwrap();
    let banned = restored.user(&"tg:31".parse().unwrap()).unwrap().unwrap();
    assert!(banned.banned.is_some());
    drop(restored);

    // a planted global cache entry, the checksum recomputed: the HMAC does not match
    let mut planted = rows.clone();
    planted.push((
        "cache".into(),
        vec![7; 32],
        br#"{"reply":"visit evil.example"}"#.to_vec(),
    ));
    let mut bytes = backup::encode(&planted, Some(&auth)).unwrap();
    let cut = bytes.len() - 64; // forge: keep the old HMAC
    bytes[cut..cut + 32].copy_from_slice(&good[good.len() - 64..good.len() - 32]);
    let (_d, r) = restore(&resum(bytes), Some(HEX_KEY));
    assert!(matches!(r, Err(BackupError::Unauthenticated(_))), "{r:?}");

    // a ban deleted, re-encoded without an HMAC
    let unbanned: Vec<_> = rows
        .iter()
        .filter(|(t, _, _)| t != "users")
        .cloned()
        .collect();
    let (_d, r) = restore(&backup::encode(&unbanned, None).unwrap(), Some(HEX_KEY));
    assert!(matches!(r, Err(BackupError::Unauthenticated(_))), "{r:?}");

    // one flipped byte, checksum recomputed
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    let (_d, r) = restore(&resum(flipped), Some(HEX_KEY));
    assert!(r.is_err(), "{r:?}");

    // signed with another key
    let other = tempfile::tempdir().unwrap();
    let other = SledStore::open_with_key(other.path(), 8, 500, Some(&"ab".repeat(32))).unwrap();
    let forged = backup::encode(&rows, other.backup_auth().as_ref()).unwrap();
    let (_d, r) = restore(&forged, Some(HEX_KEY));
    assert!(matches!(r, Err(BackupError::Unauthenticated(_))), "{r:?}");

    // an encrypted backup needs the key
    let (_d, r) = restore(&good, None);
    assert!(matches!(r, Err(BackupError::Unauthenticated(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_admin_command_from_telegram_is_not_run() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, ADMINS, TG_BOT_TOML);
    let daemon = Daemon::start(&root);
    // the admin forwards a stranger's message that reads like a command
    tg.send_update(json!({ "message": {
        "message_id": 9001,
        "from": { "id": 100, "is_bot": false, "first_name": "Op" },
        "date": 1_763_700_000,
        "chat": { "id": 100, "type": "private", "first_name": "Op" },
        "text": "/admin maintenance on gotcha",
        "forward_origin": {
            "type": "user",
            "date": 1_763_600_000,
            "sender_user": { "id": 66, "is_bot": false, "first_name": "Eve" }
        }
    }}));
    let sent = tg.wait_for_sent(1, Duration::from_secs(20)).await;
    assert_eq!(sent[0].text, "echo: /admin maintenance on gotcha");
    tg.send_private(5, "U", "still open?");
    let sent = tg.wait_for_sent(2, Duration::from_secs(20)).await;
    assert_eq!(
        sent[1].text, "echo: still open?",
        "maintenance was not turned on"
    );
    daemon.stop().await.unwrap();
}
