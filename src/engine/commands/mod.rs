//! Every command, declared once ([`COMMANDS`], [`ADMIN_COMMANDS`]): its name, arguments,
//! help, who may run it and who may read its answer. Parsing, `/help`, the admin usage
//! text, the platforms' registration (Telegram's menu, Discord's slash commands) and
//! each answer's visibility derive from these tables; `run.rs` executes what they parse.
//! Adapters only pass text through (Telegram's `/cmd@botname` suffix is stripped here).

mod admin;
mod args;
mod run;

pub use admin::{
    parse as parse_admin, usage as admin_usage, AdminCommand, ServiceAction, UserAction,
    ADMIN_COMMANDS,
};
pub use args::{Arg, Bound, UserArg};

use args::bind;

use crate::domain::Visibility;

/// Who may run a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone. A user never gets a usage error: words that do not fit are ignored.
    User,
    /// Operators listed in `admins`; anyone else is refused (and audited). Bad
    /// arguments get the usage text.
    Admin,
}

/// One command as users and operators see it.
pub struct Spec<T: 'static> {
    pub name: &'static str,
    pub args: &'static [Arg],
    /// The `/help` (or usage) line, the menu entry, the slash command's description.
    pub help: &'static str,
    pub access: Access,
    /// Who may read its answer, refusals included.
    pub visibility: Visibility,
    /// The typed command from the matched arguments.
    build: fn(&Bound) -> Option<T>,
}

impl<T> Spec<T> {
    /// A command anyone may run, answered where it was asked.
    const fn new(
        name: &'static str,
        args: &'static [Arg],
        help: &'static str,
        build: fn(&Bound) -> Option<T>,
    ) -> Self {
        Spec {
            name,
            args,
            help,
            access: Access::User,
            visibility: Visibility::Public,
            build,
        }
    }

    /// Only operators may run it.
    const fn for_admins(self) -> Self {
        Spec {
            access: Access::Admin,
            ..self
        }
    }

    /// Only the asker may read its answer.
    const fn personal(self) -> Self {
        Spec {
            visibility: Visibility::Personal,
            ..self
        }
    }

    /// `name ARG…` as the usage text shows it.
    pub fn synopsis(&self) -> String {
        std::iter::once(self.name.to_string())
            .chain(self.args.iter().map(Arg::usage))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The command the words after its name make, if they fit its arguments.
    pub fn parse(&self, words: &[&str]) -> Option<T> {
        bind(self.args, words, self.access == Access::Admin).and_then(|b| (self.build)(&b))
    }
}

impl<T> std::fmt::Debug for Spec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.synopsis())
    }
}

/// Two declarations are the same command when they read the same.
impl<T> PartialEq for Spec<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.name, self.args, self.help) == (other.name, other.args, other.help)
    }
}

impl<T> Eq for Spec<T> {}

/// The commands, in `/help` order.
pub const COMMANDS: &[Spec<Action>] = &[
    Spec::new("start", &[], "Start talking with the assistant", |_| {
        Some(Action::Start)
    }),
    Spec::new("help", &[], "List the commands", |_| Some(Action::Help)),
    Spec::new("reset", &[], "Clear this conversation's memory", |_| {
        Some(Action::Reset)
    }),
    Spec::new(
        "usage",
        &[],
        "Show your limits and today's token use",
        |_| Some(Action::Usage),
    )
    .personal(),
    Spec::new(
        "export",
        &[],
        "Get everything stored about you as a JSON file",
        |_| Some(Action::Export),
    )
    .personal(),
    Spec::new(
        "forget",
        &[Arg::Choice {
            name: "answer",
            help: "confirm or cancel a deletion you asked for",
            choices: &[&["confirm", "yes"], &["cancel", "no"]],
            optional: true,
        }],
        "Delete all your data (asks for confirmation)",
        |b| {
            Some(Action::Forget {
                confirm: b.choice(0).map(|c| c == 0),
            })
        },
    )
    .personal(),
    Spec::new(
        "admin",
        &[Arg::Rest {
            name: "command",
            help: "e.g. stats, ban dc:123 spam, maintenance on",
            optional: true,
        }],
        "Operator commands (admins only)",
        |b| Some(Action::Admin(parse_admin(b.words(0)))),
    )
    .for_admins()
    .personal(),
];

/// Not a command: where a platform offers slash commands only (Discord), `/ask`
/// carries an ordinary message, its argument. Registered there, never parsed.
pub const ASK: Spec<Action> = Spec::new(
    "ask",
    &[Arg::Rest {
        name: "prompt",
        help: "Your message",
        optional: false,
    }],
    "Ask the assistant",
    |_| None,
);

