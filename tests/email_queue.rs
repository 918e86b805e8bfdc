//! EmailQueue contract: exactly-once handling in priority order, crash recovery (aborted task,
//! SIGKILLed process, Redis killed with AOF on), retries, delays, idempotency, expiry, aging,
//! graceful shutdown and wire compatibility with raw `LPUSH` producers.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aether_redis::email_queue::{
    CleanTarget, EmailJob, EmailQueue, Enqueued, JobError, JobId, Priority, QueueOptions,
    QueueStats, Retention, WorkerHandle, WorkerOptions, handler_fn,
};
use aether_redis::testkit::{LocalOptions, LocalServer};
use aether_redis::{Config, Error, Keyspace, Redis, Topology};

mod support;

fn job(id: &str, priority: Priority) -> EmailJob {
    EmailJob::new(["ada@example.com"], "noreply@example.com", "Hello", "Body")
        .unwrap()
        .with_id(JobId::new(id).unwrap())
        .with_priority(priority)
}

/// Short timeouts so that recovery tests take about a second.
fn fast(queue: &EmailQueue) -> EmailQueue {
    let mut o = QueueOptions::default();
    o.visibility_timeout = Duration::from_millis(1000);
    o.backoff_base = Duration::from_millis(200);
    o.aging = None;
    queue.with_options(o).unwrap()
}

fn worker_options(concurrency: usize) -> WorkerOptions {
    let mut w = WorkerOptions::default();
    w.concurrency = concurrency;
    w.poll_interval = Duration::from_millis(20);
    w.shutdown_timeout = Duration::from_secs(10);
    w
}

