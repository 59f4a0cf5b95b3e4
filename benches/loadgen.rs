//! Load generator: the REAL release daemon against the in-process fake Telegram Bot API
//! and fake OpenAI server (SPEC §13, issue 7).
//!
//! ```text
//! cargo build --release --locked
//! cargo bench --bench loadgen -- --users 200 --messages 5 --llm-ms 0
//! cargo bench --bench loadgen -- --users 1000 --messages 1 --llm-ms 2000
//! cargo bench --bench loadgen -- --users 5000 --messages 1 --mix zipf
//! cargo bench --bench loadgen -- --smoke      # CI: tiny run, fails only on unanswered messages
//! ```
//!
//! Options: `--users N` (200), `--messages M` (5), `--llm-ms MS` (0), `--mix unique|zipf`
//! (unique), `--no-cache`, `--open` (inject every message at once instead of each user
//! sending the next one after the previous reply), `--llm-concurrency N` (llm.max_concurrent,
//! 2048), `--seed S` (42), `--timeout-secs S` (120), `--keep` (keep the temp root and print it).
//! The daemon is `target/release/confab` (override with `CONFAB_BIN`); build it first.
//!
//! Reply latency is user send (update injected into the fake) → reply recorded by the fake
//! `sendMessage`, observed through the fake's change notification. Replies are matched
//! per chat in order (k-th reply to a chat answers that user's k-th message) and checked
//! against the fake LLM's `echo: <question>` text.

#[path = "../tests/support/fake_openai.rs"]
mod fake_openai;
#[path = "../tests/support/fake_telegram.rs"]
mod fake_telegram;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fake_openai::FakeOpenAi;
use fake_telegram::FakeTelegram;

const TG_TOKEN: &str = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
const TG_USERNAME: &str = "acme_staging_bot";
/// Chat / user ids are `USER_BASE + i`.
const USER_BASE: i64 = 1_000_000;
/// No `{{user_name}}`: the cache key includes the rendered system prompt, so a per-user
/// prompt would make cross-user cache hits impossible by construction.
const PROMPT: &str = "You are {{bot_name}}, a helpful assistant on {{platform}}.";
const ZIPF_DISTINCT: usize = 1000;
const ZIPF_S: f64 = 1.1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mix {
    Unique,
    Zipf,
}

#[derive(Debug)]
struct Args {
    users: usize,
    messages: usize,
    llm_ms: u64,
    mix: Mix,
    cache: bool,
    open: bool,
    llm_concurrency: usize,
    seed: u64,
    timeout: Duration,
    keep: bool,
    smoke: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        users: 200,
        messages: 5,
        llm_ms: 0,
        mix: Mix::Unique,
        cache: true,
        open: false,
        llm_concurrency: 2048,
        seed: 42,
        timeout: Duration::from_secs(120),
        keep: false,
        smoke: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value"))
                .and_then(|v| {
                    v.parse::<u64>()
                        .map_err(|e| format!("{name} {v:?}: {e}"))
                        .map(|n| (n, v))
                })
        };
        match arg.as_str() {
            "--users" => a.users = value("--users")?.0 as usize,
            "--messages" => a.messages = value("--messages")?.0 as usize,
            "--llm-ms" => a.llm_ms = value("--llm-ms")?.0,
            "--llm-concurrency" => a.llm_concurrency = value("--llm-concurrency")?.0 as usize,
            "--seed" => a.seed = value("--seed")?.0,
            "--timeout-secs" => a.timeout = Duration::from_secs(value("--timeout-secs")?.0),
            "--mix" => {
                a.mix = match it.next().as_deref() {
                    Some("unique") => Mix::Unique,
                    Some("zipf") => Mix::Zipf,
                    other => return Err(format!("--mix unique|zipf, got {other:?}")),
                }
            }
            "--no-cache" => a.cache = false,
            "--open" => a.open = true,
            "--keep" => a.keep = true,
            "--smoke" => a.smoke = true,
            // `cargo bench` passes `--bench`; ignore it and any libtest-style flag.
            "--bench" => {}
            "-h" | "--help" => {
                return Err("see the doc comment at the top of benches/loadgen.rs".into());
            }
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            _ => {} // a criterion-style filter: ignored
        }
    }
    if a.smoke {
        a.users = 20;
        a.messages = 2;
        a.llm_ms = 0;
        a.timeout = Duration::from_secs(60);
    }
    if a.users == 0 || a.messages == 0 {
        return Err("--users and --messages must be > 0".into());
    }
    Ok(a)
}

fn daemon_bin() -> PathBuf {
    match std::env::var_os("CONFAB_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/confab"),
    }
}

