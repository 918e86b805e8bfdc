//! Connection strategy: one command (`GET` of a small key) through
//! - `raw`: the redis client on one shared `MultiplexedConnection` (the floor),
//! - `shared`: `Redis::connection()` (what repositories use),
//! - `checkout`: a deadpool-redis pool checkout per command (what we chose not to do),
//!
//! at 1, 16 and 64 concurrent tasks. Criterion reports each side; the quoted ratios are the
//! paired ones printed at the end (alternating rounds, see `support::paired_ratio`).
//!
//! Run: `cargo bench --all-features --bench foundation -- --warm-up-time 1 --measurement-time 3`

use aether_redis::Redis;
use criterion::{Criterion, criterion_group, criterion_main};

mod support;
use support::{paired_ratio, run_concurrent};

const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = aether_redis::testkit::shared_server().expect("test server");
    let url = format!("redis://{}:{}", server.config.host, server.config.port);
    let (redis, raw, pool) = rt.block_on(async {
        let redis = Redis::connect(server.config.clone())
            .await
            .expect("connect");
        let raw = redis::Client::open(url.as_str())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        let pool = deadpool_redis::Config::from_url(url.as_str())
            .builder()
            .expect("pool builder")
            .max_size(64)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .expect("pool");
        let mut conn = raw.clone();
        let _: () = redis::cmd("SET")
            .arg("bench:foundation")
            .arg("v")
            .query_async(&mut conn)
            .await
            .expect("set");
        (redis, raw, pool)
    });

    let raw_op = move || {
        let mut conn = raw.clone();
        async move {
            let _: Option<String> = redis::cmd("GET")
                .arg("bench:foundation")
                .query_async(&mut conn)
                .await
                .expect("get");
        }
    };
    let shared_op = move || {
        let redis = redis.clone();
        async move {
            let mut conn = redis.connection().await.expect("connection");
            let _: Option<String> = redis::cmd("GET")
                .arg("bench:foundation")
                .query_async(&mut conn)
                .await
                .expect("get");
        }
    };
    let checkout_op = move || {
        let pool = pool.clone();
        async move {
            let mut conn = pool.get().await.expect("checkout");
            let _: Option<String> = redis::cmd("GET")
                .arg("bench:foundation")
                .query_async(&mut conn)
                .await
                .expect("get");
        }
    };

    let mut group = c.benchmark_group("get");
    group.throughput(criterion::Throughput::Elements(1));
    for tasks in CONCURRENCY {
        group.bench_function(format!("raw/{tasks}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, raw_op.clone()))
        });
        group.bench_function(format!("shared/{tasks}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, shared_op.clone()))
        });
        group.bench_function(format!("checkout/{tasks}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, checkout_op.clone()))
        });
    }
    group.finish();

    for tasks in CONCURRENCY {
        rt.block_on(paired_ratio(
            "get shared vs raw",
            tasks,
            shared_op.clone(),
            raw_op.clone(),
        ));
        rt.block_on(paired_ratio(
            "get checkout vs raw",
            tasks,
            checkout_op.clone(),
            raw_op.clone(),
        ));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
