//! End-to-end email queue throughput: enqueue → handle → acknowledge, at 1, 8 and 32
//! concurrency (producer tasks and handler slots), beside a raw `LPUSH`/`BLMOVE`/`LREM`
//! reliable-queue loop on the redis client, apalis-redis 1.0 and rsmq_async 18, same server, same
//! run (settings of each side: docs/performance.md). A second group times the producers alone (no worker
//! running): the rate at which N tasks awaiting each enqueue can add jobs bounds the end-to-end
//! figure from above.
//!
//! ```sh
//! cargo bench --all-features --bench email_queue -- --warm-up-time 1 --measurement-time 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aether_redis::email_queue::{EmailJob, EmailQueue, WorkerHandle, WorkerOptions, handler_fn};
use aether_redis::{Config, Redis};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

mod support;
use support::run_concurrent;

/// Jobs per measured iteration.
const BATCH: u64 = 200;
const CONCURRENCY: [usize; 3] = [1, 8, 32];
/// The second row of ours is tuned for throughput as apalis-redis is by default: it leases up to
/// 10 tasks per fetch (`batch_size`) and, configured here to poll every 1 ms, collects what
/// arrived meanwhile. Ours: `prefetch` 10, `linger` 1 ms.
const TUNED_PREFETCH: usize = 10;
const TUNED_LINGER: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct BenchMail {
    to: Vec<String>,
    from: String,
    subject: String,
    body: String,
}

fn mail() -> BenchMail {
    BenchMail {
        to: vec!["ada@example.com".into()],
        from: "noreply@example.com".into(),
        subject: "Your weekly digest".into(),
        body: "x".repeat(512),
    }
}

fn job() -> EmailJob {
    let m = mail();
    EmailJob::new(m.to, m.from, m.subject, m.body).unwrap()
}

/// Waits until `done` reaches `target`.
async fn wait_done(done: &AtomicU64, notify: &Notify, target: u64) {
    loop {
        let notified = notify.notified();
        if done.load(Ordering::Acquire) >= target {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
    }
}

/// Times `concurrency` producer tasks sharing `total` sends until the handlers have counted
/// them all in `done`.
async fn end_to_end<F, Fut>(
    done: &AtomicU64,
    notify: &Notify,
    concurrency: usize,
    total: u64,
    send: F,
) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let target = done.load(Ordering::Acquire) + total;
    let started = Instant::now();
    run_concurrent(total, concurrency, send).await;
    wait_done(done, notify, target).await;
    started.elapsed()
}

struct Ours {
    queue: EmailQueue,
    done: Arc<AtomicU64>,
    notify: Arc<Notify>,
    worker: Option<WorkerHandle>,
}

impl Ours {
    async fn start(redis: &Redis, concurrency: usize, tuned: bool) -> Self {
        let queue = redis
            .email_queue_named(&format!(
                "bench{concurrency}{}",
                if tuned { "t" } else { "" }
            ))
            .unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(Notify::new());
        let (d, n) = (done.clone(), notify.clone());
        let mut options = WorkerOptions::default();
        options.concurrency = concurrency;
        if tuned {
            options.prefetch = TUNED_PREFETCH;
            options.linger = TUNED_LINGER;
        }
        let worker = queue
            .worker(handler_fn(move |_job| {
                d.fetch_add(1, Ordering::Release);
                n.notify_waiters();
                async { Ok(()) }
            }))
            .with_options(options)
            .unwrap()
            .spawn();
        Ours {
            queue,
            done,
            notify,
            worker: Some(worker),
        }
    }

    async fn run(&self, concurrency: usize, total: u64) -> Duration {
        let queue = self.queue.clone();
        end_to_end(&self.done, &self.notify, concurrency, total, move || {
            let queue = queue.clone();
            async move {
                queue.enqueue(job()).await.unwrap();
            }
        })
        .await
    }
}

