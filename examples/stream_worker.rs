//! Stream worker: publishes task events (one of them poison, one twice with the same
//! idempotency key), runs a consumer group worker with 4 concurrent handlers until everything
//! it published is accounted for, shows the dead letter, replays it, and shuts down
//! gracefully. It stops by itself (after its own messages, or after 30 s at most).
//!
//! Run it with:
//!
//! ```sh
//! cargo run --example stream_worker --features testkit
//! ```
//!
//! With `REDIS_URL` unset and nothing listening on 127.0.0.1:6379 it starts a disposable Redis
//! through the testkit (Docker `redis:7.0` or a local `redis-server`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aether_redis::stream::{ConsumerOptions, StartFrom, StreamMessage};
use aether_redis::testkit;
use aether_redis::{Config, Redis};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct TaskEvent {
    task_id: u64,
    action: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = connect().await?;
    let streams = redis.streams();
    let stream = aether_redis::stream::TASK_EVENTS;
    let group = aether_redis::stream::TASK_WORKERS;
    streams
        .create_group(stream, group, StartFrom::Beginning)
        .await?;

    let producer = streams.producer::<TaskEvent>(stream)?;
    let events: Vec<TaskEvent> = (1..=20)
        .map(|task_id| TaskEvent {
            task_id,
            action: if task_id == 13 { "explode" } else { "run" }.into(),
        })
        .collect();
    producer.publish_many(&events).await?;
    let retry = TaskEvent {
        task_id: 21,
        action: "run".into(),
    };
    let first = producer.publish_idempotent(&retry, "task-21").await?;
    let again = producer.publish_idempotent(&retry, "task-21").await?;
    println!(
        "published 21 events; the retried publish of task 21 was a duplicate: {} (same id {})",
        again.duplicate,
        again.id == first.id
    );

    // Short timings so that the poison message reaches the dead-letter stream in about a second.
    let options = ConsumerOptions::default()
        .with_concurrency(4)
        .with_batch(10)
        .with_block(Duration::from_millis(200))
        .with_claim_min_idle(Duration::from_millis(300))
        .with_claim_interval(Duration::from_millis(100))
        .with_max_retries(3);
    let cured = Arc::new(AtomicBool::new(false));
    let handler_cured = cured.clone();
    let worker = streams
        .consumer::<TaskEvent>(stream, group, options)?
        .spawn(move |msg: StreamMessage<TaskEvent>| {
            let cured = handler_cured.clone();
            async move {
                if msg.payload.action == "explode" && !cured.load(Ordering::SeqCst) {
                    return Err(format!("task {} cannot be run", msg.payload.task_id));
                }
                println!(
                    "handled task {} ({}), delivery {}{}",
                    msg.payload.task_id,
                    msg.payload.action,
                    msg.delivery_count,
                    msg.replay_of
                        .map(|id| format!(", replay of {id}"))
                        .unwrap_or_default()
                );
                Ok(())
            }
        });
    println!("worker {} started", worker.name());

    let deadline = Instant::now() + Duration::from_secs(30);
    while (worker.metrics().processed < 20 || worker.metrics().dead_lettered < 1)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for dead in streams.dead_letters(stream, 10).await? {
        println!(
            "dead letter {} (was {}): {} deliveries, last error: {}",
            dead.id, dead.original_id, dead.delivery_count, dead.error
        );
        cured.store(true, Ordering::SeqCst);
        if let Some(id) = streams.replay_dead_letter(stream, &dead.id).await? {
            println!("replayed as {id}");
        }
    }
    while worker.metrics().processed < 21 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(info) = streams.group_info(stream, group).await? {
        println!(
            "group {group}: lag {:?}, pending {}, consumers {}",
            info.lag, info.pending, info.consumers
        );
    }
    let metrics = worker.shutdown().await?;
    println!(
        "shut down: processed {}, retried {}, dead-lettered {}, duplicates {}",
        metrics.processed, metrics.retried, metrics.dead_lettered, metrics.duplicates
    );
    Ok(())
}

/// `REDIS_URL` or 127.0.0.1:6379 when something answers there, else a disposable server.
async fn connect() -> Result<Redis, Box<dyn std::error::Error>> {
    let mut config = Config::from_env()?;
    config.key_prefix = format!("stream-worker:{}:", aether_redis::random::token(4));
    let (config, _) =
        tokio::task::spawn_blocking(move || testkit::config_or_disposable(config)).await??;
    Ok(Redis::connect(config).await?)
}
