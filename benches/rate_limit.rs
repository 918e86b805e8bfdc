//! Checks per second of each rate-limit algorithm at 1, 16 and 64 concurrent tasks, beside
//! (a) the raw redis client sending the identical commands or script on one shared
//! `MultiplexedConnection`, and (b) the naive two-round-trip `INCR` then `EXPIRE` pattern.
//!
//! Criterion reports each side's throughput; the quoted figures are the paired ratios printed at
//! the end (alternating rounds, see `support::paired_ratio`).
//!
//! ```sh
//! cargo bench --all-features --bench rate_limit -- --warm-up-time 1 --measurement-time 3
//! ```

use std::sync::Arc;
use std::time::Duration;

use aether_redis::rate_limit::{
    Algorithm, RateLimiter, RateLimiterConfig, Tier, TierName, gcra_script, sliding_script,
};
use aether_redis::{Keyspace, Redis};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redis::aio::MultiplexedConnection;

mod support;
use support::{paired_ratio, run_concurrent};

const TASKS: [usize; 3] = [1, 16, 64];
/// Large enough that every check is admitted and writes state, as a typical check does.
const LIMIT: u64 = 1_000_000_000;
const WINDOW: Duration = Duration::from_secs(3600);

/// One check through the limiter.
fn ours_op(
    limiter: RateLimiter,
    user: Arc<str>,
    endpoint: Arc<str>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Clone + Send + 'static {
    let tier = TierName::custom("bench");
    move || {
        let (limiter, user, endpoint, tier) = (
            limiter.clone(),
            user.clone(),
            endpoint.clone(),
            tier.clone(),
        );
        Box::pin(async move {
            let decision = limiter.check(&user, &endpoint, &tier).await.expect("check");
            assert!(decision.allowed);
        })
    }
}

/// The commands the limiter sends for `algorithm`, written by hand on the raw client.
fn raw_op(
    raw: MultiplexedConnection,
    algorithm: Algorithm,
    key: Arc<str>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Clone + Send + 'static {
    move || {
        let (mut conn, key) = (raw.clone(), key.clone());
        Box::pin(async move {
            match algorithm {
                Algorithm::FixedWindow => {
                    let (count, _pttl): (i64, i64) = redis::pipe()
                        .atomic()
                        .cmd("INCRBY")
                        .arg(&*key)
                        .arg(1)
                        .cmd("PEXPIRE")
                        .arg(&*key)
                        .arg(WINDOW.as_millis() as u64)
                        .arg("NX")
                        .ignore()
                        .cmd("PTTL")
                        .arg(&*key)
                        .query_async(&mut conn)
                        .await
                        .expect("MULTI");
                    assert!(count as u64 <= LIMIT);
                }
                _ => {
                    let (sha, first, second) = if matches!(algorithm, Algorithm::Gcra) {
                        let tier = Tier::new(LIMIT, WINDOW).expect("tier");
                        (
                            gcra_script().sha(),
                            (WINDOW.as_micros() as u64).div_ceil(LIMIT),
                            tier.burst(),
                        )
                    } else {
                        (sliding_script().sha(), WINDOW.as_millis() as u64, LIMIT)
                    };
                    let reply: Vec<i64> = redis::cmd("EVALSHA")
                        .arg(sha)
                        .arg(1)
                        .arg(&*key)
                        .arg(first)
                        .arg(second)
                        .arg("1")
                        .arg(1)
                        .query_async(&mut conn)
                        .await
                        .expect("EVALSHA");
                    assert_eq!(reply[0], 1);
                }
            }
        })
    }
}

/// The naive pattern: `INCR`, then `EXPIRE`, two round trips.
fn naive_op(
    raw: MultiplexedConnection,
    key: Arc<str>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Clone + Send + 'static {
    move || {
        let (mut conn, key) = (raw.clone(), key.clone());
        Box::pin(async move {
            let _: i64 = redis::cmd("INCR")
                .arg(&*key)
                .query_async(&mut conn)
                .await
                .expect("INCR");
            let _: i64 = redis::cmd("EXPIRE")
                .arg(&*key)
                .arg(WINDOW.as_secs())
                .query_async(&mut conn)
                .await
                .expect("EXPIRE");
        })
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = aether_redis::testkit::shared_server().expect("test server");
    let mut config = server.config.clone();
    config.key_prefix = aether_redis::testkit::namespace("bench_rate_limit");
    let redis = runtime
        .block_on(Redis::connect(config.clone()))
        .expect("connect");
    let raw = runtime
        .block_on(async {
            redis::Client::open(format!("redis://{}:{}", config.host, config.port))
                .expect("client")
                .get_multiplexed_async_connection()
                .await
        })
        .expect("raw connection");

    let mut ratios = Vec::new();
    for algorithm in [
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
    ] {
        let tier = Tier::new(LIMIT, WINDOW)
            .expect("tier")
            .with_algorithm(algorithm);
        let limiter = redis
            .rate_limiter_with(RateLimiterConfig::default().tier(TierName::custom("bench"), tier))
            .expect("limiter");
        // The first check loads the script into the server's cache, so that the raw side's
        // EVALSHA finds it.
        runtime
            .block_on(limiter.check("warm", "api", &TierName::custom("bench")))
            .expect("warm-up check");
        // One key per side and algorithm: the layouts differ by algorithm. All tasks of a side
        // share it, as concurrent requests of one user do.
        let key = |owner: &str| -> Arc<str> {
            redis
                .keys()
                .key(Keyspace::RateLimit, &[owner, &algorithm.to_string()])
                .expect("key")
                .into()
        };
        let ours = ours_op(limiter.clone(), "ours".into(), algorithm.to_string().into());
        let raw_side = raw_op(raw.clone(), algorithm, key("raw"));
        let naive = naive_op(raw.clone(), key("naive"));

        let mut group = c.benchmark_group(format!("rate_limit/{algorithm}"));
        group.throughput(Throughput::Elements(1));
        for tasks in TASKS {
            group.bench_with_input(BenchmarkId::new("aether", tasks), &tasks, |b, &tasks| {
                b.to_async(&runtime)
                    .iter_custom(|iters| run_concurrent(iters, tasks, ours.clone()))
            });
            group.bench_with_input(BenchmarkId::new("raw", tasks), &tasks, |b, &tasks| {
                b.to_async(&runtime)
                    .iter_custom(|iters| run_concurrent(iters, tasks, raw_side.clone()))
            });
            group.bench_with_input(
                BenchmarkId::new("naive_incr_expire", tasks),
                &tasks,
                |b, &tasks| {
                    b.to_async(&runtime)
                        .iter_custom(|iters| run_concurrent(iters, tasks, naive.clone()))
                },
            );
        }
        group.finish();

        for tasks in TASKS {
            let label = format!("rate_limit/{algorithm}");
            let vs_raw = runtime.block_on(paired_ratio(
                &format!("{label} vs raw"),
                tasks,
                ours.clone(),
                raw_side.clone(),
            ));
            let vs_naive = runtime.block_on(paired_ratio(
                &format!("{label} vs naive"),
                tasks,
                ours.clone(),
                naive.clone(),
            ));
            ratios.push((algorithm, tasks, vs_raw, vs_naive));
        }
    }
    println!("\n| algorithm | tasks | vs raw | vs naive INCR+EXPIRE |\n|---|---|---|---|");
    for (algorithm, tasks, vs_raw, vs_naive) in ratios {
        println!("| {algorithm} | {tasks} | {vs_raw:.2} | {vs_naive:.2} |");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
