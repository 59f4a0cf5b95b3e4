//! Shared by the engine benches: an engine on real sled in a temp dir, answering through an
//! in-process 0 ms LLM (it lives here, never in the product).

// Each bench binary uses its own part of this module.
#![allow(dead_code)]

pub mod cpu;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use confab::config::{BotConfig, Config, Env};
use confab::domain::{Content, Inbound, Platform};
use confab::engine::Engine;
use confab::llm::{ChatRequest, ChatResponse, DeltaStream, LlmError, LlmProvider, ResilientLlm};
use confab::store::{SledStore, Store};
use futures::future::BoxFuture;

/// Answers at once, like a 0 ms LLM.
struct InstantLlm;

impl LlmProvider for InstantLlm {
    fn complete(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, LlmError>> {
        let last = req
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        Box::pin(async move {
            Ok(ChatResponse {
                text: format!("answer to: {last}"),
                prompt_tokens: 50,
                completion_tokens: 20,
            })
        })
    }

    fn stream(&self, _req: ChatRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
        Box::pin(async { Err(LlmError::Connect("streaming not benchmarked".into())) })
    }
}

pub fn engine(dir: &std::path::Path, cache: bool) -> Arc<Engine> {
    engine_and_store(dir, cache).0
}

/// The engine and its store (for the group-commit counters).
pub fn engine_and_store(dir: &std::path::Path, cache: bool) -> (Arc<Engine>, Arc<SledStore>) {
    let mut cfg = Config::with_defaults(Env::Staging, dir);
    cfg.data_dir = dir.join("data");
    cfg.cache.enabled = cache;
    cfg.limits.messages_per_minute = 1_000_000;
    cfg.limits.burst = 1_000_000;
    cfg.limits.daily_tokens = u64::MAX;
    let mut prompts = BTreeMap::new();
    prompts.insert(
        "assistant".to_string(),
        "You are {{bot_name}}, a helpful assistant for {{user_name}} on {{platform}}. Today is {{date}}.".to_string(),
    );
    cfg.prompts = prompts;
    cfg.bots = vec![BotConfig {
        name: "assistant".into(),
        prompt: "assistant".into(),
        llm: Default::default(),
        stream: false,
        vision: false,
        voice_replies: Default::default(),
        limits: None,
        telegram: None,
        discord: None,
    }];
    let sled = Arc::new(
        SledStore::open(
            &cfg.data_dir,
            cfg.store.cache_capacity_mb,
            cfg.store.flush_every_ms,
        )
        .expect("open store"),
    );
    let store: Arc<dyn Store> = sled.clone();
    let llm = Arc::new(ResilientLlm::new(
        Arc::new(InstantLlm),
        cfg.llm.retry_policy(),
    ));
    (
        Arc::new(Engine::new(cfg, store, llm).expect("engine")),
        sled,
    )
}

static UPDATE: AtomicU64 = AtomicU64::new(1);

pub fn message(user: u64, text: &str) -> Inbound {
    Inbound {
        bot: "assistant".into(),
        platform: Platform::Telegram,
        update_id: Some(UPDATE.fetch_add(1, Ordering::Relaxed).to_string()),
        chat_id: user.to_string(),
        user_id: user.to_string(),
        user_name: "Bench".into(),
        username: None,
        is_private: true,
        forwarded: false,
        content: Content::Text(text.into()),
    }
}

/// User + system CPU seconds a process has used so far (from /proc/<pid>/stat; CLK_TCK = 100).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name: utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
