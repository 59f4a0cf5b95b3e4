//! Config structs build their component (vector's `SourceConfig::build`): the LLM
//! client from `[llm]`, the store from `[store]`. `llm/` and `store/` never see `Config`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{defaults, Env, LlmConfig, Secret, StoreBackend, StoreConfig};
use crate::llm::{LlmError, OpenAiProvider, ResilientLlm, RetryPolicy};
use crate::store::{Backend, RedisOptions, RedisStore, SledStore, StoreError, StoreResult};

impl LlmConfig {
    /// Retries, timeouts, breaker and concurrency cap of `[llm]`.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: defaults::LLM_BACKOFF_MAX,
            retry_after_cap: Duration::from_secs(self.retry_after_cap_secs),
            timeout: Duration::from_secs(self.timeout_secs),
            breaker_failures: self.breaker_failures,
            breaker_cooldown: Duration::from_secs(self.breaker_cooldown_secs),
            max_concurrent: self.max_concurrent,
            requests_per_minute: self.requests_per_minute,
            queue_timeout: Duration::from_secs(self.queue_timeout_secs),
        }
    }

    /// The OpenAI-compatible client at `base_url`, wrapped in the retry policy.
    pub fn build(&self) -> Result<ResilientLlm, LlmError> {
        let api_key = self.api_key.as_ref().map(Secret::expose).unwrap_or("");
        if api_key.is_empty() {
            tracing::warn!(env_var = %self.api_key_env, "no LLM API key set; fine for local servers, not for hosted APIs");
        }
        let connect_timeout = Duration::from_secs(self.connect_timeout_secs);
        let provider = OpenAiProvider::new(&self.base_url, api_key, connect_timeout)?;
        Ok(ResilientLlm::new(Arc::new(provider), self.retry_policy()))
    }
}

impl StoreConfig {
    /// Opens the configured backend: sled in `data_dir` (with this section's page
    /// cache, flush period and group-commit window) or Redis at `redis_url`; either
    /// encrypted with `data_key` when set.
    pub fn open(
        &self,
        env: Env,
        data_dir: &Path,
        data_key: Option<&Secret>,
        cache_ttl_secs: u64,
    ) -> StoreResult<Backend> {
        match self.backend {
            StoreBackend::Sled => self
                .open_sled(data_dir, data_key)
                .map(|s| Backend::Sled(Arc::new(s))),
            StoreBackend::Redis => {
                let url = self.redis_url.as_ref().ok_or_else(|| StoreError::Open {
                    path: "redis".into(),
                    reason: format!("{} is not set", self.redis_url_env),
                })?;
                let store = RedisStore::open(RedisOptions {
                    url: url.expose().to_string(),
                    prefix: self.prefix(env),
                    timeout: Duration::from_millis(self.redis_timeout_ms),
                    cache_ttl_secs,
                    data_key: data_key.map(|k| k.expose().to_string()),
                })?;
                Ok(Backend::Redis(Arc::new(store)))
            }
        }
    }

    /// Opens the sled store in `data_dir` (encrypted with `data_key` when set).
    pub fn open_sled(&self, data_dir: &Path, data_key: Option<&Secret>) -> StoreResult<SledStore> {
        let store = SledStore::open_with_key(
            data_dir,
            self.cache_capacity_mb,
            self.flush_every_ms,
            data_key.map(Secret::expose),
        )?;
        store.set_group_commit_window(Duration::from_micros(self.group_commit_us));
        Ok(store)
    }
}
