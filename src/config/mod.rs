//! Configuration: `config/<env>.toml`, `bots/*.toml`, `prompts/*.md` and the env file, validated into one `Config` with every problem collected.
//!
//! Loading is a pure pass in the style of vector's config compiler: read every
//! file, apply `CONFAB__SECTION__KEY` overrides, deserialise section by section
//! (`deny_unknown_fields`, a default for every key), check values, resolve
//! secrets and apply the staging/production policy, and only then return either
//! a `Config` or *all* the `Problems` found. Nothing is started and the process
//! environment is not modified.
//!
//! **Invariant:** a secret value never appears in a `Problem`, a `Debug` print
//! or a log line; `Secret` redacts itself and problems name the variable only.

mod build;
pub mod defaults;
mod raw;
mod scale;
mod secrets;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use raw::Doc;
use secrets::EnvFile;

pub use scale::{Shards, TelegramMode, WebhookConfig};

/// Environment variable holding the optional key for encryption at rest.
pub const DATA_KEY_ENV: &str = "CONFAB_DATA_KEY";

// ---------------------------------------------------------------------------
// Env

/// Which deployment this process is. Each has its own files, data, keys and bot identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Env {
    Staging,
    Production,
}

impl Env {
    /// The environment a token must never be confused with.
    pub fn other(self) -> Env {
        match self {
            Env::Staging => Env::Production,
            Env::Production => Env::Staging,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Env::Staging => "staging",
            Env::Production => "production",
        }
    }
}

impl fmt::Display for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--env` was neither `staging` nor `production`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown environment `{0}` (expected \"staging\" or \"production\")")]
pub struct ParseEnvError(pub String);

impl FromStr for Env {
    type Err = ParseEnvError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "staging" => Ok(Env::Staging),
            "production" => Ok(Env::Production),
            other => Err(ParseEnvError(other.to_owned())),
        }
    }
}

// ---------------------------------------------------------------------------
// Secret

/// A secret value (token, API key). Prints as `[REDACTED]`; read it with `expose`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value itself: pass it straight to the client that needs it, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

// ---------------------------------------------------------------------------
// Problems

/// One thing wrong with the configuration, printed as `file: key: message`.
/// `file` is relative to the root (`config/staging.toml`), or `env` for an
/// environment variable; `key` is a dotted path (`llm.base_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(
        file: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        // One problem per output line, whatever the underlying error printed.
        let message = message.into().replace("\r\n", "; ").replace('\n', "; ");
        Self {
            file: file.into(),
            key: key.into(),
            message,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.key, self.message)
    }
}

/// Every problem found by one load, in the order found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

// ---------------------------------------------------------------------------
// Config

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Holds `config/`, `bots/`, `prompts/` and `.env.<env>`.
    pub root: PathBuf,
    pub env: Env,
    /// `--env-file`; when `None`, `<root>/.env.<env>` is used if it exists.
    pub env_file: Option<PathBuf>,
    /// The command will talk to the platforms (`run`, `check`): every enabled
    /// platform needs its token and an identity for this environment, and in
    /// production the LLM key must be set.
    pub require_platform_tokens: bool,
}

impl LoadOptions {
    pub fn new(root: impl Into<PathBuf>, env: Env) -> Self {
        Self {
            root: root.into(),
            env,
            env_file: None,
            require_platform_tokens: false,
        }
    }
}

/// The validated configuration of one environment. Defaults are documented in `config/staging.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    pub env: Env,
    pub root: PathBuf,
    /// The sled store; as written, so a relative path is relative to the working directory.
    pub data_dir: PathBuf,
    /// SIGTERM: how long in-flight replies get before the process exits anyway.
    pub shutdown_timeout_secs: u64,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub llm: LlmConfig,
    pub limits: LimitsConfig,
    pub memory: MemoryConfig,
    pub cache: CacheConfig,
    pub store: StoreConfig,
    pub admins: AdminsConfig,
    pub telegram: PlatformConfig,
    /// `[telegram] mode`: long polling (default) or a webhook (SPEC §14).
    pub telegram_mode: TelegramMode,
    pub discord: PlatformConfig,
    /// `[discord] shards`: "auto" (default) or this instance's range.
    pub discord_shards: Shards,
    pub delivery: DeliveryConfig,
    pub audit: AuditConfig,
    /// OpenTelemetry traces (off unless an endpoint is configured).
    pub otel: OtelConfig,
    /// Voice notes and images: sizes, lengths, the transcription model.
    pub media: MediaConfig,
    /// Every `bots/*.toml`, sorted by name.
    pub bots: Vec<BotConfig>,
    /// Every `prompts/*.md`: file stem -> template source (compiles with minijinja).
    pub prompts: BTreeMap<String, String>,
    /// `CONFAB_DATA_KEY`, the optional key for encryption at rest of message contents.
    pub data_key: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `/healthz`, `/readyz`, `/metrics`. Default 127.0.0.1:9464.
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, for a terminal (staging default).
    Pretty,
    /// One JSON object per line, for journald/collectors (production).
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,confab=debug`.
    pub level: String,
    /// Lets serenity/tungstenite/reqwest log below info (they print routes, interaction
    /// tokens and the gateway IDENTIFY frame there). Off: those targets are capped at info.
    pub unsafe_debug: bool,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// OpenAI-compatible endpoint, without a trailing `/`.
    pub base_url: String,
    /// Name of the env var holding the key; the key itself is `api_key`.
    pub api_key_env: String,
    /// `None` when the variable is unset or empty (a local server may need no key).
    /// Never in TOML: filled in from the environment.
    #[serde(skip)]
    pub api_key: Option<Secret>,
    pub model: String,
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    /// Retries after the first attempt (429, 5xx, connect errors).
    pub max_retries: u32,
    /// Global cap on LLM calls in flight.
    pub max_concurrent: usize,
    /// Global requests per minute; 0 = no global cap.
    pub requests_per_minute: u32,
    /// Longest Retry-After honoured before giving up on a call.
    pub retry_after_cap_secs: u64,
    /// First backoff step; doubles per retry, with jitter.
    pub backoff_base_ms: u64,
    /// Consecutive failed calls that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before a half-open probe.
    pub breaker_cooldown_secs: u64,
    /// Longest wait for a free slot under `max_concurrent` before the busy apology.
    pub queue_timeout_secs: u64,
    /// `None`: the server's default.
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

/// A bot's overrides of `[llm]`; `None` keeps the global value.
#[derive(Debug, Clone, Default)]
pub struct LlmOverrides {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Per user per bot.
    pub messages_per_minute: u32,
    pub burst: u32,
    /// Per user per UTC day.
    pub daily_tokens: u64,
    pub max_input_chars: usize,
    /// Commands (`/help`, `/export`, `/admin` …) have their own, more generous quota.
    pub commands_per_minute: u32,
    pub commands_burst: u32,
    /// Seconds of voice notes and audio transcribed per user per UTC day (0: none).
    pub daily_audio_secs: u64,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// History sent to the LLM is trimmed to this many tokens.
    pub max_context_tokens: usize,
    /// Stored turns older than this are purged.
    pub retention_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    /// An identical full context hits across users.
    Global,
    /// Entries are only reused for the same user.
    User,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub ttl_secs: u64,
    pub max_entries: usize,
    pub scope: CacheScope,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sled` (embedded, one process; the default) or `redis` (several instances).
    pub backend: StoreBackend,
    /// sled page cache.
    pub cache_capacity_mb: u64,
    /// How often sled flushes to disk (bounds what a power loss can take).
    pub flush_every_ms: u64,
    /// Under load, a durability flush waits up to this long for more replies to share it.
    pub group_commit_us: u64,
    /// The env var holding the Redis URL (`redis://[user:pass@]host:port/db`, a secret).
    pub redis_url_env: String,
    /// Bounds every Redis round trip and connection attempt.
    pub redis_timeout_ms: u64,
    /// Every Redis key starts with it; unset: `confab:<env>`.
    pub redis_prefix: Option<String>,
    /// The Redis URL, read from `redis_url_env` (never logged).
    #[serde(skip)]
    pub redis_url: Option<Secret>,
}

