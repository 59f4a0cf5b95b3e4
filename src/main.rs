//! The `confab` binary: parses the command line, sets up logging, calls into `app`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use confab::config::{self, Env, LoadOptions, LogFormat};
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

fn options(c: &Common, require_platform_tokens: bool) -> LoadOptions {
    LoadOptions {
        root: c.root.clone(),
        env: c.env,
        env_file: c.env_file.clone(),
        require_platform_tokens,
    }
}

fn load_or_report(opts: &LoadOptions) -> Result<config::Config, ExitCode> {
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

/// `check` prints warnings (they do not fail it); `run` logs them once logging is up.
fn print_warnings(cfg: &config::Config) {
    for w in config::warnings(cfg) {
        eprintln!("warning: {w}");
    }
}

fn log_warnings(cfg: &config::Config) {
    for w in config::warnings(cfg) {
        tracing::warn!(file = %w.file, key = %w.key, "{}", w.message);
    }
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

fn check(common: &Common, online: bool, runtime: &Runtime) -> ExitCode {
    let cfg = match load_or_report(&options(common, true)) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    print_warnings(&cfg);
    if online {
        confab::logging::init(LogFormat::Pretty, "warn", None);
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
    ExitCode::SUCCESS
}

fn run(common: &Common, runtime: &Runtime) -> ExitCode {
    let opts = options(common, true);
    let cfg = match load_or_report(&opts) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    confab::logging::init_config(&cfg.log, Some(cfg.env.as_str()));
    log_warnings(&cfg);
    finish(runtime.block_on(confab::app::run(cfg, opts)))
}

fn user(action: UserAction, runtime: &Runtime) -> ExitCode {
    use confab::ops::control::Request;
    let (req, common, user) = match action {
        UserAction::Export { user, common } => {
            (Request::Export { user: user.clone() }, common, user)
        }
        UserAction::Forget { user, common } => {
            (Request::Forget { user: user.clone() }, common, user)
        }
    };
    if let Err(e) = user.parse::<confab::domain::UserRef>() {
        eprintln!("confab: {e}");
        return ExitCode::from(2);
    }
    let cfg = match load_or_report(&options(&common, false)) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    confab::logging::init(LogFormat::Pretty, "warn", None);
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

/// `backup`, `restore` and `chat`: the store tools, logging only warnings.
enum Tool {
    Backup { out: PathBuf, keep: Option<usize> },
    Restore { from: PathBuf, force: bool },
    Chat { bot: Option<String> },
}

fn tool(common: &Common, tool: Tool, runtime: &Runtime) -> ExitCode {
    let cfg = match load_or_report(&options(common, false)) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    // chat: the terminal is for the conversation; only warnings and errors go to stderr.
    confab::logging::init(LogFormat::Pretty, "warn", None);
    let say = |msg: String| println!("{msg}");
    finish(runtime.block_on(async move {
        match tool {
            Tool::Backup { out, keep } => confab::app::backup(cfg, &out, keep).await.map(say),
            Tool::Restore { from, force } => confab::app::restore(cfg, &from, force).await.map(say),
            Tool::Chat { bot } => confab::app::chat(cfg, bot).await,
        }
    }))
}

fn main() -> ExitCode {
    // Before anything is created: the store, the control socket and backups are the
    // owner's alone (0700 directories, 0600 files), also outside systemd's UMask=.
    confab::ops::restrict_umask();
    confab::memory::limit_arenas(2);
    let cli = Cli::parse();
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
    match cli.command {
        Cmd::Check { common, online } => check(&common, online, &runtime),
        Cmd::Run(common) => run(&common, &runtime),
        Cmd::User { action } => user(action, &runtime),
        Cmd::Backup { common, out, keep } => tool(&common, Tool::Backup { out, keep }, &runtime),
        Cmd::Restore {
            common,
            from,
            force,
        } => tool(&common, Tool::Restore { from, force }, &runtime),
        Cmd::Chat { common, bot } => tool(&common, Tool::Chat { bot }, &runtime),
    }
}
