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

use aether_redis::testkit;
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
    demo_user_prefs(&redis).await?;
    demo_tokens(&redis).await?;
    demo_events(&redis).await?;
    demo_email_queue(&redis).await?;

    println!("done");
    Ok(())
}

/// `REDIS_URL` or 127.0.0.1:6379 when something answers there, else a disposable server.
async fn connect() -> Result<Redis, Box<dyn std::error::Error>> {
    let mut config = Config::from_env()?;
    config.key_prefix = format!("quickstart:{}:", aether_redis::random::token(4));
    let (config, _) =
        tokio::task::spawn_blocking(move || testkit::config_or_disposable(config)).await??;
    Ok(Redis::connect(config).await?)
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
async fn demo_user_prefs(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::user_prefs::{Pref, Theme};
    let prefs = redis.user_prefs();
    prefs
        .update("demo-user", &[Pref::Theme(Theme::Dark), Pref::PageSize(50)])
        .await?;
    let p = prefs.get("demo-user").await?;
    println!(
        "user-prefs: theme {:?}, page size {}, language {} (default), timezone {} (default)",
        p.theme, p.ui.page_size, p.language, p.timezone
    );
    match prefs.update("demo-user", &[Pref::PageSize(0)]).await {
        Err(e) => println!("user-prefs: rejected as expected: {e}"),
        Ok(()) => println!("user-prefs: a page size of 0 was accepted (unexpected)"),
    }
    Ok(())
}

async fn demo_tokens(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::tokens::{IssueOptions, LinkPurpose, TwoFactorOutcome};
    let tokens = redis.tokens();
    let link = tokens
        .issue_with_options(
            LinkPurpose::PasswordReset,
            "demo-user",
            &serde_json::json!({"ip": "198.51.100.7"}),
            IssueOptions::new().revoke_previous(true),
        )
        .await?;
    println!(
        "tokens: issued a password-reset link valid for {:?} (Redis holds only its hash {})",
        link.expires_in, link.token_hash
    );
    let first = tokens
        .redeem(LinkPurpose::PasswordReset, link.token.expose())
        .await?;
    let second = tokens
        .redeem(LinkPurpose::PasswordReset, link.token.expose())
        .await?;
    println!(
        "tokens: first redemption for {:?}, second redemption {:?}",
        first.map(|r| r.subject),
        second.map(|r| r.subject)
    );
    let code = tokens.issue_2fa("demo-user").await?;
    let wrong = if code.code.expose() == "000000" {
        "000001"
    } else {
        "000000"
    };
    let outcome = tokens.verify_2fa("demo-user", wrong).await?;
    println!("tokens: 2FA with a wrong code: {outcome:?}");
    let outcome = tokens.verify_2fa("demo-user", code.code.expose()).await?;
    assert_eq!(outcome, TwoFactorOutcome::Valid);
    println!("tokens: 2FA with the right code: {outcome:?}");
    let challenge = tokens.domain_challenge("demo-user", "example.com").await?;
    println!(
        "tokens: publish TXT {} = {}",
        challenge.txt_name(),
        challenge.txt_value()
    );
    let outcome = tokens
        .confirm_domain("demo-user", "example.com", &[challenge.txt_value()])
        .await?;
    println!(
        "tokens: domain confirmed: {}",
        matches!(outcome, aether_redis::tokens::DomainOutcome::Verified(_))
    );
    Ok(())
}

async fn demo_events(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::events::{AuditEntry, NewNotification, SecurityEvent};
    let events = redis.events();
    let n = events
        .push_notification(
            "demo-user",
            &NewNotification::new("mail.received", "New message").body("From: alice"),
        )
        .await?;
    events.mark_read("demo-user", &[&n.id]).await?;
    let list = events.notifications("demo-user", 10).await?;
    println!(
        "events: {} notification(s), newest {:?} read={}",
        list.len(),
        list[0].title,
        list[0].read
    );
    events.incr("mail.sent", "ok", 3).await?;
    let now = aether_redis::codec::now_millis();
    let window = events.metric_window("mail.sent", now - 60_000, now).await?;
    let sent: i64 = window.iter().filter_map(|b| b.counts.get("ok")).sum();
    println!("events: mail.sent ok = {sent} over the last minute");
    events
        .record_security_event(
            "demo-user",
            &SecurityEvent::new("login.failed").ip("203.0.113.9"),
        )
        .await?;
    let recent = events
        .security_events("demo-user", now - 60_000, now + 60_000, 10)
        .await?;
    println!(
        "events: {} security event(s) in the last minute",
        recent.len()
    );
    events
        .audit(&AuditEntry::new("admin", "role.changed").target("demo-user"))
        .await?;
    let report = redis.user_data().erase_user("demo-user").await?;
    println!(
        "user data: erased demo-user ({} keys), audit record {}",
        report.keys_deleted, report.audit_id
    );
    let audit = events.audit_range(now - 60_000, now + 60_000, 10).await?;
    let actions: Vec<_> = audit.iter().map(|r| r.action.as_str()).collect();
    println!("events: audit log {actions:?}");
    Ok(())
}

async fn demo_email_queue(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::email_queue::{EmailJob, Enqueued, Priority, WorkerOptions, handler_fn};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let queue = redis.email_queue()?;
    let welcome = EmailJob::new(
        ["ada@example.com"],
        "noreply@example.com",
        "Welcome",
        "Hello!",
    )?
    .with_priority(Priority::High);
    // Enqueue is idempotent by job id (a fresh random one here, so that a second run of the
    // quickstart against the same server starts afresh; a service would use its own stable id,
    // e.g. `JobId::new(format!("welcome-{user_id}"))`).
    let welcome_id = welcome.id.clone();
    let first = queue.enqueue(welcome.clone()).await?;
    let again = queue.enqueue(welcome).await?;
    assert_eq!((first, again), (Enqueued::New, Enqueued::Duplicate));
    let digest = EmailJob::new(["ada@example.com"], "noreply@example.com", "Digest", "News")?
        .with_priority(Priority::Low);
    queue.enqueue(digest).await?;
    println!(
        "email queue: enqueued 2 jobs (a second enqueue of {} was a no-op): {:?}",
        welcome_id.as_str(),
        queue.stats().await?
    );

    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let mut options = WorkerOptions::default();
    options.concurrency = 1;
    let worker = queue
        .worker(handler_fn(move |job: EmailJob| {
            println!(
                "email queue: sending {:?} [{}] to {:?}",
                job.subject, job.priority, job.to
            );
            h.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        }))
        .with_options(options)?
        .spawn();
    while handled.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let report = worker.shutdown().await?;
    println!(
        "email queue: worker sent {} (high before low), queue now {:?}",
        report.completed,
        queue.stats().await?
    );
    Ok(())
}
