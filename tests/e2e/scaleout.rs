//! Scale-out end to end (SPEC §14, issue 14): two real daemon processes on one
//! `redis-server`, each with its own data_dir and webhook_bind, behind ONE webhook
//! endpoint (tests/support/fake_lb.rs forwards the fake Bot API's pushes to them in
//! turn; a dead instance is a 502, which the fake redelivers, as Telegram does). And:
//! with polling on Redis, a healthy standby reads as ready.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use confab::engine::MSG_BANNED;

use crate::fake_lb::FakeLb;
use crate::fake_openai::FakeOpenAi;
use crate::fake_telegram::{FakeTelegram, Fault};
use crate::harness::{calls_via, wait_exit, wait_until, Daemon, Root, TG_BOT_TOML, TG_TOKEN};
use crate::redis_server::RedisServer;
use crate::telegram::spawn_daemon;

/// Generous: conditions are waited for, never timed.
const WAIT: Duration = Duration::from_secs(120);
const SECRET: &str = "scale_Secret-0123456789";
const ADMIN: i64 = 500;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One instance: its own root (data_dir, webhook_bind), the shared Redis and the
/// load balancer's public URL; its Bot API URL names it (`/via/<name>`).
struct Instance {
    root: Root,
    bind: SocketAddr,
    log: PathBuf,
    name: &'static str,
    child: Option<Child>,
}

impl Instance {
    fn new(
        llm: &FakeOpenAi,
        tg: &FakeTelegram,
        redis: &RedisServer,
        name: &'static str,
        (public_url, bind): (&str, SocketAddr),
        extra: &str,
    ) -> Instance {
        let settings = format!(
            "{extra}\n[admins]\ntelegram = [{ADMIN}]\n[telegram]\napi_url = \"{api}/via/{name}\"\nglobal_per_second = 10000\nper_chat_per_minute = 6000\ngroup_per_minute = 6000\nmode = \"webhook\"\nwebhook_url = {public_url:?}\nwebhook_bind = \"{bind}\"\nwebhook_secret_env = \"HOOK_SECRET\"\n",
            api = tg.api_url
        );
        let root = Root::with_bot(&llm.base_url, &settings, TG_BOT_TOML);
        std::fs::write(
            root.env_file(),
            format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nHOOK_SECRET={SECRET}\n"),
        )
        .expect("write env file");
        root.use_redis(redis);
        let log = root.path().join("daemon.log");
        Instance {
            root,
            bind,
            log,
            name,
            child: None,
        }
    }

    /// Starts the process and waits until it registered the webhook and listens.
    async fn start(&mut self, tg: &FakeTelegram) {
        let before = calls_via(tg, "setwebhook", self.name);
        self.child = Some(spawn_daemon(&self.root, &self.log, "info"));
        let bind = self.bind;
        wait_until(&format!("{} registered its webhook", self.name), || {
            calls_via(tg, "setwebhook", self.name) > before
                && std::net::TcpStream::connect(bind).is_ok()
        })
        .await;
    }

