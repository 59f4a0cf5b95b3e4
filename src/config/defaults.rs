//! Every default of `config/<env>.toml`, in one place: each section's `Default` (what an
//! absent key means), the defaults that depend on the environment or the platform, and
//! the Discord URL the adapter compares against. `config/staging.toml` shows the same
//! values (a test compares them).

use std::time::Duration;

use super::raw::{RawCache, RawHttp, RawLog};
use super::{
    AdminsConfig, AuditConfig, DeliveryConfig, Env, LimitsConfig, LlmConfig, MediaConfig,
    MemoryConfig, OtelConfig, StoreConfig,
};

/// `data_dir`: each environment gets its own store.
pub fn data_dir(env: Env) -> String {
    format!("data/{env}")
}

pub const SHUTDOWN_TIMEOUT_SECS: u64 = 30;

/// The longest backoff step between LLM retries (not a config key).
pub const LLM_BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9464".into(),
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            level: "info".into(),
            unsafe_debug: false,
        }
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            api_key: None,
            model: "gpt-4o-mini".into(),
            timeout_secs: 60,
            connect_timeout_secs: 10,
            max_retries: 3,
            max_concurrent: 256,
            requests_per_minute: 0,
            retry_after_cap_secs: 30,
            backoff_base_ms: 250,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
            queue_timeout_secs: 30,
            temperature: None,
            // A bound on what one answer can cost.
            max_tokens: Some(1024),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            messages_per_minute: 6,
            burst: 3,
            daily_tokens: 50_000,
            max_input_chars: 4000,
            commands_per_minute: 20,
            commands_burst: 10,
            daily_audio_secs: 1_800,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_context_tokens: 4000,
            retention_days: 30,
        }
    }
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 86_400,
            max_entries: 100_000,
            scope: "global".into(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            // sled's own default is 1 GB; 8 MB keeps the daemon's RSS low at no measured
            // throughput cost (16 → 8: 6–11 MiB less with 100k stored users; BENCHMARKS.md).
            cache_capacity_mb: 8,
            flush_every_ms: 500,
            // Only under load (the last flush served several replies): 2 ms let more
            // replies share a flush than 500 µs did, for 2–16 % more msg/s (BENCHMARKS.md).
            group_commit_us: 2000,
            backend: super::StoreBackend::Sled,
            redis_url_env: "CONFAB_REDIS_URL".into(),
            redis_timeout_ms: 2000,
            redis_prefix: None,
            redis_url: None,
        }
    }
}

impl Default for AdminsConfig {
    /// None: production refuses to start until the operator names one.
    fn default() -> Self {
        Self {
            telegram: Vec::new(),
            discord: Vec::new(),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_retry_secs: 600,
            max_queue_per_chat: 32,
            max_pending: 10_000,
            orphan_replay_secs: 60,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 365,
        }
    }
}

impl Default for MediaConfig {
    /// Telegram's Bot API serves files up to 20 MB; OpenAI's transcription takes 25 MB.
    fn default() -> Self {
        Self {
            max_audio_secs: 300,
            max_download_mb: 20,
            transcription_model: "whisper-1".into(),
            show_transcript: true,
            speech_model: "tts-1".into(),
            speech_voice: "alloy".into(),
            response_format: "opus".into(),
            max_spoken_chars: 1_000,
        }
    }
}

impl Default for OtelConfig {
    /// Off (no endpoint); when on, every update is traced.
    fn default() -> Self {
        Self {
            endpoint: None,
            sample_ratio: 1.0,
        }
    }
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

/// `[telegram] mode`.
pub const TELEGRAM_MODE: &str = "polling";
/// `[telegram] webhook_bind`: the local webhook server (behind TLS termination).
pub const TELEGRAM_WEBHOOK_BIND: &str = "127.0.0.1:8443";
/// `[telegram] webhook_secret_env`: the variable holding the webhook's secret token.
pub const TELEGRAM_WEBHOOK_SECRET_ENV: &str = "TELEGRAM_WEBHOOK_SECRET";
