//! The Redis store on a real `redis-server` (never a mock): what only Redis does — the
//! data really is in Redis, Redis going away and coming back under traffic, `/readyz`,
//! `confab_redis_*` metrics and `confab check`. The engine's own tests run on both
//! backends in `engine.rs` and `commands.rs` (`on_both_backends!`).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use confab::engine::MSG_BUSY;

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{Daemon, Root, TG_BOT_TOML, TG_TOKEN};
use crate::ops_http::{get, has_reason, readyz};
use crate::redis_server::RedisServer;

const WAIT: Duration = Duration::from_secs(30);

async fn setup(server: &RedisServer) -> (FakeOpenAi, FakeTelegram, Root) {
    setup_with(server, "").await
}

async fn setup_with(server: &RedisServer, extra: &str) -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, extra, TG_BOT_TOML);
    root.use_redis(server);
    (llm, tg, root)
}

/// Polls `/readyz` until its status is `want`; returns the last body.
async fn wait_ready(addr: SocketAddr, want: u16) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, json) = readyz(addr).await;
        if status == want {
            return json;
        }
        assert!(Instant::now() < deadline, "readyz stayed {status} {json}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample line starting with `series` (name and labels as printed).
async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, _, body) = get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_turn_is_in_redis_under_the_environment_prefix() {
    let server = RedisServer::start();
    let (_llm, tg, root) = setup(&server).await;
    let daemon = Daemon::start(&root);
    tg.send_private(31, "Ann", "remember the word heliotrope");
    let sent = tg.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].text, "echo: remember the word heliotrope");
    let lists = server.cli(&["--scan", "--pattern", "confab:staging:turns:*"]);
    let list = lists.lines().next().expect("a conversation list in Redis");
    assert!(list.contains("{tg:31}"), "hash-tagged by user: {list}");
    let turns = server.cli(&["--raw", "LRANGE", list, "0", "-1"]);
    assert!(turns.contains("remember the word heliotrope"), "{turns}");
    assert!(
        turns.contains("echo: remember the word heliotrope"),
        "{turns}"
    );
    let user = server.cli(&["--raw", "GET", "confab:staging:user:{tg:31}"]);
    assert!(
        user.contains("\"total_messages\":1"),
        "usage in Redis: {user}"
    );
    // every key of this daemon is under the environment's prefix
    let all = server.cli(&["--scan"]);
    assert!(
        all.lines().all(|k| k.starts_with("confab:staging:")),
        "{all}"
    );
    daemon.stop().await.unwrap();
}

/// Redis killed while messages arrive: each gets the busy apology once its wait
/// (`llm.queue_timeout_secs`) is over (never silence, never a panic), `/readyz` says why
/// it is not ready, and once Redis is back the daemon answers again without a restart;
/// nothing is answered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back_apologises_then_answers_again() {
    let mut server = RedisServer::start();
    let (llm, tg, root) = setup_with(&server, "[llm]\nqueue_timeout_secs = 2\n").await;
    let (daemon, addr) = Daemon::start_with_ops(&root).await;
    tg.send_private(41, "Ann", "before");
    assert_eq!(tg.wait_for_sent(1, WAIT).await[0].text, "echo: before");
    wait_ready(addr, 200).await;
    assert_eq!(metric(addr, "confab_redis_up").await, Some(1.0));

    server.kill();
    let down = wait_ready(addr, 503).await;
    assert!(has_reason(&down, "store"), "{down}");
    tg.send_private(41, "Ann", "during one");
    tg.send_private(42, "Bo", "during two");
    let sent = tg.wait_for_sent(3, WAIT).await;
    assert_eq!(sent[1].text, MSG_BUSY, "{sent:#?}");
    assert_eq!(sent[2].text, MSG_BUSY, "{sent:#?}");
    assert_eq!(llm.request_count(), 1, "no LLM call without the store");
    assert_eq!(metric(addr, "confab_redis_up").await, Some(0.0));
    let unreachable = "confab_redis_commands_total{result=\"unreachable\",env=\"staging\"}";
    assert!(metric(addr, unreachable).await.unwrap_or(0.0) > 0.0);

    server.restart();
    wait_ready(addr, 200).await;
    tg.send_private(42, "Bo", "after");
    let sent = tg.wait_for_sent(4, WAIT).await;
    assert_eq!(sent[3].text, "echo: after", "{sent:#?}");
    // give a wrongly repeated answer time to show up
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts: Vec<String> = tg.sent().into_iter().map(|m| m.text).collect();
    assert_eq!(
        texts,
        vec!["echo: before", MSG_BUSY, MSG_BUSY, "echo: after"]
    );
    assert_eq!(llm.request_count(), 2);
    assert_eq!(metric(addr, "confab_update_panics_total").await, Some(0.0));
    let (_, _, body) = get(addr, "/metrics").await;
    for series in ["redis_commands_total", "redis_command_seconds", "redis_up"] {
        assert!(
            body.contains(&format!("# TYPE confab_{series} ")),
            "{series}"
        );
    }
    assert!(
        metric(addr, "confab_redis_command_seconds_count")
            .await
            .unwrap_or(0.0)
            > 0.0
    );
    daemon.stop().await.expect("a clean stop");
}

