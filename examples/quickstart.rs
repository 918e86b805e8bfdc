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
    demo_rate_limit(&redis).await?;
    demo_streams(&redis).await?;

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

/// Sessions: create, read (which slides the idle TTL), update, rotate the id, list and log out
/// everywhere.
async fn demo_sessions(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::session::{NewSession, Role, SessionId, SessionUpdate};
    let sessions = redis.sessions();
    let session = sessions
        .create(
            NewSession::new("user-1", "ada@example.com", Role::User)
                .ip_address("203.0.113.9")
                .user_agent("quickstart")
                .permissions(["mail:read"])
                .extra("csrfToken", aether_redis::random::secret_token(16)?),
        )
        .await?;
    println!(
        "sessions: created {:?} for {} (idle TTL {:?}, lifetime cap {:?}, {})",
        session.id, // Debug is redacted: the id is a secret
        session.user_id,
        sessions.idle_ttl(),
        sessions.max_lifetime(),
        if sessions.uses_scripts() {
            "Lua scripts"
        } else {
            "WATCH/MULTI"
        }
    );
    // What a cookie would carry comes back through FromStr, which rejects hostile ids.
    let id: SessionId = session.id.to_string().parse()?;
    let read = sessions.get(&id).await?.ok_or("session vanished")?;
    println!(
        "sessions: get -> role {}, lastAccessAt {} (slid in the same round trip)",
        read.role, read.last_access_at
    );
    let updated = sessions
        .update(
            &id,
            &SessionUpdate::new()
                .role(Role::Moderator)
                .permissions(["mail:read", "mail:moderate"]),
        )
        .await?
        .ok_or("session vanished")?;
    println!(
        "sessions: update -> role {}, permissions {:?}",
        updated.role, updated.permissions
    );
    let rotated = sessions.rotate_id(&id).await?.ok_or("session vanished")?;
    println!(
        "sessions: rotate_id -> old id gone: {}, new id works: {}",
        sessions.get(&id).await?.is_none(),
        sessions.get(&rotated).await?.is_some()
    );
    sessions
        .create(
            NewSession::new("user-1", "ada@example.com", Role::User).user_agent("second device"),
        )
        .await?;
    println!(
        "sessions: user-1 has {} sessions",
        sessions.list_user("user-1").await?.len()
    );
    println!(
        "sessions: destroy_user (log out everywhere) destroyed {}",
        sessions.destroy_user("user-1").await?
    );
    match "bad:id".parse::<SessionId>() {
        Err(e) => println!("sessions: a hostile id is rejected: {e}"),
        Ok(_) => return Err("a hostile id was accepted".into()),
    }
    Ok(())
}

async fn demo_cache(_redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}

async fn demo_rate_limit(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::rate_limit::TierName;
    // Tiers from RATE_LIMIT_* (MFA: 5 per 60 s by default), GCRA on the server's clock.
    let limiter = redis.rate_limiter()?;
    let mut admitted = 0;
    let mut last = None;
    for _ in 0..7 {
        let decision = limiter
            .check("user-42", "mfa-verify", &TierName::Mfa)
            .await?;
        admitted += u32::from(decision.allowed);
        last = Some(decision);
    }
    if let Some(denied) = last {
        let headers = denied.headers();
        println!(
            "rate limit: {admitted} of 7 MFA attempts admitted; then 429 with RateLimit-Policy: {}, \
             RateLimit: {}, Retry-After: {}",
            headers.policy,
            headers.rate_limit,
            headers.retry_after.unwrap_or_default()
        );
    }
    let status = limiter
        .peek("user-42", "mfa-verify", &TierName::Mfa)
        .await?;
    println!(
        "rate limit: peek says {} remaining, resets in {:?}",
        status.remaining, status.reset_after
    );
    limiter.reset("user-42", "mfa-verify").await?;
    println!("rate limit: reset by an administrator");
    Ok(())
}

async fn demo_streams(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::stream::{ConsumerOptions, StartFrom, StreamMessage};
    use std::time::Duration;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Webhook {
        event: String,
    }

    let streams = redis.streams();
    let stream = aether_redis::stream::WEBHOOK_EVENTS;
    let group = aether_redis::stream::WEBHOOK_WORKERS;
    streams.create_group(stream, group, StartFrom::New).await?;
    let producer = streams.producer::<Webhook>(stream)?;
    let first = producer
        .publish_idempotent(
            &Webhook {
                event: "push".into(),
            },
            "delivery-1",
        )
        .await?;
    let retry = producer
        .publish_idempotent(
            &Webhook {
                event: "push".into(),
            },
            "delivery-1",
        )
        .await?;
    producer
        .publish(&Webhook {
            event: "ping".into(),
        })
        .await?;
    println!(
        "streams: published 2 webhooks on {stream} (retried publish deduplicated: {})",
        retry.duplicate && retry.id == first.id
    );
    let options = ConsumerOptions::default().with_block(Duration::from_millis(100));
    let worker = streams.consumer::<Webhook>(stream, group, options)?.spawn(
        |msg: StreamMessage<Webhook>| async move {
            println!("streams: handled {} ({})", msg.payload.event, msg.id);
            Ok::<_, std::io::Error>(())
        },
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while worker.metrics().processed < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = worker.shutdown().await?;
    let info = streams.group_info(stream, group).await?;
    println!(
        "streams: {group} processed {}, pending {}",
        metrics.processed,
        info.map(|i| i.pending).unwrap_or_default()
    );
    Ok(())
}
