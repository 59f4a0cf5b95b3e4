//! Load generator: the REAL release daemon against the in-process fake Telegram Bot API
//! and fake OpenAI server (SPEC §13, issue 7).
//!
//! ```text
//! cargo build --release --locked
//! cargo bench --bench loadgen -- --users 200 --messages 5 --llm-ms 0
//! cargo bench --bench loadgen -- --users 1000 --messages 1 --llm-ms 2000
//! cargo bench --bench loadgen -- --users 5000 --messages 1 --mix zipf
//! cargo bench --bench loadgen -- --seed-users 100000 --users 10000 --messages 1   # SPEC §13 RSS
//! cargo bench --bench loadgen -- --smoke      # CI: tiny run, fails only on unanswered messages
//! cargo bench --bench loadgen -- --users 200 --messages 5 --backend redis --instances 2
//! cargo bench --bench loadgen -- --smoke --backend redis --instances 2   # CI: scale-out smoke
//! ```
//!
//! Options: `--users N` (200), `--messages M` (5), `--llm-ms MS` (0), `--mix unique|zipf`
//! (unique), `--no-cache`, `--open` (inject every message at once instead of each user
//! sending the next one after the previous reply), `--llm-concurrency N` (llm.max_concurrent,
//! 2048), `--seed S` (42), `--timeout-secs S` (120), `--keep` (keep the temp root and print it),
//! `--seed-users N` (0; `--smoke` seeds 100 unless given), `--in-flight K` (closed loop: only
//! K users active at a time, the next user starts when one has all its replies; 0 = all).
//! The daemon is `target/release/confab` (override with `CONFAB_BIN`); build it first.
//!
//! Scale-out (SPEC §14, issue 14): `--backend sled|redis` (sled): with `redis` the run
//! starts its own `redis-server` (free loopback port, AOF `appendfsync everysec`, stopped
//! by PID) and every instance uses it as `[store] backend = "redis"` (store and
//! coordination). `--instances N` (1) starts N daemons on that Redis (N ≥ 2 needs
//! `--backend redis`); with N ≥ 2 (or `--webhook`) they run in Telegram webhook mode
//! behind a tiny round-robin forwarder (the fake Bot API pushes each update to the
//! forwarder, which hands the POST to the next instance and answers with its status), so
//! the load is spread; with one instance and no `--webhook` it long-polls as before.
//! With Redis the report adds Redis round trips per answered message (the instances'
//! `confab_redis_commands_total` from `/metrics`, and Redis's own `INFO commandstats`
//! calls, per command, scraped right before the first message and after the last
//! reply), and per-instance RSS and CPU. `--seed-users` seeds sled only (0 with Redis).
//! With Redis, mismatched or extra replies (a message answered twice) fail the run too.
//!
//! `--seed-users N` pre-populates the daemon's data dir (`<root>/data`, the `data_dir` that
//! [`write_root`] configures) *before* the daemon starts, through the library's own
//! `SledStore` (`ConversationStore::append_turns`, `UserStore::put_user`, the daemon's
//! default `[store]` settings): N users of the same bot (`assistant`, Telegram, private
//! chat id == user id == `USER_BASE + i`, exactly the `ConversationKey` the Telegram
//! adapter builds), each with a
//! user record and 3 earlier exchanges (6 turns of 100–300 characters, token counts from the
//! daemon's tokenizer, last seen 2 h – 14 days ago, inside the default 30-day retention).
//! The active users are ids `USER_BASE + 0 .. USER_BASE + --users`, so they are the first
//! `--users` of the seeded ones and arrive with history (ids beyond N are new users); e.g.
//! `--seed-users 100000 --users 10000` is SPEC §13's "100,000 stored users, 10,000 active".
//! One flush at the end; seeding time and the data dir's on-disk size (before and after the
//! run) are printed, and every LLM request that names its seeded asker (all of `--mix
//! unique`) is checked to start with that user's 6 seeded turns ("seeded history in LLM
//! requests: k of n"; reported, not enforced).
//!
//! Reply latency is user send (update injected into the fake) → reply recorded by the fake
//! `sendMessage`, observed through the fake's change notification; each wake-up takes only
//! the new replies (`FakeTelegram::wait_for_sent_since`), and the fake keeps no per-call
//! logs (`set_record_calls(false)`), so the generator's cost is linear in the messages.
//! Replies are matched per chat in order (k-th reply to a chat answers that user's k-th
//! message) and checked against the fake LLM's `echo: <question>` text.
//!
//! Daemon memory: VmRSS at idle (polling, before the first message), the peak VmRSS sampled
//! every 100 ms, VmRSS at the last reply, VmRSS settled (sampled again 2 s after the last
//! reply: SPEC §13's figure is steady state), VmHWM (the kernel's peak), and a short series
//! of the samples. The generator's own VmHWM is printed too (it shares the machine; with
//! `--seed-users` it includes the seeding's sled cache and tokenizer).

mod common;
#[path = "../tests/support/fake_openai.rs"]
mod fake_openai;
#[path = "../tests/support/fake_telegram.rs"]
mod fake_telegram;
mod scaleout;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use confab::config::{Config, Env};
use confab::domain::{ConversationKey, Platform};
use confab::engine::prompt::Tokenizer;
use confab::store::{
    ConversationStore, Durable, Role, SledStore, Turn, Usage, UserRecord, UserStore,
};

