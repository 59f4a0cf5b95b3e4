//! Raw shapes -> validated `Config`: value checks, cross-file checks and the production policy, every problem collected.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;

use toml::{Table, Value};

use super::defaults;
use super::raw::{self, Doc, RawBot, RawPerEnv};
use super::secrets::{self, Vars};
use super::{
    AdminsConfig, AuditConfig, BotConfig, BotLimits, CacheConfig, CacheScope, Config,
    DeliveryConfig, DiscordBot, Env, HttpConfig, LimitsConfig, LlmConfig, LogConfig, LogFormat,
    MemoryConfig, PlatformConfig, Problem, Secret, StoreConfig, TelegramBot, DATA_KEY_ENV,
};

/// Collects problems for one file.
struct Check<'a> {
    file: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl Check<'_> {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem::new(self.file, key, message));
    }

    /// A required key is missing, unless it is absent because its value was already reported as invalid.
    fn required(&mut self, key: &str, message: &str) {
        if !self
            .problems
            .iter()
            .any(|p| p.file == self.file && p.key == key)
        {
            self.push(key, message);
        }
    }

    /// Zero is never a sensible value for these (a zero rate or size stops the service).
    fn at_least_one<T: PartialEq + Default>(&mut self, key: &str, value: T) {
        if value == T::default() {
            self.push(key, "must be at least 1");
        }
    }

    fn url(&mut self, key: &str, value: &str) -> String {
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

    fn temperature(&mut self, key: &str, value: Option<f32>) {
        if let Some(t) = value {
            if !(0.0..=2.0).contains(&t) {
                self.push(key, format!("{t} is out of range (0.0 to 2.0)"));
            }
        }
    }

    fn env_name(&mut self, key: &str, value: &str) {
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

// ---------------------------------------------------------------------------
// config/<env>.toml

/// Build the settings part of `Config` (no bots, prompts or secrets yet) from the
/// config table, reporting every bad key and value.
pub(crate) fn settings(
    doc: &Doc<'_>,
    table: Table,
    env: Env,
    root: &Path,
    problems: &mut Vec<Problem>,
) -> Config {
    let top: raw::RawTop = raw::section(doc, "", table, problems);
    let http: raw::RawHttp = raw::section(doc, "http", top.http, problems);
    let log: raw::RawLog = raw::section(doc, "log", top.log, problems);
    let llm: raw::RawLlm = raw::section(doc, "llm", top.llm, problems);
    let limits: raw::RawLimits = raw::section(doc, "limits", top.limits, problems);
    let memory: raw::RawMemory = raw::section(doc, "memory", top.memory, problems);
    let cache: raw::RawCache = raw::section(doc, "cache", top.cache, problems);
    let store: raw::RawStore = raw::section(doc, "store", top.store, problems);
    let admins: raw::RawAdmins = raw::section(doc, "admins", top.admins, problems);
    let telegram: raw::RawPlatform = raw::section(doc, "telegram", top.telegram, problems);
    let discord: raw::RawPlatform = raw::section(doc, "discord", top.discord, problems);
    let delivery: raw::RawDelivery = raw::section(doc, "delivery", top.delivery, problems);
    let audit: raw::RawAudit = raw::section(doc, "audit", top.audit, problems);

    let mut c = Check {
        file: doc.file,
        problems,
    };

    let data_dir = top.data_dir.unwrap_or_else(|| defaults::data_dir(env));
    if data_dir.trim().is_empty() {
        c.push("data_dir", "must not be empty");
    }
    let shutdown_timeout_secs = top
        .shutdown_timeout_secs
        .unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS);
    c.at_least_one("shutdown_timeout_secs", shutdown_timeout_secs);

    let bind = match http.bind.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            c.push(
                "http.bind",
                format!(
                    "`{}` is not an IP:port address (e.g. 127.0.0.1:9464)",
                    http.bind
                ),
            );
            // Never used: the problem stops the load.
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };

    let format = match log.format.as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            c.push(
                "log.format",
                format!("`{other}` is not one of \"pretty\", \"json\""),
            );
            LogFormat::Pretty
        }
    };
    if log.level.trim().is_empty() {
        c.push(
            "log.level",
            "must not be empty (e.g. \"info\" or \"info,confab=debug\")",
        );
    }

    let base_url = c.url("llm.base_url", &llm.base_url);
    c.env_name("llm.api_key_env", &llm.api_key_env);
    if llm.model.trim().is_empty() {
        c.push("llm.model", "must not be empty");
    }
    c.at_least_one("llm.timeout_secs", llm.timeout_secs);
    c.at_least_one("llm.connect_timeout_secs", llm.connect_timeout_secs);
    c.at_least_one("llm.max_concurrent", llm.max_concurrent);
    c.at_least_one("llm.breaker_failures", llm.breaker_failures);
    c.at_least_one("llm.breaker_cooldown_secs", llm.breaker_cooldown_secs);
    c.at_least_one("llm.queue_timeout_secs", llm.queue_timeout_secs);
    // Durations become `Instant` arithmetic: bound them so no value can overflow it.
    for (key, value, max) in [
        ("llm.timeout_secs", llm.timeout_secs, 3_600),
        ("llm.connect_timeout_secs", llm.connect_timeout_secs, 3_600),
        (
            "llm.breaker_cooldown_secs",
            llm.breaker_cooldown_secs,
            86_400,
        ),
        ("llm.retry_after_cap_secs", llm.retry_after_cap_secs, 3_600),
        ("llm.backoff_base_ms", llm.backoff_base_ms, 600_000),
        ("llm.queue_timeout_secs", llm.queue_timeout_secs, 3_600),
        (
            "delivery.max_retry_secs",
            delivery.max_retry_secs,
            7 * 86_400,
        ),
        ("shutdown_timeout_secs", shutdown_timeout_secs, 3_600),
    ] {
        if value > max {
            c.push(key, format!("{value} is too large (at most {max})"));
        }
    }
    if llm.max_retries > 20 {
        c.push(
            "llm.max_retries",
            format!("{} is too many (at most 20)", llm.max_retries),
        );
    }
    c.temperature("llm.temperature", llm.temperature);
    if let Some(n) = llm.max_tokens {
        c.at_least_one("llm.max_tokens", n);
    }

    c.at_least_one("limits.messages_per_minute", limits.messages_per_minute);
    c.at_least_one("limits.burst", limits.burst);
    c.at_least_one("limits.daily_tokens", limits.daily_tokens);
    c.at_least_one("limits.max_input_chars", limits.max_input_chars);
    c.at_least_one("limits.commands_per_minute", limits.commands_per_minute);
    c.at_least_one("limits.commands_burst", limits.commands_burst);
    c.at_least_one("delivery.max_queue_per_chat", delivery.max_queue_per_chat);
    c.at_least_one("delivery.max_pending", delivery.max_pending);
    c.at_least_one("delivery.max_retry_secs", delivery.max_retry_secs);
    c.at_least_one("audit.retention_days", audit.retention_days);

    c.at_least_one("memory.max_context_tokens", memory.max_context_tokens);
    c.at_least_one("memory.retention_days", memory.retention_days);

    let scope = match cache.scope.as_str() {
        "global" => CacheScope::Global,
        "user" => CacheScope::User,
        other => {
            c.push(
                "cache.scope",
                format!("`{other}` is not one of \"global\", \"user\""),
            );
            CacheScope::Global
        }
    };
    if cache.enabled {
        c.at_least_one("cache.ttl_secs", cache.ttl_secs);
        c.at_least_one("cache.max_entries", cache.max_entries);
    }

    c.at_least_one("store.cache_capacity_mb", store.cache_capacity_mb);
    c.at_least_one("store.flush_every_ms", store.flush_every_ms);
    if store.group_commit_us > 100_000 {
        c.push(
            "store.group_commit_us",
            format!(
                "{} is too long a wait before each flush; use at most 100000 (100 ms), 0 to flush at once",
                store.group_commit_us
            ),
        );
    }

    if admins.telegram.iter().any(|id| *id <= 0) {
        c.push(
            "admins.telegram",
            "user ids are positive numbers (group ids cannot be admins)",
        );
    }
    if admins.discord.contains(&0) {
        c.push("admins.discord", "0 is not a Discord user id");
    }

    for (section, p) in [("telegram", &telegram), ("discord", &discord)] {
        for (key, v) in [
            ("per_chat_per_minute", p.per_chat_per_minute),
            ("group_per_minute", p.group_per_minute),
            ("global_per_second", p.global_per_second),
        ] {
            if let Some(v) = v {
                c.at_least_one(&format!("{section}.{key}"), v);
            }
        }
    }
    let telegram_url = c.url(
        "telegram.api_url",
        telegram
            .api_url
            .as_deref()
            .unwrap_or(defaults::TELEGRAM.api_url),
    );
    let discord_url = c.url(
        "discord.api_url",
        discord
            .api_url
            .as_deref()
            .unwrap_or(defaults::DISCORD.api_url),
    );

    Config {
        env,
        root: root.to_path_buf(),
        data_dir: data_dir.into(),
        shutdown_timeout_secs,
        http: HttpConfig { bind },
        log: LogConfig {
            format,
            level: log.level,
            unsafe_debug: log.unsafe_debug,
        },
        llm: LlmConfig {
            base_url,
            api_key_env: llm.api_key_env,
            api_key: None,
            model: llm.model,
            timeout_secs: llm.timeout_secs,
            connect_timeout_secs: llm.connect_timeout_secs,
            max_retries: llm.max_retries,
            max_concurrent: llm.max_concurrent,
            requests_per_minute: llm.requests_per_minute,
            retry_after_cap_secs: llm.retry_after_cap_secs,
            backoff_base_ms: llm.backoff_base_ms,
            breaker_failures: llm.breaker_failures,
            breaker_cooldown_secs: llm.breaker_cooldown_secs,
            queue_timeout_secs: llm.queue_timeout_secs,
            temperature: llm.temperature,
            max_tokens: llm.max_tokens,
        },
        limits: LimitsConfig {
            messages_per_minute: limits.messages_per_minute,
            burst: limits.burst,
            daily_tokens: limits.daily_tokens,
            max_input_chars: limits.max_input_chars,
            commands_per_minute: limits.commands_per_minute,
            commands_burst: limits.commands_burst,
        },
        memory: MemoryConfig {
            max_context_tokens: memory.max_context_tokens,
            retention_days: memory.retention_days,
        },
        cache: CacheConfig {
            enabled: cache.enabled,
            ttl_secs: cache.ttl_secs,
            max_entries: cache.max_entries,
            scope,
        },
        store: StoreConfig {
            cache_capacity_mb: store.cache_capacity_mb,
            flush_every_ms: store.flush_every_ms,
            group_commit_us: store.group_commit_us,
        },
        admins: AdminsConfig {
            telegram: admins.telegram,
            discord: admins.discord,
        },
        telegram: PlatformConfig {
            api_url: telegram_url,
            per_chat_per_minute: telegram
                .per_chat_per_minute
                .unwrap_or(defaults::TELEGRAM.per_chat_per_minute),
            group_per_minute: telegram
                .group_per_minute
                .unwrap_or(defaults::TELEGRAM.group_per_minute),
            global_per_second: telegram
                .global_per_second
                .unwrap_or(defaults::TELEGRAM.global_per_second),
        },
        discord: PlatformConfig {
            api_url: discord_url,
            per_chat_per_minute: discord
                .per_chat_per_minute
                .unwrap_or(defaults::DISCORD.per_chat_per_minute),
            group_per_minute: discord
                .group_per_minute
                .unwrap_or(defaults::DISCORD.group_per_minute),
            global_per_second: discord
                .global_per_second
                .unwrap_or(defaults::DISCORD.global_per_second),
        },
        delivery: DeliveryConfig {
            max_retry_secs: delivery.max_retry_secs,
            max_queue_per_chat: delivery.max_queue_per_chat,
            max_pending: delivery.max_pending,
        },
        audit: AuditConfig {
            retention_days: audit.retention_days,
        },
        bots: Vec::new(),
        prompts: BTreeMap::new(),
        data_key: None,
    }
}

