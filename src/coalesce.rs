//! Group commit for concurrent calls on one key.
//!
//! The first call on a key goes to Redis at once. Calls on the same key that arrive while it is
//! in flight wait in a queue, and when it returns the queue goes as ONE call (up to a count and
//! size cap), in arrival order; calls arriving meanwhile form the next batch. One caller alone
//! pays nothing but a map lookup; `n` concurrent callers on one key usually pay two round trips
//! each and the server runs one command instead of `n`. The server applies a batch atomically
//! and in order, so every caller gets the answer it would have had from its own call at that
//! instant.
//!
//! Batches after the first run on a spawned task, so a caller that gives up (a dropped future)
//! never strands the callers queued behind it, and a queued request whose caller has gone is
//! not sent. A queued caller waits at most [`Batch::max_wait`], so a caller whose future is
//! held but no longer polled cannot hold the others up for longer, and once its call is older
//! than that the next caller goes at once instead of queueing behind it. If the task running the
//! batches dies (a panic, a runtime shutting down), its callers get [`Batch::abandoned`] and the
//! key is free again.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Something that can run several requests on one key as one call.
pub(crate) trait Batch: Clone + Send + Sync + 'static {
    /// What calls coalesce on.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;
    /// One caller's request.
    type Request: Send + 'static;
    /// One caller's answer.
    type Response: Send + 'static;

    /// The queues of this runner.
    fn coalescer(&self) -> &Coalescer<Self>;

    /// Runs `requests` in order as one call and returns one response per request, in order.
    fn run(
        &self,
        key: &Self::Key,
        requests: Vec<Self::Request>,
    ) -> impl Future<Output = Vec<Self::Response>> + Send;

    /// What a request weighs against [`Coalescer::new`]'s size cap (e.g. its bytes).
    fn size(_request: &Self::Request) -> usize {
        1
    }

    /// The longest a queued caller waits for its answer.
    fn max_wait(&self) -> Duration;

    /// The answer of a queued caller that waited `max_wait` (its request may still be sent).
    fn timed_out(&self, waited: Duration) -> Self::Response;

    /// The answer of a request whose batch was lost (a short reply, or no runtime left to run
    /// it on).
    fn abandoned(&self) -> Self::Response;
}

/// One answer per request of a batch of `count` from the batch's one `result`: the outcomes in
/// order, or the batch's error for each request (also when the outcomes are not one per
/// request).
pub(crate) fn answers<T>(
    count: usize,
    result: Result<Vec<T>>,
    short: impl Fn() -> Error,
) -> Vec<Result<T>> {
    match result {
        Ok(outcomes) if outcomes.len() == count => outcomes.into_iter().map(Ok).collect(),
        Ok(_) => (0..count).map(|_| Err(short())).collect(),
        Err(err) => (0..count).map(|_| Err(err.clone())).collect(),
    }
}

/// The error of a request whose batch was dropped with the runtime before it ran.
pub(crate) fn abandoned(operation: &str) -> Error {
    Error::Unavailable {
        message: format!("{operation}: the batch carrying this call was dropped with the runtime"),
        source: None,
    }
}

struct Waiter<B: Batch> {
    request: B::Request,
    reply: oneshot::Sender<B::Response>,
}

/// The calls waiting behind the call in flight on one key.
struct Slot<B: Batch> {
    /// When the call in flight was sent. One older than [`Batch::max_wait`] counts as stalled
    /// (its caller's future held but no longer polled): the next caller goes at once instead of
    /// queueing behind it.
    since: Instant,
    queue: Vec<Waiter<B>>,
}

/// The queues of calls waiting behind an in-flight call, by key. A key is present while a call
/// on it is in flight.
pub(crate) struct Coalescer<B: Batch> {
    queues: Mutex<HashMap<B::Key, Slot<B>>>,
    max_batch: usize,
    max_size: usize,
}

