//! `[telegram] mode` with the webhook keys, and `[discord] shards` (SPEC §14).

use std::net::SocketAddr;

use toml::Value;

use super::Check;
use crate::config::defaults;
use crate::config::raw::{RawDiscordOwn, RawTelegramOwn};
use crate::config::{Env, Shards, TelegramMode, WebhookConfig};

/// `[telegram] mode` and, in webhook mode, `webhook_url`, `webhook_bind` and
/// `webhook_secret_env` (the secret itself is read with the other secrets).
pub(crate) fn telegram_mode(t: &RawTelegramOwn, env: Env, c: &mut Check<'_>) -> TelegramMode {
    let mode = t.mode.as_deref().unwrap_or(defaults::TELEGRAM_MODE);
    let choices = [("polling", false), ("webhook", true)];
    if !c.one_of("telegram.mode", mode, &choices).unwrap_or(false) {
        return TelegramMode::Polling;
    }
    let url = match t.webhook_url.as_deref() {
        None | Some("") => {
            c.push(
                "telegram.webhook_url",
                "required with mode = \"webhook\": the public https:// URL Telegram calls \
                 (e.g. \"https://bot.example.com\"; each bot is served at <url>/telegram/<bot>)",
            );
            String::new()
        }
        Some(url) => webhook_url(url, env, c),
    };
    let bind_text = t
        .webhook_bind
        .as_deref()
        .unwrap_or(defaults::TELEGRAM_WEBHOOK_BIND);
    let bind = bind_text.parse::<SocketAddr>().unwrap_or_else(|_| {
        c.push(
            "telegram.webhook_bind",
            format!("`{bind_text}` is not an IP:port address (e.g. 127.0.0.1:8443)"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    let secret_env = t
        .webhook_secret_env
        .clone()
        .unwrap_or_else(|| defaults::TELEGRAM_WEBHOOK_SECRET_ENV.into());
    c.env_name("telegram.webhook_secret_env", &secret_env);
    TelegramMode::Webhook(WebhookConfig {
        url,
        bind,
        secret_env,
        secret: None,
    })
}

fn webhook_url(url: &str, env: Env, c: &mut Check<'_>) -> String {
    let key = "telegram.webhook_url";
    let before = c.problems.len();
    let url = c.url(key, url);
    if c.problems.len() > before {
        return url;
    }
    if url.contains(['?', '#']) {
        c.push(
            key,
            "must not carry a query or fragment (the daemon appends /telegram/<bot>)",
        );
    }
    if env == Env::Production && !url.starts_with("https://") {
        c.push(
            key,
            format!("`{url}` is not https://; Telegram calls webhooks over HTTPS only (http:// is allowed in staging, for tests)"),
        );
    }
    url
}

/// Telegram's rule for `secret_token`: 1–256 characters of `A-Z a-z 0-9 _ -`.
pub(crate) fn webhook_secret_problem(value: &str) -> Option<&'static str> {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if value.is_empty() || value.len() > 256 || !value.bytes().all(ok_char) {
        return Some(
            "must be 1 to 256 characters of A-Z, a-z, 0-9, `_` and `-` (Telegram's rule for the secret token)",
        );
    }
    None
}

/// `[discord] shards`: `"auto"` or `{ total = N, ids = "A-B" }`.
pub(crate) fn discord_shards(d: &RawDiscordOwn, c: &mut Check<'_>) -> Shards {
    const KEY: &str = "discord.shards";
    const SHAPE: &str =
        "\"auto\" or { total = N, ids = \"A-B\" } (e.g. { total = 4, ids = \"0-1\" })";
    let table = match &d.shards {
        None => return Shards::Auto,
        Some(Value::String(s)) if s == "auto" => return Shards::Auto,
        Some(Value::Table(t)) => t,
        Some(other) => {
            c.push(KEY, format!("{} is not {SHAPE}", shown(other)));
            return Shards::Auto;
        }
    };
    for key in table
        .keys()
        .filter(|k| !["total", "ids"].contains(&k.as_str()))
    {
        c.push(
            &format!("{KEY}.{key}"),
            "unknown key (expected `total` and `ids`)",
        );
    }
    let total = match table.get("total") {
        Some(Value::Integer(n)) if (1..=i64::from(u16::MAX)).contains(n) => *n as u32,
        Some(Value::Integer(n)) => {
            c.push(
                &format!("{KEY}.total"),
                format!("{n} is not a shard count (1 to 65535)"),
            );
            return Shards::Auto;
        }
        Some(other) => {
            c.push(
                &format!("{KEY}.total"),
                format!("{} is not a number", shown(other)),
            );
            return Shards::Auto;
        }
        None => {
            c.push(KEY, format!("`total` is missing: {SHAPE}"));
            return Shards::Auto;
        }
    };
    let Some((first, last)) = shard_ids(table.get("ids"), total, c) else {
        return Shards::Auto;
    };
    Shards::Range { total, first, last }
}

/// `ids = "A-B"` (or `"A"`), checked against `total`.
fn shard_ids(ids: Option<&Value>, total: u32, c: &mut Check<'_>) -> Option<(u32, u32)> {
    const KEY: &str = "discord.shards.ids";
    let text = match ids {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Integer(n)) => {
            c.push(
                KEY,
                format!("write the range as a string: ids = \"{n}-{n}\""),
            );
            return None;
        }
        Some(other) => {
            c.push(
                KEY,
                format!("{} is not a shard range like \"0-3\"", shown(other)),
            );
            return None;
        }
        None => {
            c.push(
                KEY,
                format!(
                    "missing: the shards this instance runs, e.g. ids = \"0-{}\"",
                    total - 1
                ),
            );
            return None;
        }
    };
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let (Ok(first), Ok(last)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) else {
        c.push(KEY, format!("`{text}` is not a shard range like \"0-3\""));
        return None;
    };
    if first > last {
        c.push(
            KEY,
            format!("\"{text}\": the first shard ({first}) comes after the last ({last})"),
        );
        return None;
    }
    if last >= total {
        c.push(
            KEY,
            format!("\"{text}\": shard {last} does not exist with total = {total} (ids run from 0 to {})", total - 1),
        );
        return None;
    }
    Some((first, last))
}

/// A TOML value as a problem shows it (this build of `toml` cannot print values).
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(n) => n.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => format!("a {}", other.type_str()),
    }
}
