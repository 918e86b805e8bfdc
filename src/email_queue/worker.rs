//! The consuming side: [`Worker`], [`JobHandler`], graceful shutdown.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{EmailJob, EmailQueue, Fetched, PAYLOAD_VERSION, Settle, Worked, bounded};
use crate::codec::now_millis;

/// Jobs nested this deep are kept in a dead record as text, not embedded (see `settlement`):
/// the record's decoders stop at 128 levels.
const DEEPEST_EMBEDDED_JOB: usize = 120;
use crate::error::{Error, Result};
use crate::keyspace::validate_key_part;

/// Why a handler did not complete a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Try again later (with backoff) until the attempts run out.
    Retry(String),
    /// Do not try again: the job goes to the dead set now with reason `permanent`.
    Permanent(String),
}

impl JobError {
    /// A retryable failure.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        JobError::Retry(reason.to_string())
    }

    /// A permanent failure.
    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        JobError::Permanent(reason.to_string())
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retry(r) => write!(f, "retryable failure: {r}"),
            JobError::Permanent(r) => write!(f, "permanent failure: {r}"),
        }
    }
}

impl std::error::Error for JobError {}

/// Handles one job. `Ok(())` acknowledges it; see [`JobError`] for failures. A handler that
/// panics or exceeds [`WorkerOptions::job_timeout`] counts as a retryable failure.
///
/// Delivery is at least once: a job whose worker died mid-job runs again, so handlers should be
/// idempotent (e.g. pass the job id to the mail provider as an idempotency key).
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Handles `job`. `job.attempts` is the number of failed attempts before this one.
    async fn handle(&self, job: EmailJob) -> std::result::Result<(), JobError>;
}

/// A [`JobHandler`] made from an async closure; see [`handler_fn`].
#[derive(Debug, Clone)]
pub struct HandlerFn<F>(F);

/// Wraps `f(job) -> impl Future<Output = Result<(), JobError>>` as a [`JobHandler`].
///
/// ```
/// use aether_redis::email_queue::{handler_fn, JobError};
/// let handler = handler_fn(|job| async move {
///     if job.to.is_empty() { return Err(JobError::permanent("no recipient")); }
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(EmailJob) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), JobError>> + Send + 'static,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut> JobHandler for HandlerFn<F>
where
    F: Fn(EmailJob) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), JobError>> + Send + 'static,
{
    async fn handle(&self, job: EmailJob) -> std::result::Result<(), JobError> {
        (self.0)(job).await
    }
}

/// How often a worker's fetch call also recovers expired leases, promotes due scheduled jobs
/// and trims retention. Those steps cost the server several calls even when there is nothing to
/// do, so a busy worker that fetches thousands of times a second runs them at this pace; a due
/// job or an expired lease waits at most this long (plus the idle poll interval) longer.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(50);
/// Most failed calls whose jobs a worker remembers to put back; older ones are left to lease
/// expiry (a Redis that keeps failing fails the put-back too).
const MAX_ORPHAN_TOKENS: usize = 64;

/// Longest [`WorkerOptions::linger`].
pub const MAX_LINGER: Duration = Duration::from_secs(1);

/// Largest [`WorkerOptions::prefetch`]: one script call stays short.
pub const MAX_PREFETCH: usize = 1000;

/// Largest [`WorkerOptions::concurrency`]: a call leases up to `concurrency + prefetch` jobs,
/// and one script call stays short (run more workers for more).
pub const MAX_CONCURRENCY: usize = 1000;

