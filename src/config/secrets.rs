//! The env file (dotenvy) and secret hygiene; no secret value ever reaches a `Problem`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Env, LoadOptions, Problem};

/// The variables a load sees: the process environment, over the env file.
/// Holds secret values: its `Debug` prints the names only.
#[derive(Clone, Default)]
pub(crate) struct Vars {
    map: BTreeMap<String, String>,
}

impl std::fmt::Debug for Vars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl Vars {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.map.iter()
    }
}

/// The env file in use, and how to name it in problems: `--env-file` if given; else the
/// systemd credential `$CREDENTIALS_DIRECTORY/env` when it exists (`LoadCredential=env:…`:
/// systemd reads the root-only file and hands the service a private copy); else
/// `<root>/.env.<env>`.
pub(crate) struct EnvFile {
    pub path: PathBuf,
    pub display: String,
    pub explicit: bool,
    /// A systemd credential: systemd made it readable by the service's user only (its
    /// directory is private to the unit), so the world-readable rule does not apply.
    pub credential: bool,
}

/// The credential name the systemd unit loads the env file as.
pub(crate) const CREDENTIAL: &str = "env";

impl EnvFile {
    pub fn for_options(opts: &LoadOptions, credentials_dir: Option<&str>) -> Self {
        if let Some(p) = &opts.env_file {
            let display = p
                .strip_prefix(&opts.root)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned();
            return Self {
                path: p.clone(),
                display,
                explicit: true,
                credential: false,
            };
        }
        let credential = credentials_dir
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(CREDENTIAL))
            .filter(|p| p.exists());
        if let Some(path) = credential {
            return Self {
                display: path.to_string_lossy().into_owned(),
                path,
                explicit: true,
                credential: true,
            };
        }
        let name = format!(".env.{}", opts.env);
        Self {
            path: opts.root.join(&name),
            display: name,
            explicit: false,
            credential: false,
        }
    }
}

/// Read the env file (if any) and lay the process environment over it: real
/// environment variables win, and within the file the first occurrence wins
/// (dotenvy's rules). The process environment is not modified.
pub(crate) fn collect_vars(
    file: &EnvFile,
    env: Env,
    process: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<Problem>,
) -> Vars {
    let mut map = BTreeMap::new();
    for (k, v) in read_env_file(file, env, problems) {
        map.entry(k).or_insert(v);
    }
    map.extend(process);
    Vars { map }
}

fn read_env_file(file: &EnvFile, env: Env, problems: &mut Vec<Problem>) -> Vec<(String, String)> {
    let text = match std::fs::read_to_string(&file.path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The default file is optional (secrets may come from the real environment,
            // e.g. systemd's EnvironmentFile); a file named on the command line is not.
            if file.explicit {
                problems.push(Problem::new(&file.display, "file", "file not found"));
            }
            return Vec::new();
        }
        Err(e) => {
            problems.push(Problem::new(
                &file.display,
                "file",
                format!("cannot read: {e}"),
            ));
            return Vec::new();
        }
    };
    if env == Env::Production && !file.credential {
        check_permissions(&file.path, &file.display, problems);
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok(kv) => out.push(kv),
            // dotenvy's message quotes the whole line, which may hold a secret: report the line number only.
            Err(dotenvy::Error::LineParse(line, _)) => {
                let key = line_of(text, &line)
                    .map_or_else(|| "syntax".to_owned(), |n| format!("line {n}"));
                problems.push(Problem::new(
                    &file.display,
                    key,
                    "cannot parse (expected KEY=value; check quotes)",
                ));
            }
            Err(dotenvy::Error::Io(e)) => {
                problems.push(Problem::new(
                    &file.display,
                    "file",
                    format!("cannot read: {e}"),
                ));
                break;
            }
            Err(_) => {
                problems.push(Problem::new(&file.display, "syntax", "cannot parse"));
            }
        }
    }
    out
}

/// 1-based line where `fragment` (a line dotenvy rejected) starts.
fn line_of(text: &str, fragment: &str) -> Option<usize> {
    let first = fragment.lines().next().filter(|l| !l.trim().is_empty())?;
    let at = text.find(first)?;
    Some(text[..at].matches('\n').count() + 1)
}

#[cfg(unix)]
fn check_permissions(path: &Path, display: &str, problems: &mut Vec<Problem>) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            problems.push(Problem::new(
                display,
                "permissions",
                "env file is world-readable (chmod 600)",
            ));
        }
    }
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _display: &str, _problems: &mut Vec<Problem>) {}

/// Why a secret looks like a placeholder or is too weak for production, if it does.
/// Only the reason is returned, never the value.
pub(crate) fn weakness(value: &str) -> Option<&'static str> {
    const PLACEHOLDERS: &[&str] = &[
        "changeme",
        "change_me",
        "replace",
        "example",
        "xxx",
        "your_",
        "dummy",
    ];
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Some("is empty");
    }
    if trimmed.chars().count() < 8 {
        return Some("is shorter than 8 characters");
    }
    let lower = trimmed.to_ascii_lowercase();
    if PLACEHOLDERS.iter().any(|p| lower.contains(p)) {
        return Some("looks like a placeholder");
    }
    None
}

/// `NAME` is usable as an environment variable name.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str, expected: Option<&str>) {
        assert_eq!(weakness(value), expected, "{value}");
    }

    #[test]
    fn weak_secrets() {
        check("", Some("is empty"));
        check("short", Some("is shorter than 8 characters"));
        check("CHANGEME-please", Some("looks like a placeholder"));
        check("sk-replace-with-real-key", Some("looks like a placeholder"));
        check("123456:XXXXXXXXXXXXXXXX", Some("looks like a placeholder"));
        check("123456:AAH9f8s7d6f5g4h3j2k1", None);
    }

    #[test]
    fn vars_debug_prints_names_not_values() {
        let file = EnvFile {
            path: PathBuf::from("/nonexistent/confab-test-env"),
            display: "x".into(),
            explicit: false,
            credential: false,
        };
        let mut problems = Vec::new();
        let vars = collect_vars(
            &file,
            Env::Staging,
            [(
                "OPENAI_API_KEY".to_string(),
                "sk-live-0123456789".to_string(),
            )],
            &mut problems,
        );
        let shown = format!("{vars:?}");
        assert!(shown.contains("OPENAI_API_KEY"), "{shown}");
        assert!(!shown.contains("sk-live"), "{shown}");
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("OPENAI_API_KEY"));
        assert!(is_env_name("_X1"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("1ABC"));
        assert!(!is_env_name("123456:ABC-def"));
    }

    #[test]
    fn line_numbers_of_bad_lines() {
        assert_eq!(line_of("A=1\nB='x\n", "B='x\n"), Some(2));
        assert_eq!(line_of("A=1\n", "nope"), None);
    }
}
