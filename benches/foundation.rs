//! Connection strategy: one command (`GET` of a small key) through
//! - `raw`: the redis client on one shared `MultiplexedConnection` (the floor),
//! - `shared`: `Redis::connection()` (what repositories use),
//! - `checkout`: a deadpool-redis pool checkout per command (what we chose not to do),
//!
//! at 1, 16 and 64 concurrent tasks.
//!
//! Run: `cargo bench --bench foundation --features testkit -- --warm-up-time 1 --measurement-time 3`

use aether_redis::Redis;
use criterion::{Criterion, criterion_group, criterion_main};

mod support;
use support::run_concurrent;

const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
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

    let mut group = c.benchmark_group("get");
    for tasks in CONCURRENCY {
        group.throughput(criterion::Throughput::Elements(1));
        group.bench_function(format!("raw/{tasks}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let raw = raw.clone();
                run_concurrent(iters, tasks, move || {
                    let mut conn = raw.clone();
                    async move {
                        let _: Option<String> = redis::cmd("GET")
                            .arg("bench:foundation")
                            .query_async(&mut conn)
                            .await
                            .expect("get");
                    }
                })
            })
        });
        group.bench_function(format!("shared/{tasks}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let redis = redis.clone();
                run_concurrent(iters, tasks, move || {
                    let redis = redis.clone();
                    async move {
                        let mut conn = redis.connection().await.expect("connection");
                        let _: Option<String> = redis::cmd("GET")
                            .arg("bench:foundation")
                            .query_async(&mut conn)
                            .await
                            .expect("get");
                    }
                })
            })
        });
        group.bench_function(format!("checkout/{tasks}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let pool = pool.clone();
                run_concurrent(iters, tasks, move || {
                    let pool = pool.clone();
                    async move {
                        let mut conn = pool.get().await.expect("checkout");
                        let _: Option<String> = redis::cmd("GET")
                            .arg("bench:foundation")
                            .query_async(&mut conn)
                            .await
                            .expect("get");
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
