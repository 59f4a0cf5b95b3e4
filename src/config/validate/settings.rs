//! `config/<env>.toml`: every section is deserialised first (so type errors come first,
//! in file order), then checked by its own validator into its config struct.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use toml::Table;

use super::Check;
use crate::config::defaults;
use crate::config::raw::{self, Doc};
use crate::config::{
    AdminsConfig, AuditConfig, CacheConfig, CacheScope, Config, DeliveryConfig, Env, HttpConfig,
    LimitsConfig, LlmConfig, LogConfig, LogFormat, MediaConfig, MemoryConfig, OtelConfig,
    PlatformConfig, Problem, StoreConfig,
};

/// The sections of the config file, deserialised (not yet checked).
struct Sections {
    top: raw::RawTop,
    http: raw::RawHttp,
    log: raw::RawLog,
    llm: LlmConfig,
    limits: LimitsConfig,
    memory: MemoryConfig,
    cache: raw::RawCache,
    store: StoreConfig,
    admins: AdminsConfig,
    telegram: raw::RawTelegram,
    discord: raw::RawDiscord,
    delivery: DeliveryConfig,
    audit: AuditConfig,
    otel: OtelConfig,
    media: MediaConfig,
}

/// Deserialise every section, each reporting its own bad keys with its dotted path
/// (in this order).
fn read(doc: &Doc<'_>, table: Table, problems: &mut Vec<Problem>) -> Sections {
    let mut top: raw::RawTop = raw::section(doc, "", table, problems);
    macro_rules! sections {
        ($($name:ident),*) => {
            Sections {
                $($name: raw::section(doc, stringify!($name), std::mem::take(&mut top.$name), problems),)*
                top,
            }
        };
    }
    sections!(
        http, log, llm, limits, memory, cache, store, admins, telegram, discord, delivery, audit,
        otel, media
    )
}

/// Build the settings part of `Config` (no bots, prompts or secrets yet) from the
/// config table, reporting every bad key and value.
pub(crate) fn settings(
    doc: &Doc<'_>,
    table: Table,
    env: Env,
    root: &Path,
    problems: &mut Vec<Problem>,
) -> Config {
    let s = read(doc, table, problems);
    let mut c = Check {
        file: doc.file,
        problems,
    };
    let c = &mut c;
    let (data_dir, shutdown_timeout_secs) = top(s.top, env, c);
    Config {
        env,
        root: root.to_path_buf(),
        data_dir,
        shutdown_timeout_secs,
        http: http(s.http, c),
        log: log(s.log, c),
        llm: llm(s.llm, c),
        limits: limits(s.limits, c),
        memory: memory(s.memory, c),
        cache: cache(s.cache, c),
        store: store(s.store, c),
        admins: admins(s.admins, c),
        telegram: platform("telegram", s.telegram.platform, &defaults::TELEGRAM, c),
        telegram_mode: super::scale::telegram_mode(&s.telegram.own, env, c),
        discord: platform("discord", s.discord.platform, &defaults::DISCORD, c),
        discord_shards: super::scale::discord_shards(&s.discord.own, c),
        delivery: delivery(s.delivery, c),
        audit: audit(s.audit, c),
        otel: super::otel::otel(s.otel, c),
        media: super::media::media(s.media, c),
        bots: Vec::new(),
        prompts: BTreeMap::new(),
        data_key: None,
    }
}

/// The top-level keys: `data_dir` and `shutdown_timeout_secs`.
fn top(t: raw::RawTop, env: Env, c: &mut Check<'_>) -> (std::path::PathBuf, u64) {
    let data_dir = t.data_dir.unwrap_or_else(|| defaults::data_dir(env));
    if data_dir.trim().is_empty() {
        c.push("data_dir", "must not be empty");
    }
    let shutdown = t
        .shutdown_timeout_secs
        .unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS);
    c.at_least_one("shutdown_timeout_secs", shutdown);
    c.at_most("shutdown_timeout_secs", shutdown, 3_600);
    (data_dir.into(), shutdown)
}

fn http(h: raw::RawHttp, c: &mut Check<'_>) -> HttpConfig {
    let bind = match h.bind.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            c.push(
                "http.bind",
                format!(
                    "`{}` is not an IP:port address (e.g. 127.0.0.1:9464)",
                    h.bind
                ),
            );
            // Never used: the problem stops the load.
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    HttpConfig { bind }
}

fn log(l: raw::RawLog, c: &mut Check<'_>) -> LogConfig {
    let choices = [("pretty", LogFormat::Pretty), ("json", LogFormat::Json)];
    // A bad value is a problem: the fallback is never used.
    let format = c
        .one_of("log.format", &l.format, &choices)
        .unwrap_or(LogFormat::Pretty);
    if l.level.trim().is_empty() {
        c.push(
            "log.level",
            "must not be empty (e.g. \"info\" or \"info,confab=debug\")",
        );
    }
    LogConfig {
        format,
        level: l.level,
        unsafe_debug: l.unsafe_debug,
    }
}

