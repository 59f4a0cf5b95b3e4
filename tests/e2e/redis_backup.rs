//! Backup, restore and `confab migrate` on Redis, with a real `redis-server`: one
//! backup file (sled's row format) restores into a fresh Redis prefix or a fresh sled
//! data dir, and the engine there answers with the same memory and the same bans.

use std::path::Path;

use confab::app::App;
use confab::domain::{Platform, UserRef};
use confab::store::{AuditEntry, Ban, CacheEntry};

use crate::fake_openai::FakeOpenAi;
use crate::harness::{confab_cli as confab, msg, Root};
use crate::redis_server::RedisServer;

/// Runs the CLI off the async workers (it waits for a child process).
fn run(root: &Root, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::task::block_in_place(|| confab(root, args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A root on `server` with its keys under `prefix`.
fn redis_root(llm: &FakeOpenAi, server: &RedisServer, prefix: &str) -> Root {
    let root = Root::new(&llm.base_url, "");
    root.use_redis(server);
    append(
        &root.path().join("config/staging.toml"),
        &format!("redis_prefix = {prefix:?}\n"),
    );
    root
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

fn tg(id: &str) -> UserRef {
    UserRef::new(Platform::Telegram, id)
}

/// User 1 talks (memory, usage, handled markers); user 2 talks and is banned; plus a
/// cache entry, an audit entry, an inbox entry and a meta value.
async fn populate(app: &App) {
    app.engine.handle(&msg("1", "my name is Ann")).await;
    app.engine.handle(&msg("2", "hello there")).await;
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        store
            .update_user(&tg("2"), &mut |r| {
                r.banned = Some(Ban {
                    reason: "spam".into(),
                    by: "tg:99".into(),
                    at: 1,
                    notified: false,
                })
            })
            .expect("ban");
        let entry = CacheEntry {
            reply: "cached reply".into(),
            tokens: 3,
            reply_tokens: 2,
            created_at: 1_700_000_000,
            origin: tg("1"),
            model: "m".into(),
        };
        store.cache_put(&[7u8; 32], &entry, 1000).expect("cache");
        let audit = AuditEntry {
            at: 1_700_000_000,
            actor: "tg:99".into(),
            command: "ban".into(),
            target: Some("tg:2".into()),
            result: "ok".into(),
        };
        store.audit_append(&audit).expect("audit");
        store
            .inbox_put("tg/assistant/000042", b"an update")
            .expect("inbox");
        store.meta_put("maintenance", b"off").expect("meta");
    })
    .await
    .expect("populate");
}

/// What a restored (or migrated) store must show: user 1's memory reaches the LLM,
/// user 2 stays banned (no LLM call), and every role came across.
async fn assert_same_memory(root: &Root, llm: &FakeOpenAi) {
    let app = root.build();
    llm.clear_requests();
    app.engine.handle(&msg("1", "what is my name?")).await;
    let req = llm.requests().pop().expect("an LLM request");
    assert!(
        req.messages
            .iter()
            .any(|(_, t)| t.contains("my name is Ann")),
        "earlier turns in the request: {:?}",
        req.messages
    );
    app.engine.handle(&msg("2", "let me back in")).await;
    assert_eq!(
        llm.requests().len(),
        1,
        "the ban holds: no LLM call for tg:2"
    );
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(store.user_count().unwrap(), 2);
        let banned = store.user(&tg("2")).unwrap().expect("user 2").banned;
        assert_eq!(banned.map(|b| b.reason), Some("spam".to_string()));
        let cached = store.cache_get(&[7u8; 32]).unwrap().expect("cache entry");
        assert_eq!(cached.reply, "cached reply");
        assert!(store
            .audit_recent(10)
            .unwrap()
            .iter()
            .any(|e| e.command == "ban" && e.target.as_deref() == Some("tg:2")));
        let inbox = store.inbox_scan("tg/").unwrap();
        assert_eq!(
            inbox,
            vec![("tg/assistant/000042".to_string(), b"an update".to_vec())]
        );
        assert_eq!(
            store.meta_get("maintenance").unwrap(),
            Some(b"off".to_vec())
        );
    })
    .await
    .expect("checks");
}

