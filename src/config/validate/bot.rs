//! `bots/<name>.toml`: the bot's own keys, its `[limits]`, `[telegram]` and `[discord]`
//! sections (each with its identity per environment), and the checks across bot files.

use std::collections::{BTreeMap, HashMap};

use toml::{Table, Value};

use super::{bot_file, Check};
use crate::config::raw::{self, Doc, RawBot, RawPerEnv};
use crate::config::{BotConfig, BotLimits, Env, LlmOverrides, PlatformBot, Problem, VoiceReplies};

/// Build one bot from its file's table. `prompts` are the loaded prompt names.
pub(crate) fn bot(
    doc: &Doc<'_>,
    name: &str,
    table: Table,
    env: Env,
    prompts: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) -> BotConfig {
    let rb: RawBot = raw::section(doc, "", table, problems);
    let limits: Option<BotLimits> = rb.limits.map(|t| raw::section(doc, "limits", t, problems));
    let telegram: Option<raw::RawTelegramBot> = rb
        .telegram
        .map(|t| raw::section(doc, "telegram", t, problems));
    let discord: Option<raw::RawDiscordBot> = rb
        .discord
        .map(|t| raw::section(doc, "discord", t, problems));
    let telegram = telegram.map(|mut raw| {
        let ids = identities(doc, "telegram.username", raw.username.take(), problems);
        Platform { raw, ids }
    });
    let discord = discord.map(|mut raw| {
        let ids = identities(
            doc,
            "discord.application_id",
            raw.application_id.take(),
            problems,
        );
        Platform { raw, ids }
    });

    let mut c = Check {
        file: doc.file,
        problems,
    };
    let c = &mut c;
    check_name(name, c);
    let prompt = prompt(rb.prompt, prompts, c);
    if rb.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        c.push("model", "must not be empty (leave it out to use llm.model)");
    }
    c.temperature("temperature", rb.temperature);
    if let Some(n) = rb.max_tokens {
        c.at_least_one("max_tokens", n);
    }
    BotConfig {
        name: name.to_owned(),
        prompt,
        llm: LlmOverrides {
            model: rb.model,
            temperature: rb.temperature,
            max_tokens: rb.max_tokens,
        },
        stream: rb.stream,
        vision: rb.vision,
        voice_replies: voice_replies(rb.voice_replies.as_deref(), c),
        limits: limits.map(|l| bot_limits(l, c)),
        telegram: telegram.map(|p| telegram_bot(p, env, c)),
        discord: discord.map(|p| discord_bot(p, env, c)),
    }
}

fn voice_replies(value: Option<&str>, c: &mut Check<'_>) -> VoiceReplies {
    let choices = [
        ("never", VoiceReplies::Never),
        ("mirror", VoiceReplies::Mirror),
    ];
    value
        .and_then(|v| c.one_of("voice_replies", v, &choices))
        .unwrap_or_default()
}

fn check_name(name: &str, c: &mut Check<'_>) {
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        c.push(
            "name",
            "bot file names may use only letters, digits, `_` and `-`",
        );
    }
}

fn prompt(p: Option<String>, prompts: &BTreeMap<String, String>, c: &mut Check<'_>) -> String {
    match p {
        None => {
            c.required("prompt", "required: the name of a prompts/<name>.md file");
            String::new()
        }
        Some(p) => {
            if !prompts.contains_key(&p) {
                c.push("prompt", format!("no prompts/{p}.md"));
            }
            p
        }
    }
}

fn bot_limits(l: BotLimits, c: &mut Check<'_>) -> BotLimits {
    if let Some(v) = l.messages_per_minute {
        c.at_least_one("limits.messages_per_minute", v);
    }
    if let Some(v) = l.burst {
        c.at_least_one("limits.burst", v);
    }
    if let Some(v) = l.daily_tokens {
        c.at_least_one("limits.daily_tokens", v);
    }
    l
}

/// A platform section of a bot file: its keys, and its identity per environment.
struct Platform<T> {
    raw: T,
    ids: Option<Identities>,
}