use common::proc_cpu_secs;
use fake_openai::FakeOpenAi;
use fake_telegram::FakeTelegram;
use scaleout::{Forwarder, InstanceConf, InstanceFigures, RedisFigures, RedisProc};

const TG_TOKEN: &str = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
const TG_USERNAME: &str = "acme_staging_bot";
/// The bot's name (the file stem of `bots/assistant.toml` written by [`write_root`]).
const BOT_NAME: &str = "assistant";
/// First name of every user (injected messages and seeded user records alike).
const FIRST_NAME: &str = "Load";
/// Seeded users when `--smoke` is given without `--seed-users`.
const SMOKE_SEED_USERS: usize = 100;
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sled,
    Redis,
}

#[derive(Debug)]
struct Args {
    users: usize,
    messages: usize,
    llm_ms: u64,
    mix: Mix,
    cache: bool,
    open: bool,
    /// Closed loop only: at most this many users with a message in flight (0 = all).
    in_flight: usize,
    llm_concurrency: usize,
    seed: u64,
    timeout: Duration,
    keep: bool,
    smoke: bool,
    seed_users: usize,
    backend: Backend,
    instances: usize,
    /// Telegram webhook mode behind the forwarder (implied by `instances >= 2`).
    webhook: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        users: 200,
        messages: 5,
        llm_ms: 0,
        mix: Mix::Unique,
        cache: true,
        open: false,
        in_flight: 0,
        llm_concurrency: 2048,
        seed: 42,
        timeout: Duration::from_secs(120),
        keep: false,
        smoke: false,
        seed_users: 0,
        backend: Backend::Sled,
        instances: 1,
        webhook: false,
    };
    let mut seed_users_given = false;
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
            "--seed-users" => {
                a.seed_users = value("--seed-users")?.0 as usize;
                seed_users_given = true;
            }
            "--mix" => {
                a.mix = match it.next().as_deref() {
                    Some("unique") => Mix::Unique,
                    Some("zipf") => Mix::Zipf,
                    other => return Err(format!("--mix unique|zipf, got {other:?}")),
                }
            }
            "--backend" => {
                a.backend = match it.next().as_deref() {
                    Some("sled") => Backend::Sled,
                    Some("redis") => Backend::Redis,
                    other => return Err(format!("--backend sled|redis, got {other:?}")),
                }
            }
            "--instances" => a.instances = value("--instances")?.0 as usize,
            "--webhook" => a.webhook = true,
            "--no-cache" => a.cache = false,
            "--open" => a.open = true,
            "--in-flight" => {
                a.in_flight = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--in-flight needs a number")?
            }
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
    finish_args(a, seed_users_given)
}

/// `--smoke`'s fixed sizes, then the checks across options.
fn finish_args(mut a: Args, seed_users_given: bool) -> Result<Args, String> {
    if a.smoke {
        a.users = 20;
        a.messages = 2;
        a.llm_ms = 0;
        a.timeout = Duration::from_secs(60);
        if !seed_users_given && a.backend == Backend::Sled {
            a.seed_users = SMOKE_SEED_USERS;
        }
    }
    if a.users == 0 || a.messages == 0 {
        return Err("--users and --messages must be > 0".into());
    }
    if a.instances == 0 {
        return Err("--instances must be > 0".into());
    }
    if a.instances > 1 && a.backend != Backend::Redis {
        return Err("--instances 2 or more needs --backend redis (sled is one process)".into());
    }
    if a.seed_users > 0 && a.backend != Backend::Sled {
        return Err("--seed-users seeds a sled store: use it with --backend sled".into());
    }
    a.webhook |= a.instances > 1;
    Ok(a)
}

fn daemon_bin() -> PathBuf {
    match std::env::var_os("CONFAB_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/confab"),
    }
}

/// The daemon's `data_dir` as [`write_root`] configures it (seeding writes there).
fn data_dir(root: &Path) -> PathBuf {
    root.join("data")
}

