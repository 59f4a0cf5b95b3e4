//! The `confab` binary: parses the command line, sets up logging, calls into `app`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use confab::config::{self, Env, LoadOptions, LogFormat};

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
    let result = match cli.command {
        Cmd::Check { common, online } => {
            let opts = options(&common, true);
            return match load_or_report(&opts) {
                Ok(cfg) => {
                    print_warnings(&cfg);
                    if online {
                        confab::logging::init(LogFormat::Pretty, "warn", None);
                        if let Err(refused) = runtime.block_on(confab::app::verify_identities(&cfg))
                        {
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
                Err(code) => code,
            };
        }
        Cmd::Run(c) => {
            let opts = options(&c, true);
            let cfg = match load_or_report(&opts) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            confab::logging::init_config(&cfg.log, Some(cfg.env.as_str()));
            log_warnings(&cfg);
            runtime.block_on(confab::app::run(cfg, opts))
        }
        Cmd::Backup { common, out, keep } => {
            let cfg = match load_or_report(&options(&common, false)) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            confab::logging::init(LogFormat::Pretty, "warn", None);
            runtime
                .block_on(confab::app::backup(cfg, &out, keep))
                .map(|msg| println!("{msg}"))
        }
        Cmd::Restore {
            common,
            from,
            force,
        } => {
            let cfg = match load_or_report(&options(&common, false)) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            confab::logging::init(LogFormat::Pretty, "warn", None);
            runtime
                .block_on(confab::app::restore(cfg, &from, force))
                .map(|msg| println!("{msg}"))
        }
        Cmd::User { action } => {
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
            let opts = options(&common, false);
            let cfg = match load_or_report(&opts) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            confab::logging::init(LogFormat::Pretty, "warn", None);
            match runtime.block_on(confab::app::user_command(cfg, req)) {
                Ok(resp) if resp.ok => {
                    match resp.result {
                        serde_json::Value::String(s) => println!("{s}"),
                        doc => {
                            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default())
                        }
                    }
                    Ok(())
                }
                Ok(resp) => Err(anyhow::anyhow!("{}", resp.result)),
                Err(e) => Err(e),
            }
        }
        Cmd::Chat { common, bot } => {
            let opts = options(&common, false);
            let cfg = match load_or_report(&opts) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            // The terminal is for the conversation: only warnings and errors go to stderr.
            confab::logging::init(LogFormat::Pretty, "warn", None);
            runtime.block_on(confab::app::chat(cfg, bot))
        }
    };
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
