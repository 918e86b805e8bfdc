//! Checks per second of each rate-limit algorithm at 1, 16 and 64 concurrent tasks, beside
//! (a) the raw redis client sending the identical commands or script on one shared
//! `MultiplexedConnection`, and (b) the naive two-round-trip `INCR` then `EXPIRE` pattern.
//!
//! ```sh
//! cargo bench --features testkit --bench rate_limit -- --warm-up-time 1 --measurement-time 3
//! ```

use std::time::{Duration, Instant};

use aether_redis::rate_limit::{
    Algorithm, RateLimiter, RateLimiterConfig, Tier, TierName, gcra_script, sliding_script,
};
use aether_redis::{Keyspace, Redis};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redis::aio::MultiplexedConnection;

const TASKS: [usize; 3] = [1, 16, 64];
/// Large enough that every check is admitted and writes state, as a typical check does.
const LIMIT: u64 = 1_000_000_000;
const WINDOW: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy)]
enum Side {
    Ours,
    Raw,
    Naive,
}

/// Runs `iters` checks spread over `tasks` tasks; returns the wall time.
async fn run(
    side: Side,
    algorithm: Algorithm,
    tasks: usize,
    iters: u64,
    limiter: &RateLimiter,
    raw: &MultiplexedConnection,
    keys: &[String],
) -> Duration {
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for (task, key) in keys.iter().enumerate().take(tasks) {
        let n = iters / tasks as u64 + u64::from((task as u64) < iters % tasks as u64);
        let limiter = limiter.clone();
        let mut raw = raw.clone();
        let key = key.clone();
        let user = format!("ours{task}");
        let endpoint = algorithm.to_string();
        handles.push(tokio::spawn(async move {
            let tier = TierName::custom("bench");
            for _ in 0..n {
                match side {
                    Side::Ours => {
                        let d = limiter.check(&user, &endpoint, &tier).await.unwrap();
                        assert!(d.allowed);
                    }
                    Side::Raw => raw_check(&mut raw, algorithm, &key).await,
                    Side::Naive => {
                        let _: i64 = redis::cmd("INCR")
                            .arg(&key)
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                        let _: i64 = redis::cmd("EXPIRE")
                            .arg(&key)
                            .arg(WINDOW.as_secs())
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    started.elapsed()
}

/// The same commands the limiter sends, written by hand.
async fn raw_check(conn: &mut MultiplexedConnection, algorithm: Algorithm, key: &str) {
    match algorithm {
        Algorithm::FixedWindow => {
            let (count, _pttl): (i64, i64) = redis::pipe()
                .atomic()
                .cmd("INCRBY")
                .arg(key)
                .arg(1)
                .cmd("PEXPIRE")
                .arg(key)
                .arg(WINDOW.as_millis() as u64)
                .arg("NX")
                .ignore()
                .cmd("PTTL")
                .arg(key)
                .query_async(conn)
                .await
                .unwrap();
            assert!(count as u64 <= LIMIT);
        }
        _ => {
            let (sha, first) = if matches!(algorithm, Algorithm::Gcra) {
                (
                    gcra_script().sha(),
                    (WINDOW.as_micros() as u64).div_ceil(LIMIT),
                )
            } else {
                (sliding_script().sha(), WINDOW.as_millis() as u64)
            };
            let reply: Vec<i64> = redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(key)
                .arg(first)
                .arg(LIMIT)
                .arg(1)
                .arg("1")
                .query_async(conn)
                .await
                .unwrap();
            assert_eq!(reply[0], 1);
        }
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = aether_redis::testkit::shared_server().unwrap();
    let mut config = server.config.clone();
    config.key_prefix = aether_redis::testkit::namespace("bench_rate_limit");
    let redis = runtime.block_on(Redis::connect(config.clone())).unwrap();
    let raw = runtime
        .block_on(async {
            redis::Client::open(format!("redis://{}:{}", config.host, config.port))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
        })
        .unwrap();

    for algorithm in [
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
    ] {
        let tier = Tier::new(LIMIT, WINDOW).unwrap().with_algorithm(algorithm);
        let limiter = redis
            .rate_limiter_with(RateLimiterConfig::default().tier(TierName::custom("bench"), tier))
            .unwrap();
        // The first check loads the script into the server's cache, so that the raw side's
        // EVALSHA finds it.
        runtime
            .block_on(limiter.check("warm", "api", &TierName::custom("bench")))
            .unwrap();
        let mut group = c.benchmark_group(format!("rate_limit/{algorithm}"));
        group.throughput(Throughput::Elements(1));
        for tasks in TASKS {
            for (name, side, owner) in [
                ("aether", Side::Ours, "ours"),
                ("raw", Side::Raw, "raw"),
                ("naive_incr_expire", Side::Naive, "naive"),
            ] {
                // Each side and algorithm on keys of its own: the layouts differ by algorithm.
                let keys: Vec<String> = (0..64)
                    .map(|t| {
                        redis
                            .keys()
                            .key(
                                Keyspace::RateLimit,
                                &[&format!("{owner}{t}"), &algorithm.to_string()],
                            )
                            .unwrap()
                    })
                    .collect();
                group.bench_with_input(BenchmarkId::new(name, tasks), &tasks, |b, &tasks| {
                    b.to_async(&runtime).iter_custom(|iters| {
                        let limiter = limiter.clone();
                        let raw = raw.clone();
                        let keys = keys.clone();
                        async move { run(side, algorithm, tasks, iters, &limiter, &raw, &keys).await }
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