/// `[telegram]`: the token's variable and the username per environment (`@` optional).
fn telegram_bot(p: Platform<raw::RawTelegramBot>, env: Env, c: &mut Check<'_>) -> PlatformBot {
    let Platform { raw, ids } = p;
    let token_env = token_env(c, "telegram.token_env", raw.token_env);
    let unprefixed = |name: String| name.trim_start_matches('@').to_owned();
    let (username, other_username) = match &ids {
        Some(ids) => (
            ids.for_env(env)
                .map(|n| n.strip_prefix('@').unwrap_or(&n).to_owned()),
            ids.for_env(env.other()).map(unprefixed),
        ),
        None => (None, None),
    };
    if let Some(ids) = &ids {
        for (which, u) in [("staging", &ids.staging), ("production", &ids.production)] {
            let Some(u) = u else { continue };
            let u = u.strip_prefix('@').unwrap_or(u);
            if u.is_empty() || !u.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                c.push(
                    &format!("telegram.username.{which}"),
                    format!("`{u}` is not a Telegram username (letters, digits, `_`)"),
                );
            }
        }
        same_identity(c, "telegram.username", ids, |s| {
            s.trim_start_matches('@').to_ascii_lowercase()
        });
    }
    PlatformBot {
        token_env,
        identity: username,
        other_identity: other_username,
        token: None,
    }
}

/// `[discord]`: the token's variable and the application id per environment.
fn discord_bot(p: Platform<raw::RawDiscordBot>, env: Env, c: &mut Check<'_>) -> PlatformBot {
    let Platform { raw, ids } = p;
    let token_env = token_env(c, "discord.token_env", raw.token_env);
    let application_id = ids.as_ref().and_then(|ids| ids.for_env(env));
    let other_application_id = ids.as_ref().and_then(|ids| ids.for_env(env.other()));
    if let Some(ids) = &ids {
        for (which, id) in [("staging", &ids.staging), ("production", &ids.production)] {
            let Some(id) = id else { continue };
            if id.is_empty() || !id.chars().all(|ch| ch.is_ascii_digit()) {
                c.push(
                    &format!("discord.application_id.{which}"),
                    format!("`{id}` is not a Discord application id (digits only)"),
                );
            }
        }
        same_identity(c, "discord.application_id", ids, str::to_owned);
    }
    PlatformBot {
        token_env,
        identity: application_id,
        other_identity: other_application_id,
        token: None,
    }
}

fn token_env(c: &mut Check<'_>, key: &str, value: Option<String>) -> String {
    match value {
        None => {
            c.required(
                key,
                "required: the name of the environment variable holding this bot's token",
            );
            String::new()
        }
        Some(v) => {
            c.env_name(key, &v);
            v
        }
    }
}

/// The identity a bot must have in each environment.
struct Identities {
    staging: Option<String>,
    production: Option<String>,
}

impl Identities {
    fn for_env(&self, env: Env) -> Option<String> {
        match env {
            Env::Staging => self.staging.clone(),
            Env::Production => self.production.clone(),
        }
        .filter(|s| !s.trim().is_empty())
    }
}

fn identities(
    doc: &Doc<'_>,
    key: &str,
    value: Option<Value>,
    problems: &mut Vec<Problem>,
) -> Option<Identities> {
    match value? {
        Value::Table(t) => {
            let per: RawPerEnv = raw::section(doc, key, t, problems);
            Some(Identities {
                staging: per.staging.map(|s| s.0),
                production: per.production.map(|s| s.0),
            })
        }
        Value::String(_) | Value::Integer(_) => {
            problems.push(Problem::new(
                doc.file,
                key,
                "give one per environment: { staging = \"...\", production = \"...\" } \
                 (staging and production must be different bots)",
            ));
            None
        }
        other => {
            problems.push(Problem::new(
                doc.file,
                key,
                format!("invalid type: {}, expected a table {{ staging = \"...\", production = \"...\" }}", other.type_str()),
            ));
            None
        }
    }
}

/// The seeds' hardest lesson: one bot identity must never serve both environments.
fn same_identity(c: &mut Check<'_>, key: &str, ids: &Identities, norm: impl Fn(&str) -> String) {
    if let (Some(s), Some(p)) = (&ids.staging, &ids.production) {
        if !s.is_empty() && norm(s) == norm(p) {
            c.push(key, "staging and production name the same identity; each environment needs its own bot and token");
        }
    }
}

/// Checks across bot files: two bots sharing a token would fight over the same updates.
pub(crate) fn bots_together(bots: &[BotConfig], problems: &mut Vec<Problem>) {
    let mut seen: HashMap<(&str, &str), &str> = HashMap::new();
    for b in bots {
        let platforms = [
            (
                "telegram",
                b.telegram.as_ref().map(|t| t.token_env.as_str()),
            ),
            ("discord", b.discord.as_ref().map(|d| d.token_env.as_str())),
        ];
        for (platform, var) in platforms {
            let Some(var) = var.filter(|v| !v.is_empty()) else {
                continue;
            };
            if let Some(other) = seen.insert((platform, var), &b.name) {
                problems.push(Problem::new(
                    bot_file(&b.name),
                    format!("{platform}.token_env"),
                    format!(
                        "{var} is also used by bots/{other}.toml; each bot needs its own token"
                    ),
                ));
            }
        }
    }
}