mod apalis_side {
    use super::*;
    use apalis::prelude::*;
    use apalis_redis::RedisStorage;

    /// apalis-redis polls: after a fetch that finds the queue empty its backend parks until
    /// something wakes the worker, and without a poll strategy nothing does before the next
    /// heartbeat (30 s by default). The fastest interval is used so that it is never idle.
    pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(1);

    pub(super) struct Apalis {
        pub(super) storage: RedisStorage<BenchMail>,
        pub(super) done: Arc<AtomicU64>,
        pub(super) notify: Arc<Notify>,
        stop: Arc<Notify>,
        worker: tokio::task::JoinHandle<()>,
    }

    #[derive(Clone)]
    struct Counter(Arc<AtomicU64>, Arc<Notify>);

    async fn handle(_mail: BenchMail, counter: Data<Counter>) -> Result<(), BoxDynError> {
        let Counter(done, notify) = &*counter;
        done.fetch_add(1, Ordering::Release);
        notify.notify_waiters();
        Ok(())
    }

    /// A connection manager without the client's 500 ms default response timeout: on this
    /// loaded 2-core machine one slow reply would otherwise end the worker's stream for good.
    pub(super) async fn connection(url: &str) -> apalis_redis::ConnectionManager {
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(None);
        apalis_redis::Client::open(url)
            .unwrap()
            .get_connection_manager_with_config(config)
            .await
            .unwrap()
    }

    impl Apalis {
        pub(super) async fn start(url: &str, concurrency: usize) -> Self {
            let config = apalis_redis::Config::default()
                .queue(format!("apalis-bench-{concurrency}-{}", std::process::id()))
                // One fetch script takes as many jobs as there are handler slots (at least the
                // default of 10), as ours does.
                .batch_size(concurrency.max(10))
                // No pub/sub task events: ours publishes none.
                .emit_events(false);
            let storage = RedisStorage::<BenchMail>::new(connection(url).await).with_config(config);
            let done = Arc::new(AtomicU64::new(0));
            let notify = Arc::new(Notify::new());
            let stop = Arc::new(Notify::new());
            let worker = WorkerBuilder::new(format!("bench-{concurrency}-{}", std::process::id()))
                .backend(storage.clone().poll_with_interval(POLL_INTERVAL))
                .data(Counter(done.clone(), notify.clone()))
                .concurrency(concurrency)
                .build(handle);
            let s = stop.clone();
            let worker = tokio::spawn(async move {
                let result = worker
                    .run_until(async move {
                        s.notified().await;
                        Ok::<(), WorkerError>(())
                    })
                    .await;
                if let Err(e) = result {
                    eprintln!("apalis worker stopped: {e}");
                }
            });
            Apalis {
                storage,
                done,
                notify,
                stop,
                worker,
            }
        }

        pub(super) async fn run(&self, concurrency: usize, total: u64) -> Duration {
            let storage = self.storage.clone();
            end_to_end(&self.done, &self.notify, concurrency, total, move || {
                let mut storage = storage.clone();
                async move {
                    storage.push(mail()).await.unwrap();
                }
            })
            .await
        }

        /// Jobs acknowledged in Redis (apalis adds each completed task id to its done set).
        pub(super) async fn acknowledged(&self) -> u64 {
            let mut conn = self.storage.clone();
            let key = conn.get_config().done_jobs_set();
            redis::cmd("SCARD")
                .arg(key)
                .query_async(conn.get_connection())
                .await
                .unwrap()
        }

        pub(super) async fn stop(self) {
            self.stop.notify_one();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.worker).await;
        }
    }
}

mod rsmq_side {
    use super::*;
    use rsmq_async::{Rsmq, RsmqConnection, RsmqMessage, RsmqOptions, Worker};

    /// RSMQ's workers poll; the fastest interval, as for apalis.
    const POLL_INTERVAL: Duration = Duration::from_millis(1);

