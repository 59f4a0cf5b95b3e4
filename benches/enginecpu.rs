//! Engine cost per message (SPEC §13): CPU time per message, msg/s, per-message latency
//! percentiles, and how many messages share each durable flush (group commit).
//! Real sled in a temp dir; an in-process LLM answering at 0 ms (benches/common).
//!
//! ```text
//! cargo bench --bench enginecpu                         # defaults below
//! cargo bench --bench enginecpu -- --messages 40000 --threads 1 --concurrency 1,64,512
//! cargo bench --bench enginecpu -- --concurrency 64 --window-us 0
//! ```
//! Defaults: `--messages 20000 --threads 2 --concurrency 1,64,512 --users 10000
//! --window-us 500` (the group-commit window, as `store.group_commit_us`).
//! `--threads T` sets tokio's worker threads (1 = the "per core" figure: sled's own I/O
//! threads and our flush thread still run beside it and are counted in CPU time).
//! CPU time is the whole process's user+system time from /proc/self/stat, so
//! "CPU µs/msg" is what one message costs across every thread, and 1e6 / that figure is
//! the msg/s one fully busy core would sustain.

mod common;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{engine_and_store, message, proc_cpu_secs};
use confab::engine::Engine;

struct Args {
    messages: u64,
    threads: usize,
    concurrency: Vec<u64>,
    users: u64,
    window_us: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        messages: 20_000,
        threads: 2,
        concurrency: vec![1, 64, 512],
        users: 10_000,
        window_us: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--messages" => a.messages = num(&val("--messages")?)?,
            "--threads" => a.threads = num(&val("--threads")?)? as usize,
            "--users" => a.users = num(&val("--users")?)?,
            "--window-us" => a.window_us = num(&val("--window-us")?)?,
            "--concurrency" => {
                a.concurrency = val("--concurrency")?
                    .split(',')
                    .map(num)
                    .collect::<Result<_, _>>()?
            }
            // cargo bench passes --bench to harness = false targets
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn num(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
}

/// Bytes this process has written (to the page cache / disk) so far.
fn written_bytes() -> f64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Sends `n` messages, `conc` conversations at a time; returns per-message latencies.
async fn drive(
    engine: &Arc<Engine>,
    n: u64,
    conc: u64,
    users: u64,
    text: &'static str,
) -> Vec<Duration> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (engine, next) = (engine.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return lat;
                    }
                    let m = message(i % users, text);
                    let t = Instant::now();
                    let reply = engine.handle(&m).await;
                    lat.push(t.elapsed());
                    assert!(
                        matches!(reply.outcome(), "answer" | "cached"),
                        "unexpected outcome {}",
                        reply.outcome()
                    );
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n as usize);
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all.sort();
    all
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("enginecpu: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("enginecpu: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "engine, {} worker thread(s), {} messages per run, {} distinct users, LLM 0 ms, durable flush per reply, group-commit window {} µs",
        a.threads, a.messages, a.users, a.window_us
    );
    println!(
        "{:<22} {:>9} {:>10} {:>13} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "run",
        "msg/s",
        "CPU µs/msg",
        "msg/s/core*",
        "p50 µs",
        "p99 µs",
        "max µs",
        "msgs/flush",
        "KB/msg"
    );
    for &conc in &a.concurrency {
        for cache in [false, true] {
            let dir = match tempfile::tempdir() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("enginecpu: tempdir: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let (engine, store) = engine_and_store(dir.path(), cache);
            store.set_group_commit_window(Duration::from_micros(a.window_us));
            // Cache run: every message after the first asks the same opening question of a
            // fresh user → hits. Plain run: distinct users, conversations growing.
            let (users, text) = if cache {
                (u64::MAX, "What is the capital of France?")
            } else {
                (a.users, "How do I bake bread?")
            };
            rt.block_on(async {
                // warm-up (and the cache entry)
                drive(&engine, 200.min(a.messages), conc.min(16), users, text).await;
            });
            let (f0, w0) = (
                store.flush_counts().flushes.load(Ordering::Relaxed),
                store.flush_counts().waiters.load(Ordering::Relaxed),
            );
            let cpu0 = proc_cpu_secs(std::process::id()).unwrap_or(0.0);
            let wr0 = written_bytes();
            let t0 = Instant::now();
            let lat = rt.block_on(drive(&engine, a.messages, conc, users, text));
            let wall = t0.elapsed().as_secs_f64();
            let cpu = proc_cpu_secs(std::process::id()).unwrap_or(0.0) - cpu0;
            let written = written_bytes() - wr0;
            let flushes = store.flush_counts().flushes.load(Ordering::Relaxed) - f0;
            let waiters = store.flush_counts().waiters.load(Ordering::Relaxed) - w0;
            let n = lat.len() as f64;
            let cpu_us = cpu * 1e6 / n;
            println!(
                "{:<22} {:>9.0} {:>10.1} {:>13.0} {:>10.0} {:>10.0} {:>10.0} {:>12.1} {:>10.1}",
                format!("{} x{conc}", if cache { "cache-hit" } else { "answer" }),
                n / wall,
                cpu_us,
                1e6 / cpu_us,
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                pct(&lat, 1.0),
                waiters as f64 / flushes.max(1) as f64,
                written / n / 1024.0,
            );
        }
    }
    println!(
        "* msg/s/core = 1e6 / CPU µs per message (all threads' CPU time charged to the messages)"
    );
    ExitCode::SUCCESS
}