    /// kill -9: no shutdown step at all.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdin(Stdio::null())
                .status();
            let code = wait_exit(&mut child, WAIT);
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            assert_eq!(code, Some(0), "{} did not stop cleanly:\n{log}", self.name);
            assert!(!log.contains("panicked"), "{}: {log}", self.name);
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn texts(tg: &FakeTelegram, chat: i64) -> Vec<String> {
    tg.sent_to(chat).into_iter().map(|m| m.text).collect()
}

async fn wait_reply(tg: &FakeTelegram, chat: i64, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = texts(tg, chat).into_iter().find(|t| want(t)) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no such reply in chat {chat}: {:?}",
            texts(tg, chat)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Queued updates of the shared inbox (acknowledged, not yet finished).
fn inbox_len(redis: &RedisServer) -> usize {
    redis
        .cli(&["HLEN", "confab:staging:inbox"])
        .trim()
        .parse()
        .unwrap_or(usize::MAX)
}

/// Two instances behind one load balancer on one Redis, both started.
struct Pair {
    tg: FakeTelegram,
    redis: RedisServer,
    lb: FakeLb,
    a: Instance,
    b: Instance,
}

async fn pair(llm_a: &FakeOpenAi, llm_b: &FakeOpenAi, extra: &str) -> Pair {
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let redis = RedisServer::start();
    let (bind_a, bind_b) = (free_addr(), free_addr());
    let lb = FakeLb::start(vec![bind_a, bind_b]).await;
    let public = format!("http://{}/hooks", lb.addr);
    let mut a = Instance::new(llm_a, &tg, &redis, "a", (&public, bind_a), extra);
    let mut b = Instance::new(llm_b, &tg, &redis, "b", (&public, bind_b), extra);
    a.start(&tg).await;
    b.start(&tg).await;
    Pair {
        tg,
        redis,
        lb,
        a,
        b,
    }
}

impl Pair {
    /// Sends a private message and waits until an instance acknowledged it; returns the
    /// update id and the instance (0: a, 1: b) that took it.
    async fn say(&self, user: i64, name: &str, text: &str) -> (i64, usize) {
        let id = self.tg.send_private(user, name, text);
        assert!(self.tg.wait_acked(id, WAIT).await, "{text:?} acknowledged");
        (id, self.taken_by(id))
    }

    fn taken_by(&self, id: i64) -> usize {
        self.lb
            .log()
            .iter()
            .rev()
            .find(|f| f.update_id == Some(id) && (200..300).contains(&f.status))
            .map(|f| f.backend)
            .expect("acknowledged through the balancer")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behind_one_webhook_share_memory_limits_budget_cache_and_bans() {
    let llm = FakeOpenAi::start().await;
    let extra = "[limits]\nmessages_per_minute = 1\nburst = 3\ndaily_tokens = 300\n";
    let mut p = pair(&llm, &llm, extra).await;
    let tg = &p.tg;

    // One history: the 2nd message, on the other instance, carries the 1st exchange.
    let (_, first) = p.say(101, "Ann", "my name is Ann").await;
    wait_reply(tg, 101, |t| t == "echo: my name is Ann").await;
    let (_, second) = p.say(101, "Ann", "what is my name?").await;
    wait_reply(tg, 101, |t| t == "echo: what is my name?").await;
    assert_ne!(
        first, second,
        "the messages alternated between the instances"
    );
    let asked = llm
        .requests()
        .into_iter()
        .find(|r| r.last_user() == Some("what is my name?"))
        .expect("the 2nd message reached the LLM");
    let has = |role: &str, text: &str| asked.messages.iter().any(|(r, c)| r == role && c == text);
    assert!(has("user", "my name is Ann"), "{:?}", asked.messages);
    assert!(
        has("assistant", "echo: my name is Ann"),
        "{:?}",
        asked.messages
    );

    // One rate limit: a burst of 3 across both instances, one notice, then silence.
    let mut took = Vec::new();
    for i in 1..=5 {
        let (_, by) = p.say(102, "Rob", &format!("r{i}")).await;
        took.push(by);
        if i <= 3 {
            wait_reply(tg, 102, |t| t == format!("echo: r{i}")).await;
        }
    }
    assert!(took.contains(&0) && took.contains(&1), "{took:?}");

    // One daily budget: a long answer on one instance exhausts it on the other.
    let long = "budget words ".repeat(60);
    let (_, spent) = p.say(103, "Bea", long.trim()).await;
    wait_reply(tg, 103, |t| t.starts_with("echo: budget words")).await;
    let (_, refused) = p.say(103, "Bea", "more please").await;
    let notice = wait_reply(tg, 103, |t| t.contains("resets in")).await;
    assert_ne!(spent, refused, "{notice}");

    // One cache: the same question (same context) on the other instance is a hit.
    let q = "what is the capital of France?";
    let (_, asked_on) = p.say(104, "Sam", q).await;
    wait_reply(tg, 104, |t| t == format!("echo: {q}")).await;
    let (_, hit_on) = p.say(105, "Sam", q).await;
    wait_reply(tg, 105, |t| t == format!("echo: {q}")).await;
    assert_ne!(asked_on, hit_on);
    let calls = llm
        .requests()
        .iter()
        .filter(|r| r.last_user() == Some(q))
        .count();
    assert_eq!(calls, 1, "the second answer came from the shared cache");

    // One ban list: banned through one instance, refused by the other.
    p.say(106, "Vic", "hello").await;
    wait_reply(tg, 106, |t| t == "echo: hello").await;
    let (_, ban_on) = p.say(ADMIN, "Op", "/admin ban tg:106 spam").await;
    wait_reply(tg, ADMIN, |t| t.starts_with("Banned tg:106")).await;
    let (_, refused_on) = p.say(106, "Vic", "hello again").await;
    wait_reply(tg, 106, |t| t == MSG_BANNED).await;
    assert_ne!(ban_on, refused_on);

    // Everything acknowledged is finished; only then judge what stayed silent.
    let redis = &p.redis;
    wait_until("the shared inbox drained", || inbox_len(redis) == 0).await;
    let rate = texts(tg, 102);
    assert_eq!(rate.len(), 4, "{rate:?}");
    assert_eq!(rate[..3], ["echo: r1", "echo: r2", "echo: r3"]);
    assert!(rate[3].contains("too fast"), "{rate:?}");
    assert!(llm.requests().iter().all(|r| !matches!(
        r.last_user(),
        Some("r4" | "r5" | "more please" | "hello again")
    )));
    assert_eq!(texts(tg, 103).len(), 2, "{:?}", texts(tg, 103));
    p.a.stop();
    p.b.stop();
}

/// Whether update `id` (of `sent`: chat and text) got its echo.
fn answered(tg: &FakeTelegram, sent: &HashMap<i64, (i64, String)>, id: &i64) -> bool {
    sent.get(id).is_some_and(|(u, text)| {
        let want = format!("echo: {text}");
        texts(tg, *u).contains(&want)
    })
}

/// Message `i` of load user `u`, and the echo that answers it.
fn load_text(u: i64, i: usize) -> String {
    format!("u{u}-m{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_mid_load_loses_nothing_and_answers_nothing_twice() {
    // Each instance has its own fake LLM, so the test decides where an answer can be
    // ready: A's calls hang until it is killed, so A dies with updates acknowledged
    // (durable) and in flight, none of them answered.
    let (llm_a, llm_b) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    llm_a.set_latency(Duration::from_secs(600));
    // B waits for the conversation leases the dead A held (they expire) rather than
    // apologising.
    // It also replays the shared inbox's entries left unanswered every 2 s.
    let extra =
        "[limits]\nmessages_per_minute = 6000\nburst = 1000\n[llm]\nqueue_timeout_secs = 300\n\
                 [delivery]\norphan_replay_secs = 2\n";
    let mut p = pair(&llm_a, &llm_b, extra).await;
    let users: Vec<i64> = (3000..3030).collect();
    let mut sent: HashMap<i64, (i64, String)> = HashMap::new();
    for i in 1..=5 {
        for &u in &users {
            let text = load_text(u, i);
            let id = p.tg.send_private(u, "Lu", &text);
            sent.insert(id, (u, text));
        }
    }
    let (lb, llm) = (&p.lb, &llm_a);
    wait_until("A took part of the load", || {
        lb.acked_by(0).len() >= 20 && llm.request_count() >= 3
    })
    .await;
    p.a.kill();
    let killed_at = p.lb.log().len();
    let orphans = p.lb.acked_by(0);
    assert!(
        orphans.len() < sent.len(),
        "the load was not over at the kill"
    );

    // The survivor answers everything: its own, what A never acknowledged (redelivered
    // to B), and — without A coming back — what A had acknowledged but never answered
    // (the shared inbox's orphans, once A's claims and leases expired).
    let (tg, redis) = (&p.tg, &p.redis);
    wait_until("B answered everything, A's orphans included", || {
        sent.keys().all(|id| answered(tg, &sent, id)) && inbox_len(redis) == 0
    })
    .await;
    let after_kill: Vec<_> = p.lb.log()[killed_at..].to_vec();
    assert!(
        after_kill.iter().any(|f| f.backend == 1 && f.status == 200),
        "the survivor took updates after the kill"
    );
    assert!(
        after_kill.iter().any(|f| f.backend == 0 && f.status == 502),
        "the dead instance's share was refused and redelivered"
    );

    // A comes back and takes new messages.
    llm_a.set_latency(Duration::ZERO);
    p.a.start(&p.tg).await;
    for (k, u) in (3100..3104).enumerate() {
        let text = load_text(u, k);
        let id = p.tg.send_private(u, "Lu", &text);
        sent.insert(id, (u, text));
    }
    let tg = &p.tg;
    wait_until("every message answered", || {
        sent.keys().all(|id| answered(tg, &sent, id)) && inbox_len(redis) == 0
    })
    .await;
    let restarted = p.lb.log()[killed_at..]
        .iter()
        .filter(|f| f.backend == 0 && f.status == 200)
        .count();
    assert!(restarted > 0, "the restarted instance took new updates");

    // Exactly one reply per message: nothing lost, nothing answered twice.
    let mut by_chat: HashMap<i64, Vec<String>> = HashMap::new();
    for (u, text) in sent.values() {
        by_chat.entry(*u).or_default().push(format!("echo: {text}"));
    }
    for (chat, mut want) in by_chat {
        let mut got = texts(tg, chat);
        got.sort();
        want.sort();
        assert_eq!(got, want, "chat {chat}");
    }
    p.b.stop();
    p.a.stop();
}

/// Ops endpoint's `/readyz` status and body.
async fn readyz(ops: SocketAddr) -> (u16, String) {
    let resp = reqwest::get(format!("http://{ops}/readyz"))
        .await
        .expect("readyz");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_polling_standby_is_ready_and_a_failing_holder_is_not() {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let redis = RedisServer::start();
    let root = |name: &str| {
        let api = format!("{}/via/{name}", tg.api_url);
        let root = Root::telegram(&llm.base_url, &api, "", TG_BOT_TOML);
        std::fs::write(
            root.env_file(),
            format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n"),
        )
        .expect("write env file");
        root.use_redis(&redis);
        root
    };
    let (root_a, root_b) = (root("a"), root("b"));
    let (daemon_a, ops_a) = Daemon::start_with_ops(&root_a).await;
    let tg_ref = &tg;
    wait_until("A polls", || calls_via(tg_ref, "getupdates", "a") > 0).await;
    let (daemon_b, ops_b) = Daemon::start_with_ops(&root_b).await;
    wait_until("B started", || calls_via(tg_ref, "setmycommands", "b") > 0).await;
    for (who, ops) in [("holder", ops_a), ("standby", ops_b)] {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = readyz(ops).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{who} not ready: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(calls_via(&tg, "getupdates", "b"), 0, "B stands by");
    // The holder's getUpdates fails: it reads not ready; the standby stays ready.
    tg.fail_for(
        "getupdates",
        Fault::BadRequest("Bad Request: broken".into()),
        Duration::from_secs(600),
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = readyz(ops_a).await;
        if status == 503 {
            assert!(body.contains("telegram/assistant: not connected"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing holder still reads ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        readyz(ops_b).await.0,
        200,
        "the standby is ready to take over"
    );
    assert_eq!(calls_via(&tg, "getupdates", "b"), 0, "B still stands by");
    daemon_b.stop().await.expect("clean stop");
    daemon_a.stop().await.expect("clean stop");
}

/// A user's message in group chat `chat`.
fn in_group(user: &str, chat: &str, text: &str) -> confab::domain::Inbound {
    let mut m = crate::harness::msg(user, text);
    m.chat_id = chat.into();
    m.is_private = false;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_llm_call_per_user_in_flight_across_instances() {
    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_millis(150));
    let redis = RedisServer::start();
    let roomy = "[limits]\nmessages_per_minute = 600\nburst = 100\n";
    let (ra, rb) = (
        Root::new(&llm.base_url, roomy),
        Root::new(&llm.base_url, roomy),
    );
    ra.use_redis(&redis);
    rb.use_redis(&redis);
    let (a, b) = (ra.build(), rb.build());
    // One user in two groups, one group on each instance: two conversations (which may
    // run in parallel), one user (whose LLM calls may not).
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (engine, chat) = if i % 2 == 0 {
            (a.engine.clone(), "-100")
        } else {
            (b.engine.clone(), "-200")
        };
        tasks.push(tokio::spawn(async move {
            let reply = engine.handle(&in_group("42", chat, &format!("g{i}"))).await;
            crate::harness::text(&reply)
        }));
    }
    for t in tasks {
        let reply = t.await.expect("handler");
        assert!(reply.starts_with("echo: g"), "{reply}");
    }
    assert_eq!(llm.request_count(), 6);
    assert_eq!(llm.max_in_flight(), 1, "one LLM call of the user at a time");
}

/// An instance that starts (and replays the shared inbox) while another one is still
/// answering an update — its send refused with a 429 and waiting to be retried — must
/// not send that reply a second time: it waits for the update's claim, then finds it
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_instance_does_not_answer_again_what_another_is_still_sending() {
    let (llm_a, llm_b) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    let extra = "[llm]\nqueue_timeout_secs = 120\n";
    let mut p = pair(&llm_a, &llm_b, extra).await;
    p.a.stop();
    // B answers, but Telegram asks it to wait 20 s before its send: the reply is decided
    // and stored (pending) meanwhile.
    p.tg.fail_next("sendMessage", Fault::RetryAfter(20));
    let id = p.tg.send_private(4100, "Ri", "only once please");
    assert!(p.tg.wait_acked(id, WAIT).await, "acknowledged");
    let tg = &p.tg;
    wait_until("B's first send refused", || {
        calls_via(tg, "sendmessage", "b") == 1
    })
    .await;
    // A starts meanwhile and replays the shared inbox, which still holds the update.
    assert_eq!(inbox_len(&p.redis), 1);
    p.a.start(&p.tg).await;
    let (log, redis) = (&p.b.log, &p.redis);
    wait_until("B answered and the inbox is empty", || {
        let b = std::fs::read_to_string(log).unwrap_or_default();
        b.contains("update answered") && inbox_len(redis) == 0
    })
    .await;
    p.a.stop();
    p.b.stop();
    assert_eq!(texts(&p.tg, 4100), vec!["echo: only once please"]);
    assert_eq!(llm_a.request_count() + llm_b.request_count(), 1);
}
