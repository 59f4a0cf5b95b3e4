//! Engine benchmarks (SPEC §13): messages/s through the whole pipeline with an in-process
//! LLM answering at 0 ms, and the latency of a cache hit. Real sled in a temp dir.
//!
//! Run: `cargo bench --bench engine`. The fake LLM lives here, never in the product.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::{engine, message};

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