// ---------------------------------------------------------------------------
// bots/<name>.toml

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
    let limits: Option<raw::RawBotLimits> =
        rb.limits.map(|t| raw::section(doc, "limits", t, problems));
    let telegram: Option<raw::RawTelegramBot> = rb
        .telegram
        .map(|t| raw::section(doc, "telegram", t, problems));
    let discord: Option<raw::RawDiscordBot> = rb
        .discord
        .map(|t| raw::section(doc, "discord", t, problems));

    let telegram_id = telegram
        .as_ref()
        .and_then(|t| identities(doc, "telegram.username", t.username.clone(), problems));
    let discord_id = discord.as_ref().and_then(|d| {
        identities(
            doc,
            "discord.application_id",
            d.application_id.clone(),
            problems,
        )
    });

    let mut c = Check {
        file: doc.file,
        problems,
    };

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
    let prompt = match rb.prompt {
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
    };
    if rb.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        c.push("model", "must not be empty (leave it out to use llm.model)");
    }
    c.temperature("temperature", rb.temperature);
    if let Some(n) = rb.max_tokens {
        c.at_least_one("max_tokens", n);
    }
    let limits = limits.map(|l| {
        if let Some(v) = l.messages_per_minute {
            c.at_least_one("limits.messages_per_minute", v);
        }
        if let Some(v) = l.burst {
            c.at_least_one("limits.burst", v);
        }
        if let Some(v) = l.daily_tokens {
            c.at_least_one("limits.daily_tokens", v);
        }
        BotLimits {
            messages_per_minute: l.messages_per_minute,
            burst: l.burst,
            daily_tokens: l.daily_tokens,
        }
    });

    let telegram = telegram.map(|t| {
        let token_env = token_env(&mut c, "telegram.token_env", t.token_env);
        let username = telegram_id.as_ref().and_then(|ids| {
            let name = ids.for_env(env)?;
            let name = name.strip_prefix('@').unwrap_or(&name).to_owned();
            Some(name)
        });
        if let Some(ids) = &telegram_id {
            for (which, u) in [("staging", &ids.staging), ("production", &ids.production)] {
                if let Some(u) = u {
                    let u = u.strip_prefix('@').unwrap_or(u);
                    if u.is_empty() || !u.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                    {
                        c.push(
                            &format!("telegram.username.{which}"),
                            format!("`{u}` is not a Telegram username (letters, digits, `_`)"),
                        );
                    }
                }
            }
            same_identity(&mut c, "telegram.username", ids, |s| {
                s.trim_start_matches('@').to_ascii_lowercase()
            });
        }
        let other_username = telegram_id.as_ref().and_then(|ids| {
            let name = ids.for_env(env.other())?;
            Some(name.trim_start_matches('@').to_owned())
        });
        TelegramBot {
            token_env,
            username,
            other_username,
            token: None,
        }
    });

    let discord = discord.map(|d| {
        let token_env = token_env(&mut c, "discord.token_env", d.token_env);
        let application_id = discord_id.as_ref().and_then(|ids| ids.for_env(env));
        if let Some(ids) = &discord_id {
            for (which, id) in [("staging", &ids.staging), ("production", &ids.production)] {
                if let Some(id) = id {
                    if id.is_empty() || !id.chars().all(|ch| ch.is_ascii_digit()) {
                        c.push(
                            &format!("discord.application_id.{which}"),
                            format!("`{id}` is not a Discord application id (digits only)"),
                        );
                    }
                }
            }
            same_identity(&mut c, "discord.application_id", ids, str::to_owned);
        }
        let other_application_id = discord_id.as_ref().and_then(|ids| ids.for_env(env.other()));
        DiscordBot {
            token_env,
            application_id,
            other_application_id,
            token: None,
        }
    });

    BotConfig {
        name: name.to_owned(),
        prompt,
        model: rb.model,
        temperature: rb.temperature,
        max_tokens: rb.max_tokens,
        stream: rb.stream,
        limits,
        telegram,
        discord,
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

pub(crate) fn bot_file(name: &str) -> String {
    format!("bots/{name}.toml")
}

// ---------------------------------------------------------------------------
// Secrets and the environment policy (SPEC §5)

pub(crate) struct Policy<'a> {
    pub config_file: &'a str,
    /// False when the config file was missing or unparsable: its settings are
    /// defaults, so checks on them would only add noise.
    pub config_parsed: bool,
    pub require_platform_tokens: bool,
}

