//! The consumer: read, dispatch to concurrent handlers, ack, claim, dead-letter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use redis::Value;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::reply::{self, RawEntry};
use super::{
    DEFAULT_DEAD_LETTER_RETENTION, DEFAULT_IDEMPOTENCY_TTL, DeadLetterCall, DeadLettered,
    FIELD_IDEMPOTENCY_KEY, FIELD_PAYLOAD, FIELD_REPLAY_OF, StartFrom, StreamKeys, create_group,
    create_group_at, dead_letter_message, group_info, is_server_code, millis,
    remove_idle_consumers,
};
use crate::codec::{from_json, int};
use crate::error::{Error, Result};
use crate::keyspace::validate_key_part;
use crate::pool::{DedicatedConnection, Redis};
use crate::script::{LuaScript, ScriptCall};

/// Default of [`ConsumerOptions::handler_timeout`]: 10 minutes.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(600);

/// The error a handler returns; its `Display` is recorded as the dead letter's `error`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// One delivered message, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamMessage<T> {
    /// The entry id.
    pub id: String,
    /// The decoded payload.
    pub payload: T,
    /// How many times the message has been delivered to the group, this delivery included.
    pub delivery_count: u64,
    /// The producer idempotency key, when it was published with one.
    pub idempotency_key: Option<String>,
    /// The original id when this message is a replayed dead letter.
    pub replay_of: Option<String>,
}

/// Handles messages of type `T`. Return `Ok(())` to ack; an error leaves the message pending
/// for redelivery (and, after `max_retries` deliveries, dead-letters it).
///
/// Closures `Fn(StreamMessage<T>) -> impl Future<Output = Result<(), E>>` implement it.
#[async_trait::async_trait]
pub trait StreamHandler<T>: Send + Sync + 'static {
    /// Handles one message.
    async fn handle(&self, message: StreamMessage<T>) -> Result<(), HandlerError>;
}

#[async_trait::async_trait]
impl<T, F, Fut, E> StreamHandler<T> for F
where
    T: Send + 'static,
    F: Fn(StreamMessage<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Into<HandlerError>,
{
    async fn handle(&self, message: StreamMessage<T>) -> Result<(), HandlerError> {
        (self)(message).await.map_err(Into::into)
    }
}

/// Settings of a [`StreamConsumer`]. Defaults: batch 100, block 5 s, 8 concurrent handlers,
/// claim after 60 s idle (checked every 30 s), handlers cancelled after 10 min, dead letter
/// after 3 deliveries, dead letters trimmed after 7 days (when the next one is added),
/// idempotency records kept 24 h, idle consumers with empty pending lists removed after 1 h.
///
/// A dead letter replayed after its groups' idempotency records have expired runs again in
/// the groups that had handled it: keep [`idempotency_ttl`](Self::idempotency_ttl) above the
/// time within which you replay. A running consumer holds one pooled dedicated connection
/// (`REDIS_POOL_SIZE`) for as long as it runs.
///
/// Every duration is at most [`ConsumerOptions::MAX_DURATION`] (1 year); out-of-range values
/// are refused by [`super::Streams::consumer`] with [`Error::InvalidInput`] naming the option.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Entries per `XREADGROUP` / `XAUTOCLAIM` (`COUNT`).
    pub batch: usize,
    /// How long one `XREADGROUP` blocks waiting for new entries.
    pub block: Duration,
    /// Handlers running at once: the consumer runs this many worker tasks, each handling one
    /// message at a time.
    pub concurrency: usize,
    /// Pending entries idle this long (of any consumer, crashed ones included) are claimed.
    /// While this consumer holds a message (queued, running, or its ack being retried) it
    /// resets the message's idle time every third of this, so no claim takes it meanwhile; a
    /// message another consumer claimed all the same (this one stalled past it) is left to
    /// that consumer.
    pub claim_min_idle: Duration,
    /// How long a handler may run on one message (default 10 min, at least 1 ms). Past it the
    /// handler is cancelled (its future dropped, which takes effect at its next `.await`: a
    /// handler blocking its thread is not stopped) and the delivery counts as failed: retried
    /// after a claim, or dead-lettered at `max_retries`, so a handler that legitimately runs
    /// longer needs a larger value. Work the handler spawned elsewhere is not stopped.
    pub handler_timeout: Duration,
    /// How often to claim; `None` = half of `claim_min_idle`.
    pub claim_interval: Option<Duration>,
    /// Deliveries after which a failing message goes to the dead-letter stream.
    pub max_retries: u64,
    /// Dead letters older than this are trimmed (by id age) whenever one is added; at least
    /// 1 ms.
    pub dead_letter_retention: Duration,
    /// Lifetime of `processed` records; `None` turns consumer-side idempotency off.
    pub idempotency_ttl: Option<Duration>,
    /// Where the group starts if this consumer creates it; `None` = the documented default
    /// ([`StartFrom::default_for`]).
    pub start: Option<StartFrom>,
    /// The consumer's name; `None` = `<host>-<pid>-<random>`.
    pub consumer_name: Option<String>,
    /// Consumers of the group idle this long with nothing pending are deleted; `None` = never.
    pub remove_idle_consumers_after: Option<Duration>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            batch: 100,
            block: Duration::from_secs(5),
            concurrency: 8,
            claim_min_idle: Duration::from_secs(60),
            claim_interval: None,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            max_retries: 3,
            dead_letter_retention: DEFAULT_DEAD_LETTER_RETENTION,
            idempotency_ttl: Some(DEFAULT_IDEMPOTENCY_TTL),
            start: None,
            consumer_name: None,
            remove_idle_consumers_after: Some(Duration::from_secs(3600)),
        }
    }
}

