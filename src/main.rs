//! The `confab` binary: parses the command line, loads the config and starts logging
//! (once, for every command), then hands the command to `app`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use confab::config::{self, Config, Env, LoadOptions, LogFormat};
use tokio::runtime::Runtime;

#[derive(Parser)]
#[command(
    name = "confab",
    version,
    about = "Telegram and Discord bots on one LLM conversation engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Environment: staging or production.
    #[arg(long)]
    env: Env,
    /// Directory holding config/, bots/, prompts/ and .env.<env>.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Secrets file to load instead of <root>/.env.<env>.
    #[arg(long)]
    env_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run(Common),
    /// Validate config, bots, prompts and secrets; print every problem; exit 2 on any.
    Check {
        #[command(flatten)]
        common: Common,
        /// Also ask each platform who every token belongs to (getMe, /users/@me).
        #[arg(long)]
        online: bool,
    },
    /// Write a consistent, checksummed backup of the store (works while the daemon runs).
    Backup {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        out: PathBuf,
        /// Name each backup by time next to --out and keep only the newest N.
        #[arg(long)]
        keep: Option<usize>,
    },
    /// Restore a backup into an empty data dir (verifies the checksum first).
    Restore {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        from: PathBuf,
        /// Replace a non-empty data dir.
        #[arg(long)]
        force: bool,
    },
    /// Copy the store into the other backend (sled in the data dir or Redis at the
    /// configured URL) and compare the rows of every role; stop the daemons first.
    Migrate {
        #[command(flatten)]
        common: Common,
        /// The backend to copy into: the one the config does not use.
        #[arg(long, value_enum)]
        to: Target,
        /// Replace a non-empty target (sled: the data dir; Redis: this prefix's keys).
        #[arg(long)]
        force: bool,
    },
    /// A user's data: `export` prints it as JSON; `forget` deletes it. Works with or
    /// without a running daemon.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Chat with a bot in the terminal (same engine, memory, limits and cache; no platform token).
    Chat {
        #[command(flatten)]
        common: Common,
        /// Bot name (file stem in bots/); default: the first bot.
        #[arg(long)]
        bot: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Target {
    Redis,
    Sled,
}

#[derive(Subcommand)]
enum UserAction {
    /// Print everything stored about USER (tg:<id> or dc:<id>) as JSON.
    Export {
        user: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete everything stored about USER.
    Forget {
        user: String,
        #[command(flatten)]
        common: Common,
    },
}

impl Cmd {
    fn common(&self) -> &Common {
        match self {
            Cmd::Run(common)
            | Cmd::Check { common, .. }
            | Cmd::Backup { common, .. }
            | Cmd::Restore { common, .. }
            | Cmd::Migrate { common, .. }
            | Cmd::Chat { common, .. }
            | Cmd::User {
                action: UserAction::Export { common, .. } | UserAction::Forget { common, .. },
            } => common,
        }
    }

    /// What to load: `run` and `check` talk to the platforms, so they need every token.
    fn options(&self) -> LoadOptions {
        let c = self.common();
        LoadOptions {
            root: c.root.clone(),
            env: c.env,
            env_file: c.env_file.clone(),
            require_platform_tokens: matches!(self, Cmd::Run(_) | Cmd::Check { .. }),
        }
    }

    /// Arguments clap cannot check; a bad one is exit 2 before anything is read.
    fn check_args(&self) -> Result<(), String> {
        match self {
            Cmd::User {
                action: UserAction::Export { user, .. } | UserAction::Forget { user, .. },
            } => user
                .parse::<confab::domain::UserRef>()
                .map(drop)
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }
}

fn load_or_report(opts: &LoadOptions) -> Result<Config, ExitCode> {
    config::load(opts).map_err(|problems| {
        for p in &problems.0 {
            eprintln!("{p}");
        }
        eprintln!(
            "confab: {} configuration problem(s); nothing started",
            problems.0.len()
        );
        ExitCode::from(2)
    })
}

/// Logging, once for every command: `run` logs as `[log]` says; the others are terminal
/// tools that log only warnings and errors, to stderr (`chat` keeps the terminal for the
/// conversation). Config warnings do not fail anything: `check` prints them as its
/// output, `run` logs them. `run` and `chat` export traces when `[otel]` or the
/// `OTEL_*` variables say so; the returned pipeline is flushed at exit.
fn start_logging(cmd: &Cmd, cfg: &Config) -> Option<confab::telemetry::Traces> {
    let warnings = config::warnings(cfg);
    let traced = matches!(cmd, Cmd::Run(_) | Cmd::Chat { .. });
    let (traces, tracer, failed) = match traced.then(|| confab::telemetry::start(cfg)) {
        Some(Ok(Some((traces, tracer)))) => (Some(traces), Some(tracer), None),
        Some(Err(e)) => (None, None, Some(e)),
        Some(Ok(None)) | None => (None, None, None),
    };
    let on = tracer.is_some();
    match cmd {
        Cmd::Run(_) => {
            confab::logging::init_config(&cfg.log, Some(cfg.env.as_str()), tracer);
            for w in warnings {
                tracing::warn!(file = %w.file, key = %w.key, "{}", w.message);
            }
        }
        Cmd::Check { .. } => {
            confab::logging::init(LogFormat::Pretty, "warn", None, None);
            for w in warnings {
                eprintln!("warning: {w}");
            }
        }
        _ => confab::logging::init(LogFormat::Pretty, "warn", None, tracer),
    }
    if let Some(e) = failed {
        tracing::warn!(error = %e, "OpenTelemetry traces are off");
    } else if on {
        tracing::info!(
            sample_ratio = cfg.otel.sample_ratio,
            "OpenTelemetry traces on"
        );
    }
    traces
}

/// Exit code of a command's outcome: a refused start is a configuration problem (2),
/// anything else a runtime failure (1).
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<confab::app::Refused>() => {
            eprintln!("confab: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("confab: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check(cfg: Config, online: bool, runtime: &Runtime) -> ExitCode {
    if online {
        if let Err(refused) = runtime.block_on(confab::app::verify_identities(&cfg)) {
            for p in &refused.0 {
                eprintln!("{p}");
            }
            return ExitCode::from(2);
        }
    }
    println!(
        "configuration OK: env {}, {} bot(s), {} prompt(s)",
        cfg.env,
        cfg.bots.len(),
        cfg.prompts.len()
    );
    if cfg.store.backend == confab::config::StoreBackend::Redis {
        // The store's calls block on Redis: they run on a runtime worker, off `block_on`.
        let probe = {
            let cfg = cfg.clone();
            runtime.block_on(async move {
                tokio::task::spawn(async move { confab::app::check_redis(&cfg) }).await
            })
        };
        match probe {
            Ok(Ok(lines)) => lines.iter().for_each(|l| println!("{l}")),
            Ok(Err(e)) => {
                eprintln!("confab: {e:#}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("confab: checking redis: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `user export|forget`: the answer on stdout, a refusal (the daemon's reason) as an error.
fn user(cfg: Config, action: UserAction, runtime: &Runtime) -> ExitCode {
    use confab::ops::control::Request;
    let req = match action {
        UserAction::Export { user, .. } => Request::Export { user },
        UserAction::Forget { user, .. } => Request::Forget { user },
    };
    let text = |v: serde_json::Value| match v {
        serde_json::Value::String(s) => s,
        doc => serde_json::to_string_pretty(&doc).unwrap_or_default(),
    };
    finish(
        match runtime.block_on(confab::app::user_command(cfg, req)) {
            Ok(resp) if resp.ok => {
                println!("{}", text(resp.result));
                Ok(())
            }
            Ok(resp) => Err(anyhow::anyhow!("{}", text(resp.result))),
            Err(e) => Err(e),
        },
    )
}

/// Runs the command on a loaded config, with logging started.
fn dispatch(cmd: Cmd, cfg: Config, opts: LoadOptions, runtime: &Runtime) -> ExitCode {
    let say = |msg: String| println!("{msg}");
    match cmd {
        Cmd::Check { online, .. } => check(cfg, online, runtime),
        Cmd::User { action } => user(cfg, action, runtime),
        Cmd::Run(_) => finish(runtime.block_on(confab::app::run(cfg, opts))),
        Cmd::Backup { out, keep, .. } => finish(
            runtime
                .block_on(confab::app::backup(cfg, &out, keep))
                .map(say),
        ),
        Cmd::Restore { from, force, .. } => finish(
            runtime
                .block_on(confab::app::restore(cfg, &from, force))
                .map(say),
        ),
        Cmd::Migrate { to, force, .. } => {
            let to = match to {
                Target::Redis => config::StoreBackend::Redis,
                Target::Sled => config::StoreBackend::Sled,
            };
            finish(
                runtime
                    .block_on(confab::app::migrate(cfg, to, force))
                    .map(say),
            )
        }
        Cmd::Chat { bot, .. } => finish(runtime.block_on(confab::app::chat(cfg, bot))),
    }
}

fn main() -> ExitCode {
    // Before anything is created: the store, the control socket and backups are the
    // owner's alone (0700 directories, 0600 files), also outside systemd's UMask=.
    confab::ops::restrict_umask();
    confab::memory::limit_arenas(2);
    let cli = Cli::parse();
    if let Err(e) = cli.command.check_args() {
        eprintln!("confab: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("confab: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = cli.command.options();
    let cfg = match load_or_report(&opts) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let traces = start_logging(&cli.command, &cfg);
    let code = dispatch(cli.command, cfg, opts, &runtime);
    // After a graceful stop: the last spans leave before the process exits.
    if let Some(traces) = traces {
        traces.shutdown();
    }
    code
}
