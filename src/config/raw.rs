//! Raw serde shapes of the config files, and the reader that turns TOML text into them while collecting every problem.
//!
//! Every shape is `deny_unknown_fields` with a default for every field (in
//! `defaults.rs`), so an absent key means "the documented default" and a typo is an
//! error. Sections whose validated form is the same (`[llm]`, `[limits]`, `[memory]`,
//! `[store]`, `[admins]`, `[delivery]`, `[audit]`, `[otel]`, a bot's `[limits]`) deserialise
//! straight into their `Config` struct; the others have a raw shape here. Sections are
//! deserialised one at a time from a `toml::Table` (after environment overrides were
//! applied to it), which lets each problem carry its dotted key path.

use serde::de::{DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use toml::{Table, Value};

use super::Problem;

// ---------------------------------------------------------------------------
// config/<env>.toml

/// Top level of `config/<env>.toml`. Sections stay tables here and are
/// deserialised separately so their problems are reported with the section path.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawTop {
    /// `None` means the default `data/<env>`.
    pub data_dir: Option<String>,
    pub shutdown_timeout_secs: Option<u64>,
    pub http: Table,
    pub log: Table,
    pub llm: Table,
    pub limits: Table,
    pub memory: Table,
    pub cache: Table,
    pub store: Table,
    pub admins: Table,
    pub telegram: Table,
    pub discord: Table,
    pub delivery: Table,
    pub audit: Table,
    pub otel: Table,
    pub media: Table,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawHttp {
    pub bind: String,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawLog {
    pub format: String,
    pub level: String,
    pub unsafe_debug: bool,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawCache {
    pub enabled: bool,
    pub ttl_secs: u64,
    pub max_entries: usize,
    pub scope: String,
}

/// A raw section's key names (what serde's derive knows but does not expose), so a
/// section made of two shapes can hand each key to its shape.
pub(crate) trait OwnKeys {
    const KEYS: &'static [&'static str];
}

/// Declares a raw section shape (every key optional, unknown keys refused) and its
/// [`OwnKeys`] from one list of fields, so the names cannot drift apart.
macro_rules! raw_shape {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[cfg_attr(test, derive(serde::Serialize))]
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub(crate) struct $name {
            $(pub $field: $ty),*
        }

        impl OwnKeys for $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

raw_shape!(
    /// The keys `[telegram]` and `[discord]` share; the default URL depends on the platform.
    RawPlatform {
        api_url: Option<String>,
        per_chat_per_minute: Option<u32>,
        group_per_minute: Option<u32>,
        global_per_second: Option<u32>,
    }
);

raw_shape!(
    /// `[telegram]`'s own keys: how updates come in.
    RawTelegramOwn {
        mode: Option<String>,
        webhook_url: Option<String>,
        webhook_bind: Option<String>,
        webhook_secret_env: Option<String>,
    }
);

raw_shape!(
    /// `[discord]`'s own key: the shard layout, kept raw (`"auto"` or a table) so each
    /// wrong shape gets its own explanation.
    RawDiscordOwn { shards: Option<Value> }
);

/// `[telegram]` in the config file.
pub(crate) type RawTelegram = RawPlatformSection<RawTelegramOwn>;

/// `[discord]` in the config file.
pub(crate) type RawDiscord = RawPlatformSection<RawDiscordOwn>;

/// `[telegram]` or `[discord]`: the shared keys plus the platform's own (`X`). One
/// table, read in two shapes, each still `deny_unknown_fields` (which serde's
/// `flatten` would switch off): a key goes to the shape that names it, and a key
/// neither names is an unknown field of the whole section.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, Default)]
pub(crate) struct RawPlatformSection<X> {
    #[cfg_attr(test, serde(flatten))]
    pub platform: RawPlatform,
    #[cfg_attr(test, serde(flatten))]
    pub own: X,
}

impl<'de, X: DeserializeOwned + OwnKeys> Deserialize<'de> for RawPlatformSection<X> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let (mut shared, mut own) = (Table::new(), Table::new());
        for (key, value) in Table::deserialize(d)? {
            if X::KEYS.contains(&key.as_str()) {
                own.insert(key, value);
            } else if RawPlatform::KEYS.contains(&key.as_str()) {
                shared.insert(key, value);
            } else {
                let expected: Vec<String> = (RawPlatform::KEYS.iter().chain(X::KEYS))
                    .map(|k| format!("`{k}`"))
                    .collect();
                return Err(D::Error::custom(format!(
                    "unknown field `{key}`, expected one of {}",
                    expected.join(", ")
                )));
            }
        }
        let part = |e: toml::de::Error| D::Error::custom(e.message());
        Ok(RawPlatformSection {
            platform: RawPlatform::deserialize(Value::Table(shared)).map_err(part)?,
            own: X::deserialize(Value::Table(own)).map_err(part)?,
        })
    }
}

// ---------------------------------------------------------------------------
// bots/<name>.toml

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawBot {
    /// Required; checked in validation so that its absence is one clear problem.
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    /// The bot's model reads images (image content parts).
    pub vision: bool,
    /// `"never"` (default) or `"mirror"`.
    pub voice_replies: Option<String>,
    pub limits: Option<Table>,
    pub telegram: Option<Table>,
    pub discord: Option<Table>,
}

raw_shape!(
    /// `[telegram]` in a bot file. The identity (`username`) stays a raw value so that
    /// a plain string (one identity for both environments) gets its own explanation.
    RawTelegramBot {
        token_env: Option<String>,
        username: Option<Value>,
    }
);

raw_shape!(
    /// `[discord]` in a bot file; `application_id` is its identity, kept raw likewise.
    RawDiscordBot {
        token_env: Option<String>,
        application_id: Option<Value>,
    }
);

raw_shape!(
    /// `{ staging = "...", production = "..." }`: the identity expected in each environment.
    RawPerEnv {
        staging: Option<StrOrInt>,
        production: Option<StrOrInt>,
    }
);

/// A string, or an integer written without quotes (Discord application ids are numbers).
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StrOrInt(pub String);

impl<'de> Deserialize<'de> for StrOrInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StrOrInt;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StrOrInt, E> {
                Ok(StrOrInt(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StrOrInt, E> {
                Ok(StrOrInt(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StrOrInt, E> {
                Ok(StrOrInt(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Reading TOML while collecting problems

/// One file being read: its name relative to the root (for `Problem::file`) and
/// its text (to point at line numbers).
pub(crate) struct Doc<'a> {
    pub file: &'a str,
    pub source: &'a str,
}

/// Parse TOML text into a table; a syntax error becomes one problem with key `syntax`.
pub(crate) fn parse_table(doc: &Doc<'_>, problems: &mut Vec<Problem>) -> Option<Table> {
    match doc.source.parse::<Table>() {
        Ok(t) => Some(t),
        Err(e) => {
            let at = e
                .span()
                .map(|s| {
                    let (line, col) = line_col(doc.source, s.start);
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            problems.push(Problem::new(
                doc.file,
                "syntax",
                format!("{at}{}", e.message()),
            ));
            None
        }
    }
}

/// Deserialise `table` (the section at dotted `prefix`, "" for the top level) into
/// `T`. When that fails, each key is tried alone so that *every* bad key is reported
/// with its own path, and `T` is built from the keys that were fine.
pub(crate) fn section<T: DeserializeOwned + Default>(
    doc: &Doc<'_>,
    prefix: &str,
    table: Table,
    problems: &mut Vec<Problem>,
) -> T {
    if let Ok(v) = T::deserialize(Value::Table(table.clone())) {
        return v;
    }
    let mut kept = Table::new();
    for (key, value) in table {
        let mut one = Table::new();
        one.insert(key.clone(), value.clone());
        match T::deserialize(Value::Table(one)) {
            Ok(_) => {
                kept.insert(key, value);
            }
            Err(e) => problems.push(de_problem(doc, prefix, &key, e.message())),
        }
    }
    match T::deserialize(Value::Table(kept)) {
        Ok(v) => v,
        Err(e) => {
            // Keys that are fine alone but not together; report the section as a whole.
            let key = if prefix.is_empty() { "syntax" } else { prefix };
            problems.push(Problem::new(doc.file, key, e.message()));
            T::default()
        }
    }
}

/// Turn a serde message about `prefix.key` into a problem with the most precise path.
fn de_problem(doc: &Doc<'_>, prefix: &str, key: &str, message: &str) -> Problem {
    let path = join(prefix, key);
    if let Some(field) = unknown_field(message) {
        // For an inline table (`username = { stagin = ".." }`) the unknown field is one level down.
        let path = if field == key {
            path
        } else {
            join(&path, field)
        };
        let mut msg = String::from("unknown key");
        if let Some(hint) = secret_hint(field) {
            msg.push_str(hint);
        } else if let Some(best) = closest(field, &expected_fields(message)) {
            msg.push_str(&format!(" (did you mean `{best}`?)"));
        }
        return Problem::new(doc.file, path, msg);
    }
    let msg = match locate(doc.source, &path) {
        Some(line) => format!("{message} (line {line})"),
        None => message.to_owned(),
    };
    Problem::new(doc.file, path, msg)
}

fn secret_hint(field: &str) -> Option<&'static str> {
    match field {
        "api_key" | "token" | "key" | "secret" | "password" => {
            Some(" (secrets never go in TOML: put the value in the env file and name its variable in `*_env`)")
        }
        _ => None,
    }
}

/// `unknown field `xyz`, expected ...` -> `xyz`.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// The back-quoted names after "expected" in a serde unknown-field message.
fn expected_fields(message: &str) -> Vec<&str> {
    let Some((_, tail)) = message.split_once("expected") else {
        return Vec::new();
    };
    tail.split('`').skip(1).step_by(2).collect()
}

/// The candidate nearest to `word`, if it is close enough to be a typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// 1-based line and column of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Best-effort line number of a dotted key in TOML text (`[section]` headers and
/// `key = ...` lines; dotted and inline keys fall back to their parent's line).
pub(crate) fn locate(source: &str, path: &str) -> Option<usize> {
    let mut target = path;
    loop {
        if let Some(line) = locate_exact(source, target) {
            return Some(line);
        }
        target = target.rsplit_once('.')?.0;
    }
}

fn locate_exact(source: &str, path: &str) -> Option<usize> {
    let normalise = |s: &str| -> String {
        s.split('.')
            .map(|p| p.trim().trim_matches('"').trim_matches('\''))
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut header = String::new();
    for (i, line) in source.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            let inner = line.trim_start_matches('[');
            let inner = inner.split(']').next().unwrap_or_default();
            header = normalise(inner);
            if header == path {
                return Some(i + 1);
            }
        } else if let Some((key, _)) = line.split_once('=') {
            if key.trim_start().starts_with('#') {
                continue;
            }
            if join(&header, &normalise(key)) == path {
                return Some(i + 1);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Environment overrides: CONFAB__SECTION__KEY=value

pub(crate) const OVERRIDE_PREFIX: &str = "CONFAB__";

/// Keys whose value is a list, so `CONFAB__ADMINS__TELEGRAM=1,2` means `[1, 2]`.
const LIST_KEYS: &[&str] = &["admins.telegram", "admins.discord"];

/// One `CONFAB__...` variable, with the dotted config path it names.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    pub var: String,
    pub path: String,
    pub raw: String,
}

/// The overrides among `vars`, sorted by variable name; malformed names are problems.
pub(crate) fn overrides<'a>(
    vars: impl IntoIterator<Item = (&'a String, &'a String)>,
    problems: &mut Vec<Problem>,
) -> Vec<Override> {
    let mut out = Vec::new();
    for (var, raw) in vars {
        let Some(rest) = var.strip_prefix(OVERRIDE_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if parts.iter().any(String::is_empty) {
            problems.push(Problem::new(
                "env",
                var,
                "malformed override name (expected CONFAB__KEY or CONFAB__SECTION__KEY)",
            ));
            continue;
        }
        out.push(Override {
            var: var.clone(),
            path: parts.join("."),
            raw: raw.clone(),
        });
    }
    out.sort_by(|a, b| a.var.cmp(&b.var));
    out
}

/// Write one override into the parsed config table.
pub(crate) fn apply_override(table: &mut Table, ov: &Override) -> Result<(), String> {
    let parts: Vec<&str> = ov.path.split('.').collect();
    let Some((last, parents)) = parts.split_last() else {
        return Err("empty key".into());
    };
    let mut cur = table;
    let mut walked = String::new();
    for part in parents {
        walked = join(&walked, part);
        let entry = cur
            .entry((*part).to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(t) => cur = t,
            _ => return Err(format!("`{walked}` is not a section")),
        }
    }
    let is_list =
        LIST_KEYS.contains(&ov.path.as_str()) || matches!(cur.get(*last), Some(Value::Array(_)));
    let value = if is_list {
        parse_list(&ov.raw)
    } else {
        parse_scalar(&ov.raw)
    };
    cur.insert((*last).to_owned(), value);
    Ok(())
}

/// A TOML value if the text is one (`42`, `true`, `[1, 2]`, `"quoted"`), else the text as a string.
fn parse_scalar(raw: &str) -> Value {
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}

/// `[1, 2]` as TOML, or `1,2` / `1, 2` / `` (empty list) split on commas.
fn parse_list(raw: &str) -> Value {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        return parse_scalar(trimmed);
    }
    let items = trimmed
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_scalar)
        .collect();
    Value::Array(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_scalar(raw: &str, expected: Value) {
        assert_eq!(parse_scalar(raw), expected, "{raw}");
    }

    #[test]
    fn override_values_parse_as_toml_else_string() {
        check_scalar("42", Value::Integer(42));
        check_scalar("true", Value::Boolean(true));
        check_scalar("0.5", Value::Float(0.5));
        check_scalar(
            "http://127.0.0.1:1234/v1",
            Value::String("http://127.0.0.1:1234/v1".into()),
        );
        check_scalar(
            "info,confab=debug",
            Value::String("info,confab=debug".into()),
        );
        check_scalar("\"42\"", Value::String("42".into()));
        check_scalar("", Value::String(String::new()));
    }

    #[test]
    fn list_overrides() {
        let ints = |v: &[i64]| Value::Array(v.iter().map(|i| Value::Integer(*i)).collect());
        assert_eq!(parse_list("1,2"), ints(&[1, 2]));
        assert_eq!(parse_list(" 1 , 2 "), ints(&[1, 2]));
        assert_eq!(parse_list("[1, 2]"), ints(&[1, 2]));
        assert_eq!(parse_list(""), ints(&[]));
    }

    #[test]
    fn locate_finds_section_keys() {
        let src = "data_dir = \"x\"\n[llm]\n# timeout_secs = 1\ntimeout_secs = \"a\"\n[limits]\nburst = 0\n";
        assert_eq!(locate(src, "data_dir"), Some(1));
        assert_eq!(locate(src, "llm.timeout_secs"), Some(4));
        assert_eq!(locate(src, "limits.burst"), Some(6));
        assert_eq!(locate(src, "limits.nope"), Some(5));
        assert_eq!(locate(src, "nope"), None);
    }

    #[test]
    fn suggestions_for_typos() {
        let msg = "unknown field `modle`, expected one of `base_url`, `model`, `timeout_secs`";
        assert_eq!(unknown_field(msg), Some("modle"));
        assert_eq!(closest("modle", &expected_fields(msg)), Some("model"));
        assert_eq!(closest("zzz", &expected_fields(msg)), None);
        let two = "unknown field `stagin`, expected `staging` or `production`";
        assert_eq!(closest("stagin", &expected_fields(two)), Some("staging"));
    }
}