impl<B: Batch> Coalescer<B> {
    /// Batches carry at most `max_batch` requests (at least 1) weighing at most `max_size`
    /// together (a heavier request goes alone); the rest wait for the next.
    pub(crate) fn new(max_batch: usize, max_size: usize) -> Self {
        Coalescer {
            queues: Mutex::new(HashMap::new()),
            max_batch: max_batch.max(1),
            max_size,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<B::Key, Slot<B>>> {
        // Critical sections only move plain values; a panic cannot leave the map inconsistent.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what queued behind the in-flight call on `key` (it is sent next), or marks the key
    /// idle.
    fn next_batch(&self, key: &B::Key) -> Vec<Waiter<B>> {
        let mut queues = self.lock();
        match queues.get_mut(key) {
            Some(slot) if !slot.queue.is_empty() => {
                slot.since = Instant::now();
                std::mem::take(&mut slot.queue)
            }
            _ => {
                queues.remove(key);
                Vec::new()
            }
        }
    }

    /// Splits off what goes after the first batch of `waiting`.
    fn split_batch(&self, waiting: &mut Vec<Waiter<B>>) -> Vec<Waiter<B>> {
        let mut size = 0usize;
        let mut count = 0;
        for waiter in waiting.iter() {
            size = size.saturating_add(B::size(&waiter.request));
            if count == self.max_batch || (count > 0 && size > self.max_size) {
                break;
            }
            count += 1;
        }
        waiting.split_off(count)
    }
}

/// Sends `request` on `key` through `runner`, alone when nothing is in flight on `key`, else in
/// the next batch.
pub(crate) async fn submit<B: Batch>(runner: &B, key: B::Key, request: B::Request) -> B::Response {
    // The lock is released before any await.
    let queued = {
        let mut queues = runner.coalescer().lock();
        match queues.get_mut(&key) {
            Some(slot) if slot.since.elapsed() < runner.max_wait() => {
                let (reply, answer) = oneshot::channel();
                slot.queue.push(Waiter { request, reply });
                Err(answer)
            }
            // The call in flight is stalled: this one goes now, and later ones queue behind it.
            Some(slot) => {
                slot.since = Instant::now();
                Ok(request)
            }
            None => {
                queues.insert(
                    key.clone(),
                    Slot {
                        since: Instant::now(),
                        queue: Vec::new(),
                    },
                );
                Ok(request)
            }
        }
    };
    let request = match queued {
        Ok(request) => request,
        Err(answer) => {
            let limit = runner.max_wait();
            return match tokio::time::timeout(limit, answer).await {
                Ok(Ok(response)) => response,
                Ok(Err(_)) => runner.abandoned(),
                Err(_) => runner.timed_out(limit),
            };
        }
    };
    let lead = Lead {
        runner,
        key: Some(key),
    };
    let mut responses = match &lead.key {
        Some(key) => runner.run(key, vec![request]).await,
        None => Vec::new(),
    };
    drop(lead);
    responses.pop().unwrap_or_else(|| runner.abandoned())
}

/// The caller whose call is in flight on `key`. When it finishes, or is dropped mid-call, the
/// queue behind it moves to a task of its own.
struct Lead<'a, B: Batch> {
    runner: &'a B,
    key: Option<B::Key>,
}

impl<B: Batch> Drop for Lead<'_, B> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let batch = self.runner.coalescer().next_batch(&key);
        if batch.is_empty() {
            return;
        }
        let release = Release {
            runner: self.runner.clone(),
            key: Some(key),
        };
        match tokio::runtime::Handle::try_current() {
            // If the runtime drops the task unpolled, `release` frees the key.
            Ok(handle) => drop(handle.spawn(drive(release, batch))),
            // No runtime to run the batch on: its callers get `abandoned()` when their senders
            // drop with `batch`, and `release` frees the key.
            Err(_) => drop(release),
        }
    }
}

/// Frees a key when the task running its batches ends without having freed it (a panic, a
/// runtime shutting down): whoever queues on it next leads a new call instead of waiting for
/// a task that is gone. Queued callers' senders drop with the queue.
struct Release<B: Batch> {
    runner: B,
    key: Option<B::Key>,
}

impl<B: Batch> Drop for Release<B> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let slot = self.runner.coalescer().lock().remove(&key);
            drop(slot);
        }
    }
}