/// Writes config/staging.toml, bots/assistant.toml, prompts/assistant.md and .env.test.
fn write_root(
    root: &Path,
    llm_url: &str,
    tg_url: &str,
    a: &Args,
    inst: &InstanceConf,
) -> std::io::Result<()> {
    for sub in ["config", "bots", "prompts"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    let data = data_dir(root);
    let config = format!(
        "data_dir = {data:?}\n\
         [http]\nbind = \"127.0.0.1:{ops_port}\"\n\
         [log]\nlevel = \"warn\"\n\
         [llm]\nbase_url = {llm_url:?}\nmax_concurrent = {conc}\nbackoff_base_ms = 10\n\
         [limits]\nmessages_per_minute = 1000000\nburst = 100000\ndaily_tokens = 1000000000\n\
         [cache]\nenabled = {cache}\n\
         [telegram]\napi_url = {tg_url:?}\nglobal_per_second = 1000000\n\
         per_chat_per_minute = 1000000\ngroup_per_minute = 1000000\n{telegram}{store}",
        data = data.display().to_string(),
        ops_port = inst.ops_port,
        telegram = inst.telegram,
        store = inst.store,
        conc = a.llm_concurrency,
        cache = a.cache,
    );
    std::fs::write(root.join("config/staging.toml"), config)?;
    std::fs::write(
        root.join(format!("bots/{BOT_NAME}.toml")),
        format!(
            "prompt = \"assistant\"\n[telegram]\ntoken_env = \"ASSISTANT_TELEGRAM_TOKEN\"\n\
             username = {{ staging = {TG_USERNAME:?}, production = \"acme_bot\" }}\n"
        ),
    )?;
    std::fs::write(root.join("prompts/assistant.md"), PROMPT)?;
    std::fs::write(
        root.join(".env.test"),
        format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n{}", inst.env),
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

// ----- seeding stored users ------------------------------------------------------------

const CITIES: &[&str] = &[
    "Lisbon",
    "Kraków",
    "Kyoto",
    "Montréal",
    "Porto",
    "Valencia",
    "Tbilisi",
    "Ljubljana",
    "Edinburgh",
    "Seville",
    "Hanoi",
    "Oaxaca",
    "Bergen",
    "Tallinn",
    "Naples",
    "Istanbul",
];
const MONTHS: &[&str] = &[
    "March",
    "April",
    "May",
    "June",
    "September",
    "October",
    "November",
    "December",
];

/// The three earlier exchanges of seeded user `i` as (question, answer): 100–300
/// characters each, varied per user so no two stored conversations are the same.
fn seed_exchanges(i: usize) -> [(String, String); 3] {
    let n = i.wrapping_mul(2_654_435_761) >> 7; // a cheap per-user scramble
    std::array::from_fn(|j| {
        let v = n.wrapping_add(j * 7919);
        let d = 2 + v % 9;
        let city = CITIES[(v / 3) % CITIES.len()];
        let month = MONTHS[(v / 5) % MONTHS.len()];
        match (i + j * 3) % 8 {
            0 => (
                format!("I'm planning a {d}-day trip to {city} in {month}. What should I see if I like museums and local food, and how much should I budget per day?"),
                format!("For {d} days in {city} in {month}, pair one museum each morning with a food market or a long lunch in the afternoon. Budget roughly {} euros a day for food, transport and tickets, and book the popular museums online to skip the queues.", 60 + v % 90),
            ),
            1 => (
                format!("My sourdough starter (day {d}) smells like acetone and barely rises. I feed it 1:1:1 once a day in a kitchen at about {} degrees. What am I doing wrong?", 17 + v % 6),
                "An acetone smell means the starter is hungry, not dead. Feed it twice a day, use 1:2:2 for a few days, and keep it somewhere a little warmer if you can. Once it is healthy it should double within six to eight hours of a feed.".to_string(),
            ),
            2 => (
                format!("Can you explain the difference between a Rust Vec and a slice? I keep getting borrow errors when I pass my Vec of {} items to a function and then use it again.", 10 + v % 990),
                "A Vec<T> owns its heap buffer; a &[T] slice only borrows a view into one. Let the function take &[T] (or &mut [T]) and call it with &v: that borrows instead of moving the Vec, so you can keep using it after the call.".to_string(),
            ),
            3 => (
                format!("I run 5 km three times a week in about {} minutes. How can I get under {} minutes in the next two months without getting injured?", 28 + v % 8, 25 + v % 4),
                "Keep two of the runs easy and make one a workout: 6 × 400 m at goal pace with 90 s jogging in between, adding a repeat every week. Increase the weekly distance by at most 10 %, sleep well, and take an easy week every fourth week.".to_string(),
            ),
            4 => (
                format!("Write a short, polite email to my landlord asking to fix the heating in flat {}; it has been broken for {d} days now.", 1 + v % 240),
                format!("Subject: Heating repair in flat {}\n\nDear landlord, the heating in my flat has not worked for {d} days. Could you arrange a repair this week? I am at home most afternoons and happy to let the technician in. Thank you and kind regards.", 1 + v % 240),
            ),
            5 => (
                format!("What's a good way to learn Spanish vocabulary? I have about {} minutes a day and I'm at A2 level, mostly reading on my phone.", 10 + v % 50),
                "Use spaced repetition (Anki or similar) for ten new words a day, taken from what you read rather than from lists. Spend the rest of the time reading graded readers or news in easy Spanish, and say new sentences out loud.".to_string(),
            ),
            6 => {
                let c = (v % 45) as f64 - 5.0;
                (
                    format!("How do I convert {c} degrees Celsius to Fahrenheit, and is there a quick way to estimate it in my head when I travel to {city}?"),
                    format!("Multiply by 9/5 and add 32: {c} °C is {:.1} °F. To estimate in your head, double the Celsius figure and add 30, which gives {} °F here; close enough for the weather forecast.", c * 9.0 / 5.0 + 32.0, c * 2.0 + 30.0),
                )
            }
            _ => (
                format!("My tomato plants have yellow leaves at the bottom. I water them every {d} days and they get about {} hours of sun. Is that too much water?", 4 + v % 6),
                "Yellowing lower leaves are usually normal ageing or a lack of nitrogen rather than too much water. Water deeply but only when the top few centimetres of soil are dry, remove the yellow leaves, and feed with a tomato fertiliser every two weeks.".to_string(),
            ),
        }
    })
}

/// The conversation the Telegram adapter builds for a private message from `user_id`
/// (`Inbound::conversation()`: chat id == user id in a private chat).
fn conversation_of(user_id: i64) -> ConversationKey {
    ConversationKey {
        bot: BOT_NAME.into(),
        platform: Platform::Telegram,
        chat: user_id.to_string(),
        user: user_id.to_string(),
    }
}

struct Seeded {
    users: usize,
    turns: usize,
    tokens: u64,
    elapsed: Duration,
    workers: usize,
    /// Thread time summed over the writers: counting tokens / store calls.
    tokenize: Duration,
    store: Duration,
    /// The one flush at the end.
    flush: Duration,
}

/// What one seeding thread did: (tokens, time counting tokens, time in store calls).
type WorkerStats = (u64, Duration, Duration);

/// Writes `n` users with history into `dir` through the library's store, with the
/// daemon's default `[store]` settings; several writer threads (sled is concurrent),
/// one flush at the end, then the store is closed so the daemon can open it.
fn seed_store(dir: &Path, n: usize, rt: tokio::runtime::Handle) -> Result<Seeded, String> {
    let started = Instant::now();
    let defaults = Config::with_defaults(Env::Staging, dir);
    let store = SledStore::open(
        dir,
        defaults.store.cache_capacity_mb,
        defaults.store.flush_every_ms,
    )
    .map_err(|e| format!("seed: open store: {e}"))?;
    let tokenizer = Tokenizer::load()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1_700_000_000, |d| d.as_secs() as i64);
    let workers = std::thread::available_parallelism().map_or(2, |p| p.get().clamp(1, 4));
    let chunk = n.div_ceil(workers).max(1);
    let (tokens, tokenize, store_time) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|from| {
                let (store, tokenizer) = (&store, tokenizer.clone());
                scope.spawn(move || -> Result<WorkerStats, String> {
                    let (mut tokens, mut tokenize, mut store_time) =
                        (0u64, Duration::ZERO, Duration::ZERO);
                    for i in from..(from + chunk).min(n) {
                        let id = USER_BASE + i as i64;
                        // Last seen between 2 h and 14 days ago; 90 s between turns.
                        let last = now - 2 * 3600 - (i as i64 * 7919) % (14 * 86_400);
                        let mut turns = Vec::with_capacity(6);
                        let t0 = Instant::now();
                        for (j, (q, r)) in seed_exchanges(i).into_iter().enumerate() {
                            for (k, (role, text)) in [(Role::User, q), (Role::Assistant, r)]
                                .into_iter()
                                .enumerate()
                            {
                                let t = tokenizer.count(&text) as u32;
                                tokens += u64::from(t);
                                let at = last - (5 - (2 * j + k) as i64) * 90;
                                turns.push(Turn {
                                    role,
                                    text,
                                    tokens: t,
                                    at,
                                });
                            }
                        }
                        let t1 = Instant::now();
                        tokenize += t1 - t0;
                        let conv = conversation_of(id);
                        store
                            .append_turns(&conv, &turns, None)
                            .map_err(|e| format!("seed: append turns: {e}"))?;
                        let used: u64 = turns.iter().map(|t| u64::from(t.tokens)).sum();
                        let record = UserRecord {
                            name: Some(FIRST_NAME.into()),
                            username: None,
                            first_seen: last - (i as i64 % 60) * 86_400 - 600,
                            last_seen: last,
                            usage: Usage {
                                day: last.div_euclid(86_400),
                                tokens: used,
                                messages: 3,
                                budget_notified: false,
                                total_tokens: used,
                                total_messages: 3,
                                ..Usage::default()
                            },
                            ..UserRecord::default()
                        };
                        store
                            .put_user(&conv.user_ref(), &record)
                            .map_err(|e| format!("seed: put user: {e}"))?;
                        store_time += t1.elapsed();
                    }
                    Ok((tokens, tokenize, store_time))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "seed: a writer panicked".to_string())?
            })
            .try_fold((0, Duration::ZERO, Duration::ZERO), |acc, r| {
                r.map(|(t, a, b)| (acc.0 + t, acc.1 + a, acc.2 + b))
            })
    })?;
    let flush_started = Instant::now();
    rt.block_on(store.flush())
        .map_err(|e| format!("seed: flush: {e}"))?;
    drop(store); // joins the flush thread, closes sled
    let flush = flush_started.elapsed();
    Ok(Seeded {
        users: n,
        turns: n * 6,
        tokens,
        elapsed: started.elapsed(),
        workers,
        tokenize,
        store: store_time,
        flush,
    })
}

