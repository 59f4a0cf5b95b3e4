//! Builds a confab root (config, bots, prompts) in a temp dir pointed at a fake LLM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use confab::app::{self, App};
use confab::config::{self, Env, LoadOptions};
use confab::domain::{Content, Inbound, Platform, Reply};

pub const PROMPT: &str = "You are {{bot_name}}, helping {{user_name}} on {{platform}}.";

/// A confab root directory; `settings` is appended to config/staging.toml.
pub struct Root {
    pub dir: tempfile::TempDir,
}

impl Root {
    pub fn new(base_url: &str, settings: &str) -> Root {
        Self::with_bot(base_url, settings, "prompt = \"assistant\"\n")
    }

    pub fn with_bot(base_url: &str, settings: &str, bot_toml: &str) -> Root {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for sub in ["config", "bots", "prompts"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        let data = root.join("data");
        let toml = format!(
            "data_dir = {data:?}\n{settings}\n",
            data = data.display().to_string()
        );
        // Insert base_url into an [llm] section, creating one if the settings lack it.
        let toml = if toml.contains("[llm]") {
            toml.replace(
                "[llm]",
                &format!("[llm]\nbase_url = {base_url:?}\nbackoff_base_ms = 10"),
            )
        } else {
            format!("{toml}\n[llm]\nbase_url = {base_url:?}\nbackoff_base_ms = 10\n")
        };
        // Port 0: tests run daemons side by side, each on its own ops endpoint.
        let toml = if toml.contains("[http]") {
            toml
        } else {
            format!("{toml}\n[http]\nbind = \"127.0.0.1:0\"\n")
        };
        std::fs::write(root.join("config/staging.toml"), toml).expect("write config");
        std::fs::write(root.join("bots/assistant.toml"), bot_toml).expect("write bot");
        std::fs::write(root.join("prompts/assistant.md"), PROMPT).expect("write prompt");
        Root { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            root: self.path().to_path_buf(),
            env: Env::Staging,
            env_file: Some(self.env_file()),
            require_platform_tokens: false,
        }
    }

    /// An empty secrets file so the developer's own environment files never leak in.
    pub fn env_file(&self) -> PathBuf {
        let p = self.path().join(".env.test");
        if !p.exists() {
            std::fs::write(&p, "").expect("write env file");
        }
        p
    }

    pub fn build(&self) -> App {
        let cfg = config::load(&self.options()).unwrap_or_else(|p| panic!("config problems:\n{p}"));
        app::build(cfg).expect("build app")
    }
}

static UPDATE: AtomicU64 = AtomicU64::new(1);

/// A private text message from a Telegram-like user, with a fresh update id.
pub fn msg(user: &str, text: &str) -> Inbound {
    Inbound {
        bot: "assistant".into(),
        platform: Platform::Telegram,
        update_id: Some(UPDATE.fetch_add(1, Ordering::Relaxed).to_string()),
        chat_id: user.into(),
        user_id: user.into(),
        user_name: format!("User{user}"),
        username: None,
        is_private: true,
        forwarded: false,
        content: Content::Text(text.into()),
    }
}

/// The reply text, or "<silent>".
pub fn text(reply: &Reply) -> String {
    reply.as_text().unwrap_or("<silent>").to_string()
}

pub const TG_TOKEN: &str = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
pub const TG_BOT_TOML: &str = "prompt = \"assistant\"\n[telegram]\ntoken_env = \"ASSISTANT_TELEGRAM_TOKEN\"\nusername = { staging = \"acme_staging_bot\", production = \"acme_bot\" }\n";

/// Settings that point the Telegram client at a fake and lift outbound throttling
/// (the fake has no limits; throttling has its own tests).
pub fn tg_settings(api_url: &str, extra: &str) -> String {
    format!(
        "{extra}\n[telegram]\napi_url = {api_url:?}\nglobal_per_second = 10000\nper_chat_per_minute = 6000\ngroup_per_minute = 6000\n"
    )
}

impl Root {
    /// A root whose bot runs on Telegram with `TG_TOKEN` (in the env file).
    pub fn telegram(llm_url: &str, tg_url: &str, extra: &str, bot_toml: &str) -> Root {
        let root = Root::with_bot(llm_url, &tg_settings(tg_url, extra), bot_toml);
        std::fs::write(
            root.path().join(".env.test"),
            format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\n"),
        )
        .expect("write env file");
        root
    }