    /// rsmq_async 18: `send_message` per job on one multiplexed connection; its `Worker` handles
    /// one message at a time, so N handler slots are N workers (each with its own connection),
    /// each receiving, handling and deleting one message per round.
    pub(super) struct RsmqSide {
        rsmq: Rsmq,
        qname: String,
        pub(super) done: Arc<AtomicU64>,
        notify: Arc<Notify>,
        stop: Arc<Notify>,
        workers: Vec<tokio::task::JoinHandle<()>>,
    }

    fn options((host, port): (&str, u16), ns: &str) -> RsmqOptions {
        RsmqOptions {
            host: host.to_owned(),
            port,
            ns: ns.to_owned(),
            ..RsmqOptions::default()
        }
    }

    impl RsmqSide {
        pub(super) async fn start(server: (&str, u16), concurrency: usize) -> Self {
            let ns = format!("rsmq-bench-{}", std::process::id());
            let qname = format!("q{concurrency}");
            let mut rsmq = Rsmq::new(options(server, &ns)).await.unwrap();
            rsmq.create_queue(&qname, None, None, Some(-1))
                .await
                .unwrap();
            let done = Arc::new(AtomicU64::new(0));
            let notify = Arc::new(Notify::new());
            let stop = Arc::new(Notify::new());
            let mut workers = Vec::new();
            for _ in 0..concurrency {
                let (d, n) = (done.clone(), notify.clone());
                let worker = Worker::builder(options(server, &ns))
                    .poll_interval(POLL_INTERVAL)
                    .route(qname.clone(), move |msg: RsmqMessage<String>| {
                        let (d, n) = (d.clone(), n.clone());
                        async move {
                            let _: BenchMail = serde_json::from_str(&msg.message).unwrap();
                            d.fetch_add(1, Ordering::Release);
                            n.notify_waiters();
                            Ok::<(), std::convert::Infallible>(())
                        }
                    })
                    .build()
                    .await
                    .unwrap();
                let s = stop.clone();
                workers.push(tokio::spawn(async move {
                    if let Err(e) = worker.run_until(async move { s.notified().await }).await {
                        eprintln!("rsmq worker stopped: {e}");
                    }
                }));
            }
            RsmqSide {
                rsmq,
                qname,
                done,
                notify,
                stop,
                workers,
            }
        }

        pub(super) async fn run(&self, concurrency: usize, total: u64) -> Duration {
            let (rsmq, qname) = (self.rsmq.clone(), self.qname.clone());
            end_to_end(&self.done, &self.notify, concurrency, total, move || {
                let (mut rsmq, qname) = (rsmq.clone(), qname.clone());
                async move {
                    let payload = serde_json::to_string(&mail()).unwrap();
                    rsmq.send_message(&qname, payload, None).await.unwrap();
                }
            })
            .await
        }

        /// Messages still in the queue: each handled one was deleted in the same round.
        pub(super) async fn remaining(&self) -> u64 {
            let mut rsmq = self.rsmq.clone();
            rsmq.get_queue_attributes(&self.qname).await.unwrap().msgs
        }

        pub(super) async fn stop(self) {
            self.stop.notify_waiters();
            for worker in self.workers {
                let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
            }
        }
    }
}

/// The raw producer's send: one `LPUSH` of the bench mail as JSON.
async fn lpush_mail(mut conn: redis::aio::MultiplexedConnection, list: String) {
    let payload = serde_json::to_string(&mail()).unwrap();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&list)
        .arg(payload)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// The classic reliable queue with the raw client: `LPUSH`; consumers `BLMOVE` to a processing
/// list (one connection each, as a blocking command needs) and `LREM` it when done.
struct Raw {
    conn: redis::aio::MultiplexedConnection,
    list: String,
    done: Arc<AtomicU64>,
    notify: Arc<Notify>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
}

