//! Preferences, one-time tokens and events beside the raw `redis` client sending the same
//! commands on one shared `MultiplexedConnection`, at 1 and 16 concurrent tasks.
//!
//! ```sh
//! cargo bench --all-features --bench prefs_tokens_events -- --warm-up-time 1 --measurement-time 3
//! ```

use std::future::Future;

use aether_redis::Redis;
use aether_redis::events::NewNotification;
use aether_redis::tokens::{LinkPurpose, link_token_hash};
use aether_redis::user_prefs::{Pref, Theme};
use base64::Engine;
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use futures::future::join_all;
use redis::aio::MultiplexedConnection;

const TASKS: [usize; 2] = [1, 16];
const WEEK_MS: u64 = 7 * 24 * 3600 * 1000;

struct Fixture {
    rt: tokio::runtime::Runtime,
    ours: Redis,
    raw: MultiplexedConnection,
    prefix: String,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = aether_redis::testkit::shared_server().expect("test server");
    let mut config = server.config.clone();
    config.key_prefix = aether_redis::testkit::namespace("bench");
    let prefix = config.key_prefix.clone();
    let (ours, raw) = rt.block_on(async {
        let ours = Redis::connect(config.clone()).await.expect("connect");
        let client = redis::Client::open(format!("redis://{}:{}", config.host, config.port))
            .expect("client");
        let raw = client
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        (ours, raw)
    });
    Fixture {
        rt,
        ours,
        raw,
        prefix,
    }
}

