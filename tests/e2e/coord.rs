//! Coordination across instances on one real `redis-server`: the shared GCRA limiter
//! decides like governor, limits are shared between engines, one conversation is handled
//! by one instance at a time, a dead holder's lease frees itself, Redis down answers with
//! the busy apology, and exactly one daemon polls Telegram (the other takes over).

use std::sync::Arc;
use std::time::Duration;

use confab::app::App;
use confab::coord::redis_limiter::At;
use confab::coord::{Coordination, GovernorLimiter, LeaseTimes, RedisCoordination, RedisLimiter};
use confab::engine::{Engine, MSG_BUSY};

use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::FakeTelegram;
use crate::harness::{calls_via, msg, text, wait_until, Daemon, Root, TG_BOT_TOML, TG_TOKEN};
use crate::redis_server::RedisServer;

const WAIT: Duration = Duration::from_secs(30);

/// Quotas the equivalence test mixes: (per_minute, burst); 7 and 13 per minute do not
/// divide a minute into whole milliseconds.
const QUOTAS: &[(u32, u32)] = &[(1, 1), (6, 2), (7, 3), (13, 1), (60, 5), (600, 2)];

/// A root whose instances share `redis` (store and coordination).
fn redis_root(llm: &FakeOpenAi, redis: &RedisServer, settings: &str) -> Root {
    let root = Root::new(&llm.base_url, settings);
    root.use_redis(redis);
    root
}

fn build(root: &Root) -> App {
    let app = root.build();
    assert_eq!(app.engine.coordination().backend(), "redis");
    app
}

#[test]
fn redis_gcra_decides_like_governor() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let redis = RedisServer::start();
    let rt_redis = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stats = Arc::default();
    let shared = rt_redis
        .block_on(async { RedisLimiter::open(&redis.url(), "eq", Duration::from_secs(5), stats) })
        .expect("limiter");
    let gaps = prop_oneof![0u64..40, 0u64..3_000, 0u64..30_000];
    let steps = proptest::collection::vec((gaps, 0..QUOTAS.len()), 1..30);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(&steps, |steps| {
            // governor on a paused tokio clock; the script at the same made-up times
            let rt_gov = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("paused runtime");
            let local = rt_gov.block_on(async { GovernorLimiter::new() });
            let key = rand::random::<u64>();
            let base = 1_900_000_000u64;
            let mut elapsed_ms = 0u64;
            for (gap, q) in steps {
                let (per_minute, burst) = QUOTAS[q];
                elapsed_ms += gap;
                let gov = rt_gov.block_on(async {
                    tokio::time::advance(Duration::from_millis(gap)).await;
                    local.check_now(key, per_minute, burst)
                });
                let at = At {
                    secs: base + elapsed_ms / 1000,
                    nanos: (elapsed_ms % 1000) as u32 * 1_000_000,
                };
                let red = rt_redis
                    .block_on(shared.check_at(key, per_minute, burst, Some(at)))
                    .expect("redis answered");
                prop_assert_eq!(&gov, &red, "at {} ms, quota {:?}", elapsed_ms, QUOTAS[q]);
            }
            Ok(())
        })
        .expect("the shared limiter decides exactly like governor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_one_limit_and_one_notice() {
    let llm = FakeOpenAi::start().await;
    let redis = RedisServer::start();
    let limits = "[limits]\nmessages_per_minute = 1\nburst = 2\n";
    let (root_a, root_b) = (
        redis_root(&llm, &redis, limits),
        redis_root(&llm, &redis, limits),
    );
    let (a, b) = (build(&root_a), build(&root_b));
    // one user, alternating between the instances
    assert_eq!(text(&a.engine.handle(&msg("42", "one")).await), "echo: one");
    assert_eq!(text(&b.engine.handle(&msg("42", "two")).await), "echo: two");
    let third = text(&a.engine.handle(&msg("42", "three")).await);
    assert!(third.contains("too fast"), "{third}");
    assert!(third.contains("Try again in"), "{third}");
    // the notice was given (on the other instance): silence, no LLM call
    assert_eq!(text(&b.engine.handle(&msg("42", "four")).await), "<silent>");
    assert_eq!(llm.request_count(), 2);
    // another user has a quota of their own
    assert_eq!(text(&b.engine.handle(&msg("7", "hi")).await), "echo: hi");
}

