//! System prompt rendering (minijinja) and token counting (cl100k BPE, loaded once).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use minijinja::Environment;
use serde::Serialize;

use super::bpe::Cl100k;

/// Fields a prompt template may use.
#[derive(Debug, Serialize)]
pub struct PromptVars<'a> {
    pub bot_name: &'a str,
    pub user_name: &'a str,
    pub platform: &'a str,
    pub date: &'a str,
}

/// Compiled prompt templates, one per `prompts/<name>.md`, and the prompts rendered
/// lately (a reload builds a new `Prompts`, so it never serves a stale rendering).
pub struct Prompts {
    env: Environment<'static>,
    rendered: Mutex<Rendered>,
}

/// Rendered system prompts with their token counts, by template, bot, platform, UTC day
/// and user name (everything a template can use). Bounded: cleared when full.
#[derive(Default)]
struct Rendered {
    map: HashMap<String, (Arc<str>, usize)>,
    bytes: usize,
}

const RENDERED_MAX_ENTRIES: usize = 4096;
const RENDERED_MAX_BYTES: usize = 512 * 1024;

/// What a system prompt is rendered for (the fields of [`PromptVars`], the date as a
/// timestamp so a remembered rendering costs no formatting).
pub struct PromptFor<'a> {
    pub template: &'a str,
    pub bot_name: &'a str,
    pub user_name: &'a str,
    pub platform: &'a str,
    pub now: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, thiserror::Error)]
#[error("prompt {name}: {reason}")]
pub struct PromptError {
    pub name: String,
    pub reason: String,
}

/// The one template environment: `confab check` and the engine render alike.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Prompts are plain text, not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env
}

/// `line N: kind: detail` for a template error (no template source, no values).
fn describe(e: &minijinja::Error) -> String {
    let what = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    let what = if e.kind() == minijinja::ErrorKind::UndefinedError {
        format!("{what} (a prompt may use only {{{{bot_name}}}}, {{{{user_name}}}}, {{{{platform}}}} and {{{{date}}}})")
    } else {
        what
    };
    match e.line() {
        Some(line) => format!("line {line}: {what}"),
        None => what,
    }
}

impl Prompts {
    /// What `confab check` and config loading run on every `prompts/<name>.md`: compile
    /// the template and render it exactly as the engine does (same environment, strict
    /// undefined values) with sample values of every field the engine passes.
    pub fn check(source: &str) -> Result<(), String> {
        let env = environment();
        let sample = PromptVars {
            bot_name: "assistant",
            user_name: "Ada",
            platform: "telegram",
            date: "2025-01-01",
        };
        env.template_from_str(source)
            .and_then(|t| t.render(&sample))
            .map(|_| ())
            .map_err(|e| describe(&e))
    }