/// Where the store lives: `[store] backend`.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One embedded sled database in `data_dir` (one process).
    #[default]
    Sled,
    /// One Redis (≥ 7, or Valkey) shared by every instance.
    Redis,
}

impl StoreConfig {
    /// The key prefix: `redis_prefix`, else `confab:<env>`.
    pub fn prefix(&self, env: Env) -> String {
        self.redis_prefix
            .clone()
            .unwrap_or_else(|| format!("confab:{env}"))
    }
}

/// Outbound delivery: retries while a platform is down, and queue bounds.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// A reply that cannot be sent is retried (backoff with jitter) for this long.
    pub max_retry_secs: u64,
    /// Updates waiting per conversation; beyond it the user gets a busy notice.
    pub max_queue_per_chat: usize,
    /// Updates waiting across all conversations of one adapter.
    pub max_pending: usize,
    /// With Redis: every this many seconds each instance answers the shared inbox's
    /// entries older than this that no instance is answering (received by an instance
    /// that died before answering them). 0: only at start.
    pub orphan_replay_secs: u64,
}

/// `[otel]`: OpenTelemetry traces over OTLP/HTTP (SPEC §15). Off while no endpoint is
/// set here or in `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); traces go to
    /// `{endpoint}/v1/traces`. Wins over the `OTEL_EXPORTER_OTLP_*` variables.
    pub endpoint: Option<String>,
    /// Share of updates traced (0.0 to 1.0), unless `OTEL_TRACES_SAMPLER` says otherwise.
    pub sample_ratio: f64,
}

/// `[media]`: voice notes, audio files, images and voice replies (SPEC §16).
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Longer voice notes and audio files are refused before they are downloaded.
    pub max_audio_secs: u32,
    /// Larger files are refused (before downloading when the platform declares the size).
    pub max_download_mb: u64,
    /// The model of `POST /audio/transcriptions`.
    pub transcription_model: String,
    /// Echo "🎤 <transcript>" above the answer so users see what was heard.
    pub show_transcript: bool,
    /// Voice replies (`voice_replies = "mirror"`): the model, voice and format of
    /// `POST /audio/speech`.
    pub speech_model: String,
    pub speech_voice: String,
    /// `opus` (OGG/Opus: a Telegram voice message) or `mp3`.
    pub response_format: String,
    /// A longer answer is spoken up to here (cut at a sentence or word end).
    pub max_spoken_chars: usize,
}

impl MediaConfig {
    /// `max_download_mb` in bytes.
    pub fn max_download_bytes(&self) -> u64 {
        self.max_download_mb.saturating_mul(1024 * 1024)
    }
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Audit entries older than this are purged by the sweeper.
    pub retention_days: u32,
}

#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminsConfig {
    pub telegram: Vec<i64>,
    pub discord: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// API base URL without a trailing `/`; tests point it at loopback fakes.
    pub api_url: String,
    /// Outbound throttling (platform limits): messages per chat per minute,
    /// per group chat per minute, and for the whole bot per second.
    pub per_chat_per_minute: u32,
    pub group_per_minute: u32,
    pub global_per_second: u32,
}

/// One bot identity, from `bots/<name>.toml`.
#[derive(Debug, Clone)]
pub struct BotConfig {
    /// The file stem.
    pub name: String,
    /// Name of an existing `prompts/<prompt>.md`.
    pub prompt: String,
    pub llm: LlmOverrides,
    /// Edit the reply as tokens arrive.
    pub stream: bool,
    /// The bot's model reads images: photos go to it as image content parts.
    pub vision: bool,
    /// Whether a voice question also gets a spoken answer.
    pub voice_replies: VoiceReplies,
    pub limits: Option<BotLimits>,
    /// `None`: the bot does not run on Telegram.
    pub telegram: Option<PlatformBot>,
    /// `None`: the bot does not run on Discord.
    pub discord: Option<PlatformBot>,
}

/// A bot's `voice_replies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VoiceReplies {
    /// Text answers only.
    #[default]
    Never,
    /// A voice question gets the text answer and the answer spoken (`/audio/speech`).
    Mirror,
}

/// Per-bot overrides of `[limits]`; `None` keeps the global value.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotLimits {
    pub messages_per_minute: Option<u32>,
    pub burst: Option<u32>,
    pub daily_tokens: Option<u64>,
}

/// A bot's `[telegram]` or `[discord]` table.
#[derive(Debug, Clone)]
pub struct PlatformBot {
    pub token_env: String,
    /// Who the platform must say the token belongs to in THIS environment: the username
    /// getMe returns (Telegram, without `@`), the application id (Discord).
    pub identity: Option<String>,
    /// The identity configured for the other environment (to say "that is the production bot").
    pub other_identity: Option<String>,
    /// `None` when the variable is unset or empty.
    pub token: Option<Secret>,
}

impl Config {
    /// A configuration with every documented default and no bots or prompts
    /// (what an empty `config/<env>.toml` gives). Handy for tests.
    pub fn with_defaults(env: Env, root: impl Into<PathBuf>) -> Config {
        let doc = Doc {
            file: "",
            source: "",
        };
        let root = root.into();
        validate::settings(&doc, toml::Table::new(), env, &root, &mut Vec::new())
    }

    pub fn bot(&self, name: &str) -> Option<&BotConfig> {
        self.bots.iter().find(|b| b.name == name)
    }

    pub fn is_admin_telegram(&self, id: i64) -> bool {
        self.admins.telegram.contains(&id)
    }

    pub fn is_admin_discord(&self, id: u64) -> bool {
        self.admins.discord.contains(&id)
    }
}

// ---------------------------------------------------------------------------
// Loading

/// Load and validate everything for `opts.env`, reading secrets and
/// `CONFAB__...` overrides from the process environment (over the env file).
pub fn load(opts: &LoadOptions) -> Result<Config, Problems> {
    // vars_os: a non-UTF-8 variable elsewhere in the environment must not panic the loader.
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    load_with_env(opts, vars)
}