/// How one worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// Jobs handled at once (default 8).
    pub concurrency: usize,
    /// Jobs leased ahead of free handler slots (default 0). With a prefetch of `p`, one script
    /// call leases up to `concurrency + p` jobs and the worker settles and refills only when its
    /// buffer runs dry, so at low concurrency a batch of short jobs takes one call per
    /// `concurrency + p` jobs instead of one per finished slot. The price: a job enqueued with a
    /// higher priority than the buffered ones waits behind at most `p` of them, and
    /// acknowledgements wait for the next call (a worker killed in between has those jobs
    /// delivered again). Buffered jobs are leased like running ones: their leases are extended
    /// and a graceful shutdown returns them to the head of their lists. Finished jobs whose
    /// acknowledgement waits for the next call keep their leases extended too.
    pub prefetch: usize,
    /// After a fetch that found fewer jobs than it asked for, how long the next fetch waits
    /// (default 0: it goes at once). Under a steady trickle of jobs a short linger (1 ms, say)
    /// lets one call collect several of them and carry their settlements together, instead of
    /// one call per job competing with the producers for the server; each job may then start up
    /// to this much later. Settlements wait with the fetch unless they fill a batch. At most
    /// [`MAX_LINGER`].
    pub linger: Duration,
    /// The worker's id (default `<host>-<pid>-<random>`). Leases carry it plus a per-run random
    /// nonce, so two workers given the same id still never settle each other's jobs.
    pub worker_id: Option<String>,
    /// Longest sleep between fetches while the queue is empty (default 100 ms). Idle workers
    /// back off from 1 ms to this; a job enqueued through the same process wakes them at once.
    pub poll_interval: Duration,
    /// On shutdown, how long in-flight jobs may run on before they are returned to the head of
    /// their lists (default 30 s).
    pub shutdown_timeout: Duration,
    /// Longest one handler call may take before it counts as a retryable failure (default
    /// 10 min). Leases are extended while a handler runs, so this bounds a hung handler.
    pub job_timeout: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 8,
            prefetch: 0,
            linger: Duration::ZERO,
            worker_id: None,
            poll_interval: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(30),
            job_timeout: Duration::from_secs(600),
        }
    }
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Jobs acknowledged.
    pub completed: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Jobs sent to the dead set.
    pub dead: u64,
    /// In-flight jobs returned to their lists at shutdown.
    pub released: u64,
    /// Settlements refused because the lease had expired and the job was handed to another
    /// worker (the other delivery settles it), and prefetched jobs dropped unstarted for the
    /// same reason.
    pub lost_leases: u64,
    /// Settlements sent again after a call whose reply never came (a timeout, a broken
    /// connection) and refused the second time: almost always because the lost call applied
    /// them (the job was then completed, retried, dead or released as asked), else because
    /// the lease lapsed meanwhile (a long outage).
    pub unconfirmed: u64,
}

/// A consumer of one queue. Build with [`EmailQueue::worker`], run with
/// [`run_until`](Worker::run_until) or [`spawn`](Worker::spawn).
///
/// Fetching is polling, not a blocking pop: one script call atomically settles the previous
/// jobs, recovers expired leases and promotes due jobs (at most every 50 ms), and leases a batch
/// in priority order, which a blocking `BLMOVE` on one list cannot do. Under load a worker never sleeps (each call both
/// acknowledges and fetches a batch); when idle it backs off to
/// [`WorkerOptions::poll_interval`].
pub struct Worker {
    queue: EmailQueue,
    handler: Arc<dyn JobHandler>,
    options: WorkerOptions,
    id: String,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue.name())
            .field("id", &self.id)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".to_owned());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "{}-{}-{}",
        if host.is_empty() { "host" } else { &host },
        std::process::id(),
        crate::random::token(6)
    )
}

impl EmailQueue {
    /// A worker of this queue running `handler` with default [`WorkerOptions`].
    pub fn worker(&self, handler: impl JobHandler) -> Worker {
        Worker {
            queue: self.clone(),
            handler: Arc::new(handler),
            options: WorkerOptions::default(),
            id: default_worker_id(),
        }
    }
}

/// A job being handled.
struct InFlight {
    id: String,
    token: Arc<str>,
    /// The decoded job, or the raw payload (bytes when not UTF-8) and its list when it did not
    /// decode.
    job: std::result::Result<EmailJob, (std::result::Result<String, Vec<u8>>, super::Priority)>,
}

enum Outcome {
    Done(std::result::Result<(), JobError>),
    /// The payload did not decode; nothing ran.
    Malformed(String),
}

