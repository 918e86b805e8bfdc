//! Session get+touch: `SessionStore::get` (one `EVALSHA` that returns the session and slides
//! `lastAccessAt` and the idle TTL) beside the raw `redis` client sending the same `EVALSHA`
//! with the same arguments on one shared `MultiplexedConnection`, at 1, 16 and 64 concurrent
//! tasks. Both sides decode the reply as a caller must: ours into a `Session`, the raw side into
//! a map of the hash's fields.
//!
//! ```sh
//! cargo bench --all-features --bench session -- --warm-up-time 1 --measurement-time 3
//! ```

use std::collections::HashMap;

use aether_redis::Redis;
use aether_redis::session::{NewSession, Role, SessionStore, lua};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis::aio::MultiplexedConnection;

mod support;
use support::{paired_ratio, run_concurrent};

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

    let ours = move || {
        let (store, id) = (store.clone(), id.clone());
        async move {
            assert!(store.get(&id).await.expect("get").is_some());
        }
    };
    let raw_op = move || {
        let (mut raw, key, sha) = (raw.clone(), key.clone(), sha.clone());
        async move {
            let (_, fields): (i64, HashMap<String, String>) = redis::cmd("EVALSHA")
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
            assert!(fields.contains_key("userId"));
        }
    };

    let mut group = c.benchmark_group("session_get_touch");
    group.throughput(Throughput::Elements(1));
    for tasks in [1, 16, 64] {
        group.bench_function(format!("aether/{tasks}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, ours.clone()))
        });
        group.bench_function(format!("raw/{tasks}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| run_concurrent(iters, tasks, raw_op.clone()))
        });
    }
    group.finish();
    for tasks in [1, 16, 64] {
        rt.block_on(paired_ratio(
            "session_get_touch",
            tasks,
            ours.clone(),
            raw_op.clone(),
        ));
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = session_get_touch
}
criterion_main!(benches);