/// Fill in secrets from `vars` and apply the per-environment rules.
pub(crate) fn secrets_and_policy(
    config: &mut Config,
    vars: &Vars,
    policy: &Policy<'_>,
    problems: &mut Vec<Problem>,
) {
    let env = config.env;
    let production = env == Env::Production;
    let required = policy.require_platform_tokens;

    config.llm.api_key = {
        let mut c = Check {
            file: policy.config_file,
            problems,
        };
        // An LLM without a key (a local server) is fine in staging; production needs a real one.
        secret(
            &mut c,
            "llm.api_key_env",
            &config.llm.api_key_env,
            vars,
            production && required,
            production,
        )
    };

    if policy.config_parsed
        && production
        && config.admins.telegram.is_empty()
        && config.admins.discord.is_empty()
    {
        problems.push(Problem::new(
            policy.config_file,
            "admins",
            "production needs at least one admin",
        ));
    }

    config.data_key = vars.get(DATA_KEY_ENV).filter(|v| !v.is_empty()).map(|v| {
        if production {
            if let Some(why) = secrets::weakness(v) {
                problems.push(Problem::new(
                    "env",
                    DATA_KEY_ENV,
                    format!("{DATA_KEY_ENV} {why}; production needs a real secret"),
                ));
            }
        }
        Secret::new(v.to_owned())
    });

    let needs_identity = production || required;
    for bot in &mut config.bots {
        let file = bot_file(&bot.name);
        let mut c = Check {
            file: &file,
            problems,
        };
        if let Some(t) = &mut bot.telegram {
            t.token = secret(
                &mut c,
                "telegram.token_env",
                &t.token_env,
                vars,
                required,
                production,
            );
            if needs_identity && t.username.is_none() {
                c.push("telegram.username", format!("no {env} identity"));
            }
        }
        if let Some(d) = &mut bot.discord {
            d.token = secret(
                &mut c,
                "discord.token_env",
                &d.token_env,
                vars,
                required,
                production,
            );
            if needs_identity && d.application_id.is_none() {
                c.push("discord.application_id", format!("no {env} identity"));
            }
        }
    }
}

/// Read the secret named by `var`. Problems name the variable, never the value.
fn secret(
    c: &mut Check<'_>,
    key: &str,
    var: &str,
    vars: &Vars,
    required: bool,
    production: bool,
) -> Option<Secret> {
    if var.is_empty() || !secrets::is_env_name(var) {
        return None; // already reported
    }
    match vars.get(var) {
        None => {
            if required {
                c.push(key, format!("environment variable {var} is not set"));
            }
            None
        }
        Some("") => {
            if required || production {
                c.push(key, format!("environment variable {var} is empty"));
            }
            None
        }
        Some(value) => {
            if production {
                if let Some(why) = secrets::weakness(value) {
                    c.push(key, format!("{var} {why}; production needs a real secret"));
                }
            }
            Some(Secret::new(value.to_owned()))
        }
    }
}