impl Worker {
    /// Replaces the options. Fails on a concurrency of 0 or over [`MAX_CONCURRENCY`], a prefetch
    /// over [`MAX_PREFETCH`], a
    /// linger over [`MAX_LINGER`], zero intervals, a duration over
    /// [`MAX_OPTION_DURATION`](super::MAX_OPTION_DURATION) or an invalid worker id (a key part
    /// without `|` or `.`).
    pub fn with_options(mut self, options: WorkerOptions) -> Result<Self> {
        if options.concurrency == 0 || options.concurrency > MAX_CONCURRENCY {
            return Err(Error::invalid(
                "concurrency",
                format!("must be 1 to {MAX_CONCURRENCY}"),
            ));
        }
        if options.linger > MAX_LINGER {
            return Err(Error::invalid(
                "linger",
                format!("must be at most {MAX_LINGER:?}"),
            ));
        }
        if options.prefetch > MAX_PREFETCH {
            return Err(Error::invalid(
                "prefetch",
                format!("must be at most {MAX_PREFETCH}"),
            ));
        }
        if options.poll_interval.is_zero() || options.job_timeout.is_zero() {
            return Err(Error::invalid(
                "worker options",
                "poll interval and job timeout must be positive",
            ));
        }
        bounded("poll interval", options.poll_interval)?;
        bounded("shutdown timeout", options.shutdown_timeout)?;
        bounded("job timeout", options.job_timeout)?;
        if let Some(id) = &options.worker_id {
            validate_key_part("worker id", id)?;
            if id.contains(['|', '.']) {
                return Err(Error::invalid("worker id", "must not contain '|' or '.'"));
            }
            self.id = id.clone();
        }
        self.options = options;
        Ok(self)
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs the worker on a task of its own; [`WorkerHandle::shutdown`] stops it gracefully.
    pub fn spawn(self) -> WorkerHandle {
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(self.run_until(async move {
            let _ = stopped.await;
        }));
        WorkerHandle {
            stop: Some(stop),
            join,
        }
    }

    /// Fetches and handles jobs until `shutdown` completes, then stops fetching, lets in-flight
    /// jobs finish within [`WorkerOptions::shutdown_timeout`], returns the rest to the head of
    /// their lists and settles everything. Redis errors are logged and retried; they never end the
    /// loop, except past the shutdown deadline: a stopping worker that cannot settle for a whole
    /// visibility timeout returns, and its unsettled jobs are delivered again once their leases
    /// lapse (a job that finished is then handled twice). If the future is dropped instead (task
    /// aborted, process killed), in-flight jobs stay leased and return to their lists after the
    /// visibility timeout.
    ///
    /// Round trips: one atomic script call per batch (it settles the finished jobs and leases
    /// the next ones; at most every 50 ms it also recovers expired leases, promotes due jobs
    /// and trims retention), one lease-extension script per third of the visibility timeout
    /// while jobs run, none while idle except the backed-off polls, and one last trim when a
    /// stopping worker settled or fetched (which may bury) since the last one, and after a fetching call failed in a
    /// way that leaves its outcome unknown, one script that puts back the jobs it may have
    /// leased. With [`WorkerOptions::prefetch`] and [`WorkerOptions::linger`] a batch may hold
    /// more jobs than free slots.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<WorkerReport> {
        const MIN_IDLE: Duration = Duration::from_millis(1);
        let queue = self.queue.clone();
        let options = queue.options().clone();
        let concurrency = self.options.concurrency;
        let capacity = concurrency.saturating_add(self.options.prefetch);
        let mut buffer: VecDeque<(Fetched, Arc<str>)> = VecDeque::new();
        let nonce = crate::random::token(4);
        let mut seq: u64 = 0;
        // Every call leases under a token of its own: `<worker id>.<run nonce>.<call number>`.
        let mut next_token = || -> Arc<str> {
            seq += 1;
            format!("{}.{nonce}.{seq}", self.id).into()
        };
        let mut report = WorkerReport::default();
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut flight: HashMap<tokio::task::Id, InFlight> = HashMap::new();
        let mut pending: Vec<Settle> = Vec::new();
        // How many of `pending`, from its start, went out in a call whose outcome is unknown.
        let mut resent = 0usize;
        // Tokens of fetching calls that failed after they may have run (see `release_orphans`).
        let mut orphans: Vec<Arc<str>> = Vec::new();
        let mut stopping = false;
        let mut stop_deadline: Option<Instant> = None;
        // When a worker past its shutdown deadline stops retrying failed settlements.
        let mut settle_give_up: Option<Instant> = None;
        let mut want_fetch = true;
        let mut idle = MIN_IDLE;
        let mut retry_at: Option<Instant> = None;
        let mut maintained_at: Option<Instant> = None;
        let linger = self.options.linger;
        let mut fetch_not_before: Option<Instant> = None;
        // Whether settlements or burials landed after the last maintenance: a stopping worker then trims
        // once more, so retention is back within its bounds when the last worker stops.
        let mut settled_unmaintained = false;
        // Whether this worker's last pick was an aged one: the next call then starts with a job
        // in strict priority order (see `QueueOptions::aging`).
        let mut last_pick_aged = false;
        let mut extend_every = tokio::time::interval(options.visibility_timeout / 3);
        extend_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        extend_every.reset();
        let notify = queue.notify().clone();
        let mut shutdown = std::pin::pin!(shutdown);

        loop {
            let mut fetch_again = false;
            // Registered before the fetch: an enqueue in this process that lands while the call
            // is in flight (after the script saw empty lists) still wakes the worker.
            let woken = notify.notified();
            let mut woken = std::pin::pin!(woken);
            woken.as_mut().enable();
            // A finished handler wakes this loop ahead of handlers that are ready to finish
            // too (tokio runs a woken task next). Letting them run first makes the next call
            // carry their settlements and lease their slots' jobs, instead of one call each.
            // Yielding stops at the first yield that brings no completion: at most one yield
            // more than there are handlers running.
            let mut yielded = false;
            loop {
                let mut collected = false;
                while let Some(joined) = tasks.try_join_next_with_id() {
                    pending.extend(self.settlement(joined, &mut flight));
                    collected = true;
                }
                if tasks.is_empty() || (yielded && !collected) {
                    break;
                }
                tokio::task::yield_now().await;
                yielded = true;
            }
            // A shutdown asked for since the last pass stops this pass's fetch: the select
            // below sees it only after the call, which would lease and start a batch first.
            if !stopping {
                tokio::select! {
                    biased;
                    () = &mut shutdown => {
                        stopping = true;
                        stop_deadline = Some(Instant::now() + self.options.shutdown_timeout);
                    }
                    () = std::future::ready(()) => {}
                }
            }
            if stopping {
                // Last fetched first: each release goes to the head of its list, so the first
                // fetched ends up first again.
                pending.extend(
                    buffer
                        .drain(..)
                        .rev()
                        .map(|(f, token)| Settle::Release { id: f.id, token }),
                );
            }
            while tasks.len() < concurrency {
                let Some((fetched, token)) = buffer.pop_front() else {
                    break;
                };
                self.start(&mut tasks, &mut flight, fetched, token);
            }
            let free = if stopping {
                0
            } else {
                concurrency - tasks.len()
            };
            // Refill only once the buffer is empty: with a prefetch, settlements then travel in
            // batches of up to `capacity` instead of one call per finished job.
            let lingering = !stopping && fetch_not_before.is_some_and(|t| Instant::now() < t);
            let fetch = if want_fetch && buffer.is_empty() && !stopping && !lingering {
                capacity - tasks.len()
            } else {
                0
            };
            let settle_now = !pending.is_empty()
                && ((buffer.is_empty() && !lingering) || pending.len() >= capacity || stopping);
            let may_call = retry_at.is_none_or(|t| Instant::now() >= t);
            if may_call && !orphans.is_empty() {
                match queue.release_orphans(&orphans).await {
                    Ok(back) => {
                        if back > 0 {
                            tracing::info!(queue = queue.name(), worker = %self.id, jobs = back,
                                "email queue: put back the jobs of calls whose replies were lost");
                        }
                        orphans.clear();
                    }
                    // Kept for the next call; lease expiry recovers them meanwhile anyway.
                    Err(e) => tracing::warn!(queue = queue.name(), worker = %self.id, error = %e,
                        "email queue: putting back the jobs of failed calls failed; retrying"),
                }
            }
            if may_call && (settle_now || fetch > 0) {
                let token = next_token();
                let maintain = maintained_at.is_none_or(|t| t.elapsed() >= MAINTENANCE_INTERVAL);
                match queue
                    .work(&token, fetch, maintain, &pending, &mut last_pick_aged)
                    .await
                {
                    Ok(Worked {
                        settled,
                        jobs,
                        more,
                    }) => {
                        retry_at = None;
                        if maintain {
                            maintained_at = Some(Instant::now());
                            settled_unmaintained = false;
                        } else if !pending.is_empty() || fetch > 0 {
                            // A fetch buries what it cannot lease (expired, duplicate,
                            // malformed): the dead set grows without settlements too.
                            settled_unmaintained = true;
                        }
                        for (n, (settle, ok)) in pending.iter().zip(&settled).enumerate() {
                            if *ok {
                                match settle {
                                    Settle::Ack { .. } => report.completed += 1,
                                    Settle::Retry { .. } => report.retried += 1,
                                    Settle::Dead { .. } => report.dead += 1,
                                    Settle::Release { .. } => report.released += 1,
                                }
                            } else if n < resent {
                                report.unconfirmed += 1;
                            } else {
                                report.lost_leases += 1;
                            }
                        }
                        pending.clear();
                        resent = 0;
                        if fetch > 0 {
                            if jobs.is_empty() && !more {
                                want_fetch = false;
                            } else {
                                idle = MIN_IDLE;
                            }
                            if jobs.len() < fetch && !more && !linger.is_zero() {
                                fetch_not_before = Some(Instant::now() + linger);
                            }
                        }
                        let got = jobs.len();
                        for fetched in jobs {
                            if tasks.len() < concurrency {
                                self.start(&mut tasks, &mut flight, fetched, token.clone());
                            } else {
                                buffer.push_back((fetched, token.clone()));
                            }
                        }
                        // Slots are still free and jobs are coming: fetch again at once. This
                        // goes through the select below (its last, always-ready branch), so a
                        // steady trickle can never starve shutdown or lease extension.
                        fetch_again = (got > 0 || more) && tasks.len() < concurrency;
                    }
                    Err(e) => {
                        tracing::warn!(queue = queue.name(), worker = %self.id, error = %e,
                            "email queue: fetch/settle failed; retrying");
                        // The call may have run and leased jobs whose reply never came: their
                        // token, fresh for this call, lets the next call put exactly those back.
                        // Its settlements go again with the next call; refused then, they
                        // were most likely applied by this one.
                        if e.is_timeout() || e.is_unavailable() {
                            resent = pending.len();
                        }
                        if fetch > 0 && (e.is_timeout() || e.is_unavailable()) {
                            if orphans.len() == MAX_ORPHAN_TOKENS {
                                orphans.remove(0);
                            }
                            orphans.push(token.clone());
                        }
                        if stopping && stop_deadline.is_none() {
                            // Past the shutdown deadline with Redis failing: finished jobs'
                            // acks are still worth sending (unsent, their mail goes out again
                            // after their leases lapse), and the extension branch keeps those
                            // leases held meanwhile. After a visibility timeout of failures
                            // the worker gives up: the jobs are then redelivered.
                            let give_up = *settle_give_up
                                .get_or_insert_with(|| Instant::now() + options.visibility_timeout);
                            if Instant::now() >= give_up {
                                break;
                            }
                        }
                        retry_at = Some(Instant::now() + self.options.poll_interval);
                    }
                }
            }
            if stopping && tasks.is_empty() && pending.is_empty() && buffer.is_empty() {
                if !orphans.is_empty()
                    && let Err(e) = queue.release_orphans(&orphans).await
                {
                    tracing::warn!(queue = queue.name(), worker = %self.id, error = %e,
                        "email queue: putting back the jobs of failed calls failed; their \
                         leases will lapse");
                }
                if settled_unmaintained
                    && let Err(e) = queue
                        .work(&next_token(), 0, true, &[], &mut last_pick_aged)
                        .await
                {
                    tracing::warn!(queue = queue.name(), worker = %self.id, error = %e,
                        "email queue: final retention trim failed");
                }
                break;
            }
            let idle_sleep = idle;
            tokio::select! {
                biased;
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    stop_deadline = Some(Instant::now() + self.options.shutdown_timeout);
                }
                // Before the settlements: under load a finished job is ready on every pass, and
                // a biased select would never reach a branch behind it. Settlements waiting for
                // the next call hold their leases too: with a prefetch or a linger they may wait
                // while the slots stay busy, and a lapsed lease would hand a finished job to
                // another worker.
                _ = extend_every.tick() => {
                    if !flight.is_empty() || !buffer.is_empty() || !pending.is_empty() {
                        let leases: Vec<(String, Arc<str>)> = flight
                            .values()
                            .map(|f| (f.id.clone(), f.token.clone()))
                            .chain(buffer.iter().map(|(f, token)| (f.id.clone(), token.clone())))
                            .chain(pending.iter().map(|s| {
                                let (id, token) = s.lease();
                                (id.to_owned(), token.clone())
                            }))
                            .collect();
                        let in_flight = flight.len();
                        match queue.extend(&leases).await {
                            Ok(held) => {
                                // A buffered job whose lease is gone was recovered and handed
                                // to another worker: starting it here would send its mail twice.
                                let buffered_range = in_flight..in_flight + buffer.len();
                                if let Some(buffered) = held.get(buffered_range)
                                    && buffered.contains(&false)
                                {
                                    let mut still_held = buffered.iter();
                                    buffer.retain(|_| still_held.next().copied().unwrap_or(true));
                                    let dropped = buffered.iter().filter(|h| !**h).count();
                                    report.lost_leases += dropped as u64;
                                }
                                let lost = held.iter().filter(|h| !**h).count();
                                if lost > 0 {
                                    tracing::warn!(queue = queue.name(), worker = %self.id, lost,
                                        "email queue: leases expired before they were extended");
                                }
                            }
                            Err(e) => tracing::warn!(queue = queue.name(), worker = %self.id,
                                error = %e, "email queue: lease extension failed"),
                        }
                    }
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    pending.extend(self.settlement(joined, &mut flight));
                    want_fetch = true;
                }
                () = tokio::time::sleep_until(stop_deadline.unwrap_or_else(Instant::now)),
                    if stopping && stop_deadline.is_some() => {
                    stop_deadline = None;
                    tasks.abort_all();
                    while let Some(joined) = tasks.join_next_with_id().await {
                        let task = match &joined {
                            Ok((id, _)) => *id,
                            Err(e) => e.id(),
                        };
                        match joined {
                            Ok(_) => pending.extend(self.settlement(joined, &mut flight)),
                            Err(_) => {
                                if let Some(f) = flight.remove(&task) {
                                    pending.push(Settle::Release { id: f.id, token: f.token });
                                }
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => {}
                () = tokio::time::sleep_until(fetch_not_before.unwrap_or_else(Instant::now)),
                    if lingering => {
                    fetch_not_before = None;
                }
                () = &mut woken, if !stopping && !want_fetch => {
                    want_fetch = true;
                    idle = MIN_IDLE;
                }
                () = tokio::time::sleep(idle_sleep), if !stopping && !want_fetch && free > 0 => {
                    want_fetch = true;
                    idle = (idle * 2).min(self.options.poll_interval);
                }
                () = std::future::ready(()), if fetch_again => {}
            }
        }
        Ok(report)
    }

    fn start(
        &self,
        tasks: &mut JoinSet<Outcome>,
        flight: &mut HashMap<tokio::task::Id, InFlight>,
        fetched: Fetched,
        token: Arc<str>,
    ) {
        let decoded = match &fetched.payload {
            Ok(text) => serde_json::from_str::<EmailJob>(text)
                .map_err(|e| format!("payload is not an EmailJob: {e}")),
            Err(_) => Err("payload is not UTF-8".to_owned()),
        };
        let decoded = decoded.and_then(|mut job| {
            if job.version == 0 || job.version > PAYLOAD_VERSION {
                Err(format!(
                    "payload version {} is not supported (1..={PAYLOAD_VERSION})",
                    job.version
                ))
            } else {
                // The list a job waited in is its priority: a foreign producer's payload
                // may leave the field out or disagree, and retries, dead records and
                // replays must keep the job where it was queued.
                job.priority = fetched.priority;
                Ok(job)
            }
        });
        let handler = self.handler.clone();
        let timeout = self.options.job_timeout;
        let (job, task) = match decoded {
            Ok(job) => {
                let run = job.clone();
                let task = tasks.spawn(async move {
                    match tokio::time::timeout(timeout, handler.handle(run)).await {
                        Ok(result) => Outcome::Done(result),
                        Err(_) => Outcome::Done(Err(JobError::Retry(format!(
                            "handler exceeded the job timeout of {timeout:?}"
                        )))),
                    }
                });
                (Some(job), task)
            }
            Err(reason) => {
                let task = tasks.spawn(async move { Outcome::Malformed(reason) });
                (None, task)
            }
        };
        tracing::trace!(id = %fetched.id, deliveries = fetched.deliveries, priority = %fetched.priority,
            "email queue: job leased");
        flight.insert(
            task.id(),
            InFlight {
                id: fetched.id,
                token,
                job: job.ok_or((fetched.payload, fetched.priority)),
            },
        );
    }

    fn settlement(
        &self,
        joined: std::result::Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
        flight: &mut HashMap<tokio::task::Id, InFlight>,
    ) -> Option<Settle> {
        let (task, outcome) = match joined {
            Ok((task, outcome)) => (task, outcome),
            Err(e) => {
                let reason = if e.is_panic() {
                    "handler panicked"
                } else {
                    "handler task was cancelled"
                };
                (e.id(), Outcome::Done(Err(JobError::Retry(reason.into()))))
            }
        };
        let InFlight { id, token, job } = flight.remove(&task)?;
        let options = self.queue.options();
        let now = now_millis();
        let dead = |reason: &str, error: &str, job: Stored, priority: super::Priority| {
            let mut record = serde_json::Map::new();
            record.insert("id".into(), id.clone().into());
            record.insert("reason".into(), reason.into());
            record.insert("error".into(), error.into());
            record.insert("failedAt".into(), now.into());
            record.insert("priority".into(), priority.as_str().into());
            match job {
                Stored::Job(job) => {
                    record.insert("job".into(), job);
                }
                Stored::Raw(Ok(text)) => {
                    record.insert("raw".into(), text.into());
                }
                Stored::Raw(Err(bytes)) => {
                    record.insert("rawHex".into(), hex(&bytes).into());
                }
            }
            Settle::Dead {
                id: id.clone(),
                token: token.clone(),
                record: serde_json::Value::Object(record).to_string(),
            }
        };
        // A pushed job may be nested up to the decoder's limit (128 levels): embedded in the
        // record it would be one level deeper, and the record unreadable. Such a job is kept as
        // its text (`raw`), which readers decode on its own.
        let as_value = |job: &EmailJob| {
            let value = serde_json::to_value(job).unwrap_or(serde_json::Value::Null);
            if super::job::depth(&value) >= DEEPEST_EMBEDDED_JOB {
                Stored::Raw(Ok(value.to_string()))
            } else {
                Stored::Job(value)
            }
        };
        let mut job = match (job, outcome) {
            (Err((raw, priority)), Outcome::Malformed(reason)) => {
                return Some(dead("malformed", &reason, Stored::Raw(raw), priority));
            }
            (Err((raw, priority)), _) => {
                return Some(dead(
                    "malformed",
                    "payload did not decode",
                    Stored::Raw(raw),
                    priority,
                ));
            }
            (Ok(_), Outcome::Done(Ok(()))) => return Some(Settle::Ack { id, token }),
            (Ok(mut job), Outcome::Done(Err(JobError::Permanent(error)))) => {
                job.last_error = Some(error.clone());
                return Some(dead("permanent", &error, as_value(&job), job.priority));
            }
            (Ok(job), Outcome::Malformed(reason)) => {
                return Some(dead("malformed", &reason, as_value(&job), job.priority));
            }
            (Ok(mut job), Outcome::Done(Err(JobError::Retry(error)))) => {
                job.attempts = job.attempts.saturating_add(1);
                job.last_error = Some(error);
                job
            }
        };
        let error = job.last_error.clone().unwrap_or_default();
        if job.attempts >= options.max_attempts {
            return Some(dead("failed", &error, as_value(&job), job.priority));
        }
        let delay = jittered(options.backoff(job.attempts));
        let due = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        job.scheduled_at = due;
        Some(match crate::codec::to_json("email job", &job) {
            Ok(payload) => Settle::Retry {
                id,
                token,
                due,
                priority: job.priority,
                payload,
            },
            Err(e) => dead(
                "failed",
                &format!("{error}; re-encoding failed: {e}"),
                as_value(&job),
                job.priority,
            ),
        })
    }
}

/// What a dead record keeps of the job: the job, or the payload that did not decode.
enum Stored {
    Job(serde_json::Value),
    Raw(std::result::Result<String, Vec<u8>>),
}

/// Lowercase hex, as the script writes `rawHex` (Redis's Lua has no base64).
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// A delay drawn uniformly from `[d/2, d]`.
fn jittered(d: Duration) -> Duration {
    let r = crate::random::bytes(8)
        .ok()
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(u64::MAX / 2);
    scaled(d, (r >> 11) as f64 / (1u64 << 53) as f64)
}

/// `d` scaled by `0.5 + 0.5 * fraction` for a `fraction` in `[0, 1)`.
fn scaled(d: Duration, fraction: f64) -> Duration {
    // The factor can round up to 1.0, and `mul_f64` panics when rounding then carries a delay
    // near `Duration::MAX` past it.
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.5 + 0.5 * fraction))
        .map_or(d, |jittered| jittered.min(d))
}

/// A running [`Worker`]. Dropping the handle starts the same graceful stop as
/// [`shutdown`](Self::shutdown), without waiting for it: keep the handle for as long as the
/// worker should run.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<WorkerReport>>,
}

impl WorkerHandle {
    /// Stops gracefully (see [`Worker::run_until`]) and waits for the report.
    pub async fn shutdown(mut self) -> Result<WorkerReport> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join.await.map_err(|e| Error::Unavailable {
            message: format!("email queue worker task failed: {e}"),
            source: None,
        })?
    }

    /// Kills the worker task without any cleanup, as a crash would: its in-flight jobs return
    /// to their lists after the visibility timeout.
    pub fn abort(&self) {
        self.join.abort();
    }

    /// Whether the worker has stopped.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_of_the_longest_delay_does_not_panic() {
        let largest_fraction = ((1u64 << 53) - 1) as f64 / (1u64 << 53) as f64;
        assert_eq!(scaled(Duration::MAX, largest_fraction), Duration::MAX);
        assert!(jittered(Duration::MAX) >= Duration::MAX / 2);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }

    #[test]
    fn default_worker_ids_are_unique_key_parts() {
        let a = default_worker_id();
        let b = default_worker_id();
        assert_ne!(a, b);
        validate_key_part("worker id", &a).unwrap();
        assert!(!a.contains(['|', '.']));
    }
}