impl ConsumerOptions {
    /// Sets [`ConsumerOptions::batch`].
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
    /// Sets [`ConsumerOptions::block`].
    pub fn with_block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }
    /// Sets [`ConsumerOptions::concurrency`].
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }
    /// Sets [`ConsumerOptions::claim_min_idle`].
    pub fn with_claim_min_idle(mut self, idle: Duration) -> Self {
        self.claim_min_idle = idle;
        self
    }
    /// Sets [`ConsumerOptions::claim_interval`].
    pub fn with_claim_interval(mut self, interval: Duration) -> Self {
        self.claim_interval = Some(interval);
        self
    }
    /// Sets [`ConsumerOptions::handler_timeout`].
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }
    /// Sets [`ConsumerOptions::max_retries`].
    pub fn with_max_retries(mut self, max_retries: u64) -> Self {
        self.max_retries = max_retries;
        self
    }
    /// Sets [`ConsumerOptions::dead_letter_retention`].
    pub fn with_dead_letter_retention(mut self, retention: Duration) -> Self {
        self.dead_letter_retention = retention;
        self
    }
    /// Sets [`ConsumerOptions::idempotency_ttl`] (`None` = off).
    pub fn with_idempotency_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.idempotency_ttl = ttl;
        self
    }
    /// Sets [`ConsumerOptions::start`].
    pub fn with_start(mut self, start: StartFrom) -> Self {
        self.start = Some(start);
        self
    }
    /// Sets [`ConsumerOptions::consumer_name`].
    pub fn with_consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }
    /// Sets [`ConsumerOptions::remove_idle_consumers_after`].
    pub fn with_remove_idle_consumers_after(mut self, after: Option<Duration>) -> Self {
        self.remove_idle_consumers_after = after;
        self
    }

    /// The longest duration any option accepts: 1 year. Longer ones overflow timers, or make
    /// Redis refuse the `PX`/`BLOCK` argument on every call.
    pub const MAX_DURATION: Duration = crate::codec::MAX_OPTION_DURATION;

    /// While this many messages are held (queued, running, or waiting for their ack), the
    /// consumer reads and claims nothing more: `2 × batch + concurrency`.
    fn hold_limit(&self) -> usize {
        self.batch
            .saturating_mul(2)
            .saturating_add(self.concurrency)
    }

    fn claim_every(&self) -> Duration {
        self.claim_interval
            .unwrap_or(self.claim_min_idle / 2)
            .max(Duration::from_millis(10))
    }

    /// How often the messages this consumer holds get their idle time reset: three times per
    /// `claim_min_idle`, so that a late heartbeat or two still keeps them from a claim.
    fn heartbeat_every(&self) -> Duration {
        (self.claim_min_idle / 3).max(Duration::from_millis(1))
    }

    fn validate(&self) -> Result<()> {
        let bounded = |what: &'static str, d: Option<Duration>| -> Result<()> {
            d.map_or(Ok(()), |d| crate::codec::at_most_a_year(what, d))
        };
        bounded("block", Some(self.block))?;
        bounded("claim_min_idle", Some(self.claim_min_idle))?;
        bounded("claim_interval", self.claim_interval)?;
        bounded("handler_timeout", Some(self.handler_timeout))?;
        bounded("dead_letter_retention", Some(self.dead_letter_retention))?;
        bounded("idempotency_ttl", self.idempotency_ttl)?;
        bounded(
            "remove_idle_consumers_after",
            self.remove_idle_consumers_after,
        )?;
        if self.dead_letter_retention < Duration::from_millis(1) {
            return Err(Error::invalid(
                "dead_letter_retention",
                "must be at least 1 ms and at most 1 year (0 would trim every dead letter)",
            ));
        }
        if self.batch == 0 || self.batch > 10_000 {
            return Err(Error::invalid("batch", "must be 1..=10000"));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(Error::invalid("concurrency", "must be 1..=10000"));
        }
        if self.max_retries == 0 {
            return Err(Error::invalid("max_retries", "must be at least 1"));
        }
        if self.block < Duration::from_millis(1) {
            return Err(Error::invalid(
                "block",
                "must be at least 1 ms and at most 1 year (BLOCK 0 would wait forever)",
            ));
        }
        if self.claim_min_idle < Duration::from_millis(1) {
            return Err(Error::invalid(
                "claim_min_idle",
                "must be at least 1 ms and at most 1 year",
            ));
        }
        if self.handler_timeout < Duration::from_millis(1) {
            return Err(Error::invalid(
                "handler_timeout",
                "must be at least 1 ms and at most 1 year",
            ));
        }
        if self
            .idempotency_ttl
            .is_some_and(|t| t < Duration::from_millis(1))
        {
            return Err(Error::invalid(
                "idempotency_ttl",
                "must be at least 1 ms and at most 1 year",
            ));
        }
        Ok(())
    }
}

/// A snapshot of a consumer's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConsumerMetrics {
    /// Messages handled successfully and acknowledged.
    pub processed: u64,
    /// Messages acknowledged without running the handler: already processed (idempotency).
    pub duplicates: u64,
    /// Failed deliveries left pending for another attempt.
    pub retried: u64,
    /// Messages moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Pending entries whose message had been trimmed or deleted: cleared, never handled.
    pub cleared: u64,
    /// Entries taken over by `XAUTOCLAIM` (idle in this or another consumer).
    pub claimed: u64,
    /// Messages this consumer held that another consumer claimed meanwhile (this one stalled
    /// past `claim_min_idle`), found by a touch: "lease lost", left to the new owner.
    pub lost: u64,
    /// Acknowledgements that found the message no longer pending (acked elsewhere).
    pub already_acked: u64,
    /// Redis errors met by the loop (each retried after a pause).
    pub errors: u64,
    /// Handlers running now.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    cleared: AtomicU64,
    claimed: AtomicU64,
    lost: AtomicU64,
    already_acked: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ConsumerMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerMetrics {
            processed: get(&self.processed),
            duplicates: get(&self.duplicates),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            cleared: get(&self.cleared),
            claimed: get(&self.claimed),
            lost: get(&self.lost),
            already_acked: get(&self.already_acked),
            errors: get(&self.errors),
            in_flight: get(&self.in_flight),
        }
    }
}

/// A consumer of one group of one stream. Obtained from [`super::Streams::consumer`].
///
/// Run it with [`StreamConsumer::spawn`] (a task and a [`ConsumerHandle`]) or
/// [`StreamConsumer::run`] (until a shutdown future completes).
///
/// Round trips, all but the read on the handle's shared connection:
/// - **Read:** one `XREADGROUP .. BLOCK` on a dedicated connection (bounded by block + a
///   margin; the shared connection is never blocked); with idempotency on, one `MGET` of the
///   batch's `processed` records.
/// - **Ack:** one call per group of finished messages, up to 1000 ids: `XACK`, or with
///   idempotency on the script `SET <record> <id> PX <ttl>` ... + `XACK`, atomic (a record is
///   never written without its ack, nor the ack without the record). Acks of messages that
///   finish while an ack is in flight are sent together. A failed ack, a timed-out one
///   included (repeating it is safe), is retried after 25 ms, doubling up to 1 s, until it
///   succeeds; once shutdown began, for at most 10 s more. While an ack is being retried, the
///   consumer reads and claims nothing new.
/// - **Failure:** a delivery that fails at `max_retries` deliveries goes to the dead-letter
///   stream by one atomic script (see [`super::Streams::dead_letters`]) if it is still pending
///   for this consumer; earlier failures cost nothing (the message stays pending). A handler
///   running longer than `handler_timeout` is cancelled and its delivery fails.
/// - **Claim pass,** every claim interval: one touch script (below) when this consumer holds
///   messages, then up to 10 pages of `XAUTOCLAIM` of `batch` entries; per page, if needed,
///   one `XACK` of entries whose message was deleted, one pipeline of one `XPENDING` per
///   claimed entry (its delivery count), one `MGET` of their `processed` records (idempotency
///   on), and one dead-letter script per message delivered more than `max_retries` times.
///   Every 10th pass also runs the idle-consumer removal script.
/// - **Heartbeat,** every `claim_min_idle / 3` while this consumer holds messages (queued,
///   running, or acked but not yet confirmed): one touch script per 1000 ids, atomic per
///   call. For each id still pending for this consumer (`XPENDING <stream> <group> <id> <id> 1
///   <self>`) it sends `XCLAIM <stream> <group> <self> 0 <id> JUSTID`, which resets the idle
///   time without counting a delivery, so no claim takes a message while it is held, however
///   long its handler runs (up to `handler_timeout`). An id another consumer claimed meanwhile
///   (this one stalled past `claim_min_idle`) is left to it: "lease lost", its outcome is the
///   new owner's (this consumer's later ack is harmless, its failure is not recorded). An id
///   whose entry was deleted is acked and counted as `cleared`; its handler's failure is not
///   dead-lettered. This consumer never dispatches or dead-letters a message it holds.
/// - **Back-pressure:** while `2 × batch + concurrency` messages or more are held, or an ack
///   is being retried, no read or claim pass runs.
/// - **Shutdown:** one give-back script per 1000 messages read but not started, atomic per
///   call. For each id still pending for this consumer it reads the delivery count from
///   `XPENDING <stream> <group> <id> <id> 1 <self>` and sends `XCLAIM <stream> <group> <self> 0
///   <id> IDLE <claim_min_idle> RETRYCOUNT <count - 1, at least 0> JUSTID`: the delivery whose
///   handler never ran is not counted (so it never brings a message nearer its dead letter),
///   and any consumer's next claim takes it at once. An id pending for another consumer is
///   left alone. If the script fails, the messages stay pending as they are (counted in
///   `errors`, logged) and their next claim counts one delivery more.
///
/// Handlers run on `concurrency` worker tasks fed from a queue; the next batch is read once
/// every message of the current one has started, so a crash leaves unstarted at most the rest
/// of one batch. A panicking handler fails its own message only (as an error would), and its
/// worker goes on. An entry that cannot be decoded (its payload, or a field name that is not
/// UTF-8) is a failed delivery like a handler error: retried, then dead-lettered with the
/// reason as its error; the other entries of its batch are handled.
///
/// A group that vanishes while the consumer runs (its stream deleted, perhaps re-created by a
/// producer's `XADD`, or the group destroyed) is created again on the next `NOGROUP` reply, by
/// one `XGROUP CREATE .. MKSTREAM` at the highest entry id this consumer's `XREADGROUP .. >`
/// returned or the group's last delivered id when the consumer started (`XINFO GROUPS`, one
/// round trip at start), whichever is higher, or at `0` when neither is known: never at `$`
/// (whatever [`StartFrom`] says),
/// so nothing published meanwhile is skipped. After an `XGROUP DESTROY` of a live stream,
/// messages past that id that other consumers of the group had read are delivered again
/// (duplicates rather than loss), and acks of messages read before find nothing to ack.
pub struct StreamConsumer<T> {
    redis: Redis,
    keys: StreamKeys,
    group: String,
    name: String,
    options: ConsumerOptions,
    counters: Arc<Counters>,
    _payload: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for StreamConsumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("stream", &self.keys.stream())
            .field("group", &self.group)
            .field("name", &self.name)
            .field("options", &self.options)
            .finish()
    }
}

