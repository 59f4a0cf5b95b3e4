//! The command layer: parsing and help text. Commands are a closed enum; adapters only
//! pass text through (Telegram's `/cmd@botname` suffix is stripped here).

/// User commands with their `/help` lines, in display order. Adapters register these
/// (setMyCommands, Discord slash commands).
pub const USER_COMMANDS: &[(&str, &str)] = &[
    ("start", "Start talking with the assistant"),
    ("help", "List the commands"),
    ("reset", "Clear this conversation's memory"),
    ("usage", "Show your limits and today's token use"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Start,
    Help,
    Reset,
    Usage,
    /// A `/word` we do not know; answered with the help text.
    Unknown(String),
}

/// Parses a message starting with `/`; `None` for ordinary text.
pub fn parse(text: &str) -> Option<Command> {
    let rest = text.trim_start().strip_prefix('/')?;
    let word = rest.split(char::is_whitespace).next().unwrap_or("");
    // `/help@acme_bot` → `help`
    let name = word.split('@').next().unwrap_or("").to_lowercase();
    if name.is_empty() {
        return None;
    }
    Some(match name.as_str() {
        "start" => Command::Start,
        "help" => Command::Help,
        "reset" => Command::Reset,
        "usage" => Command::Usage,
        _ => Command::Unknown(name),
    })
}

pub fn help_text() -> String {
    let mut s = String::from("Commands:\n");
    for (name, desc) in USER_COMMANDS {
        s.push_str(&format!("/{name} — {desc}\n"));
    }
    s.push_str("Anything else you write goes to the assistant.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<Command>) {
        assert_eq!(parse(input), expected, "input {input:?}");
    }

    #[test]
    fn parses_commands() {
        check("/start", Some(Command::Start));
        check("/help@acme_bot", Some(Command::Help));
        check("  /RESET now", Some(Command::Reset));
        check("/usage", Some(Command::Usage));
        check("/frobnicate", Some(Command::Unknown("frobnicate".into())));
        check("hello /help", None);
        check("/", None);
        check("/ hi", None);
    }

    #[test]
    fn help_lists_every_command() {
        let h = help_text();
        for (name, _) in USER_COMMANDS {
            assert!(h.contains(&format!("/{name}")));
        }
    }
}