/// `load` with an explicit process environment instead of `std::env::vars()`,
/// so tests can set overrides and secrets without touching global state.
pub fn load_with_env(
    opts: &LoadOptions,
    process_env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, Problems> {
    let mut problems = Vec::new();

    let process_env: Vec<(String, String)> = process_env.into_iter().collect();
    let credentials = process_env
        .iter()
        .find(|(k, _)| k == "CREDENTIALS_DIRECTORY")
        .map(|(_, v)| v.clone());
    let env_file = EnvFile::for_options(opts, credentials.as_deref());
    let vars = secrets::collect_vars(&env_file, opts.env, process_env, &mut problems);

    // config/<env>.toml, with overrides applied to the parsed table.
    let config_file = format!("config/{}.toml", opts.env);
    let source = read_file(&opts.root.join(&config_file), &config_file, &mut problems);
    let doc = Doc {
        file: &config_file,
        source: source.as_deref().unwrap_or(""),
    };
    let parsed = match &source {
        Some(_) => raw::parse_table(&doc, &mut problems),
        None => None,
    };
    let config_parsed = parsed.is_some();
    let mut table = parsed.unwrap_or_default();
    let overrides = raw::overrides(vars.iter(), &mut problems);
    for ov in &overrides {
        if let Err(msg) = raw::apply_override(&mut table, ov) {
            problems.push(Problem::new("env", &ov.var, msg));
        }
    }
    let mut config = validate::settings(&doc, table, opts.env, &opts.root, &mut problems);

    config.prompts = load_prompts(&opts.root, &mut problems);
    config.bots = load_bots(&opts.root, opts.env, &config.prompts, &mut problems);
    validate::bots_together(&config.bots, &mut problems);

    let policy = validate::Policy {
        config_file: &config_file,
        config_parsed,
        require_platform_tokens: opts.require_platform_tokens,
    };
    validate::secrets_and_policy(&mut config, &vars, &policy, &mut problems);

    // A bad value that came from CONFAB__... is the variable's fault, not the file's.
    for p in &mut problems {
        if p.file != config_file {
            continue;
        }
        let named = overrides
            .iter()
            .find(|ov| ov.path == p.key || ov.path.starts_with(&format!("{}.", p.key)));
        if let Some(ov) = named {
            p.file = "env".into();
            p.key = ov.var.clone();
            // A line number would point into the file, which is not where the value came from.
            if let Some((msg, _)) = p.message.rsplit_once(" (line ") {
                p.message = msg.to_owned();
            }
        }
    }

    if problems.is_empty() {
        Ok(config)
    } else {
        Err(Problems(problems))
    }
}

/// What an operator should know that does not stop confab: `check` prints these as
/// `warning: file: key: …` lines, `run` logs them at warn.
pub fn warnings(config: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if config.env == Env::Production && config.data_key.is_none() {
        out.push(Problem::new(
            "env",
            DATA_KEY_ENV,
            format!(
                "{DATA_KEY_ENV} is not set: message text is stored unencrypted \
                 (set 64 hex characters, e.g. `openssl rand -hex 32`)"
            ),
        ));
    }
    out
}

/// Check a prompt template with the engine's own renderer and variables
/// (`bot_name`, `user_name`, `platform`, `date`): what passes here renders at run time.
pub fn check_template(source: &str) -> Result<(), String> {
    crate::engine::prompt::Prompts::check(source)
}

fn load_prompts(root: &Path, problems: &mut Vec<Problem>) -> BTreeMap<String, String> {
    let mut prompts = BTreeMap::new();
    for (name, rel) in list_dir(root, "prompts", "md", problems) {
        let Some(source) = read_file(&root.join(&rel), &rel, problems) else {
            continue;
        };
        if let Err(e) = check_template(&source) {
            problems.push(Problem::new(&rel, "template", e));
        }
        prompts.insert(name, source);
    }
    prompts
}

fn load_bots(
    root: &Path,
    env: Env,
    prompts: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) -> Vec<BotConfig> {
    let files = list_dir(root, "bots", "toml", problems);
    if files.is_empty() {
        problems.push(Problem::new(
            "bots/",
            "files",
            "no bots/*.toml found; at least one bot is required",
        ));
    }
    let mut bots = Vec::new();
    for (name, rel) in files {
        let Some(source) = read_file(&root.join(&rel), &rel, problems) else {
            continue;
        };
        let doc = Doc {
            file: &rel,
            source: &source,
        };
        let Some(table) = raw::parse_table(&doc, problems) else {
            continue;
        };
        bots.push(validate::bot(&doc, &name, table, env, prompts, problems));
    }
    bots
}

/// `(stem, "dir/file.ext")` for every `dir/*.ext` under `root`, sorted; hidden files skipped.
fn list_dir(
    root: &Path,
    dir: &str,
    ext: &str,
    problems: &mut Vec<Problem>,
) -> Vec<(String, String)> {
    let entries = match std::fs::read_dir(root.join(dir)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            problems.push(Problem::new(
                format!("{dir}/"),
                "files",
                format!("cannot list: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) || !path.is_file() {
            continue;
        }
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name.starts_with('.') {
            continue;
        }
        match path.file_stem().and_then(|s| s.to_str()) {
            Some(stem) => out.push((stem.to_owned(), format!("{dir}/{file_name}"))),
            None => problems.push(Problem::new(
                format!("{dir}/{file_name}"),
                "name",
                "file name is not UTF-8",
            )),
        }
    }
    out.sort();
    out
}

/// The file's text; `None` (with a problem) if it is missing or unreadable.
fn read_file(path: &Path, rel: &str, problems: &mut Vec<Problem>) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problems.push(Problem::new(rel, "file", "file not found"));
            None
        }
        Err(e) => {
            problems.push(Problem::new(rel, "file", format!("cannot read: {e}")));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A config tree in a temporary directory; starts with one valid bot and prompt.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let t = Tree {
                dir: tempfile::tempdir().expect("tempdir"),
            };
            t.write("config/staging.toml", "");
            t.write("config/production.toml", "[admins]\ntelegram = [42]\n");
            t.write(
                "prompts/p.md",
                "You are {{bot_name}}, talking to {{user_name}} on {{platform}} ({{date}}).",
            );
            t.write("bots/b.toml", "prompt = \"p\"\n");
            t
        }

        fn write(&self, rel: &str, text: &str) -> &Tree {
            let path = self.dir.path().join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(path, text).expect("write");
            self
        }

        fn remove(&self, rel: &str) {
            fs::remove_file(self.dir.path().join(rel)).expect("rm");
        }

        fn opts(&self, env: Env) -> LoadOptions {
            LoadOptions::new(self.dir.path(), env)
        }

        fn load(&self, env: Env, vars: &[(&str, &str)]) -> Result<Config, Problems> {
            load_with(&self.opts(env), vars)
        }
    }

    fn load_with(opts: &LoadOptions, vars: &[(&str, &str)]) -> Result<Config, Problems> {
        load_with_env(
            opts,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn lines(r: Result<Config, Problems>) -> Vec<String> {
        match r {
            Ok(_) => Vec::new(),
            Err(p) => p.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// The load reports exactly `expected` (in order).
    fn check(r: Result<Config, Problems>, expected: &[&str]) {
        assert_eq!(lines(r), expected);
    }

    fn ok(r: Result<Config, Problems>) -> Config {
        match r {
            Ok(c) => c,
            Err(p) => panic!("unexpected problems:\n{p}"),
        }
    }

    const GOOD_TG: &str = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
    const GOOD_DC: &str = "MTA5ODc2NTQzMjEwOTg3NjU0.GhIjKl.mNoPqRsTuVwYz0123456789AbCdEfGhI";
    const GOOD_KEY: &str = "sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c";

    #[test]
    fn defaults_when_keys_are_absent() {
        let t = Tree::new();
        let c = ok(t.load(Env::Staging, &[]));
        assert_eq!(c.env, Env::Staging);
        assert_eq!(c.data_dir, PathBuf::from("data/staging"));
        assert_eq!(c.shutdown_timeout_secs, 30);
        assert_eq!(
            c.http.bind,
            "127.0.0.1:9464".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.log.format, LogFormat::Pretty);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.llm.base_url, "https://api.openai.com/v1");
        assert_eq!(c.llm.api_key_env, "OPENAI_API_KEY");
        assert!(c.llm.api_key.is_none());
        assert_eq!(c.llm.model, "gpt-4o-mini");
        assert_eq!(
            (
                c.llm.timeout_secs,
                c.llm.connect_timeout_secs,
                c.llm.max_retries
            ),
            (60, 10, 3)
        );
        assert_eq!((c.llm.max_concurrent, c.llm.requests_per_minute), (256, 0));
        assert_eq!(
            (c.llm.retry_after_cap_secs, c.llm.backoff_base_ms),
            (30, 250)
        );
        assert_eq!(
            (c.llm.breaker_failures, c.llm.breaker_cooldown_secs),
            (5, 30)
        );
        assert_eq!((c.llm.temperature, c.llm.max_tokens), (None, Some(1024)));
        assert_eq!(c.llm.queue_timeout_secs, 30);
        assert_eq!(
            (c.limits.commands_per_minute, c.limits.commands_burst),
            (20, 10)
        );
        assert_eq!(
            (
                c.delivery.max_retry_secs,
                c.delivery.max_queue_per_chat,
                c.delivery.max_pending
            ),
            (600, 32, 10_000)
        );
        assert_eq!(c.audit.retention_days, 365);
        assert!(!c.log.unsafe_debug);
        assert_eq!((c.limits.messages_per_minute, c.limits.burst), (6, 3));
        assert_eq!(
            (c.limits.daily_tokens, c.limits.max_input_chars),
            (50_000, 4000)
        );
        assert_eq!(
            (c.memory.max_context_tokens, c.memory.retention_days),
            (4000, 30)
        );
        assert!(c.cache.enabled);
        assert_eq!((c.cache.ttl_secs, c.cache.max_entries), (86_400, 100_000));
        assert_eq!(c.cache.scope, CacheScope::Global);
        assert_eq!(
            (
                c.store.cache_capacity_mb,
                c.store.flush_every_ms,
                c.store.group_commit_us
            ),
            (8, 500, 2000)
        );
        assert!(c.admins.telegram.is_empty() && c.admins.discord.is_empty());
        assert_eq!(c.telegram.api_url, "https://api.telegram.org");
        assert_eq!(c.discord.api_url, "https://discord.com");
        let b = c.bot("b").expect("bot b");
        assert_eq!(b.prompt, "p");
        assert!(!b.stream && b.telegram.is_none() && b.discord.is_none() && b.limits.is_none());
        assert!(c.prompts.contains_key("p"));
        assert!(c.data_key.is_none());

        let d = Config::with_defaults(Env::Production, "/srv");
        assert_eq!(d.data_dir, PathBuf::from("data/production"));
        assert_eq!(d.limits.burst, 3);
    }

    #[test]
    fn otel_endpoint_and_sample_ratio_are_checked() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[otel]\nendpoint = \"collector:4318\"\nsample_ratio = 1.5\n",
        );
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: otel.endpoint: `collector:4318` is not an http:// or https:// URL",
                "config/staging.toml: otel.sample_ratio: 1.5 is out of range (0.0 to 1.0)",
            ],
        );
        t.write(
            "config/staging.toml",
            "[otel]\nendpoint = \"http://c:4318/\"\n",
        );
        let c = ok(t.load(Env::Staging, &[]));
        assert_eq!(c.otel.endpoint.as_deref(), Some("http://c:4318"));
        assert_eq!(c.otel.sample_ratio, 1.0);
        assert_eq!(ok(Tree::new().load(Env::Staging, &[])).otel.endpoint, None);
    }

    #[test]
    fn media_settings_are_checked() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[media]\nmax_audio_secs = 0\nmax_download_mb = 500\ntranscription_model = \" \"\nshow_transcript = \"yes\"\n",
        );
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: media.show_transcript: invalid type: string \"yes\", expected a boolean (line 5)",
                "config/staging.toml: media.max_audio_secs: must be at least 1",
                "config/staging.toml: media.max_download_mb: 500 is too large (at most 100)",
                "config/staging.toml: media.transcription_model: must not be empty",
            ],
        );
        let c = ok(Tree::new().load(Env::Staging, &[]));
        assert_eq!(
            (
                c.media.max_audio_secs,
                c.media.max_download_mb,
                c.limits.daily_audio_secs
            ),
            (300, 20, 1800)
        );
        assert_eq!(c.media.transcription_model, "whisper-1");
        assert!(c.media.show_transcript);
    }

    #[test]
    fn durations_are_bounded_so_no_instant_arithmetic_overflows() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[llm]\nbreaker_cooldown_secs = 9223372036854775807\ntimeout_secs = 99999999\n",
        );
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: llm.timeout_secs: 99999999 is too large (at most 3600)",
                "config/staging.toml: llm.breaker_cooldown_secs: 9223372036854775807 is too large (at most 86400)",
            ],
        );
    }

    #[test]
    fn unknown_keys_are_reported_with_their_dotted_path() {
        let t = Tree::new();
        t.write("config/staging.toml", "datadir = \"x\"\n[llm]\nmodle = \"gpt\"\napi_key = \"sk-live-secret\"\n[cache]\nscope = \"user\"\nttl = 5\n[bogus]\nx = 1\n");
        t.write("bots/b.toml", "prompt = \"p\"\n[telegram]\ntoken_env = \"T\"\nusername = { stagin = \"a_bot\", production = \"b_bot\" }\n");
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: bogus: unknown key",
                "config/staging.toml: datadir: unknown key (did you mean `data_dir`?)",
                "config/staging.toml: llm.api_key: unknown key (secrets never go in TOML: put the value in the env file and name its variable in `*_env`)",
                "config/staging.toml: llm.modle: unknown key (did you mean `model`?)",
                "config/staging.toml: cache.ttl: unknown key",
                "bots/b.toml: telegram.username.stagin: unknown key (did you mean `staging`?)",
            ],
        );
    }

    #[test]
    fn platform_sections_check_shared_and_own_keys_alike() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[telegram]\nwebhok_url = \"x\"\napi_ur = \"y\"\nper_chat_per_minute = \"many\"\n[discord]\nshard = \"auto\"\ntoken = \"t\"\n",
        );
        let err = t.load(Env::Staging, &[]).expect_err("bad keys");
        let text = err.to_string();
        for want in [
            "telegram.webhok_url: unknown key (did you mean `webhook_url`?)",
            "telegram.api_ur: unknown key (did you mean `api_url`?)",
            "telegram.per_chat_per_minute: invalid type: string \"many\", expected u32",
            "discord.shard: unknown key (did you mean `shards`?)",
            "discord.token: unknown key (secrets never go in TOML",
        ] {
            assert!(text.contains(want), "{want} not in: {text}");
        }
    }

    #[test]
    fn group_commit_window_is_bounded() {
        let t = Tree::new();
        t.write("config/staging.toml", "[store]\ngroup_commit_us = 500000\n");
        check(
            t.load(Env::Staging, &[]),
            &["config/staging.toml: store.group_commit_us: 500000 is too long a wait before each flush; use at most 100000 (100 ms), 0 to flush at once"],
        );
    }

    #[test]
    fn the_redis_store_settings_are_checked_and_the_url_is_a_secret() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[store]\nbackend = \"redis\"\nredis_timeout_ms = 0\nredis_prefix = \"a b*\"\nredis_url_env = \"redis://x\"\n",
        );
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: store.redis_url_env: not a valid environment variable name (letters, digits, `_`); this names the variable that holds the secret, the secret itself goes in the env file",
                "config/staging.toml: store.redis_timeout_ms: must be at least 1",
                "config/staging.toml: store.redis_prefix: 1 to 64 characters without spaces, braces or glob characters (e.g. \"confab:staging\")",
            ],
        );
        t.write("config/staging.toml", "[store]\nbackend = \"redis\"\n");
        let url = "redis://:pw-in-the-url@10.0.0.5:6379/0";
        let c = t
            .load(Env::Staging, &[("CONFAB_REDIS_URL", url)])
            .expect("loads");
        assert_eq!(c.store.backend, StoreBackend::Redis);
        assert_eq!(c.store.prefix(c.env), "confab:staging");
        assert_eq!(c.store.redis_url.as_ref().map(Secret::expose), Some(url));
        assert!(!format!("{c:?}").contains("pw-in-the-url"));
        let sled = Tree::new();
        sled.write("config/staging.toml", "");
        let c = sled.load(Env::Production, &[]).err();
        let c = c.map(|p| p.to_string()).unwrap_or_default();
        assert!(!c.contains("redis"), "sled needs no Redis URL: {c}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            r#"shutdown_timeout_secs = 0
[http]
bind = "localhost"
[log]
format = "xml"
[llm]
base_url = "ftp://example.com"
timeout_secs = "soon"
max_concurrent = 0
temperature = 3.5
[limits]
messages_per_minute = 0
burst = 0
[cache]
scope = "team"
[telegram]
api_url = "api.telegram.org"
"#,
        );
        t.write("bots/b.toml", "prompt = \"missing\"\n");
        t.write(
            "bots/c.toml",
            "prompt = \"p\"\nstream = \"yes\"\n[limits]\nburst = 0\n",
        );
        t.write("prompts/broken.md", "Hello {{ user_name ");
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: llm.timeout_secs: invalid type: string \"soon\", expected u64 (line 8)",
                "config/staging.toml: shutdown_timeout_secs: must be at least 1",
                "config/staging.toml: http.bind: `localhost` is not an IP:port address (e.g. 127.0.0.1:9464)",
                "config/staging.toml: log.format: `xml` is not one of \"pretty\", \"json\"",
                "config/staging.toml: llm.base_url: `ftp://example.com` is not an http:// or https:// URL",
                "config/staging.toml: llm.max_concurrent: must be at least 1",
                "config/staging.toml: llm.temperature: 3.5 is out of range (0.0 to 2.0)",
                "config/staging.toml: limits.messages_per_minute: must be at least 1",
                "config/staging.toml: limits.burst: must be at least 1",
                "config/staging.toml: cache.scope: `team` is not one of \"global\", \"user\"",
                "config/staging.toml: telegram.api_url: `api.telegram.org` is not an http:// or https:// URL",
                "prompts/broken.md: template: line 1: syntax error: unexpected end of input, expected end of variable block",
                "bots/b.toml: prompt: no prompts/missing.md",
                "bots/c.toml: stream: invalid type: string \"yes\", expected a boolean (line 2)",
                "bots/c.toml: limits.burst: must be at least 1",
            ],
        );
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[llm]\nmodel = \"a\"\nmodel = \"b\"\n",
        );
        t.write("bots/b.toml", "prompt = \n");
        let got = lines(t.load(Env::Staging, &[]));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("config/staging.toml: syntax: line 3, column 1: "),
            "{got:?}"
        );
        assert!(
            got[1].starts_with("bots/b.toml: syntax: line 1, column 10: "),
            "{got:?}"
        );
    }

    #[test]
    fn missing_files_and_directories() {
        let t = Tree::new();
        t.remove("config/staging.toml");
        t.remove("bots/b.toml");
        check(
            t.load(Env::Staging, &[]),
            &[
                "config/staging.toml: file: file not found",
                "bots/: files: no bots/*.toml found; at least one bot is required",
            ],
        );
    }

    #[test]
    fn environment_overrides_apply() {
        let t = Tree::new();
        t.write(
            "config/staging.toml",
            "[llm]\nbase_url = \"https://api.openai.com/v1\"\n[admins]\ndiscord = [7]\n",
        );
        let c = ok(t.load(
            Env::Staging,
            &[
                ("CONFAB__LLM__BASE_URL", "http://127.0.0.1:5555/v1/"),
                ("CONFAB__LIMITS__MESSAGES_PER_MINUTE", "42"),
                ("CONFAB__DATA_DIR", "/tmp/confab-test"),
                ("CONFAB__ADMINS__TELEGRAM", "1,2"),
                ("CONFAB__ADMINS__DISCORD", "[8, 9]"),
                ("CONFAB__CACHE__ENABLED", "false"),
                ("CONFAB__LOG__LEVEL", "info,confab=debug"),
                ("CONFAB_DATA_KEY", "not-an-override"),
            ],
        ));
        assert_eq!(c.llm.base_url, "http://127.0.0.1:5555/v1");
        assert_eq!(c.limits.messages_per_minute, 42);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/confab-test"));
        assert_eq!(c.admins.telegram, vec![1, 2]);
        assert_eq!(c.admins.discord, vec![8, 9]);
        assert!(c.is_admin_telegram(2) && !c.is_admin_telegram(3));
        assert!(c.is_admin_discord(9) && !c.is_admin_discord(7));
        assert!(!c.cache.enabled);
        assert_eq!(c.log.level, "info,confab=debug");
        assert_eq!(
            c.data_key.as_ref().map(Secret::expose),
            Some("not-an-override")
        );
    }

    #[test]
    fn bad_overrides_are_blamed_on_the_variable() {
        let t = Tree::new();
        check(
            t.load(
                Env::Staging,
                &[
                    ("CONFAB__LLM__MODLE", "x"),
                    ("CONFAB__LIMITS__BURST", "0"),
                    ("CONFAB__MEMORY__RETENTION_DAYS", "soon"),
                    ("CONFAB__NOPE__KEY", "1"),
                    ("CONFAB__DATA_DIR__X", "1"),
                    ("CONFAB____X", "1"),
                ],
            ),
            &[
                "env: CONFAB____X: malformed override name (expected CONFAB__KEY or CONFAB__SECTION__KEY)",
                "env: CONFAB__DATA_DIR__X: invalid type: map, expected a string",
                "env: CONFAB__NOPE__KEY: unknown key",
                "env: CONFAB__LLM__MODLE: unknown key (did you mean `model`?)",
                "env: CONFAB__MEMORY__RETENTION_DAYS: invalid type: string \"soon\", expected u32",
                "env: CONFAB__LIMITS__BURST: must be at least 1",
            ],
        );
    }

    #[test]
    fn env_file_is_read_and_real_variables_win() {
        let t = Tree::new();
        t.write(
            "bots/b.toml",
            "prompt = \"p\"\n[telegram]\ntoken_env = \"B_TG\"\nusername = { staging = \"@b_staging_bot\", production = \"b_bot\" }\n",
        );
        t.write(
            ".env.staging",
            "# comment\nOPENAI_API_KEY=from-file\nB_TG=file-token\nCONFAB__LIMITS__BURST=9\n",
        );
        let mut opts = t.opts(Env::Staging);
        opts.require_platform_tokens = true;
        let c = ok(load_with(&opts, &[("B_TG", "real-token")]));
        assert_eq!(
            c.llm.api_key.as_ref().map(Secret::expose),
            Some("from-file")
        );
        let tg = c
            .bot("b")
            .and_then(|b| b.telegram.clone())
            .expect("telegram");
        assert_eq!(tg.token.as_ref().map(Secret::expose), Some("real-token"));
        assert_eq!(tg.identity.as_deref(), Some("b_staging_bot"));
        assert_eq!(c.limits.burst, 9);

        // An explicit --env-file must exist; the default one may be absent.
        t.remove(".env.staging");
        opts.require_platform_tokens = false;
        ok(load_with(&opts, &[]));
        opts.env_file = Some(t.dir.path().join("secrets.env"));
        check(
            load_with(&opts, &[]),
            &["secrets.env: file: file not found"],
        );
    }

    #[test]
    fn unparsable_env_file_lines_are_reported_without_their_content() {
        let t = Tree::new();
        t.write(
            ".env.staging",
            "A=1\nOPENAI_API_KEY='sk-unterminated-secret-value\n",
        );
        let got = lines(t.load(Env::Staging, &[]));
        assert_eq!(
            got,
            vec![".env.staging: line 2: cannot parse (expected KEY=value; check quotes)"]
        );
    }

    #[test]
    fn tokens_and_identities_when_required() {
        let t = Tree::new();
        t.write(
            "bots/b.toml",
            "prompt = \"p\"\n[telegram]\ntoken_env = \"ASSISTANT_TELEGRAM_TOKEN\"\nusername = { production = \"b_bot\" }\n[discord]\ntoken_env = \"B_DC\"\napplication_id = { staging = 111, production = \"222\" }\n",
        );
        // Without the requirement (e.g. `confab chat`), neither is needed in staging.
        ok(t.load(Env::Staging, &[]));
        let mut opts = t.opts(Env::Staging);
        opts.require_platform_tokens = true;
        check(
            load_with(&opts, &[("B_DC", "")]),
            &[
                "bots/b.toml: telegram.token_env: environment variable ASSISTANT_TELEGRAM_TOKEN is not set",
                "bots/b.toml: telegram.username: no staging identity",
                "bots/b.toml: discord.token_env: environment variable B_DC is empty",
            ],
        );
        t.write(
            "bots/b.toml",
            "prompt = \"p\"\n[telegram]\ntoken_env = \"ASSISTANT_TELEGRAM_TOKEN\"\nusername = { staging = \"s_bot\", production = \"b_bot\" }\n[discord]\ntoken_env = \"B_DC\"\napplication_id = { staging = 111, production = \"222\" }\n",
        );
        let c = ok(load_with(
            &opts,
            &[("B_DC", "x"), ("ASSISTANT_TELEGRAM_TOKEN", "y")],
        ));
        let b = c.bot("b").expect("bot");
        assert_eq!(
            b.discord.as_ref().and_then(|d| d.identity.as_deref()),
            Some("111")
        );
    }

    #[test]
    fn identity_rules() {
        let t = Tree::new();
        t.write(
            "bots/b.toml",
            "prompt = \"p\"\n[telegram]\ntoken_env = \"T\"\nusername = \"acme_bot\"\n[discord]\ntoken_env = \"D\"\napplication_id = { staging = \"12a\", production = \"12a\" }\n",
        );
        t.write("bots/c.toml", "prompt = \"p\"\n[telegram]\ntoken_env = \"T\"\n[discord]\ntoken_env = \"not a name\"\n");
        check(
            t.load(Env::Staging, &[]),
            &[
                "bots/b.toml: telegram.username: give one per environment: { staging = \"...\", production = \"...\" } (staging and production must be different bots)",
                "bots/b.toml: discord.application_id.staging: `12a` is not a Discord application id (digits only)",
                "bots/b.toml: discord.application_id.production: `12a` is not a Discord application id (digits only)",
                "bots/b.toml: discord.application_id: staging and production name the same identity; each environment needs its own bot and token",
                "bots/c.toml: discord.token_env: not a valid environment variable name (letters, digits, `_`); this names the variable that holds the secret, the secret itself goes in the env file",
                "bots/c.toml: telegram.token_env: T is also used by bots/b.toml; each bot needs its own token",
            ],
        );
    }

    #[test]
    fn production_policy() {
        let t = Tree::new();
        t.write("config/production.toml", "[admins]\ntelegram = []\n");
        t.write(
            "bots/b.toml",
            "prompt = \"p\"\n[telegram]\ntoken_env = \"B_TG\"\nusername = { staging = \"b_staging_bot\" }\n[discord]\ntoken_env = \"B_DC\"\napplication_id = { staging = \"1\", production = \"2\" }\n",
        );
        t.write(
            ".env.production",
            "B_TG=changeme-telegram-token\nB_DC=s3cr3t\nOPENAI_API_KEY=\n",
        );
        set_mode(&t.dir.path().join(".env.production"), 0o644);
        let mut opts = t.opts(Env::Production);
        opts.require_platform_tokens = true;
        let r = load_with(&opts, &[(DATA_KEY_ENV, "example-key-123")]);
        let text = match &r {
            Err(p) => p.to_string(),
            Ok(_) => String::new(),
        };
        check(
            r,
            &[
                ".env.production: permissions: env file is world-readable (chmod 600)",
                "config/production.toml: llm.api_key_env: environment variable OPENAI_API_KEY is empty",
                "config/production.toml: admins: production needs at least one admin",
                "env: CONFAB_DATA_KEY: CONFAB_DATA_KEY looks like a placeholder; production needs a real secret",
                "bots/b.toml: telegram.token_env: B_TG looks like a placeholder; production needs a real secret",
                "bots/b.toml: telegram.username: no production identity",
                "bots/b.toml: discord.token_env: B_DC is shorter than 8 characters; production needs a real secret",
            ],
        );
        for secret in ["changeme-telegram-token", "s3cr3t", "example-key-123"] {
            assert!(!text.contains(secret), "secret value leaked: {text}");
        }

        // Fixed: private env file, real secrets, an admin, both identities.
        set_mode(&t.dir.path().join(".env.production"), 0o600);
        t.write(
            ".env.production",
            &format!("B_TG={GOOD_TG}\nB_DC={GOOD_DC}\nOPENAI_API_KEY={GOOD_KEY}\n"),
        );
        t.write(
            "config/production.toml",
            "[admins]\ndiscord = [987654321012345678]\n",
        );
        t.write(
            "bots/b.toml",
            "prompt = \"p\"\n[telegram]\ntoken_env = \"B_TG\"\nusername = { staging = \"b_staging_bot\", production = \"b_bot\" }\n[discord]\ntoken_env = \"B_DC\"\napplication_id = { staging = \"1\", production = \"2\" }\n",
        );
        let c = ok(load_with(&opts, &[]));
        let b = c.bot("b").expect("bot");
        assert_eq!(
            b.telegram.as_ref().and_then(|x| x.identity.as_deref()),
            Some("b_bot")
        );
        assert_eq!(
            b.discord.as_ref().and_then(|x| x.identity.as_deref()),
            Some("2")
        );
        assert_eq!(
            b.telegram
                .as_ref()
                .and_then(|x| x.token.as_ref())
                .map(Secret::expose),
            Some(GOOD_TG)
        );
    }

    #[test]
    fn production_without_a_config_file_reports_only_that() {
        let t = Tree::new();
        t.remove("config/production.toml");
        check(
            t.load(Env::Production, &[]),
            &["config/production.toml: file: file not found"],
        );
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[cfg(not(unix))]
    fn set_mode(_path: &Path, _mode: u32) {}

    #[test]
    fn secrets_never_print() {
        let t = Tree::new();
        t.write("bots/b.toml", "prompt = \"p\"\n[telegram]\ntoken_env = \"B_TG\"\nusername = { staging = \"s_bot\", production = \"p_bot\" }\n");
        let c = ok(t.load(
            Env::Staging,
            &[("B_TG", GOOD_TG), ("OPENAI_API_KEY", GOOD_KEY)],
        ));
        let dump = format!("{c:?}");
        assert!(
            !dump.contains(GOOD_TG) && !dump.contains(GOOD_KEY),
            "{dump}"
        );
        assert!(dump.contains("[REDACTED]"));
        let s = Secret::new("hunter2hunter2".into());
        assert_eq!(format!("{s} {s:?}"), "[REDACTED] [REDACTED]");
        assert_eq!(s.expose(), "hunter2hunter2");
    }

    #[test]
    fn env_names() {
        assert_eq!("staging".parse::<Env>(), Ok(Env::Staging));
        assert_eq!("production".parse::<Env>(), Ok(Env::Production));
        assert!("prod".parse::<Env>().is_err());
        assert_eq!(Env::Production.to_string(), "production");
        assert_eq!(Env::Staging.as_str(), "staging");
    }

    #[test]
    fn templates_must_compile_and_render() {
        assert_eq!(
            check_template("Hi {{ user_name }} on {{ platform | upper }}"),
            Ok(())
        );
        assert_eq!(
            check_template("{% if x %}"),
            Err("line 1: syntax error: unexpected end of input, expected end of block".into())
        );
        assert!(check_template("{{ user_name | nosuchfilter }}").is_err());
        // The engine renders strictly: a field it does not pass is an error here too.
        let e = check_template("Hi {{ user_name }}.\nBe {{ tone }}.").unwrap_err();
        assert!(e.starts_with("line 2: undefined value"), "{e}");
        assert!(check_template("{{ chat.title }}").is_err());
    }

    #[test]
    fn problems_print_one_per_line() {
        let p = Problems(vec![
            Problem::new("a", "b", "c\nd"),
            Problem::new("e", "f", "g"),
        ]);
        assert_eq!(p.to_string(), "a: b: c; d\ne: f: g");
    }

    /// The files shipped in the repository load cleanly.
    #[test]
    fn shipped_files_load() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // An empty env file keeps a developer's own .env.* out of the test.
        let empty = tempfile::NamedTempFile::new().expect("tmp");
        set_mode(empty.path(), 0o600);
        let opts = LoadOptions {
            root: root.clone(),
            env: Env::Staging,
            env_file: Some(empty.path().to_path_buf()),
            require_platform_tokens: false,
        };
        let c = ok(load_with(&opts, &[]));
        assert_eq!(c.data_dir, PathBuf::from("data/staging"));
        let b = c.bot("assistant").expect("assistant bot");
        assert_eq!(
            b.telegram.as_ref().and_then(|t| t.identity.as_deref()),
            Some("acme_staging_bot")
        );
        assert!(c.prompts.contains_key("assistant"));

        let opts = LoadOptions {
            env: Env::Production,
            require_platform_tokens: true,
            ..opts
        };
        let secrets = [
            ("OPENAI_API_KEY", GOOD_KEY),
            ("ASSISTANT_TELEGRAM_TOKEN", GOOD_TG),
            ("ASSISTANT_DISCORD_TOKEN", GOOD_DC),
        ];
        // No admin ships: production refuses until the operator names one.
        check(
            load_with(&opts, &secrets),
            &["config/production.toml: admins: production needs at least one admin"],
        );
        let with_admin = [secrets.as_slice(), &[("CONFAB__ADMINS__TELEGRAM", "42")]].concat();
        let c = ok(load_with(&opts, &with_admin));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/confab/production"));
        assert_eq!(c.admins.telegram, vec![42]);
        assert!(c.admins.discord.is_empty());
    }

    /// `config/staging.toml` says "the value shown is the default": every key of every
    /// section is written there (or commented out where the default is "unset") and the
    /// file as shipped gives exactly `Config::with_defaults`.
    #[test]
    fn shipped_staging_toml_shows_every_default() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let source = fs::read_to_string(root.join("config/staging.toml")).expect("read");
        let doc = Doc {
            file: "config/staging.toml",
            source: &source,
        };
        let mut problems = Vec::new();
        let table = raw::parse_table(&doc, &mut problems).expect("parses");
        let shipped = validate::settings(&doc, table.clone(), Env::Staging, &root, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let defaults = Config::with_defaults(Env::Staging, &root);
        let (shipped, defaults) = (format!("{shipped:#?}"), format!("{defaults:#?}"));
        let differ: Vec<_> = shipped
            .lines()
            .zip(defaults.lines())
            .filter(|(s, d)| s != d)
            .collect();
        assert!(differ.is_empty(), "(shipped, default): {differ:?}");
        assert_eq!(shipped.lines().count(), defaults.lines().count());

        fn keys<T: serde::Serialize>(v: T) -> Vec<(String, bool)> {
            let json = serde_json::to_value(v).expect("serialise");
            let obj = json.as_object().cloned().unwrap_or_default();
            obj.into_iter().map(|(k, v)| (k, v.is_null())).collect()
        }
        let platform = raw::RawPlatform {
            api_url: Some(String::new()),
            per_chat_per_minute: Some(0),
            group_per_minute: Some(0),
            global_per_second: Some(0),
        };
        let telegram = raw::RawTelegram {
            platform: platform.clone(),
            own: raw::RawTelegramOwn {
                mode: Some(String::new()),
                webhook_url: None,
                webhook_bind: Some(String::new()),
                webhook_secret_env: Some(String::new()),
            },
        };
        let discord = raw::RawDiscord {
            platform,
            own: raw::RawDiscordOwn {
                shards: Some(toml::Value::String(String::new())),
            },
        };
        let sections = [
            ("http", keys(raw::RawHttp::default())),
            ("log", keys(raw::RawLog::default())),
            ("llm", keys(LlmConfig::default())),
            ("limits", keys(LimitsConfig::default())),
            ("memory", keys(MemoryConfig::default())),
            ("cache", keys(raw::RawCache::default())),
            ("store", keys(StoreConfig::default())),
            ("admins", keys(AdminsConfig::default())),
            ("telegram", keys(telegram)),
            ("discord", keys(discord)),
            ("delivery", keys(DeliveryConfig::default())),
            ("audit", keys(AuditConfig::default())),
            ("otel", keys(OtelConfig::default())),
            ("media", keys(MediaConfig::default())),
        ];
        let commented = |key: &str| {
            let prefix = format!("# {key} = ");
            source.lines().any(|l| l.trim_start().starts_with(&prefix))
        };
        for (section, keys) in sections {
            for (key, unset) in keys {
                let written = table.get(section).and_then(|s| s.get(&key)).is_some();
                assert!(
                    written || (unset && commented(&key)),
                    "config/staging.toml does not show {section}.{key}"
                );
            }
        }
        for key in ["data_dir", "shutdown_timeout_secs"] {
            assert!(table.contains_key(key), "config/staging.toml lacks {key}");
        }
    }

    #[test]
    fn webhook_mode_needs_a_url_and_a_secret_in_telegrams_alphabet() {
        let t = Tree::new();
        t.write("config/staging.toml", "[telegram]\nmode = \"webhook\"\n");
        let mut opts = t.opts(Env::Staging);
        opts.require_platform_tokens = true;
        check(
            load_with(&opts, &[]),
            &[
                "config/staging.toml: telegram.webhook_url: required with mode = \"webhook\": the public https:// URL Telegram calls (e.g. \"https://bot.example.com\"; each bot is served at <url>/telegram/<bot>)",
                "config/staging.toml: telegram.webhook_secret_env: environment variable TELEGRAM_WEBHOOK_SECRET is not set",
            ],
        );
        t.write("config/staging.toml", "[telegram]\nmode = \"hook\"\n");
        check(
            load_with(&opts, &[]),
            &["config/staging.toml: telegram.mode: `hook` is not one of \"polling\", \"webhook\""],
        );
        t.write(
            "config/staging.toml",
            "[telegram]\nmode = \"webhook\"\nwebhook_url = \"http://127.0.0.1:1/x\"\nwebhook_bind = \"here\"\nwebhook_secret_env = \"HOOK\"\n",
        );
        check(
            load_with(&opts, &[("HOOK", "not allowed!")]),
            &[
                "config/staging.toml: telegram.webhook_bind: `here` is not an IP:port address (e.g. 127.0.0.1:8443)",
                "config/staging.toml: telegram.webhook_secret_env: the secret in HOOK must be 1 to 256 characters of A-Z, a-z, 0-9, `_` and `-` (Telegram's rule for the secret token)",
            ],
        );
        let long = "a".repeat(257);
        let problems = lines(load_with(&opts, &[("HOOK", &long)]));
        assert!(
            problems.iter().any(|p| p.contains("1 to 256 characters")),
            "{problems:?}"
        );
        assert!(
            problems.iter().all(|p| !p.contains(&long)),
            "the secret is never echoed"
        );
        t.write(
            "config/staging.toml",
            "[telegram]\nmode = \"webhook\"\nwebhook_url = \"http://127.0.0.1:1/x/\"\nwebhook_secret_env = \"HOOK\"\n",
        );
        let c = ok(load_with(&opts, &[("HOOK", "s3cr3t_-X")]));
        let TelegramMode::Webhook(hook) = &c.telegram_mode else {
            panic!("webhook mode: {:?}", c.telegram_mode);
        };
        assert_eq!(hook.url_for("b"), "http://127.0.0.1:1/x/telegram/b");
        assert_eq!(hook.bind.to_string(), "127.0.0.1:8443");
        assert_eq!(hook.secret.as_ref().map(Secret::expose), Some("s3cr3t_-X"));
        // Production: only https.
        t.write(
            "config/production.toml",
            "[admins]\ntelegram = [42]\n[telegram]\nmode = \"webhook\"\nwebhook_url = \"http://bot.example.com\"\n",
        );
        let problems = lines(t.load(Env::Production, &[]));
        assert!(
            problems.contains(&"config/production.toml: telegram.webhook_url: `http://bot.example.com` is not https://; Telegram calls webhooks over HTTPS only (http:// is allowed in staging, for tests)".to_string()),
            "{problems:?}"
        );
    }

    #[test]
    fn shard_ranges_are_checked_against_the_total() {
        let t = Tree::new();
        let shards = |v: &str| {
            t.write("config/staging.toml", &format!("[discord]\nshards = {v}\n"));
            t.load(Env::Staging, &[])
        };
        assert_eq!(ok(shards("\"auto\"")).discord_shards, Shards::Auto);
        assert_eq!(ok(t.load(Env::Staging, &[])).discord_shards, Shards::Auto);
        assert_eq!(
            ok(shards("{ total = 4, ids = \"2-3\" }")).discord_shards,
            Shards::Range {
                total: 4,
                first: 2,
                last: 3
            }
        );
        assert_eq!(
            ok(shards("{ total = 1, ids = \"0\" }")).discord_shards,
            Shards::Range {
                total: 1,
                first: 0,
                last: 0
            }
        );
        let cases = [
            ("\"all\"", "discord.shards: \"all\" is not \"auto\" or { total = N, ids = \"A-B\" } (e.g. { total = 4, ids = \"0-1\" })"),
            ("{ total = 0, ids = \"0-0\" }", "discord.shards.total: 0 is not a shard count (1 to 65535)"),
            ("{ total = 4, ids = \"3-2\" }", "discord.shards.ids: \"3-2\": the first shard (3) comes after the last (2)"),
            ("{ total = 4, ids = \"2-4\" }", "discord.shards.ids: \"2-4\": shard 4 does not exist with total = 4 (ids run from 0 to 3)"),
            ("{ total = 4, ids = \"a-b\" }", "discord.shards.ids: `a-b` is not a shard range like \"0-3\""),
            ("{ total = 4 }", "discord.shards.ids: missing: the shards this instance runs, e.g. ids = \"0-3\""),
            ("{ ids = \"0-1\" }", "discord.shards: `total` is missing: \"auto\" or { total = N, ids = \"A-B\" } (e.g. { total = 4, ids = \"0-1\" })"),
            ("{ total = 4, ids = \"0-1\", count = 2 }", "discord.shards.count: unknown key (expected `total` and `ids`)"),
        ];
        for (value, problem) in cases {
            check(shards(value), &[&format!("config/staging.toml: {problem}")]);
        }
    }

    #[test]
    fn production_without_a_data_key_warns_but_loads() {
        let t = Tree::new();
        let opts = t.opts(Env::Production);
        let c = ok(load_with(&opts, &[("OPENAI_API_KEY", GOOD_KEY)]));
        let w: Vec<String> = warnings(&c).iter().map(|p| p.to_string()).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("env: CONFAB_DATA_KEY: CONFAB_DATA_KEY is not set"),
            "{w:?}"
        );
        let c = ok(load_with(
            &opts,
            &[("OPENAI_API_KEY", GOOD_KEY), (DATA_KEY_ENV, GOOD_KEY)],
        ));
        assert!(warnings(&c).is_empty());
        let c = ok(t.load(Env::Staging, &[]));
        assert!(warnings(&c).is_empty(), "staging does not warn");
    }

    #[test]
    fn the_systemd_credential_is_the_env_file_unless_one_is_named() {
        let t = Tree::new();
        let creds = tempfile::tempdir().expect("tmp");
        let cred = creds.path().join("env");
        std::fs::write(&cred, "CONFAB__LOG__LEVEL=debug\n").expect("write");
        set_mode(&cred, 0o400);
        t.write(".env.staging", "CONFAB__LOG__LEVEL=warn\n");
        let dir = creds.path().to_string_lossy().into_owned();
        let vars = [("CREDENTIALS_DIRECTORY", dir.as_str())];
        let opts = t.opts(Env::Staging);
        assert_eq!(ok(load_with(&opts, &vars)).log.level, "debug");
        let named = LoadOptions {
            env_file: Some(t.dir.path().join(".env.staging")),
            ..opts.clone()
        };
        assert_eq!(ok(load_with(&named, &vars)).log.level, "warn");
        // Production accepts the credential whatever its mode bits (systemd keeps its
        // directory private to the unit); the operator's own file is still checked.
        let prod = t.opts(Env::Production);
        set_mode(&cred, 0o644);
        let secrets = [vars[0], ("OPENAI_API_KEY", GOOD_KEY)];
        assert_eq!(ok(load_with(&prod, &secrets)).log.level, "debug");
        std::fs::remove_file(&cred).expect("rm");
        assert_eq!(ok(load_with(&opts, &vars)).log.level, "warn");
    }
}