/// One slot under a fixed worker id, as a replica of a deployment would run.
fn replica(id: &str) -> WorkerOptions {
    let mut w = worker_options(1);
    w.worker_id = Some(id.into());
    w
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_stats(
    queue: &EmailQueue,
    what: &str,
    limit: Duration,
    done: impl Fn(&QueueStats) -> bool,
) -> QueueStats {
    let started = Instant::now();
    loop {
        let stats = queue.stats().await.unwrap();
        if done(&stats) {
            return stats;
        }
        assert!(
            started.elapsed() < limit,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns a worker of `queue` with [`worker_options`]`(concurrency)` running `handle`.
fn spawn_worker<F, Fut>(queue: &EmailQueue, concurrency: usize, handle: F) -> WorkerHandle
where
    F: Fn(EmailJob) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), JobError>> + Send + 'static,
{
    spawn_worker_with(queue, worker_options(concurrency), handle)
}

fn spawn_worker_with<F, Fut>(queue: &EmailQueue, options: WorkerOptions, handle: F) -> WorkerHandle
where
    F: Fn(EmailJob) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), JobError>> + Send + 'static,
{
    queue
        .worker(handler_fn(handle))
        .with_options(options)
        .unwrap()
        .spawn()
}

/// A worker that acknowledges every job and records the ids it handled, in order.
fn recording_worker(
    queue: &EmailQueue,
    concurrency: usize,
) -> (Arc<Mutex<Vec<String>>>, WorkerHandle) {
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = ids.clone();
    let worker = spawn_worker(queue, concurrency, move |job: EmailJob| {
        log.lock().unwrap().push(job.id.to_string());
        async { Ok(()) }
    });
    (ids, worker)
}

/// `(waiting, active, delayed, dead, completed)` from one stats snapshot.
async fn counts(queue: &EmailQueue) -> (u64, u64, u64, u64, u64) {
    let s = queue.stats().await.unwrap();
    (s.waiting(), s.active, s.delayed, s.dead, s.completed)
}

/// Fields left in the queue's `leases`, `payloads` and `deliveries` hashes.
async fn lease_fields(redis: &Redis, queue: &EmailQueue) -> (u64, u64, u64) {
    let mut conn = redis.connection().await.unwrap();
    let mut out = [0u64; 3];
    for (n, member) in ["leases", "payloads", "deliveries"].into_iter().enumerate() {
        let key = queue
            .list_key(Priority::Normal)
            .replace(":normal", &format!(":{member}"));
        out[n] = redis::cmd("HLEN")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    (out[0], out[1], out[2])
}

fn rank(p: Priority) -> u8 {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

/// Every job id in the three lists, with how often it occurs.
async fn waiting_ids(redis: &Redis, queue: &EmailQueue) -> HashMap<String, usize> {
    let mut conn = redis.connection().await.unwrap();
    let mut counts = HashMap::new();
    for p in Priority::ALL {
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg(queue.list_key(p))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        for item in items {
            let job: EmailJob = serde_json::from_str(&item).unwrap();
            *counts.entry(job.id.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Pushes raw payloads to `queue`'s `priority` list one `LPUSH` each, as another service would.
async fn push_raw<P: redis::ToRedisArgs>(
    redis: &Redis,
    queue: &EmailQueue,
    priority: Priority,
    payloads: impl IntoIterator<Item = P>,
) {
    let mut conn = redis.connection().await.unwrap();
    for payload in payloads {
        let _: () = redis::cmd("LPUSH")
            .arg(queue.list_key(priority))
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

fn documented_json(id: &str, priority: &str, scheduled_at: i64) -> String {
    format!(
        r#"{{"id":"{id}","to":["grace@example.com"],"from":"noreply@example.com","subject":"Raw {id}","body":"pushed by another service","priority":"{priority}","attempts":0,"scheduledAt":{scheduled_at},"metadata":{{"tenant":"t1","tags":[]}}}}"#
    )
}

aether_redis::contract_tests! {
    async fn eight_workers_handle_every_job_exactly_once_in_priority_order(redis) {
        const WORKERS: usize = 8;
        const JOBS: usize = WORKERS * 10_000;
        // Not a recovery test: a lease must not expire when the loaded machine stalls a worker
        // for a second, or a redelivered job would be counted twice.
        let mut options = fast(&redis.email_queue().unwrap()).options().clone();
        options.visibility_timeout = Duration::from_secs(30);
        let queue = redis.email_queue().unwrap().with_options(options).unwrap();
        let jobs: Vec<EmailJob> = (0..JOBS)
            .map(|i| {
                let p = Priority::ALL[(i * 7 + i / 3) % 3];
                job(&format!("{}-{i:05}", p.as_str()), p)
            })
            .collect();
        let results = queue.enqueue_bulk(jobs).await.unwrap();
        assert!(results.iter().all(|r| *r == Enqueued::New));
        assert_eq!(counts(&queue).await.0, JOBS as u64);

        let handled = Arc::new(AtomicUsize::new(0));
        let mut logs = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            let log: Arc<Mutex<Vec<(Priority, usize)>>> = Arc::default();
            logs.push(log.clone());
            let handled = handled.clone();
            workers.push(spawn_worker(&queue, 1, move |job: EmailJob| {
                let seq: usize = job.id.as_str().rsplit('-').next().unwrap().parse().unwrap();
                log.lock().unwrap().push((job.priority, seq));
                handled.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }));
        }
        wait_for("all jobs", Duration::from_secs(300), || handled.load(Ordering::SeqCst) >= JOBS).await;
        let mut total = crate::WorkerTotals::default();
        for w in workers {
            total.add(w.shutdown().await.unwrap());
        }
        assert_eq!(total.completed, JOBS as u64);
        assert_eq!(total.lost, 0);

        let mut seen = HashMap::new();
        for log in &logs {
            let log = log.lock().unwrap();
            // Each worker fetches one job per call, so its log is the order Redis gave them.
            for pair in log.windows(2) {
                let ((p1, s1), (p2, s2)) = (pair[0], pair[1]);
                assert!(rank(p1) <= rank(p2), "{p2:?} {s2} served before {p1:?} {s1} ended");
                if p1 == p2 {
                    assert!(s1 < s2, "FIFO broken within {p1:?}: {s1} then {s2}");
                }
            }
            for &(p, s) in log.iter() {
                *seen.entry((p, s)).or_insert(0) += 1;
            }
        }
        assert_eq!(seen.len(), JOBS, "some job was never handled");
        assert!(seen.values().all(|&n| n == 1), "some job was handled twice");
        // Completed ids are retained up to the bound (1000 by default), not all 80 000.
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 1000));
        assert_eq!(lease_fields(&redis, &queue).await, (0, 0, 0), "settled jobs left lease state behind");
    }

    async fn aborted_worker_task_job_is_redelivered_after_the_visibility_timeout(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        queue.enqueue(job("abort-me", Priority::Normal)).await.unwrap();
        let started: Arc<Mutex<Option<Instant>>> = Arc::default();
        let s = started.clone();
        let stuck = spawn_worker_with(&queue, replica("replica-1"), move |_job| {
            *s.lock().unwrap() = Some(Instant::now());
            async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        });
        wait_for("the first delivery", Duration::from_secs(10), || started.lock().unwrap().is_some()).await;
        stuck.abort();
        assert_eq!(queue.stats().await.unwrap().active, 1);

        // A replica with the same worker id cannot hide the orphan: recovery is by deadline.
        let redelivered: Arc<Mutex<Vec<(String, u32, Instant)>>> = Arc::default();
        let r = redelivered.clone();
        let rescuer = spawn_worker_with(&queue, replica("replica-1"), move |job: EmailJob| {
            r.lock().unwrap().push((job.id.to_string(), job.attempts, Instant::now()));
            async { Ok(()) }
        });
        wait_for("the redelivery", Duration::from_secs(10), || !redelivered.lock().unwrap().is_empty()).await;
        let report = rescuer.shutdown().await.unwrap();
        assert_eq!(report.completed, 1);
        let got = redelivered.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "abort-me");
        assert_eq!(got[0].1, 0, "a crash is not a failed attempt");
        // The recovered job was counted (two deliveries); its ack removed the count.
        assert_eq!(lease_fields(&redis, &queue).await, (0, 0, 0));
        let first = started.lock().unwrap().unwrap();
        assert!(got[0].2 - first >= Duration::from_millis(900), "redelivered before the visibility timeout");
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 1));
    }

    async fn a_job_whose_workers_keep_dying_is_abandoned_and_replay_one_revives_it(redis) {
        let mut o = fast(&redis.email_queue_named("doomed").unwrap()).options().clone();
        o.max_deliveries = 2;
        let queue = redis.email_queue_named("doomed").unwrap().with_options(o).unwrap();
        queue.enqueue(job("doomed", Priority::Normal)).await.unwrap();
        let deliveries = Arc::new(AtomicUsize::new(0));
        for delivery in 1..=2 {
            let d = deliveries.clone();
            let stuck = spawn_worker(&queue, 1, move |_job| {
                d.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            });
            wait_for("a delivery", Duration::from_secs(10), || deliveries.load(Ordering::SeqCst) == delivery).await;
            stuck.abort();
        }
        // The survivor's maintenance finds the second lease expired: two deliveries, both died.
        let (handled, survivor) = recording_worker(&queue, 1);
        wait_stats(&queue, "the abandoned job", Duration::from_secs(10), |s| s.dead == 1).await;
        assert!(handled.lock().unwrap().is_empty(), "delivered a third time");
        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!((dead[0].dead_id.as_str(), dead[0].reason.as_str()), ("doomed", "abandoned"));
        assert!(dead[0].error.contains("2 deliveries"), "{}", dead[0].error);
        assert!(dead[0].is_replayable());

        assert!(matches!(queue.replay_one("").await, Err(Error::InvalidInput { what: "dead id", .. })));
        assert!(queue.replay_one("doomed").await.unwrap());
        assert!(!queue.replay_one("doomed").await.unwrap(), "replayed twice");
        wait_for("the replayed job", Duration::from_secs(10), || handled.lock().unwrap().len() == 1).await;
        survivor.shutdown().await.unwrap();
        assert_eq!(handled.lock().unwrap().as_slice(), ["doomed"]);
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 1));
    }

    async fn retention_bounds_hold_while_workers_run(redis) {
        let mut o = fast(&redis.email_queue_named("bounded").unwrap()).options().clone();
        o.completed_retention = Retention::new(2, Duration::from_secs(3600));
        o.dead_retention = Retention::new(3, Duration::from_secs(3600));
        let queue = redis.email_queue_named("bounded").unwrap().with_options(o).unwrap();
        let jobs = (0..20).map(|i| job(&format!("r{i}"), Priority::Normal)).collect();
        queue.enqueue_bulk(jobs).await.unwrap();
        let handled = Arc::new(AtomicUsize::new(0));
        let h = handled.clone();
        let worker = spawn_worker(&queue, 4, move |job: EmailJob| {
            h.fetch_add(1, Ordering::SeqCst);
            let odd = job.id.as_str().ends_with(['1', '3', '5', '7', '9']);
            async move { if odd { Err(JobError::permanent("bounced")) } else { Ok(()) } }
        });
        wait_for("every job", Duration::from_secs(10), || handled.load(Ordering::SeqCst) == 20).await;
        // No clean() call: the workers' own maintenance trims, oldest first.
        let stats = wait_stats(&queue, "trimmed sets", Duration::from_secs(10), |s| s.completed == 2 && s.dead == 3).await;
        worker.shutdown().await.unwrap();
        assert_eq!((stats.high, stats.normal, stats.low, stats.active), (0, 0, 0, 0));
        // Trimmed ids are forgotten (enqueue accepts them again); retained ones are still known.
        let retained: Vec<String> = queue.dead_jobs(10).await.unwrap().into_iter().map(|d| d.dead_id).collect();
        assert_eq!(retained.len(), 3);
        assert_eq!(queue.enqueue(job(&retained[0], Priority::Normal)).await.unwrap(), Enqueued::Duplicate);
        let forgotten = ["r1", "r3", "r5", "r7", "r9", "r11", "r13", "r15", "r17", "r19"]
            .into_iter()
            .find(|id| !retained.iter().any(|r| r == id))
            .unwrap();
        assert_eq!(queue.enqueue(job(forgotten, Priority::Normal)).await.unwrap(), Enqueued::New);
    }

    async fn sigkilled_worker_process_job_is_redelivered(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        queue.enqueue(job("killed-mid-job", Priority::High)).await.unwrap();
        let mut child = support::child_test_process(&redis, "child_worker_process", &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A plain thread: a blocked read must not keep the runtime from shutting down.
        std::thread::spawn(move || {
            let leased = std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|line| line.split_once("LEASED ").map(|(_, id)| id.trim().to_owned()));
            let _ = tx.send(leased);
        });
        let leased = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(leased) => leased.unwrap(),
            Err(_) => {
                child.kill().unwrap();
                panic!("the child worker never leased the job");
            }
        };
        // The child printed the line after its lease was written, so the lease is at least this
        // old when the job is redelivered.
        let leased_at = Instant::now();
        assert_eq!(leased.as_deref(), Some("killed-mid-job"));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(queue.stats().await.unwrap().active, 1);

        let redelivered: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let r = redelivered.clone();
        let worker = spawn_worker(&queue, 2, move |job: EmailJob| {
            r.lock().unwrap().push((job.id.to_string(), Instant::now()));
            async { Ok(()) }
        });
        wait_for("the redelivery", Duration::from_secs(10), || !redelivered.lock().unwrap().is_empty()).await;
        worker.shutdown().await.unwrap();
        let got = redelivered.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "killed-mid-job");
        // Not before the lease ran out (1 s visibility): the kill itself released nothing.
        // (Half the timeout: `leased_at` is taken a little after the lease, on a loaded machine.)
        assert!(got[0].1 - leased_at >= Duration::from_millis(500), "redelivered {:?} after the lease", got[0].1 - leased_at);
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 1));
    }

    async fn poison_job_dies_after_exactly_max_attempts_and_healthy_jobs_pass(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        assert_eq!(queue.options().max_attempts, 3);
        queue.enqueue(job("poison", Priority::Normal)).await.unwrap();
        let healthy: Vec<EmailJob> = (0..100).map(|i| job(&format!("ok-{i}"), Priority::Normal)).collect();
        queue.enqueue_bulk(healthy).await.unwrap();

        let poison_runs: Arc<Mutex<Vec<(Instant, u32)>>> = Arc::default();
        let ok = Arc::new(AtomicUsize::new(0));
        let cured = Arc::new(AtomicBool::new(false));
        let (p, o, c) = (poison_runs.clone(), ok.clone(), cured.clone());
        let worker = spawn_worker(&queue, 4, move |job: EmailJob| {
            let result = if job.id.as_str() == "poison" && !c.load(Ordering::SeqCst) {
                p.lock().unwrap().push((Instant::now(), job.attempts));
                Err(JobError::retry("554 mailbox unavailable"))
            } else {
                o.fetch_add(1, Ordering::SeqCst);
                Ok(())
            };
            async move { result }
        });
        wait_stats(&queue, "the poison job to die", Duration::from_secs(20), |s| s.dead == 1).await;
        wait_for("healthy jobs", Duration::from_secs(20), || ok.load(Ordering::SeqCst) == 100).await;
        // Give a wrongly scheduled extra attempt time to show up.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let runs = poison_runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 3, "attempts: {runs:?}");
        assert_eq!(runs.iter().map(|r| r.1).collect::<Vec<_>>(), [0, 1, 2]);
        // Equal jitter: the n-th retry waits between base*2^(n-1)/2 and base*2^(n-1).
        assert!(runs[1].0 - runs[0].0 >= Duration::from_millis(100), "{runs:?}");
        assert!(runs[2].0 - runs[1].0 >= Duration::from_millis(200), "{runs:?}");

        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, "failed");
        assert_eq!(dead[0].error, "554 mailbox unavailable");
        let dead_job = dead[0].job.clone().unwrap();
        assert_eq!(dead_job.id.as_str(), "poison");
        assert_eq!(dead_job.attempts, 3);
        assert_eq!(dead_job.last_error.as_deref(), Some("554 mailbox unavailable"));

        // Replay moves it back with its attempts reset.
        cured.store(true, Ordering::SeqCst);
        assert_eq!(queue.replay(10).await.unwrap(), 1);
        wait_for("the replayed job", Duration::from_secs(10), || ok.load(Ordering::SeqCst) == 101).await;
        let report = worker.shutdown().await.unwrap();
        assert_eq!((report.retried, report.dead, report.completed), (2, 1, 101));
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 101));
    }

    async fn a_second_burial_of_a_dead_id_keeps_both_records(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        queue.enqueue(job("malformed-twice", Priority::Normal)).await.unwrap();
        let worker = spawn_worker(&queue, 1, |_job| async { Err(JobError::permanent("550 no such user")) });
        wait_stats(&queue, "the first burial", Duration::from_secs(10), |s| s.dead == 1).await;
        // Another service pushes the same id again, long expired: it dies too. (An id that
        // starts like the names of unreadable payloads is a job id all the same.)
        push_raw(&redis, &queue, Priority::Normal, [documented_json("malformed-twice", "normal", 1)]).await;
        wait_stats(&queue, "the second burial", Duration::from_secs(10), |s| s.dead == 2).await;
        worker.shutdown().await.unwrap();
        let mut dead = queue.dead_jobs(10).await.unwrap();
        dead.sort_by(|a, b| a.dead_id.cmp(&b.dead_id));
        assert_eq!(dead[0].dead_id, "malformed-twice");
        assert_eq!(dead[0].reason, "permanent");
        assert!(dead[0].is_replayable());
        assert!(dead[1].dead_id.starts_with("malformed-twice#again-"), "{}", dead[1].dead_id);
        assert_eq!(dead[1].reason, "expired");
        assert!(!dead[1].is_replayable());
        assert_eq!(queue.replay(10).await.unwrap(), 1);
    }

    async fn permanent_failures_and_malformed_payloads_go_to_the_dead_set(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        queue.enqueue(job("bounce", Priority::Low)).await.unwrap();
        let mut conn = redis.connection().await.unwrap();
        let _: () = redis::cmd("LPUSH").arg(queue.list_key(Priority::High)).arg("not json").query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("LPUSH").arg(queue.list_key(Priority::High)).arg(r#"{"id":"no-recipients"}"#).query_async(&mut conn).await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let worker = spawn_worker(&queue, 2, move |_job| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(JobError::permanent("550 no such user")) }
        });
        wait_stats(&queue, "three dead jobs", Duration::from_secs(10), |s| s.dead == 3).await;
        worker.shutdown().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let mut reasons: Vec<(String, String)> = queue
            .dead_jobs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.reason, d.raw.unwrap_or_else(|| d.job.unwrap().id.to_string())))
            .collect();
        reasons.sort();
        assert_eq!(reasons[0], ("malformed".to_string(), "not json".to_string()));
        assert_eq!(reasons[1].0, "malformed");
        assert!(reasons[1].1.contains("no-recipients"), "{reasons:?}");
        assert_eq!(reasons[2], ("permanent".to_string(), "bounce".to_string()));
        assert_eq!(queue.dead_jobs(usize::MAX).await.unwrap().len(), 3);
        assert_eq!(queue.clean(CleanTarget::Dead, Duration::ZERO, 0).await.unwrap(), 3);
        assert_eq!(queue.stats().await.unwrap().dead, 0);
    }

    async fn delayed_jobs_run_no_earlier_than_scheduled(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        let at = SystemTime::now() + Duration::from_millis(800);
        let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        assert_eq!(queue.enqueue_at(job("later", Priority::High), at).await.unwrap(), Enqueued::New);
        queue.enqueue_in(job("soon", Priority::Low), Duration::from_millis(300)).await.unwrap();
        queue.enqueue(job("now", Priority::Low)).await.unwrap();
        let stats = queue.stats().await.unwrap();
        assert_eq!((stats.delayed, stats.waiting()), (2, 1));

        let ran: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let r = ran.clone();
        let worker = spawn_worker(&queue, 2, move |job: EmailJob| {
            r.lock().unwrap().push((job.id.to_string(), now_ms()));
            async { Ok(()) }
        });
        wait_for("three jobs", Duration::from_secs(10), || ran.lock().unwrap().len() == 3).await;
        worker.shutdown().await.unwrap();
        let ran = ran.lock().unwrap().clone();
        assert_eq!(ran.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["now", "soon", "later"]);
        assert!(ran[2].1 >= at_ms, "ran at {} before {at_ms}", ran[2].1);
        assert!(ran[1].1 >= at_ms - 500);
    }

    async fn a_time_in_the_past_means_now(redis) {
        // Past the job TTL (24 h) and at the epoch: each is due at once and runs, stamped with
        // the enqueue time, instead of being buried as expired or never aging.
        let queue = redis.email_queue().unwrap();
        let before = now_ms();
        let day_ago = SystemTime::now() - Duration::from_secs(25 * 3600);
        queue.enqueue_at(job("yesterday", Priority::Normal), day_ago).await.unwrap();
        queue.enqueue_at(job("epoch", Priority::Normal), UNIX_EPOCH).await.unwrap();
        let seen: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let s = seen.clone();
        let worker = spawn_worker(&queue, 1, move |job: EmailJob| {
            s.lock().unwrap().push((job.id.to_string(), job.scheduled_at));
            async { Ok(()) }
        });
        wait_for("both jobs", Duration::from_secs(10), || seen.lock().unwrap().len() == 2).await;
        assert_eq!(worker.shutdown().await.unwrap().completed, 2);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["yesterday", "epoch"]);
        assert!(seen.iter().all(|s| s.1 >= before), "{seen:?} stamped before {before}");
        assert_eq!(queue.stats().await.unwrap().dead, 0);

        let far = queue.enqueue_in(job("far", Priority::Normal), Duration::MAX).await;
        assert!(matches!(far, Err(Error::InvalidInput { what: "delay", .. })), "{far:?}");
        let mut options = worker_options(1);
        options.shutdown_timeout = Duration::MAX;
        let refused = queue.worker(handler_fn(|_job| async { Ok(()) })).with_options(options);
        assert!(matches!(refused, Err(Error::InvalidInput { what: "shutdown timeout", .. })), "{refused:?}");
    }

    async fn an_enqueued_job_starts_afresh_and_at_most_a_year_ahead(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        // A job carried over from an earlier life (its attempts spent, an error on it).
        let mut spent = job("spent", Priority::Normal);
        spent.attempts = 3;
        spent.last_error = Some("554 earlier".into());
        queue.enqueue(spent).await.unwrap();
        let mut conn = redis.connection().await.unwrap();
        let stored: Vec<String> = redis::cmd("LRANGE").arg(queue.list_key(Priority::Normal)).arg(0).arg(-1).query_async(&mut conn).await.unwrap();
        let stored: serde_json::Value = serde_json::from_str(&stored[0]).unwrap();
        assert_eq!(stored["attempts"], 0);
        assert!(stored.get("lastError").is_none(), "{stored}");
        // One year ahead at most, as for enqueue_in and for pushed jobs.
        let year = aether_redis::email_queue::MAX_OPTION_DURATION;
        for at in [SystemTime::now() + year * 2, UNIX_EPOCH + Duration::from_millis(i64::MAX as u64)] {
            assert!(matches!(
                queue.enqueue_at(job("far", Priority::Normal), at).await,
                Err(Error::InvalidInput { what: "scheduled time", .. })
            ));
        }
        let near = SystemTime::now() + year - Duration::from_secs(60);
        assert_eq!(queue.enqueue_at(job("near", Priority::Normal), near).await.unwrap(), Enqueued::New);
        assert_eq!(queue.stats().await.unwrap().delayed, 1);
    }

    async fn enqueue_is_idempotent_by_id_even_under_concurrency(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        assert_eq!(queue.enqueue(job("once", Priority::Normal)).await.unwrap(), Enqueued::New);
        assert_eq!(queue.enqueue(job("once", Priority::High)).await.unwrap(), Enqueued::Duplicate);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let q = queue.clone();
            tasks.push(tokio::spawn(async move { q.enqueue(job("race", Priority::Low)).await.unwrap() }));
        }
        let mut new = 0;
        for t in tasks {
            if t.await.unwrap() == Enqueued::New {
                new += 1;
            }
        }
        assert_eq!(new, 1, "exactly one concurrent enqueue wins");
        let bulk = queue
            .enqueue_bulk(vec![job("b1", Priority::Low), job("once", Priority::Low), job("b1", Priority::Low)])
            .await
            .unwrap();
        assert_eq!(bulk, [Enqueued::New, Enqueued::Duplicate, Enqueued::Duplicate]);
        let stats = queue.stats().await.unwrap();
        assert_eq!((stats.high, stats.normal, stats.low), (0, 1, 2));

        // Known while retained as completed; forgotten once cleaned.
        let worker = spawn_worker(&queue, 2, |_job| async { Ok(()) });
        wait_stats(&queue, "three completed", Duration::from_secs(10), |s| s.completed == 3).await;
        worker.shutdown().await.unwrap();
        assert_eq!(queue.enqueue(job("once", Priority::Normal)).await.unwrap(), Enqueued::Duplicate);
        assert_eq!(queue.clean(CleanTarget::Completed, Duration::ZERO, 0).await.unwrap(), 3);
        assert_eq!(queue.enqueue(job("once", Priority::Normal)).await.unwrap(), Enqueued::New);
    }

    async fn concurrent_enqueues_land_once_each_with_their_own_results(redis) {
        // 200 producers on one handle, two per id: however they are batched into script calls,
        // each gets its own answer and each id lands once.
        let queue = fast(&redis.email_queue_named("burst").unwrap());
        let priorities = [Priority::High, Priority::Normal, Priority::Low];
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let q = queue.clone();
                let id = format!("burst-{}", i % 100);
                let priority = priorities[i % 100 % 3];
                tokio::spawn(async move {
                    let job = job(&id, priority);
                    let outcome = if i % 100 < 10 {
                        q.enqueue_in(job, Duration::from_secs(3600)).await
                    } else {
                        q.enqueue(job).await
                    };
                    (id, outcome.unwrap())
                })
            })
            .collect();
        let mut new_per_id: HashMap<String, usize> = HashMap::new();
        for task in tasks {
            let (id, outcome) = task.await.unwrap();
            *new_per_id.entry(id).or_default() += usize::from(outcome == Enqueued::New);
        }
        assert_eq!(new_per_id.len(), 100);
        assert!(new_per_id.values().all(|n| *n == 1), "{new_per_id:?}");
        let waiting = waiting_ids(&redis, &queue).await;
        assert_eq!(waiting.len(), 90);
        assert!(waiting.values().all(|n| *n == 1), "{waiting:?}");
        let stats = queue.stats().await.unwrap();
        assert_eq!((stats.high, stats.normal, stats.low, stats.delayed), (30, 30, 30, 10));
    }

    async fn invalid_jobs_are_rejected_before_anything_is_sent(redis) {
        let queue = redis.email_queue().unwrap();
        let no_rcpt = EmailJob::new(Vec::<String>::new(), "a@example.com", "s", "b").unwrap();
        assert!(matches!(queue.enqueue(no_rcpt).await, Err(Error::InvalidInput { what: "to", .. })));
        let huge = EmailJob::new(["a@example.com"], "a@example.com", "s", "x".repeat(2 << 20)).unwrap();
        assert!(matches!(queue.enqueue(huge).await, Err(Error::InvalidInput { what: "body", .. })));
        let bulk = vec![job("fine", Priority::Low), EmailJob::new(["a@example.com"], "", "s", "b").unwrap()];
        assert!(matches!(queue.enqueue_bulk(bulk).await, Err(Error::InvalidInput { what: "from", .. })));
        assert_eq!(queue.stats().await.unwrap().waiting(), 0, "a rejected bulk enqueue adds nothing");

        // An extra member named like a documented one would be written twice, and the script
        // and the worker's decoder would disagree on which counts.
        let mut twice = job("twice", Priority::Normal);
        twice.extra.insert("id".into(), serde_json::json!("other"));
        assert!(matches!(queue.enqueue(twice).await, Err(Error::InvalidInput { what: "extra", .. })));
        let mut foreign = job("foreign", Priority::Normal);
        foreign.extra.insert("tenant".into(), serde_json::json!("t1"));
        assert_eq!(queue.enqueue(foreign).await.unwrap(), Enqueued::New, "other extra names are fine");

        // Metadata the worker could not decode, or would keep copying through every call.
        let nested = |levels: usize| {
            (0..levels).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
        };
        let deep = job("deep", Priority::Normal).with_metadata("x", nested(200));
        assert!(matches!(queue.enqueue(deep).await, Err(Error::InvalidInput { what: "metadata", .. })));
        let bulky = job("bulky", Priority::Normal).with_metadata("x", serde_json::json!("m".repeat(2 << 20)));
        assert!(matches!(queue.enqueue(bulky).await, Err(Error::InvalidInput { what: "metadata", .. })));
        let fine = job("nested-fine", Priority::Normal).with_metadata("x", nested(20));
        assert_eq!(queue.enqueue(fine).await.unwrap(), Enqueued::New);
        assert_eq!(queue.stats().await.unwrap().waiting(), 2, "only the valid jobs were added");
        assert!(matches!(redis.email_queue_named("a:b"), Err(Error::InvalidInput { .. })));
        assert!(matches!(redis.email_queue_named("{x}"), Err(Error::InvalidInput { .. })));
    }

    async fn jobs_waiting_longer_than_their_ttl_expire_to_the_dead_set(redis) {
        let config = redis.config().to_builder().ttl(Keyspace::EmailQueue, Duration::from_millis(800)).build().unwrap();
        let short = Redis::connect(config).await.unwrap();
        let queue = fast(&short.email_queue().unwrap());
        queue.enqueue(job("stale", Priority::Normal)).await.unwrap();
        let mut conn = short.connection().await.unwrap();
        let pttl: i64 = redis::cmd("PTTL").arg(queue.list_key(Priority::Normal)).query_async(&mut conn).await.unwrap();
        assert_eq!(pttl, -1, "queue keys never expire while they hold jobs");
        // As if an earlier delivery of it had been recovered: its count must go with the job.
        let deliveries = queue.list_key(Priority::Normal).replace(":normal", ":deliveries");
        let _: () = redis::cmd("HSET").arg(&deliveries).arg("stale").arg(1).query_async(&mut conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        queue.enqueue(job("fresh", Priority::Normal)).await.unwrap();
        let (handled, worker) = recording_worker(&queue, 1);
        wait_for("the fresh job", Duration::from_secs(10), || handled.lock().unwrap().len() == 1).await;
        worker.shutdown().await.unwrap();
        assert_eq!(handled.lock().unwrap().as_slice(), ["fresh"]);
        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, "expired");
        assert_eq!(dead[0].job.as_ref().unwrap().id.as_str(), "stale");
        let left: bool = redis::cmd("HEXISTS").arg(&deliveries).arg("stale").query_async(&mut conn).await.unwrap();
        assert!(!left, "an expired job left its delivery count behind");
    }

    async fn a_lease_in_the_earlier_layout_is_still_recovered(redis) {
        // Leases written before the payloads hash held `<token>|<priority>|<job JSON>`: a job
        // leased by a worker of that version comes back when its lease expires.
        let queue = fast(&redis.email_queue_named("oldlease").unwrap());
        let member = |m: &str| queue.list_key(Priority::Normal).replace(":normal", &format!(":{m}"));
        let mut conn = redis.connection().await.unwrap();
        let payload = documented_json("old-1", "high", now_ms());
        let _: () = redis::cmd("HSET").arg(member("leases")).arg("old-1").arg(format!("w.n.1|high|{payload}")).query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("ZADD").arg(member("active")).arg(now_ms() - 1000).arg("old-1").query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("SADD").arg(member("ids")).arg("old-1").query_async(&mut conn).await.unwrap();
        let (handled, worker) = recording_worker(&queue, 1);
        wait_for("the recovered job", Duration::from_secs(10), || handled.lock().unwrap().len() == 1).await;
        worker.shutdown().await.unwrap();
        assert_eq!(handled.lock().unwrap().as_slice(), ["old-1"]);
        let dead = queue.dead_jobs(10).await.unwrap();
        assert!(dead.is_empty(), "{dead:?}");
        assert_eq!(lease_fields(&redis, &queue).await, (0, 0, 0));
    }

    async fn an_expired_copy_of_a_running_job_is_filed_as_a_duplicate(redis) {
        // A raw copy of an id that is being processed, too old to run: buried as `expired`
        // under a dead id of its own, so that replay cannot send the running job's mail again,
        // and the running copy keeps its delivery count.
        let config = redis.config().to_builder().ttl(Keyspace::EmailQueue, Duration::from_millis(800)).build().unwrap();
        let short = Redis::connect(config).await.unwrap();
        let queue = fast(&short.email_queue_named("expdup").unwrap());
        let deliveries = queue.list_key(Priority::Normal).replace(":normal", ":deliveries");
        let mut conn = short.connection().await.unwrap();
        // A first delivery is counted only while some other job's count exists (a recovered
        // job, say): this one makes x's lease carry a count that the stale copy must not drop.
        let _: () = redis::cmd("HSET").arg(&deliveries).arg("recovered-elsewhere").arg(1).query_async(&mut conn).await.unwrap();
        queue.enqueue(job("x", Priority::Normal)).await.unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (s, r) = (started.clone(), release.clone());
        let worker = spawn_worker(&queue, 2, move |_job| {
            s.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            async move {
                r.notified().await;
                Ok(())
            }
        });
        wait_for("x to start", Duration::from_secs(10), || started.load(Ordering::SeqCst) == 1).await;
        let stale = documented_json("x", "normal", now_ms() - 5_000);
        let _: () = redis::cmd("LPUSH").arg(queue.list_key(Priority::Normal)).arg(stale).query_async(&mut conn).await.unwrap();
        wait_stats(&queue, "the stale copy", Duration::from_secs(10), |s| s.dead == 1).await;
        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!(dead[0].reason, "expired");
        assert!(dead[0].dead_id.starts_with("x#duplicate-"), "{}", dead[0].dead_id);
        assert!(!dead[0].is_replayable());
        let count: Option<String> = redis::cmd("HGET").arg(&deliveries).arg("x").query_async(&mut conn).await.unwrap();
        assert_eq!(count.as_deref(), Some("1"), "the running copy lost its delivery count");
        release.notify_waiters();
        wait_stats(&queue, "x completed", Duration::from_secs(10), |s| s.completed == 1).await;
        worker.shutdown().await.unwrap();
        assert_eq!(queue.replay(10).await.unwrap(), 0);
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    async fn aging_serves_a_starved_low_job(redis) {
        let mut o = fast(&redis.email_queue().unwrap()).options().clone();
        o.aging = Some(Duration::from_millis(300));
        let queue = redis.email_queue().unwrap().with_options(o).unwrap();
        queue.enqueue(job("starved", Priority::Low)).await.unwrap();
        let high: Vec<EmailJob> = (0..300).map(|i| job(&format!("h{i}"), Priority::High)).collect();
        queue.enqueue_bulk(high).await.unwrap();
        let order: Arc<Mutex<Vec<String>>> = Arc::default();
        let r = order.clone();
        let worker = spawn_worker(&queue, 1, move |job: EmailJob| {
            r.lock().unwrap().push(job.id.to_string());
            async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }
        });
        wait_for("all jobs", Duration::from_secs(30), || order.lock().unwrap().len() == 301).await;
        worker.shutdown().await.unwrap();
        let order = order.lock().unwrap().clone();
        let pos = order.iter().position(|id| id == "starved").unwrap();
        assert!(pos < 250, "the low job waited behind {pos} high jobs");
    }

    async fn aged_jobs_alternate_with_higher_priorities_instead_of_taking_over(redis) {
        let mut o = fast(&redis.email_queue().unwrap()).options().clone();
        o.aging = Some(Duration::from_millis(300));
        let queue = redis.email_queue().unwrap().with_options(o).unwrap();
        // An old backlog of low mail, and fresh high mail arriving after it aged: the two
        // alternate, and the backlog's rest follows.
        let low: Vec<String> = (0..20).map(|i| format!("low{i:02}")).collect();
        queue.enqueue_bulk(low.iter().map(|id| job(id, Priority::Low)).collect()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let high: Vec<String> = (0..5).map(|i| format!("high{i}")).collect();
        queue.enqueue_bulk(high.iter().map(|id| job(id, Priority::High)).collect()).await.unwrap();
        let (order, worker) = recording_worker(&queue, 1);
        wait_for("all jobs", Duration::from_secs(10), || order.lock().unwrap().len() == 25).await;
        worker.shutdown().await.unwrap();
        let mut expected = Vec::new();
        for i in 0..5 {
            expected.push(low[i].clone());
            expected.push(high[i].clone());
        }
        expected.extend_from_slice(&low[5..]);
        assert_eq!(*order.lock().unwrap(), expected);

        // Among aged heads the one that waited longest goes first, whatever its priority.
        queue.enqueue(job("old-low", Priority::Low)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        queue.enqueue(job("old-normal", Priority::Normal)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        queue.enqueue_bulk(vec![job("h0", Priority::High), job("h1", Priority::High)]).await.unwrap();
        let (order, worker) = recording_worker(&queue, 1);
        wait_for("four jobs", Duration::from_secs(10), || order.lock().unwrap().len() == 4).await;
        worker.shutdown().await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["old-low", "h0", "old-normal", "h1"]);

        // The same alternation within one call that leases many jobs (a prefetch).
        queue.enqueue_bulk(low.iter().map(|id| job(&format!("p-{id}"), Priority::Low)).collect()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        queue.enqueue_bulk(high.iter().map(|id| job(&format!("p-{id}"), Priority::High)).collect()).await.unwrap();
        let mut options = worker_options(1);
        options.prefetch = 30;
        let order: Arc<Mutex<Vec<String>>> = Arc::default();
        let o = order.clone();
        let worker = spawn_worker_with(&queue, options, move |job: EmailJob| {
            o.lock().unwrap().push(job.id.to_string());
            async { Ok(()) }
        });
        wait_for("all jobs", Duration::from_secs(10), || order.lock().unwrap().len() == 25).await;
        worker.shutdown().await.unwrap();
        let prefixed: Vec<String> = expected.iter().map(|id| format!("p-{id}")).collect();
        assert_eq!(*order.lock().unwrap(), prefixed);
    }

    async fn prefetched_jobs_stay_leased_and_go_back_in_order_at_shutdown(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        let ids: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
        queue.enqueue_bulk(ids.iter().map(|id| job(id, Priority::Normal)).collect()).await.unwrap();
        let started: Arc<Mutex<Vec<String>>> = Arc::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (s, g) = (started.clone(), gate.clone());
        let mut options = worker_options(1);
        options.prefetch = 5;
        let worker = spawn_worker_with(&queue, options, move |job: EmailJob| {
            s.lock().unwrap().push(job.id.to_string());
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(())
            }
        });
        wait_for("the first job", Duration::from_secs(10), || started.lock().unwrap().len() == 1).await;
        // One running and five buffered, all leased: a crash now would redeliver all six.
        let (waiting, active, ..) = counts(&queue).await;
        assert_eq!((waiting, active), (14, 6));
        // Buffered leases are extended like running ones: still held well past the visibility
        // timeout (1 s).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (waiting, active, ..) = counts(&queue).await;
        assert_eq!((waiting, active), (14, 6));

        let stop = tokio::spawn(worker.shutdown());
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.notify_one();
        let report = stop.await.unwrap().unwrap();
        assert_eq!((report.completed, report.released), (1, 5));
        assert_eq!(started.lock().unwrap().as_slice(), ["p00"]);
        let (waiting, active, ..) = counts(&queue).await;
        assert_eq!((waiting, active), (19, 0));

        // The buffered jobs went back to the head of the list: FIFO order is intact.
        let mut options = worker_options(1);
        options.prefetch = 5;
        let order: Arc<Mutex<Vec<String>>> = Arc::default();
        let o = order.clone();
        let worker = spawn_worker_with(&queue, options, move |job: EmailJob| {
            o.lock().unwrap().push(job.id.to_string());
            async { Ok(()) }
        });
        wait_for("the rest", Duration::from_secs(10), || order.lock().unwrap().len() == 19).await;
        let report = worker.shutdown().await.unwrap();
        assert_eq!(report.completed, 19);
        assert_eq!(order.lock().unwrap().as_slice(), &ids[1..]);
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 20));
    }

    async fn a_finished_job_waiting_for_its_ack_keeps_its_lease(redis) {
        // Two slots and a prefetch of two: A finishes at once, but its ack waits for the next
        // call, which comes only once the buffer is empty, i.e. after B and C (3 s each) free a
        // slot. Meanwhile A's lease must be extended, or the standby worker runs A again.
        let queue = fast(&redis.email_queue().unwrap());
        let ids = ["A", "B", "C", "D"];
        queue.enqueue_bulk(ids.iter().map(|id| job(id, Priority::Normal)).collect()).await.unwrap();
        let runs: Arc<Mutex<Vec<String>>> = Arc::default();
        let handler = |runs: Arc<Mutex<Vec<String>>>| {
            move |job: EmailJob| {
                runs.lock().unwrap().push(job.id.to_string());
                let long = matches!(job.id.as_str(), "B" | "C");
                async move {
                    if long {
                        tokio::time::sleep(Duration::from_millis(3000)).await;
                    }
                    Ok(())
                }
            }
        };
        let mut options = worker_options(2);
        options.prefetch = 2;
        let first = spawn_worker_with(&queue, options, handler(runs.clone()));
        wait_for("A, B and C", Duration::from_secs(10), || runs.lock().unwrap().len() >= 3).await;
        let standby = spawn_worker_with(&queue, worker_options(1), handler(runs.clone()));
        wait_stats(&queue, "all four acknowledged", Duration::from_secs(20), |s| s.completed == 4).await;
        let (first, standby) = (first.shutdown().await.unwrap(), standby.shutdown().await.unwrap());
        let mut handled = runs.lock().unwrap().clone();
        handled.sort();
        assert_eq!(handled, ids, "a job ran twice or never");
        assert_eq!((first.completed + standby.completed, first.lost_leases), (4, 0));
    }

    async fn a_lingering_worker_collects_a_trickle_into_one_call(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        let starts: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let s = starts.clone();
        let mut options = worker_options(1);
        options.prefetch = 9;
        options.linger = Duration::from_millis(600);
        let worker = spawn_worker_with(&queue, options, move |job: EmailJob| {
            s.lock().unwrap().push((job.id.to_string(), Instant::now()));
            async { Ok(()) }
        });
        queue.enqueue(job("t0", Priority::Normal)).await.unwrap();
        wait_for("the first job", Duration::from_secs(10), || starts.lock().unwrap().len() == 1).await;
        // The fetch that found t0 came back short, so the next one lingers: a trickle enqueued
        // meanwhile arrives with one call.
        for i in 1..6 {
            queue.enqueue(job(&format!("t{i}"), Priority::Normal)).await.unwrap();
        }
        wait_for("six jobs", Duration::from_secs(10), || starts.lock().unwrap().len() == 6).await;
        let starts = starts.lock().unwrap().clone();
        let ids: Vec<&str> = starts.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["t0", "t1", "t2", "t3", "t4", "t5"]);
        let (t0, t1) = (starts[0].1, starts[1].1);
        assert!(t1.duration_since(t0) >= Duration::from_millis(500), "{:?}", t1 - t0);
        assert!(starts[1..].iter().all(|(_, at)| at.duration_since(t1) < Duration::from_millis(300)));
        let report = worker.shutdown().await.unwrap();
        assert_eq!(report.completed, 6);
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 6));

        let mut too_long = worker_options(1);
        too_long.linger = aether_redis::email_queue::MAX_LINGER + Duration::from_millis(1);
        let refused = queue.worker(handler_fn(|_job| async { Ok(()) })).with_options(too_long);
        assert!(matches!(refused, Err(Error::InvalidInput { .. })), "{refused:?}");
    }

    async fn prefetching_workers_handle_every_job_exactly_once(redis) {
        const JOBS: usize = 2_000;
        let queue = redis.email_queue().unwrap();
        let mut too_much = worker_options(1);
        too_much.prefetch = aether_redis::email_queue::MAX_PREFETCH + 1;
        let refused = queue.worker(handler_fn(|_job| async { Ok(()) })).with_options(too_much);
        assert!(matches!(refused, Err(Error::InvalidInput { .. })), "{refused:?}");
        let jobs: Vec<EmailJob> = (0..JOBS).map(|i| job(&format!("f{i:04}"), Priority::ALL[i % 3])).collect();
        queue.enqueue_bulk(jobs).await.unwrap();
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let mut workers = Vec::new();
        for _ in 0..4 {
            let mut options = worker_options(2);
            options.prefetch = 8;
            let seen = seen.clone();
            workers.push(spawn_worker_with(&queue, options, move |job: EmailJob| {
                *seen.lock().unwrap().entry(job.id.to_string()).or_insert(0) += 1;
                async { Ok(()) }
            }));
        }
        wait_for("all jobs", Duration::from_secs(60), || seen.lock().unwrap().len() == JOBS).await;
        let mut total = crate::WorkerTotals::default();
        for w in workers {
            total.add(w.shutdown().await.unwrap());
        }
        assert_eq!((total.completed, total.lost), (JOBS as u64, 0));
        assert!(seen.lock().unwrap().values().all(|&n| n == 1), "some job was handled twice");
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 1000));
    }

    async fn an_aged_job_taken_mid_batch_leaves_the_higher_list_in_order(redis) {
        let mut o = fast(&redis.email_queue().unwrap()).options().clone();
        o.aging = Some(Duration::from_millis(300));
        let queue = redis.email_queue().unwrap().with_options(o).unwrap();
        queue.enqueue(job("aged", Priority::Low)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let normal: Vec<String> = (0..20).map(|i| format!("n{i:02}")).collect();
        queue.enqueue_bulk(normal.iter().map(|id| job(id, Priority::Normal)).collect()).await.unwrap();
        let started: Arc<Mutex<Vec<String>>> = Arc::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (s, g) = (started.clone(), gate.clone());
        // One call leases four jobs: the run popped from `normal` goes back when the aged `low`
        // head is found, then three `normal` jobs follow it.
        let worker = spawn_worker(&queue, 4, move |job: EmailJob| {
            s.lock().unwrap().push(job.id.to_string());
            let g = g.clone();
            async move { g.notified().await; Ok(()) }
        });
        wait_for("four jobs", Duration::from_secs(10), || started.lock().unwrap().len() == 4).await;
        let mut first: Vec<String> = started.lock().unwrap().clone();
        first.sort();
        assert_eq!(first, ["aged", "n00", "n01", "n02"]);
        let mut conn = redis.connection().await.unwrap();
        let mut waiting: Vec<String> = redis::cmd("LRANGE")
            .arg(queue.list_key(Priority::Normal))
            .arg(0)
            .arg(-1)
            .query_async::<Vec<String>>(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|payload| serde_json::from_str::<EmailJob>(&payload).unwrap().id.to_string())
            .collect();
        // LPUSH puts the oldest at the right end.
        waiting.reverse();
        assert_eq!(waiting, &normal[3..]);
        let stop = tokio::spawn(worker.shutdown());
        gate.notify_waiters();
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_waiters();
        stop.await.unwrap().unwrap();
    }

    async fn long_jobs_extend_their_lease(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        queue.enqueue(job("slow", Priority::Normal)).await.unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..2 {
            let r = runs.clone();
            workers.push(spawn_worker(&queue, 1, move |_job| {
                r.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(2600)).await;
                    Ok(())
                }
            }));
        }
        wait_stats(&queue, "completion", Duration::from_secs(10), |s| s.completed == 1).await;
        let mut completed = 0;
        for w in workers {
            completed += w.shutdown().await.unwrap().completed;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "a leased job was handed to a second worker");
        assert_eq!(completed, 1);
    }

    async fn a_long_job_keeps_its_lease_while_short_jobs_flood_the_worker(redis) {
        // Short jobs finish while each fetch is in flight, so the worker always has finished
        // jobs to settle and free slots to fill: lease extension and shutdown must still get
        // their turn. A second worker would take the long job the moment its lease lapsed.
        let queue = fast(&redis.email_queue_named("flood").unwrap());
        queue.enqueue(job("long", Priority::High)).await.unwrap();
        let flood: Vec<EmailJob> = (0..30_000).map(|i| job(&format!("short-{i}"), Priority::Normal)).collect();
        queue.enqueue_bulk(flood).await.unwrap();
        let long_runs = Arc::new(AtomicUsize::new(0));
        let long_done = Arc::new(AtomicUsize::new(0));
        let handler = |runs: Arc<AtomicUsize>, done: Arc<AtomicUsize>| {
            move |job: EmailJob| {
                let long = job.id.as_str() == "long";
                if long {
                    runs.fetch_add(1, Ordering::SeqCst);
                }
                let done = done.clone();
                async move {
                    if long {
                        tokio::time::sleep(Duration::from_millis(3000)).await;
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                }
            }
        };
        let flooded = spawn_worker(&queue, 4, handler(long_runs.clone(), long_done.clone()));
        // The second worker starts once the first holds the long job.
        wait_for("the long job to start", Duration::from_secs(10), || long_runs.load(Ordering::SeqCst) == 1).await;
        let standby = spawn_worker(&queue, 1, handler(long_runs.clone(), long_done.clone()));
        wait_for("the long job to finish", Duration::from_secs(20), || long_done.load(Ordering::SeqCst) >= 1).await;
        let stats = queue.stats().await.unwrap();
        assert!(stats.normal > 0, "the flood ended before the long job did: {stats:?}");
        let stopping = Instant::now();
        flooded.shutdown().await.unwrap();
        standby.shutdown().await.unwrap();
        assert!(stopping.elapsed() < Duration::from_secs(5), "shutdown took {:?}", stopping.elapsed());
        assert_eq!(long_runs.load(Ordering::SeqCst), 1, "the long job's lease lapsed under the flood");
    }

    async fn a_worker_told_to_stop_before_its_first_fetch_leases_nothing(redis) {
        // "Stop fetching": a stop asked for before the worker's first pass must not lease and
        // start a batch on the way out.
        let queue = fast(&redis.email_queue().unwrap());
        let ids: Vec<String> = (0..20).map(|i| format!("s{i:02}")).collect();
        queue.enqueue_bulk(ids.iter().map(|id| job(id, Priority::Normal)).collect()).await.unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let report = queue
            .worker(handler_fn(move |_job| {
                s.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }))
            .with_options(worker_options(8))
            .unwrap()
            .run_until(std::future::ready(()))
            .await
            .unwrap();
        assert_eq!((started.load(Ordering::SeqCst), report.completed, report.released), (0, 0, 0));
        let (waiting, active, ..) = counts(&queue).await;
        assert_eq!((waiting, active), (20, 0));
    }

    async fn graceful_shutdown_loses_nothing(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        let ids: Vec<String> = (0..20).map(|i| format!("g{i:02}")).collect();
        queue.enqueue_bulk(ids.iter().map(|id| job(id, Priority::Normal)).collect()).await.unwrap();

        // 1. In-flight jobs finish within the deadline; the rest is never fetched.
        let started = Arc::new(AtomicUsize::new(0));
        let finished: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, f) = (started.clone(), finished.clone());
        let worker = spawn_worker(&queue, 4, move |job: EmailJob| {
            s.fetch_add(1, Ordering::SeqCst);
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                f.lock().unwrap().push(job.id.to_string());
                Ok(())
            }
        });
        wait_for("four jobs in flight", Duration::from_secs(10), || started.load(Ordering::SeqCst) == 4).await;
        let report = worker.shutdown().await.unwrap();
        let done = finished.lock().unwrap().clone();
        assert_eq!(started.load(Ordering::SeqCst), done.len());
        assert_eq!(report.completed, done.len() as u64);
        let (waiting, active, ..) = counts(&queue).await;
        assert_eq!((active, waiting), (0, 20 - done.len() as u64));

        // 2. Jobs still running at the deadline go back to the head of their list at once.
        let mut options = worker_options(4);
        options.shutdown_timeout = Duration::from_millis(300);
        let started2 = Arc::new(AtomicUsize::new(0));
        let s2 = started2.clone();
        let worker = spawn_worker_with(&queue, options, move |_job| {
            s2.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        });
        wait_for("four stuck jobs", Duration::from_secs(10), || started2.load(Ordering::SeqCst) == 4).await;
        let report = worker.shutdown().await.unwrap();
        assert_eq!(report.released, 4);
        let (waiting, active, ..) = counts(&queue).await;
        assert_eq!((active, waiting), (0, 20 - done.len() as u64));
        // A released first delivery is undone: no count (not one of 0 or -1), no leased payload.
        assert_eq!(lease_fields(&redis, &queue).await, (0, 0, 0));

        // 3. Everything is still there: a new worker handles exactly the rest.
        let (rest, worker) = recording_worker(&queue, 4);
        wait_for("the rest", Duration::from_secs(10), || rest.lock().unwrap().len() + done.len() == 20).await;
        worker.shutdown().await.unwrap();
        let mut all: Vec<String> = done.into_iter().chain(rest.lock().unwrap().iter().cloned()).collect();
        all.sort();
        assert_eq!(all, ids);
    }

    async fn foreign_payloads_are_read_as_the_decoder_reads_them(redis) {
        // The fetch script reads `id` and `scheduledAt` without decoding when it can do so
        // exactly; nested keys of the same names and other field orders must not fool it.
        let queue = fast(&redis.email_queue().unwrap());
        let now = now_ms();
        let day_ago = now - 25 * 3600 * 1000;
        let rest = r#""to":["grace@example.com"],"from":"noreply@example.com","subject":"S","body":"B""#;
        let payloads = [
            // A nested `scheduledAt` before the top-level one.
            format!(r#"{{"id":"nested-first","metadata":{{"scheduledAt":1}},{rest},"scheduledAt":{now}}}"#),
            // A nested `scheduledAt` (and `id`) after the top-level one.
            format!(r#"{{"id":"nested-after",{rest},"scheduledAt":{now},"metadata":{{"scheduledAt":1,"id":"x"}}}}"#),
            // A brace inside a string before `scheduledAt`.
            format!(r#"{{"id":"brace-in-subject","to":["a@example.com"],"from":"f@example.com","subject":"{{x","body":"B","scheduledAt":{now}}}"#),
            // `id` not first.
            format!(r#"{{{rest},"id":"id-last","scheduledAt":{now}}}"#),
            // The fast path itself: older than the 24 h job TTL.
            format!(r#"{{"id":"stale",{rest},"scheduledAt":{day_ago},"metadata":{{}}}}"#),
            // `scheduledAt` hidden in a nested object only, i.e. absent: never expires.
            format!(r#"{{"id":"only-nested",{rest},"metadata":{{"scheduledAt":{day_ago}}}}}"#),
            // ... or inside a longer top-level key, behind an escaped quote: absent too.
            format!(r#"{{"id":"escaped-key",{rest},"x \"scheduledAt":{day_ago}}}"#),
            // A space before the colon: present, stale, so expired.
            format!(r#"{{"id":"spaced-colon",{rest},"scheduledAt" : {day_ago}}}"#),
            // The key spelled with an escape: present to a decoder, stale, so expired.
            format!(r#"{{"id":"escaped-letter",{rest},"sch\u0065duledAt":{day_ago}}}"#),
        ];
        push_raw(&redis, &queue, Priority::Normal, &payloads).await;
        let (handled, worker) = recording_worker(&queue, 1);
        wait_stats(&queue, "six handled and three dead", Duration::from_secs(10), |s| {
            s.completed == 6 && s.dead == 3
        })
        .await;
        worker.shutdown().await.unwrap();
        assert_eq!(
            handled.lock().unwrap().as_slice(),
            [
                "nested-first",
                "nested-after",
                "brace-in-subject",
                "id-last",
                "only-nested",
                "escaped-key"
            ]
        );
        let mut dead: Vec<(String, String)> =
            queue.dead_jobs(10).await.unwrap().into_iter().map(|d| (d.dead_id, d.reason)).collect();
        dead.sort();
        assert_eq!(
            dead,
            [
                ("escaped-letter".to_string(), "expired".to_string()),
                ("spaced-colon".into(), "expired".into()),
                ("stale".into(), "expired".into())
            ]
        );
    }

    async fn a_pushed_job_nested_to_the_decoders_limit_stays_replayable_when_it_dies(redis) {
        // Embedded in its dead record, the job would be one level past what decoders read.
        let queue = fast(&redis.email_queue().unwrap());
        let payload = |levels: usize| {
            format!(
                r#"{{"id":"deep","to":["a@example.com"],"from":"f@example.com","subject":"s","body":"b","priority":"normal","attempts":0,"scheduledAt":{},"metadata":{{"x":{}1{}}}}}"#,
                now_ms(),
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        let deepest = (1..200).take_while(|&n| serde_json::from_str::<EmailJob>(&payload(n)).is_ok()).last().unwrap();
        push_raw(&redis, &queue, Priority::Normal, [payload(deepest)]).await;
        let worker = spawn_worker(&queue, 1, |_job| async { Err(JobError::permanent("550")) });
        wait_stats(&queue, "the burial", Duration::from_secs(10), |s| s.dead == 1).await;
        worker.shutdown().await.unwrap();
        let dead = queue.dead_jobs(1).await.unwrap();
        assert_eq!(dead[0].reason, "permanent", "{:?}", dead[0].error);
        assert!(dead[0].is_replayable());
        assert!(queue.replay_one("deep").await.unwrap());
    }

    async fn a_pushed_job_due_more_than_a_year_ahead_is_buried_not_parked(redis) {
        // Microseconds taken for ms: parked in the schedule it would wait for centuries,
        // invisible to the job TTL.
        let queue = fast(&redis.email_queue().unwrap());
        let now = now_ms();
        push_raw(&redis, &queue, Priority::Normal, [
            documented_json("micros", "normal", now * 1000),
            documented_json("next-month", "normal", now + 30 * 86_400_000),
            documented_json("now", "normal", now),
        ]).await;
        let (handled, worker) = recording_worker(&queue, 1);
        wait_stats(&queue, "one handled, one delayed, one dead", Duration::from_secs(10), |s| {
            s.completed == 1 && s.delayed == 1 && s.dead == 1
        })
        .await;
        worker.shutdown().await.unwrap();
        assert_eq!(handled.lock().unwrap().as_slice(), ["now"]);
        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, "malformed");
        assert!(dead[0].error.contains("more than a year ahead"), "{}", dead[0].error);
    }

    async fn numbers_written_as_floats_by_other_producers_are_read(redis) {
        // `time.time() * 1000` in Python, or an encoder writing exponents: the job runs, with
        // the fraction dropped, instead of being buried as malformed.
        let queue = fast(&redis.email_queue().unwrap());
        let now = now_ms();
        let rest = r#""to":["grace@example.com"],"from":"noreply@example.com","subject":"S","body":"B""#;
        let payloads = [
            format!(r#"{{"id":"fraction",{rest},"attempts":0.0,"scheduledAt":{now}.25}}"#),
            format!(r#"{{"id":"exponent",{rest},"attempts":1e0,"scheduledAt":{}.{:03}e3}}"#, now / 1000, now % 1000),
        ];
        push_raw(&redis, &queue, Priority::Normal, &payloads).await;
        let seen: Arc<Mutex<Vec<(String, u32, i64)>>> = Arc::default();
        let log = seen.clone();
        let worker = spawn_worker(&queue, 1, move |job: EmailJob| {
            log.lock().unwrap().push((job.id.to_string(), job.attempts, job.scheduled_at));
            async { Ok(()) }
        });
        wait_stats(&queue, "both handled", Duration::from_secs(10), |s| s.completed == 2).await;
        worker.shutdown().await.unwrap();
        assert_eq!(queue.stats().await.unwrap().dead, 0);
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [("fraction".to_string(), 0, now), ("exponent".to_string(), 1, now)]
        );
    }

    async fn bytes_that_are_not_utf8_are_buried_without_holding_up_their_batch(redis) {
        // One payload with a Latin-1 byte in its subject and one with such a byte in its id,
        // between healthy jobs: the healthy ones run, the two are buried as malformed with their
        // exact bytes, and the dead set stays readable.
        let queue = fast(&redis.email_queue().unwrap());
        let now = now_ms();
        let healthy = |id: &str| {
            format!(r#"{{"id":"{id}","to":["a@example.com"],"from":"f@example.com","subject":"s","body":"b","scheduledAt":{now}}}"#)
                .into_bytes()
        };
        let with_byte = |before: &str, after: &str| {
            let mut bytes = before.as_bytes().to_vec();
            bytes.push(0xe9);
            bytes.extend_from_slice(after.as_bytes());
            bytes
        };
        let latin1_subject = with_byte(
            r#"{"id":"latin1","to":["a@example.com"],"from":"f@example.com","subject":"caf"#,
            &format!(r#"","body":"b","scheduledAt":{now}}}"#),
        );
        // A member named `ascii` must not pass for the scan's mark of an ASCII id.
        let latin1_id_marked = with_byte(
            r#"{"id":"caf"#,
            &format!(r#"","ascii":0,"to":["a@example.com"],"from":"f@example.com","subject":"s","body":"b","scheduledAt":{now}}}"#),
        );
        let latin1_id = with_byte(
            r#"{"id":"caf"#,
            &format!(r#"","to":["a@example.com"],"from":"f@example.com","subject":"s","body":"b","scheduledAt":{now}}}"#),
        );
        let payloads = [
            healthy("ok1"),
            latin1_subject.clone(),
            healthy("ok2"),
            latin1_id,
            latin1_id_marked,
            healthy("ok3"),
        ];
        push_raw(&redis, &queue, Priority::Normal, payloads).await;
        let mut conn = redis.connection().await.unwrap();
        let (handled, worker) = recording_worker(&queue, 4);
        wait_stats(&queue, "three handled, three dead", Duration::from_secs(10), |s| {
            s.completed == 3 && s.dead == 3
        })
        .await;
        let report = worker.shutdown().await.unwrap();
        assert_eq!((report.lost_leases, report.dead), (0, 1), "{report:?}");
        let mut handled = handled.lock().unwrap().clone();
        handled.sort();
        assert_eq!(handled, ["ok1", "ok2", "ok3"]);
        let dead = queue.dead_jobs(10).await.unwrap();
        let latin1 = dead.iter().find(|d| d.dead_id == "latin1").expect("buried under its id");
        assert_eq!(latin1.reason, "malformed");
        assert!(latin1.raw.as_deref().is_some_and(|r| r.contains("caf\u{fffd}")), "{latin1:?}");
        let by_script: Vec<&str> =
            dead.iter().filter(|d| d.dead_id.starts_with("malformed-")).map(|d| d.dead_id.as_str()).collect();
        assert_eq!(by_script.len(), 2, "both bad ids buried by the fetch: {dead:?}");
        // The records keep the exact bytes as hex.
        let dead_jobs_key = queue.list_key(Priority::Normal).replace(":normal", ":dead-jobs");
        for dead_id in ["latin1"].into_iter().chain(by_script) {
            let record: String = redis::cmd("HGET").arg(&dead_jobs_key).arg(dead_id).query_async(&mut conn).await.unwrap();
            let record: serde_json::Value = serde_json::from_str(&record).unwrap();
            assert!(record["rawHex"].as_str().is_some_and(|h| h.contains("e9")), "{record}");
        }
        let hex: String = latin1_subject.iter().map(|b| format!("{b:02x}")).collect();
        let record: String = redis::cmd("HGET").arg(&dead_jobs_key).arg("latin1").query_async(&mut conn).await.unwrap();
        assert!(record.contains(&hex), "{record}");
        assert_eq!(queue.replay(10).await.unwrap(), 0);
    }

    async fn stale_payloads_of_every_shape_leave_readable_dead_records(redis) {
        // Burials by the fetch keep the payload as it was: not UTF-8 as hex, anything else as a
        // string, read back as the job when it is one (so an expired job can be replayed).
        let queue = fast(&redis.email_queue().unwrap());
        let day_ago = now_ms() - 25 * 3600 * 1000;
        let rest = r#""to":["a@example.com"],"from":"f@example.com","body":"b""#;
        let mut latin1 = format!(r#"{{"id":"stale-latin1",{rest},"subject":"caf"#).into_bytes();
        latin1.push(0xe9);
        latin1.extend_from_slice(format!(r#"","scheduledAt":{day_ago}}}"#).as_bytes());
        let payloads: Vec<Vec<u8>> = vec![
            latin1,
            // cjson reads a hex number; serde_json does not.
            format!(r#"{{"id":"stale-hex",{rest},"subject":"s","scheduledAt":{day_ago},"attempts":0x1}}"#).into_bytes(),
            format!(r#"{{"id":"stale-ok",{rest},"subject":"s","scheduledAt":{day_ago}}}"#).into_bytes(),
            // A string is not a time: it never parks the job; the worker refuses it.
            format!(r#"{{"id":"string-time",{rest},"subject":"s","scheduledAt":"99999999999999"}}"#).into_bytes(),
        ];
        push_raw(&redis, &queue, Priority::Normal, &payloads).await;
        let (handled, worker) = recording_worker(&queue, 1);
        wait_stats(&queue, "four dead", Duration::from_secs(10), |s| s.dead == 4).await;
        worker.shutdown().await.unwrap();
        assert!(handled.lock().unwrap().is_empty());
        let mut dead: Vec<_> = queue.dead_jobs(10).await.unwrap();
        dead.sort_by(|a, b| a.dead_id.cmp(&b.dead_id));
        let summary: Vec<(&str, &str, bool)> =
            dead.iter().map(|d| (d.dead_id.as_str(), d.reason.as_str(), d.job.is_some())).collect();
        assert_eq!(
            summary,
            [
                ("stale-hex", "expired", false),
                ("stale-latin1", "expired", false),
                ("stale-ok", "expired", true),
                ("string-time", "malformed", false),
            ]
        );
        assert!(dead[1].raw.as_deref().is_some_and(|r| r.contains("caf\u{fffd}")), "{:?}", dead[1]);
        assert_eq!(dead[0].raw.as_deref(), Some(std::str::from_utf8(&payloads[1]).unwrap()));
        assert!(queue.replay_one("stale-ok").await.unwrap());
        assert_eq!(queue.stats().await.unwrap().normal, 1);
    }

    async fn one_unreadable_dead_record_does_not_hide_the_others(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        // A payload the scan reads (`id`, `scheduledAt`) but that is not JSON, stale: buried as
        // expired by the script, which keeps it as `raw`.
        let mut conn = redis.connection().await.unwrap();
        let truncated = r#"{"id":"trunc","scheduledAt":1,"to":["#;
        let _: () = redis::cmd("LPUSH").arg(queue.list_key(Priority::Normal)).arg(truncated).query_async(&mut conn).await.unwrap();
        queue.enqueue(job("bounce", Priority::Normal)).await.unwrap();
        let worker = spawn_worker(&queue, 1, |_job| async { Err(JobError::permanent("550")) });
        wait_stats(&queue, "two dead", Duration::from_secs(10), |s| s.dead == 2).await;
        worker.shutdown().await.unwrap();
        // And a record written by hand that is neither UTF-8 nor JSON.
        let dead_jobs_key = queue.list_key(Priority::Normal).replace(":normal", ":dead-jobs");
        let _: () = redis::cmd("HSET").arg(&dead_jobs_key).arg("by-hand").arg(&b"\xff{oops"[..]).query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("ZADD").arg(queue.dead_key()).arg(now_ms()).arg("by-hand").query_async(&mut conn).await.unwrap();

        let mut dead: Vec<(String, String, Option<String>)> = queue
            .dead_jobs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.dead_id, d.reason, d.raw))
            .collect();
        dead.sort();
        assert_eq!(dead.len(), 3, "{dead:?}");
        assert_eq!((dead[0].0.as_str(), dead[0].1.as_str()), ("bounce", "permanent"));
        assert_eq!((dead[1].0.as_str(), dead[1].1.as_str()), ("by-hand", "unreadable"));
        assert_eq!(dead[2], ("trunc".into(), "expired".into(), Some(truncated.into())));
        // Replay moves the one real job and leaves the other two.
        assert_eq!(queue.replay(10).await.unwrap(), 1);
        assert!(!queue.replay_one("by-hand").await.unwrap());
        assert_eq!(queue.stats().await.unwrap().dead, 2);
    }

    async fn raw_lpush_with_the_documented_json_is_consumed_fifo(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        if !redis.keys().is_cluster() {
            let expected = format!("{}email-queue:normal", redis.config().key_prefix);
            assert_eq!(queue.list_key(Priority::Normal), expected);
            assert_eq!(queue.dead_key(), format!("{}email-queue:dead", redis.config().key_prefix));
        } else {
            let expected = format!("{}email-queue:{{default}}:normal", redis.config().key_prefix);
            assert_eq!(queue.list_key(Priority::Normal), expected);
        }
        let now = now_ms();
        let mut conn = redis.connection().await.unwrap();
        for id in ["raw-1", "raw-2", "raw-3"] {
            let _: () = redis::cmd("LPUSH")
                .arg(queue.list_key(Priority::Normal))
                .arg(documented_json(id, "normal", now))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        // And through redis-cli, as a shell script in another service would.
        let config = redis.config();
        let (host, port, cluster) = match &config.topology {
            Topology::Cluster { nodes } => {
                let (h, p) = nodes[0].rsplit_once(':').unwrap();
                (h.to_owned(), p.to_owned(), true)
            }
            _ => (config.host.clone(), config.port.to_string(), false),
        };
        let mut cli = std::process::Command::new("redis-cli");
        cli.args(["-h", &host, "-p", &port]);
        if cluster {
            cli.arg("-c");
        }
        let status = cli
            .args(["LPUSH", queue.list_key(Priority::Normal), &documented_json("raw-4", "normal", now)])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli is installed with redis-server");
        assert!(status.success());

        let seen: Arc<Mutex<Vec<EmailJob>>> = Arc::default();
        let s = seen.clone();
        let worker = spawn_worker(&queue, 1, move |job: EmailJob| {
            s.lock().unwrap().push(job);
            async { Ok(()) }
        });
        wait_for("four raw jobs", Duration::from_secs(10), || seen.lock().unwrap().len() == 4).await;
        worker.shutdown().await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["raw-1", "raw-2", "raw-3", "raw-4"]);
        assert_eq!(seen[0].to, ["grace@example.com"]);
        assert_eq!(seen[0].subject, "Raw raw-1");
        assert_eq!(seen[0].version, 1);
        assert_eq!(seen[0].metadata["tenant"], "t1");
        assert_eq!(counts(&queue).await, (0, 0, 0, 0, 4));
    }

    async fn a_job_keeps_the_priority_of_its_list_and_replay_skips_what_stays_dead(redis) {
        // A foreign producer pushed to `high` a payload that says `low`: the list decides. Two
        // malformed payloads die first; `replay(1)` looks past them to the replayable job.
        let queue = fast(&redis.email_queue_named("prio").unwrap());
        let mut conn = redis.connection().await.unwrap();
        let high = queue.list_key(Priority::High);
        for payload in ["not json 1".to_owned(), "not json 2".to_owned(), documented_json("says-low", "low", now_ms())] {
            let _: () = redis::cmd("LPUSH").arg(high).arg(payload).query_async(&mut conn).await.unwrap();
        }
        let seen: Arc<Mutex<Vec<Priority>>> = Arc::default();
        let s = seen.clone();
        let worker = spawn_worker(&queue, 1, move |job: EmailJob| {
            s.lock().unwrap().push(job.priority);
            async { Err(JobError::permanent("bounced")) }
        });
        wait_stats(&queue, "three dead", Duration::from_secs(10), |s| s.dead == 3).await;
        worker.shutdown().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [Priority::High]);
        let dead = queue.dead_jobs(10).await.unwrap();
        let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons, ["malformed", "malformed", "permanent"]);
        assert_eq!(dead[2].priority, Priority::High);
        assert_eq!(dead[2].job.as_ref().map(|j| j.priority), Some(Priority::High));

        assert_eq!(queue.replay(1).await.unwrap(), 1);
        let stats = queue.stats().await.unwrap();
        assert_eq!((stats.high, stats.normal, stats.low, stats.dead), (1, 0, 0, 2));
        assert_eq!(queue.replay(10).await.unwrap(), 0, "malformed entries stay dead");
    }

    async fn a_prefetched_job_whose_lease_was_taken_over_is_not_started(redis) {
        let queue = fast(&redis.email_queue_named("takeover").unwrap());
        for i in 0..3 {
            queue.enqueue(job(&format!("t{i}"), Priority::Normal)).await.unwrap();
        }
        let started: Arc<Mutex<Vec<String>>> = Arc::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (s, g) = (started.clone(), gate.clone());
        let mut options = worker_options(1);
        options.prefetch = 2;
        let worker = spawn_worker_with(&queue, options, move |job: EmailJob| {
            let id = job.id.to_string();
            s.lock().unwrap().push(id.clone());
            let g = g.clone();
            async move {
                if id == "t0" {
                    g.notified().await;
                }
                Ok(())
            }
        });
        wait_for("t0 running", Duration::from_secs(10), || started.lock().unwrap().len() == 1).await;
        assert_eq!(counts(&queue).await.1, 3, "t0 running, t1 and t2 prefetched");
        // As if t1's lease had lapsed and another worker had leased it since, for an hour.
        let key = |part: &str| queue.list_key(Priority::Normal).replace(":normal", part);
        let mut conn = redis.connection().await.unwrap();
        let _: () = redis::cmd("HSET").arg(key(":leases")).arg("t1").arg("other.n.1|normal").query_async(&mut conn).await.unwrap();
        let hour_ahead = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() + 3_600_000;
        let _: () = redis::cmd("ZADD").arg(key(":active")).arg(hour_ahead as u64).arg("t1").query_async(&mut conn).await.unwrap();
        // Lease extensions (every third of the 1 s visibility timeout) see it: six of them in
        // this time, so that a loaded machine that delays some still runs one.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        gate.notify_one();
        wait_for("two more handled", Duration::from_secs(10), || started.lock().unwrap().len() >= 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = worker.shutdown().await.unwrap();
        assert_eq!(started.lock().unwrap().as_slice(), ["t0", "t2"], "t1 belongs to the other worker");
        assert_eq!((report.completed, report.lost_leases), (2, 1));
    }

    async fn concurrent_replays_move_each_dead_job_exactly_once(redis) {
        // 300 dead jobs with 20 malformed entries among them, replayed by twelve concurrent
        // `replay(25)` calls: together they move every job once, whichever reads what. Their
        // limits add up to the jobs exactly, so a call that steps over an entry another call
        // replayed between its two reads leaves a job behind.
        let queue = fast(&redis.email_queue_named("replays").unwrap());
        let jobs = (0..300).map(|i| job(&format!("d{i}"), Priority::ALL[i % 3])).collect();
        queue.enqueue_bulk(jobs).await.unwrap();
        let mut conn = redis.connection().await.unwrap();
        for i in 0..20 {
            let _: () = redis::cmd("LPUSH")
                .arg(queue.list_key(Priority::Normal))
                .arg(format!("junk {i}"))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let worker = spawn_worker(&queue, 8, |_job| async { Err(JobError::permanent("bounced")) });
        wait_stats(&queue, "every job dead", Duration::from_secs(20), |s| s.dead == 320).await;
        worker.shutdown().await.unwrap();

        let replays: Vec<_> = (0..12)
            .map(|_| {
                let q = queue.clone();
                tokio::spawn(async move { q.replay(25).await.unwrap() })
            })
            .collect();
        let mut moved = 0;
        for r in replays {
            moved += r.await.unwrap();
        }
        assert_eq!(moved, 300);
        let waiting = waiting_ids(&redis, &queue).await;
        assert_eq!(waiting.len(), 300);
        assert!(waiting.values().all(|&n| n == 1), "a job replayed twice");
        let stats = queue.stats().await.unwrap();
        assert_eq!((stats.waiting(), stats.dead), (300, 20));
    }

    async fn a_replay_misses_no_job_while_retention_trims_the_entries_it_stepped_over(redis) {
        // 3000 entries that stay dead (payloads that are not jobs), then 100 dead jobs. While one
        // `replay(100)` pages through the 3000, a trimmer removes the oldest entries, which are
        // the ones the replay has stepped over: the replay must still reach all 100 jobs.
        let queue = fast(&redis.email_queue_named("trimmed-replay").unwrap());
        let mut conn = redis.connection().await.unwrap();
        for chunk in 0..30 {
            let junk: Vec<String> = (0..100).map(|i| format!("junk {chunk}-{i}")).collect();
            let _: () = redis::cmd("LPUSH")
                .arg(queue.list_key(Priority::Normal))
                .arg(&junk)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let worker = spawn_worker(&queue, 8, |_job| async { Err(JobError::permanent("bounced")) });
        wait_stats(&queue, "the junk buried", Duration::from_secs(30), |s| s.dead == 3000).await;
        let jobs = (0..100).map(|i| job(&format!("t{i}"), Priority::ALL[i % 3])).collect();
        queue.enqueue_bulk(jobs).await.unwrap();
        wait_stats(&queue, "every job dead", Duration::from_secs(30), |s| s.dead == 3100).await;
        worker.shutdown().await.unwrap();

        let done = Arc::new(AtomicBool::new(false));
        let trimmer = {
            let (queue, done) = (queue.clone(), done.clone());
            tokio::spawn(async move {
                let mut keep = 3100;
                let mut trimmed = 0;
                while !done.load(Ordering::Relaxed) && keep > 200 {
                    keep -= 20;
                    trimmed += queue.clean(CleanTarget::Dead, Duration::from_secs(365 * 86_400), keep).await.unwrap();
                }
                trimmed
            })
        };
        let moved = queue.replay(100).await.unwrap();
        done.store(true, Ordering::Relaxed);
        let trimmed = trimmer.await.unwrap();
        assert!(trimmed > 0, "the trimmer removed nothing while the replay ran");
        assert_eq!(moved, 100, "{trimmed} entries trimmed during the replay");
        let waiting = waiting_ids(&redis, &queue).await;
        assert_eq!(waiting.len(), 100);
    }

    async fn concurrent_replay_one_calls_move_a_dead_job_once(redis) {
        let queue = fast(&redis.email_queue().unwrap());
        for round in 0..20 {
            let id = format!("once{round}");
            queue.enqueue(job(&id, Priority::Normal)).await.unwrap();
            let worker = spawn_worker(&queue, 1, |_job| async { Err(JobError::permanent("550")) });
            wait_stats(&queue, "the job dead", Duration::from_secs(10), |s| s.dead == 1).await;
            worker.shutdown().await.unwrap();
            let calls: Vec<_> = (0..4)
                .map(|_| {
                    let (q, id) = (queue.clone(), id.clone());
                    tokio::spawn(async move { q.replay_one(&id).await.unwrap() })
                })
                .collect();
            let mut moved = 0;
            for call in calls {
                moved += usize::from(call.await.unwrap());
            }
            assert_eq!(moved, 1, "round {round}");
            assert_eq!(waiting_ids(&redis, &queue).await.get(&id), Some(&1));
            let (handled, worker) = recording_worker(&queue, 1);
            wait_for("the replayed job", Duration::from_secs(10), || handled.lock().unwrap().len() == 1).await;
            worker.shutdown().await.unwrap();
        }
    }

    async fn stats_are_one_consistent_snapshot_while_workers_move_jobs(redis) {
        // Every job is in exactly one of the counted structures at any instant (fetch, retry
        // and ack each move it in one script), so each snapshot adds up to the total; counts
        // read one by one would miss or double-count jobs moving in between.
        const JOBS: u64 = 2_000;
        let mut options = fast(&redis.email_queue().unwrap()).options().clone();
        options.backoff_base = Duration::from_millis(20);
        options.backoff_max = Duration::from_millis(40);
        options.completed_retention = Retention::new(10_000, Duration::from_secs(3600));
        let queue = redis.email_queue().unwrap().with_options(options).unwrap();
        let jobs = (0..JOBS).map(|i| job(&format!("s{i}"), Priority::ALL[i as usize % 3])).collect();
        queue.enqueue_bulk(jobs).await.unwrap();
        // Every other attempt fails once, so jobs also move through `scheduled`.
        let workers: Vec<_> = (0..3)
            .map(|_| {
                spawn_worker(&queue, 4, |job: EmailJob| async move {
                    if job.attempts == 0 && job.id.as_str().ends_with(['1', '3', '5', '7', '9']) {
                        Err(JobError::retry("421"))
                    } else {
                        Ok(())
                    }
                })
            })
            .collect();
        let mut snapshots = 0;
        let started = Instant::now();
        loop {
            let s = queue.stats().await.unwrap();
            assert_eq!(s.waiting() + s.active + s.delayed + s.completed + s.dead, JOBS, "{s:?}");
            snapshots += 1;
            if s.completed + s.dead == JOBS {
                assert_eq!(s.dead, 0);
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the run did not finish: {s:?}");
        }
        assert!(snapshots > 10, "the run ended before it was observed: {snapshots}");
        for w in workers {
            w.shutdown().await.unwrap();
        }
    }

    async fn a_raw_push_of_an_id_being_processed_is_buried_as_duplicate(redis) {
        // Raw pushes bypass the idempotency set. The same id twice in one fetched run (the batch
        // lease path), and once more while the first copy is in flight (the single-job path):
        // each later copy goes to the dead set as `duplicate`, the first runs once.
        let queue = fast(&redis.email_queue_named("dups").unwrap());
        let now = now_ms();
        let mut conn = redis.connection().await.unwrap();
        let push = |id: &str| {
            redis::cmd("LPUSH")
                .arg(queue.list_key(Priority::Normal))
                .arg(documented_json(id, "normal", now))
                .clone()
        };
        // Two later copies in one run are buried in the same millisecond: each keeps an entry.
        for id in ["dup", "dup", "dup", "other"] {
            let _: () = push(id).query_async(&mut conn).await.unwrap();
        }
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let (s, r) = (seen.clone(), release.clone());
        let worker = spawn_worker(&queue, 4, move |job: EmailJob| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                s.lock().unwrap().push(job.id.as_str().to_owned());
                if job.id.as_str() == "dup" {
                    r.notified().await;
                }
                Ok(())
            }
        });
        wait_for("the first two jobs", Duration::from_secs(10), || seen.lock().unwrap().len() == 2).await;
        wait_stats(&queue, "two duplicates", Duration::from_secs(10), |s| s.dead == 2).await;
        // Dead ids of duplicates carry the millisecond of burial.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _: () = push("dup").query_async(&mut conn).await.unwrap();
        wait_stats(&queue, "three duplicates", Duration::from_secs(10), |s| s.dead == 3).await;
        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!(dead.len(), 3);
        let same_call: Vec<&str> = dead[..2].iter().map(|d| d.dead_id.as_str()).collect();
        assert_eq!(format!("{}-2", same_call[0]), same_call[1], "{same_call:?}");
        assert_eq!(seen.lock().unwrap().len(), 2, "a duplicate ran");
        release.notify_waiters();
        wait_stats(&queue, "two completed", Duration::from_secs(10), |s| s.completed == 2).await;
        worker.shutdown().await.unwrap();
        let mut handled = seen.lock().unwrap().clone();
        handled.sort();
        assert_eq!(handled, ["dup", "other"]);
        for d in &dead {
            assert_eq!(d.reason, "duplicate");
            assert!(d.dead_id.starts_with("dup#duplicate-"), "{}", d.dead_id);
            assert_eq!(d.job.as_ref().map(|j| j.id.as_str()), Some("dup"));
            assert!(!d.is_replayable());
        }
        // A duplicate's job ran: replaying it would send the mail twice.
        assert!(!queue.replay_one(&dead[0].dead_id).await.unwrap());
        assert_eq!(queue.replay(10).await.unwrap(), 0);
        assert_eq!(queue.stats().await.unwrap().dead, 3);
    }

    async fn named_queues_are_separate(redis) {
        let a = fast(&redis.email_queue_named("bulk").unwrap());
        let b = fast(&redis.email_queue().unwrap());
        a.enqueue(job("same-id", Priority::Normal)).await.unwrap();
        assert_eq!(b.enqueue(job("same-id", Priority::Normal)).await.unwrap(), Enqueued::New);
        assert_eq!(a.stats().await.unwrap().normal, 1);
        assert_eq!(b.stats().await.unwrap().normal, 1);
        let prefix = &redis.config().key_prefix;
        let expected = if redis.keys().is_cluster() {
            format!("{prefix}email-queue:{{bulk}}:high")
        } else {
            format!("{prefix}email-queue:bulk:high")
        };
        assert_eq!(a.list_key(Priority::High), expected);
        // Every member of the queue, as documented; in Cluster all in one slot.
        let members = [
            "high", "normal", "low", "scheduled", "ids", "active", "leases", "deliveries",
            "completed", "dead", "dead-jobs", "payloads",
        ];
        let keys: Vec<String> =
            members.iter().map(|m| a.list_key(Priority::High).replace(":high", &format!(":{m}"))).collect();
        assert_eq!(keys[9], a.dead_key());
        let slots: std::collections::HashSet<u16> =
            keys.iter().map(|k| aether_redis::keyspace::cluster_slot(k)).collect();
        if redis.keys().is_cluster() {
            assert_eq!(slots.len(), 1, "one queue, one slot: {keys:?}");
        }
        // And the queue writes nothing else: after a full run, each key it left is a member.
        let (handled, worker) = recording_worker(&a, 1);
        wait_for("the job", Duration::from_secs(10), || handled.lock().unwrap().len() == 1).await;
        worker.shutdown().await.unwrap();
        // SCAN, not KEYS: the server is shared (and KEYS may be renamed away); in Cluster the
        // scan visits every master.
        let pattern = a.list_key(Priority::High).replace(":high", ":*");
        let found = aether_redis::user_data::scan_keys(&redis, &pattern).await.unwrap();
        assert!(!found.is_empty());
        assert!(found.iter().all(|k| keys.contains(k)), "{found:?} outside {keys:?}");
    }
}

#[derive(Default)]
struct WorkerTotals {
    completed: u64,
    lost: u64,
}

impl WorkerTotals {
    fn add(&mut self, r: aether_redis::email_queue::WorkerReport) {
        self.completed += r.completed;
        self.lost += r.lost_leases;
    }
}

/// The worker process that `sigkilled_worker_process_job_is_redelivered` starts and kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process started by sigkilled_worker_process_job_is_redelivered"]
async fn child_worker_process() {
    let config = support::child_config();
    let redis = Redis::connect(config).await.unwrap();
    let queue = fast(&redis.email_queue().unwrap());
    let worker = queue
        .worker(handler_fn(|job: EmailJob| async move {
            println!("LEASED {}", job.id);
            std::io::stdout().flush().unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }))
        .with_options(worker_options(1))
        .unwrap();
    worker.run_until(std::future::pending()).await.unwrap();
}

/// A server of the test's own that writes every command to its AOF before replying.
async fn aof_server() -> LocalServer {
    tokio::task::spawn_blocking(|| {
        LocalServer::start(LocalOptions {
            config_lines: vec!["appendonly yes".into(), "appendfsync always".into()],
            ..LocalOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap()
}

/// A TCP proxy to `upstream` that forwards both ways, except that it swallows the first reply
/// holding `marker` and closes that connection: the server ran the command, and its client
/// never hears back. Returns the proxy's port and whether a reply has been swallowed.
async fn reply_losing_proxy(upstream: u16, marker: &'static [u8]) -> (u16, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let lost = Arc::new(AtomicBool::new(false));
    let lost_any = lost.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let lost = lost_any.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if !lost.load(Ordering::SeqCst)
                        && buf[..n].windows(marker.len()).any(|w| w == marker)
                    {
                        lost.store(true, Ordering::SeqCst);
                        break;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                requests.abort();
            });
        }
    });
    (port, lost)
}

/// The default queue of `server` with `options`, reached straight and through a proxy that
/// loses the first reply holding `lost-reply-job` (set in the flag once it has).
async fn direct_and_reply_losing(
    server: &LocalServer,
    options: QueueOptions,
) -> (EmailQueue, EmailQueue, Arc<AtomicBool>) {
    let (proxy_port, lost) = reply_losing_proxy(server.port(), b"lost-reply-job").await;
    let mut via_proxy = server.config();
    via_proxy.port = proxy_port;
    let open = |config: aether_redis::Config| {
        let options = options.clone();
        async move {
            Redis::connect(config)
                .await
                .unwrap()
                .email_queue()
                .unwrap()
                .with_options(options)
                .unwrap()
        }
    };
    (open(server.config()).await, open(via_proxy).await, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_leased_by_a_call_whose_reply_was_lost_is_put_back_at_once() {
    // The worker's connection goes through a proxy that loses the reply of the call that leases
    // the job. With a 30 s lease and one delivery allowed, only a put-back of that call's leases
    // gets the job handled within the test's 10 s, and without using up its delivery.
    let server = tokio::task::spawn_blocking(|| LocalServer::start(LocalOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let mut options = QueueOptions::default();
    options.visibility_timeout = Duration::from_secs(30);
    options.max_deliveries = 1;
    options.aging = None;
    let (producer, consumer, lost) = direct_and_reply_losing(&server, options).await;
    producer
        .enqueue(job("lost-reply-job", Priority::High))
        .await
        .unwrap();
    let (handled, worker) = recording_worker(&consumer, 1);
    wait_for("the job handled", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 1
    })
    .await;
    assert!(lost.load(Ordering::SeqCst), "the proxy lost no reply");
    let report = worker.shutdown().await.unwrap();
    assert_eq!(report.completed, 1);
    assert_eq!(handled.lock().unwrap().as_slice(), ["lost-reply-job"]);
    assert_eq!(counts(&producer).await, (0, 0, 0, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_whose_reply_was_lost_is_reported_unconfirmed_not_as_a_lost_lease() {
    // The call acking the first job also leases the second, whose id the proxy watches for: its
    // reply is lost although Redis applied the ack. Sent again, the ack is refused (the lease is
    // gone): the report must not call that a lease lost to another worker.
    let (server, _redis) = own_server().await;
    let mut options = QueueOptions::default();
    options.aging = None;
    let (_direct, queue, lost) = direct_and_reply_losing(&server, options).await;
    queue.enqueue(job("first", Priority::High)).await.unwrap();
    queue
        .enqueue(job("lost-reply-job", Priority::Normal))
        .await
        .unwrap();
    let (handled, worker) = recording_worker(&queue, 1);
    wait_for("both jobs", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 2
    })
    .await;
    assert!(lost.load(Ordering::SeqCst), "the proxy lost no reply");
    let report = worker.shutdown().await.unwrap();
    assert_eq!(
        handled.lock().unwrap().as_slice(),
        ["first", "lost-reply-job"]
    );
    assert_eq!(
        (report.completed, report.unconfirmed, report.lost_leases),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(counts(&queue).await, (0, 0, 0, 0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn putting_back_a_lost_calls_jobs_leaves_every_other_lease_alone() {
    // Three workers straight to the server and one through the reply-losing proxy share 400
    // jobs. The put-back after the lost reply runs while the others hold leases: it must move
    // only the lost call's jobs, so that every job still runs exactly once (30 s leases and one
    // delivery allowed: nothing else could bring a job back in time).
    let server = tokio::task::spawn_blocking(|| LocalServer::start(LocalOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let mut options = QueueOptions::default();
    options.visibility_timeout = Duration::from_secs(30);
    options.max_deliveries = 1;
    options.aging = None;
    let (direct, proxied, lost) = direct_and_reply_losing(&server, options).await;
    // Every id holds the marker: the first reply that leases the proxied worker any job is lost.
    let jobs: Vec<EmailJob> = (0..400)
        .map(|i| job(&format!("lost-reply-job-{i}"), Priority::Normal))
        .collect();
    direct.enqueue_bulk(jobs).await.unwrap();
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let record = |runs: Arc<Mutex<HashMap<String, usize>>>| {
        move |job: EmailJob| {
            *runs.lock().unwrap().entry(job.id.to_string()).or_default() += 1;
            async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(())
            }
        }
    };
    let mut workers: Vec<WorkerHandle> = (0..3)
        .map(|_| spawn_worker(&direct, 4, record(runs.clone())))
        .collect();
    workers.push(spawn_worker(&proxied, 4, record(runs.clone())));
    wait_for("every job handled", Duration::from_secs(20), || {
        runs.lock().unwrap().len() == 400
    })
    .await;
    for worker in workers {
        worker.shutdown().await.unwrap();
    }
    assert!(lost.load(Ordering::SeqCst), "the proxy lost no reply");
    let runs = runs.lock().unwrap().clone();
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "jobs not run exactly once: {twice:?}");
    assert_eq!(counts(&direct).await, (0, 0, 0, 0, 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_enqueues_keeps_every_acknowledged_job() {
    let server = aof_server().await;
    let config = server.config();
    let server = Arc::new(Mutex::new(server));
    let (k, r) = (server.clone(), server.clone());
    enqueues_survive_a_kill(
        config,
        move || k.lock().unwrap().kill(),
        move || r.lock().unwrap().restart().unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_during_enqueues_keeps_every_acknowledged_job() {
    let cluster = tokio::task::spawn_blocking(|| {
        aether_redis::testkit::LocalCluster::start_with(
            3,
            &["appendonly yes", "appendfsync always"],
        )
    })
    .await
    .unwrap()
    .unwrap();
    let config = cluster.config();
    // Every key of the default queue is in the slot of `{default}`: kill the node serving it.
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.nodes()[0].port()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("{default}")
        .query_async(&mut conn)
        .await
        .unwrap();
    let owner = cluster.node_for_slot(slot);
    let cluster = Arc::new(Mutex::new(cluster));
    let (k, r) = (cluster.clone(), cluster.clone());
    enqueues_survive_a_kill(
        config,
        move || k.lock().unwrap().nodes_mut()[owner].kill(),
        move || r.lock().unwrap().nodes_mut()[owner].restart().unwrap(),
    )
    .await;
}

/// 8 producers enqueue 10 000 jobs; after 3000 the server holding the queue is killed with
/// SIGKILL and restarted from its AOF (`appendfsync always`). Every enqueue that returned Ok is
/// then present exactly once, and retrying the failed ones (idempotent) completes the set.
async fn enqueues_survive_a_kill(
    mut config: Config,
    kill: impl FnOnce() + Send + 'static,
    restart: impl FnOnce() + Send + 'static,
) {
    const JOBS: usize = 10_000;
    const PRODUCERS: usize = 8;
    config.key_prefix = "kill9:".into();
    config.connect_timeout = Duration::from_millis(500);
    config.response_timeout = Duration::from_secs(2);
    let redis = Redis::connect(config).await.unwrap();
    let queue = redis.email_queue().unwrap();

    let ok: Arc<Mutex<Vec<usize>>> = Arc::default();
    let failed: Arc<Mutex<Vec<usize>>> = Arc::default();
    let progress = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (queue, ok, failed, progress) =
            (queue.clone(), ok.clone(), failed.clone(), progress.clone());
        producers.push(tokio::spawn(async move {
            for i in (p..JOBS).step_by(PRODUCERS) {
                match queue
                    .enqueue(job(&format!("k{i}"), Priority::ALL[i % 3]))
                    .await
                {
                    Ok(Enqueued::New) => ok.lock().unwrap().push(i),
                    Ok(Enqueued::Duplicate) => panic!("k{i} enqueued twice"),
                    Err(_) => {
                        failed.lock().unwrap().push(i);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_for("3000 enqueues", Duration::from_secs(60), || {
        progress.load(Ordering::SeqCst) >= 3000
    })
    .await;
    tokio::task::spawn_blocking(kill).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(restart).await.unwrap();
    for p in producers {
        p.await.unwrap();
    }
    let ok = ok.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    assert_eq!(ok.len() + failed.len(), JOBS);
    assert!(!failed.is_empty(), "the kill happened while enqueues ran");

    let present = waiting_ids(&redis, &queue).await;
    for i in &ok {
        assert_eq!(
            present.get(&format!("k{i}")),
            Some(&1),
            "acknowledged k{i} lost or duplicated"
        );
    }
    assert!(present.values().all(|&n| n == 1));

    // Failed enqueues may or may not have been applied; retrying them is safe (idempotent).
    for i in &failed {
        queue
            .enqueue(job(&format!("k{i}"), Priority::ALL[i % 3]))
            .await
            .unwrap();
    }
    let present = waiting_ids(&redis, &queue).await;
    assert_eq!(present.len(), JOBS);
    assert!(present.values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripting_disabled_is_refused_at_construction() {
    let (_server, redis) = support::redis_without_scripting().await;
    let err = redis.email_queue().unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
}

/// A worker past its shutdown deadline while Redis is down keeps the settlements of its jobs
/// (one finished, one aborted at the deadline) and sends them once Redis is back, instead of
/// leaving the finished job to be delivered, and its mail sent, again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_keeps_its_settlements_through_an_outage_past_the_deadline() {
    let mut server = aof_server().await;
    let mut config = server.config();
    config.key_prefix = "outage:".into();
    config.connect_timeout = Duration::from_millis(300);
    config.response_timeout = Duration::from_millis(500);
    let redis = Redis::connect(config).await.unwrap();
    let mut o = QueueOptions::default();
    o.visibility_timeout = Duration::from_secs(10);
    o.aging = None;
    let queue = redis.email_queue().unwrap().with_options(o).unwrap();
    queue.enqueue(job("quick", Priority::High)).await.unwrap();
    queue.enqueue(job("stuck", Priority::Normal)).await.unwrap();
    let finish = Arc::new(tokio::sync::Notify::new());
    let release = finish.clone();
    let mut options = worker_options(2);
    options.shutdown_timeout = Duration::from_millis(300);
    let worker = spawn_worker_with(&queue, options, move |job| {
        let finish = finish.clone();
        async move {
            if job.id.as_str() == "quick" {
                finish.notified().await;
                Ok(())
            } else {
                std::future::pending().await
            }
        }
    });
    wait_stats(&queue, "both jobs leased", Duration::from_secs(10), |s| {
        s.active == 2
    })
    .await;

    tokio::task::block_in_place(|| server.kill());
    release.notify_one();
    let stopping = tokio::spawn(worker.shutdown());
    // Well past the 300 ms deadline, with every settlement failing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !stopping.is_finished(),
        "the worker returned while its settlements could not be sent"
    );
    tokio::task::block_in_place(|| server.restart().unwrap());

    let report = tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the worker stops once Redis is back")
        .unwrap()
        .unwrap();
    assert_eq!((report.completed, report.released), (1, 1));
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.completed, stats.waiting(), stats.active), (1, 1, 0));
}

/// A server of the test's own (the fault and command-count tests must not share one), and a
/// handle on it.
async fn own_server() -> (LocalServer, Redis) {
    let server = tokio::task::spawn_blocking(|| LocalServer::start(LocalOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let redis = Redis::connect(server.config()).await.unwrap();
    (server, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_work_call_pops_a_bounded_number_of_jobs_that_it_cannot_lease() {
    // 20,000 jobs that expired while no worker ran, then one live job. Each work call of a
    // 100-slot worker may pop about 2 × 100 + 100 jobs (plus one last run of up to 100) before
    // it returns: burying the whole backlog in one call would block the server for as long.
    // The worker must keep calling at once until it reaches the live job.
    const EXPIRED: usize = 20_000;
    let (_server, redis) = own_server().await;
    let mut options = QueueOptions::default();
    options.aging = None;
    options.dead_retention = Retention::new(EXPIRED as u64 + 10, Duration::from_secs(3600));
    let queue = redis.email_queue().unwrap().with_options(options).unwrap();
    let mut conn = redis.connection().await.unwrap();
    let expired: Vec<String> = (0..EXPIRED)
        .map(|i| documented_json(&format!("stale-{i}"), "normal", 1))
        .collect();
    for chunk in expired.chunks(1000) {
        let _: () = redis::cmd("LPUSH")
            .arg(queue.list_key(Priority::Normal))
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let live = documented_json("live", "normal", now_ms());
    push_raw(&redis, &queue, Priority::Normal, [live]).await;
    let before = support::command_stat(&mut conn, "evalsha", "calls").await;
    let (handled, worker) = recording_worker(&queue, 100);
    wait_for("the live job", Duration::from_secs(120), || {
        handled.lock().unwrap().len() == 1
    })
    .await;
    let calls = support::command_stat(&mut conn, "evalsha", "calls").await - before;
    worker.shutdown().await.unwrap();
    assert_eq!(handled.lock().unwrap().as_slice(), ["live"]);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.waiting(), stats.dead), (0, EXPIRED as u64));
    assert!(
        calls >= (EXPIRED / 400) as u64,
        "{calls} script calls popped {EXPIRED} jobs: more than 400 in one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burials_after_the_last_maintenance_are_trimmed_when_the_worker_stops() {
    // The worker's first call maintains; expired jobs pushed right after it are buried by the
    // next call, which (within the 50 ms maintenance interval) does not trim. The stopping
    // worker must trim once more, so the dead set is within its bound when it stops.
    let (_server, redis) = own_server().await;
    let mut options = QueueOptions::default();
    options.dead_retention = Retention::new(10, Duration::from_secs(3600));
    let queue = redis.email_queue().unwrap().with_options(options).unwrap();
    let mut conn = redis.connection().await.unwrap();
    let before = support::command_stat(&mut conn, "evalsha", "calls").await;
    let (handled, worker) = recording_worker(&queue, 4);
    let started = std::time::Instant::now();
    while support::command_stat(&mut conn, "evalsha", "calls").await == before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the worker made no call"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stale: Vec<String> = (0..50)
        .map(|i| documented_json(&format!("old-{i}"), "normal", 1))
        .collect();
    let _: () = redis::cmd("LPUSH")
        .arg(queue.list_key(Priority::Normal))
        .arg(&stale)
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_stats(&queue, "the burials", Duration::from_secs(10), |s| {
        s.waiting() == 0
    })
    .await;
    worker.shutdown().await.unwrap();
    assert!(handled.lock().unwrap().is_empty());
    let dead: u64 = redis::cmd("ZCARD")
        .arg(queue.dead_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(dead <= 10, "{dead} dead jobs kept with a bound of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_buried_in_one_call_cost_one_lookup_each_and_garbage_keeps_one_entry() {
    // A broken producer pushes one dead job's id 300 more times, long expired, and the same
    // garbage 300 times. The copies of the id each keep an entry (`#again-..`), found without
    // rescanning the names taken before them; the garbage keeps one `malformed-<sha1>` entry.
    const COPIES: usize = 300;
    let (_server, redis) = own_server().await;
    let queue = fast(&redis.email_queue().unwrap());
    queue.enqueue(job("again", Priority::Normal)).await.unwrap();
    let worker = spawn_worker(&queue, 1, |_job| async {
        Err(JobError::permanent("550 no such user"))
    });
    wait_stats(&queue, "the first burial", Duration::from_secs(10), |s| {
        s.dead == 1
    })
    .await;
    worker.shutdown().await.unwrap();
    let mut conn = redis.connection().await.unwrap();
    let mut pipe = redis::pipe();
    for _ in 0..COPIES {
        pipe.cmd("LPUSH")
            .arg(queue.list_key(Priority::Normal))
            .arg(documented_json("again", "normal", 1))
            .ignore();
        pipe.cmd("LPUSH")
            .arg(queue.list_key(Priority::Normal))
            .arg("not json")
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let before = support::command_stat(&mut conn, "hexists", "calls").await;
    let (_, worker) = recording_worker(&queue, 100);
    wait_stats(&queue, "every copy buried", Duration::from_secs(60), |s| {
        s.waiting() == 0 && s.dead == 2 + COPIES as u64
    })
    .await;
    worker.shutdown().await.unwrap();
    let lookups = support::command_stat(&mut conn, "hexists", "calls").await - before;
    assert!(
        lookups < 4 * COPIES as u64,
        "{lookups} HEXISTS for {COPIES} copies"
    );
    let dead = queue.dead_jobs(usize::MAX).await.unwrap();
    assert_eq!(dead.iter().filter(|d| d.reason == "malformed").count(), 1);
    assert_eq!(
        dead.iter()
            .filter(|d| d.dead_id.starts_with("again#again-"))
            .count(),
        COPIES
    );
    assert!(
        dead.iter()
            .any(|d| d.dead_id == "again" && d.is_replayable())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_big_dead_records_in_pages_of_bounded_size() {
    // Twenty dead jobs of about 1 MiB each: one page of them all would hold 20 MiB in the
    // server at once; pages stop after about 8 MiB, and the replay goes on to the next page.
    const JOBS: usize = 20;
    let (_server, redis) = own_server().await;
    let queue = fast(&redis.email_queue().unwrap());
    let body = "x".repeat(1_000_000);
    let big = (0..JOBS).map(|i| {
        format!(
            r#"{{"id":"big-{i}","to":["ada@example.com"],"from":"noreply@example.com","subject":"Big","body":"{body}","priority":"normal","attempts":0,"scheduledAt":1,"metadata":{{}}}}"#
        )
    });
    push_raw(&redis, &queue, Priority::Normal, big).await;
    let mut conn = redis.connection().await.unwrap();
    // Expired on arrival: the worker buries every one without running it.
    let (handled, worker) = recording_worker(&queue, 4);
    wait_stats(&queue, "all buried", Duration::from_secs(60), |s| {
        s.dead == JOBS as u64
    })
    .await;
    worker.shutdown().await.unwrap();
    assert!(handled.lock().unwrap().is_empty());
    let before = support::command_stat(&mut conn, "evalsha", "calls").await;
    assert_eq!(queue.replay(100).await.unwrap(), JOBS);
    // At least three pages (8 of 20 records fit in 8 MiB), each followed by its replay call.
    let calls = support::command_stat(&mut conn, "evalsha", "calls").await - before;
    assert!(
        calls >= 5,
        "the 20 MiB were read in fewer than three pages ({calls} calls)"
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.dead, stats.normal), (0, JOBS as u64));
}
