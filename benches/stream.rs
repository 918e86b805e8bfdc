//! Streams end to end: XADD → XREADGROUP → handle → XACK, messages per second.
//!
//! `StreamConsumer` at batch 1/10/100 with 1 and 8 handlers (idempotency off, and on at 8
//! handlers), beside a raw loop with the redis client in the same run at the same batch size
//! and handler count: XREADGROUP (BLOCK, on its own connection) → decode each payload (with 8
//! handlers: the batch split into up to 8 slices handled on their own tasks at once, joined) →
//! one XACK for the batch on a shared `MultiplexedConnection`. Both sides publish with the same
//! pipelined `XADD MAXLEN ~`, and an iteration ends when the handler has seen every message of
//! the iteration. The quoted figures are the paired ratios printed at the end: every side of a
//! configuration runs at once on its own stream, and 20 alternating rounds drive one or the
//! other (see `support::alternate_rounds`).
//!
//! ```sh
//! cargo bench --bench stream --features testkit -- --warm-up-time 1 --measurement-time 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aether_redis::Redis;
use aether_redis::stream::{ConsumerOptions, StartFrom, StreamMessage};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

mod support;
use support::{PAIRED_ROUNDS, alternate_rounds, print_ratio};

/// Messages per iteration.
const MESSAGES: u64 = 200;

#[derive(Serialize, Deserialize)]
struct Event {
    id: u64,
    kind: String,
}

/// Counts handled messages and wakes the bench when a target is reached.
#[derive(Default)]
struct Progress {
    handled: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

impl Progress {
    fn handled(&self, n: u64) {
        let now = self.handled.fetch_add(n, Ordering::AcqRel) + n;
        if now >= self.target.load(Ordering::Acquire) {
            self.done.notify_one();
        }
    }

    async fn wait(&self, target: u64) {
        self.target.store(target, Ordering::Release);
        while self.handled.load(Ordering::Acquire) < target {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.done.notified()).await;
        }
    }
}

fn xadd_pipe(key: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for id in 0..MESSAGES {
        let json = serde_json::to_string(&Event {
            id,
            kind: "webhook".into(),
        })
        .unwrap();
        pipe.cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(100_000)
            .arg("*")
            .arg("payload")
            .arg(json)
            .ignore();
    }
    pipe
}

/// Runs `iters` iterations: publish MESSAGES, wait until all were handled.
async fn drive(
    shared: &mut MultiplexedConnection,
    key: &str,
    progress: &Progress,
    iters: u64,
) -> Duration {
    let pipe = xadd_pipe(key);
    let base = progress.handled.load(Ordering::Acquire);
    let started = Instant::now();
    for i in 1..=iters {
        let () = pipe.query_async(shared).await.unwrap();
        progress.wait(base + i * MESSAGES).await;
    }
    started.elapsed()
}

/// The handler of the raw loop: decode and count each entry.
fn raw_handle(entries: &[redis::streams::StreamId], progress: &Progress) {
    for entry in entries {
        let payload: Vec<u8> = entry.get("payload").unwrap();
        let event: Event = serde_json::from_slice(&payload).unwrap();
        std::hint::black_box(event);
    }
    progress.handled(entries.len() as u64);
}

