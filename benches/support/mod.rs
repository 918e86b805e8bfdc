//! Helpers shared by the benches.

use std::time::{Duration, Instant};

/// Runs `iters` operations split over `tasks` concurrent tasks and returns the wall time: the
/// throughput of one shared handle under that concurrency.
pub async fn run_concurrent<F, Fut>(iters: u64, tasks: usize, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_task = iters.div_ceil(tasks as u64);
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    op().await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("bench task");
    }
    started.elapsed()
}

/// Rounds of [`paired_ratio`]: enough to average out the drift of a shared machine.
const PAIRED_ROUNDS: usize = 20;

/// Throughput ratio of `ours` to `theirs` (1.0 = as fast; > 1.0 = faster), measured in short
/// alternating rounds at `tasks` concurrent tasks, so that load from other processes on a shared
/// machine hits both sides alike. The side that goes first alternates too. Prints one line under
/// `label` and returns the ratio.
pub async fn paired_ratio<FO, FutO, FT, FutT>(
    label: &str,
    tasks: usize,
    ours: FO,
    theirs: FT,
) -> f64
where
    FO: Fn() -> FutO + Clone + Send + 'static,
    FutO: std::future::Future<Output = ()> + Send,
    FT: Fn() -> FutT + Clone + Send + 'static,
    FutT: std::future::Future<Output = ()> + Send,
{
    let ops = 200 * tasks.max(4) as u64;
    let (mut ours_time, mut theirs_time) = (Duration::ZERO, Duration::ZERO);
    for round in 0..PAIRED_ROUNDS {
        if round % 2 == 0 {
            ours_time += run_concurrent(ops, tasks, ours.clone()).await;
            theirs_time += run_concurrent(ops, tasks, theirs.clone()).await;
        } else {
            theirs_time += run_concurrent(ops, tasks, theirs.clone()).await;
            ours_time += run_concurrent(ops, tasks, ours.clone()).await;
        }
    }
    let total = (PAIRED_ROUNDS as u64 * ops) as f64;
    let ratio = theirs_time.as_secs_f64() / ours_time.as_secs_f64();
    println!(
        "{label} paired/{tasks}: ours {:.1} µs/op, theirs {:.1} µs/op, throughput ratio {ratio:.3}",
        ours_time.as_secs_f64() * 1e6 / total,
        theirs_time.as_secs_f64() * 1e6 / total,
    );
    ratio
}
