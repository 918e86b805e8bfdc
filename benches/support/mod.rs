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