/// The seeded user a question was asked by, if the question names one (every question
/// of `--mix unique`, and the later ones of `--mix zipf`).
fn asker(a: &Args, question: &str) -> Option<usize> {
    let rest = question.strip_prefix("user ")?;
    let (u, _) = rest.split_once(" asks question ")?;
    u.parse::<usize>().ok().filter(|u| *u < a.seed_users)
}

/// Whether an LLM request from seeded user `u` starts its history with the 6 seeded
/// turns, in order (the daemon loaded that user's stored conversation).
fn carries_seeded_history(u: usize, messages: &[(String, String)]) -> bool {
    let history = messages.iter().filter(|(role, _)| role != "system");
    let expected = seed_exchanges(u)
        .into_iter()
        .flat_map(|(q, r)| [("user", q), ("assistant", r)]);
    let mut n = 0;
    for ((role, text), (want_role, want_text)) in history.zip(expected) {
        if role != want_role || *text != want_text {
            return false;
        }
        n += 1;
    }
    n == 6
}

/// (apparent bytes, allocated bytes) of every file under `dir`.
fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total.0 += m.len();
                total.1 += m.blocks() * 512;
            }
        }
    }
    total
}

fn fmt_size((apparent, allocated): (u64, u64)) -> String {
    format!(
        "{:.1} MiB ({:.1} MiB allocated)",
        mib(apparent),
        mib(allocated)
    )
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

/// The daemon's VmRSS over the run.
struct RssSeries {
    /// Polling, before the first message.
    idle: u64,
    /// (time since the first message was injected, VmRSS), every ~100 ms, settle included.
    samples: Vec<(Duration, u64)>,
    at_last_reply: u64,
    /// [`SETTLE`] after the last reply.
    settled: u64,
}

/// How long after the last reply the "settled" RSS is sampled.
const SETTLE: Duration = Duration::from_secs(2);

impl RssSeries {
    fn peak(&self) -> u64 {
        self.samples
            .iter()
            .map(|(_, b)| *b)
            .chain([self.idle, self.at_last_reply, self.settled])
            .max()
            .unwrap_or(0)
    }

    /// At most `n` evenly spaced samples (the last one always included), as `t:MiB`.
    fn summary(&self, n: usize) -> String {
        let len = self.samples.len();
        if len == 0 {
            return String::new();
        }
        let step = len.div_ceil(n.max(1)).max(1);
        let mut picks: Vec<usize> = (0..len).step_by(step).collect();
        if picks.last() != Some(&(len - 1)) {
            picks.push(len - 1);
        }
        picks
            .into_iter()
            .map(|i| {
                let (t, b) = self.samples[i];
                format!("{:.1}s:{:.1}", t.as_secs_f64(), mib(b))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The running daemons of a run and what they need: their Redis, the webhook forwarder.
struct Daemons {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    ops_ports: Vec<u16>,
    // Dropped after the children are killed (field order).
    _forwarder: Option<Forwarder>,
    redis: Option<RedisProc>,
}

/// Starts Redis (with `--backend redis`), the forwarder (webhook mode) and the
/// instances, each with its own root (`scaleout::instance_root`).
async fn start_daemons(
    a: &Args,
    bin: &Path,
    root: &Path,
    llm_url: &str,
    tg_url: &str,
) -> Result<Daemons, String> {
    let redis = match a.backend {
        Backend::Redis => Some(
            tokio::task::spawn_blocking(RedisProc::start)
                .await
                .map_err(|e| format!("redis: {e}"))??,
        ),
        Backend::Sled => None,
    };
    let url = redis.as_ref().map(RedisProc::url);
    let mut confs = scaleout::instance_confs(a.instances, url.as_deref(), a.webhook)?;
    let forwarder = if a.webhook {
        Some(Forwarder::start(confs.iter().filter_map(|c| c.webhook).collect()).await?)
    } else {
        None
    };
    if let Some(f) = &forwarder {
        scaleout::set_webhook_url(&mut confs, &f.url);
    }
    let mut d = Daemons {
        children: Vec::new(),
        logs: Vec::new(),
        ops_ports: confs.iter().map(|c| c.ops_port).collect(),
        _forwarder: forwarder,
        redis,
    };
    for (i, conf) in confs.iter().enumerate() {
        let dir = scaleout::instance_root(root, i);
        write_root(&dir, llm_url, tg_url, a, conf).map_err(|e| format!("write root: {e}"))?;
        let log = dir.join("daemon.log");
        match spawn_daemon(bin, &dir, &log) {
            Ok(child) => d.children.push(child),
            Err(e) => {
                d.kill_all();
                return Err(format!("spawn: {e}"));
            }
        }
        d.logs.push(log);
    }
    Ok(d)
}

impl Daemons {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// The first instance that exited, as "instance i: status".
    fn exited(&mut self) -> Option<String> {
        self.children
            .iter_mut()
            .enumerate()
            .find_map(|(i, c)| match c.try_wait() {
                Ok(Some(status)) => Some(format!("instance {i}: {status}")),
                _ => None,
            })
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last 30 lines of each instance's log.
    fn log_tail(&self) -> String {
        self.logs
            .iter()
            .enumerate()
            .map(|(i, log)| {
                let s = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = s.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                format!("-- instance {i} ({})\n{tail}", log.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn cpu_secs(&self) -> Vec<Option<f64>> {
        self.pids().into_iter().map(proc_cpu_secs).collect()
    }

    /// Redis counters now (with `--backend redis`).
    async fn redis_counts(&self) -> Option<scaleout::RedisCounts> {
        let redis = self.redis.as_ref()?;
        let mut daemons = Some(0);
        for port in &self.ops_ports {
            let n = scaleout::redis_commands(*port).await;
            daemons = daemons.zip(n).map(|(a, b)| a + b);
        }
        Some(scaleout::RedisCounts {
            daemons,
            server: redis.command_calls(),
        })
    }

    fn figures(&self, before: &[Option<f64>], after: &[Option<f64>]) -> Vec<InstanceFigures> {
        self.pids()
            .into_iter()
            .enumerate()
            .map(|(i, pid)| InstanceFigures {
                vm_hwm: proc_status_kb(pid, "VmHWM:"),
                settled: proc_status_kb(pid, "VmRSS:"),
                cpu: before
                    .get(i)
                    .copied()
                    .flatten()
                    .zip(after.get(i).copied().flatten())
                    .map(|(b, a)| a - b),
            })
            .collect()
    }
}

struct Outcome {
    total: usize,
    answered: usize,
    mismatched: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    /// Spawn → the adapter's first getUpdates.
    startup: Duration,
    /// Time to inject the first wave (every user's first message; all of them with --open).
    inject: Duration,
    rss: RssSeries,
    vm_hwm: Option<u64>,
    /// CPU seconds the daemon used between the first message and the last reply.
    daemon_cpu: Option<f64>,
    llm_calls: usize,
    seeded: Option<Seeded>,
    disk_before: Option<(u64, u64)>,
    disk_after: (u64, u64),
    /// (LLM requests of seeded users that carried their seeded history, such requests
    /// that could be attributed to a user: see [`asker`]).
    history_seen: Option<(usize, usize)>,
    /// The generator's own peak RSS (both fakes live in it).
    loadgen_hwm: Option<u64>,
    /// Per instance (one with sled).
    instances: Vec<InstanceFigures>,
    /// Redis round trips over the run (Redis backend).
    redis: Option<RedisFigures>,
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
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let root = tmp.path().to_path_buf();

    // Stored users first, while nothing else runs; the daemon opens the store afterwards.
    let (seeded, disk_before) = if a.seed_users > 0 {
        let (dir, n, rt) = (
            data_dir(&root),
            a.seed_users,
            tokio::runtime::Handle::current(),
        );
        let seeded = tokio::task::spawn_blocking(move || seed_store(&dir, n, rt))
            .await
            .map_err(|e| format!("seed: {e}"))??;
        let size = dir_size(&data_dir(&root));
        println!(
            "seeded {} users ({} turns, {} tokens) in {:.2} s ({} writers; final flush {:.2} s); \
             data dir on disk: {}",
            seeded.users,
            seeded.turns,
            seeded.tokens,
            seeded.elapsed.as_secs_f64(),
            seeded.workers,
            seeded.flush.as_secs_f64(),
            fmt_size(size),
        );
        (Some(seeded), Some(size))
    } else {
        (None, None)
    };

    let llm = FakeOpenAi::start().await;
    llm.set_latency(Duration::from_millis(a.llm_ms));
    let tg = FakeTelegram::start(TG_TOKEN, TG_USERNAME).await;
    // Per-call request logs would grow with every getUpdates / sendMessage / typing call.
    tg.set_record_calls(false);
    let spawned = Instant::now();
    let mut d = start_daemons(a, &bin, &root, &llm.base_url, &tg.api_url).await?;
    let pid = d.pids().first().copied().ok_or("no daemon started")?;

    // Ready once the adapter long-polls, or every instance registered its webhook
    // (opening a big store takes a while).
    let ready_limit = Duration::from_secs(30 + (a.seed_users / 2000) as u64);
    let ready = |tg: &FakeTelegram| {
        if a.webhook {
            tg.count("setWebhook") >= a.instances
        } else {
            tg.count("getUpdates") > 0
        }
    };
    while !ready(&tg) {
        if let Some(why) = d.exited() {
            d.kill_all();
            return Err(format!("daemon exited early ({why}):\n{}", d.log_tail()));
        }
        if spawned.elapsed() > ready_limit {
            d.kill_all();
            return Err(format!(
                "daemon not polling after {} s:\n{}",
                ready_limit.as_secs(),
                d.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let startup = spawned.elapsed();
    let rss_idle = proc_status_kb(pid, "VmRSS:").unwrap_or(0);

    let qs = questions(a);
    let total = a.users * a.messages;
    let mut sent_at: Vec<Vec<Option<Instant>>> = vec![vec![None; a.messages]; a.users];
    let mut replies = vec![0usize; a.users];
    let mut latencies = Vec::with_capacity(total);
    let mut mismatched = 0usize;
    let mut samples = Vec::new();
    let mut last_rss_sample = Instant::now();

    let cpu_before = d.cpu_secs();
    let redis_before = d.redis_counts().await;
    let start = Instant::now();
    // With --in-flight K (closed loop), only K users start; each one that has had all its
    // replies hands over to the next user, so K conversations are active at any moment.
    let first_wave = if a.in_flight > 0 && !a.open {
        a.in_flight.min(a.users)
    } else {
        a.users
    };
    let mut next_user = first_wave;
    for u in 0..first_wave {
        let upto = if a.open { a.messages } else { 1 };
        for k in 0..upto {
            tg.send_private(USER_BASE + u as i64, FIRST_NAME, &qs[u][k]);
            sent_at[u][k] = Some(Instant::now());
        }
    }
    let inject = start.elapsed();
    let mut seen = 0usize;
    let mut answered = 0usize;
    let mut last_progress = Instant::now();
    while answered < total {
        // Batch wake-ups (≤ 5 ms added to the observed latency) so the generator does not
        // steal the daemon's CPU; each wake-up copies only the replies it has not seen.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let new = tg
            .wait_for_sent_since(seen, Duration::from_millis(200))
            .await;
        let now = Instant::now();
        if !new.is_empty() {
            seen += new.len();
            last_progress = now;
        }
        for m in &new {
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
                tg.send_private(USER_BASE + u as i64, FIRST_NAME, &qs[u][k + 1]);
                sent_at[u][k + 1] = Some(Instant::now());
            } else if !a.open && next_user < a.users {
                let n = next_user;
                next_user += 1;
                tg.send_private(USER_BASE + n as i64, FIRST_NAME, &qs[n][0]);
                sent_at[n][0] = Some(Instant::now());
            }
        }
        if now.duration_since(last_rss_sample) >= Duration::from_millis(100) {
            last_rss_sample = now;
            if let Some(b) = proc_status_kb(pid, "VmRSS:") {
                samples.push((now.duration_since(start), b));
            }
        }
        if now.duration_since(start) > a.timeout
            || now.duration_since(last_progress) > Duration::from_secs(30)
        {
            break;
        }
        if let Some(why) = d.exited() {
            d.kill_all();
            return Err(format!("daemon died ({why}):\n{}", d.log_tail()));
        }
    }
    let wall = start.elapsed();
    let cpu_after = d.cpu_secs();
    let redis_after = d.redis_counts().await;
    let daemon_cpu = match (
        cpu_before.iter().copied().sum::<Option<f64>>(),
        cpu_after.iter().copied().sum::<Option<f64>>(),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let at_last_reply = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
    samples.push((wall, at_last_reply));
    // Steady state: keep sampling until SETTLE after the last reply.
    let settle_until = Instant::now() + SETTLE;
    while Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(b) = proc_status_kb(pid, "VmRSS:") {
            samples.push((start.elapsed(), b));
        }
    }
    let settled = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
    let vm_hwm = proc_status_kb(pid, "VmHWM:");
    if let Some(why) = d.exited() {
        eprintln!("loadgen: the daemon exited while settling ({why})");
    }
    let instances = d.figures(&cpu_before, &cpu_after);
    let llm_calls = llm.request_count();
    let history_seen = (a.seed_users > 0).then(|| {
        let (mut ok, mut checked) = (0, 0);
        for r in llm.requests() {
            if let Some(u) = r.last_user().and_then(|q| asker(a, q)) {
                checked += 1;
                ok += usize::from(carries_seeded_history(u, &r.messages));
            }
        }
        (ok, checked)
    });
    d.kill_all();
    let disk_after = dir_size(&data_dir(&root));
    if answered < total {
        eprintln!("daemon log tail:\n{}", d.log_tail());
    }
    let redis = redis_before
        .zip(redis_after)
        .map(|(b, a)| RedisFigures::between(&b, &a));
    drop(d); // stops redis-server and the forwarder
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
        startup,
        inject,
        rss: RssSeries {
            idle: rss_idle,
            samples,
            at_last_reply,
            settled,
        },
        vm_hwm,
        daemon_cpu,
        llm_calls,
        seeded,
        disk_before,
        disk_after,
        history_seen,
        loadgen_hwm: proc_status_kb(std::process::id(), "VmHWM:"),
        instances,
        redis,
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
    let peak_sampled = o.rss.peak();
    println!(
        "loadgen users={} messages={} seed_users={} llm_ms={} mix={:?} cache={} mode={}: \
         {}/{} answered in {:.2}s = {:.0} msg/s; latency p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms \
         max {:.1} ms; peak RSS {:.1} MiB (VmHWM), {:.1} MiB (sampled VmRSS); \
         settled RSS {:.1} MiB ({} s after the last reply); \
         LLM calls {}; cache hit rate {:.1}%; mismatched {}",
        a.users,
        a.messages,
        a.seed_users,
        a.llm_ms,
        a.mix,
        a.cache,
        if a.open {
            "open".to_string()
        } else if a.in_flight > 0 {
            format!("closed, {} in flight", a.in_flight)
        } else {
            "closed".to_string()
        },
        o.answered,
        o.total,
        o.wall.as_secs_f64(),
        rate,
        ms(p50),
        ms(p95),
        ms(p99),
        ms(max),
        mib(hwm),
        mib(peak_sampled),
        mib(o.rss.settled),
        SETTLE.as_secs(),
        o.llm_calls,
        hit_rate * 100.0,
        o.mismatched,
    );
    let mut rows = vec![
        ("messages", format!("{} / {}", o.answered, o.total)),
        ("wall time", format!("{:.3} s", o.wall.as_secs_f64())),
        ("throughput", format!("{rate:.0} msg/s")),
        (
            "daemon CPU per message",
            match o.daemon_cpu {
                Some(c) if o.answered > 0 => format!(
                    "{:.0} µs ({:.0} msg/s per fully used core; {:.2} cores used)",
                    c * 1e6 / o.answered as f64,
                    o.answered as f64 / c.max(1e-9),
                    c / o.wall.as_secs_f64().max(1e-9)
                ),
                _ => "n/a".to_string(),
            },
        ),
        ("latency p50", format!("{:.1} ms", ms(p50))),
        ("latency p95", format!("{:.1} ms", ms(p95))),
        ("latency p99", format!("{:.1} ms", ms(p99))),
        ("latency max", format!("{:.1} ms", ms(max))),
        (
            "daemon startup (spawn → polling)",
            format!("{:.2} s", o.startup.as_secs_f64()),
        ),
        ("first-wave injection", format!("{:.1} ms", ms(o.inject))),
        ("RSS idle (VmRSS)", format!("{:.1} MiB", mib(o.rss.idle))),
        ("peak RSS (VmHWM)", format!("{:.1} MiB", mib(hwm))),
        (
            "peak RSS (sampled)",
            format!("{:.1} MiB", mib(peak_sampled)),
        ),
        (
            "RSS at last reply",
            format!("{:.1} MiB", mib(o.rss.at_last_reply)),
        ),
        (
            "RSS settled (+2 s)",
            format!("{:.1} MiB", mib(o.rss.settled)),
        ),
        ("LLM calls", o.llm_calls.to_string()),
        ("cache hit rate", format!("{:.1} %", hit_rate * 100.0)),
        ("mismatched replies", o.mismatched.to_string()),
    ];
    if let Some(s) = &o.seeded {
        rows.push(("seeded users", format!("{} ({} turns)", s.users, s.turns)));
        rows.push((
            "seeding time",
            format!(
                "{:.2} s ({} writers; thread time: tokens {:.1} s, store {:.1} s; final flush {:.2} s)",
                s.elapsed.as_secs_f64(),
                s.workers,
                s.tokenize.as_secs_f64(),
                s.store.as_secs_f64(),
                s.flush.as_secs_f64()
            ),
        ));
    }
    if let Some(d) = o.disk_before {
        rows.push(("data dir before run", fmt_size(d)));
    }
    rows.push(("data dir after run", fmt_size(o.disk_after)));
    if let Some((seen, of)) = o.history_seen {
        rows.push((
            "seeded history in LLM requests",
            format!("{seen} of {of} attributable requests of seeded users"),
        ));
    }
    if let Some(b) = o.loadgen_hwm {
        let label = if o.seeded.is_some() {
            "generator VmHWM (seeding included)"
        } else {
            "generator VmHWM"
        };
        rows.push((label, format!("{:.1} MiB", mib(b))));
    }
    scaleout_rows(a, o, &mut rows);
    println!("| metric | value |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    println!(
        "daemon VmRSS series (s since first message: MiB): {}",
        o.rss.summary(16)
    );
}

/// The backend, the instances' figures and the Redis round trips (with Redis or N > 1).
fn scaleout_rows(a: &Args, o: &Outcome, rows: &mut Vec<(&'static str, String)>) {
    if a.backend == Backend::Sled && a.instances == 1 {
        return;
    }
    let intake = if a.webhook {
        "webhook, round-robin forwarder"
    } else {
        "long polling"
    };
    rows.push((
        "backend / instances",
        format!("{:?} / {} ({intake})", a.backend, a.instances).to_lowercase(),
    ));
    for (i, f) in o.instances.iter().enumerate() {
        let cpu = f.cpu.map_or("n/a".into(), |c| {
            format!("{:.0} µs/msg", c * 1e6 / o.answered.max(1) as f64)
        });
        rows.push((
            "instance (VmHWM, settled RSS, CPU per answered msg)",
            format!(
                "#{i}: {:.1} MiB, {:.1} MiB, {cpu}",
                mib(f.vm_hwm.unwrap_or(0)),
                mib(f.settled.unwrap_or(0))
            ),
        ));
    }
    let Some(r) = &o.redis else { return };
    let per = |n: u64| n as f64 / o.answered.max(1) as f64;
    rows.push((
        "Redis round trips per message (confab_redis_commands_total)",
        r.daemon_round_trips
            .map_or("n/a (metrics not scraped)".into(), |n| {
                format!("{:.2} ({n} in all)", per(n))
            }),
    ));
    let total: u64 = r.server_calls.iter().map(|(_, n)| n).sum();
    rows.push((
        "Redis commands per message (INFO commandstats)",
        format!("{:.2} ({total} in all)", per(total)),
    ));
    let top: Vec<String> = r
        .server_calls
        .iter()
        .take(16)
        .map(|(cmd, n)| format!("{cmd} {:.2}", per(*n)))
        .collect();
    rows.push(("Redis commands per message, by command", top.join(", ")));
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
    // With Redis, a message answered twice (e.g. by both instances) or out of order is a
    // scale-out bug, not noise.
    if args.backend == Backend::Redis && outcome.mismatched > 0 {
        eprintln!(
            "loadgen: {} mismatched or extra replies",
            outcome.mismatched
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