/// Six messages of one conversation, three through each engine, all at once: returns
/// the most LLM calls that were in flight together.
async fn overlap_of_one_conversation(a: Arc<Engine>, b: Arc<Engine>, llm: &FakeOpenAi) -> usize {
    let mut tasks = Vec::new();
    for i in 0..6 {
        let engine = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            text(&engine.handle(&msg("5", &format!("m{i}"))).await)
        }));
    }
    for t in tasks {
        let reply = t.await.expect("handler");
        assert!(reply.starts_with("echo: m"), "{reply}");
    }
    llm.max_in_flight()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversation_never_runs_on_two_instances_at_once() {
    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_millis(150));
    let redis = RedisServer::start();
    let roomy = "[limits]\nmessages_per_minute = 600\nburst = 100\n";
    // control: two engines each alone in its process do overlap
    let (la, lb) = (
        Root::new(&llm.base_url, roomy),
        Root::new(&llm.base_url, roomy),
    );
    let (la, lb) = (la.build(), lb.build());
    let local = overlap_of_one_conversation(la.engine.clone(), lb.engine.clone(), &llm).await;
    assert!(
        local >= 2,
        "local locks cannot order two instances ({local})"
    );

    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_millis(150));
    let (ra, rb) = (
        redis_root(&llm, &redis, roomy),
        redis_root(&llm, &redis, roomy),
    );
    let (a, b) = (build(&ra), build(&rb));
    let shared = overlap_of_one_conversation(a.engine.clone(), b.engine.clone(), &llm).await;
    assert_eq!(shared, 1, "one LLM call at a time for the conversation");
    assert_eq!(llm.request_count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_conversation_lease_frees_itself_after_its_ttl() {
    let llm = FakeOpenAi::start().await;
    let redis = RedisServer::start();
    let root = redis_root(&llm, &redis, "[llm]\nqueue_timeout_secs = 1\n");
    let app = build(&root);
    let inbound = msg("9", "hello");
    let conversation = inbound.conversation().to_string();
    // a holder that took the lease and died (never renews, never releases)
    let coord = app.engine.coordination();
    let dead = coord
        .conversation_lease(&conversation, Duration::from_secs(3))
        .expect("redis lease");
    assert!(dead.try_acquire().await.expect("redis"));
    drop(dead);
    // while it lasts: the busy apology after the bounded wait, counted
    let reply = app.engine.handle(&inbound).await;
    assert_eq!(text(&reply), MSG_BUSY);
    assert_eq!(coord.stats.ordering_timeouts.get(), 1);
    assert_eq!(llm.request_count(), 0);
    // then it expires by itself and the conversation goes on
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = text(&app.engine.handle(&msg("9", "again")).await);
        if reply == "echo: again" {
            break;
        }
        assert_eq!(reply, MSG_BUSY);
        assert!(tokio::time::Instant::now() < deadline, "lease never freed");
    }
    // and a live holder's lease is released when its message is done
    let key = format!("confab:staging:conv:{{{conversation}}}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis.cli(&["EXISTS", &key]) != "0" {
        assert!(tokio::time::Instant::now() < deadline, "lease not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_the_busy_apology_and_service_resumes() {
    let llm = FakeOpenAi::start().await;
    let mut redis = RedisServer::start();
    let root = redis_root(&llm, &redis, "[llm]\nqueue_timeout_secs = 1\n");
    let app = build(&root);
    assert_eq!(text(&app.engine.handle(&msg("3", "a")).await), "echo: a");
    redis.kill();
    assert_eq!(text(&app.engine.handle(&msg("3", "b")).await), MSG_BUSY);
    assert!(app.engine.coordination().stats.ordering_timeouts.get() >= 1);

    // the limiter alone (ordering local): fails closed too, and is counted
    let cfg = confab::config::load(&root.options()).expect("config");
    let mut coord = Coordination::local();
    let stats = coord.stats.clone();
    let timeout = Duration::from_millis(500);
    coord.limiter = Arc::new(RedisLimiter::open(&redis.url(), "x", timeout, stats).expect("url"));
    let llm2 = Arc::new(cfg.llm.build().expect("llm"));
    // (its own sled store: the shared Redis store would refuse first)
    let dir = tempfile::tempdir().expect("tempdir");
    let sled: Arc<dyn confab::store::Store> =
        Arc::new(confab::store::SledStore::open(dir.path(), 16, 500).expect("sled"));
    let lone = Engine::with_coordination(cfg, sled, llm2, coord).expect("engine");
    assert_eq!(text(&lone.handle(&msg("4", "c")).await), MSG_BUSY);
    assert_eq!(lone.coordination().stats.limiter_errors.get(), 1);
    assert_eq!(
        llm.request_count(),
        1,
        "no LLM call without a limit decision"
    );

    redis.restart();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = text(&app.engine.handle(&msg("3", "d")).await);
        if reply == "echo: d" {
            break;
        }
        assert_eq!(reply, MSG_BUSY);
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
    }
    assert_eq!(text(&lone.handle(&msg("4", "e")).await), "echo: e");
}

/// A Telegram root for one instance: its API URL names it (`/via/<name>`) so the fake
/// tells the instances' calls apart.
fn tg_instance(llm: &FakeOpenAi, tg: &FakeTelegram, redis: &RedisServer, name: &str) -> Root {
    let api = format!("{}/via/{name}", tg.api_url);
    let root = Root::telegram(&llm.base_url, &api, "", TG_BOT_TOML);
    std::fs::write(
        root.env_file(),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n"),
    )
    .expect("write env file");
    root.use_redis(redis);
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_polls_and_the_standby_takes_over_when_it_dies() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let redis = RedisServer::start();
    let (root_a, root_b) = (
        tg_instance(&llm, &tg, &redis, "a"),
        tg_instance(&llm, &tg, &redis, "b"),
    );
    // A runs on its own runtime, so it can die without any graceful step
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let daemon_a = {
        let _inside = rt_a.enter();
        Daemon::start(&root_a)
    };
    wait_until("A polls", || calls_via(&tg, "getupdates", "a") > 0).await;
    let daemon_b = Daemon::start(&root_b);
    wait_until("B started", || calls_via(&tg, "setmycommands", "b") > 0).await;
    for i in 0..3 {
        tg.send_private(100 + i, "U", &format!("x{i}"));
        tg.wait_for_sent(i as usize + 1, WAIT).await;
    }
    assert_eq!(
        calls_via(&tg, "getupdates", "b"),
        0,
        "the standby never polled"
    );
    let conflicts = tg.calls().iter().filter(|c| c.status == 409).count();
    assert_eq!(conflicts, 0, "never two pollers at once");

    // A has finished with what it received (sent, marked, out of the shared inbox): a
    // kill between a send and its mark would rightly make B send that reply again.
    wait_until("A's inbox empty", || {
        redis.cli(&["HLEN", "confab:staging:inbox"]) == "0"
    })
    .await;
    // A dies: no release, no shutdown; its lease expires and B takes over
    rt_a.shutdown_background();
    drop(daemon_a);
    let pttl: i64 = redis
        .cli(&["PTTL", "confab:staging:poll:{telegram/assistant}"])
        .parse()
        .unwrap_or(-2);
    assert!(
        pttl > 0,
        "the dead holder did not release its lease ({pttl})"
    );
    wait_until("B polls", || calls_via(&tg, "getupdates", "b") > 0).await;
    tg.send_private(200, "V", "after");
    let sent = tg.wait_for_sent(4, WAIT).await;
    assert_eq!(sent.len(), 4);
    assert!(sent.iter().any(|m| m.text == "echo: after"), "{sent:#?}");
    daemon_b.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stops_polling_when_its_lease_is_taken_or_unrenewable() {
    let mut redis = RedisServer::start();
    let mut settings = RedisCoordination::new("t", Duration::from_millis(500));
    settings.polling = LeaseTimes {
        ttl: Duration::from_secs(2),
        renew_every: Duration::from_millis(300),
        retry_every: Duration::from_millis(100),
    };
    let a = Coordination::redis_with(&redis.url(), settings.clone()).expect("a");
    let b = Coordination::redis_with(&redis.url(), settings).expect("b");
    let stop = tokio_util::sync::CancellationToken::new();
    let (gate_a, gate_b) = (a.poll_gate("telegram/x"), b.poll_gate("telegram/x"));
    let turn_a = gate_a.turn(&stop).await.expect("a holds the lease");
    // another holder takes it (an operator, or a split brain): A stops
    let key = "t:poll:{telegram/x}";
    redis.cli(&["SET", key, "someone-else", "PX", "60000"]);
    tokio::time::timeout(WAIT, turn_a.token.cancelled())
        .await
        .expect("A noticed the loss");
    assert_eq!(a.stats.leases_lost.get(), 1);
    drop(turn_a);
    // B waits while it is taken, takes over once it is free
    redis.cli(&["DEL", key]);
    let turn_b = tokio::time::timeout(WAIT, gate_b.turn(&stop))
        .await
        .expect("B took over")
        .expect("turn");
    assert!(!turn_b.token.is_cancelled());
    // Redis gone: B cannot renew and stops before its lease could expire
    redis.kill();
    tokio::time::timeout(WAIT, turn_b.token.cancelled())
        .await
        .expect("B stopped polling");
    assert_eq!(b.stats.leases_lost.get(), 1);
}

/// Every key name under the prefix while `user` (a private chat: chat id = user id)
/// is being answered, the LLM held so the conversation and call leases exist.
async fn key_names_mid_answer(user: &str, data_key: bool) -> Vec<String> {
    let llm = FakeOpenAi::start().await;
    let redis = RedisServer::start();
    let root = redis_root(&llm, &redis, "");
    if data_key {
        use std::io::Write;
        let mut env = std::fs::OpenOptions::new()
            .append(true)
            .open(root.env_file())
            .expect("env file");
        env.write_all(b"\nCONFAB_DATA_KEY=correct-horse-battery-staple-42\n")
            .expect("append");
    }
    let app = build(&root);
    assert_eq!(
        text(&app.engine.handle(&msg(user, "one")).await),
        "echo: one"
    );
    llm.set_latency(Duration::from_secs(5));
    let engine = app.engine.clone();
    let inbound = msg(user, "two");
    let answer = tokio::spawn(async move { engine.handle(&inbound).await });
    let scan = || -> Vec<String> {
        redis
            .cli(&["--scan", "--pattern", "confab:staging:*"])
            .lines()
            .map(str::to_string)
            .collect()
    };
    let leases = |names: &[String]| {
        names.iter().any(|n| n.contains(":conv:")) && names.iter().any(|n| n.contains(":calls:"))
    };
    wait_until("both leases held", || leases(&scan())).await;
    let names = scan();
    assert!(leases(&names), "{names:?}");
    assert_eq!(text(&answer.await.expect("answer")), "echo: two");
    names
}

/// With `CONFAB_DATA_KEY` no Redis key name carries a user or chat id — store keys,
/// conversation and call leases, limiter keys; without one they are readable (so this
/// test can fail), and the limiter key is the same literal value in every build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_data_key_no_redis_key_name_reveals_an_id() {
    let id = "731904285";
    let names = key_names_mid_answer(id, true).await;
    let revealing: Vec<&String> = names.iter().filter(|n| n.contains(id)).collect();
    assert!(revealing.is_empty(), "ids in key names: {revealing:?}");
    assert!(
        names.iter().any(|n| n.contains(":rl:{")),
        "the limiter keys were there: {names:?}"
    );

    let names = key_names_mid_answer("42", false).await;
    for part in [":conv:{", ":calls:{tg:42}", ":user:{tg:42}"] {
        assert!(
            names.iter().any(|n| n.contains(part) && n.contains("42")),
            "{part} readable without a key: {names:?}"
        );
    }
    // limit_key("assistant", "tg:42"), pinned: every build names it alike
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("confab:staging:rl:{cb7ab480f9c768a8}:")),
        "{names:?}"
    );
}