/// A running consumer (from [`StreamConsumer::spawn`]). Dropping it shuts the consumer down
/// gracefully in the background.
#[derive(Debug)]
pub struct ConsumerHandle {
    name: String,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<ConsumerMetrics>>,
}

impl ConsumerHandle {
    /// The consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counters now.
    pub fn metrics(&self) -> ConsumerMetrics {
        self.counters.snapshot()
    }

    /// Whether the consumer task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops reading, gives the messages read but not started back to the group (pending,
    /// without counting their delivery, claimable at once), waits for the handlers in flight,
    /// acks what finished (an ack Redis does not confirm is retried for at most 10 s), and
    /// returns the final counters.
    pub async fn shutdown(mut self) -> Result<ConsumerMetrics> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(Error::Unavailable {
                message: format!("the consumer task failed: {e}"),
                source: None,
            }),
        }
    }

    /// Kills the consumer at once, as a crash would: handlers are dropped mid-message, nothing
    /// more is acked, and its pending entries wait for another consumer's claim.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Generates `<host>-<pid>-<random>` from characters allowed in a key part.
fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_else(|| "host".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    format!("{host}-{}-{}", std::process::id(), crate::random::token(6))
}

impl<T: DeserializeOwned + Send + 'static> StreamConsumer<T> {
    pub(crate) fn new(
        redis: Redis,
        keys: StreamKeys,
        group: String,
        options: ConsumerOptions,
    ) -> Result<Self> {
        options.validate()?;
        redis.require_scripting("stream consumer (dead letters, idempotency records)")?;
        let name = match &options.consumer_name {
            Some(name) => validate_key_part("consumer name", name)?.to_owned(),
            None => default_consumer_name(),
        };
        Ok(StreamConsumer {
            redis,
            keys,
            group,
            name,
            options,
            counters: Arc::new(Counters::default()),
            _payload: PhantomData,
        })
    }

    /// The consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The counters now.
    pub fn metrics(&self) -> ConsumerMetrics {
        self.counters.snapshot()
    }

    /// Runs on a new task until [`ConsumerHandle::shutdown`] (or the handle is dropped).
    pub fn spawn<H: StreamHandler<T>>(self, handler: H) -> ConsumerHandle {
        let (stop, stopped) = oneshot::channel::<()>();
        let name = self.name.clone();
        let counters = self.counters.clone();
        let task = tokio::spawn(async move {
            self.run(handler, async move {
                let _ = stopped.await;
            })
            .await
        });
        ConsumerHandle {
            name,
            counters,
            stop: Some(stop),
            task,
        }
    }

    /// Creates the group if needed (`MKSTREAM`; an existing group is fine), then consumes until
    /// `shutdown` completes; then stops reading, gives the messages read but not started back
    /// (see *Shutdown* on [`StreamConsumer`]), waits for the handlers in flight, acks what
    /// finished (retrying a failed ack for at most 10 s), and returns the counters. Redis
    /// errors inside the loop are counted and retried after a pause; only a failure to create
    /// the group ends it early.
    pub async fn run<H: StreamHandler<T>>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ConsumerMetrics> {
        let start = self
            .options
            .start
            .unwrap_or_else(|| StartFrom::default_for(&self.group));
        create_group(&self.redis, &self.keys, &self.group, start).await?;
        // Where the group stood when this consumer started: if the group vanishes before this
        // consumer reads anything, it is created again here, not at `0`, so a long retained
        // stream is not delivered again from its start. (Best effort: unknown means `0`.)
        let group_start = match group_info(&self.redis, &self.keys, &self.group).await {
            Ok(info) => info.and_then(|g| entry_id(&g.last_delivered_id)),
            Err(e) => {
                tracing::warn!(stream = self.keys.stream(), group = self.group, error = %e,
                    "reading the group's last delivered id failed");
                None
            }
        };

        let held = Arc::new(Held::default());
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        // JoinSets, not detached tasks: when this future is dropped (an abort, as a crash), the
        // acker and the heartbeat die with it, so the messages it held become claimable.
        let mut acking = JoinSet::new();
        acking.spawn(acker(
            Acker {
                redis: self.redis.clone(),
                keys: self.keys.clone(),
                group: self.group.clone(),
                idempotency_ttl: self.options.idempotency_ttl,
                counters: self.counters.clone(),
                held: held.clone(),
            },
            ack_rx,
        ));
        let (stop_heartbeat, heartbeat_stopped) = oneshot::channel::<()>();
        let mut beating = JoinSet::new();
        beating.spawn(heartbeat(
            Toucher {
                redis: self.redis.clone(),
                keys: self.keys.clone(),
                group: self.group.clone(),
                name: self.name.clone(),
            },
            held.clone(),
            self.options.heartbeat_every(),
            self.counters.clone(),
            heartbeat_stopped,
        ));
        let ctx = Arc::new(Ctx {
            redis: self.redis.clone(),
            keys: self.keys.clone(),
            group: self.group.clone(),
            name: self.name.clone(),
            options: self.options.clone(),
            counters: self.counters.clone(),
            handler,
            acks: ack_tx,
            held: held.clone(),
            _payload: PhantomData,
        });
        let queue = Arc::new(Queue::default());
        let mut workers = JoinSet::new();
        for _ in 0..self.options.concurrency {
            workers.spawn(worker(ctx.clone(), queue.clone()));
        }
        let mut state = LoopState {
            ctx: ctx.clone(),
            queue: queue.clone(),
            conn: None,
            next_claim: Instant::now(),
            next_cleanup: later(self.options.claim_every().saturating_mul(10)),
            failures: 0,
            last_read: group_start,
            claim_cursor: "0-0".to_owned(),
        };
        let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = state.step() => {}
            }
        }
        // A read cut short may still have a reply on its way: never reuse that connection.
        if let Some(conn) = state.conn.take() {
            conn.discard();
        }
        // Handlers running now finish (and are acked); queued jobs never start: no longer
        // held, they are given back to the group without the delivery that never ran, idle
        // enough for another consumer's next claim.
        queue.ready.close();
        let unstarted: Vec<Job> = queue.lock().jobs.drain(..).collect();
        for job in &unstarted {
            held.release(job.ids());
        }
        let ids: Vec<&str> = unstarted.iter().flat_map(Job::ids).collect();
        if !ids.is_empty() {
            let toucher = Toucher {
                redis: self.redis.clone(),
                keys: self.keys.clone(),
                group: self.group.clone(),
                name: self.name.clone(),
            };
            if let Err(e) = toucher.give_back(&ids, self.options.claim_min_idle).await {
                Counters::add(&self.counters.errors, 1);
                tracing::warn!(stream = self.keys.stream(), group = self.group, error = %e,
                    unstarted = ids.len(), "giving back unstarted messages at shutdown failed; \
                    they stay pending, and their next claim counts one delivery more");
            }
        }
        while workers.join_next().await.is_some() {}
        drop(state);
        drop(ctx);
        // The acker ends once every ack is settled (or given up on); until then the heartbeat
        // keeps the messages it is retrying from a claim.
        while acking.join_next().await.is_some() {}
        let _ = stop_heartbeat.send(());
        while beating.join_next().await.is_some() {}
        Ok(self.counters.snapshot())
    }
}

