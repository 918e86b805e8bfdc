//! Checks per second of each rate-limit algorithm at 1, 16 and 64 concurrent tasks, beside
//! (a) the raw redis client sending the identical commands or script on one shared
//! `MultiplexedConnection`, and (b) the naive two-round-trip `INCR` then `EXPIRE` pattern.
//! All tasks of a side check one key, as one user's concurrent requests do, where the limiter
//! batches checks that meet in flight; a last run per algorithm spreads 64 tasks over 4096
//! keys, where checks never meet and each goes alone.
//!
//! Criterion reports each side's throughput; the quoted figures are the paired ratios printed at
//! the end (alternating rounds, see `support::paired_ratio`).
//!
//! ```sh
//! cargo bench --all-features --bench rate_limit -- --warm-up-time 1 --measurement-time 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Concurrent tasks of the spread runs.
const SPREAD_TASKS: usize = 64;
/// Keys of the spread runs, checked in turn: far more than tasks, so a key's previous check has
/// returned before the next one comes and no two checks meet in flight.
const SPREAD_KEYS: usize = 4096;

/// Hands out its items round robin: one item for the one-key runs, [`SPREAD_KEYS`] for the
/// spread runs.
#[derive(Clone)]
struct Rotation<T> {
    items: Arc<[T]>,
    next: Arc<AtomicUsize>,
}

impl<T: Clone> Rotation<T> {
    fn new(items: Vec<T>) -> Self {
        Rotation {
            items: items.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn next(&self) -> T {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.items[i % self.items.len()].clone()
    }
}

/// One check through the limiter.
fn ours_op(
    limiter: RateLimiter,
    users: Rotation<Arc<str>>,
    endpoint: Arc<str>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Clone + Send + 'static {
    let tier = TierName::custom("bench");
    move || {
        let (limiter, user, endpoint, tier) = (
            limiter.clone(),
            users.next(),
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
    keys: Rotation<Arc<str>>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Clone + Send + 'static {
    move || {
        let (mut conn, key) = (raw.clone(), keys.next());
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
    keys: Rotation<Arc<str>>,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Clone + Send + 'static {
    move || {
        let (mut conn, key) = (raw.clone(), keys.next());
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
        // EVALSHA finds it. Its key is the algorithm's own: no check replaces another
        // algorithm's state.
        runtime
            .block_on(limiter.check("warm", &algorithm.to_string(), &TierName::custom("bench")))
            .expect("warm-up check");
        // One key per side and algorithm: the layouts differ by algorithm. All tasks of a side
        // share it, as concurrent requests of one user do; the spread runs below give each
        // side SPREAD_KEYS users instead, so that concurrent checks never meet on a key.
        let users = |owner: &str, count: usize| -> Vec<Arc<str>> {
            (0..count).map(|i| format!("{owner}{i}").into()).collect()
        };
        let keys = |owner: &str, count: usize| -> Rotation<Arc<str>> {
            Rotation::new(
                users(owner, count)
                    .iter()
                    .map(|user| {
                        redis
                            .keys()
                            .key(Keyspace::RateLimit, &[user, &algorithm.to_string()])
                            .expect("key")
                            .into()
                    })
                    .collect(),
            )
        };
        let endpoint: Arc<str> = algorithm.to_string().into();
        let ours = ours_op(
            limiter.clone(),
            Rotation::new(users("ours", 1)),
            endpoint.clone(),
        );
        let raw_side = raw_op(raw.clone(), algorithm, keys("raw", 1));
        let naive = naive_op(raw.clone(), keys("naive", 1));

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
            ratios.push((algorithm, tasks.to_string(), vs_raw, vs_naive));
        }
        let tasks = SPREAD_TASKS;
        let label = format!("rate_limit/{algorithm} over {SPREAD_KEYS} keys");
        let ours = ours_op(
            limiter.clone(),
            Rotation::new(users("ours-spread", SPREAD_KEYS)),
            endpoint,
        );
        let vs_raw = runtime.block_on(paired_ratio(
            &format!("{label} vs raw"),
            tasks,
            ours.clone(),
            raw_op(raw.clone(), algorithm, keys("raw-spread", SPREAD_KEYS)),
        ));
        let vs_naive = runtime.block_on(paired_ratio(
            &format!("{label} vs naive"),
            tasks,
            ours,
            naive_op(raw.clone(), keys("naive-spread", SPREAD_KEYS)),
        ));
        ratios.push((
            algorithm,
            format!("{tasks}, {SPREAD_KEYS} keys"),
            vs_raw,
            vs_naive,
        ));
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
