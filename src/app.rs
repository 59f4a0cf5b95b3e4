//! Composition root: builds the store, LLM client and engine from a validated config,
//! runs the daemon or the terminal chat, and shuts down in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::adapters::telegram::{self, TelegramAdapter};
use crate::adapters::terminal::TerminalChat;
use crate::config::{self, Config, LoadOptions};
use crate::engine::Engine;
use crate::llm::{OpenAiProvider, ResilientLlm, RetryPolicy};
use crate::shutdown::{self, Shutdown, Signal};
use crate::store::{SledStore, Store};

/// How often the sweeper runs (retention, cache expiry, limiter pruning).
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// The daemon may not start: a platform token belongs to another identity, or is
/// refused. `main` exits with code 2 (a configuration problem).
#[derive(Debug, thiserror::Error)]
#[error("refusing to start:\n{}", .0.join("\n"))]
pub struct Refused(pub Vec<String>);

/// Checks every platform identity against this environment's configuration
/// (`confab check --online` and the start of `confab run`).
pub async fn verify_identities(cfg: &Config) -> Result<Vec<telegram::Verified>, Refused> {
    let mut problems = Vec::new();
    let mut verified = Vec::new();
    for bot in cfg.bots.iter().filter(|b| b.telegram.is_some()) {
        match telegram::verify(cfg, bot).await {
            Ok(v) => verified.push(v),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(verified)
    } else {
        Err(Refused(problems))
    }
}

pub struct App {
    pub engine: Arc<Engine>,
    pub store: Arc<SledStore>,
}

pub fn retry_policy(cfg: &Config) -> RetryPolicy {
    let l = &cfg.llm;
    RetryPolicy {
        max_retries: l.max_retries,
        backoff_base: Duration::from_millis(l.backoff_base_ms),
        backoff_max: Duration::from_secs(10),
        retry_after_cap: Duration::from_secs(l.retry_after_cap_secs),
        timeout: Duration::from_secs(l.timeout_secs),
        breaker_failures: l.breaker_failures,
        breaker_cooldown: Duration::from_secs(l.breaker_cooldown_secs),
        max_concurrent: l.max_concurrent,
        requests_per_minute: l.requests_per_minute,
    }
}

/// Opens the store and builds the engine. Fails with a clear message (e.g. the store is
/// locked by a running daemon, or not writable).
pub fn build(config: Config) -> anyhow::Result<App> {
    let store = Arc::new(
        SledStore::open(
            &config.data_dir,
            config.store.cache_capacity_mb,
            config.store.flush_every_ms,
        )
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
    );
    let api_key = config
        .llm
        .api_key
        .as_ref()
        .map(|s| s.expose())
        .unwrap_or("");
    if api_key.is_empty() {
        tracing::warn!(env_var = %config.llm.api_key_env, "no LLM API key set; fine for local servers, not for hosted APIs");
    }
    let provider = OpenAiProvider::new(
        &config.llm.base_url,
        api_key,
        Duration::from_secs(config.llm.connect_timeout_secs),
    )
    .context("building the LLM client")?;
    let llm = Arc::new(ResilientLlm::new(Arc::new(provider), retry_policy(&config)));
    let dyn_store: Arc<dyn Store> = store.clone();
    let engine = Arc::new(Engine::new(config, dyn_store, llm).context("building the engine")?);
    Ok(App { engine, store })
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
            match tokio::task::spawn_blocking(move || engine.sweep()).await {
                Ok(Ok(report)) => tracing::info!(?report, "sweep done"),
                Ok(Err(e)) => tracing::error!(error = %e, "sweep failed"),
                Err(e) => tracing::error!(error = %e, "sweep task panicked"),
            }
        }
    });
}

/// `confab run`: serve every configured bot until SIGTERM/SIGINT; SIGHUP reloads bots and prompts.
pub async fn run(config: Config, opts: LoadOptions) -> anyhow::Result<()> {
    let signals = shutdown::listen().context("installing signal handlers")?;
    serve(config, opts, signals).await
}

/// The daemon, driven by `control` (signals in production, a channel in tests).
pub async fn serve(
    config: Config,
    opts: LoadOptions,
    mut control: tokio::sync::mpsc::Receiver<Signal>,
) -> anyhow::Result<()> {
    let env = config.env;
    // Identity first: nothing is opened or started for a token of the wrong bot.
    let telegram_bots = verify_identities(&config).await?;
    let app = build(config)?;
    let shutdown = Shutdown::new();
    spawn_sweeper(app.engine.clone(), &shutdown);
    // Intake (polling) stops first; replies in flight run on the tracker and finish.
    let intake = shutdown.token.child_token();
    let mut pollers = Vec::new();
    for v in telegram_bots {
        tracing::info!(bot = %v.name, username = ?v.me.user.username, "telegram bot verified");
        let adapter = TelegramAdapter::new(v, app.engine.clone());
        pollers.push(tokio::spawn(
            adapter.run(intake.clone(), shutdown.tracker.clone()),
        ));
    }
    tracing::info!(%env, bots = app.engine.config().bots.len(), "confab running");

    while let Some(sig) = control.recv().await {
        match sig {
            Signal::Reload => match config::load(&opts) {
                Ok(new) => {
                    if let Err(e) = app.engine.reload(new) {
                        tracing::error!(error = %e, "reload failed; keeping the old configuration");
                    }
                }
                Err(problems) => {
                    tracing::error!(%problems, "reload failed; keeping the old configuration")
                }
            },
            Signal::Stop => break,
        }
    }
    tracing::info!("shutting down");
    shutdown.token.cancel();
    for p in pollers {
        let _ = p.await;
    }
    shutdown.tracker.close();
    let timeout = Duration::from_secs(app.engine.config().shutdown_timeout_secs);
    if tokio::time::timeout(timeout, shutdown.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached with work in flight");
    }
    app.store.flush().await.context("flushing the store")?;
    tracing::info!("stopped");
    Ok(())
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
