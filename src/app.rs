//! Composition root: builds the store, LLM client and engine from a validated config,
//! runs the daemon or the terminal chat, and shuts down in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use futures::FutureExt;

use crate::adapters::delivery::DeliveryStats;
use crate::adapters::discord::{self, DiscordAdapter};
use crate::adapters::supervise;
use crate::adapters::telegram::{self, TelegramAdapter};
use crate::adapters::terminal::TerminalChat;
use crate::config::{self, Config, LoadOptions};
use crate::coord::{Coordination, RedisCoordination};
use crate::engine::Engine;
use crate::events::ErrorKind;
use crate::shutdown::{self, Shutdown, Signal};
use crate::store::{Backend, SledStore, Store};

/// A poller's or gateway's run future.
type Intake = futures::future::BoxFuture<'static, ()>;

/// How often the sweeper runs (retention, cache expiry, limiter pruning).
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// The daemon may not start: a platform token belongs to another identity, or is
/// refused. `main` exits with code 2 (a configuration problem).
#[derive(Debug, thiserror::Error)]
#[error("refusing to start:\n{}", .0.join("\n"))]
pub struct Refused(pub Vec<String>);

/// Checks every platform identity against this environment's configuration
/// (`confab check --online` and the start of `confab run`).
/// Every problem is collected before refusing.
pub async fn verify_identities(cfg: &Config) -> Result<Identities, Refused> {
    let mut problems = Vec::new();
    let mut verified = Identities::default();
    for bot in cfg.bots.iter().filter(|b| b.telegram.is_some()) {
        match telegram::verify(cfg, bot).await {
            Ok(v) => verified.telegram.push(v),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for bot in cfg.bots.iter().filter(|b| b.discord.is_some()) {
        match discord::verify(cfg, bot).await {
            Ok(v) => verified.discord.push(v),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(verified)
    } else {
        Err(Refused(problems))
    }
}

/// The platform bots whose tokens were checked, per platform.
#[derive(Default)]
pub struct Identities {
    pub telegram: Vec<telegram::Verified>,
    pub discord: Vec<discord::Verified>,
}

pub struct App {
    pub engine: Arc<Engine>,
    /// Every role of the store (the engine's).
    pub store: Arc<dyn Store>,
    /// The concrete backend (sled's backups, Redis's health).
    pub backend: Backend,
    /// The adapters' delivery counters (retries, failures, panics, overflow).
    pub delivery: Arc<DeliveryStats>,
}

/// Opens the configured store (sled in `config.data_dir`, or Redis) with the data key.
/// On Redis the data dir still holds the control socket: it is created owner-only.
fn open_store(config: &Config) -> anyhow::Result<Backend> {
    let s = &config.store;
    let what = match s.backend {
        config::StoreBackend::Sled => format!("the store in {}", config.data_dir.display()),
        config::StoreBackend::Redis => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            format!(
                "the Redis store ({}, keys under {})",
                s.redis_url_env,
                s.prefix(config.env)
            )
        }
    };
    s.open(
        config.env,
        &config.data_dir,
        config.data_key.as_ref(),
        config.cache.ttl_secs,
    )
    .with_context(|| format!("opening {what}"))
}

impl App {
    /// The sled store, when that is the backend (backups, tests that read its trees).
    pub fn sled(&self) -> Option<&Arc<SledStore>> {
        self.backend.sled()
    }
}

/// `confab check` on the Redis backend: Redis answers (the URL never shown) and its
/// persistence settings, with a warning when AOF is off. `Err` when unreachable.
pub fn check_redis(config: &Config) -> anyhow::Result<Vec<String>> {
    let s = &config.store;
    let url = s
        .redis_url
        .as_ref()
        .with_context(|| format!("{} is not set", s.redis_url_env))?;
    let prefix = s.prefix(config.env);
    let store = crate::store::RedisStore::connect(crate::store::RedisOptions {
        url: url.expose().to_string(),
        prefix: prefix.clone(),
        timeout: Duration::from_millis(s.redis_timeout_ms),
        cache_ttl_secs: config.cache.ttl_secs,
        data_key: None,
    })
    .with_context(|| format!("redis (${}) is unreachable", s.redis_url_env))?;
    let settings = store
        .persistence()
        .with_context(|| format!("reading the settings of redis (${})", s.redis_url_env))?;
    let get = |k: &str| {
        settings
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let mut out = vec![format!(
        "redis: reachable (${}), keys under {prefix}, appendonly {}, appendfsync {}",
        s.redis_url_env,
        get("appendonly").unwrap_or("unknown"),
        get("appendfsync").unwrap_or("unknown"),
    )];
    match get("appendonly") {
        Some("yes") => {}
        Some(_) => out.push(
            "warning: redis: appendonly is off: a Redis crash loses every turn written since \
             its last snapshot; set `appendonly yes` (README: running several instances)"
                .into(),
        ),
        None => out.push(
            "warning: redis: CONFIG GET refused; make sure the server runs with `appendonly yes`"
                .into(),
        ),
    }
    Ok(out)
}

/// Opens the store and builds the engine. Fails with a clear message (e.g. the store is
/// locked by a running daemon, or not writable).
pub fn build(config: Config) -> anyhow::Result<App> {
    let backend = open_store(&config)?;
    let store = backend.store();
    let llm = Arc::new(config.llm.build().context("building the LLM client")?);
    let hide_ids = backend.redis().and_then(|r| r.index_key());
    let coord = coordination(&config, hide_ids)?;
    let engine = Engine::with_coordination(config, store.clone(), llm, coord);
    let engine = Arc::new(engine.context("building the engine")?);
    Ok(App {
        engine,
        store,
        backend,
        delivery: Arc::default(),
    })
}

/// Local coordination (one process), or shared through the store's Redis when
/// `[store] backend = "redis"`: rate limits, conversation ordering and the Telegram
/// polling lease, under the store's key prefix (ids in key names hashed with the
/// store's keyed hash when a data key is set).
fn coordination(
    config: &Config,
    hide_ids: Option<crate::store::crypto::IndexKey>,
) -> anyhow::Result<Coordination> {
    let store = &config.store;
    if store.backend != config::StoreBackend::Redis {
        return Ok(Coordination::local());
    }
    let url = store
        .redis_url
        .as_ref()
        .context("[store] backend = \"redis\" needs the URL in store.redis_url_env")?;
    let timeout = Duration::from_millis(store.redis_timeout_ms);
    let mut settings = RedisCoordination::new(store.prefix(config.env), timeout);
    settings.ordering.max_wait = Duration::from_secs(config.llm.queue_timeout_secs);
    settings.hide_ids = hide_ids;
    let coord = Coordination::redis_with(url.expose(), settings)
        .context("connecting to Redis for coordination")?;
    tracing::info!(
        backend = coord.backend(),
        "instances coordinate through Redis"
    );
    Ok(coord)
}

fn spawn_sweeper(engine: Arc<Engine>, shutdown: &Shutdown) {
    let token = shutdown.token.clone();
    shutdown.tracker.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            let engine = engine.clone();
            let sweep = move || {
                let report = engine.sweep();
                crate::memory::release_free_heap();
                report
            };
            match tokio::task::spawn_blocking(sweep).await {
                Ok(Ok(report)) => tracing::info!(?report, "sweep done"),
                Ok(Err(e)) => tracing::error!(error.kind = ErrorKind::StoreIo.as_str(), error = %e, "sweep failed"),
                Err(e) => tracing::error!(error.kind = ErrorKind::Panic.as_str(), error = %e, "sweep task panicked"),
            }
        }
    });
}

