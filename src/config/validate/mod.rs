//! Raw shapes -> validated `Config`: one validator per section (`settings.rs` for
//! `config/<env>.toml`, `bot.rs` for `bots/<name>.toml`), then the secrets and the
//! production policy (`policy.rs`). Every problem is collected, none stops the pass.

mod bot;
mod media;
mod otel;
mod policy;
mod scale;
mod settings;

pub(crate) use bot::{bot, bots_together};
pub(crate) use policy::{secrets_and_policy, Policy};
pub(crate) use settings::settings;

use super::{secrets, Problem};

/// Collects problems for one file.
pub(super) struct Check<'a> {
    pub file: &'a str,
    pub problems: &'a mut Vec<Problem>,
}

impl Check<'_> {
    pub fn push(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem::new(self.file, key, message));
    }

    /// A required key is missing, unless it is absent because its value was already reported as invalid.
    pub fn required(&mut self, key: &str, message: &str) {
        if !self
            .problems
            .iter()
            .any(|p| p.file == self.file && p.key == key)
        {
            self.push(key, message);
        }
    }

    /// Zero is never a sensible value for these (a zero rate or size stops the service).
    pub fn at_least_one<T: PartialEq + Default>(&mut self, key: &str, value: T) {
        if value == T::default() {
            self.push(key, "must be at least 1");
        }
    }

    /// [`Check::at_least_one`] for each `(key, value)` of `section`.
    pub fn each_at_least_one(&mut self, section: &str, values: &[(&str, u64)]) {
        for (key, value) in values {
            self.at_least_one(&format!("{section}.{key}"), *value);
        }
    }

    /// [`Check::at_most`] for each `(key, value, max)` of `section`.
    pub fn each_at_most(&mut self, section: &str, values: &[(&str, u64, u64)]) {
        for (key, value, max) in values {
            self.at_most(&format!("{section}.{key}"), *value, *max);
        }
    }

    /// An upper bound (durations become `Instant` arithmetic: no value may overflow it).
    pub fn at_most(&mut self, key: &str, value: u64, max: u64) {
        self.at_most_saying(key, value, max, &format!(" is too large (at most {max})"));
    }

    /// An upper bound whose problem reads `{value}{why}` (`why` names the limit and
    /// what to use instead).
    pub fn at_most_saying(&mut self, key: &str, value: u64, max: u64, why: &str) {
        if value > max {
            self.push(key, format!("{value}{why}"));
        }
    }

    /// The value named by `value` among `choices`; otherwise a problem and `None`.
    pub fn one_of<T: Copy>(&mut self, key: &str, value: &str, choices: &[(&str, T)]) -> Option<T> {
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == value) {
            return Some(*v);
        }
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        self.push(key, format!("`{value}` is not one of {}", names.join(", ")));
        None
    }

    pub fn url(&mut self, key: &str, value: &str) -> String {
        let ok = ["http://", "https://"]
            .iter()
            .any(|p| value.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
            && !value.chars().any(char::is_whitespace);
        if !ok {
            self.push(key, format!("`{value}` is not an http:// or https:// URL"));
        }
        // Callers append paths (`{base}/chat/completions`), so a trailing slash would double up.
        value.trim_end_matches('/').to_owned()
    }

    pub fn temperature(&mut self, key: &str, value: Option<f32>) {
        if let Some(t) = value {
            if !(0.0..=2.0).contains(&t) {
                self.push(key, format!("{t} is out of range (0.0 to 2.0)"));
            }
        }
    }

    pub fn env_name(&mut self, key: &str, value: &str) {
        if !secrets::is_env_name(value) {
            // Not echoed: a token pasted here by mistake must not reach the output.
            self.push(
                key,
                "not a valid environment variable name (letters, digits, `_`); this names the \
                 variable that holds the secret, the secret itself goes in the env file",
            );
        }
    }
}

/// `bots/<name>.toml`, as problems name it.
pub(crate) fn bot_file(name: &str) -> String {
    format!("bots/{name}.toml")
}
