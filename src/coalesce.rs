//! Group commit for concurrent calls on one key.
//!
//! The first call on a key goes to Redis at once. Calls on the same key that arrive while it is
//! in flight wait in a queue, and when it returns the whole queue goes as ONE call, in arrival
//! order; calls arriving meanwhile form the next batch. One caller alone pays nothing but a
//! map lookup; `n` concurrent callers on one key pay about two round trips each and the server
//! runs one command instead of `n`. The server applies a batch atomically and in order, so
//! every caller gets the answer it would have had from its own call at that instant.
//!
//! Batches after the first run on a spawned task, so a caller that gives up (a dropped future)
//! never strands the callers queued behind it. A dropped caller's request may still be sent,
//! exactly as a single call already on the wire is.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::oneshot;

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

/// The queues of calls waiting behind an in-flight call, by key. A key is present while a call
/// on it is in flight.
pub(crate) struct Coalescer<B: Batch> {
    queues: Mutex<HashMap<B::Key, Vec<Waiter<B>>>>,
    max_batch: usize,
}

impl<B: Batch> Coalescer<B> {
    /// Batches carry at most `max_batch` requests (at least 1); the rest wait for the next.
    pub(crate) fn new(max_batch: usize) -> Self {
        Coalescer {
            queues: Mutex::new(HashMap::new()),
            max_batch: max_batch.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<B::Key, Vec<Waiter<B>>>> {
        // Critical sections only move plain values; a panic cannot leave the map inconsistent.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what queued behind the in-flight call on `key`, or marks the key idle.
    fn next_batch(&self, key: &B::Key) -> Vec<Waiter<B>> {
        let mut queues = self.lock();
        match queues.get_mut(key) {
            Some(queued) if !queued.is_empty() => std::mem::take(queued),
            _ => {
                queues.remove(key);
                Vec::new()
            }
        }
    }
}

/// Sends `request` on `key` through `runner`, alone when nothing is in flight on `key`, else in
/// the next batch.
pub(crate) async fn submit<B: Batch>(runner: &B, key: B::Key, request: B::Request) -> B::Response {
    // The lock is released before any await.
    let queued = {
        let mut queues = runner.coalescer().lock();
        match queues.get_mut(&key) {
            Some(queued) => {
                let (reply, answer) = oneshot::channel();
                queued.push(Waiter { request, reply });
                Err(answer)
            }
            None => {
                queues.insert(key.clone(), Vec::new());
                Ok(request)
            }
        }
    };
    let request = match queued {
        Ok(request) => request,
        Err(answer) => return answer.await.unwrap_or_else(|_| runner.abandoned()),
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
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(drive(self.runner.clone(), key, batch));
            }
            Err(_) => {
                // No runtime to run the batch on: its callers get `abandoned()` when their
                // senders drop with `batch`, and the key is released for later calls.
                self.runner.coalescer().lock().remove(&key);
            }
        }
    }
}

/// Runs queued batches on `key` until no caller waits.
async fn drive<B: Batch>(runner: B, key: B::Key, mut waiting: Vec<Waiter<B>>) {
    let max_batch = runner.coalescer().max_batch;
    while !waiting.is_empty() {
        let rest = if waiting.len() > max_batch {
            waiting.split_off(max_batch)
        } else {
            Vec::new()
        };
        let (requests, replies): (Vec<_>, Vec<_>) =
            waiting.into_iter().map(|w| (w.request, w.reply)).unzip();
        let mut responses = runner.run(&key, requests).await.into_iter();
        for reply in replies {
            // A caller that gave up has dropped its receiver; nothing to tell it.
            let _ = reply.send(responses.next().unwrap_or_else(|| runner.abandoned()));
        }
        waiting = rest;
        if waiting.is_empty() {
            waiting = runner.coalescer().next_batch(&key);
        } else {
            let mut queues = runner.coalescer().lock();
            if let Some(queued) = queues.get_mut(&key) {
                waiting.append(queued);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Echoes each request with the size of the batch it rode in, after a delay.
    #[derive(Clone)]
    struct Echo {
        coalescer: Arc<Coalescer<Echo>>,
        calls: Arc<AtomicUsize>,
        delay: Duration,
    }

    impl Batch for Echo {
        type Key = &'static str;
        type Request = u32;
        type Response = Option<(u32, usize)>;

        fn coalescer(&self) -> &Coalescer<Self> {
            &self.coalescer
        }

        async fn run(&self, _key: &&'static str, requests: Vec<u32>) -> Vec<Self::Response> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let n = requests.len();
            requests.into_iter().map(|r| Some((r, n))).collect()
        }

        fn abandoned(&self) -> Self::Response {
            None
        }
    }

    fn echo(max_batch: usize) -> Echo {
        Echo {
            coalescer: Arc::new(Coalescer::new(max_batch)),
            calls: Arc::new(AtomicUsize::new(0)),
            delay: Duration::from_millis(10),
        }
    }

    #[test]
    fn one_result_becomes_one_answer_per_request() {
        let short = || Error::invalid("reply", "short");
        let ok = answers(2, Ok(vec![1, 2]), short);
        assert_eq!(ok.into_iter().map(|a| a.unwrap()).collect::<Vec<_>>(), [1, 2]);
        let mismatched = answers(3, Ok(vec![1, 2]), short);
        assert_eq!(mismatched.len(), 3);
        assert!(mismatched.iter().all(|a| matches!(a, Err(Error::InvalidInput { .. }))));
        let failed = answers::<u8>(2, Err(abandoned("op")), short);
        assert!(failed.iter().all(|a| matches!(a, Err(e) if e.is_unavailable())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_call_runs_alone_and_releases_its_key() {
        let runner = echo(8);
        assert_eq!(submit(&runner, "k", 7).await, Some((7, 1)));
        assert_eq!(submit(&runner, "k", 8).await, Some((8, 1)));
        assert_eq!(runner.calls.load(Ordering::SeqCst), 2);
        assert!(runner.coalescer.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_share_batches_capped_in_size_and_each_gets_its_own_answer() {
        let runner = echo(4);
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let runner = runner.clone();
                tokio::spawn(async move { submit(&runner, "k", i).await })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap().unwrap());
        }
        // One alone, then the nine queued behind it in batches of at most four.
        assert_eq!(runner.calls.load(Ordering::SeqCst), 4);
        assert!(answers.iter().all(|(_, n)| *n <= 4));
        let mut requests: Vec<u32> = answers.iter().map(|(r, _)| *r).collect();
        requests.sort_unstable();
        assert_eq!(requests, (0..10).collect::<Vec<_>>());
        assert!(runner.coalescer.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn other_keys_do_not_wait() {
        let runner = echo(8);
        let a = tokio::spawn({
            let runner = runner.clone();
            async move { submit(&runner, "a", 1).await }
        });
        let b = tokio::spawn({
            let runner = runner.clone();
            async move { submit(&runner, "b", 2).await }
        });
        assert_eq!(a.await.unwrap(), Some((1, 1)));
        assert_eq!(b.await.unwrap(), Some((2, 1)));
        assert_eq!(runner.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_leader_does_not_strand_the_queue() {
        let runner = echo(8);
        let leader = tokio::spawn({
            let runner = runner.clone();
            async move { submit(&runner, "k", 0).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let followers: Vec<_> = (1..4)
            .map(|i| {
                let runner = runner.clone();
                tokio::spawn(async move { submit(&runner, "k", i).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        leader.abort();
        for (i, follower) in (1..4).zip(followers) {
            assert_eq!(follower.await.unwrap(), Some((i, 3)));
        }
        assert!(runner.coalescer.lock().is_empty());
    }
}
