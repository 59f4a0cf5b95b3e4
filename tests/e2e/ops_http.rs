//! The ops HTTP endpoint (SPEC §10) of an in-process daemon with the Telegram fake:
//! `/healthz`, `/readyz` flipping with the platform connection and on shutdown, and
//! `/metrics` scraped while traffic flows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use confab::shutdown::Signal;

use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::fake_telegram::{FakeTelegram, Fault};
use crate::harness::{Daemon, Root, TG_BOT_TOML, TG_TOKEN};

const WAIT: Duration = Duration::from_secs(20);

async fn setup() -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    // The harness binds the ops endpoint on 127.0.0.1:0; the hook reports the port.
    let root = Root::telegram(&llm.base_url, &tg.api_url, "", TG_BOT_TOML);
    (llm, tg, root)
}

async fn start(root: &Root) -> (Daemon, SocketAddr) {
    Daemon::start_with_ops(root).await
}

fn client() -> reqwest13::Client {
    reqwest13::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

/// Status and body of a GET.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let resp = client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ctype, resp.text().await.expect("body"))
}

pub(crate) async fn readyz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, _, body) = get(addr, "/readyz").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// Polls `/readyz` until `ok` accepts the answer; panics with the last one at `WAIT`.
async fn wait_readyz(addr: SocketAddr, ok: impl Fn(u16, &serde_json::Value) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, json) = readyz(addr).await;
        if ok(status, &json) {
            return;
        }
        assert!(Instant::now() < deadline, "readyz stayed {status} {json}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn has_reason(json: &serde_json::Value, needle: &str) -> bool {
    json["reasons"]
        .as_array()
        .is_some_and(|r| r.iter().any(|s| s.as_str().unwrap_or("").contains(needle)))
}

type Sample = (String, BTreeMap<String, String>, f64);

/// Parses Prometheus text exposition sample lines (our label values carry no escapes).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the one sample named `name` carrying every label in `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one sample {name} {labels:?}, got {found:?}"
    );
    found[0]
}

async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, ctype, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let parsed = samples(&body);
    for (name, labels, _) in &parsed {
        assert!(name.starts_with("confab_"), "unprefixed series {name}");
        assert_eq!(
            labels.get("env").map(String::as_str),
            Some("staging"),
            "{name} lacks env"
        );
    }
    parsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_while_traffic_flows() {
    let (llm, tg, root) = setup().await;
    let (daemon, addr) = start(&root).await;
    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "alive"})
    );

    llm.set_latency(Duration::from_millis(30));
    for u in 1..=20i64 {
        tg.send_private(u, "M", &format!("metrics question {u}"));
    }
    // Scrape while replies are still being produced: a valid exposition every time.
    let mut during = 0;
    while tg.sent().len() < 20 && during < 20 {
        scrape(addr).await;
        during += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tg.wait_for_sent(20, WAIT).await.len(), 20);
    wait_readyz(addr, |s, j| {
        s == 200 && j == &serde_json::json!({"ready": true})
    })
    .await;

    let m = scrape(addr).await;
    let env = ("env", "staging");
    let tg_messages = [env, ("platform", "telegram")];
    assert_eq!(value(&m, "confab_messages_total", &tg_messages), 20.0);
    assert_eq!(
        value(&m, "confab_messages_total", &[env, ("platform", "discord")]),
        0.0
    );
    let replies: f64 = m
        .iter()
        .filter(|(n, _, _)| n == "confab_replies_total")
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(replies, 20.0, "one reply per message");
    assert_eq!(
        value(&m, "confab_replies_total", &[env, ("outcome", "answer")]),
        20.0
    );
    assert_eq!(value(&m, "confab_duplicates_total", &[env]), 0.0);
    assert_eq!(value(&m, "confab_rate_limited_total", &[env]), 0.0);
    assert!(value(&m, "confab_llm_requests_total", &[env]) >= 20.0);
    assert_eq!(value(&m, "confab_llm_errors_total", &[env]), 0.0);
    assert_eq!(value(&m, "confab_llm_retries_total", &[env]), 0.0);
    assert!(value(&m, "confab_llm_tokens_total", &[env, ("kind", "prompt")]) > 0.0);
    assert!(
        value(
            &m,
            "confab_llm_tokens_total",
            &[env, ("kind", "completion")]
        ) > 0.0
    );
    assert_eq!(value(&m, "confab_llm_request_seconds_count", &[env]), 20.0);
    // The fake answers after 30 ms: 20 calls took at least 0.6 s together.
    assert!(value(&m, "confab_llm_request_seconds_sum", &[env]) >= 0.6);
    value(&m, "confab_cache_hits_total", &[env]);
    value(&m, "confab_cache_tokens_saved_total", &[env]);
    assert_eq!(value(&m, "confab_cache_misses_total", &[env]), 20.0);
    assert_eq!(value(&m, "confab_cache_entries", &[env]), 20.0);
    assert_eq!(value(&m, "confab_circuit_state", &[env]), 0.0);
    assert!(value(&m, "confab_users", &[env]) >= 20.0);
    assert!(value(&m, "confab_uptime_seconds", &[env]) > 0.0);
    assert_eq!(value(&m, "confab_ready", &[env]), 1.0);
    assert!(value(&m, "confab_resident_memory_bytes", &[env]) > 1e6);
    // Every fresh answer was stored and flushed once, timed.
    assert_eq!(value(&m, "confab_store_write_seconds_count", &[env]), 20.0);
    assert_eq!(
        value(
            &m,
            "confab_store_write_seconds_bucket",
            &[env, ("le", "+Inf")]
        ),
        20.0
    );

    // The histogram: cumulative buckets, +Inf equals the count, every reply observed.
    let count = value(&m, "confab_reply_latency_seconds_count", &[env]);
    assert_eq!(count, 20.0);
    assert_eq!(
        value(
            &m,
            "confab_reply_latency_seconds_bucket",
            &[env, ("le", "+Inf")]
        ),
        count
    );
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(n, _, _)| n == "confab_reply_latency_seconds_bucket")
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 14, "13 bounds and +Inf: {buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    // Every reply waited for the 30 ms fake: none fits the 10 ms bucket.
    assert_eq!(
        value(
            &m,
            "confab_reply_latency_seconds_bucket",
            &[env, ("le", "0.01")]
        ),
        0.0
    );
    assert!(value(&m, "confab_reply_latency_seconds_sum", &[env]) >= 0.6);

    // Nothing the users wrote shows up in the metrics.
    let (_, _, body) = get(addr, "/metrics").await;
    assert!(!body.contains("metrics question"), "{body}");

    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_telegram_is_unreachable() {
    let (_llm, tg, root) = setup().await;
    let (daemon, addr) = start(&root).await;
    // A message ends the first long poll at once, so the adapter reports connected.
    tg.send_private(1, "R", "hello");
    wait_readyz(addr, |s, j| s == 200 && j["ready"] == true).await;

    tg.shutdown();
    wait_readyz(addr, |s, j| {
        s == 503 && j["ready"] == false && has_reason(j, "telegram/assistant: not connected")
    })
    .await;
    assert_eq!(
        value(&scrape(addr).await, "confab_ready", &[("env", "staging")]),
        0.0
    );
    // Alive all the same.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_shutting_down_while_a_reply_finishes() {
    let (llm, tg, root) = setup().await;
    let (daemon, addr) = start(&root).await;
    tg.send_private(1, "S", "warm up");
    tg.wait_for_sent(1, WAIT).await;
    wait_readyz(addr, |s, _| s == 200).await;

    // A reply in flight for 3 s holds the shutdown open; the endpoint stays up meanwhile.
    llm.push(Behavior::delay(
        Duration::from_secs(3),
        Behavior::reply("late but delivered"),
    ));
    tg.send_private(2, "S", "slow one");
    let deadline = Instant::now() + WAIT;
    while llm.request_count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the LLM never got the slow request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon
        .control
        .send(Signal::Stop)
        .await
        .expect("daemon listening");
    wait_readyz(addr, |s, j| {
        s == 503 && j["ready"] == false && has_reason(j, "shutting down")
    })
    .await;
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive while draining");

    daemon.task.await.expect("daemon task").expect("clean stop");
    assert!(
        tg.sent_to(2).iter().any(|m| m.text == "late but delivered"),
        "{:?}",
        tg.sent_to(2)
    );
    // Stopped: the endpoint is gone.
    let gone = client().get(format!("http://{addr}/healthz")).send().await;
    assert!(gone.is_err(), "ops endpoint still answering after stop");
}

