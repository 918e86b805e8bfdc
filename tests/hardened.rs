//! The foundation repositories, the email queue and the rate limiter on a hardened server:
//! `EVAL`/`SCRIPT` renamed, `CONFIG`, `KEYS`, `FLUSHDB`, `FLUSHALL` and `DEBUG` removed, and an
//! ACL user that may run nothing `@dangerous` (so no `INFO` either).

use aether_redis::cache::CacheEntry;
use aether_redis::session::{NewSession, Role};
use aether_redis::testkit::{LocalOptions, LocalServer};
use aether_redis::{Config, Redis};

mod support;

async fn hardened_server() -> LocalServer {
    tokio::task::spawn_blocking(|| {
        LocalServer::start(LocalOptions {
            config_lines: support::hardened_config_lines(),
            ..LocalOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap()
}

async fn app_user(server: &LocalServer) -> Redis {
    let config = Config::builder()
        .port(server.port())
        .username("app")
        .password("pw")
        .renamed_command("EVAL", "EVAL_b835c3f9a8")
        .renamed_command("SCRIPT", "SCRIPT_b835c3f9a8")
        .renamed_command("CONFIG", "")
        .renamed_command("KEYS", "")
        .renamed_command("FLUSHDB", "")
        .renamed_command("FLUSHALL", "")
        .renamed_command("DEBUG", "")
        .key_prefix("hardened:")
        .build()
        .unwrap();
    Redis::connect(config).await.unwrap()
}

/// A raw connection to `server` as `default` (the operator's user).
async fn operator(server: &LocalServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", server.port())).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Flushes the script cache as an operator would (through the renamed SCRIPT, as `default`).
async fn flush_scripts(server: &LocalServer) {
    let mut conn = operator(server).await;
    let _: () = redis::cmd("SCRIPT_b835c3f9a8")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn sessions_work_on_a_hardened_server() {
    let server = hardened_server().await;
    let redis = app_user(&server).await;
    assert!(redis.capabilities().scripting);
    let sessions = redis.sessions();
    assert!(sessions.uses_scripts());

    let created = sessions
        .create(NewSession::new("u-1", "a@example.com", Role::User).permissions(["read"]))
        .await
        .unwrap();
    flush_scripts(&server).await;
    // NOSCRIPT after the flush is recovered through the renamed EVAL inside the call.
    let got = sessions.get(&created.id).await.unwrap().unwrap();
    assert_eq!(got.user_id, "u-1");
    assert!(sessions.touch(&created.id).await.unwrap());
    let rotated = sessions.rotate_id(&created.id).await.unwrap().unwrap();
    assert_eq!(sessions.list_user("u-1").await.unwrap().len(), 1);
    assert!(sessions.destroy(&rotated).await.unwrap());
    assert!(sessions.get(&rotated).await.unwrap().is_none());
    assert_eq!(redis.health().await.unwrap().role, "master");
}

#[tokio::test]
async fn cache_works_on_a_hardened_server() {
    let server = hardened_server().await;
    let redis = app_user(&server).await;
    let cache = redis.cache();
    let params = serde_json::json!({"page": 1});
    cache
        .set(
            "users",
            &params,
            &CacheEntry::new(serde_json::json!(["ann", "bob"])),
        )
        .await
        .unwrap();
    let hit: CacheEntry<serde_json::Value> = cache.get("users", &params).await.unwrap().unwrap();
    assert_eq!(hit.data, serde_json::json!(["ann", "bob"]));
    let loaded: CacheEntry<u32> = cache
        .get_or_set("counts", &params, || async {
            Ok::<_, aether_redis::Error>(CacheEntry::new(7))
        })
        .await
        .unwrap();
    assert_eq!(loaded.data, 7);
    // SCAN, never KEYS (which this server does not have).
    assert_eq!(cache.invalidate_endpoint("users").await.unwrap(), 1);
    assert!(
        cache
            .get::<serde_json::Value, _>("users", &params)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn sessions_fall_back_to_transactions_without_scripting() {
    let server = hardened_server().await;
    // EVAL not configured: scripting is detected as unusable at connect.
    let config = Config::builder()
        .port(server.port())
        .username("app")
        .password("pw")
        .build()
        .unwrap();
    let redis = Redis::connect(config).await.unwrap();
    assert!(!redis.capabilities().scripting);
    let sessions = redis.sessions();
    assert!(!sessions.uses_scripts());
    let created = sessions
        .create(NewSession::new("u-2", "b@example.com", Role::Admin))
        .await
        .unwrap();
    let got = sessions.get(&created.id).await.unwrap().unwrap();
    assert_eq!(got.role, Role::Admin);
    assert!(sessions.destroy(&created.id).await.unwrap());
    assert!(sessions.get(&created.id).await.unwrap().is_none());
}

#[tokio::test]
async fn email_queue_works_on_a_hardened_server() {
    use aether_redis::email_queue::{EmailJob, JobError, JobId, QueueOptions, WorkerOptions};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let server = hardened_server().await;
    let redis = app_user(&server).await;
    let mut options = QueueOptions::default();
    options.backoff_base = Duration::from_millis(100);
    let queue = redis.email_queue().unwrap().with_options(options).unwrap();
    let mail = |id: &str| {
        EmailJob::new(["ada@example.com"], "noreply@example.com", "Hi", "Body")
            .unwrap()
            .with_id(JobId::new(id).unwrap())
    };
    queue.enqueue(mail("now")).await.unwrap();
    queue
        .enqueue_in(mail("later"), Duration::from_millis(200))
        .await
        .unwrap();
    queue.enqueue(mail("flaky")).await.unwrap();
    // NOSCRIPT after the flush is recovered through the renamed EVAL inside the worker's call.
    flush_scripts(&server).await;

    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = handled.clone();
    let mut worker_options = WorkerOptions::default();
    worker_options.poll_interval = Duration::from_millis(20);
    let worker = queue
        .worker(aether_redis::email_queue::handler_fn(
            move |job: EmailJob| {
                let first_try = job.attempts == 0;
                let id = job.id.to_string();
                log.lock().unwrap().push(id.clone());
                async move {
                    if id == "flaky" && first_try {
                        return Err(JobError::retry("421 try again later"));
                    }
                    Ok(())
                }
            },
        ))
        .with_options(worker_options)
        .unwrap()
        .spawn();
    let started = Instant::now();
    loop {
        let stats = queue.stats().await.unwrap();
        if stats.completed == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "jobs not done: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.shutdown().await.unwrap();
    assert_eq!((report.completed, report.retried), (3, 1));
    let mut ids = handled.lock().unwrap().clone();
    ids.sort();
    assert_eq!(ids, ["flaky", "flaky", "later", "now"]);
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.waiting(), stats.active, stats.delayed, stats.dead),
        (0, 0, 0, 0)
    );
}

#[tokio::test]
async fn rate_limiter_works_on_a_hardened_server() {
    use aether_redis::rate_limit::{Algorithm, RateLimiterConfig, Tier, TierName};
    use std::time::Duration;

    let server = hardened_server().await;
    let redis = app_user(&server).await;
    for algorithm in [
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
    ] {
        let tier = TierName::custom("t");
        let limiter = redis
            .rate_limiter_with(
                RateLimiterConfig::default().tier(
                    tier.clone(),
                    Tier::new(3, Duration::from_secs(60))
                        .unwrap()
                        .with_algorithm(algorithm),
                ),
            )
            .unwrap();
        let mut admitted = 0;
        for _ in 0..5 {
            let decision = limiter.check("h", "e", &tier).await.unwrap();
            admitted += u64::from(decision.allowed);
            // NOSCRIPT after the flush is recovered through the renamed EVAL.
            flush_scripts(&server).await;
        }
        assert_eq!(admitted, 3, "{algorithm}");
        let peeked = limiter.peek("h", "e", &tier).await.unwrap();
        assert_eq!(
            (peeked.allowed, peeked.remaining),
            (false, 0),
            "{algorithm}"
        );
        limiter.reset("h", "e").await.unwrap();
        assert!(
            limiter.check("h", "e", &tier).await.unwrap().allowed,
            "{algorithm}"
        );
        limiter.reset("h", "e").await.unwrap();
    }
}

/// Cluster nodes with `EVAL` and `EVALSHA` renamed: script calls reach the node of their first
/// key at once. The client routes a command name it does not know by its first argument (here
/// the SHA or the script's source), and each `MOVED` that earns makes it rebuild its slot map.
#[tokio::test]
async fn renamed_script_commands_are_routed_by_their_first_key_on_cluster() {
    use aether_redis::testkit::LocalCluster;
    let cluster = tokio::task::spawn_blocking(|| {
        LocalCluster::start_with(
            3,
            &[
                "rename-command EVAL EVAL_b835c3f9a8",
                "rename-command EVALSHA EVALSHA_b835c3f9a8",
                "rename-command SCRIPT SCRIPT_b835c3f9a8",
            ],
        )
    })
    .await
    .unwrap()
    .unwrap();
    let mut config = cluster.config();
    config
        .renamed_commands
        .insert("EVAL".into(), "EVAL_b835c3f9a8".into());
    config
        .renamed_commands
        .insert("EVALSHA".into(), "EVALSHA_b835c3f9a8".into());
    config
        .renamed_commands
        .insert("SCRIPT".into(), "SCRIPT_b835c3f9a8".into());
    config.key_prefix = "routed:".into();
    let redis = Redis::connect(config).await.unwrap();
    assert!(redis.capabilities().scripting);
    let slot_reads = || async {
        let mut total = 0u64;
        for node in cluster.nodes() {
            let mut conn = operator(node).await;
            total += support::command_stat(&mut conn, "cluster|slots", "calls").await
                + support::command_stat(&mut conn, "cluster|shards", "calls").await;
        }
        total
    };
    let sessions = redis.sessions();
    assert!(sessions.uses_scripts());
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(
            sessions
                .create(NewSession::new(
                    format!("u-{n}"),
                    "a@example.com",
                    Role::User,
                ))
                .await
                .unwrap()
                .id,
        );
    }
    let before = slot_reads().await;
    // Every session key in its own slot: about two thirds of them on another node than the
    // one the SHA or the source hashes to.
    for id in &ids {
        assert!(sessions.touch(id).await.unwrap());
    }
    // The first calls after a script flush go through the renamed EVAL.
    for node in cluster.nodes() {
        flush_scripts(node).await;
    }
    for id in &ids {
        assert!(sessions.get(id).await.unwrap().is_some());
    }
    // The rate limiter's scripts, on keys of 30 users.
    use aether_redis::rate_limit::{Algorithm, RateLimiterConfig, Tier, TierName};
    let tier = TierName::custom("t");
    let limiter = redis
        .rate_limiter_with(
            RateLimiterConfig::default().tier(
                tier.clone(),
                Tier::new(10, std::time::Duration::from_secs(60))
                    .unwrap()
                    .with_algorithm(Algorithm::Gcra),
            ),
        )
        .unwrap();
    for n in 0..30 {
        assert!(
            limiter
                .check(&format!("u-{n}"), "send", &tier)
                .await
                .unwrap()
                .allowed
        );
    }
    let refreshes = slot_reads().await - before;
    assert!(
        refreshes <= 3,
        "{refreshes} slot map reads for 90 script calls"
    );
}
