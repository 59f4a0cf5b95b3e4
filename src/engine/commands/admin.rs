//! The `/admin` subcommands, declared once: each line of the usage text, its parsing and
//! its typed command come from one entry of [`ADMIN_COMMANDS`].

use super::args::{Arg, Bound, UserArg};
use super::Spec;

/// The `/admin` subcommands, in usage order. Several entries may share a name (forms
/// of one subcommand); the first whose arguments fit wins.
pub const ADMIN_COMMANDS: &[Spec<AdminCommand>] = &[
    sub(
        "stats",
        &[],
        "uptime, users, messages, outcomes, cache, LLM, latency",
        |_| Some(ServiceAction::Stats.into()),
    ),
    sub(
        "ban",
        &[
            Arg::User,
            Arg::Rest {
                name: "reason",
                help: "why (kept in the user's record)",
                optional: true,
            },
        ],
        "block a user (one notice, then silence)",
        |b| on_user(b, UserAction::Ban { reason: b.text(1) }),
    ),
    sub("unban", &[Arg::User], "lift a ban", |b| {
        on_user(b, UserAction::Unban)
    }),
    sub(
        "limit",
        &[
            Arg::User,
            Arg::Number {
                name: "PER_MIN",
                help: "messages per minute",
                min: 1,
                max: u32::MAX as u64,
                optional: false,
            },
            Arg::Number {
                name: "DAILY_TOKENS",
                help: "tokens per UTC day",
                min: 1,
                max: u64::MAX,
                optional: true,
            },
        ],
        "override a user's limits",
        |b| {
            let per_minute = u32::try_from(b.number(1)?).ok()?;
            let daily_tokens = b.number(2);
            on_user(
                b,
                UserAction::Limit {
                    per_minute,
                    daily_tokens,
                },
            )
        },
    ),
    sub(
        "limit",
        &[Arg::User, Arg::Word("reset")],
        "back to the configured limits",
        |b| on_user(b, UserAction::LimitReset),
    ),
    sub(
        "reset",
        &[Arg::User],
        "clear a user's memory in every conversation",
        |b| on_user(b, UserAction::Reset),
    ),
    sub("whois", &[Arg::User], "what is known about a user", |b| {
        on_user(b, UserAction::Whois)
    }),
    sub(
        "cache",
        &[Arg::Choice {
            name: "what",
            help: "stats or clear",
            choices: &[&["stats"], &["clear"]],
            optional: false,
        }],
        "response cache figures, or empty it",
        |b| {
            Some(match b.choice(0)? {
                0 => ServiceAction::CacheStats.into(),
                _ => ServiceAction::CacheClear.into(),
            })
        },
    ),
    sub(
        "reload",
        &[],
        "reload prompts and bots (same as SIGHUP)",
        |_| Some(ServiceAction::Reload.into()),
    ),
    sub(
        "maintenance",
        &[
            Arg::Word("on"),
            Arg::Rest {
                name: "message",
                help: "what non-admins are told",
                optional: true,
            },
        ],
        "answer non-admins with a maintenance message",
        |b| {
            let message = Some(b.text(1)).filter(|m| !m.is_empty());
            Some(ServiceAction::MaintenanceOn { message }.into())
        },
    ),
    sub(
        "maintenance",
        &[Arg::Word("off")],
        "answer everyone normally again",
        |_| Some(ServiceAction::MaintenanceOff.into()),
    ),
    sub(
        "audit",
        &[Arg::Number {
            name: "N",
            help: "how many entries",
            min: 1,
            max: 200,
            optional: true,
        }],
        "the last N admin actions (default 10)",
        |b| {
            let n = b.number(0).unwrap_or(AUDIT_DEFAULT) as usize;
            Some(ServiceAction::Audit { n }.into())
        },
    ),
];

/// How many audit entries `/admin audit` shows without a number.
const AUDIT_DEFAULT: u64 = 10;

/// Every admin subcommand is for operators, and answers only the operator.
const fn sub(
    name: &'static str,
    args: &'static [Arg],
    help: &'static str,
    build: fn(&Bound) -> Option<AdminCommand>,
) -> Spec<AdminCommand> {
    Spec::new(name, args, help, build).for_admins().personal()
}

fn on_user(b: &Bound, action: UserAction) -> Option<AdminCommand> {
    Some(AdminCommand::OnUser {
        user: b.user(0)?,
        action,
    })
}

/// A parsed `/admin …` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// About one user, resolved before it runs.
    OnUser { user: UserArg, action: UserAction },
    /// About the whole service.
    Service(ServiceAction),
}

impl From<ServiceAction> for AdminCommand {
    fn from(action: ServiceAction) -> Self {
        AdminCommand::Service(action)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserAction {
    Ban {
        reason: String,
    },
    Unban,
    Limit {
        per_minute: u32,
        daily_tokens: Option<u64>,
    },
    LimitReset,
    Reset,
    Whois,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAction {
    Stats,
    CacheStats,
    CacheClear,
    Reload,
    MaintenanceOn { message: Option<String> },
    MaintenanceOff,
    Audit { n: usize },
}

/// The words after `/admin`; `Err` carries the usage text.
pub fn parse(words: &[String]) -> Result<AdminCommand, String> {
    let Some((sub, rest)) = words.split_first() else {
        return Err(usage());
    };
    let sub = sub.to_lowercase();
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    ADMIN_COMMANDS
        .iter()
        .filter(|spec| spec.name == sub)
        .find_map(|spec| spec.parse(&rest))
        .ok_or_else(usage)
}

/// The usage text: shown for `/admin` alone and for bad arguments.
pub fn usage() -> String {
    let mut s = String::from(
        "Usage: /admin <command>\nUSER is tg:<id>, dc:<id>, @username (on your platform) or tg:@username / dc:@username.\n",
    );
    for spec in ADMIN_COMMANDS {
        s.push_str(&format!("/admin {} — {}\n", spec.synopsis(), spec.help));
    }
    s.trim_end().to_string()
}