/// `now + d`, or as far as the clock allows (options are bounded, so this never happens).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(ConsumerOptions::MAX_DURATION))
        .unwrap_or(now)
}

struct Ctx<T, H> {
    redis: Redis,
    keys: StreamKeys,
    group: String,
    name: String,
    options: ConsumerOptions,
    counters: Arc<Counters>,
    handler: H,
    acks: mpsc::UnboundedSender<Ack>,
    held: Arc<Held>,
    _payload: PhantomData<fn() -> T>,
}

/// A message ready for a handler.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    /// Why the entry could not be read exactly (see [`RawEntry::malformed`]): a failed delivery.
    malformed: Option<String>,
    /// The exact bytes of field names that are not UTF-8 (see [`RawEntry::raw_names`]).
    raw_names: Vec<(usize, Vec<u8>)>,
    delivery_count: u64,
    record: Option<String>,
    /// Later entries of the same batch with the same idempotency record: acked with this one.
    twins: Vec<String>,
}

impl Job {
    fn ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.twins.iter().map(String::as_str))
    }
}

/// A message to acknowledge, with its twins.
#[derive(Debug)]
struct Ack {
    id: String,
    twins: Vec<String>,
    record: Option<String>,
    handled: bool,
    /// An attempt that may have been applied (timed out, or connection lost) included it: ids
    /// found already acked may be its own.
    uncertain: bool,
}

impl Ack {
    fn ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.twins.iter().map(String::as_str))
    }

    fn len(&self) -> usize {
        1 + self.twins.len()
    }
}

/// The ids this consumer holds: queued, running, or handled and not yet acknowledged. The
/// heartbeat resets the idle time of those it still owns, and a claim pass never dispatches or
/// dead-letters any of them.
#[derive(Debug, Default)]
struct Held {
    state: Mutex<HeldState>,
    /// Set while the acker is retrying a failed ack: no more reads meanwhile.
    ack_failing: AtomicBool,
    /// Signalled when messages are released or an ack goes through.
    changed: Notify,
}

#[derive(Debug, Default)]
struct HeldState {
    /// Pending for this consumer as far as it knows, with the generation of the hold: the
    /// heartbeat touches these.
    owned: HashMap<String, u64>,
    /// Claimed by another consumer (or settled elsewhere) while still held here: their
    /// outcome belongs to the new owner.
    lost: HashSet<String>,
    /// Deleted or trimmed from the stream while held here: cleared from the pending list.
    gone: HashSet<String>,
    /// Bumped on every hold. A touch reply describes the hold its snapshot saw; an id released
    /// and held again since (claimed back from a stalled consumer) is a new hold, which that
    /// stale reply must not mark lost or gone.
    generation: u64,
}

/// What became of a held message while this consumer had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Still pending for this consumer (as far as the last touch saw).
    Owned,
    /// Another consumer has it now (or it was acked elsewhere).
    Lost,
    /// Its entry was deleted from the stream; its pending entry was cleared.
    Gone,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, HeldState> {
        // Never held across user code or an await, so poisoning cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut held = self.lock();
        held.generation += 1;
        let generation = held.generation;
        for id in ids {
            held.lost.remove(id);
            held.gone.remove(id);
            held.owned.insert(id.to_owned(), generation);
        }
    }

    fn release<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        {
            let mut held = self.lock();
            for id in ids {
                held.owned.remove(id);
                held.lost.remove(id);
                held.gone.remove(id);
            }
        }
        self.changed.notify_waiters();
    }

    /// Whether a handler of this consumer has `id` (owned, lost or gone). A lost id that this
    /// consumer just claimed back is owned again: its handler is still running it.
    fn claimed_back(&self, id: &str) -> bool {
        let mut held = self.lock();
        if held.lost.remove(id) {
            // Owned again: a new hold, so a touch reply from before it cannot mark it lost.
            held.generation += 1;
            let generation = held.generation;
            held.owned.insert(id.to_owned(), generation);
            return true;
        }
        held.owned.contains_key(id) || held.gone.contains(id)
    }

    fn fate(&self, id: &str) -> Fate {
        let held = self.lock();
        if held.lost.contains(id) {
            Fate::Lost
        } else if held.gone.contains(id) {
            Fate::Gone
        } else {
            Fate::Owned
        }
    }

    /// Moves the ids a touch of `snapshot` (from [`Held::owned`]) found lost or gone out of
    /// `owned`, only where the hold is the one the snapshot saw: ids released meanwhile stay
    /// released, and ids held again since stay owned (the reply is about the old hold).
    fn mark(&self, snapshot: &[(String, u64)], lost: &[String], gone: &[String]) {
        let seen: HashMap<&str, u64> = snapshot.iter().map(|(id, g)| (id.as_str(), *g)).collect();
        let mut held = self.lock();
        let same_hold = |held: &HeldState, id: &str| {
            seen.get(id).is_some_and(|g| held.owned.get(id) == Some(g))
        };
        for id in lost {
            if same_hold(&held, id) {
                held.owned.remove(id);
                held.lost.insert(id.clone());
            }
        }
        for id in gone {
            if same_hold(&held, id) {
                held.owned.remove(id);
                held.gone.insert(id.clone());
            }
        }
    }

    /// Every message held, whatever its fate.
    fn len(&self) -> usize {
        let held = self.lock();
        held.owned.len() + held.lost.len() + held.gone.len()
    }

    /// The owned ids, each with the generation of its hold (for [`Held::mark`]).
    fn owned(&self) -> Vec<(String, u64)> {
        let held = self.lock();
        held.owned.iter().map(|(id, g)| (id.clone(), *g)).collect()
    }

    fn set_ack_failing(&self, failing: bool) {
        self.ack_failing.store(failing, Ordering::Relaxed);
        if !failing {
            self.changed.notify_waiters();
        }
    }

    fn ack_failing(&self) -> bool {
        self.ack_failing.load(Ordering::Relaxed)
    }
}

/// Most ids per touch script (and per ack).
const MAX_IDS: usize = 1000;

// Resets the idle time of the messages a consumer holds, only where it still owns them.
static TOUCH: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_touch",
        r#"
-- KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] ids the consumer holds.
-- Per id: pending for this consumer -> XCLAIM .. 0 .. JUSTID (idle time reset, delivery count
-- unchanged); pending for another consumer -> lost, and no longer pending -> settled (both left
-- alone); pending for this consumer but deleted from the stream -> XACK, gone.
-- Returns {lost, gone, settled}.
local lost, gone, settled = {}, {}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) == 0 then
    if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) == 0 then
      settled[#settled + 1] = id
    else
      lost[#lost + 1] = id
    end
  elseif #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    gone[#gone + 1] = id
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  end
end
return {lost, gone, settled}
"#,
    )
});

// Gives messages a consumer read but never started back to its group at shutdown, as if that
// delivery had not happened.
static GIVE_BACK: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_give_back",
        r#"
-- KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms, ARGV[4..] ids the consumer
-- read and never started. Per id still pending for this consumer: XCLAIM .. 0 .. IDLE <idle>
-- RETRYCOUNT <its delivery count - 1, at least 0> JUSTID (the delivery that never ran is not
-- counted, and the entry is idle enough for any consumer's claim at once); ids pending for
-- another consumer, or no longer pending, are left alone. Returns how many were given back.
local given = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])[1]
  if row then
    local count = math.max(tonumber(row[4]) - 1, 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', count,
      'JUSTID')
    given = given + 1
  end
end
return given
"#,
    )
});

/// Sends the touch scripts (heartbeat and claim pass) and the give-back script (shutdown).
struct Toucher {
    redis: Redis,
    keys: StreamKeys,
    group: String,
    name: String,
}

impl Toucher {
    /// One [`TOUCH`] script per [`MAX_IDS`] of the ids `held` owns: resets the idle time of
    /// those still pending for this consumer, and moves the ones another consumer took (lost)
    /// or whose entry was deleted (gone, counted as `cleared`) out of the owned set.
    async fn touch(&self, held: &Held, counters: &Counters) -> Result<()> {
        let stream = self.keys.stream();
        for chunk in held.owned().chunks(MAX_IDS) {
            let mut call = ScriptCall::new()
                .key(stream)
                .arg(&self.group)
                .arg(&self.name);
            for (id, _) in chunk {
                call = call.arg(id.as_str());
            }
            let reply = self.redis.eval_script(&TOUCH, &call).await?;
            let (mut lost, gone, settled) = reply::touched(stream, reply)?;
            if !lost.is_empty() {
                Counters::add(&counters.lost, lost.len() as u64);
                tracing::warn!(stream, group = self.group, consumer = self.name, ids = ?lost,
                    "lease lost: another consumer claimed messages this one still holds (it \
                     stalled past claim_min_idle); their outcome is the new owner's");
            }
            if !gone.is_empty() {
                Counters::add(&counters.cleared, gone.len() as u64);
                tracing::warn!(stream, group = self.group, consumer = self.name, ids = ?gone,
                    "held messages were deleted from the stream; their pending entries are \
                     cleared");
            }
            // Acked elsewhere (or by this consumer's ack in flight): not this consumer's either.
            lost.extend(settled);
            held.mark(chunk, &lost, &gone);
        }
        Ok(())
    }

    /// One [`GIVE_BACK`] script per [`MAX_IDS`] of `ids` (read by this consumer, never
    /// started): each id still pending for this consumer gets its delivery count lowered by
    /// one (the server's count, read in the script) and an idle time of `idle`, so the next
    /// claim hands it out at once without counting a delivery that never ran. Returns how many
    /// were given back. Atomic per call.
    async fn give_back(&self, ids: &[&str], idle: Duration) -> Result<u64> {
        let stream = self.keys.stream();
        let mut given = 0;
        for chunk in ids.chunks(MAX_IDS) {
            let mut call = ScriptCall::new()
                .key(stream)
                .arg(&self.group)
                .arg(&self.name)
                .arg(millis(idle));
            for id in chunk {
                call = call.arg(*id);
            }
            let reply = self.redis.eval_script(&GIVE_BACK, &call).await?;
            given += u64::try_from(int(stream, reply)?).unwrap_or(0);
        }
        Ok(given)
    }
}

/// Every `every` until `stop`, resets the idle time of the messages this consumer holds, so
/// that no claim takes them while they wait in the queue, run, or wait for their ack.
async fn heartbeat(
    toucher: Toucher,
    held: Arc<Held>,
    every: Duration,
    counters: Arc<Counters>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = toucher.touch(&held, &counters).await {
            Counters::add(&counters.errors, 1);
            tracing::warn!(stream = toucher.keys.stream(), error = %e,
                "stream consumer heartbeat failed; held messages may be claimed elsewhere");
        }
    }
}

impl<T: DeserializeOwned + Send + 'static, H: StreamHandler<T>> Ctx<T, H> {
    fn decode(&self, job: &Job) -> std::result::Result<StreamMessage<T>, String> {
        if let Some(reason) = &job.malformed {
            return Err(format!("cannot decode the entry: {reason}"));
        }
        let field = |name: &str| {
            job.fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
        };
        let text = |name: &str| {
            field(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        };
        let raw = field(FIELD_PAYLOAD).ok_or_else(|| {
            format!(
                "cannot decode the payload: entry {} has no `{FIELD_PAYLOAD}` field",
                job.id
            )
        })?;
        let payload: T = from_json(self.keys.stream(), raw)
            .map_err(|e| format!("cannot decode the payload: {e}"))?;
        Ok(StreamMessage {
            id: job.id.clone(),
            payload,
            delivery_count: job.delivery_count,
            idempotency_key: text(FIELD_IDEMPOTENCY_KEY),
            replay_of: text(FIELD_REPLAY_OF),
        })
    }

    /// Decodes the message and runs the handler on it.
    async fn handle(&self, job: &Job) -> std::result::Result<(), String> {
        let message = self.decode(job)?;
        self.handler
            .handle(message)
            .await
            .map_err(|e| e.to_string())
    }

    /// A delivery failed: dead-letter it after `max_retries` deliveries, else leave it pending
    /// for a claim to redeliver.
    async fn fail(&self, job: &Job, error: &str) {
        if job.delivery_count < self.options.max_retries {
            Counters::add(&self.counters.retried, 1);
            tracing::warn!(
                stream = self.keys.stream(),
                id = job.id,
                delivery = job.delivery_count,
                error,
                "stream message failed; it stays pending for redelivery"
            );
            return;
        }
        let call = DeadLetterCall {
            group: &self.group,
            consumer: &self.name,
            id: &job.id,
            fields: &job.fields,
            raw_names: &job.raw_names,
            delivery_count: job.delivery_count,
            error,
            retention: self.options.dead_letter_retention,
        };
        match dead_letter_message(&self.redis, &self.keys, call).await {
            Ok(DeadLettered::Yes) => {
                Counters::add(&self.counters.dead_lettered, 1);
                tracing::warn!(
                    stream = self.keys.stream(),
                    id = job.id,
                    delivery = job.delivery_count,
                    error,
                    "stream message dead-lettered"
                );
            }
            // Another consumer has it now (or it was settled, or deleted and cleared by another
            // consumer's claim): its outcome is theirs.
            Ok(DeadLettered::NotOwned) => tracing::info!(
                stream = self.keys.stream(),
                id = job.id,
                delivery = job.delivery_count,
                error,
                "stream message failed at its last delivery but is no longer pending for this \
                 consumer; left to whoever holds it"
            ),
            Ok(DeadLettered::Gone) => {
                Counters::add(&self.counters.cleared, 1);
                tracing::warn!(
                    stream = self.keys.stream(),
                    id = job.id,
                    error,
                    "stream message failed after it was deleted from the stream; cleared, not \
                     dead-lettered"
                );
            }
            Err(e) => {
                Counters::add(&self.counters.errors, 1);
                tracing::warn!(stream = self.keys.stream(), id = job.id, error = %e,
                    "dead-lettering failed; the message stays pending");
            }
        }
    }
}

