//! Command arguments: how each kind is declared, shown in help and usage, and matched
//! against the words a user typed.

use crate::domain::{Platform, UserRef};

/// One declared argument of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A user: `tg:<id>`, `dc:<id>`, `@name`, `tg:@name` or `dc:@name`. Shown as `USER`.
    User,
    /// A whole number in `min..=max`. Shown as its name (`[NAME]` when optional).
    Number {
        name: &'static str,
        help: &'static str,
        min: u64,
        max: u64,
        optional: bool,
    },
    /// One of fixed words, each with its spellings (the first is shown): `a|b`.
    Choice {
        name: &'static str,
        help: &'static str,
        choices: &'static [&'static [&'static str]],
        optional: bool,
    },
    /// A fixed word that selects a form of the command (`limit USER reset`).
    Word(&'static str),
    /// Every remaining word. Shown as its name (`[name]` when optional).
    Rest {
        name: &'static str,
        help: &'static str,
        optional: bool,
    },
}

impl Arg {
    /// The argument's name (a Discord option's name).
    pub fn name(&self) -> &'static str {
        match self {
            Arg::User => "user",
            Arg::Number { name, .. } | Arg::Choice { name, .. } | Arg::Rest { name, .. } => name,
            Arg::Word(word) => word,
        }
    }

    /// One line about the argument (a Discord option's description).
    pub fn help(&self) -> &'static str {
        match self {
            Arg::User => "tg:<id>, dc:<id>, @username, tg:@username or dc:@username",
            Arg::Number { help, .. } | Arg::Choice { help, .. } | Arg::Rest { help, .. } => help,
            Arg::Word(word) => word,
        }
    }

    pub fn optional(&self) -> bool {
        match self {
            Arg::User | Arg::Word(_) => false,
            Arg::Number { optional, .. }
            | Arg::Choice { optional, .. }
            | Arg::Rest { optional, .. } => *optional,
        }
    }

    /// The words this argument accepts, when it is a closed set (shown spellings only).
    pub fn choices(&self) -> Vec<&'static str> {
        match self {
            Arg::Choice { choices, .. } => {
                choices.iter().filter_map(|c| c.first().copied()).collect()
            }
            Arg::Word(word) => vec![word],
            _ => Vec::new(),
        }
    }

    /// How the usage text shows it: `USER`, `PER_MIN`, `[N]`, `stats|clear`, `[reason]`.
    pub fn usage(&self) -> String {
        let shown = match self {
            Arg::User => "USER".to_string(),
            Arg::Number { name, .. } | Arg::Rest { name, .. } => name.to_string(),
            Arg::Choice { .. } | Arg::Word(_) => self.choices().join("|"),
        };
        match self.optional() {
            true => format!("[{shown}]"),
            false => shown,
        }
    }

    /// An invocation this argument accepts (for the declaration's own tests).
    pub fn example(&self) -> String {
        match self {
            Arg::User => "tg:1".to_string(),
            Arg::Number { min, .. } => min.to_string(),
            Arg::Choice { .. } | Arg::Word(_) => self
                .choices()
                .first()
                .map_or(String::new(), |c| c.to_string()),
            Arg::Rest { .. } => "some words".to_string(),
        }
    }

    /// Matches one word; `None` when it does not fit.
    fn take(&self, word: &str) -> Option<Value> {
        match self {
            Arg::User => user_arg(word).map(Value::User),
            Arg::Number { min, max, .. } => word
                .parse::<u64>()
                .ok()
                .filter(|n| (*min..=*max).contains(n))
                .map(Value::Number),
            Arg::Choice { choices, .. } => choices
                .iter()
                .position(|spellings| spellings.iter().any(|s| word.eq_ignore_ascii_case(s)))
                .map(Value::Choice),
            Arg::Word(w) => word.eq_ignore_ascii_case(w).then_some(Value::Word),
            Arg::Rest { .. } => Some(Value::Rest(vec![word.to_string()])),
        }
    }
}

/// What one argument was given.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    User(UserArg),
    Number(u64),
    /// The index of the choice in the declaration.
    Choice(usize),
    Word,
    Rest(Vec<String>),
    Absent,
}

/// The arguments of one command, matched against its declaration, by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound(Vec<Value>);

impl Bound {
    pub fn user(&self, i: usize) -> Option<UserArg> {
        match self.0.get(i) {
            Some(Value::User(u)) => Some(u.clone()),
            _ => None,
        }
    }

    pub fn number(&self, i: usize) -> Option<u64> {
        match self.0.get(i) {
            Some(Value::Number(n)) => Some(*n),
            _ => None,
        }
    }

    /// Which of the declared choices was given.
    pub fn choice(&self, i: usize) -> Option<usize> {
        match self.0.get(i) {
            Some(Value::Choice(c)) => Some(*c),
            _ => None,
        }
    }

    /// The words of a `Rest` argument (none when absent).
    pub fn words(&self, i: usize) -> &[String] {
        match self.0.get(i) {
            Some(Value::Rest(words)) => words,
            _ => &[],
        }
    }

    /// The words of a `Rest` argument joined by single spaces.
    pub fn text(&self, i: usize) -> String {
        self.words(i).join(" ")
    }
}

/// Matches `words` against `args` in order. Strict (operators): a word that does not
/// fit, a missing required argument or a word left over refuses the whole line. Lenient
/// (users): a word that does not fit leaves its argument absent, extra words are ignored.
pub fn bind(args: &[Arg], words: &[&str], strict: bool) -> Option<Bound> {
    let mut values = Vec::with_capacity(args.len());
    let mut rest = words.iter();
    for arg in args {
        let value = match arg {
            Arg::Rest { .. } => {
                let all: Vec<String> = rest.by_ref().map(|w| w.to_string()).collect();
                match all.is_empty() {
                    true => Value::Absent,
                    false => Value::Rest(all),
                }
            }
            _ => match rest.next() {
                Some(word) => match arg.take(word) {
                    Some(v) => v,
                    None if strict => return None,
                    None => Value::Absent,
                },
                None => Value::Absent,
            },
        };
        if strict && value == Value::Absent && !arg.optional() {
            return None;
        }
        values.push(value);
    }
    if strict && rest.next().is_some() {
        return None;
    }
    Some(Bound(values))
}

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
