//! Session get+touch: `SessionStore::get` (one `EVALSHA` that returns the session and slides
//! `lastAccessAt` and the idle TTL) beside the raw `redis` client sending the same `EVALSHA`
//! with the same arguments on one shared `MultiplexedConnection`, at 1, 16 and 64 concurrent
//! tasks.
//!
//! ```sh
//! cargo bench --features testkit --bench session -- --warm-up-time 1 --measurement-time 3
//! ```

use std::time::{Duration, Instant};

use aether_redis::Redis;
use aether_redis::session::{NewSession, Role, SessionStore, lua};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis::Value;
use redis::aio::MultiplexedConnection;

/// Runs `iters` operations split over `tasks` spawned tasks and returns the wall time.
async fn run<F, Fut>(iters: u64, tasks: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let n = iters / tasks + u64::from(t < iters % tasks);
        let op = op.clone();
        set.spawn(async move {
            for _ in 0..n {
                op().await;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("bench task");
    }
    started.elapsed()
}

fn session_get_touch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = aether_redis::testkit::shared_server().expect("test server");
    let mut config = server.config.clone();
    config.key_prefix = aether_redis::testkit::namespace("bench_session");
    let (store, id, raw, sha): (SessionStore, _, MultiplexedConnection, String) =
        rt.block_on(async {
            let redis = Redis::connect(config).await.expect("connect");
            let store = redis.sessions();
            assert!(store.uses_scripts());
            let session = store
                .create(
                    NewSession::new("bench-user", "bench@example.com", Role::User)
                        .ip_address("203.0.113.9")
                        .user_agent("Mozilla/5.0 (X11; Linux x86_64)")
                        .permissions(["mail:read", "mail:send"])
                        .extra("csrfToken", "0123456789abcdef"),
                )
                .await
                .expect("create");
            let client = redis::Client::open(format!(
                "redis://{}:{}/",
                server.config.host, server.config.port
            ))
            .expect("client");
            let mut raw = client
                .get_multiplexed_async_connection()
                .await
                .expect("raw connection");
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(lua::ACCESS_HASH)
                .query_async(&mut raw)
                .await
                .expect("script load");
            // Warm our side's script cache too.
            store.get(&session.id).await.expect("get").expect("live");
            (store, session.id, raw, sha)
        });
    let key = store.key(&id);
    let idle = store.idle_ttl().as_millis() as u64;
    let cap = store.max_lifetime().as_millis() as u64;

    let mut group = c.benchmark_group("session_get_touch");
    group.throughput(Throughput::Elements(1));
    for tasks in [1_u64, 16, 64] {
        group.bench_function(format!("aether/{tasks}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let store = store.clone();
                let id = id.clone();
                run(iters, tasks, move || {
                    let store = store.clone();
                    let id = id.clone();
                    async move {
                        let s = store.get(&id).await.expect("get");
                        assert!(s.is_some());
                    }
                })
            })
        });
        group.bench_function(format!("raw/{tasks}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let raw = raw.clone();
                let key = key.clone();
                let sha = sha.clone();
                run(iters, tasks, move || {
                    let mut raw = raw.clone();
                    let key = key.clone();
                    let sha = sha.clone();
                    async move {
                        let v: Value = redis::cmd("EVALSHA")
                            .arg(&sha)
                            .arg(1)
                            .arg(&key)
                            .arg(aether_redis::codec::now_millis())
                            .arg(idle)
                            .arg(cap)
                            .arg("get")
                            .arg(0)
                            .query_async(&mut raw)
                            .await
                            .expect("evalsha");
                        assert!(!matches!(v, Value::Nil));
                    }
                })
            })
        });
    }
    group.finish();

    // The machine is shared and its load drifts within seconds, which criterion's
    // one-side-after-the-other samples cannot cancel. So the ratio is also measured in short
    // alternating rounds (aether, raw, aether, raw, ...) and printed.
    for tasks in [1_u64, 16, 64] {
        let ops = 200 * tasks.max(4);
        let (mut ours, mut theirs) = (Duration::ZERO, Duration::ZERO);
        rt.block_on(async {
            for _ in 0..20 {
                let (store, id) = (store.clone(), id.clone());
                ours += run(ops, tasks, move || {
                    let store = store.clone();
                    let id = id.clone();
                    async move {
                        assert!(store.get(&id).await.expect("get").is_some());
                    }
                })
                .await;
                let (raw, key, sha) = (raw.clone(), key.clone(), sha.clone());
                theirs += run(ops, tasks, move || {
                    let mut raw = raw.clone();
                    let key = key.clone();
                    let sha = sha.clone();
                    async move {
                        let v: Value = redis::cmd("EVALSHA")
                            .arg(&sha)
                            .arg(1)
                            .arg(&key)
                            .arg(aether_redis::codec::now_millis())
                            .arg(idle)
                            .arg(cap)
                            .arg("get")
                            .arg(0)
                            .query_async(&mut raw)
                            .await
                            .expect("evalsha");
                        assert!(!matches!(v, Value::Nil));
                    }
                })
                .await;
            }
        });
        println!(
            "session_get_touch paired/{tasks}: aether {:.1} µs/op, raw {:.1} µs/op, ratio (raw time / aether time) {:.3}",
            ours.as_secs_f64() * 1e6 / (20 * ops) as f64,
            theirs.as_secs_f64() * 1e6 / (20 * ops) as f64,
            theirs.as_secs_f64() / ours.as_secs_f64()
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = session_get_touch
}
criterion_main!(benches);