/// Writes config/staging.toml, bots/assistant.toml, prompts/assistant.md and .env.test.
fn write_root(root: &Path, llm_url: &str, tg_url: &str, a: &Args) -> std::io::Result<()> {
    for sub in ["config", "bots", "prompts"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    let data = root.join("data");
    let config = format!(
        "data_dir = {data:?}\n\
         [http]\nbind = \"127.0.0.1:0\"\n\
         [log]\nlevel = \"warn\"\n\
         [llm]\nbase_url = {llm_url:?}\nmax_concurrent = {conc}\nbackoff_base_ms = 10\n\
         [limits]\nmessages_per_minute = 1000000\nburst = 100000\ndaily_tokens = 1000000000\n\
         [cache]\nenabled = {cache}\n\
         [telegram]\napi_url = {tg_url:?}\nglobal_per_second = 1000000\n\
         per_chat_per_minute = 1000000\ngroup_per_minute = 1000000\n",
        data = data.display().to_string(),
        conc = a.llm_concurrency,
        cache = a.cache,
    );
    std::fs::write(root.join("config/staging.toml"), config)?;
    std::fs::write(
        root.join("bots/assistant.toml"),
        format!(
            "prompt = \"assistant\"\n[telegram]\ntoken_env = \"ASSISTANT_TELEGRAM_TOKEN\"\n\
             username = {{ staging = {TG_USERNAME:?}, production = \"acme_bot\" }}\n"
        ),
    )?;
    std::fs::write(root.join("prompts/assistant.md"), PROMPT)?;
    std::fs::write(
        root.join(".env.test"),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n"),
    )?;
    Ok(())
}

fn spawn_daemon(bin: &Path, root: &Path, log: &Path) -> std::io::Result<Child> {
    Command::new(bin)
        .args(["run", "--env", "staging", "--root"])
        .arg(root)
        .arg("--env-file")
        .arg(root.join(".env.test"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
}

/// A `kB` field of /proc/<pid>/status, in bytes.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Cumulative distribution of ranks 1..=n with weight 1/k^s.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect();
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

/// The question user `u` asks as message `k`.
fn questions(a: &Args) -> Vec<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(a.seed);
    let cdf = zipf_cdf(ZIPF_DISTINCT, ZIPF_S);
    (0..a.users)
        .map(|u| {
            (0..a.messages)
                .map(|k| match (a.mix, k) {
                    (Mix::Zipf, 0) => {
                        let x: f64 = rng.random();
                        let rank = cdf.partition_point(|c| *c < x) + 1;
                        format!("What is fact number {rank} about the sea?")
                    }
                    _ => format!("user {u} asks question {k}: what about {}?", u * 7919 + k),
                })
                .collect()
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

struct Outcome {
    total: usize,
    answered: usize,
    mismatched: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    peak_rss_sampled: u64,
    vm_hwm: Option<u64>,
    llm_calls: usize,
}

async fn run(a: &Args) -> Result<Outcome, String> {
    let bin = daemon_bin();
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release --locked` \
             (or point CONFAB_BIN at a confab binary)",
            bin.display()
        ));
    }
    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_millis(a.llm_ms));
    let tg = FakeTelegram::start(TG_TOKEN, TG_USERNAME).await;
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let root = tmp.path().to_path_buf();
    write_root(&root, &llm.base_url, &tg.api_url, a).map_err(|e| format!("write root: {e}"))?;
    let log = root.join("daemon.log");
    let mut child = spawn_daemon(&bin, &root, &log).map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let log_tail = |log: &Path| {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Ready once the adapter long-polls.
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    while tg.count("getUpdates") == 0 {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "daemon exited early ({status}):\n{}",
                log_tail(&log)
            ));
        }
        if Instant::now() > ready_deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "daemon not polling after 30 s:\n{}",
                log_tail(&log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_idle = proc_status_kb(pid, "VmRSS:").unwrap_or(0);

    let qs = questions(a);
    let total = a.users * a.messages;
    let mut sent_at: Vec<Vec<Option<Instant>>> = vec![vec![None; a.messages]; a.users];
    let mut replies = vec![0usize; a.users];
    let mut latencies = Vec::with_capacity(total);
    let mut mismatched = 0usize;
    let mut peak_rss = rss_idle;
    let mut last_rss_sample = Instant::now();

    let start = Instant::now();
    for u in 0..a.users {
        let upto = if a.open { a.messages } else { 1 };
        for k in 0..upto {
            tg.send_private(USER_BASE + u as i64, "Load", &qs[u][k]);
            sent_at[u][k] = Some(Instant::now());
        }
    }
    let mut seen = 0usize;
    let mut answered = 0usize;
    let mut last_progress = Instant::now();
    while answered < total {
        // `sent()` clones the fake's whole log: batch wake-ups (≤ 5 ms added to the
        // observed latency) so the generator does not steal the daemon's CPU.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let sent = tg.wait_for_sent(seen + 1, Duration::from_millis(200)).await;
        let now = Instant::now();
        for m in &sent[seen.min(sent.len())..] {
            let u = m.chat_id - USER_BASE;
            if m.method != "sendmessage" || u < 0 || u as usize >= a.users {
                continue;
            }
            let u = u as usize;
            let k = replies[u];
            if k >= a.messages {
                mismatched += 1; // an extra message (e.g. a notice)
                continue;
            }
            if m.text != format!("echo: {}", qs[u][k]) {
                mismatched += 1;
            }
            if let Some(t) = sent_at[u][k] {
                latencies.push(now.duration_since(t));
            }
            replies[u] += 1;
            answered += 1;
            if !a.open && k + 1 < a.messages {
                tg.send_private(USER_BASE + u as i64, "Load", &qs[u][k + 1]);
                sent_at[u][k + 1] = Some(Instant::now());
            }
        }
        if sent.len() > seen {
            seen = sent.len();
            last_progress = now;
        }
        if now.duration_since(last_rss_sample) >= Duration::from_millis(100) {
            last_rss_sample = now;
            peak_rss = peak_rss.max(proc_status_kb(pid, "VmRSS:").unwrap_or(0));
        }
        if now.duration_since(start) > a.timeout
            || now.duration_since(last_progress) > Duration::from_secs(30)
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("daemon died ({status}):\n{}", log_tail(&log)));
        }
    }
    let wall = start.elapsed();
    peak_rss = peak_rss.max(proc_status_kb(pid, "VmRSS:").unwrap_or(0));
    let vm_hwm = proc_status_kb(pid, "VmHWM:");
    let llm_calls = llm.request_count();
    let _ = child.kill();
    let _ = child.wait();
    if answered < total {
        eprintln!("daemon log tail:\n{}", log_tail(&log));
    }
    if a.keep {
        let kept = tmp.keep();
        eprintln!("kept root at {}", kept.display());
    }
    Ok(Outcome {
        total,
        answered,
        mismatched,
        wall,
        latencies,
        peak_rss_sampled: peak_rss,
        vm_hwm,
        llm_calls,
    })
}

fn report(a: &Args, o: &mut Outcome) {
    o.latencies.sort_unstable();
    let rate = o.answered as f64 / o.wall.as_secs_f64().max(1e-9);
    let hit_rate = if o.total == 0 {
        0.0
    } else {
        (1.0 - o.llm_calls as f64 / o.answered.max(1) as f64).max(0.0)
    };
    let (p50, p95, p99) = (
        percentile(&o.latencies, 50.0),
        percentile(&o.latencies, 95.0),
        percentile(&o.latencies, 99.0),
    );
    let max = o.latencies.last().copied().unwrap_or_default();
    let hwm = o.vm_hwm.unwrap_or(0);
    println!(
        "loadgen users={} messages={} llm_ms={} mix={:?} cache={} mode={}: \
         {}/{} answered in {:.2}s = {:.0} msg/s; latency p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms \
         max {:.1} ms; peak RSS {:.1} MiB (VmHWM), {:.1} MiB (sampled VmRSS); \
         LLM calls {}; cache hit rate {:.1}%; mismatched {}",
        a.users,
        a.messages,
        a.llm_ms,
        a.mix,
        a.cache,
        if a.open { "open" } else { "closed" },
        o.answered,
        o.total,
        o.wall.as_secs_f64(),
        rate,
        ms(p50),
        ms(p95),
        ms(p99),
        ms(max),
        mib(hwm),
        mib(o.peak_rss_sampled),
        o.llm_calls,
        hit_rate * 100.0,
        o.mismatched,
    );
    let rows = [
        ("messages", format!("{} / {}", o.answered, o.total)),
        ("wall time", format!("{:.3} s", o.wall.as_secs_f64())),
        ("throughput", format!("{rate:.0} msg/s")),
        ("latency p50", format!("{:.1} ms", ms(p50))),
        ("latency p95", format!("{:.1} ms", ms(p95))),
        ("latency p99", format!("{:.1} ms", ms(p99))),
        ("latency max", format!("{:.1} ms", ms(max))),
        ("peak RSS (VmHWM)", format!("{:.1} MiB", mib(hwm))),
        (
            "peak RSS (sampled)",
            format!("{:.1} MiB", mib(o.peak_rss_sampled)),
        ),
        ("LLM calls", o.llm_calls.to_string()),
        ("cache hit rate", format!("{:.1} %", hit_rate * 100.0)),
        ("mismatched replies", o.mismatched.to_string()),
    ];
    println!("| metric | value |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut outcome = match rt.block_on(run(&args)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    report(&args, &mut outcome);
    if outcome.answered < outcome.total {
        eprintln!(
            "loadgen: {} of {} messages unanswered",
            outcome.total - outcome.answered,
            outcome.total
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