    pub fn tg_options(&self) -> LoadOptions {
        LoadOptions {
            require_platform_tokens: true,
            ..self.options()
        }
    }
}

/// The daemon running in-process; `stop()` ends it like SIGTERM.
pub struct Daemon {
    pub control: tokio::sync::mpsc::Sender<confab::shutdown::Signal>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub fn start(root: &Root) -> Daemon {
        let opts = root.tg_options();
        let cfg = config::load(&opts).unwrap_or_else(|p| panic!("config problems:\n{p}"));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(app::serve(cfg, opts, rx));
        Daemon { control: tx, task }
    }

    /// Starts the daemon in-process and returns it with its ops endpoint's address.
    pub async fn start_with_ops(root: &Root) -> (Daemon, std::net::SocketAddr) {
        let opts = root.tg_options();
        let cfg = config::load(&opts).unwrap_or_else(|p| panic!("config problems:\n{p}"));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let hooks = app::Hooks {
            http_addr: Some(addr_tx),
            ..Default::default()
        };
        let task = tokio::spawn(app::serve_with(cfg, opts, rx, hooks));
        let addr = tokio::time::timeout(std::time::Duration::from_secs(30), addr_rx)
            .await
            .expect("ops endpoint listening in time")
            .expect("daemon reported its ops address");
        (Daemon { control: tx, task }, addr)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.control.send(confab::shutdown::Signal::Stop).await;
        self.task.await.expect("daemon task")
    }
}

pub const DC_TOKEN: &str = "MTAwMDAwMDAwMDAwMDAwMDAw.GfAkEd.discord-test-token_0123456789abcdef";
/// The bot's user id and the staging / production application ids in the Discord tests.
pub const DC_BOT_ID: u64 = 1000;
pub const DC_APP_STAGING: u64 = 4000;
pub const DC_APP_PRODUCTION: u64 = 4001;
pub const DC_BOT_TOML: &str = "prompt = \"assistant\"\n[discord]\ntoken_env = \"ASSISTANT_DISCORD_TOKEN\"\napplication_id = { staging = \"4000\", production = \"4001\" }\n";

/// Settings that point the Discord client at a fake (serenity's rate limiter is then
/// off) and lift our outbound throttling.
pub fn dc_settings(api_url: &str, extra: &str) -> String {
    format!(
        "{extra}\n[discord]\napi_url = {api_url:?}\nglobal_per_second = 10000\nper_chat_per_minute = 6000\ngroup_per_minute = 6000\n"
    )
}

impl Root {
    /// A root whose bot runs on Discord with `DC_TOKEN` (in the env file).
    pub fn discord(llm_url: &str, dc_url: &str, extra: &str, bot_toml: &str) -> Root {
        let root = Root::with_bot(llm_url, &dc_settings(dc_url, extra), bot_toml);
        std::fs::write(
            root.path().join(".env.test"),
            format!("ASSISTANT_DISCORD_TOKEN={DC_TOKEN}\n"),
        )
        .expect("write env file");
        root
    }

    /// A root whose one bot runs on Telegram and Discord at once.
    pub fn telegram_and_discord(llm_url: &str, tg_url: &str, dc_url: &str) -> Root {
        let settings = dc_settings(dc_url, &tg_settings(tg_url, ""));
        let bot = format!(
            "{TG_BOT_TOML}{}",
            DC_BOT_TOML.trim_start_matches("prompt = \"assistant\"\n")
        );
        let root = Root::with_bot(llm_url, &settings, &bot);
        std::fs::write(
            root.path().join(".env.test"),
            format!("ASSISTANT_TELEGRAM_TOKEN={TG_TOKEN}\nASSISTANT_DISCORD_TOKEN={DC_TOKEN}\n"),
        )
        .expect("write env file");
        root
    }
}

/// Waits up to `limit` for a child process to exit; kills it and returns `None` after.
pub fn wait_exit(child: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Store rows as `(tree, "key => value")` text, for scans of what is stored.
pub fn rows_as_text(rows: Vec<confab::store::sled_store::DumpRow>) -> Vec<(String, String)> {
    rows.into_iter()
        .map(|(tree, k, v)| {
            let row = format!(
                "{} => {}",
                String::from_utf8_lossy(&k),
                String::from_utf8_lossy(&v)
            );
            (tree, row)
        })
        .collect()
}

/// `confab user export USER` through the real binary (reaches a running daemon through
/// its control socket).
pub async fn cli_export(root: &Root, user: &str) -> std::process::Output {
    let (r, env_file, user) = (root.path().to_path_buf(), root.env_file(), user.to_string());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .args(["user", "export", &user, "--env", "staging", "--root"])
            .arg(&r)
            .arg("--env-file")
            .arg(&env_file)
            .output()
            .expect("run confab")
    })
    .await
    .expect("export task")
}

