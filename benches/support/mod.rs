//! Helpers shared by the benches.

// Each bench compiles its own copy of this module and uses a subset of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Runs exactly `iters` operations split over `tasks` concurrent tasks and returns the wall
/// time: the throughput of one shared handle under that concurrency.
pub async fn run_concurrent<F, Fut>(iters: u64, tasks: usize, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let tasks = tasks.max(1) as u64;
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = op.clone();
            // The first `iters % tasks` tasks take one more, so the total is `iters`.
            let share = iters / tasks + u64::from(t < iters % tasks);
            tokio::spawn(async move {
                for _ in 0..share {
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

/// Rounds of [`alternate_rounds`]: enough to average out the drift of a shared machine.
pub const PAIRED_ROUNDS: u64 = 20;

/// Total time of each side over [`PAIRED_ROUNDS`] short alternating rounds (ours, theirs,
/// theirs, ours, ...), so that load from other processes on a shared machine hits both sides
/// alike. Each call of a closure runs one round and returns its wall time.
pub async fn alternate_rounds<FO, FutO, FT, FutT>(
    mut ours: FO,
    mut theirs: FT,
) -> (Duration, Duration)
where
    FO: FnMut() -> FutO,
    FutO: std::future::Future<Output = Duration>,
    FT: FnMut() -> FutT,
    FutT: std::future::Future<Output = Duration>,
{
    let (mut ours_time, mut theirs_time) = (Duration::ZERO, Duration::ZERO);
    for round in 0..PAIRED_ROUNDS {
        if round % 2 == 0 {
            ours_time += ours().await;
            theirs_time += theirs().await;
        } else {
            theirs_time += theirs().await;
            ours_time += ours().await;
        }
    }
    (ours_time, theirs_time)
}

/// Throughput ratio of `ours` to `theirs` (1.0 = as fast; > 1.0 = faster), measured in
/// [`alternate_rounds`] of `ops` operations each, at `tasks` concurrent tasks. Prints one line
/// under `label` and returns the ratio.
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
    let (ours_time, theirs_time) = alternate_rounds(
        || run_concurrent(ops, tasks, ours.clone()),
        || run_concurrent(ops, tasks, theirs.clone()),
    )
    .await;
    print_ratio(
        &format!("{label} paired/{tasks}"),
        PAIRED_ROUNDS * ops,
        ours_time,
        theirs_time,
    )
}

/// Prints `label: ours .. µs/op, theirs .. µs/op, throughput ratio ..` for `ops` operations per
/// side and returns the throughput ratio of ours to theirs.
pub fn print_ratio(label: &str, ops: u64, ours_time: Duration, theirs_time: Duration) -> f64 {
    let ratio = theirs_time.as_secs_f64() / ours_time.as_secs_f64();
    println!(
        "{label}: ours {:.1} µs/op, theirs {:.1} µs/op, throughput ratio {ratio:.3}",
        ours_time.as_secs_f64() * 1e6 / ops as f64,
        theirs_time.as_secs_f64() * 1e6 / ops as f64,
    );
    ratio
}