/// Every series the collector declares renders (with traffic that gives each one a
/// sample), and the delivery machinery's counters are exported: a reply refused for
/// good and one sent after a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_declared_series_renders_with_the_delivery_counters() {
    let (llm, tg, root) = setup().await;
    let (daemon, addr) = start(&root).await;
    let env = ("env", "staging");
    tg.fail_next(
        "sendMessage",
        Fault::Status(403, "Forbidden: bot was blocked by the user".into()),
    );
    tg.send_private(9, "B", "first");
    let deadline = Instant::now() + WAIT;
    while value(&scrape(addr).await, "confab_delivery_failed_total", &[env]) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the refused reply was never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tg.fail_next("sendMessage", Fault::RetryAfter(1));
    tg.send_private(10, "R", "second");
    assert_eq!(tg.wait_for_sent(1, WAIT).await.len(), 1);
    llm.push(Behavior::status(400));
    tg.send_private(11, "L", "third");
    assert_eq!(tg.wait_for_sent(2, WAIT).await.len(), 2);

    let (_, _, body) = get(addr, "/metrics").await;
    // `confab_redis_*` exist on the Redis backend only (redis.rs checks them there).
    for series in confab::ops::http::Series::ALL
        .iter()
        .filter(|s| !s.name().starts_with("redis_"))
    {
        let declared = format!("# TYPE confab_{} ", series.name());
        assert!(body.contains(&declared), "{series:?} missing:\n{body}");
    }
    let m = samples(&body);
    assert_eq!(value(&m, "confab_delivery_failed_total", &[env]), 1.0);
    assert_eq!(value(&m, "confab_delivery_retries_total", &[env]), 1.0);
    for idle in [
        "confab_update_panics_total",
        "confab_updates_parked_total",
        "confab_queue_overflow_total",
        "confab_task_restarts_total",
    ] {
        assert_eq!(value(&m, idle, &[env]), 0.0, "{idle}");
    }
    let failed = [env, ("kind", "rejected")];
    assert_eq!(value(&m, "confab_llm_failed_replies_total", &failed), 1.0);
    let store = [env, ("cause", "store")];
    assert_eq!(value(&m, "confab_internal_errors_total", &store), 0.0);
    daemon.stop().await.expect("clean stop");
}
