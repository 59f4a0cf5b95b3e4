//! Scale-out parts of the load generator (`--backend redis`, `--instances N`, `--webhook`):
//! a `redis-server` of the run's own (free loopback port, AOF `everysec`, stopped by PID),
//! a tiny round-robin webhook forwarder in front of the instances (the fake Bot API
//! pushes every update to it; it hands each POST to the next instance and answers with
//! that instance's status, like a load balancer), and the Redis round-trip counters
//! (each instance's `confab_redis_commands_total`, Redis's own `INFO commandstats`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Router;

/// The header the fake (like Telegram) puts the webhook secret in.
const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The webhook secret every instance is configured with (`HOOK_SECRET`).
pub const HOOK_SECRET: &str = "loadgen_hook-Secret0123456789";
/// The local path prefix of the public webhook URL (each bot at `<prefix>/telegram/<bot>`).
const HOOK_PATH: &str = "/hook";

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("a free port: {e}"))
}

/// A `redis-server` of this run: its data in a temp dir, killed (by PID) on drop.
pub struct RedisProc {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisProc {
    /// Starts `redis-server` with AOF on (`appendfsync everysec`), no RDB snapshots, and
    /// waits until it answers PING.
    pub fn start() -> Result<RedisProc, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir for redis: {e}"))?;
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start redis-server (apt-get install -y redis-server): {e}"))?;
        let server = RedisProc {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.cli(&["PING"]).as_deref() != Some("PONG") {
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {port}: no PONG in 30 s"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `redis-cli` against this server: its stdout, or `None` when it could not run.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `INFO commandstats`: calls per command (lowercase), e.g. `evalsha` → 1234.
    pub fn command_calls(&self) -> BTreeMap<String, u64> {
        let text = self.cli(&["INFO", "commandstats"]).unwrap_or_default();
        parse_commandstats(&text)
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cmdstat_get:calls=12,usec=...` lines → {"get": 12}.
fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Calls per command between two `INFO commandstats` readings, largest first, without
/// the `info` calls the readings themselves made.
pub fn command_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    let mut d: Vec<(String, u64)> = after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, n)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    d.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    d
}

/// The round-robin webhook forwarder: `http://127.0.0.1:PORT/hook` for setWebhook.
pub struct Forwarder {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

struct Targets {
    addrs: Vec<SocketAddr>,
    next: AtomicUsize,
    client: reqwest::Client,
}

impl Forwarder {
    /// Serves on a free loopback port; POST `<path>` goes to the next of `targets` at
    /// the same path, with the same secret header and body.
    pub async fn start(targets: Vec<SocketAddr>) -> Result<Forwarder, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("forwarder bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("forwarder addr: {e}"))?;
        let state = Arc::new(Targets {
            addrs: targets,
            next: AtomicUsize::new(0),
            client: reqwest::Client::new(),
        });
        let app = Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Forwarder {
            url: format!("http://{addr}{HOOK_PATH}"),
            task,
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(t): State<Arc<Targets>>, req: Request) -> StatusCode {
    let Some(target) = t
        .addrs
        .get(t.next.fetch_add(1, Ordering::Relaxed) % t.addrs.len().max(1))
        .copied()
    else {
        return StatusCode::BAD_GATEWAY;
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let secret = req
        .headers()
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE;
    };
    let mut out = t
        .client
        .post(format!("http://{target}{path}"))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(60))
        .body(body.to_vec());
    if let Some(s) = secret {
        out = out.header(SECRET_HEADER, s);
    }
    match out.send().await {
        Ok(resp) => StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

/// What one instance's config adds to the load generator's root.
#[derive(Default, Clone)]
pub struct InstanceConf {
    /// `[http] bind` (the ops endpoint: `/metrics`); port 0 when nobody scrapes it.
    pub ops_port: u16,
    /// Extra lines of the `[telegram]` section (webhook mode).
    pub telegram: String,
    /// A `[store]` section (Redis), or empty (sled, the default).
    pub store: String,
    /// Extra lines of the env file.
    pub env: String,
    /// Where this instance's webhook server listens (webhook mode).
    pub webhook: Option<SocketAddr>,
}

/// The instances' configs for a run: Redis store settings when `redis_url` is given,
/// webhook mode with one local webhook port per instance when `webhook`.
pub fn instance_confs(
    n: usize,
    redis_url: Option<&str>,
    webhook: bool,
) -> Result<Vec<InstanceConf>, String> {
    (0..n)
        .map(|_| {
            let mut c = InstanceConf::default();
            if let Some(url) = redis_url {
                c.ops_port = free_port()?;
                c.store = "[store]\nbackend = \"redis\"\n".into();
                c.env = format!("CONFAB_REDIS_URL={url}\n");
            }
            if webhook {
                let port = free_port()?;
                c.webhook = Some(SocketAddr::from(([127, 0, 0, 1], port)));
                c.env.push_str(&format!("HOOK_SECRET={HOOK_SECRET}\n"));
            }
            Ok(c)
        })
        .collect()
}

/// Sets the `[telegram]` webhook lines of every instance once the public URL is known.
pub fn set_webhook_url(confs: &mut [InstanceConf], url: &str) {
    for c in confs {
        if let Some(bind) = c.webhook {
            c.telegram = format!(
                "mode = \"webhook\"\nwebhook_url = {url:?}\nwebhook_bind = \"{bind}\"\n\
                 webhook_secret_env = \"HOOK_SECRET\"\n"
            );
        }
    }
}

/// The sum of `confab_redis_commands_total` (every `result`) on the instance's
/// `/metrics`, or `None` when it could not be read.
pub async fn redis_commands(ops_port: u16) -> Option<u64> {
    let body = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{ops_port}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(sum_metric(&body, "confab_redis_commands_total"))
}

/// Sums the samples of `name` (any labels) in a Prometheus text exposition.
fn sum_metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The root directory of instance `i` (instance 0 uses the run's root itself).
pub fn instance_root(root: &Path, i: usize) -> std::path::PathBuf {
    if i == 0 {
        root.to_path_buf()
    } else {
        root.join(format!("instance{i}"))
    }
}

/// Redis counters at one moment: the instances' `confab_redis_commands_total` summed
/// (`None` if one could not be scraped) and Redis's `INFO commandstats` calls.
pub struct RedisCounts {
    pub daemons: Option<u64>,
    pub server: BTreeMap<String, u64>,
}

/// Redis round trips over a run.
pub struct RedisFigures {
    /// Counted by the instances (a pipeline or a script is one round trip).
    pub daemon_round_trips: Option<u64>,
    /// Commands Redis executed, largest first (a script's inner calls count apart).
    pub server_calls: Vec<(String, u64)>,
}

impl RedisFigures {
    pub fn between(before: &RedisCounts, after: &RedisCounts) -> RedisFigures {
        RedisFigures {
            daemon_round_trips: before
                .daemons
                .zip(after.daemons)
                .map(|(b, a)| a.saturating_sub(b)),
            server_calls: command_delta(&before.server, &after.server),
        }
    }
}

/// One instance over a run.
pub struct InstanceFigures {
    pub vm_hwm: Option<u64>,
    pub settled: Option<u64>,
    pub cpu: Option<f64>,
}