/// Counts a running handler until dropped.
struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Jobs waiting for a worker, shared by the read loop and the workers.
struct Queue {
    state: Mutex<QueueState>,
    /// One permit per queued job; closed at shutdown, which stops the workers.
    ready: Semaphore,
    /// Signalled when a worker takes the last queued job.
    drained: Notify,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            state: Mutex::default(),
            ready: Semaphore::new(0),
            drained: Notify::new(),
        }
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The lock is never held across user code, so poisoning cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `jobs` (already held) and waits until workers have taken every one of them, so
    /// that the next read happens only when all of this batch has started (a crash then leaves
    /// unstarted at most the rest of one batch).
    async fn dispatch(&self, jobs: Vec<Job>) {
        let n = jobs.len();
        if n == 0 {
            return;
        }
        self.lock().jobs.extend(jobs);
        self.ready.add_permits(n);
        loop {
            let drained = self.drained.notified();
            if self.lock().jobs.is_empty() {
                return;
            }
            drained.await;
        }
    }

    /// The next job, or `None` once the queue is closed.
    async fn take(&self) -> Option<Job> {
        loop {
            self.ready.acquire().await.ok()?.forget();
            let mut state = self.lock();
            let job = state.jobs.pop_front();
            if state.jobs.is_empty() {
                self.drained.notify_one();
            }
            if job.is_some() {
                return job;
            }
        }
    }
}

/// Polls a future, turning a panic into an error, so that a panicking handler fails its own
/// message only.
struct CatchUnwind<'a, F>(Pin<&'a mut F>);

impl<F: Future> Future for CatchUnwind<'_, F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(move || future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// One of the `concurrency` handler workers: takes queued jobs one at a time until shutdown.
async fn worker<T: DeserializeOwned + Send + 'static, H: StreamHandler<T>>(
    ctx: Arc<Ctx<T, H>>,
    queue: Arc<Queue>,
) {
    while let Some(job) = queue.take().await {
        // A job that waited in the queue while this consumer stalled may have been claimed by
        // another consumer (lost) or deleted (gone, counted as cleared) meanwhile: running it
        // now would handle a message twice, or one that was cancelled.
        match ctx.held.fate(&job.id) {
            Fate::Owned => {}
            fate => {
                tracing::warn!(
                    stream = ctx.keys.stream(),
                    id = job.id,
                    ?fate,
                    "stream message not started: it left this consumer while it was queued"
                );
                ctx.held.release(job.ids());
                continue;
            }
        }
        Counters::add(&ctx.counters.in_flight, 1);
        // Dropped on return, panic or abort alike.
        let guard = InFlight(ctx.counters.clone());
        let outcome = {
            let mut handling = Box::pin(ctx.handle(&job));
            let limit = ctx.options.handler_timeout;
            let result = tokio::time::timeout(limit, CatchUnwind(handling.as_mut())).await;
            match result {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_panic)) => Err("the handler panicked".to_owned()),
                Err(_) => {
                    // Cancelled: the handler's future is dropped here, and a panic in its drop
                    // must not take the worker (and its slot) with it.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(handling)));
                    Err(format!(
                        "the handler did not finish within {limit:?} (handler_timeout) and was \
                         cancelled"
                    ))
                }
            }
        };
        match outcome {
            // Still held: the acker releases it once the ack is through, so that neither a
            // claim nor the heartbeat's absence can hand it out again while the ack is retried.
            Ok(()) => {
                let ack = Ack {
                    id: job.id,
                    twins: job.twins,
                    record: job.record,
                    handled: true,
                    uncertain: false,
                };
                if let Err(mpsc::error::SendError(ack)) = ctx.acks.send(ack) {
                    ctx.held.release(ack.ids());
                }
            }
            // Settled (dead-lettered, or left pending for a later claim): no longer held.
            Err(error) => {
                match ctx.held.fate(&job.id) {
                    Fate::Owned => ctx.fail(&job, &error).await,
                    Fate::Lost => tracing::warn!(
                        stream = ctx.keys.stream(),
                        id = job.id,
                        error,
                        "stream message failed after another consumer claimed it (lease lost); \
                         its outcome is the new owner's"
                    ),
                    // Already counted as cleared by the touch that found it deleted.
                    Fate::Gone => tracing::warn!(
                        stream = ctx.keys.stream(),
                        id = job.id,
                        error,
                        "stream message failed after it was deleted from the stream; cleared, \
                         not dead-lettered"
                    ),
                }
                ctx.held.release(job.ids());
            }
        }
        drop(guard);
    }
}

struct LoopState<T, H> {
    ctx: Arc<Ctx<T, H>>,
    queue: Arc<Queue>,
    conn: Option<DedicatedConnection>,
    next_claim: Instant,
    next_cleanup: Instant,
    failures: u32,
    /// The highest entry id an `XREADGROUP .. >` of this consumer returned, starting from the
    /// group's last delivered id when the consumer started: where a group that vanished (its
    /// stream deleted, or `XGROUP DESTROY`) is created again.
    last_read: Option<(u64, u64)>,
    /// Where the next claim pass starts in the pending list (`0-0`: the beginning).
    claim_cursor: String,
}

