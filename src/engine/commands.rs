//! The command layer: parsing and help text. Commands are a closed enum; adapters only
//! pass text through (Telegram's `/cmd@botname` suffix is stripped here).

use crate::domain::{Platform, UserRef};

/// User commands with their `/help` lines, in display order. Adapters register these
/// (setMyCommands, Discord slash commands).
pub const USER_COMMANDS: &[(&str, &str)] = &[
    ("start", "Start talking with the assistant"),
    ("help", "List the commands"),
    ("reset", "Clear this conversation's memory"),
    ("usage", "Show your limits and today's token use"),
    ("export", "Get everything stored about you as a JSON file"),
    ("forget", "Delete all your data (asks for confirmation)"),
];

/// Admin subcommands with their usage lines (shown on bad arguments and `/admin`).
pub const ADMIN_USAGE: &[(&str, &str)] = &[
    (
        "stats",
        "uptime, users, messages, outcomes, cache, LLM, latency",
    ),
    (
        "ban USER [reason]",
        "block a user (one notice, then silence)",
    ),
    ("unban USER", "lift a ban"),
    (
        "limit USER PER_MIN [DAILY_TOKENS]",
        "override a user's limits",
    ),
    ("limit USER reset", "back to the configured limits"),
    ("reset USER", "clear a user's memory in every conversation"),
    ("whois USER", "what is known about a user"),
    ("cache stats|clear", "response cache figures, or empty it"),
    ("reload", "reload prompts and bots (same as SIGHUP)"),
    (
        "maintenance on [message]|off",
        "answer non-admins with a maintenance message",
    ),
    ("audit [N]", "the last N admin actions (default 10)"),
];

/// A user named in an admin command: `tg:<id>`, `dc:<id>`, or a username: `@name` on
/// the admin's own platform, `tg:@name` / `dc:@name` on the one named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserArg {
    Ref(UserRef),
    Username {
        platform: Option<Platform>,
        name: String,
    },
}

impl std::fmt::Display for UserArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserArg::Ref(r) => write!(f, "{r}"),
            UserArg::Username {
                platform: Some(p),
                name,
            } => write!(f, "{}:@{name}", p.prefix()),
            UserArg::Username {
                platform: None,
                name,
            } => write!(f, "@{name}"),
        }
    }
}