/// Registers `{name}/ours` and `{name}/raw` at `tasks`: one iteration runs the side's operation
/// once on each of `tasks` concurrent futures (the argument is the future's index).
fn compare<O, OF, R, RF>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    tasks: usize,
    ours: O,
    raw: R,
) where
    O: Fn(usize) -> OF,
    OF: Future<Output = ()>,
    R: Fn(usize) -> RF,
    RF: Future<Output = ()>,
{
    group.throughput(Throughput::Elements(tasks as u64));
    group.bench_with_input(
        BenchmarkId::new(format!("{name}/ours"), tasks),
        &tasks,
        |b, &n| b.to_async(rt).iter(|| join_all((0..n).map(&ours))),
    );
    group.bench_with_input(
        BenchmarkId::new(format!("{name}/raw"), tasks),
        &tasks,
        |b, &n| b.to_async(rt).iter(|| join_all((0..n).map(&raw))),
    );
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let ttl_of = |ks| f.ours.ttl().millis(ks);
    let raw_conn = || f.raw.clone();

    let mut group = c.benchmark_group("user_prefs");
    let prefs = f.ours.user_prefs();
    for tasks in TASKS {
        compare(
            &mut group,
            &f.rt,
            "get",
            tasks,
            |i| {
                let prefs = prefs.clone();
                async move {
                    prefs.get(&format!("u{i}")).await.expect("get");
                }
            },
            |i| {
                let mut conn = raw_conn();
                let key = format!("{}user-prefs:u{i}", f.prefix);
                async move {
                    let _: (std::collections::HashMap<String, String>,) = redis::pipe()
                        .atomic()
                        .cmd("HGETALL")
                        .arg(&key)
                        .cmd("PEXPIRE")
                        .arg(&key)
                        .arg(WEEK_MS)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .expect("HGETALL");
                }
            },
        );
        compare(
            &mut group,
            &f.rt,
            "update",
            tasks,
            |i| {
                let prefs = prefs.clone();
                async move {
                    prefs
                        .update(
                            &format!("u{i}"),
                            &[Pref::Theme(Theme::Dark), Pref::PageSize(50)],
                        )
                        .await
                        .expect("update");
                }
            },
            |i| {
                let mut conn = raw_conn();
                let key = format!("{}user-prefs:u{i}", f.prefix);
                async move {
                    let _: () = redis::pipe()
                        .atomic()
                        .cmd("HSET")
                        .arg(&key)
                        .arg("theme")
                        .arg("dark")
                        .arg("ui.pageSize")
                        .arg("50")
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&key)
                        .arg(WEEK_MS)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .expect("HSET");
                }
            },
        );
    }
    group.finish();

    let verify_ttl = ttl_of(aether_redis::Keyspace::EmailVerify);
    let tokens = f.ours.tokens();
    let mut group = c.benchmark_group("tokens");
    for tasks in TASKS {
        compare(
            &mut group,
            &f.rt,
            "issue_redeem",
            tasks,
            |i| {
                let tokens = tokens.clone();
                async move {
                    let user = format!("u{i}");
                    let t = tokens
                        .issue(LinkPurpose::EmailVerify, &user, &serde_json::Value::Null)
                        .await
                        .expect("issue");
                    tokens
                        .redeem(LinkPurpose::EmailVerify, t.token.expose())
                        .await
                        .expect("redeem")
                        .expect("live token");
                }
            },
            |i| {
                let mut conn = raw_conn();
                let prefix = f.prefix.clone();
                async move {
                    // The same work: CSPRNG token, SHA-256, JSON, three round trips.
                    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(aether_redis::random::bytes(32).expect("random"));
                    let hash = link_token_hash(&token);
                    let key = format!("{prefix}email-verify:{hash}");
                    let index = format!("{prefix}email-verify:user:u{i}");
                    let value = serde_json::json!({"subject": format!("u{i}"), "payload": null, "issuedAt": 0})
                        .to_string();
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .arg("NX")
                        .arg("PX")
                        .arg(verify_ttl)
                        .query_async(&mut conn)
                        .await
                        .expect("SET");
                    let _: () = redis::pipe()
                        .atomic()
                        .cmd("SADD")
                        .arg(&index)
                        .arg(&hash)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&index)
                        .arg(verify_ttl)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .expect("SADD");
                    let got: Option<String> = redis::cmd("GETDEL")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("GETDEL");
                    let _: serde_json::Value =
                        serde_json::from_str(&got.expect("live token")).expect("JSON");
                }
            },
        );
    }
    group.finish();

    let notif_ttl = ttl_of(aether_redis::Keyspace::Notifications);
    let metric_ttl = ttl_of(aether_redis::Keyspace::Metrics);
    let events = f.ours.events();
    let mut group = c.benchmark_group("events");
    for tasks in TASKS {
        compare(
            &mut group,
            &f.rt,
            "push_notification",
            tasks,
            |i| {
                let events = events.clone();
                async move {
                    events
                        .push_notification(
                            &format!("u{i}"),
                            &NewNotification::new("mail.received", "hello"),
                        )
                        .await
                        .expect("push");
                }
            },
            |i| {
                let mut conn = raw_conn();
                let list = format!("{}notifications:u{i}", f.prefix);
                let read = format!("{{{list}}}:read");
                async move {
                    let id = aether_redis::random::secret_token(12).expect("random");
                    let value = serde_json::json!({"id": id, "kind": "mail.received", "title": "hello", "body": "", "data": null, "createdAt": aether_redis::codec::now_millis()})
                        .to_string();
                    let _: () = redis::pipe()
                        .atomic()
                        .cmd("LPUSH")
                        .arg(&list)
                        .arg(&value)
                        .ignore()
                        .cmd("LTRIM")
                        .arg(&list)
                        .arg(0)
                        .arg(99)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&list)
                        .arg(notif_ttl)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&read)
                        .arg(notif_ttl)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .expect("LPUSH");
                }
            },
        );
        compare(
            &mut group,
            &f.rt,
            "incr",
            tasks,
            |i| {
                let events = events.clone();
                async move {
                    events.incr(&format!("m{i}"), "ok", 1).await.expect("incr");
                }
            },
            |i| {
                let mut conn = raw_conn();
                let prefix = f.prefix.clone();
                async move {
                    let bucket = aether_redis::codec::now_millis() / 10_000 * 10_000;
                    let key = format!("{prefix}metrics:m{i}:{bucket}");
                    let _: (i64,) = redis::pipe()
                        .atomic()
                        .cmd("HINCRBY")
                        .arg(&key)
                        .arg("ok")
                        .arg(1)
                        .cmd("PEXPIRE")
                        .arg(&key)
                        .arg(metric_ttl)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .expect("HINCRBY");
                }
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