impl Raw {
    async fn start(client: &redis::Client, concurrency: usize) -> Self {
        let list = format!("raw-bench:{concurrency}:{}", std::process::id());
        let done = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(Notify::new());
        let mut consumers = Vec::new();
        for i in 0..concurrency {
            let mut blocking = client.get_multiplexed_async_connection().await.unwrap();
            let (list, processing) = (list.clone(), format!("{list}:processing:{i}"));
            let (done, notify) = (done.clone(), notify.clone());
            consumers.push(tokio::spawn(async move {
                loop {
                    // The block time stays under the client's default response timeout.
                    let item: Option<Vec<u8>> = match redis::cmd("BLMOVE")
                        .arg(&list)
                        .arg(&processing)
                        .arg("RIGHT")
                        .arg("LEFT")
                        .arg(0.2)
                        .query_async(&mut blocking)
                        .await
                    {
                        Ok(item) => item,
                        Err(_) => continue,
                    };
                    let Some(item) = item else { continue };
                    let _: BenchMail = serde_json::from_slice(&item).unwrap();
                    let _: i64 = redis::cmd("LREM")
                        .arg(&processing)
                        .arg(1)
                        .arg(&item)
                        .query_async(&mut blocking)
                        .await
                        .unwrap();
                    done.fetch_add(1, Ordering::Release);
                    notify.notify_waiters();
                }
            }));
        }
        Raw {
            conn: client.get_multiplexed_async_connection().await.unwrap(),
            list,
            done,
            notify,
            consumers,
        }
    }

    async fn run(&self, concurrency: usize, total: u64) -> Duration {
        let (conn, list) = (self.conn.clone(), self.list.clone());
        end_to_end(&self.done, &self.notify, concurrency, total, move || {
            lpush_mail(conn.clone(), list.clone())
        })
        .await
    }
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let server = aether_redis::testkit::shared_server().unwrap();
    let config: Config = {
        let mut config = server.config.clone();
        config.key_prefix = format!("bench:{}:", std::process::id());
        config
    };
    let url = format!("redis://{}:{}", config.host, config.port);
    let (host, port) = (config.host.clone(), config.port);
    let redis = rt.block_on(Redis::connect(config)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();

    let mut group = c.benchmark_group("email_queue_end_to_end");
    group.throughput(Throughput::Elements(BATCH));
    for concurrency in CONCURRENCY {
        for (name, tuned) in [("aether_redis", false), ("aether_redis_tuned", true)] {
            let ours = rt.block_on(Ours::start(&redis, concurrency, tuned));
            group.bench_function(BenchmarkId::new(name, concurrency), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let ours = &ours;
                    async move { ours.run(concurrency, iters * BATCH).await }
                })
            });
            let mut ours = ours;
            if let Some(worker) = ours.worker.take() {
                let report = rt.block_on(worker.shutdown()).unwrap();
                // Every handled job was acknowledged (acks ride on the next fetch call).
                assert_eq!(report.completed, ours.done.load(Ordering::Acquire));
            }
        }

        let apalis = rt.block_on(apalis_side::Apalis::start(&url, concurrency));
        group.bench_function(BenchmarkId::new("apalis_redis", concurrency), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let apalis = &apalis;
                async move { apalis.run(concurrency, iters * BATCH).await }
            })
        });
        // apalis acknowledges in batches from its worker loop; wait for the last batch.
        rt.block_on(async {
            let handled = apalis.done.load(Ordering::Acquire);
            let deadline = Instant::now() + Duration::from_secs(10);
            while apalis.acknowledged().await < handled {
                assert!(
                    Instant::now() < deadline,
                    "apalis left handled jobs unacknowledged"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        rt.block_on(apalis.stop());

        let rsmq = rt.block_on(rsmq_side::RsmqSide::start(
            (host.as_str(), port),
            concurrency,
        ));
        group.bench_function(BenchmarkId::new("rsmq_async", concurrency), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let rsmq = &rsmq;
                async move { rsmq.run(concurrency, iters * BATCH).await }
            })
        });
        // A worker deletes a message right after its handler returns; wait for the last.
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while rsmq.remaining().await > 0 {
                assert!(
                    Instant::now() < deadline,
                    "rsmq left handled messages undeleted"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        rt.block_on(rsmq.stop());

        let raw = rt.block_on(Raw::start(&client, concurrency));
        group.bench_function(
            BenchmarkId::new("raw_lpush_blmove_lrem", concurrency),
            |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let raw = &raw;
                    async move { raw.run(concurrency, iters * BATCH).await }
                })
            },
        );
        for consumer in &raw.consumers {
            consumer.abort();
        }
    }
    group.finish();
}