/// The `(ms, seq)` of an entry id `<ms>-<seq>`, for ordering; `None` if it is not one.
fn entry_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl<T: DeserializeOwned + Send + 'static, H: StreamHandler<T>> LoopState<T, H> {
    /// Waits while acks are failing or too many messages are held (see
    /// [`ConsumerOptions::hold_limit`]): until a release, an ack going through, or one block
    /// period. Returns whether it waited.
    async fn throttle(&mut self) -> bool {
        let held = &self.ctx.held;
        let changed = held.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !held.ack_failing() && held.len() < self.ctx.options.hold_limit() {
            return false;
        }
        let _ = tokio::time::timeout(self.ctx.options.block, changed).await;
        true
    }

    /// One claim pass when due, else one read; neither while throttled.
    async fn step(&mut self) {
        if self.throttle().await {
            return;
        }
        let result = if Instant::now() >= self.next_claim {
            self.next_claim = later(self.ctx.options.claim_every());
            let claimed = self.claim().await;
            if claimed.is_ok() && Instant::now() >= self.next_cleanup {
                self.next_cleanup = later(self.ctx.options.claim_every().saturating_mul(10));
                self.cleanup().await
            } else {
                claimed
            }
        } else {
            self.read().await
        };
        match result {
            Ok(()) => self.failures = 0,
            Err(e) => {
                Counters::add(&self.ctx.counters.errors, 1);
                self.failures = (self.failures + 1).min(6);
                tracing::warn!(stream = self.ctx.keys.stream(), group = self.ctx.group, error = %e,
                    "stream consumer error; retrying");
                if is_server_code(&e, "NOGROUP") {
                    // The group vanished under this consumer (its stream deleted and perhaps
                    // re-created by a producer, or the group destroyed). Created at `$` it would
                    // skip what was published meanwhile: it is created where this consumer's
                    // reads stopped (at `0` before any), so nothing after them is skipped.
                    let at = self
                        .last_read
                        .map_or_else(|| "0".to_owned(), |(ms, seq)| format!("{ms}-{seq}"));
                    if let Err(e) =
                        create_group_at(&self.ctx.redis, &self.ctx.keys, &self.ctx.group, &at).await
                    {
                        tracing::warn!(stream = self.ctx.keys.stream(), group = self.ctx.group,
                            error = %e, "re-creating a vanished consumer group failed; retrying");
                    } else {
                        tracing::warn!(
                            stream = self.ctx.keys.stream(),
                            group = self.ctx.group,
                            at,
                            "the consumer group vanished; created again at the last \
                                 entry this consumer read (0: it had read none)"
                        );
                    }
                }
                tokio::time::sleep(Duration::from_millis(25 << self.failures)).await;
            }
        }
    }

    async fn read(&mut self) -> Result<()> {
        let ctx = self.ctx.clone();
        let until_claim = self.next_claim.saturating_duration_since(Instant::now());
        let block = ctx
            .options
            .block
            .min(until_claim)
            .max(Duration::from_millis(1));
        if self.conn.is_none() {
            self.conn = Some(ctx.redis.dedicated().await?);
        }
        // The connection stays in `self` while the read is in flight, so that a shutdown
        // cutting the read short finds it and discards it.
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&ctx.group)
            .arg(&ctx.name)
            .arg("COUNT")
            .arg(ctx.options.batch)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(ctx.keys.stream())
            .arg(">");
        let margin = ctx
            .redis
            .config()
            .response_timeout
            .max(Duration::from_secs(1));
        let bound = block.saturating_add(margin);
        let reply = match tokio::time::timeout(bound, cmd.query_async::<Value>(conn)).await {
            Err(_) => {
                if let Some(conn) = self.conn.take() {
                    conn.discard();
                }
                return Err(Error::Timeout {
                    operation: "XREADGROUP",
                    after: bound,
                });
            }
            Ok(Err(e)) => {
                let err = ctx.redis.fail("XREADGROUP", e);
                if (err.is_unavailable() || err.is_timeout())
                    && let Some(conn) = self.conn.take()
                {
                    conn.discard();
                }
                return Err(err);
            }
            Ok(Ok(reply)) => reply,
        };
        let entries = reply::read_group(ctx.keys.stream(), reply)?;
        // Delivered to this consumer now, whatever becomes of them.
        if let Some(last) = entries.iter().filter_map(|e| entry_id(&e.id)).max() {
            self.last_read = self.last_read.max(Some(last));
        }
        let jobs = entries.into_iter().map(|e| (e, 1)).collect::<Vec<_>>();
        self.dispatch(jobs).await
    }

    /// `XAUTOCLAIM` pages of entries idle longer than `claim_min_idle`.
    async fn claim(&mut self) -> Result<()> {
        let ctx = self.ctx.clone();
        let key = ctx.keys.stream();
        let toucher = Toucher {
            redis: ctx.redis.clone(),
            keys: ctx.keys.clone(),
            group: ctx.group.clone(),
            name: ctx.name.clone(),
        };
        // Once per pass, before its first XAUTOCLAIM: the held messages' idle time is reset (where
        // this consumer still owns them), so this pass never counts a delivery of a message this
        // consumer holds, even when the heartbeat is late.
        toucher.touch(&ctx.held, &ctx.counters).await?;
        // A pass reads at most ten pages, and each page scans at most ten times `batch` pending
        // entries: a pass that stops short of the end goes on from its cursor next time, or
        // entries held by live consumers at the front would hide idle ones behind them for as
        // long as the front keeps turning over. (A failed pass starts over.)
        let mut cursor = std::mem::replace(&mut self.claim_cursor, "0-0".to_owned());
        for _ in 0..10 {
            let reply = ctx
                .redis
                .query(
                    "XAUTOCLAIM",
                    redis::cmd("XAUTOCLAIM")
                        .arg(key)
                        .arg(&ctx.group)
                        .arg(&ctx.name)
                        .arg(millis(ctx.options.claim_min_idle))
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(ctx.options.batch),
                )
                .await?;
            let (next, claimed, deleted) = reply::autoclaim(key, reply)?;
            // Redis 7 has already removed these from the pending list; count them.
            Counters::add(&ctx.counters.cleared, deleted.len() as u64);
            let (live, gone): (Vec<_>, Vec<_>) =
                claimed.into_iter().partition(|e| e.fields.is_some());
            if !gone.is_empty() {
                let ids: Vec<&str> = gone.iter().map(|e| e.id.as_str()).collect();
                ctx.redis
                    .query(
                        "XACK",
                        redis::cmd("XACK").arg(key).arg(&ctx.group).arg(&ids),
                    )
                    .await?;
                Counters::add(&ctx.counters.cleared, ids.len() as u64);
            }
            // Belt and braces: a held message is this consumer's to settle, never to hand out
            // again or to dead-letter on a count it did not see. One it had lost and now took
            // back is its own again, and its handler still runs it.
            let live: Vec<RawEntry> = live
                .into_iter()
                .filter(|e| !ctx.held.claimed_back(&e.id))
                .collect();
            if !live.is_empty() {
                Counters::add(&ctx.counters.claimed, live.len() as u64);
                let mut pipe = redis::pipe();
                for e in &live {
                    pipe.cmd("XPENDING")
                        .arg(key)
                        .arg(&ctx.group)
                        .arg(&e.id)
                        .arg(&e.id)
                        .arg(1);
                }
                let counts = ctx
                    .redis
                    .query_pipe("XPENDING", &pipe)
                    .await?
                    .unwrap_or_default();
                let mut jobs = Vec::with_capacity(live.len());
                for (entry, count) in live.into_iter().zip(counts) {
                    // No longer pending (acked meanwhile): nothing to do.
                    if let Some(n) = reply::pending_deliveries(key, count)? {
                        jobs.push((entry, n));
                    }
                }
                self.dispatch(jobs).await?;
            }
            if next == "0-0" {
                return Ok(());
            }
            cursor = next;
        }
        self.claim_cursor = cursor;
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        if let Some(after) = self.ctx.options.remove_idle_consumers_after {
            let removed = remove_idle_consumers(
                &self.ctx.redis,
                &self.ctx.keys,
                &self.ctx.group,
                after,
                &self.ctx.name,
            )
            .await?;
            if !removed.is_empty() {
                tracing::info!(stream = self.ctx.keys.stream(), group = self.ctx.group,
                    removed = ?removed, "removed idle consumers");
            }
        }
        Ok(())
    }

    /// Skips what this group already processed, dead-letters what was delivered too often, and
    /// hands the rest to the workers.
    async fn dispatch(&mut self, entries: Vec<(RawEntry, u64)>) -> Result<()> {
        let ctx = self.ctx.clone();
        let mut jobs: Vec<Job> = Vec::with_capacity(entries.len());
        for (entry, delivery_count) in entries {
            let record = ctx.options.idempotency_ttl.map(|_| {
                let key = entry.field_text(FIELD_IDEMPOTENCY_KEY);
                let key = key.filter(|k| validate_key_part("idempotency key", k).is_ok());
                let lineage = entry.field_text(FIELD_REPLAY_OF);
                let id = lineage.as_deref().unwrap_or(&entry.id);
                ctx.keys.processed(&ctx.group, key.as_deref(), id)
            });
            let Some(fields) = entry.fields else {
                continue;
            };
            jobs.push(Job {
                id: entry.id,
                fields,
                malformed: entry.malformed,
                raw_names: entry.raw_names,
                delivery_count,
                record,
                twins: Vec::new(),
            });
        }
        if ctx.options.idempotency_ttl.is_some() && !jobs.is_empty() {
            jobs = self.skip_processed(jobs).await?;
        }
        let (exhausted, ready): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|job| job.delivery_count > ctx.options.max_retries);
        for job in &exhausted {
            let error = format!(
                "delivered {} times without success (the consumers holding it stopped without \
                 an outcome)",
                job.delivery_count
            );
            ctx.fail(job, &error).await;
        }
        // Held and queued with no await in between: a shutdown cutting this short never leaves
        // a message held that no worker will take.
        for job in &ready {
            ctx.held.hold(job.ids());
        }
        self.queue.dispatch(ready).await;
        Ok(())
    }

    /// One `MGET` of the batch's `processed` records: processed messages (and later twins of
    /// one idempotency key within the batch) are acked without running the handler.
    async fn skip_processed(&mut self, jobs: Vec<Job>) -> Result<Vec<Job>> {
        let ctx = self.ctx.clone();
        let records: Vec<&str> = jobs.iter().filter_map(|j| j.record.as_deref()).collect();
        let reply = ctx
            .redis
            .query("MGET", redis::cmd("MGET").arg(&records))
            .await?;
        let Value::Array(found) = reply else {
            return Err(Error::decode(
                ctx.keys.stream(),
                None,
                format!("unexpected MGET reply {reply:?}"),
            ));
        };
        let mut out: Vec<Job> = Vec::with_capacity(jobs.len());
        let mut by_record: HashMap<String, usize> = HashMap::new();
        for (job, seen) in jobs.into_iter().zip(found) {
            let Some(record) = job.record.clone() else {
                out.push(job);
                continue;
            };
            if !matches!(seen, Value::Nil) {
                // Held until the acker has it through, like a handled message.
                ctx.held.hold([job.id.as_str()]);
                let ack = Ack {
                    id: job.id,
                    twins: Vec::new(),
                    record: None,
                    handled: false,
                    uncertain: false,
                };
                if let Err(mpsc::error::SendError(ack)) = ctx.acks.send(ack) {
                    ctx.held.release(ack.ids());
                }
                continue;
            }
            if let Some(&first) = by_record.get(&record) {
                out[first].twins.push(job.id);
                continue;
            }
            by_record.insert(record, out.len());
            out.push(job);
        }
        Ok(out)
    }
}

