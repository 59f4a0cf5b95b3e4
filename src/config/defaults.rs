//! Every default of `config/<env>.toml`, in one place: the raw structs' `Default` impls,
//! the validators and the adapters read them here. `config/staging.toml` shows the same
//! values (a test compares them).

use super::Env;

/// `data_dir`: each environment gets its own store.
pub fn data_dir(env: Env) -> String {
    format!("data/{env}")
}
pub const SHUTDOWN_TIMEOUT_SECS: u64 = 30;

pub mod http {
    pub const BIND: &str = "127.0.0.1:9464";
}

pub mod log {
    pub const FORMAT: &str = "pretty";
    pub const LEVEL: &str = "info";
    pub const UNSAFE_DEBUG: bool = false;
}

pub mod llm {
    use std::time::Duration;

    pub const BASE_URL: &str = "https://api.openai.com/v1";
    pub const API_KEY_ENV: &str = "OPENAI_API_KEY";
    pub const MODEL: &str = "gpt-4o-mini";
    pub const TIMEOUT_SECS: u64 = 60;
    pub const CONNECT_TIMEOUT_SECS: u64 = 10;
    pub const MAX_RETRIES: u32 = 3;
    pub const MAX_CONCURRENT: usize = 256;
    /// 0: no global cap.
    pub const REQUESTS_PER_MINUTE: u32 = 0;
    pub const RETRY_AFTER_CAP_SECS: u64 = 30;
    pub const BACKOFF_BASE_MS: u64 = 250;
    pub const BREAKER_FAILURES: u32 = 5;
    pub const BREAKER_COOLDOWN_SECS: u64 = 30;
    pub const QUEUE_TIMEOUT_SECS: u64 = 30;
    /// `None`: the server's default.
    pub const TEMPERATURE: Option<f32> = None;
    /// A bound on what one answer can cost.
    pub const MAX_TOKENS: Option<u32> = Some(1024);
    /// The longest backoff step between retries (not a config key).
    pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
}

pub mod limits {
    pub const MESSAGES_PER_MINUTE: u32 = 6;
    pub const BURST: u32 = 3;
    pub const DAILY_TOKENS: u64 = 50_000;
    pub const MAX_INPUT_CHARS: usize = 4000;
    pub const COMMANDS_PER_MINUTE: u32 = 20;
    pub const COMMANDS_BURST: u32 = 10;
}

pub mod memory {
    pub const MAX_CONTEXT_TOKENS: usize = 4000;
    pub const RETENTION_DAYS: u32 = 30;
}

pub mod cache {
    pub const ENABLED: bool = true;
    pub const TTL_SECS: u64 = 86_400;
    pub const MAX_ENTRIES: usize = 100_000;
    pub const SCOPE: &str = "global";
}

pub mod store {
    /// sled's own default is 1 GB; 16 MB keeps the daemon's RSS low (BENCHMARKS.md).
    pub const CACHE_CAPACITY_MB: u64 = 16;
    pub const FLUSH_EVERY_MS: u64 = 500;
    pub const GROUP_COMMIT_US: u64 = 500;
}

pub mod delivery {
    pub const MAX_RETRY_SECS: u64 = 600;
    pub const MAX_QUEUE_PER_CHAT: usize = 32;
    pub const MAX_PENDING: usize = 10_000;
}

pub mod audit {
    pub const RETENTION_DAYS: u32 = 365;
}

/// The defaults of a `[telegram]` / `[discord]` section, which differ per platform.
pub struct Platform {
    pub api_url: &'static str,
    pub per_chat_per_minute: u32,
    pub group_per_minute: u32,
    pub global_per_second: u32,
}

/// Telegram: ≈1 msg/s per chat, 20/min per group, 30/s per bot.
pub const TELEGRAM: Platform = Platform {
    api_url: "https://api.telegram.org",
    per_chat_per_minute: 60,
    group_per_minute: 20,
    global_per_second: 30,
};

/// Discord: 5 per 5 s per channel, 50 requests/s per bot. With this URL serenity's own
/// rate limiter stays on (it ignores any proxy).
pub const DISCORD: Platform = Platform {
    api_url: "https://discord.com",
    per_chat_per_minute: 60,
    group_per_minute: 60,
    global_per_second: 50,
};