/// Deletes every key matching `pattern` (the enqueue-only sides leave their jobs behind).
async fn unlink_matching(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(conn)
                .await
                .unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Benchmarks `concurrency` producer tasks sharing `BATCH * iters` calls of `send`, timing only
/// the sends.
fn time_producers<F, Fut>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    concurrency: usize,
    send: F,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    group.bench_function(BenchmarkId::new(name, concurrency), |b| {
        b.to_async(rt)
            .iter_custom(|iters| run_concurrent(iters * BATCH, concurrency, send.clone()))
    });
}

/// The producers alone: N tasks each awaiting one enqueue at a time, nothing consuming. Ours
/// (one script per call, concurrent calls on one handle batched), apalis-redis's `push` (one
/// script per job), a raw `LPUSH` per job on the shared connection, and a `PING` per job: the
/// round trip itself, which no enqueue that waits for its reply can beat.
fn bench_enqueue_only(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let server = aether_redis::testkit::shared_server().unwrap();
    let prefix = format!("bench-enqueue:{}:", std::process::id());
    let config: Config = {
        let mut config = server.config.clone();
        config.key_prefix = prefix.clone();
        config
    };
    let url = format!("redis://{}:{}", config.host, config.port);
    let redis = rt.block_on(Redis::connect(config)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut admin = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();

    let mut group = c.benchmark_group("email_queue_enqueue_only");
    group.throughput(Throughput::Elements(BATCH));
    for concurrency in CONCURRENCY {
        let queue = redis
            .email_queue_named(&format!("enqueue{concurrency}"))
            .unwrap();
        time_producers(&mut group, &rt, "aether_redis", concurrency, move || {
            let queue = queue.clone();
            async move {
                queue.enqueue(job()).await.unwrap();
            }
        });
        rt.block_on(unlink_matching(&mut admin, &format!("{prefix}*")));

        let apalis_queue = format!("apalis-bench-enqueue-{concurrency}-{}", std::process::id());
        let storage = apalis_redis::RedisStorage::<BenchMail>::new(
            rt.block_on(apalis_side::connection(&url)),
        )
        .with_config(
            apalis_redis::Config::default()
                .queue(apalis_queue.clone())
                .emit_events(false),
        );
        time_producers(&mut group, &rt, "apalis_redis", concurrency, move || {
            let mut storage = storage.clone();
            async move {
                use apalis::prelude::*;
                storage.push(mail()).await.unwrap();
            }
        });
        rt.block_on(unlink_matching(&mut admin, &format!("{apalis_queue}*")));

        let list = format!("raw-bench-enqueue:{concurrency}:{}", std::process::id());
        let conn = rt
            .block_on(client.get_multiplexed_async_connection())
            .unwrap();
        let (lpush_conn, lpush_list) = (conn.clone(), list.clone());
        time_producers(&mut group, &rt, "raw_lpush", concurrency, move || {
            lpush_mail(lpush_conn.clone(), lpush_list.clone())
        });
        rt.block_on(unlink_matching(&mut admin, &list));

        time_producers(&mut group, &rt, "raw_ping", concurrency, move || {
            let mut conn = conn.clone();
            async move {
                let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
            }
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_enqueue_only);
criterion_main!(benches);