/// Runs queued batches on `release.key` until no caller waits, then frees the key.
async fn drive<B: Batch>(mut release: Release<B>, mut waiting: Vec<Waiter<B>>) {
    let Some(key) = release.key.clone() else {
        return;
    };
    let runner = release.runner.clone();
    let coalescer = runner.coalescer();
    loop {
        // A caller that gave up (dropped or timed out) is not sent.
        waiting.retain(|w| !w.reply.is_closed());
        if !waiting.is_empty() {
            let rest = coalescer.split_batch(&mut waiting);
            let (requests, replies): (Vec<_>, Vec<_>) =
                waiting.into_iter().map(|w| (w.request, w.reply)).unzip();
            let mut responses = runner.run(&key, requests).await.into_iter();
            for reply in replies {
                // A caller that gave up meanwhile has dropped its receiver; nothing to tell it.
                let _ = reply.send(responses.next().unwrap_or_else(|| runner.abandoned()));
            }
            waiting = rest;
        }
        let mut queues = coalescer.lock();
        match queues.get_mut(&key) {
            Some(slot) if !(waiting.is_empty() && slot.queue.is_empty()) => {
                waiting.append(&mut slot.queue);
                slot.since = Instant::now();
            }
            Some(_) => {
                queues.remove(&key);
                // Freed here, under the lock: a new leader may insert the key right after.
                release.key = None;
                return;
            }
            // A caller that had stalled freed the key meanwhile: finish what is ours; the key
            // is no longer ours to free.
            None => {
                release.key = None;
                if waiting.is_empty() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Echoes each request with the size of the batch it rode in, after a delay; panics on a
    /// request of [`PANIC`].
    #[derive(Clone)]
    struct Echo {
        coalescer: Arc<Coalescer<Echo>>,
        calls: Arc<AtomicUsize>,
        sent: Arc<AtomicUsize>,
        delay: Duration,
    }

    const PANIC: u32 = 99;

    impl Batch for Echo {
        type Key = &'static str;
        type Request = u32;
        type Response = std::result::Result<(u32, usize), &'static str>;

        fn coalescer(&self) -> &Coalescer<Self> {
            &self.coalescer
        }

        async fn run(&self, _key: &&'static str, requests: Vec<u32>) -> Vec<Self::Response> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.sent.fetch_add(requests.len(), Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            assert!(!requests.contains(&PANIC), "poisoned batch");
            let n = requests.len();
            requests.into_iter().map(|r| Ok((r, n))).collect()
        }

        fn size(request: &u32) -> usize {
            *request as usize
        }

        fn max_wait(&self) -> Duration {
            self.delay * 5
        }

        fn timed_out(&self, _waited: Duration) -> Self::Response {
            Err("timed out")
        }

        fn abandoned(&self) -> Self::Response {
            Err("abandoned")
        }
    }

    fn echo(max_batch: usize, max_size: usize) -> Echo {
        Echo {
            coalescer: Arc::new(Coalescer::new(max_batch, max_size)),
            calls: Arc::new(AtomicUsize::new(0)),
            sent: Arc::new(AtomicUsize::new(0)),
            delay: Duration::from_millis(10),
        }
    }

    fn spawn_submit(runner: &Echo, request: u32) -> Call {
        let runner = runner.clone();
        tokio::spawn(async move { submit(&runner, "k", request).await })
    }

    type Call = tokio::task::JoinHandle<std::result::Result<(u32, usize), &'static str>>;

    /// Spawns `lead`, lets its call get in flight, then spawns `queued` behind it.
    async fn in_flight_then(runner: &Echo, lead: u32, queued: &[u32]) -> (Call, Vec<Call>) {
        let leader = spawn_submit(runner, lead);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let queued = queued.iter().map(|r| spawn_submit(runner, *r)).collect();
        (leader, queued)
    }

    /// Lets a spawned batch task finish what it does after answering (freeing the key).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[test]
    fn one_result_becomes_one_answer_per_request() {
        let short = || Error::invalid("reply", "short");
        let ok = answers(2, Ok(vec![1, 2]), short);
        assert_eq!(
            ok.into_iter().map(|a| a.unwrap()).collect::<Vec<_>>(),
            [1, 2]
        );
        let mismatched = answers(3, Ok(vec![1, 2]), short);
        assert_eq!(mismatched.len(), 3);
        assert!(
            mismatched
                .iter()
                .all(|a| matches!(a, Err(Error::InvalidInput { .. })))
        );
        let failed = answers::<u8>(2, Err(abandoned("op")), short);
        assert!(
            failed
                .iter()
                .all(|a| matches!(a, Err(e) if e.is_unavailable()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_call_runs_alone_and_releases_its_key() {
        let runner = echo(8, usize::MAX);
        assert_eq!(submit(&runner, "k", 7).await, Ok((7, 1)));
        assert_eq!(submit(&runner, "k", 8).await, Ok((8, 1)));
        assert_eq!(runner.calls.load(Ordering::SeqCst), 2);
        assert!(runner.coalescer.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_share_batches_capped_in_size_and_each_gets_its_own_answer() {
        let runner = echo(4, usize::MAX);
        let calls: Vec<_> = (0..10).map(|i| spawn_submit(&runner, i)).collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap().unwrap());
        }
        // One alone, then the nine queued behind it in batches of at most four.
        assert_eq!(runner.calls.load(Ordering::SeqCst), 4);
        assert!(answers.iter().all(|(_, n)| *n <= 4));
        let requests: Vec<u32> = answers.iter().map(|(r, _)| *r).collect();
        assert_eq!(requests, (0..10).collect::<Vec<_>>());
        settle().await;
        assert!(runner.coalescer.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn batches_respect_the_size_cap_and_a_heavy_request_goes_alone() {
        let runner = echo(100, 10);
        let (leader, queued) = in_flight_then(&runner, 1, &[4, 5, 2, 30, 3]).await;
        assert_eq!(leader.await.unwrap(), Ok((1, 1)));
        let mut sizes = Vec::new();
        for call in queued {
            sizes.push(call.await.unwrap().unwrap().1);
        }
        // 4+5 fit in 10, 2 does not; 2 alone before 30; 30 alone (over the cap); then 3.
        assert_eq!(sizes, [2, 2, 1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn other_keys_do_not_wait() {
        let runner = echo(8, usize::MAX);
        let a = tokio::spawn({
            let runner = runner.clone();
            async move { submit(&runner, "a", 1).await }
        });
        let b = tokio::spawn({
            let runner = runner.clone();
            async move { submit(&runner, "b", 2).await }
        });
        assert_eq!(a.await.unwrap(), Ok((1, 1)));
        assert_eq!(b.await.unwrap(), Ok((2, 1)));
        assert_eq!(runner.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_leader_does_not_strand_the_queue() {
        let runner = echo(8, usize::MAX);
        let (leader, followers) = in_flight_then(&runner, 0, &[1, 2, 3]).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        leader.abort();
        for (i, follower) in (1..4).zip(followers) {
            assert_eq!(follower.await.unwrap(), Ok((i, 3)));
        }
        settle().await;
        assert!(runner.coalescer.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn queued_requests_of_callers_that_gave_up_are_not_sent() {
        let runner = echo(8, usize::MAX);
        let (leader, mut queued) = in_flight_then(&runner, 0, &[1, 2, 3]).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let staying = queued.pop().unwrap();
        for gone in &queued {
            gone.abort();
        }
        assert_eq!(leader.await.unwrap(), Ok((0, 1)));
        assert_eq!(staying.await.unwrap(), Ok((3, 1)));
        assert_eq!(
            runner.sent.load(Ordering::SeqCst),
            2,
            "only the two live requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_behind_a_stalled_leader_gives_up_after_max_wait() {
        let runner = echo(8, usize::MAX);
        // Polled once, so its call is in flight, then held without being polled again.
        let stalled = submit(&runner, "k", 0);
        let mut stalled = std::pin::pin!(stalled);
        assert!(futures::poll!(stalled.as_mut()).is_pending());
        let started = Instant::now();
        let follower = spawn_submit(&runner, 1);
        assert_eq!(follower.await.unwrap(), Err("timed out"));
        assert_eq!(started.elapsed(), runner.max_wait());
        // The key is not blocked: the next caller goes at once, and one after it queues.
        let next = spawn_submit(&runner, 2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let queued = spawn_submit(&runner, 3);
        assert_eq!(next.await.unwrap(), Ok((2, 1)));
        assert_eq!(queued.await.unwrap(), Ok((3, 1)));
        assert!(started.elapsed() < runner.max_wait() + runner.delay * 3);
        // The stalled caller, polled again, still gets its answer; the follower that gave up
        // was never sent.
        assert_eq!(stalled.await, Ok((0, 1)));
        settle().await;
        assert_eq!(runner.sent.load(Ordering::SeqCst), 3);
        assert!(runner.coalescer.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_panics_answers_abandoned_and_frees_the_key() {
        let runner = echo(8, usize::MAX);
        let (leader, poisoned) = in_flight_then(&runner, 0, &[PANIC, 1]).await;
        assert_eq!(leader.await.unwrap(), Ok((0, 1)));
        for call in poisoned {
            assert_eq!(call.await.unwrap(), Err("abandoned"));
        }
        settle().await;
        assert!(runner.coalescer.lock().is_empty());
        assert_eq!(submit(&runner, "k", 5).await, Ok((5, 1)));
    }
}