// Writes the `processed` records (value: the handled id) and acks, in one step.
static ACK_PROCESSED: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_ack_processed",
        r#"
-- KEYS[1] stream, KEYS[2..] processed records; ARGV[1] group, ARGV[2] ttl ms,
-- ARGV[3] number of records, ARGV[4..3+n] the id recorded in each, ARGV[4+n..] ids to ack
local n = tonumber(ARGV[3])
for i = 1, n do
  redis.call('SET', KEYS[i + 1], ARGV[3 + i], 'PX', ARGV[2])
end
-- In slices: one record may carry thousands of twins, and `unpack` of more than about 8000
-- values overflows the Lua stack.
local acked = 0
for i = 4 + n, #ARGV, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return acked
"#,
    )
});

/// How long, once shutdown has begun, a failing ack is still retried before its messages are
/// left pending (for a claim, and another handling).
const SHUTDOWN_ACK_RETRY: Duration = Duration::from_secs(10);

/// What the acker needs.
struct Acker {
    redis: Redis,
    keys: StreamKeys,
    group: String,
    idempotency_ttl: Option<Duration>,
    counters: Arc<Counters>,
    held: Arc<Held>,
}

impl Acker {
    /// One ack call for `batch`: `XACK`, or the records and the `XACK` in one script. Returns
    /// how many ids `XACK` found pending. Safe to repeat: `SET` of the same value and `XACK` of
    /// an acked id change nothing.
    async fn send(&self, batch: &[Ack]) -> Result<u64> {
        let all: Vec<&str> = batch.iter().flat_map(Ack::ids).collect();
        let records: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|a| Some((a.record.as_deref()?, a.id.as_str())))
            .collect();
        let stream = self.keys.stream();
        let reply = match self.idempotency_ttl {
            Some(ttl) if !records.is_empty() => {
                let mut call = ScriptCall::new().key(stream);
                for (record, _) in &records {
                    call = call.key(*record);
                }
                call = call
                    .arg(&self.group)
                    .arg(millis(ttl).max(1))
                    .arg(records.len());
                for (_, id) in &records {
                    call = call.arg(*id);
                }
                for id in &all {
                    call = call.arg(*id);
                }
                self.redis.eval_script(&ACK_PROCESSED, &call).await?
            }
            _ => {
                self.redis
                    .query(
                        "XACK",
                        redis::cmd("XACK").arg(stream).arg(&self.group).arg(&all),
                    )
                    .await?
            }
        };
        Ok(u64::try_from(int(stream, reply)?).unwrap_or(0))
    }

    /// Counts a batch that went through (or was given up on) and stops holding its messages.
    fn settle(&self, batch: &[Ack], acked: Option<u64>) {
        // Ids whose entry a touch found deleted were cleared from the pending list already:
        // their XACK finds nothing, which says nothing about another consumer.
        let expected = batch
            .iter()
            .filter(|a| !a.uncertain)
            .flat_map(Ack::ids)
            .filter(|id| self.held.fate(id) != Fate::Gone)
            .count() as u64;
        for ack in batch {
            self.held.release(ack.ids());
        }
        let Some(acked) = acked else {
            return;
        };
        let all = batch.iter().map(Ack::len).sum::<usize>() as u64;
        let handled = batch.iter().filter(|a| a.handled).count() as u64;
        Counters::add(&self.counters.processed, handled);
        Counters::add(&self.counters.duplicates, all.saturating_sub(handled));
        // An attempt that may have been applied (timed out, or its connection lost after
        // sending) may have acked its ids already: those say nothing about another consumer.
        // `acked` may include some of them, so this is a lower bound, exact without them.
        Counters::add(&self.counters.already_acked, expected.saturating_sub(acked));
    }
}

/// Acknowledges finished messages, coalescing whatever finished while the previous ack was in
/// flight into one call of at most [`MAX_IDS`] ids. A failed call (a timeout included) is
/// retried, with what arrived meanwhile, until it succeeds; once every sender is gone
/// (shutdown), for at most [`SHUTDOWN_ACK_RETRY`].
async fn acker(acker: Acker, mut rx: mpsc::UnboundedReceiver<Ack>) {
    let mut retry: Option<(Vec<Ack>, u32)> = None;
    let mut give_up_at: Option<Instant> = None;
    loop {
        let (mut batch, mut attempts) = match retry.take() {
            Some(failed) => failed,
            None => match rx.recv().await {
                Some(ack) => (vec![ack], 0),
                None => return,
            },
        };
        let mut ids: usize = batch.iter().map(Ack::len).sum();
        while ids < MAX_IDS {
            match rx.try_recv() {
                Ok(ack) => {
                    ids += ack.len();
                    batch.push(ack);
                }
                Err(_) => break,
            }
        }
        match acker.send(&batch).await {
            Ok(acked) => {
                acker.settle(&batch, Some(acked));
                acker.held.set_ack_failing(false);
            }
            Err(e) => {
                Counters::add(&acker.counters.errors, 1);
                // No more reads until this goes through.
                acker.held.set_ack_failing(true);
                attempts = attempts.saturating_add(1);
                // A timeout, or a connection lost once the call was sent: maybe applied.
                if e.is_timeout() || e.is_unavailable() {
                    for ack in &mut batch {
                        ack.uncertain = true;
                    }
                }
                if rx.is_closed() {
                    let deadline = *give_up_at.get_or_insert_with(|| later(SHUTDOWN_ACK_RETRY));
                    if Instant::now() >= deadline {
                        tracing::warn!(stream = acker.keys.stream(), error = %e, ids,
                            "ack failed at shutdown; the messages stay pending and will be \
                             redelivered");
                        acker.settle(&batch, None);
                        continue;
                    }
                }
                tracing::warn!(stream = acker.keys.stream(), error = %e, ids, attempts,
                    "ack failed; retrying");
                let backoff = Duration::from_millis(25u64 << attempts.saturating_sub(1).min(6))
                    .min(Duration::from_secs(1));
                tokio::time::sleep(backoff).await;
                retry = Some((batch, attempts));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_touch_reply_leaves_an_id_held_again_owned() {
        let held = Held::default();
        let x = "1-0".to_owned();
        held.hold([x.as_str()]);
        let stale = held.owned();
        // X's handler fails and X is released, then a claim pass takes it back and holds it.
        held.release([x.as_str()]);
        held.hold([x.as_str()]);
        // The reply to the old snapshot says X is lost: it is about the old hold.
        held.mark(&stale, std::slice::from_ref(&x), &[]);
        assert_eq!(held.fate(&x), Fate::Owned);
        assert_eq!(held.owned().len(), 1);
        held.mark(&stale, &[], std::slice::from_ref(&x));
        assert_eq!(held.fate(&x), Fate::Owned);
        // A reply to a snapshot of the current hold does move it.
        let current = held.owned();
        held.mark(&current, std::slice::from_ref(&x), &[]);
        assert_eq!(held.fate(&x), Fate::Lost);
        assert!(held.owned().is_empty());
        assert_eq!(held.len(), 1);
    }
}