/// The commands every user may run: `/help` lists them, Telegram's menu shows them.
pub fn user_commands() -> impl Iterator<Item = &'static Spec<Action>> {
    COMMANDS.iter().filter(|s| s.access == Access::User)
}

/// What a platform with slash commands registers: every command, and [`ASK`].
pub fn slash_commands() -> impl Iterator<Item = &'static Spec<Action>> {
    COMMANDS.iter().chain(std::iter::once(&ASK))
}

/// What a declared command was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A declared command and what it was asked.
    Run(&'static Spec<Action>, Action),
    /// A `/word` nobody declared; answered with the help text.
    Unknown(String),
}

/// Parses a message starting with `/`; `None` for ordinary text.
pub fn parse(text: &str) -> Option<Command> {
    let rest = text.trim_start().strip_prefix('/')?;
    let first = rest.split(char::is_whitespace).next().unwrap_or("");
    // `/help@acme_bot` → `help`
    let name = first.split('@').next().unwrap_or("").to_lowercase();
    if name.is_empty() {
        return None;
    }
    let args: Vec<&str> = rest.split_whitespace().skip(1).collect();
    let parsed = COMMANDS
        .iter()
        .find(|spec| spec.name == name)
        .and_then(|spec| Some(Command::Run(spec, spec.parse(&args)?)));
    Some(parsed.unwrap_or(Command::Unknown(name)))
}