fn llm(mut l: LlmConfig, c: &mut Check<'_>) -> LlmConfig {
    l.base_url = c.url("llm.base_url", &l.base_url);
    c.env_name("llm.api_key_env", &l.api_key_env);
    if l.model.trim().is_empty() {
        c.push("llm.model", "must not be empty");
    }
    c.each_at_least_one(
        "llm",
        &[
            ("timeout_secs", l.timeout_secs),
            ("connect_timeout_secs", l.connect_timeout_secs),
            ("max_concurrent", l.max_concurrent as u64),
            ("breaker_failures", l.breaker_failures.into()),
            ("breaker_cooldown_secs", l.breaker_cooldown_secs),
            ("queue_timeout_secs", l.queue_timeout_secs),
        ],
    );
    c.each_at_most(
        "llm",
        &[
            ("timeout_secs", l.timeout_secs, 3_600),
            ("connect_timeout_secs", l.connect_timeout_secs, 3_600),
            ("breaker_cooldown_secs", l.breaker_cooldown_secs, 86_400),
            ("retry_after_cap_secs", l.retry_after_cap_secs, 3_600),
            ("backoff_base_ms", l.backoff_base_ms, 600_000),
            ("queue_timeout_secs", l.queue_timeout_secs, 3_600),
        ],
    );
    c.at_most_saying(
        "llm.max_retries",
        l.max_retries.into(),
        20,
        " is too many (at most 20)",
    );
    c.temperature("llm.temperature", l.temperature);
    if let Some(n) = l.max_tokens {
        c.at_least_one("llm.max_tokens", n);
    }
    l
}

fn limits(l: LimitsConfig, c: &mut Check<'_>) -> LimitsConfig {
    c.each_at_least_one(
        "limits",
        &[
            ("messages_per_minute", l.messages_per_minute.into()),
            ("burst", l.burst.into()),
            ("daily_tokens", l.daily_tokens),
            ("max_input_chars", l.max_input_chars as u64),
            ("commands_per_minute", l.commands_per_minute.into()),
            ("commands_burst", l.commands_burst.into()),
        ],
    );
    l
}

fn memory(m: MemoryConfig, c: &mut Check<'_>) -> MemoryConfig {
    c.at_least_one("memory.max_context_tokens", m.max_context_tokens);
    c.at_least_one("memory.retention_days", m.retention_days);
    m
}

fn cache(k: raw::RawCache, c: &mut Check<'_>) -> CacheConfig {
    let choices = [("global", CacheScope::Global), ("user", CacheScope::User)];
    let scope = c
        .one_of("cache.scope", &k.scope, &choices)
        .unwrap_or(CacheScope::Global);
    if k.enabled {
        c.at_least_one("cache.ttl_secs", k.ttl_secs);
        c.at_least_one("cache.max_entries", k.max_entries);
    }
    CacheConfig {
        enabled: k.enabled,
        ttl_secs: k.ttl_secs,
        max_entries: k.max_entries,
        scope,
    }
}

fn store(s: StoreConfig, c: &mut Check<'_>) -> StoreConfig {
    c.at_least_one("store.cache_capacity_mb", s.cache_capacity_mb);
    c.at_least_one("store.flush_every_ms", s.flush_every_ms);
    c.at_most_saying(
        "store.group_commit_us",
        s.group_commit_us,
        100_000,
        " is too long a wait before each flush; use at most 100000 (100 ms), 0 to flush at once",
    );
    c.env_name("store.redis_url_env", &s.redis_url_env);
    c.at_least_one("store.redis_timeout_ms", s.redis_timeout_ms);
    c.at_most_saying(
        "store.redis_timeout_ms",
        s.redis_timeout_ms,
        60_000,
        " ms is too long a wait for Redis; use at most 60000",
    );
    if let Some(p) = &s.redis_prefix {
        let bad = |ch: char| ch.is_whitespace() || ch.is_control() || "{}*?[]\\".contains(ch);
        if p.is_empty() || p.len() > 64 || p.chars().any(bad) {
            c.push(
                "store.redis_prefix",
                "1 to 64 characters without spaces, braces or glob characters (e.g. \"confab:staging\")",
            );
        }
    }
    s
}

fn admins(a: AdminsConfig, c: &mut Check<'_>) -> AdminsConfig {
    if a.telegram.iter().any(|id| *id <= 0) {
        c.push(
            "admins.telegram",
            "user ids are positive numbers (group ids cannot be admins)",
        );
    }
    if a.discord.contains(&0) {
        c.push("admins.discord", "0 is not a Discord user id");
    }
    a
}

/// `[telegram]` or `[discord]`: unset keys take that platform's defaults.
fn platform(
    section: &str,
    p: raw::RawPlatform,
    d: &defaults::Platform,
    c: &mut Check<'_>,
) -> PlatformConfig {
    let per_chat_per_minute = p.per_chat_per_minute.unwrap_or(d.per_chat_per_minute);
    let group_per_minute = p.group_per_minute.unwrap_or(d.group_per_minute);
    let global_per_second = p.global_per_second.unwrap_or(d.global_per_second);
    c.each_at_least_one(
        section,
        &[
            ("per_chat_per_minute", per_chat_per_minute.into()),
            ("group_per_minute", group_per_minute.into()),
            ("global_per_second", global_per_second.into()),
        ],
    );
    let api_url = c.url(
        &format!("{section}.api_url"),
        p.api_url.as_deref().unwrap_or(d.api_url),
    );
    PlatformConfig {
        api_url,
        per_chat_per_minute,
        group_per_minute,
        global_per_second,
    }
}

fn delivery(d: DeliveryConfig, c: &mut Check<'_>) -> DeliveryConfig {
    c.each_at_least_one(
        "delivery",
        &[
            ("max_queue_per_chat", d.max_queue_per_chat as u64),
            ("max_pending", d.max_pending as u64),
            ("max_retry_secs", d.max_retry_secs),
        ],
    );
    c.at_most("delivery.max_retry_secs", d.max_retry_secs, 7 * 86_400);
    c.at_most("delivery.orphan_replay_secs", d.orphan_replay_secs, 86_400);
    d
}

fn audit(a: AuditConfig, c: &mut Check<'_>) -> AuditConfig {
    c.at_least_one("audit.retention_days", a.retention_days);
    a
}