/// Which store a test runs on: the same test bodies run on both (see
/// [`on_both_backends`]).
pub enum Backend {
    Sled,
    /// A real `redis-server` of the test's own, stopped when the test ends.
    Redis(crate::redis_server::RedisServer),
}

impl Backend {
    /// A fresh `redis-server` on a free loopback port.
    pub fn redis() -> Backend {
        Backend::Redis(crate::redis_server::RedisServer::start())
    }
}

impl Root {
    /// [`Root::new`] on `backend`.
    pub fn on(backend: &Backend, base_url: &str, settings: &str) -> Root {
        let root = Root::new(base_url, settings);
        root.use_backend(backend);
        root
    }

    /// Points the root's store at `backend`: for Redis, `[store] backend = "redis"`
    /// appended to config/staging.toml and the URL added to `.env.test` (call it after
    /// anything that rewrites the env file).
    pub fn use_backend(&self, backend: &Backend) {
        if let Backend::Redis(server) = backend {
            self.use_redis(server);
        }
    }

    /// See [`Root::use_backend`].
    pub fn use_redis(&self, server: &crate::redis_server::RedisServer) {
        use std::io::Write;
        let append = |path: PathBuf, text: String| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .expect("open for append");
            f.write_all(text.as_bytes()).expect("append");
        };
        append(
            self.path().join("config/staging.toml"),
            "\n[store]\nbackend = \"redis\"\nredis_timeout_ms = 1500\n".into(),
        );
        append(
            self.env_file(),
            format!("\nCONFAB_REDIS_URL={}\n", server.url()),
        );
    }
}

/// Runs each named `async fn NAME(backend: &Backend)` as two tests, `NAME::sled` and
/// `NAME::redis` (a real `redis-server` of its own, on tokio's multi-thread runtime,
/// which the Redis store's blocking bridge needs).
macro_rules! on_both_backends {
    (multi_thread: $($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                super::$name(&crate::harness::Backend::Sled).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let backend = crate::harness::Backend::redis();
                super::$name(&backend).await
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sled() {
                super::$name(&crate::harness::Backend::Sled).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let backend = crate::harness::Backend::redis();
                super::$name(&backend).await
            }
        }
    )*};
}
pub(crate) use on_both_backends;

/// Everything stored, as `(where, "key => value")` text: sled's trees (values
/// decrypted), or every Redis key with its whole value as `redis-cli` prints it.
pub fn stored_text(app: &App, backend: &Backend) -> Vec<(String, String)> {
    match backend {
        Backend::Sled => rows_as_text(app.sled().expect("sled").dump_open().expect("dump")),
        Backend::Redis(server) => redis_text(server),
    }
}

/// Every key of a Redis server with its value, read with `redis-cli` (so the test sees
/// what an operator would).
pub fn redis_text(server: &crate::redis_server::RedisServer) -> Vec<(String, String)> {
    let keys = server.cli(&["--scan"]);
    let mut out = Vec::new();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let value = match server.cli(&["TYPE", key]).as_str() {
            "string" => server.cli(&["--raw", "GET", key]),
            "list" => server.cli(&["--raw", "LRANGE", key, "0", "-1"]),
            "hash" => server.cli(&["--raw", "HGETALL", key]),
            "set" => server.cli(&["--raw", "SMEMBERS", key]),
            "zset" => server.cli(&["--raw", "ZRANGE", key, "0", "-1", "WITHSCORES"]),
            "stream" => server.cli(&["--raw", "XRANGE", key, "-", "+"]),
            other => format!("<{other}>"),
        };
        out.push(("redis".to_string(), format!("{key} => {value}")));
    }
    out
}

/// `confab ARGS --env staging --root ROOT --env-file ROOT/.env.test`, run to its end.
pub fn confab_cli(root: &Root, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .args(["--env", "staging", "--root"])
        .arg(root.path())
        .arg("--env-file")
        .arg(root.env_file())
        .output()
        .expect("run confab")
}

/// Calls of `method` (lowercased) that reached the fake through `/via/<via>`: which
/// instance made them.
pub fn calls_via(tg: &crate::fake_telegram::FakeTelegram, method: &str, via: &str) -> usize {
    tg.calls()
        .iter()
        .filter(|c| c.method == method && c.via.as_deref() == Some(via))
        .count()
}

/// Waits until `cond` holds; fails naming `what` after a generous 120 s.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