pub fn help_text() -> String {
    let mut s = String::from("Commands:\n");
    for spec in user_commands() {
        s.push_str(&format!("/{} — {}\n", spec.name, spec.help));
    }
    s.push_str("Anything else you write goes to the assistant.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Platform, UserRef};

    fn named(name: &str) -> &'static Spec<Action> {
        COMMANDS.iter().find(|s| s.name == name).expect("declared")
    }

    fn check(input: &str, expected: Option<(&str, Action)>) {
        let expected = expected.map(|(name, action)| Command::Run(named(name), action));
        assert_eq!(parse(input), expected, "input {input:?}");
    }

    fn admin(input: &str) -> Result<AdminCommand, String> {
        match parse(input) {
            Some(Command::Run(_, Action::Admin(r))) => r,
            other => panic!("not an admin command: {other:?}"),
        }
    }

    fn on(user: UserArg, action: UserAction) -> Result<AdminCommand, String> {
        Ok(AdminCommand::OnUser { user, action })
    }

    #[test]
    fn parses_commands() {
        check("/start", Some(("start", Action::Start)));
        check("/help@acme_bot", Some(("help", Action::Help)));
        check("  /RESET now", Some(("reset", Action::Reset)));
        check("/usage", Some(("usage", Action::Usage)));
        check("/export", Some(("export", Action::Export)));
        check(
            "/forget",
            Some(("forget", Action::Forget { confirm: None })),
        );
        for (said, confirm) in [
            ("/forget confirm", Some(true)),
            ("/forget YES", Some(true)),
            ("/forget cancel", Some(false)),
            ("/forget no", Some(false)),
            ("/forget maybe later", None),
        ] {
            check(said, Some(("forget", Action::Forget { confirm })));
        }
        assert_eq!(
            parse("/frobnicate"),
            Some(Command::Unknown("frobnicate".into()))
        );
        // `ask` is registered on Discord but is not a command the engine runs.
        assert_eq!(parse("/ask hi"), Some(Command::Unknown("ask".into())));
        check("hello /help", None);
        check("/", None);
        check("/ hi", None);
    }

    #[test]
    fn parses_admin_commands() {
        let tg1 = UserArg::Ref(UserRef::new(Platform::Telegram, "1"));
        let service = |a: ServiceAction| Ok(AdminCommand::Service(a));
        assert_eq!(admin("/admin stats"), service(ServiceAction::Stats));
        assert_eq!(
            admin("/admin ban tg:1 spamming  links"),
            on(
                tg1.clone(),
                UserAction::Ban {
                    reason: "spamming links".into()
                }
            )
        );
        assert_eq!(
            admin("/admin ban @Some_User"),
            on(
                UserArg::Username {
                    platform: None,
                    name: "Some_User".into()
                },
                UserAction::Ban {
                    reason: String::new()
                }
            )
        );
        assert_eq!(
            admin("/admin whois dc:@some.user"),
            on(
                UserArg::Username {
                    platform: Some(Platform::Discord),
                    name: "some.user".into()
                },
                UserAction::Whois
            )
        );
        assert_eq!(
            admin("/admin limit tg:1 10 2000"),
            on(
                tg1.clone(),
                UserAction::Limit {
                    per_minute: 10,
                    daily_tokens: Some(2000)
                }
            )
        );
        assert_eq!(
            admin("/admin LIMIT tg:1 10"),
            on(
                tg1.clone(),
                UserAction::Limit {
                    per_minute: 10,
                    daily_tokens: None
                }
            )
        );
        assert_eq!(
            admin("/admin limit tg:1 Reset"),
            on(tg1.clone(), UserAction::LimitReset)
        );
        assert_eq!(
            admin("/admin maintenance on back at 5pm"),
            service(ServiceAction::MaintenanceOn {
                message: Some("back at 5pm".into())
            })
        );
        assert_eq!(
            admin("/admin maintenance ON"),
            service(ServiceAction::MaintenanceOn { message: None })
        );
        assert_eq!(
            admin("/admin maintenance off"),
            service(ServiceAction::MaintenanceOff)
        );
        assert_eq!(
            admin("/admin audit"),
            service(ServiceAction::Audit { n: 10 })
        );
        assert_eq!(
            admin("/admin audit 5"),
            service(ServiceAction::Audit { n: 5 })
        );
        assert_eq!(
            admin("/admin cache clear"),
            service(ServiceAction::CacheClear)
        );
        assert_eq!(
            admin("/admin cache STATS"),
            service(ServiceAction::CacheStats)
        );
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
            "/admin limit tg:1 5000000000",
            "/admin limit tg:1 5 0",
            "/admin limit tg:1 reset now",
            "/admin audit 0",
            "/admin audit 201",
            "/admin audit 5 6",
            "/admin cache",
            "/admin cache flush",
            "/admin stats now",
            "/admin maintenance",
            "/admin maintenance off now",
            "/admin frob",
            "/admin unban tg:1 extra",
        ] {
            assert!(admin(bad).is_err(), "{bad} should be a usage error");
        }
        assert!(admin("/admin nope")
            .unwrap_err()
            .contains("/admin ban USER [reason]"));
    }

    /// Every declared command parses from an invocation built from its own declared
    /// arguments, and is listed where its users look.
    #[test]
    fn every_declared_command_parses_and_is_listed() {
        let help = help_text();
        for spec in COMMANDS {
            let mut words = vec![format!("/{}", spec.name)];
            words.extend(spec.args.iter().filter(|a| !a.optional()).map(Arg::example));
            let said = words.join(" ");
            match parse(&said) {
                Some(Command::Run(found, _)) => assert_eq!(found, spec, "{said}"),
                other => panic!("{said} → {other:?}"),
            }
            let line = format!("/{} — {}", spec.name, spec.help);
            assert_eq!(
                help.contains(&line),
                spec.access == Access::User,
                "{line} in /help"
            );
        }
        let usage = admin_usage();
        for spec in ADMIN_COMMANDS {
            for with_optional in [false, true] {
                let mut words = vec!["/admin".to_string(), spec.name.to_string()];
                words.extend(
                    spec.args
                        .iter()
                        .filter(|a| with_optional || !a.optional())
                        .map(Arg::example),
                );
                let said = words.join(" ");
                assert!(admin(&said).is_ok(), "{said}");
            }
            let line = format!("/admin {} — {}", spec.synopsis(), spec.help);
            assert!(usage.contains(&line), "{line} in the usage text");
            assert_eq!(
                (spec.access, spec.visibility),
                (Access::Admin, Visibility::Personal)
            );
        }
    }

    /// What the platforms accept: names 1–32 of `a-z0-9_`, descriptions ≤ 100 chars
    /// (Discord's bound; Telegram's is 256), no name twice.
    #[test]
    fn declarations_fit_the_platforms() {
        let valid = |name: &str| {
            (1..=32).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let mut names = Vec::new();
        for spec in slash_commands() {
            assert!(valid(spec.name), "{}", spec.name);
            assert!((1..=100).contains(&spec.help.chars().count()), "{spec:?}");
            for arg in spec.args {
                assert!(valid(&arg.name().to_lowercase()), "{spec:?}");
                assert!((1..=100).contains(&arg.help().chars().count()), "{spec:?}");
            }
            names.push(spec.name);
        }
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a name declared twice");
    }
}