    pub fn new(sources: &BTreeMap<String, String>) -> Result<Self, PromptError> {
        let mut env = environment();
        for (name, src) in sources {
            env.add_template_owned(name.clone(), src.clone())
                .map_err(|e| PromptError {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(Self {
            env,
            rendered: Mutex::new(Rendered::default()),
        })
    }

    /// The system prompt for `what` and its token count (`count` runs only for a text
    /// not rendered lately): a message's prompt is rendered once per user and day, not
    /// once per message.
    pub fn render_counted(
        &self,
        what: &PromptFor<'_>,
        count: impl FnOnce(&str) -> usize,
    ) -> Result<(Arc<str>, usize), PromptError> {
        let day = what.now.timestamp().div_euclid(86_400);
        // Only the user name can hold a NUL, and it comes last: keys are unambiguous.
        let key = format!(
            "{}\0{}\0{}\0{day}\0{}",
            what.template, what.bot_name, what.platform, what.user_name
        );
        let lock = || self.rendered.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = lock().map.get(&key) {
            return Ok(hit.clone());
        }
        let date = what.now.format("%Y-%m-%d").to_string();
        let vars = PromptVars {
            bot_name: what.bot_name,
            user_name: what.user_name,
            platform: what.platform,
            date: &date,
        };
        let text: Arc<str> = self.render(what.template, &vars)?.into();
        let fresh = (text.clone(), count(&text));
        let mut memo = lock();
        let size = key.len() + text.len();
        if memo.map.len() >= RENDERED_MAX_ENTRIES || memo.bytes + size > RENDERED_MAX_BYTES {
            memo.map = HashMap::new();
            memo.bytes = 0;
        }
        if size <= RENDERED_MAX_BYTES && memo.map.insert(key, fresh.clone()).is_none() {
            memo.bytes += size;
        }
        Ok(fresh)
    }

    pub fn render(&self, name: &str, vars: &PromptVars<'_>) -> Result<String, PromptError> {
        let err = |e: minijinja::Error| PromptError {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let tmpl = self.env.get_template(name).map_err(err)?;
        tmpl.render(vars).map_err(err)
    }
}

/// Counts tokens with a real BPE tokenizer (cl100k_base; close enough to budget context for
/// any current chat model). Backed by the compact counting-only [`Cl100k`] (≈2 MB instead of
/// tiktoken's ≈24 MB); cheap to clone.
#[derive(Clone)]
pub struct Tokenizer {
    bpe: Arc<Cl100k>,
}

impl Tokenizer {
    pub fn load() -> Result<Self, String> {
        let bpe = Cl100k::load().map_err(|e| format!("loading tokenizer: {e}"))?;
        Ok(Self { bpe: Arc::new(bpe) })
    }

    pub fn count(&self, text: &str) -> usize {
        self.bpe.count(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_without_escaping() {
        let mut src = BTreeMap::new();
        src.insert(
            "p".to_string(),
            "I am {{bot_name}}, talking to {{user_name}} on {{platform}} ({{date}}).".to_string(),
        );
        let p = Prompts::new(&src).unwrap();
        let out = p
            .render(
                "p",
                &PromptVars {
                    bot_name: "assistant",
                    user_name: "Tom & <Jerry>",
                    platform: "telegram",
                    date: "2026-11-21",
                },
            )
            .unwrap();
        assert_eq!(
            out,
            "I am assistant, talking to Tom & <Jerry> on telegram (2026-11-21)."
        );
    }

    #[test]
    fn a_rendered_prompt_is_remembered_per_user_and_day() {
        let mut src = BTreeMap::new();
        src.insert("p".to_string(), "Hi {{user_name}}, {{date}}.".to_string());
        let p = Prompts::new(&src).unwrap();
        let day = |d: u32| {
            chrono::NaiveDate::from_ymd_opt(2026, 12, d)
                .and_then(|d| d.and_hms_opt(23, 59, 0))
                .unwrap()
                .and_utc()
        };
        let what = |user_name, now| PromptFor {
            template: "p",
            bot_name: "b",
            user_name,
            platform: "telegram",
            now,
        };
        let counted = std::cell::Cell::new(0);
        let count = |t: &str| {
            counted.set(counted.get() + 1);
            t.len()
        };
        let (a, n) = p.render_counted(&what("Ann", day(1)), count).unwrap();
        assert_eq!((&*a, n), ("Hi Ann, 2026-12-01.", 19));
        let (again, _) = p.render_counted(&what("Ann", day(1)), count).unwrap();
        assert_eq!(
            (&*again, counted.get()),
            (&*a, 1),
            "remembered: counted once"
        );
        let (b, _) = p.render_counted(&what("Ann\0x", day(1)), count).unwrap();
        assert_eq!(&*b, "Hi Ann\0x, 2026-12-01.");
        let (c, _) = p.render_counted(&what("Ann", day(2)), count).unwrap();
        assert_eq!((&*c, counted.get()), ("Hi Ann, 2026-12-02.", 3));
        assert!(p
            .render_counted(
                &PromptFor {
                    template: "nope",
                    ..what("Ann", day(1))
                },
                count
            )
            .is_err());
    }

    #[test]
    fn unknown_field_is_an_error() {
        let mut src = BTreeMap::new();
        src.insert("p".to_string(), "{{nope}}".to_string());
        let p = Prompts::new(&src).unwrap();
        let vars = PromptVars {
            bot_name: "a",
            user_name: "b",
            platform: "c",
            date: "d",
        };
        assert!(p.render("p", &vars).is_err());
        assert!(p.render("missing", &vars).is_err());
    }

    #[test]
    fn counts_tokens() {
        let t = Tokenizer::load().unwrap();
        assert_eq!(t.count(""), 0);
        assert!(t.count("hello world, how are you today?") >= 6);
    }
}
