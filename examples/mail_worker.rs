//! Mail worker: consumes the default email queue with graceful shutdown on Ctrl-C.
//!
//! Shows a [`JobHandler`] that sends mail (printed here), retryable versus permanent failures,
//! and a worker that, on Ctrl-C, stops fetching, lets in-flight jobs finish within the shutdown
//! deadline and returns the rest to the head of their lists, so nothing is lost.
//!
//! Run it (Ctrl-C to stop):
//!
//! ```sh
//! cargo run --example mail_worker --features testkit
//! ```
//!
//! With `REDIS_URL` unset and nothing listening on 127.0.0.1:6379 it starts a disposable Redis
//! through the testkit (its address is printed) and enqueues a few demo jobs. Feed it from
//! anywhere meanwhile, on that server (`-p <port>` for the disposable one; the key takes the
//! configured `REDIS_KEY_PREFIX` in front, and is `email-queue:{default}:normal` on Cluster):
//!
//! ```sh
//! redis-cli -p 6379 LPUSH email-queue:normal '{"id":"j-1","to":["ada@example.com"],"from":"noreply@example.com","subject":"Hi","body":"Hello","priority":"normal","attempts":0,"scheduledAt":0,"metadata":{}}'
//! ```
//!
//! CI runs it with `MAIL_WORKER_ONCE=1` (the same as passing `--once`): it enqueues its demo
//! jobs, handles them and exits as soon as the queue is empty (after at most 30 s in any case),
//! or at Ctrl-C, whichever comes first.

use std::time::Duration;

use aether_redis::email_queue::{EmailJob, JobError, JobHandler, Priority, WorkerOptions};
use aether_redis::testkit;
use aether_redis::{Config, Redis};

/// Sends one email. A real one would call an SMTP relay or a provider API, passing the job id as
/// the idempotency key because delivery is at least once.
struct Mailer;

#[async_trait::async_trait]
impl JobHandler for Mailer {
    async fn handle(&self, job: EmailJob) -> Result<(), JobError> {
        if job.to.iter().any(|a| !a.contains('@')) {
            // Retrying cannot fix a bad address.
            return Err(JobError::permanent(format!(
                "bad recipient in {:?}",
                job.to
            )));
        }
        println!(
            "sending {} [{}] to {} (attempt {}): {}",
            job.id,
            job.priority,
            job.to.join(", "),
            job.attempts + 1,
            job.subject
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let once = std::env::args().any(|a| a == "--once")
        || std::env::var("MAIL_WORKER_ONCE").is_ok_and(|v| v == "1");
    let (redis, demo) = connect().await?;
    let queue = redis.email_queue()?;

    if demo || once {
        for (i, priority) in [Priority::Low, Priority::Normal, Priority::High]
            .into_iter()
            .enumerate()
        {
            let job = EmailJob::new(
                [format!("user{i}@example.com")],
                "noreply@example.com",
                format!("Demo {priority} message"),
                "Hello from mail_worker",
            )?
            .with_priority(priority);
            queue.enqueue(job).await?;
        }
        let bad = EmailJob::new(["not-an-address"], "noreply@example.com", "Bounce", "x")?;
        queue.enqueue(bad).await?;
        println!("enqueued 4 demo jobs (one with a bad address)");
    }

    let mut options = WorkerOptions::default();
    options.concurrency = 4;
    options.shutdown_timeout = Duration::from_secs(10);
    let worker = queue.worker(Mailer).with_options(options)?;
    println!("worker {} running; Ctrl-C to stop", worker.id());

    let stats_queue = queue.clone();
    let idle = async move {
        // Stop when nothing is waiting, scheduled or in flight (bounded for CI).
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let idle = match stats_queue.stats().await {
                Ok(s) => s.waiting() + s.active + s.delayed == 0,
                Err(_) => false,
            };
            if idle || started.elapsed() > Duration::from_secs(30) {
                return;
            }
        }
    };
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => println!("Ctrl-C: finishing in-flight jobs"),
            () = idle, if once => println!("queue idle: stopping"),
        }
    };
    let report = worker.run_until(stop).await?;
    let stats = queue.stats().await?;
    println!(
        "stopped: {} sent, {} retried, {} dead, {} returned to the queue; \
         now waiting {}, dead {}",
        report.completed,
        report.retried,
        report.dead,
        report.released,
        stats.waiting(),
        stats.dead
    );
    Ok(())
}

/// `REDIS_URL` or 127.0.0.1:6379 when something answers there, else a disposable server
/// (`true`: demo mode).
async fn connect() -> Result<(Redis, bool), Box<dyn std::error::Error>> {
    let config = Config::from_env()?;
    let (config, disposable) =
        tokio::task::spawn_blocking(move || testkit::config_or_disposable(config)).await??;
    Ok((Redis::connect(config).await?, disposable))
}