fn check(root: &Root) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["check", "--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .env_remove("RUST_LOG")
        .output()
        .expect("run confab check");
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), s(&out.stdout), s(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_redis_persistence_and_warns_without_aof() {
    let on = RedisServer::start();
    let root = Root::new("http://127.0.0.1:9/v1", "");
    root.use_redis(&on);
    let (code, out, err) = check(&root);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("redis: reachable ($CONFAB_REDIS_URL), keys under confab:staging, appendonly yes, appendfsync everysec"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");

    let off = RedisServer::start_with(&["--appendonly", "no"]);
    let root = Root::new("http://127.0.0.1:9/v1", "");
    root.use_redis(&off);
    let (code, out, err) = check(&root);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("appendonly no"), "{out}");
    assert!(out.contains("warning: redis: appendonly is off"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unreachable_redis_without_its_url_or_password() {
    let mut server = RedisServer::start();
    let port = server.port;
    server.kill();
    let root = Root::new("http://127.0.0.1:9/v1", "");
    std::fs::write(
        root.env_file(),
        format!("CONFAB_REDIS_URL=redis://app:hunter2secret@127.0.0.1:{port}/0\n"),
    )
    .unwrap();
    std::fs::write(
        root.path().join("config/staging.toml"),
        std::fs::read_to_string(root.path().join("config/staging.toml")).unwrap()
            + "\n[store]\nbackend = \"redis\"\nredis_timeout_ms = 500\n",
    )
    .unwrap();
    let (code, out, err) = check(&root);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("redis ($CONFAB_REDIS_URL) is unreachable"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2secret") && !out.contains("hunter2secret"),
        "{err}"
    );
    assert!(!err.contains("app:"), "{err}");
}

/// A daemon cannot start on Redis without the URL: a config error naming the variable.
#[tokio::test]
async fn redis_without_a_url_is_a_config_error() {
    let root = Root::new("http://127.0.0.1:9/v1", "[store]\nbackend = \"redis\"\n");
    let (code, out, err) = check(&root);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("store.redis_url_env: environment variable CONFAB_REDIS_URL is not set"),
        "{err}"
    );
}

/// `update_user` is a compare-and-set on Redis: concurrent writers (two instances, or
/// two tasks here) never lose an update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_user_updates_are_all_kept() {
    use confab::domain::{Platform, UserRef};
    let server = RedisServer::start();
    let root = Root::new("http://127.0.0.1:9/v1", "");
    root.use_redis(&server);
    let app = root.build();
    let user = UserRef::new(Platform::Telegram, "77");
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (store, user) = (app.store.clone(), user.clone());
        writers.push(tokio::task::spawn_blocking(move || {
            for _ in 0..25 {
                store
                    .update_user(&user, &mut |r| r.usage.total_messages += 1)
                    .expect("update");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let rec = app.store.user(&user).unwrap().expect("record");
    assert_eq!(rec.usage.total_messages, 100);
    assert_eq!(app.store.user_count().unwrap(), 1);
}

/// A Redis that answers too slowly: the message gets the busy apology once its wait
/// (`llm.queue_timeout_secs`, 1 s here) is over (never a hang), and the next one is
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_fails_within_the_timeout() {
    use crate::harness::{msg, text};
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "[llm]\nqueue_timeout_secs = 1\n");
    root.use_redis(&server);
    let app = root.build();
    assert_eq!(
        text(&app.engine.handle(&msg("5", "hello")).await),
        "echo: hello"
    );
    let port = server.port.to_string();
    let sleeper = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "DEBUG", "SLEEP", "4"])
            .output()
    });
    // Wait until the server is busy sleeping: a PING of our own gets no answer.
    let deadline = Instant::now() + WAIT;
    while !busy(server.port) {
        assert!(Instant::now() < deadline, "DEBUG SLEEP never started");
        assert!(!sleeper.is_finished(), "DEBUG SLEEP ended early");
    }
    let slow = tokio::time::timeout(WAIT, app.engine.handle(&msg("5", "are you there?")))
        .await
        .expect("an answer, not a hang");
    assert_eq!(text(&slow), MSG_BUSY);
    let _ = sleeper.join();
    let deadline = Instant::now() + WAIT;
    loop {
        let r = text(&app.engine.handle(&msg("5", "and now?")).await);
        if r == "echo: and now?" {
            break;
        }
        assert!(Instant::now() < deadline, "still failing: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a PING to the server goes unanswered for 300 ms (it is busy, or down).
fn busy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return true;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(300)));
    if conn.write_all(b"PING\r\n").is_err() {
        return true;
    }
    let mut buf = [0u8; 16];
    !matches!(conn.read(&mut buf), Ok(n) if n > 0)
}

/// With `CONFAB_DATA_KEY` a Redis store is sealed like sled: no message text in Redis,
/// a wrong key or a missing one refuses to open (never garbage later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_redis_store_refuses_a_wrong_or_missing_key() {
    use crate::harness::{msg, text};
    let server = RedisServer::start();
    let llm = FakeOpenAi::start().await;
    let root = Root::new(&llm.base_url, "");
    let with_key = |key: Option<&str>| {
        let line = key.map(|k| format!("CONFAB_DATA_KEY=\"{k}\"\n"));
        std::fs::write(root.env_file(), line.unwrap_or_default()).unwrap();
        root.use_redis(&server);
    };
    with_key(Some("the right passphrase for redis"));
    {
        let app = root.build();
        let r = app.engine.handle(&msg("3", "my secret is flamingo")).await;
        assert_eq!(text(&r), "echo: my secret is flamingo");
        let all = crate::harness::redis_text(&server);
        assert!(all.iter().any(|(_, r)| r.contains(":turns:")), "{all:?}");
        for (_, row) in &all {
            assert!(!row.contains("flamingo") && !row.contains("tg:3"), "{row}");
        }
    }
    // use_redis appended the [store] table once already: only the env file changes now
    let reopen = |key: Option<&str>| {
        let mut env = key
            .map(|k| format!("CONFAB_DATA_KEY=\"{k}\"\n"))
            .unwrap_or_default();
        env.push_str(&format!("CONFAB_REDIS_URL={}\n", server.url()));
        std::fs::write(root.env_file(), env).unwrap();
        let cfg = confab::config::load(&root.options()).expect("config");
        confab::app::build(cfg).err().map(|e| format!("{e:#}"))
    };
    let wrong = reopen(Some("a wrong passphrase")).expect("refused");
    assert!(wrong.contains("does not match"), "{wrong}");
    let missing = reopen(None).expect("refused");
    assert!(
        missing.contains("encrypted but CONFAB_DATA_KEY is not set"),
        "{missing}"
    );
    assert!(reopen(Some("the right passphrase for redis")).is_none());
}
