//! Engine benchmarks (SPEC §13): messages/s through the whole pipeline with an in-process
//! LLM answering at 0 ms, and the latency of a cache hit. Real sled in a temp dir.
//!
//! Run: `cargo bench --bench engine`. The fake LLM lives here, never in the product.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use confab::config::{BotConfig, Config, Env};
use confab::domain::{Content, Inbound, Platform};
use confab::engine::Engine;
use confab::llm::{ChatRequest, ChatResponse, DeltaStream, LlmError, LlmProvider, ResilientLlm};
use confab::store::{BoxFuture, SledStore, Store};

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

fn engine(dir: &std::path::Path, cache: bool) -> Arc<Engine> {
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
        model: None,
        temperature: None,
        max_tokens: None,
        stream: false,
        limits: None,
        telegram: None,
        discord: None,
    }];
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(
            &cfg.data_dir,
            cfg.store.cache_capacity_mb,
            cfg.store.flush_every_ms,
        )
        .expect("open store"),
    );
    let llm = Arc::new(ResilientLlm::new(
        Arc::new(InstantLlm),
        confab::app::retry_policy(&cfg),
    ));
    Arc::new(Engine::new(cfg, store, llm).expect("engine"))
}

static UPDATE: AtomicU64 = AtomicU64::new(1);

fn message(user: u64, text: &str) -> Inbound {
    Inbound {
        bot: "assistant".into(),
        platform: Platform::Telegram,
        update_id: Some(UPDATE.fetch_add(1, Ordering::Relaxed).to_string()),
        chat_id: user.to_string(),
        user_id: user.to_string(),
        user_name: "Bench".into(),
        username: None,
        is_private: true,
        content: Content::Text(text.into()),
    }
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), false);
    let mut group = c.benchmark_group("engine");
    // Many conversations at once share each durability flush (group commit).
    for concurrent in [1u64, 64, 512] {
        group.throughput(Throughput::Elements(concurrent));
        let next_user = AtomicU64::new(0);
        group.bench_with_input(
            BenchmarkId::new("messages", concurrent),
            &concurrent,
            |b, &n| {
                b.to_async(&rt).iter(|| {
                    let base = next_user.fetch_add(n, Ordering::Relaxed);
                    let engine = engine.clone();
                    async move {
                        let tasks: Vec<_> = (0..n)
                            .map(|i| {
                                let engine = engine.clone();
                                // 10k distinct users, each conversation growing slowly
                                let m = message((base + i) % 10_000, "How do I bake bread?");
                                tokio::spawn(async move { engine.handle(&m).await })
                            })
                            .collect();
                        for t in tasks {
                            let _ = t.await;
                        }
                    }
                })
            },
        );
    }
    group.finish();
}

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), true);
    // Prime the cache: a first user asks; every new user asking the same opening
    // question (same persona, empty history) is then a hit.
    rt.block_on(engine.handle(&message(0, "What is the capital of France?")));
    let next_user = AtomicU64::new(1);
    c.bench_function("engine/cache_hit", |b| {
        b.to_async(&rt).iter(|| {
            let user = next_user.fetch_add(1, Ordering::Relaxed);
            let engine = engine.clone();
            async move {
                let reply = engine
                    .handle(&message(user, "What is the capital of France?"))
                    .await;
                debug_assert_eq!(reply.outcome(), "cached");
            }
        })
    });
}

criterion_group!(benches, throughput, cache_hit);
criterion_main!(benches);