/// The hand-written loop: XREADGROUP, handle (inline with 1 handler; with more, the batch split
/// into that many slices on their own tasks, joined), XACK the batch.
async fn raw_loop(
    client: redis::Client,
    mut shared: MultiplexedConnection,
    key: String,
    batch: usize,
    handlers: usize,
    progress: Arc<Progress>,
) {
    let blocking = AsyncConnectionConfig::new().set_response_timeout(None);
    let mut reader = client
        .get_multiplexed_async_connection_with_config(&blocking)
        .await
        .unwrap();
    loop {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("raw")
            .arg("COUNT")
            .arg(batch)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&key)
            .arg(">")
            .query_async(&mut reader)
            .await
            .unwrap();
        let Some(reply) = reply else { continue };
        let entries: Vec<redis::streams::StreamId> =
            reply.keys.into_iter().flat_map(|s| s.ids).collect();
        if entries.is_empty() {
            continue;
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        if handlers == 1 {
            raw_handle(&entries, &progress);
        } else {
            let entries = Arc::new(entries);
            let slice = entries.len().div_ceil(handlers);
            let mut tasks = tokio::task::JoinSet::new();
            for start in (0..entries.len()).step_by(slice) {
                let (entries, progress) = (entries.clone(), progress.clone());
                tasks.spawn(async move {
                    let end = (start + slice).min(entries.len());
                    raw_handle(&entries[start..end], &progress);
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        let _: i64 = redis::cmd("XACK")
            .arg(&key)
            .arg("g")
            .arg(&ids)
            .query_async(&mut shared)
            .await
            .unwrap();
    }
}

/// Iterations of `MESSAGES` per side in each paired round.
const PAIRED_ITERS: u64 = 10;

/// One side of a paired comparison: where it reads from and how far it got.
struct Side {
    key: String,
    progress: Arc<Progress>,
}

impl Side {
    async fn round(&self, shared: &MultiplexedConnection, iters: u64) -> Duration {
        drive(&mut shared.clone(), &self.key, &self.progress, iters).await
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = aether_redis::testkit::shared_server().unwrap();
    let mut config = server.config.clone();
    config.key_prefix = aether_redis::testkit::namespace("bench_stream");
    let redis: Redis = rt.block_on(Redis::connect(config.clone())).unwrap();
    let client = redis::Client::open(format!("redis://{}:{}", config.host, config.port)).unwrap();
    let shared = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();

    let mut group = c.benchmark_group("stream_e2e");
    group.throughput(Throughput::Elements(MESSAGES));
    let mut ratios = Vec::new();

    for batch in [1usize, 10, 100] {
        for handlers in [1usize, 8] {
            // Every side of this configuration runs at once, each on its own stream, so that the
            // paired rounds below can alternate between them; an idle side only blocks in
            // XREADGROUP.
            let name = format!("raw_b{batch}_h{handlers}");
            let raw = Side {
                key: format!("{}{name}", config.key_prefix),
                progress: Arc::new(Progress::default()),
            };
            rt.block_on(redis.streams().create_group(&name, "g", StartFrom::New))
                .unwrap();
            let raw_task = rt.spawn(raw_loop(
                client.clone(),
                shared.clone(),
                raw.key.clone(),
                batch,
                handlers,
                raw.progress.clone(),
            ));

            let mut runs = vec![false];
            if batch > 1 && handlers == 8 {
                runs.push(true);
            }
            let mut ours = Vec::new();
            for idempotency in runs {
                let name = format!("ours_b{batch}_h{handlers}_i{}", u8::from(idempotency));
                let side = Side {
                    key: format!("{}{name}", config.key_prefix),
                    progress: Arc::new(Progress::default()),
                };
                let options = ConsumerOptions::default()
                    .with_batch(batch)
                    .with_concurrency(handlers)
                    .with_block(Duration::from_secs(1))
                    .with_start(StartFrom::New)
                    .with_idempotency_ttl(idempotency.then_some(Duration::from_secs(600)));
                let consumer = redis
                    .streams()
                    .consumer::<Event>(&name, "g", options)
                    .unwrap();
                let progress = side.progress.clone();
                let running = rt.block_on(async {
                    redis
                        .streams()
                        .create_group(&name, "g", StartFrom::New)
                        .await
                        .unwrap();
                    consumer.spawn(move |msg: StreamMessage<Event>| {
                        std::hint::black_box(&msg.payload);
                        progress.handled(1);
                        async { Ok::<_, std::io::Error>(()) }
                    })
                });
                ours.push((idempotency, side, running));
            }

            group.bench_function(format!("raw/batch{batch}/handlers{handlers}"), |b| {
                b.to_async(&rt)
                    .iter_custom(|iters| raw.round(&shared, iters))
            });
            for (idempotency, side, _) in &ours {
                let label = format!(
                    "ours/batch{batch}/handlers{handlers}/idempotency_{}",
                    if *idempotency { "on" } else { "off" }
                );
                group.bench_function(label, |b| {
                    b.to_async(&rt)
                        .iter_custom(|iters| side.round(&shared, iters))
                });
            }

            let label = format!("stream b{batch} h{handlers}");
            let messages = PAIRED_ROUNDS * PAIRED_ITERS * MESSAGES;
            let plain = &ours[0].1;
            let (ours_time, raw_time) = rt.block_on(alternate_rounds(
                || plain.round(&shared, PAIRED_ITERS),
                || raw.round(&shared, PAIRED_ITERS),
            ));
            let vs_raw = print_ratio(
                &format!("{label} ours vs raw paired"),
                messages,
                ours_time,
                raw_time,
            );
            let idempotency_cost = ours.get(1).map(|(_, on, _)| {
                let (on_time, off_time) = rt.block_on(alternate_rounds(
                    || on.round(&shared, PAIRED_ITERS),
                    || plain.round(&shared, PAIRED_ITERS),
                ));
                print_ratio(
                    &format!("{label} idempotency on vs off paired"),
                    messages,
                    on_time,
                    off_time,
                )
            });
            ratios.push((batch, handlers, vs_raw, idempotency_cost));

            raw_task.abort();
            for (_, _, running) in ours {
                let metrics = rt.block_on(running.shutdown()).unwrap();
                assert_eq!(metrics.errors, 0);
            }
        }
    }
    group.finish();
    println!("\n| batch | handlers | ours / raw | idempotency on / off |\n|---|---|---|---|");
    for (batch, handlers, vs_raw, cost) in ratios {
        let cost = cost.map_or("—".to_string(), |c| format!("{c:.2}"));
        println!("| {batch} | {handlers} | {vs_raw:.2} | {cost} |");
    }
    rt.block_on(async {
        let mut conn = redis.connection().await.unwrap();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{}*", config.key_prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    });
    drop(shared);
}

criterion_group!(benches, bench);
criterion_main!(benches);