fn keys_under(server: &RedisServer, prefix: &str) -> usize {
    server
        .cli(&["--scan", "--pattern", &format!("{prefix}:*")])
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_backup_restores_into_a_fresh_prefix_and_into_sled() {
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let source = redis_root(&llm, &server, "confab:src");
    populate(&source.build()).await;
    let file = source.path().join("b/confab.backup");
    let (code, out, err) = run(&source, &["backup", "--out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("sha256 verified"), "{out}");

    // into a fresh Redis prefix
    let copy = redis_root(&llm, &server, "confab:copy");
    let (code, out, err) = run(&copy, &["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("into Redis (keys under confab:copy)"), "{out}");
    assert_same_memory(&copy, &llm).await;

    // a non-empty prefix is refused without --force, and replaced (not doubled) with it
    let (code, _, err) = run(&copy, &["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--force"), "{err}");
    let (code, _, err) = run(
        &copy,
        &["restore", "--force", "--from", file.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{err}");
    let app = copy.build();
    let store = app.store.clone();
    let turns =
        tokio::task::spawn_blocking(move || store.user_conversations(&tg("1")).unwrap()[0].1.len())
            .await
            .unwrap();
    assert_eq!(turns, 2, "user 1's conversation as backed up, not doubled");
    assert!(
        keys_under(&server, "confab:src") > 0,
        "--force touched only its own prefix"
    );

    // into a fresh sled data dir
    let sled = Root::new(&llm.base_url, "");
    let (code, _, err) = run(&sled, &["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_memory(&sled, &llm).await;

    // a damaged file is refused before anything is touched
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    let bad = source.path().join("bad.backup");
    std::fs::write(&bad, bytes).unwrap();
    let fresh = redis_root(&llm, &server, "confab:fresh");
    let (code, _, err) = run(&fresh, &["restore", "--from", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("checksum"), "{err}");
    assert_eq!(keys_under(&server, "confab:fresh"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_sled_to_redis_and_back_with_equal_counts() {
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let sled = Root::new(&llm.base_url, "");
    append(
        &sled.env_file(),
        &format!("\nCONFAB_REDIS_URL={}\n", server.url()),
    );
    populate(&sled.build()).await;

    let (code, _, err) = run(&sled, &["migrate", "--to", "sled"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already on sled"), "{err}");
    let (code, out, err) = run(&sled, &["migrate", "--to", "redis"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("every count matches"), "{out}");
    for role in [
        "turns",
        "conversations",
        "users",
        "usernames",
        "cache entries",
        "audit entries",
        "inbox",
        "handled markers",
        "meta",
    ] {
        assert!(out.contains(role), "{role} in the table: {out}");
    }
    assert!(!out.contains("MISMATCH"), "{out}");
    let (code, _, err) = run(&sled, &["migrate", "--to", "redis"]);
    assert_eq!(code, Some(1), "a non-empty target is refused");
    assert!(err.contains("--force"), "{err}");

    // a sled backup file restores into a Redis prefix too
    let file = sled.path().join("sled.backup");
    let (code, _, err) = run(&sled, &["backup", "--out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let from_file = redis_root(&llm, &server, "confab:fromfile");
    let (code, _, err) = run(&from_file, &["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_memory(&from_file, &llm).await;

    // the Redis copy (the default prefix of staging) answers with the same memory
    let redis = Root::new(&llm.base_url, "");
    redis.use_redis(&server);
    assert_same_memory(&redis, &llm).await;

    // and back into an empty sled data dir
    let (code, out, err) = run(&redis, &["migrate", "--to", "sled"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("every count matches"), "{out}");
    let back = Root::new(&llm.base_url, "");
    std::fs::rename(redis.path().join("data"), back.path().join("data")).unwrap();
    assert_same_memory(&back, &llm).await;
}

const DATA_KEY: &str = "CONFAB_DATA_KEY=correct-horse-battery-staple-42\n";

/// A root with a data key (a passphrase: the salt matters), on `server` under `prefix`
/// (or on sled with `None`).
fn keyed_root(llm: &FakeOpenAi, server: &RedisServer, prefix: Option<&str>) -> Root {
    let root = match prefix {
        Some(p) => redis_root(llm, server, p),
        None => Root::new(&llm.base_url, ""),
    };
    append(&root.env_file(), DATA_KEY);
    if prefix.is_none() {
        append(
            &root.env_file(),
            &format!("\nCONFAB_REDIS_URL={}\n", server.url()),
        );
    }
    root
}

/// [`populate`], plus a username for user 1 and user 3, who never wrote: no username,
/// no conversation, only an admin's limit override (nothing but the record names them).
async fn populate_three(app: &App) {
    populate(app).await;
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        store
            .update_user(&tg("1"), &mut |r| r.username = Some("ann".into()))
            .expect("username");
        store
            .update_user(&tg("3"), &mut |r| r.limit_per_minute = Some(5))
            .expect("user 3");
    })
    .await
    .expect("populate");
}

/// [`assert_same_memory`] for a store filled by [`populate_three`].
async fn assert_same_three(root: &Root, llm: &FakeOpenAi) {
    let app = root.build();
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(store.user_count().unwrap(), 3);
        let three = store.user(&tg("3")).unwrap().expect("user 3 came across");
        assert_eq!(three.limit_per_minute, Some(5));
        let ann = store.find_username(Platform::Telegram, "ann").unwrap();
        assert_eq!(ann, Some(tg("1")), "the username index came across");
        // counted as 2 by assert_same_memory: the third user is set aside below
        store.forget_user(&tg("3")).expect("forget 3");
    })
    .await
    .expect("checks");
    drop(app);
    assert_same_memory(root, llm).await;
}

/// An encrypted Redis store backs up (signed) and restores into a fresh prefix and into
/// sled with the same key: same memory, the ban holds, the unnamed user is there; a
/// tampered backup is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_redis_store_restores_into_a_fresh_prefix_and_into_sled() {
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let source = keyed_root(&llm, &server, Some("confab:src"));
    populate_three(&source.build()).await;
    let file = source.path().join("b/confab.backup");
    let (code, out, err) = run(&source, &["backup", "--out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("sha256 verified"), "{out}");
    let bytes = std::fs::read(&file).unwrap();
    assert!(
        !bytes.windows(11).any(|w| w == b"my name is "),
        "turns are sealed in the backup"
    );

    let copy = keyed_root(&llm, &server, Some("confab:copy"));
    let (code, out, err) = run(&copy, &["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("into Redis (keys under confab:copy)"), "{out}");
    assert_same_three(&copy, &llm).await;

    let sled = keyed_root(&llm, &server, None);
    let (code, _, err) = run(&sled, &["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_three(&sled, &llm).await;

    // a tampered backup (maintenance switched on, the checksum fixed up; without the
    // key the HMAC cannot be redone) is refused
    let mut bad = bytes.clone();
    let body = bad.len() - 32;
    let at = bad
        .windows(14)
        .position(|w| w == b"maintenance\0\0\0")
        .expect("the maintenance meta row");
    let value = at + 11 + 4;
    assert_eq!(&bad[value..value + 3], b"off");
    bad[value..value + 3].copy_from_slice(b"on!");
    let sum: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(&bad[..body]).into()
    };
    bad[body..].copy_from_slice(&sum);
    let bad_file = source.path().join("tampered.backup");
    std::fs::write(&bad_file, bad).unwrap();
    let fresh = keyed_root(&llm, &server, Some("confab:fresh"));
    let (code, _, err) = run(&fresh, &["restore", "--from", bad_file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not authentic"), "{err}");
}

/// `migrate` copies an encrypted store sled → Redis → sled with equal counts, and each
/// copy answers with the same memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_an_encrypted_store_sled_to_redis_and_back() {
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let sled = keyed_root(&llm, &server, None);
    populate_three(&sled.build()).await;
    let (code, out, err) = run(&sled, &["migrate", "--to", "redis"]);
    assert_eq!(code, Some(0), "{err}{out}");
    assert!(out.contains("every count matches"), "{out}");

    let redis = keyed_root(&llm, &server, None);
    redis.use_redis(&server);
    let (code, out, err) = run(&redis, &["migrate", "--to", "sled"]);
    assert_eq!(code, Some(0), "{err}{out}");
    assert!(out.contains("every count matches"), "{out}");
    let users = out.lines().find(|l| l.starts_with("users")).unwrap_or("");
    assert_eq!(
        users.split_whitespace().rev().take(2).collect::<Vec<_>>(),
        vec!["3", "3"],
        "{out}"
    );
    let back = keyed_root(&llm, &server, None);
    std::fs::rename(redis.path().join("data"), back.path().join("data")).unwrap();
    assert_same_three(&back, &llm).await;
    assert_same_three(&redis, &llm).await;
}

/// A store written before identities existed (no `ident:` keys) still works; its
/// backup names the users it can (by conversation) and refuses, saying how many and
/// why, while one cannot be named — until that user's record is written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_store_from_before_identities_says_which_users_it_cannot_name() {
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let root = keyed_root(&llm, &server, Some("confab:old"));
    populate_three(&root.build()).await;
    for key in server
        .cli(&["--scan", "--pattern", "confab:old:ident:*"])
        .lines()
    {
        server.cli(&["DEL", key]);
    }
    let file = root.path().join("old.backup");
    let (code, _, err) = run(&root, &["backup", "--out", file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("1 users of this encrypted Redis store"),
        "{err}"
    );
    assert!(!file.exists());

    let app = root.build();
    app.engine.handle(&msg("1", "still here?")).await;
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        store
            .update_user(&tg("3"), &mut |r| r.limit_per_minute = Some(6))
            .expect("user 3 written again")
    })
    .await
    .unwrap();
    drop(app);
    let (code, _, err) = run(&root, &["backup", "--out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
}

/// More rows than one page of every paged role: all of them come across.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_larger_than_one_page_migrates_completely() {
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    root.use_redis(&server);
    let store = root.build().store.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..1_200u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let entry = CacheEntry {
                reply: format!("r{i}"),
                tokens: 1,
                reply_tokens: 1,
                created_at: 1_700_000_000 + i64::from(i),
                origin: tg("1"),
                model: "m".into(),
            };
            store.cache_put(&key, &entry, 100_000).expect("cache");
            let audit = AuditEntry {
                at: 1_700_000_000,
                actor: "tg:99".into(),
                command: format!("c{i}"),
                target: None,
                result: "ok".into(),
            };
            store.audit_append(&audit).expect("audit");
            store
                .inbox_put(&format!("tg/a/{i:06}"), b"u")
                .expect("inbox");
            store
                .update_user(&tg(&i.to_string()), &mut |r| r.usage.total_messages = 1)
                .expect("user");
        }
    })
    .await
    .unwrap();
    let (code, out, err) = run(&root, &["migrate", "--to", "sled"]);
    assert_eq!(code, Some(0), "{err}{out}");
    for role in ["users", "cache entries", "audit entries", "inbox"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(role))
            .unwrap_or_else(|| panic!("{role} in {out}"));
        let n: Vec<&str> = line.split_whitespace().rev().take(2).collect();
        assert_eq!(n, vec!["1200", "1200"], "{line}");
    }
}