fn user_arg(s: &str) -> Option<UserArg> {
    let (platform, rest) = match s.split_once(":@") {
        Some(("tg", name)) => (Some(Platform::Telegram), name),
        Some(("dc", name)) => (Some(Platform::Discord), name),
        Some(_) => return None,
        None => match s.strip_prefix('@') {
            Some(name) => (None, name),
            None => return s.parse().ok().map(UserArg::Ref),
        },
    };
    // Telegram: letters, digits, `_`; Discord also `.`.
    let ok = !rest.is_empty()
        && rest.len() <= 64
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    ok.then(|| UserArg::Username {
        platform,
        name: rest.to_string(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    Stats,
    Ban {
        user: UserArg,
        reason: String,
    },
    Unban {
        user: UserArg,
    },
    Limit {
        user: UserArg,
        per_minute: u32,
        daily_tokens: Option<u64>,
    },
    LimitReset {
        user: UserArg,
    },
    Reset {
        user: UserArg,
    },
    Whois {
        user: UserArg,
    },
    CacheStats,
    CacheClear,
    Reload,
    MaintenanceOn {
        message: Option<String>,
    },
    MaintenanceOff,
    Audit {
        n: usize,
    },
}

impl AdminCommand {
    /// The user the command acts on, for the audit log.
    pub fn target(&self) -> Option<&UserArg> {
        match self {
            AdminCommand::Ban { user, .. }
            | AdminCommand::Unban { user }
            | AdminCommand::Limit { user, .. }
            | AdminCommand::LimitReset { user }
            | AdminCommand::Reset { user }
            | AdminCommand::Whois { user } => Some(user),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Start,
    Help,
    Reset,
    Usage,
    Export,
    /// `/forget` asks; `/forget confirm` deletes; `/forget cancel` drops the request.
    Forget {
        confirm: Option<bool>,
    },
    /// `/admin …`; `Err(text)` carries the usage text for bad arguments.
    Admin(Result<AdminCommand, String>),
    /// A `/word` we do not know; answered with the help text.
    Unknown(String),
}

/// Parses a message starting with `/`; `None` for ordinary text.
pub fn parse(text: &str) -> Option<Command> {
    let rest = text.trim_start().strip_prefix('/')?;
    let mut words = rest.split_whitespace();
    let first = rest.split(char::is_whitespace).next().unwrap_or("");
    words.next();
    // `/help@acme_bot` → `help`
    let name = first.split('@').next().unwrap_or("").to_lowercase();
    if name.is_empty() {
        return None;
    }
    let args: Vec<&str> = words.collect();
    Some(match name.as_str() {
        "start" => Command::Start,
        "help" => Command::Help,
        "reset" => Command::Reset,
        "usage" => Command::Usage,
        "export" => Command::Export,
        "forget" => Command::Forget {
            confirm: match args.first().map(|a| a.to_lowercase()).as_deref() {
                Some("confirm" | "yes") => Some(true),
                Some("cancel" | "no") => Some(false),
                _ => None,
            },
        },
        "admin" => Command::Admin(parse_admin(&args)),
        _ => Command::Unknown(name),
    })
}

fn parse_admin(args: &[&str]) -> Result<AdminCommand, String> {
    let usage = || admin_usage();
    let user = |i: usize| args.get(i).and_then(|s| user_arg(s));
    let sub = args.first().map(|s| s.to_lowercase()).unwrap_or_default();
    let cmd = match (sub.as_str(), args.len()) {
        ("stats", 1) => AdminCommand::Stats,
        ("ban", n) if n >= 2 => AdminCommand::Ban {
            user: user(1).ok_or_else(usage)?,
            reason: args[2..].join(" "),
        },
        ("unban", 2) => AdminCommand::Unban {
            user: user(1).ok_or_else(usage)?,
        },
        ("limit", 3) if args[2].eq_ignore_ascii_case("reset") => AdminCommand::LimitReset {
            user: user(1).ok_or_else(usage)?,
        },
        ("limit", 3 | 4) => {
            let per_minute: u32 = args[2].parse().ok().filter(|n| *n > 0).ok_or_else(usage)?;
            let daily_tokens = match args.get(3) {
                Some(d) => Some(d.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(usage)?),
                None => None,
            };
            AdminCommand::Limit {
                user: user(1).ok_or_else(usage)?,
                per_minute,
                daily_tokens,
            }
        }
        ("reset", 2) => AdminCommand::Reset {
            user: user(1).ok_or_else(usage)?,
        },
        ("whois", 2) => AdminCommand::Whois {
            user: user(1).ok_or_else(usage)?,
        },
        ("cache", 2) if args[1].eq_ignore_ascii_case("stats") => AdminCommand::CacheStats,
        ("cache", 2) if args[1].eq_ignore_ascii_case("clear") => AdminCommand::CacheClear,
        ("reload", 1) => AdminCommand::Reload,
        ("maintenance", n) if n >= 2 && args[1].eq_ignore_ascii_case("on") => {
            let message = args[2..].join(" ");
            AdminCommand::MaintenanceOn {
                message: (!message.is_empty()).then_some(message),
            }
        }
        ("maintenance", 2) if args[1].eq_ignore_ascii_case("off") => AdminCommand::MaintenanceOff,
        ("audit", 1) => AdminCommand::Audit { n: 10 },
        ("audit", 2) => AdminCommand::Audit {
            n: args[1]
                .parse()
                .ok()
                .filter(|n| (1..=200).contains(n))
                .ok_or_else(usage)?,
        },
        _ => return Err(usage()),
    };
    Ok(cmd)
}

pub fn help_text() -> String {
    let mut s = String::from("Commands:\n");
    for (name, desc) in USER_COMMANDS {
        s.push_str(&format!("/{name} — {desc}\n"));
    }
    s.push_str("Anything else you write goes to the assistant.");
    s
}

pub fn admin_usage() -> String {
    let mut s = String::from(
        "Usage: /admin <command>\nUSER is tg:<id>, dc:<id>, @username (on your platform) or tg:@username / dc:@username.\n",
    );
    for (cmd, desc) in ADMIN_USAGE {
        s.push_str(&format!("/admin {cmd} — {desc}\n"));
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Platform;

    fn check(input: &str, expected: Option<Command>) {
        assert_eq!(parse(input), expected, "input {input:?}");
    }

    fn admin(input: &str) -> Result<AdminCommand, String> {
        match parse(input) {
            Some(Command::Admin(r)) => r,
            other => panic!("not an admin command: {other:?}"),
        }
    }

    #[test]
    fn parses_commands() {
        check("/start", Some(Command::Start));
        check("/help@acme_bot", Some(Command::Help));
        check("  /RESET now", Some(Command::Reset));
        check("/usage", Some(Command::Usage));
        check("/export", Some(Command::Export));
        check("/forget", Some(Command::Forget { confirm: None }));
        check(
            "/forget confirm",
            Some(Command::Forget {
                confirm: Some(true),
            }),
        );
        check(
            "/forget cancel",
            Some(Command::Forget {
                confirm: Some(false),
            }),
        );
        check("/frobnicate", Some(Command::Unknown("frobnicate".into())));
        check("hello /help", None);
        check("/", None);
        check("/ hi", None);
    }

    #[test]
    fn parses_admin_commands() {
        let tg1 = UserArg::Ref(UserRef::new(Platform::Telegram, "1"));
        assert_eq!(admin("/admin stats"), Ok(AdminCommand::Stats));
        assert_eq!(
            admin("/admin ban tg:1 spamming links"),
            Ok(AdminCommand::Ban {
                user: tg1.clone(),
                reason: "spamming links".into()
            })
        );
        assert_eq!(
            admin("/admin ban @Some_User"),
            Ok(AdminCommand::Ban {
                user: UserArg::Username {
                    platform: None,
                    name: "Some_User".into()
                },
                reason: String::new()
            })
        );
        assert_eq!(
            admin("/admin whois dc:@some.user"),
            Ok(AdminCommand::Whois {
                user: UserArg::Username {
                    platform: Some(Platform::Discord),
                    name: "some.user".into()
                },
            })
        );
        assert_eq!(
            admin("/admin limit tg:1 10 2000"),
            Ok(AdminCommand::Limit {
                user: tg1.clone(),
                per_minute: 10,
                daily_tokens: Some(2000)
            })
        );
        assert_eq!(
            admin("/admin limit tg:1 reset"),
            Ok(AdminCommand::LimitReset { user: tg1.clone() })
        );
        assert_eq!(
            admin("/admin maintenance on back at 5pm"),
            Ok(AdminCommand::MaintenanceOn {
                message: Some("back at 5pm".into())
            })
        );
        assert_eq!(
            admin("/admin maintenance off"),
            Ok(AdminCommand::MaintenanceOff)
        );
        assert_eq!(admin("/admin audit 5"), Ok(AdminCommand::Audit { n: 5 }));
        assert_eq!(admin("/admin cache clear"), Ok(AdminCommand::CacheClear));
        for bad in [
            "/admin",
            "/admin ban",
            "/admin ban xx:1",
            "/admin ban xx:@name",
            "/admin ban tg:@",
            "/admin ban @bad-name",
            "/admin limit tg:1",
            "/admin limit tg:1 zero",
            "/admin limit tg:1 0",
            "/admin audit 0",
            "/admin cache",
            "/admin frob",
            "/admin unban tg:1 extra",
        ] {
            assert!(admin(bad).is_err(), "{bad} should be a usage error");
        }
        assert!(admin("/admin nope")
            .unwrap_err()
            .contains("/admin ban USER [reason]"));
    }

    #[test]
    fn help_lists_every_command() {
        let h = help_text();
        for (name, _) in USER_COMMANDS {
            assert!(h.contains(&format!("/{name}")));
        }
    }
}
