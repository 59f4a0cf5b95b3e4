//! Engine benchmarks (SPEC §13): messages/s through the whole pipeline with an in-process
//! LLM answering at 0 ms, and the latency of a cache hit. Real sled in a temp dir.
//!
//! `engine_cpu/messages/N` measures the same pipeline in process CPU time (every
//! thread: tokio workers, sled's threads, the flush thread), so its throughput line is
//! messages per CPU-second: **msg/s per core** (SPEC §13: ≥ 10,000).
//!
//! Run: `cargo bench --bench engine`. The fake LLM lives here, never in the product.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::measurement::Measurement;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::cpu::CpuTime;
use common::{engine, message};

fn throughput(c: &mut Criterion) {
    pipeline(c, "engine");
}

/// msg/s per core: the pipeline measured in process CPU time.
fn per_core(c: &mut Criterion<CpuTime>) {
    pipeline(c, "engine_cpu");
}

/// The whole pipeline, 1, 64 and 512 conversations at once, 10k distinct users.
fn pipeline<M: Measurement + 'static>(c: &mut Criterion<M>, name: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), false);
    let mut group = c.benchmark_group(name);
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

/// The store alone: one answered message's write batch (no flush) and a history load.
fn store(c: &mut Criterion) {
    use confab::domain::{ConversationKey, Platform, UserRef};
    use confab::store::{
        ConversationStore, Exchange, Handled, HandledEntry, Role, SledStore, Turn,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 64, 500).expect("open store");
    let conv = |u: u64| ConversationKey {
        bot: "assistant".into(),
        platform: Platform::Telegram,
        chat: u.to_string(),
        user: u.to_string(),
    };
    let turn = |role, text: &str| Turn {
        role,
        text: text.to_string(),
        tokens: 40,
        at: 1_763_700_000,
    };
    let turns = [
        turn(
            Role::User,
            "How do I bake bread at home without a bread machine?",
        ),
        turn(
            Role::Assistant,
            "Mix flour, water, salt and yeast; knead ten minutes, let it rise until doubled, \
             shape, proof again, then bake at 230 °C for about 30 minutes.",
        ),
    ];
    let pending = HandledEntry {
        state: Handled::Pending {
            reply: turns[1].text.clone(),
        },
        at: 1_763_700_000,
        user: None,
    };
    let next = AtomicU64::new(0);
    c.bench_function("store/record_exchange", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let key = conv(i % 10_000);
            let user = UserRef::new(Platform::Telegram, (i % 10_000).to_string());
            let update = format!("assistant/tg/{i}");
            let mut book = |r: &mut confab::store::UserRecord| r.usage.messages += 1;
            store
                .record_exchange(Exchange {
                    conversation: &key,
                    turns: &turns,
                    handled: Some((&update, &pending)),
                    user: Some((&user, &mut book)),
                })
                .expect("record");
        })
    });
    // Every conversation now has ≥ 2 exchanges; load a 4,000-token context.
    let next = AtomicU64::new(0);
    c.bench_function("store/recent_turns", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            store.recent_turns(&conv(i % 10_000), 4000).expect("load")
        })
    });
}

/// Token counting (cl100k, counted once per stored turn).
fn tokens(c: &mut Criterion) {
    let tok = confab::engine::prompt::Tokenizer::load().expect("tokenizer");
    let short = "How do I bake bread at home without a bread machine?";
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(90); // ≈4,000 chars
    c.bench_function("tokens/count_50_chars", |b| b.iter(|| tok.count(short)));
    c.bench_function("tokens/count_4000_chars", |b| b.iter(|| tok.count(&long)));
}

criterion_group!(benches, throughput, cache_hit, store, tokens);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(CpuTime);
    targets = per_core
}
criterion_main!(benches, cpu);
