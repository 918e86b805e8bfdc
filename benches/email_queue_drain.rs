//! Server cost of the email queue: a backlog of jobs enqueued in bulk, then drained by one worker
//! with 1, 8 and 32 handler slots (a handler that does nothing). For each it prints the drain
//! rate, the jobs per worker script call and the server's script time per job (`INFO
//! commandstats`, enqueue and drain).
//!
//! ```sh
//! AETHER_REDIS_TEST_BACKEND=local cargo bench --all-features --bench email_queue_drain
//! ```
//!
//! Times move with the machine's load; instruction counts do not. With the server running under
//! callgrind, give the bench its pid and output file, and it also prints the server's
//! instructions per job, counted between `callgrind_control -z` and `-d` around each backlog:
//!
//! ```sh
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out redis-server --port 6401 \
//!     --save "" --appendonly no &
//! REDIS_URL=redis://127.0.0.1:6401 AETHER_REDIS_CALLGRIND_PID=$! \
//!     AETHER_REDIS_CALLGRIND_OUT=/tmp/cg.out \
//!     cargo bench --all-features --bench email_queue_drain
//! ```
//!
//! `AETHER_REDIS_DRAIN_JOBS` sets the backlog (default 3000).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aether_redis::email_queue::{EmailJob, WorkerOptions, handler_fn};
use aether_redis::{Config, Redis};

const SLOTS: [usize; 3] = [1, 8, 32];

fn job() -> EmailJob {
    EmailJob::new(
        vec!["ada@example.com".to_owned()],
        "noreply@example.com".to_owned(),
        "Your weekly digest".to_owned(),
        "x".repeat(512),
    )
    .unwrap()
}

/// `calls` and `usec` of one command in `INFO commandstats`.
fn command_stats(info: &str, command: &str) -> (u64, u64) {
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = info.lines().find_map(|l| l.strip_prefix(&prefix)) else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("calls"), field("usec"))
}

/// The server under callgrind: zeroes its counters, then dumps them and reads the total.
struct Callgrind {
    pid: String,
    out: String,
}

impl Callgrind {
    fn from_env() -> Option<Self> {
        Some(Callgrind {
            pid: std::env::var("AETHER_REDIS_CALLGRIND_PID").ok()?,
            out: std::env::var("AETHER_REDIS_CALLGRIND_OUT").ok()?,
        })
    }

    fn control(&self, flag: &str) {
        let status = Command::new("callgrind_control")
            .args([flag, &self.pid])
            .output()
            .expect("callgrind_control runs")
            .status;
        assert!(
            status.success(),
            "callgrind_control {flag} {} failed",
            self.pid
        );
    }

    /// Instructions since the last zero: the `summary:` line of the newest dump
    /// (`<out>.<n>`, n counting up).
    fn instructions(&self) -> u64 {
        self.control("-d");
        let path = std::path::Path::new(&self.out);
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let stem = format!("{}.", path.file_name().unwrap().to_string_lossy());
        let newest = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                let part: u64 = name.strip_prefix(&stem)?.parse().ok()?;
                Some((part, dir.join(name)))
            })
            .max()
            .expect("a callgrind dump");
        std::fs::read_to_string(newest.1)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("summary: ")?.trim().parse().ok())
            .expect("a summary line in the dump")
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter this bench has no use for.
    if std::env::args().skip(1).any(|a| a != "--bench") {
        return;
    }
    let jobs: u64 = std::env::var("AETHER_REDIS_DRAIN_JOBS")
        .ok()
        .map(|v| v.parse().expect("AETHER_REDIS_DRAIN_JOBS is a number"))
        .unwrap_or(3000);
    let callgrind = Callgrind::from_env();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = aether_redis::testkit::shared_server().unwrap();
    let mut config: Config = server.config.clone();
    config.key_prefix = format!("bench-drain:{}:", std::process::id());
    // A server under callgrind runs some fifty times slower.
    config.response_timeout = Duration::from_secs(60);
    let url = format!("redis://{}:{}", config.host, config.port);
    let redis = rt.block_on(Redis::connect(config)).unwrap();
    let client = redis::Client::open(url).unwrap();
    let mut admin = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();

    println!("email queue drain: {jobs} jobs enqueued in bulk, then one worker");
    for slots in SLOTS {
        let queue = redis.email_queue_named(&format!("drain{slots}")).unwrap();
        let backlog: Vec<EmailJob> = (0..jobs).map(|_| job()).collect();
        let line = rt.block_on(async {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut admin)
                .await
                .unwrap();
            if let Some(cg) = &callgrind {
                cg.control("-z");
            }
            queue.enqueue_bulk(backlog).await.unwrap();
            let done = Arc::new(AtomicU64::new(0));
            let counter = done.clone();
            let mut options = WorkerOptions::default();
            options.concurrency = slots;
            let started = Instant::now();
            let worker = queue
                .worker(handler_fn(move |_job| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async { Ok(()) }
                }))
                .with_options(options)
                .unwrap()
                .spawn();
            while done.load(Ordering::Relaxed) < jobs {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let drained = started.elapsed();
            let report = worker.shutdown().await.unwrap();
            assert_eq!(report.completed, jobs, "every job acknowledged");
            let instructions = callgrind.as_ref().map(Callgrind::instructions);
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut admin)
                .await
                .unwrap();
            let (calls, usec) = command_stats(&info, "evalsha");
            // Every worker call pops with one LMPOP: the worker's share of the script calls.
            let (fetches, _) = command_stats(&info, "lmpop");
            let mut line = format!(
                "  {slots:>2} slots: {:>7.0} jobs/s drained, {:.1} jobs per fetch call, \
                 script time {:.1} µs/job over {calls} calls",
                jobs as f64 / drained.as_secs_f64(),
                jobs as f64 / fetches.max(1) as f64,
                usec as f64 / jobs as f64,
            );
            if let Some(instructions) = instructions {
                line += &format!(
                    ", server {:.1} K instructions/job",
                    instructions as f64 / jobs as f64 / 1000.0
                );
            }
            line
        });
        println!("{line}");
    }
}
