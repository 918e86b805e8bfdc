//! `CacheManager::get` (a hit) beside the raw redis client sending the same `GET` on one shared
//! `MultiplexedConnection`, at 1, 16 and 64 concurrent tasks. Both sides decode the JSON into the
//! same `CacheEntry<serde_json::Value>`, so the ratio is what the crate adds: hashing the params,
//! building and validating the key, the shared-connection lookup and the counters. Criterion
//! reports each side; the quoted ratios are the paired ones printed at the end (alternating
//! rounds, see `support::paired_ratio`).
//!
//! ```sh
//! cargo bench --all-features --bench cache -- --warm-up-time 1 --measurement-time 3
//! ```

use std::time::Duration;

use aether_redis::Redis;
use aether_redis::cache::{CacheEntry, CacheManager};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};

mod support;
use support::{paired_ratio, run_concurrent};

const ENDPOINT: &str = "/api/users";
const TASKS: [usize; 3] = [1, 16, 64];

fn params() -> Value {
    json!({"page": 1, "role": "admin", "sort": "name"})
}

struct Setup {
    cache: CacheManager,
    raw: MultiplexedConnection,
    key: String,
}

async fn setup() -> Setup {
    let server = aether_redis::testkit::shared_server().expect("a Redis for the bench");
    let mut config = server.config.clone();
    config.key_prefix = aether_redis::testkit::namespace("bench_cache");
    let redis = Redis::connect(config.clone()).await.expect("connect");
    let cache = redis.cache();
    let entry = CacheEntry::new(json!({
        "users": (0..10).map(|i| json!({"id": i, "name": format!("user-{i}")})).collect::<Vec<_>>()
    }))
    .with_header("content-type", "application/json");
    cache
        .set_with_ttl(ENDPOINT, &params(), &entry, Duration::from_secs(600))
        .await
        .expect("set");
    let key = cache.key(ENDPOINT, &params()).expect("key");
    let client = redis::Client::open(format!("redis://{}:{}/", config.host, config.port))
        .expect("raw client");
    let raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    Setup { cache, raw, key }
}

fn cache_get(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let setup = rt.block_on(setup());
    let params = std::sync::Arc::new(params());
    let raw_op = {
        let conn = setup.raw.clone();
        let key = setup.key.clone();
        move || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("GET");
                let entry: CacheEntry<Value> = serde_json::from_slice(&bytes).expect("decode");
                std::hint::black_box(entry);
            }
        }
    };
    let aether_op = {
        let cache = setup.cache.clone();
        // The caller has its params at hand; hashing them is part of the measured work.
        let params = params.clone();
        move || {
            let cache = cache.clone();
            let params = params.clone();
            async move {
                let entry = cache
                    .get::<Value, _>(ENDPOINT, &*params)
                    .await
                    .expect("get")
                    .expect("hit");
                std::hint::black_box(entry);
            }
        }
    };
    let mut group = c.benchmark_group("cache_get");
    group.throughput(Throughput::Elements(1));
    for tasks in TASKS {
        group.bench_with_input(BenchmarkId::new("raw", tasks), &tasks, |b, &tasks| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, raw_op.clone()))
        });
        group.bench_with_input(BenchmarkId::new("aether", tasks), &tasks, |b, &tasks| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, aether_op.clone()))
        });
    }
    group.finish();
    for tasks in TASKS {
        rt.block_on(paired_ratio(
            "cache_get",
            tasks,
            aether_op.clone(),
            raw_op.clone(),
        ));
    }
}

/// The client-side work of one lookup without I/O: canonical JSON, SHA-256, key validation.
fn cache_key(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let setup = rt.block_on(setup());
    let params = params();
    c.bench_function("cache_key", |b| {
        b.iter(|| std::hint::black_box(setup.cache.key(ENDPOINT, &params).expect("key")))
    });
}

criterion_group!(benches, cache_get, cache_key);
criterion_main!(benches);