/// `confab run`: serve every configured bot until SIGTERM/SIGINT; SIGHUP reloads bots and prompts.
pub async fn run(config: Config, opts: LoadOptions) -> anyhow::Result<()> {
    let signals = shutdown::listen().context("installing signal handlers")?;
    serve(config, opts, signals).await
}

/// Optional hooks into an in-process daemon (tests; `confab run` uses none).
#[derive(Default)]
pub struct Hooks {
    /// Receives the ops HTTP endpoint's bound address once it listens (useful with
    /// `http.bind` on port 0).
    pub http_addr: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    /// Receives the Telegram webhook server's bound address (webhook mode only).
    pub webhook_addr: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
}

/// The daemon, driven by `control` (signals in production, a channel in tests).
pub async fn serve(
    config: Config,
    opts: LoadOptions,
    control: tokio::sync::mpsc::Receiver<Signal>,
) -> anyhow::Result<()> {
    serve_with(config, opts, control, Hooks::default()).await
}

/// [`serve`] with [`Hooks`].
pub async fn serve_with(
    config: Config,
    opts: LoadOptions,
    mut control: tokio::sync::mpsc::Receiver<Signal>,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let env = config.env;
    // Identity first: nothing is opened or started for a token of the wrong bot.
    let identities = verify_identities(&config).await?;
    let app = build(config)?;
    app.engine.set_reloader(Box::new(move || {
        config::load(&opts).map_err(|p| p.to_string())
    }));
    // Adapters are built (not started) first so readiness knows every platform.
    let (adapters, readiness) = Adapters::build(identities, &app);
    // The ops endpoint outlives intake and in-flight replies (readiness answers 503
    // meanwhile); it stops last, or when this function returns early.
    let http_stop = tokio_util::sync::CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    let http = crate::ops::http::start(
        app.engine.config().http.bind,
        app.engine.clone(),
        app.delivery.clone(),
        readiness.clone(),
        http_stop.clone(),
    )
    .await?;
    if let Some(tx) = hooks.http_addr {
        let _ = tx.send(http.addr);
    }
    let shutdown = Shutdown::new();
    let control_socket = start_control_socket(&app, &shutdown)?;
    spawn_sweeper(app.engine.clone(), &shutdown);
    // Intake (polling) stops first; replies in flight run on the tracker and finish.
    let intake = shutdown.token.child_token();
    let webhook = start_webhook(&app, &adapters, &intake, &shutdown).await?;
    if let (Some(tx), Some(w)) = (hooks.webhook_addr, &webhook) {
        let _ = tx.send(w.addr);
    }
    let mut pollers = start_intake(adapters, &intake, &shutdown, &app.delivery);
    // Drained with the pollers: it stops accepting with intake, requests in flight end.
    pollers.extend(webhook.map(|w| w.task));
    tracing::info!(%env, bots = app.engine.config().bots.len(), "confab running");
    crate::ops::notify::ready();
    crate::ops::notify::spawn_watchdog(shutdown.token.clone());
    until_stop(&app, &mut control).await;

    tracing::info!("shutting down");
    readiness.shutting_down();
    crate::ops::notify::stopping();
    drain(&app, shutdown, pollers, control_socket).await?;
    http_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(2), http.task)
        .await
        .is_err()
    {
        tracing::warn!("ops HTTP endpoint did not stop in time");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Every platform adapter, built from its verified identity but not started.
struct Adapters {
    telegram: Vec<Arc<TelegramAdapter>>,
    discord: Vec<Arc<DiscordAdapter>>,
}

impl Adapters {
    /// The adapters, and a readiness that knows each one's `connected` flag.
    fn build(identities: Identities, app: &App) -> (Adapters, Arc<crate::ops::http::Readiness>) {
        let mut readiness = crate::ops::http::Readiness::default();
        let mut adapters = Adapters {
            telegram: Vec::new(),
            discord: Vec::new(),
        };
        for v in identities.telegram {
            tracing::info!(bot = %v.name, username = ?v.me.user.username, "telegram bot verified");
            let label = format!("telegram/{}", v.name);
            let adapter = TelegramAdapter::new(v, app.engine.clone(), app.delivery.clone());
            readiness.add_platform(label, adapter.connected.clone());
            adapters.telegram.push(adapter);
        }
        for v in identities.discord {
            tracing::info!(bot = %v.name, user = %v.username, application_id = %v.application_id, "discord bot verified");
            let label = format!("discord/{}", v.name);
            let adapter = DiscordAdapter::new(v, app.engine.clone(), app.delivery.clone());
            readiness.add_platform(label, adapter.connected.clone());
            adapters.discord.push(adapter);
        }
        (adapters, Arc::new(readiness))
    }
}

/// Binds the control socket (a failure stops start-up) and serves it until shutdown.
fn start_control_socket(
    app: &App,
    shutdown: &Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = crate::ops::control::socket_path(&app.engine.config().data_dir);
    let listener = crate::ops::control::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    Ok(tokio::spawn(crate::ops::control::serve(
        app.engine.clone(),
        app.sled().cloned(),
        listener,
        path,
        shutdown.token.clone(),
    )))
}

/// Serves signals until a stop: SIGHUP reloads bots and prompts (a failed reload keeps
/// the old configuration).
async fn until_stop(app: &App, control: &mut tokio::sync::mpsc::Receiver<Signal>) {
    while let Some(sig) = control.recv().await {
        match sig {
            Signal::Reload => {
                crate::ops::notify::reloading();
                let result = app.engine.reload_now();
                crate::ops::notify::ready();
                if let Err(e) = result {
                    tracing::error!(error.kind = ErrorKind::Config.as_str(), error = %e, "reload failed; keeping the old configuration");
                }
            }
            Signal::Stop => break,
        }
    }
}

/// Ordered shutdown: intake stops, the control socket closes, replies in flight get
/// `shutdown_timeout_secs`, then the store is flushed.
async fn drain(
    app: &App,
    shutdown: Shutdown,
    pollers: Vec<tokio::task::JoinHandle<()>>,
    control_socket: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    shutdown.token.cancel();
    for p in pollers {
        let _ = p.await;
    }
    if let Err(e) = control_socket.await {
        tracing::warn!(error = %e, "control socket task failed");
    }
    shutdown.tracker.close();
    let timeout = Duration::from_secs(app.engine.config().shutdown_timeout_secs);
    if tokio::time::timeout(timeout, shutdown.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached with work in flight");
    }
    app.store.flush().await.context("flushing the store")
}

/// Telegram webhook mode: binds the one webhook server of every Telegram bot (a bind
/// failure stops start-up); `None` in polling mode or without Telegram bots.
async fn start_webhook(
    app: &App,
    adapters: &Adapters,
    intake: &tokio_util::sync::CancellationToken,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<telegram::webhook::Server>> {
    let config = app.engine.config();
    let crate::config::TelegramMode::Webhook(hook) = &config.telegram_mode else {
        return Ok(None);
    };
    if adapters.telegram.is_empty() {
        return Ok(None);
    }
    let tracker = shutdown.tracker.clone();
    let server = telegram::webhook::start(hook, &adapters.telegram, tracker, intake.clone());
    Ok(Some(server.await?))
}

/// Starts every adapter's poller / gateway under a supervisor: a task that dies is
/// restarted (its platform reads as not connected meanwhile).
fn start_intake(
    adapters: Adapters,
    intake: &tokio_util::sync::CancellationToken,
    shutdown: &Shutdown,
    stats: &Arc<DeliveryStats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let supervised = |label: String, connected, run: Box<dyn Fn() -> Intake + Send + Sync>| {
        tokio::spawn(supervise(
            label,
            connected,
            intake.clone(),
            stats.clone(),
            run,
        ))
    };
    let mut pollers = Vec::new();
    for a in adapters.telegram {
        let (label, connected) = (format!("telegram/{}", a.name()), a.connected.clone());
        let (stop, tracker) = (intake.clone(), shutdown.tracker.clone());
        let run = move || a.clone().run(stop.clone(), tracker.clone()).boxed();
        pollers.push(supervised(label, connected, Box::new(run)));
    }
    for a in adapters.discord {
        let (label, connected) = (format!("discord/{}", a.name()), a.connected.clone());
        let (stop, tracker) = (intake.clone(), shutdown.tracker.clone());
        let run = move || a.clone().run(stop.clone(), tracker.clone()).boxed();
        pollers.push(supervised(label, connected, Box::new(run)));
    }
    pollers
}

/// `confab user export|forget`: through the running daemon's control socket, or
/// directly on the store when no daemon runs.
pub async fn user_command(
    config: Config,
    req: crate::ops::control::Request,
) -> anyhow::Result<crate::ops::control::Response> {
    let path = crate::ops::control::socket_path(&config.data_dir);
    if let Some(answer) = crate::ops::control::call(&path, &req)
        .await
        .with_context(|| format!("talking to the daemon at {}", path.display()))?
    {
        return Ok(answer);
    }
    let app = build(config)?;
    let engine = app.engine.clone();
    let answer = tokio::task::spawn_blocking(move || crate::ops::control::execute(&engine, &req))
        .await
        .context("running the command")?;
    app.store.flush().await.context("flushing the store")?;
    Ok(answer)
}

/// `confab backup`: streamed from the running daemon (its control socket) or straight
/// from the store when none runs, into a private temp file that is verified (checksum
/// and every row) before it is renamed into place.
pub async fn backup(
    config: Config,
    out: &std::path::Path,
    keep: Option<usize>,
) -> anyhow::Result<String> {
    use crate::ops::backup::{self, BackupFile};
    let mut file = BackupFile::create(out, keep)?;
    if config.store.backend == config::StoreBackend::Redis {
        // Every instance shares Redis: read it directly, daemons running or not.
        let Some(store) = open_store(&config)?.redis().cloned() else {
            anyhow::bail!("the store is not on Redis");
        };
        let mut w = std::io::BufWriter::new(file.file()?.try_clone()?);
        tokio::task::spawn_blocking(move || {
            crate::ops::transfer::write_redis(&store, &mut w)?;
            std::io::Write::flush(&mut w)
                .map_err(|e| backup::BackupError::Io(format!("writing the backup: {e}")))
        })
        .await
        .context("writing the backup")??;
        return finish_backup(file).await;
    }
    let path = crate::ops::control::socket_path(&config.data_dir);
    let mut sink = tokio::fs::File::from_std(file.file()?.try_clone()?);
    let streamed = crate::ops::control::backup_into(&path, &mut sink)
        .await
        .with_context(|| format!("talking to the daemon at {}", path.display()))?;
    drop(sink);
    match streamed {
        Some(Ok(_)) => {}
        Some(Err(reason)) => anyhow::bail!("backup failed: {reason}"),
        None => {
            let Some(store) = open_store(&config)?.sled().cloned() else {
                anyhow::bail!("the store is not on sled");
            };
            let mut w = std::io::BufWriter::new(file.file()?.try_clone()?);
            tokio::task::spawn_blocking(move || {
                backup::write_store(store, &mut w)?;
                std::io::Write::flush(&mut w)
                    .map_err(|e| backup::BackupError::Io(format!("writing the backup: {e}")))
            })
            .await
            .context("writing the backup")??;
        }
    }
    finish_backup(file).await
}

async fn finish_backup(file: crate::ops::backup::BackupFile) -> anyhow::Result<String> {
    let done = tokio::task::spawn_blocking(move || file.finish())
        .await
        .context("verifying the backup")??;
    Ok(format!(
        "backup written: {} ({} rows, {} bytes, sha256 verified)",
        done.path.display(),
        done.rows,
        done.bytes
    ))
}

/// `confab restore`: refuses while a daemon runs, or into a non-empty data dir without
/// `force`; a failed restore leaves the data dir as it was.
pub async fn restore(
    config: Config,
    from: &std::path::Path,
    force: bool,
) -> anyhow::Result<String> {
    if config.store.backend == config::StoreBackend::Redis {
        return restore_redis(config, from, force).await;
    }
    let path = crate::ops::control::socket_path(&config.data_dir);
    if tokio::net::UnixStream::connect(&path).await.is_ok() {
        anyhow::bail!(
            "a confab daemon is running on {}; stop it before restoring",
            config.data_dir.display()
        );
    }
    let (from, dir) = (from.to_path_buf(), config.data_dir.clone());
    let cache_mb = config.store.cache_capacity_mb;
    let data_key = config.data_key.as_ref().map(|k| k.expose().to_string());
    let rows = tokio::task::spawn_blocking(move || {
        crate::ops::backup::restore(&from, &dir, force, cache_mb, data_key.as_deref())
    })
    .await
    .context("restoring")??;
    Ok(format!(
        "restored {rows} rows into {}",
        config.data_dir.display()
    ))
}

/// `confab restore` on Redis: into this environment's prefix (stop the instances first).
async fn restore_redis(
    config: Config,
    from: &std::path::Path,
    force: bool,
) -> anyhow::Result<String> {
    let Some(store) = open_store(&config)?.redis().cloned() else {
        anyhow::bail!("the store is not on Redis");
    };
    let from = from.to_path_buf();
    let data_key = config.data_key.as_ref().map(|k| k.expose().to_string());
    let rows = tokio::task::spawn_blocking(move || {
        crate::ops::transfer::restore_redis(&from, &store, force, data_key.as_deref())
    })
    .await
    .context("restoring")??;
    Ok(format!(
        "restored {rows} rows into Redis (keys under {})",
        config.store.prefix(config.env)
    ))
}

/// `confab migrate --to BACKEND`: copies the configured store into the other backend
/// and compares the rows of every role; an error unless they all match.
pub async fn migrate(
    config: Config,
    to: config::StoreBackend,
    force: bool,
) -> anyhow::Result<String> {
    use crate::ops::transfer;
    if to == config.store.backend {
        anyhow::bail!(
            "the store of this environment is already on {}; --to names the other backend",
            format!("{to:?}").to_lowercase()
        );
    }
    let from = open_store(&config)?;
    let (rows, text, same) = match to {
        config::StoreBackend::Redis => {
            let mut target = config.store.clone();
            target.backend = config::StoreBackend::Redis;
            let store = target
                .open(
                    config.env,
                    &config.data_dir,
                    config.data_key.as_ref(),
                    config.cache.ttl_secs,
                )
                .with_context(|| format!("opening the Redis store ({})", target.redis_url_env))?;
            let Some(redis) = store.redis().cloned() else {
                anyhow::bail!("the target is not on Redis");
            };
            let key = config.data_key.as_ref().map(|k| k.expose().to_string());
            tokio::task::spawn_blocking(move || {
                transfer::migrate_to_redis(&from, redis, force, key.as_deref())
            })
            .await
            .context("migrating")??
        }
        config::StoreBackend::Sled => {
            let (store_cfg, dir, key) = (
                config.store.clone(),
                config.data_dir.clone(),
                config.data_key.clone(),
            );
            tokio::task::spawn_blocking(move || {
                let open = |p: &std::path::Path| {
                    store_cfg
                        .open_sled(p, key.as_ref())
                        .map_err(|e| crate::ops::backup::BackupError::Io(e.to_string()))
                };
                transfer::migrate_to_sled(&from, &dir, force, &open)
            })
            .await
            .context("migrating")??
        }
    };
    if !same {
        anyhow::bail!("{text}counts differ after copying {rows} rows: the target is not complete");
    }
    Ok(format!("{text}migrated {rows} rows; every count matches"))
}

/// `confab chat`: talk to a bot in the terminal until end of input.
pub async fn chat(config: Config, bot: Option<String>) -> anyhow::Result<()> {
    let bot = match bot {
        Some(b) => b,
        None => config
            .bots
            .first()
            .map(|b| b.name.clone())
            .context("no bots configured in bots/")?,
    };
    if config.bot(&bot).is_none() {
        anyhow::bail!("no bot named {bot:?} in bots/");
    }
    let app = build(config)?;
    let user = std::env::var("USER").unwrap_or_else(|_| "local".into());
    let chat = TerminalChat {
        engine: app.engine.clone(),
        bot,
        user_id: user.clone(),
        user_name: user,
    };
    chat.run(tokio::io::stdin(), tokio::io::stdout())
        .await
        .context("terminal chat")?;
    app.store.flush().await.context("flushing the store")?;
    Ok(())
}
