//! `EmailQueue`: a priority job queue for outgoing mail that never loses a job.
//!
//! Producers [`enqueue`](EmailQueue::enqueue) [`EmailJob`]s; a [`Worker`] fetches them with a
//! lease, runs a [`JobHandler`] and acknowledges. The wire layout (see `docs/keyspace.md`,
//! `## email-queue:*`) keeps the documented lists `email-queue:high`, `email-queue:normal` and
//! `email-queue:low`: a producer in another language may `LPUSH` the documented job JSON onto
//! them and the job is consumed first-in first-out within its priority.
//!
//! Guarantees:
//! - **Reliable fetch.** A fetched job moves atomically from its list to the lease set
//!   (`active`, scored by lease deadline) and stays there until it is acknowledged, retried or
//!   buried. A worker that dies (killed process, aborted task) stops extending its leases; when a
//!   lease passes its deadline (the visibility timeout) the job goes back to the head of its list.
//!   Recovery depends on deadlines only, never on worker ids, so two workers sharing an id cannot
//!   hide each other's orphaned jobs.
//! - **Strict priority with aging.** high before normal before low, except that a list head that
//!   has waited longer than [`QueueOptions::aging`] is served first.
//! - **Idempotent enqueue** by job id while the id is known (waiting, scheduled, active, or
//!   retained as completed or dead).
//! - **Retries** with exponential backoff and jitter, then the dead set with the last error.
//! - **Nothing grows without bound**: completed ids and dead jobs are trimmed by count and age.
//! - **Per-job TTL**: a job waiting longer than the `email-queue` TTL (24 h) goes to the dead
//!   set with reason `expired`; the queue keys themselves never expire.
//!
//! Every operation that changes state is one Lua script call, atomic on the server. The queue
//! needs scripting: with `EVAL`/`EVALSHA` disabled, [`Redis::email_queue`] returns
//! [`Error::Unsupported`]. A queue's keys share one Cluster slot (one hash tag), so one queue is
//! served by one Cluster shard; spread load over shards with several named queues.

mod job;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::coalesce::{self, Batch, Coalescer};
use crate::codec::{int, now_millis, text};
use crate::error::{Error, Result};
use crate::keyspace::{Keyspace, validate_key_part};
use crate::pool::Redis;
use crate::script::{LuaScript, ScriptCall};

pub use job::{
    EmailJob, JobId, MAX_ADDRESS_LEN, MAX_BODY_LEN, MAX_ID_LEN, MAX_METADATA_DEPTH,
    MAX_METADATA_LEN, MAX_RECIPIENTS, MAX_SUBJECT_LEN, PAYLOAD_VERSION, Priority,
};
pub use worker::{
    HandlerFn, JobError, JobHandler, MAX_CONCURRENCY, MAX_LINGER, MAX_PREFETCH, Worker,
    WorkerHandle, WorkerOptions, WorkerReport, handler_fn,
};

static SCRIPT: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("email_queue", include_str!("queue.lua")));

/// The name of the default queue, whose standalone keys are the documented
/// `email-queue:<member>`.
pub const DEFAULT_QUEUE: &str = "default";

/// Jobs per script call in bulk operations.
const BULK_CHUNK: usize = 1_000;
/// Payload bytes per script call in bulk operations (a larger job goes alone): the server
/// copies every argument into Lua while nothing else runs, and a client's request may not
/// exceed `client-query-buffer-limit` (1 GiB by default).
const BULK_CHUNK_BYTES: usize = 8 << 20;

/// Consecutive runs of `items` of at most `max_count` items and `max_bytes` by `size` (an item
/// heavier than that alone), in order.
fn bulk_chunks<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let weight = size(item);
        if i > start && (i - start == BULK_CHUNK || bytes.saturating_add(weight) > BULK_CHUNK_BYTES)
        {
            chunks.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(weight);
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// Key members of one queue, in the script's `KEYS` order. An enqueue touches only the first
/// [`ENQUEUE_KEYS`] and passes only those: every key costs the script call.
const MEMBERS: [&str; 12] = [
    "high",
    "normal",
    "low",
    "scheduled",
    "ids",
    "active",
    "leases",
    "deliveries",
    "completed",
    "dead",
    "dead-jobs",
    "payloads",
];
const ENQUEUE_KEYS: usize = 5;
const K_SCHEDULED: usize = 3;
const K_ACTIVE: usize = 5;
const K_COMPLETED: usize = 8;
const K_DEAD: usize = 9;
const K_DEAD_JOBS: usize = 10;

/// How long finished jobs are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// At most this many are kept (the oldest go first).
    pub max_count: u64,
    /// None older than this is kept.
    pub max_age: Duration,
}

impl Retention {
    /// Keep at most `max_count`, none older than `max_age`.
    pub fn new(max_count: u64, max_age: Duration) -> Self {
        Retention { max_count, max_age }
    }
}

/// Queue behaviour shared by producers and workers of one queue. Workers read it; every worker
/// of a queue should use the same options.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// How long a fetched job stays leased without a lease extension before it is handed to
    /// another worker (default 30 s). Workers extend their leases every third of it.
    pub visibility_timeout: Duration,
    /// Handler runs before a failing job is buried (default 3).
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one (default 2 s). The actual
    /// delay is drawn uniformly from `[d/2, d]` (equal jitter).
    pub backoff_base: Duration,
    /// Cap of the retry delay (default 1 h).
    pub backoff_max: Duration,
    /// A normal or low job waiting longer than this is served despite higher priorities
    /// (default 5 min; `None`: strict priority). Aged jobs do not take over: each worker
    /// alternates an aged job (the longest waiting of the lower lists' heads) with one in strict
    /// order, so a backlog of old low-priority mail is served at half the pace while
    /// higher-priority mail keeps flowing.
    pub aging: Option<Duration>,
    /// Deliveries whose lease expired (the worker died) before the job is buried with reason
    /// `abandoned` (default 5): a job that crashes every worker cannot loop forever.
    pub max_deliveries: u32,
    /// Completed job ids kept for idempotency and statistics (default 1000, 24 h).
    pub completed_retention: Retention,
    /// Dead jobs kept for inspection and replay (default 10 000, 7 days).
    pub dead_retention: Retention,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            visibility_timeout: Duration::from_secs(30),
            max_attempts: 3,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(3600),
            aging: Some(Duration::from_secs(300)),
            max_deliveries: 5,
            completed_retention: Retention::new(1_000, Duration::from_secs(24 * 3600)),
            dead_retention: Retention::new(10_000, Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// Longest duration any queue or worker option (and `enqueue_in`'s delay) accepts: 1 year. The
/// script adds durations to the server clock in milliseconds, and a sum past 2^63 ms would wrap
/// to a time in the past (a lease already expired).
pub const MAX_OPTION_DURATION: Duration = crate::codec::MAX_OPTION_DURATION;

/// Dead records one page of a replay reads at most, about (a page stops after the group of 4
/// records that passes it): the records pass through the server's memory at once.
const DEAD_PAGE_BYTES: usize = 8 * 1024 * 1024;

pub(crate) use crate::codec::at_most_a_year as bounded;

impl QueueOptions {
    fn validate(&self) -> Result<()> {
        if self.visibility_timeout < Duration::from_millis(100) {
            return Err(Error::invalid(
                "visibility timeout",
                "must be at least 100 ms",
            ));
        }
        bounded("visibility timeout", self.visibility_timeout)?;
        bounded("backoff max", self.backoff_max)?;
        bounded(
            "completed retention max age",
            self.completed_retention.max_age,
        )?;
        bounded("dead retention max age", self.dead_retention.max_age)?;
        if let Some(aging) = self.aging {
            bounded("aging", aging)?;
        }
        if self.max_attempts == 0 {
            return Err(Error::invalid("max attempts", "must be at least 1"));
        }
        if self.max_deliveries == 0 {
            return Err(Error::invalid("max deliveries", "must be at least 1"));
        }
        if self.backoff_max < self.backoff_base {
            return Err(Error::invalid(
                "backoff max",
                "must not be smaller than the backoff base",
            ));
        }
        if self.aging.is_some_and(|a| a.is_zero()) {
            return Err(Error::invalid(
                "aging",
                "must be positive (None disables it)",
            ));
        }
        Ok(())
    }

    /// The retry delay after `attempts` failed attempts, before jitter.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1));
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// The outcome of one enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The job was added.
    New,
    /// A job with this id is already known; nothing was added.
    Duplicate,
}

/// Counts of one queue, read in one `MULTI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct QueueStats {
    /// Waiting in `high`.
    pub high: u64,
    /// Waiting in `normal`.
    pub normal: u64,
    /// Waiting in `low`.
    pub low: u64,
    /// Scheduled for later (delayed jobs and retries in backoff).
    pub delayed: u64,
    /// Leased by a worker.
    pub active: u64,
    /// In the dead set.
    pub dead: u64,
    /// Completed ids retained.
    pub completed: u64,
}

impl QueueStats {
    /// Waiting in all three lists.
    pub fn waiting(&self) -> u64 {
        self.high + self.normal + self.low
    }
}

/// Which retained set [`EmailQueue::clean`] trims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanTarget {
    /// Completed job ids.
    Completed,
    /// Dead jobs.
    Dead,
}

/// A job in the dead set.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadJob {
    /// Its member in the dead set: the job id; `<id>#duplicate-<ms>[-<n>]` for a copy pushed
    /// while the id was being processed; `<id>#again-<ms>[-<n>]` for a burial whose job id was
    /// already a dead id; `malformed-<sha1>` for entries that could not be filed under a job id.
    /// Only an entry under the job id itself is replayable.
    pub dead_id: String,
    /// Why it died: `failed` (attempts exhausted), `permanent` (the handler said so), `expired`
    /// (waited longer than the job TTL), `abandoned` (its workers kept dying), `duplicate`,
    /// `malformed`; or `unreadable` when the stored record itself could not be read (then
    /// `raw` holds the record, lossily if it is not UTF-8, and `error` says why).
    pub reason: String,
    /// The last error.
    pub error: String,
    /// When it died (ms since the epoch): the server's clock for `expired`, `abandoned`,
    /// `duplicate` and entries the fetch found malformed, the burying worker's for `failed`,
    /// `permanent` and payloads the worker could not decode.
    pub failed_at: i64,
    /// The list it came from.
    pub priority: Priority,
    /// The job, when its JSON decodes as an [`EmailJob`].
    pub job: Option<EmailJob>,
    /// The stored payload when it does not (a payload that was not UTF-8, stored as `rawHex`,
    /// shown lossily).
    pub raw: Option<String>,
    /// SHA-1 (hex) of the record as read: a replay moves the entry only while it still holds
    /// this record, not a later burial under the same dead id.
    record_sha1: Option<String>,
}

impl DeadJob {
    /// Whether [`EmailQueue::replay`] would move this entry back: it holds a valid
    /// [`EmailJob`] and is that job's own entry, not a copy buried as `duplicate`.
    pub fn is_replayable(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|job| job.id.as_str() == self.dead_id)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeadRecord {
    reason: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    failed_at: i64,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    job: Option<serde_json::Value>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    raw_hex: Option<String>,
}

/// Bytes from lowercase or uppercase hex; `None` on anything else.
fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// A job fetched by a worker.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) id: String,
    /// The payload, or its bytes when they are not UTF-8 (a foreign producer's): such a job is
    /// buried as `malformed` by the worker, and the rest of its batch runs.
    pub(crate) payload: std::result::Result<String, Vec<u8>>,
    pub(crate) priority: Priority,
    pub(crate) deliveries: u32,
}

/// What a worker reports about one delivery.
#[derive(Debug, Clone)]
pub(crate) enum Settle {
    Ack {
        id: String,
        token: Arc<str>,
    },
    Retry {
        id: String,
        token: Arc<str>,
        due: i64,
        priority: Priority,
        payload: String,
    },
    Dead {
        id: String,
        token: Arc<str>,
        record: String,
    },
    Release {
        id: String,
        token: Arc<str>,
    },
}

impl Settle {
    /// The lease this settlement applies to: the job id and the token it was leased under.
    pub(crate) fn lease(&self) -> (&str, &Arc<str>) {
        match self {
            Settle::Ack { id, token }
            | Settle::Retry { id, token, .. }
            | Settle::Dead { id, token, .. }
            | Settle::Release { id, token } => (id, token),
        }
    }
}

struct Inner {
    redis: Redis,
    name: String,
    keys: Vec<String>,
    options: QueueOptions,
    notify: Arc<Notify>,
    /// Single-job enqueues waiting behind an in-flight one.
    enqueues: Coalescer<EmailQueue>,
}

/// Most single-job enqueues one script call carries.
const MAX_ENQUEUE_BATCH: usize = 128;
/// Most payload bytes one batched enqueue call carries (a larger job goes alone), so that a
/// small enqueue never waits on megabytes of others' mail.
const MAX_ENQUEUE_BATCH_BYTES: usize = 1 << 20;

/// A validated job ready for the enqueue script: id, priority, JSON, due ms (0: now).
pub(crate) struct Encoded {
    id: JobId,
    priority: Priority,
    payload: String,
    due: i64,
}

/// A priority email queue (the default one or a named one). Cheap to clone.
///
/// ```no_run
/// # async fn demo(redis: aether_redis::Redis) -> aether_redis::Result<()> {
/// use aether_redis::email_queue::{EmailJob, Priority};
/// let queue = redis.email_queue()?;
/// let job = EmailJob::new(["ada@example.com"], "noreply@example.com", "Welcome", "Hello!")?
///     .with_priority(Priority::High);
/// queue.enqueue(job).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EmailQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmailQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailQueue")
            .field("name", &self.inner.name)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// In-process wake-up of idle workers when a job is enqueued through the same process.
fn notifier(key: &str) -> Arc<Notify> {
    static NOTIFIERS: LazyLock<Mutex<HashMap<String, Arc<Notify>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    match NOTIFIERS.lock() {
        Ok(mut map) => map.entry(key.to_owned()).or_default().clone(),
        Err(_) => Arc::new(Notify::new()),
    }
}

impl Redis {
    /// The default email queue (`email-queue:high|normal|low`). Fails with
    /// [`Error::Unsupported`] when Lua scripting is unavailable under the configured names.
    pub fn email_queue(&self) -> Result<EmailQueue> {
        EmailQueue::open(self, DEFAULT_QUEUE, QueueOptions::default())
    }

    /// A named email queue (`email-queue:<name>:high|normal|low`); `name` is a key part
    /// (no `:`, braces, globs or whitespace). `"default"` is the default queue.
    pub fn email_queue_named(&self, name: &str) -> Result<EmailQueue> {
        EmailQueue::open(self, name, QueueOptions::default())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A member of the dead set as one read of a page saw it.
enum DeadMember {
    Entry(Box<DeadJob>),
    /// Listed by the `ZRANGE`, but its record was gone by the `HMGET`.
    Missing(String),
}

/// The dead entry `dead_id` from its stored record. A record that cannot be read (not UTF-8,
/// not the documented JSON: written by hand or by another program) is listed as it is, with
/// reason `unreadable`, so that one bad entry never hides the others; replay leaves it alone.
fn dead_entry(dead_id: String, value: Value) -> DeadJob {
    let unreadable = |dead_id: String, raw: String, error: String| DeadJob {
        dead_id,
        reason: "unreadable".into(),
        error,
        failed_at: 0,
        priority: Priority::default(),
        job: None,
        raw: Some(raw),
        record_sha1: None,
    };
    let text = match value {
        Value::BulkString(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let raw = String::from_utf8_lossy(e.as_bytes()).into_owned();
                return unreadable(dead_id, raw, "the dead record is not UTF-8".into());
            }
        },
        other => return unreadable(dead_id, format!("{other:?}"), "not a string".into()),
    };
    let record: DeadRecord = match serde_json::from_str(&text) {
        Ok(record) => record,
        Err(e) => {
            let error = format!("the dead record is not valid JSON: {e}");
            return unreadable(dead_id, text, error);
        }
    };
    let (job, raw_job) = match record.job {
        Some(value) => match serde_json::from_value::<EmailJob>(value.clone()) {
            Ok(job) => (Some(job), None),
            Err(_) => (None, Some(value.to_string())),
        },
        // The script keeps the payloads it buries as `raw`; one that is a valid job is read as
        // the job (so that an expired or abandoned job can be replayed). A malformed entry
        // stays raw: whatever decodes of it was refused by a worker.
        None => match (record.raw, record.raw_hex) {
            (Some(raw), _) => match serde_json::from_str::<EmailJob>(&raw) {
                Ok(job) if record.reason != "malformed" => (Some(job), None),
                _ => (None, Some(raw)),
            },
            (None, Some(hex)) => match from_hex(&hex) {
                Some(bytes) => (None, Some(String::from_utf8_lossy(&bytes).into_owned())),
                None => (None, Some(hex)),
            },
            (None, None) => (None, None),
        },
    };
    DeadJob {
        dead_id,
        reason: record.reason,
        error: record.error,
        failed_at: record.failed_at,
        priority: record.priority.unwrap_or_default(),
        job,
        raw: raw_job,
        record_sha1: Some(sha1_smol::Sha1::from(text.as_bytes()).digest().to_string()),
    }
}

fn ms_since_epoch(at: SystemTime) -> Result<i64> {
    let since = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::invalid("scheduled time", "must be after the Unix epoch"))?;
    i64::try_from(since.as_millis())
        .map_err(|_| Error::invalid("scheduled time", "beyond the range of ms since the epoch"))
}

impl EmailQueue {
    fn open(redis: &Redis, name: &str, options: QueueOptions) -> Result<Self> {
        validate_key_part("queue name", name)?;
        if name.contains('|') {
            return Err(Error::invalid(
                "queue name",
                "contains the forbidden character '|'",
            ));
        }
        options.validate()?;
        redis.require_scripting("the email queue")?;
        let keys = redis.keys();
        let mut built = Vec::with_capacity(MEMBERS.len());
        for member in MEMBERS {
            let key = if name == DEFAULT_QUEUE && !keys.is_cluster() {
                keys.key(Keyspace::EmailQueue, &[member])?
            } else {
                keys.family(Keyspace::EmailQueue, name, member)
            };
            built.push(key);
        }
        let notify = notifier(&built[0]);
        Ok(EmailQueue {
            inner: Arc::new(Inner {
                redis: redis.clone(),
                name: name.to_owned(),
                keys: built,
                options,
                notify,
                enqueues: Coalescer::new(MAX_ENQUEUE_BATCH, MAX_ENQUEUE_BATCH_BYTES),
            }),
        })
    }

    /// The same queue with other options (validated: no duration over
    /// [`MAX_OPTION_DURATION`], a visibility timeout of at least 100 ms).
    pub fn with_options(&self, options: QueueOptions) -> Result<Self> {
        Self::open(&self.inner.redis, &self.inner.name, options)
    }

    /// The queue's name ([`DEFAULT_QUEUE`] for the default queue).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The options in force.
    pub fn options(&self) -> &QueueOptions {
        &self.inner.options
    }

    /// The list a producer pushes `priority` jobs onto (`LPUSH <key> <job json>`).
    pub fn list_key(&self, priority: Priority) -> &str {
        &self.inner.keys[match priority {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }]
    }

    /// The dead set's key (a ZSET of dead ids scored by time of death).
    pub fn dead_key(&self) -> &str {
        &self.inner.keys[K_DEAD]
    }

    pub(crate) fn notify(&self) -> &Arc<Notify> {
        &self.inner.notify
    }

    fn call(&self) -> ScriptCall {
        self.call_with_keys(MEMBERS.len())
    }

    /// A script call passing the first `count` keys of [`MEMBERS`].
    fn call_with_keys(&self, count: usize) -> ScriptCall {
        self.inner.keys[..count]
            .iter()
            .fold(ScriptCall::new(), |call, key| call.key(key.as_str()))
    }

    fn the_ttl_ms(&self) -> u64 {
        self.inner.redis.ttl().millis(Keyspace::EmailQueue)
    }

    /// Adds `job` to its priority list now. The job is validated, its `scheduledAt` set to now,
    /// its `version` to [`PAYLOAD_VERSION`], its `attempts` to 0 and its `lastError` cleared
    /// (an enqueued job starts afresh: one taken from [`dead_jobs`](Self::dead_jobs) with its
    /// attempts spent would otherwise die at its first failure; [`replay`](Self::replay) is the
    /// way back for dead jobs). One round trip (one script, atomic): a job id
    /// already known to the queue is not added again ([`Enqueued::Duplicate`]). Enqueues through
    /// one handle that arrive while one is in flight share the next script call (still one
    /// atomic step per job, in arrival order; up to 128 jobs or 1 MiB of payload per call), so
    /// concurrent producers cost the server one call per batch instead of one per job. Such an
    /// enqueue usually takes two round trips and waits at most three times the response timeout
    /// ([`Error::Timeout`]: the outcome is unknown, and a retry with the same job id is safe
    /// while the id is known: a job that ran and was trimmed from the completed retention
    /// meanwhile is added again); one whose caller gives up while it is queued is not sent.
    pub async fn enqueue(&self, job: EmailJob) -> Result<Enqueued> {
        let encoded = self.encode(job, None, now_millis())?;
        coalesce::submit(self, (), encoded).await
    }

    /// Adds `job` to run no earlier than `at` (it waits in the schedule until due, then joins
    /// the tail of its list). One round trip, atomic, idempotent by id and batched with
    /// concurrent enqueues like [`enqueue`](Self::enqueue). A time already past means now: the
    /// job's `scheduledAt` is then the enqueue time, so its TTL and aging count from there. At
    /// most [`MAX_OPTION_DURATION`] (a year) ahead: a job and its id would otherwise sit in the
    /// schedule for as long, and the fetch refuses pushed jobs due more than a year ahead too.
    pub async fn enqueue_at(&self, job: EmailJob, at: SystemTime) -> Result<Enqueued> {
        let at = ms_since_epoch(at)?;
        let now = now_millis();
        let ahead = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
        bounded("scheduled time", Duration::from_millis(ahead))?;
        let encoded = self.encode(job, Some(at), now)?;
        coalesce::submit(self, (), encoded).await
    }

    /// Adds `job` to run after `delay` (at most [`MAX_OPTION_DURATION`]). See
    /// [`enqueue_at`](Self::enqueue_at).
    pub async fn enqueue_in(&self, job: EmailJob, delay: Duration) -> Result<Enqueued> {
        bounded("delay", delay)?;
        let at = SystemTime::now()
            .checked_add(delay)
            .ok_or_else(|| Error::invalid("delay", "beyond the system clock's range"))?;
        self.enqueue_at(job, at).await
    }

    /// Adds many jobs to run now, one result per job in order. Every job is validated before
    /// anything is sent; then one round trip (one atomic script) per 1000 jobs or 8 MiB of
    /// payload. Each call is atomic; when a later call fails, the jobs of the earlier ones are
    /// in the queue. Enqueueing the same jobs again is safe while their ids are known: a job of
    /// an earlier call that ran and was already trimmed from the completed retention
    /// ([`Retention`], by count and age) is added again, so keep that retention above what the
    /// workers complete between a failure and its retry.
    pub async fn enqueue_bulk(&self, jobs: Vec<EmailJob>) -> Result<Vec<Enqueued>> {
        let now = now_millis();
        let encoded = jobs
            .into_iter()
            .map(|job| self.encode(job, None, now))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(encoded.len());
        for chunk in bulk_chunks(&encoded, |job| job.payload.len()) {
            out.extend(self.send(chunk).await?);
        }
        Ok(out)
    }

    /// Validates `job` and stamps it for the enqueue script.
    fn encode(&self, mut job: EmailJob, at: Option<i64>, now: i64) -> Result<Encoded> {
        job.validate()?;
        job.version = PAYLOAD_VERSION;
        job.attempts = 0;
        job.last_error = None;
        let due = at.filter(|&at| at > now);
        job.scheduled_at = due.unwrap_or(now);
        let payload = crate::codec::to_json("email job", &job)?;
        Ok(Encoded {
            id: job.id,
            priority: job.priority,
            payload,
            due: due.unwrap_or(0),
        })
    }

    /// One enqueue script call for `jobs`, one result per job in order.
    async fn send(&self, jobs: &[Encoded]) -> Result<Vec<Enqueued>> {
        let mut call = self.call_with_keys(ENQUEUE_KEYS).arg("enqueue");
        for job in jobs {
            call = call
                .arg(job.id.as_str())
                .arg(job.priority.as_str())
                .arg(job.payload.as_str())
                .arg(job.due);
        }
        let reply = self.inner.redis.eval_script(&SCRIPT, &call).await?;
        let flags = self.int_list(reply, self.list_key(Priority::Normal))?;
        if flags.len() != jobs.len() {
            return Err(Error::decode(
                self.list_key(Priority::Normal),
                None,
                format!("{} results for {} jobs", flags.len(), jobs.len()),
            ));
        }
        let out: Vec<Enqueued> = flags
            .into_iter()
            .map(|f| {
                if f == 1 {
                    Enqueued::New
                } else {
                    Enqueued::Duplicate
                }
            })
            .collect();
        if out.contains(&Enqueued::New) {
            self.inner.notify.notify_waiters();
        }
        Ok(out)
    }

    fn int_list(&self, reply: Value, key: &str) -> Result<Vec<i64>> {
        match reply {
            Value::Array(items) => items.into_iter().map(|v| int(key, v)).collect(),
            other => Err(Error::decode(
                key,
                None,
                format!("expected an array, got {other:?}"),
            )),
        }
    }

    /// Waiting per priority, delayed, active, dead and completed counts. One round trip
    /// (`MULTI`: one consistent snapshot).
    pub async fn stats(&self) -> Result<QueueStats> {
        let k = &self.inner.keys;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LLEN")
            .arg(&k[0])
            .cmd("LLEN")
            .arg(&k[1])
            .cmd("LLEN")
            .arg(&k[2])
            .cmd("ZCARD")
            .arg(&k[K_SCHEDULED])
            .cmd("ZCARD")
            .arg(&k[K_ACTIVE])
            .cmd("ZCARD")
            .arg(&k[K_DEAD])
            .cmd("ZCARD")
            .arg(&k[K_COMPLETED]);
        let values = self
            .inner
            .redis
            .query_pipe("email queue stats", &pipe)
            .await?
            .unwrap_or_default();
        let mut counts = Vec::with_capacity(7);
        for (value, key) in
            values
                .into_iter()
                .zip([0, 1, 2, K_SCHEDULED, K_ACTIVE, K_DEAD, K_COMPLETED])
        {
            counts.push(u64::try_from(int(&k[key], value)?).unwrap_or(0));
        }
        if counts.len() != 7 {
            return Err(Error::decode(
                &k[0],
                None,
                "stats transaction was not applied",
            ));
        }
        Ok(QueueStats {
            high: counts[0],
            normal: counts[1],
            low: counts[2],
            delayed: counts[3],
            active: counts[4],
            dead: counts[5],
            completed: counts[6],
        })
    }

    /// The `limit` oldest dead jobs, oldest first. Two round trips (`ZRANGE`, `HMGET`),
    /// read-only; an entry removed in between is skipped.
    pub async fn dead_jobs(&self, limit: usize) -> Result<Vec<DeadJob>> {
        Ok(self
            .dead_page(0, limit)
            .await?
            .into_iter()
            .filter_map(|member| match member {
                DeadMember::Entry(entry) => Some(*entry),
                DeadMember::Missing(_) => None,
            })
            .collect())
    }

    /// The members of the dead set from the `start`-th oldest on, at most `count`.
    async fn dead_page(&self, start: usize, count: usize) -> Result<Vec<DeadMember>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let k = &self.inner.keys;
        let ids: Vec<String> = self
            .inner
            .redis
            .query_as(
                "email queue dead",
                &k[K_DEAD],
                redis::cmd("ZRANGE")
                    .arg(&k[K_DEAD])
                    .arg(start)
                    // Redis takes indexes up to i64::MAX: `usize::MAX` means "all of them".
                    .arg(i64::try_from(start.saturating_add(count - 1)).unwrap_or(i64::MAX)),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self
            .inner
            .redis
            .query(
                "email queue dead",
                redis::cmd("HMGET").arg(&k[K_DEAD_JOBS]).arg(&ids),
            )
            .await?;
        let records = match reply {
            Value::Array(items) => items,
            other => {
                return Err(Error::decode(
                    &k[K_DEAD_JOBS],
                    None,
                    format!("expected an array, got {other:?}"),
                ));
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        for (dead_id, value) in ids.into_iter().zip(records) {
            out.push(if value == Value::Nil {
                DeadMember::Missing(dead_id)
            } else {
                DeadMember::Entry(Box::new(dead_entry(dead_id, value)))
            });
        }
        Ok(out)
    }

    /// The members of the dead set that follow `after` (from the oldest when `None`, or when
    /// `after` has left the set), at most `count`, with their records, and whether the page
    /// was cut short by [`DEAD_PAGE_BYTES`] of records (more may follow). One round trip: one
    /// script, so the position and the reads are one step.
    async fn dead_page_after(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> Result<(Vec<DeadMember>, bool)> {
        let call = self
            .call()
            .arg("dead_page")
            .arg(after.unwrap_or(""))
            .arg(count)
            .arg(DEAD_PAGE_BYTES);
        let key = &self.inner.keys[K_DEAD];
        let (items, cut) = match self.inner.redis.eval_script(&SCRIPT, &call).await? {
            Value::Array(mut items) if items.len() % 2 == 1 => {
                let cut = items.pop().unwrap_or(Value::Int(0));
                (items, cut)
            }
            other => {
                return Err(Error::decode(
                    key,
                    None,
                    format!("expected (dead id, record) pairs and a flag, got {other:?}"),
                ));
            }
        };
        let cut = int(key, cut)? == 1;
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut items = items.into_iter();
        while let (Some(dead_id), Some(record)) = (items.next(), items.next()) {
            let dead_id = crate::codec::text(key, None, dead_id)?;
            out.push(if record == Value::Nil {
                DeadMember::Missing(dead_id)
            } else {
                DeadMember::Entry(Box::new(dead_entry(dead_id, record)))
            });
        }
        Ok((out, cut))
    }

    /// Which of `dead_ids` are still members of the dead set. One round trip (`ZMSCORE`).
    async fn still_dead(&self, dead_ids: &[&str]) -> Result<Vec<bool>> {
        if dead_ids.is_empty() {
            return Ok(Vec::new());
        }
        let key = &self.inner.keys[K_DEAD];
        let reply = self
            .inner
            .redis
            .query(
                "email queue dead",
                redis::cmd("ZMSCORE").arg(key).arg(dead_ids),
            )
            .await?;
        match reply {
            Value::Array(scores) if scores.len() == dead_ids.len() => {
                Ok(scores.iter().map(|s| *s != Value::Nil).collect())
            }
            other => Err(Error::decode(
                key,
                None,
                format!("expected {} scores, got {other:?}", dead_ids.len()),
            )),
        }
    }

    /// Moves up to `limit` of the oldest replayable dead jobs back to the tail of the lists
    /// they died from, with `attempts` reset, and returns how many moved. Entries that stay
    /// dead: a payload that is not an [`EmailJob`], and a copy filed under another dead id
    /// (`<id>#duplicate-..`: the job it copies ran or is running, so replaying it would send the
    /// mail twice). Those are skipped, not counted against `limit`. Reads pages of 100 to 1000
    /// entries (fewer when their records pass 8 MiB), each with one script that finds the page after the last entry skipped and
    /// reads it in one step (a `ZMSCORE` follows when a member had no record), then one
    /// atomic script per 1000 jobs that moves only entries still in the dead set with the
    /// record it read (not a later burial under the same dead id). So
    /// concurrent replays never duplicate a job, and together they miss none, whatever
    /// retention trims meanwhile.
    pub async fn replay(&self, limit: usize) -> Result<usize> {
        const PAGE: usize = 100;
        const MAX_PAGE: usize = 1000;
        let mut moved = 0;
        // The newest entry looked at that stays dead. Everything older that this call looked at
        // has left the set or stays dead too, so the next page starts right after it. Found by
        // rank, not by counting: retention trims the oldest entries, the very ones stepped
        // over, while a call pages, and a counted offset would then overshoot the entries left.
        let mut last_staying: Option<String> = None;
        while moved < limit {
            let wanted = limit - moved;
            let page_size = wanted.clamp(PAGE, MAX_PAGE);
            let (page, cut) = self
                .dead_page_after(last_staying.as_deref(), page_size)
                .await?;
            let listed = page.len();
            // The first `wanted` replayable entries are tried; the rest of the page is read
            // again. A member without a record (written by hand or by another program) stays
            // dead while it is in the set, and is then stepped over like the other entries.
            let mut tried = Vec::new();
            let mut staying: Option<(usize, String)> = None;
            let mut missing: Vec<(usize, String)> = Vec::new();
            let mut complete = true;
            for (position, member) in page.into_iter().enumerate() {
                if tried.len() == wanted {
                    complete = false;
                    break;
                }
                match member {
                    DeadMember::Entry(entry) if entry.is_replayable() => tried.push(*entry),
                    DeadMember::Entry(entry) => staying = Some((position, entry.dead_id)),
                    DeadMember::Missing(dead_id) => missing.push((position, dead_id)),
                }
            }
            let ids: Vec<&str> = missing.iter().map(|(_, id)| id.as_str()).collect();
            let present = self.still_dead(&ids).await?;
            if let Some(found) = missing
                .into_iter()
                .zip(present)
                .filter_map(|(member, present)| present.then_some(member))
                .next_back()
                && staying.as_ref().is_none_or(|(at, _)| found.0 > *at)
            {
                staying = Some(found);
            }
            if let Some((_, dead_id)) = staying {
                last_staying = Some(dead_id);
            }
            moved += self.replay_entries(tried).await?;
            if complete && listed < page_size && !cut {
                break;
            }
        }
        Ok(moved)
    }

    /// Moves the dead entry `dead_id` back to its list (see [`replay`](Self::replay)); false when
    /// there is no such entry or it is not replayable. Two round trips. An empty `dead_id` is
    /// [`Error::InvalidInput`] (nothing sent).
    pub async fn replay_one(&self, dead_id: &str) -> Result<bool> {
        if dead_id.is_empty() {
            return Err(Error::invalid("dead id", "must not be empty"));
        }
        let k = &self.inner.keys;
        let record = self
            .inner
            .redis
            .query(
                "email queue dead",
                redis::cmd("HGET").arg(&k[K_DEAD_JOBS]).arg(dead_id),
            )
            .await?;
        if record == Value::Nil {
            return Ok(false);
        }
        let entry = dead_entry(dead_id.to_owned(), record);
        if !entry.is_replayable() {
            return Ok(false);
        }
        Ok(self.replay_entries(vec![entry]).await? == 1)
    }

    async fn replay_entries(&self, dead: Vec<DeadJob>) -> Result<usize> {
        let now = now_millis();
        let mut entries = Vec::new();
        for entry in dead {
            if let (Some(mut job), Some(digest)) = (entry.job, entry.record_sha1) {
                job.attempts = 0;
                job.last_error = None;
                job.scheduled_at = now;
                job.priority = entry.priority;
                let payload = crate::codec::to_json("email job", &job)?;
                entries.push((entry.dead_id, job.id, job.priority, payload, digest));
            }
        }
        let mut moved = 0;
        for chunk in bulk_chunks(&entries, |entry| entry.3.len()) {
            let mut call = self.call().arg("replay");
            for (dead_id, id, priority, payload, digest) in chunk {
                call = call
                    .arg(dead_id.as_str())
                    .arg(id.as_str())
                    .arg(priority.as_str())
                    .arg(payload.as_str())
                    .arg(digest.as_str());
            }
            let reply = self.inner.redis.eval_script(&SCRIPT, &call).await?;
            moved += self
                .int_list(reply, self.dead_key())?
                .into_iter()
                .filter(|&f| f == 1)
                .count();
        }
        if moved > 0 {
            self.inner.notify.notify_waiters();
        }
        Ok(moved)
    }

    /// Removes entries of `target` older than `older_than`, and the oldest beyond `keep`;
    /// returns how many went. Their ids are forgotten (a later enqueue with the same id is
    /// new). One atomic script per 1000 removed entries.
    pub async fn clean(&self, target: CleanTarget, older_than: Duration, keep: u64) -> Result<u64> {
        const LIMIT: i64 = 1_000;
        let which = match target {
            CleanTarget::Completed => "completed",
            CleanTarget::Dead => "dead",
        };
        let mut total = 0u64;
        loop {
            let call = self
                .call()
                .arg("clean")
                .arg(which)
                .arg(keep)
                .arg(millis(older_than))
                .arg(LIMIT);
            let reply = self.inner.redis.eval_script(&SCRIPT, &call).await?;
            let removed = int(self.dead_key(), reply)?;
            total += u64::try_from(removed).unwrap_or(0);
            if removed < LIMIT {
                return Ok(total);
            }
        }
    }

    /// Puts back the jobs leased under `tokens`, work calls whose replies the worker never got,
    /// at the head of their lists with the delivery undone; returns how many. One atomic script
    /// that reads every lease of the queue.
    pub(crate) async fn release_orphans(&self, tokens: &[Arc<str>]) -> Result<i64> {
        let call = tokens
            .iter()
            .fold(self.call().arg("orphans"), |call, token| call.arg(&**token));
        let reply = self.inner.redis.eval_script(&SCRIPT, &call).await?;
        int(self.dead_key(), reply)
    }

    /// Settles finished deliveries and leases up to `fetch` jobs under `token`; with `maintain`
    /// also recovers expired leases, promotes due scheduled jobs and trims retention. One atomic
    /// script. `aging` is whether the worker's last pick was an aged one (aged and strict picks
    /// alternate); the reply says the same of this call's last pick. The call pops at most
    /// about `2 × fetch + 100` jobs, leased or not; [`Worked::more`] says when that budget ran
    /// out before `fetch` jobs were leased, so more may be waiting.
    pub(crate) async fn work(
        &self,
        token: &str,
        fetch: usize,
        maintain: bool,
        settles: &[Settle],
        aging: &mut bool,
    ) -> Result<Worked> {
        let o = &self.inner.options;
        let mut call = self
            .call()
            .arg("work")
            .arg(token)
            .arg(fetch)
            .arg(millis(o.visibility_timeout))
            .arg(o.aging.map(millis).unwrap_or(0))
            .arg(self.the_ttl_ms())
            .arg(o.max_deliveries)
            .arg(o.completed_retention.max_count)
            .arg(millis(o.completed_retention.max_age))
            .arg(o.dead_retention.max_count)
            .arg(millis(o.dead_retention.max_age))
            .arg(if maintain { "1" } else { "0" })
            .arg(settles.len())
            .arg(if *aging { "1" } else { "0" });
        for settle in settles {
            call = match settle {
                Settle::Ack { id, token } => call.arg("ack").arg(id.as_str()).arg(&**token),
                Settle::Retry {
                    id,
                    token,
                    due,
                    priority,
                    payload,
                } => call
                    .arg("retry")
                    .arg(id.as_str())
                    .arg(&**token)
                    .arg(*due)
                    .arg(priority.as_str())
                    .arg(payload.as_str()),
                Settle::Dead { id, token, record } => call
                    .arg("dead")
                    .arg(id.as_str())
                    .arg(&**token)
                    .arg(record.as_str()),
                Settle::Release { id, token } => call.arg("release").arg(id.as_str()).arg(&**token),
            };
        }
        let reply = self.inner.redis.eval_script(&SCRIPT, &call).await?;
        let key = self.list_key(Priority::Normal).to_owned();
        let bad = |what: &str| Error::decode(&key, None, format!("work reply: {what}"));
        let Value::Array(mut parts) = reply else {
            return Err(bad("not an array"));
        };
        if parts.len() != 4 {
            return Err(bad("expected four parts"));
        }
        let more = int(&key, parts.pop().unwrap_or(Value::Nil))? == 1;
        *aging = int(&key, parts.pop().unwrap_or(Value::Nil))? == 1;
        let jobs = parts.pop().unwrap_or(Value::Nil);
        let settled = parts.pop().unwrap_or(Value::Nil);
        let settled = match settled {
            Value::Array(items) => items
                .into_iter()
                .map(|v| int(&key, v).map(|f| f == 1))
                .collect::<Result<Vec<_>>>()?,
            Value::Nil => Vec::new(),
            _ => return Err(bad("settlements are not an array")),
        };
        let jobs = match jobs {
            Value::Array(items) => items,
            Value::Nil => Vec::new(),
            _ => return Err(bad("jobs are not an array")),
        };
        let mut fetched = Vec::with_capacity(jobs.len());
        for job in jobs {
            let Value::Array(fields) = job else {
                return Err(bad("a job is not an array"));
            };
            let mut fields = fields.into_iter();
            let (Some(id), Some(payload), Some(priority), Some(deliveries)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(bad("a job has fewer than 4 fields"));
            };
            let payload = match payload {
                Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|e| e.into_bytes()),
                other => text(&key, None, other).map_err(|_| Vec::new()),
            };
            fetched.push(Fetched {
                id: text(&key, None, id)?,
                payload,
                priority: text(&key, None, priority)?.parse()?,
                deliveries: u32::try_from(int(&key, deliveries)?).unwrap_or(u32::MAX),
            });
        }
        Ok(Worked {
            settled,
            jobs: fetched,
            more,
        })
    }

    /// Extends the leases `(id, token)` by the visibility timeout: one atomic script. Returns,
    /// per lease, whether it was still held.
    pub(crate) async fn extend(&self, leases: &[(String, Arc<str>)]) -> Result<Vec<bool>> {
        let mut call = self
            .call()
            .arg("extend")
            .arg(millis(self.inner.options.visibility_timeout));
        for (id, token) in leases {
            call = call.arg(id.as_str()).arg(&**token);
        }
        let reply = self.inner.redis.eval_script(&SCRIPT, &call).await?;
        Ok(self
            .int_list(reply, &self.inner.keys[K_ACTIVE])?
            .into_iter()
            .map(|f| f == 1)
            .collect())
    }
}

/// The outcome of one work call.
pub(crate) struct Worked {
    /// Per settlement sent, whether it applied (its lease was still held).
    pub(crate) settled: Vec<bool>,
    /// The jobs leased.
    pub(crate) jobs: Vec<Fetched>,
    /// The call stopped at its pop budget with fewer jobs leased than asked for: more may be
    /// waiting behind the jobs it buried or parked.
    pub(crate) more: bool,
}

/// Single-job enqueues on one handle that arrive while one is in flight go as one enqueue
/// script call, which adds them in arrival order exactly as separate calls would.
impl Batch for EmailQueue {
    type Key = ();
    type Request = Encoded;
    type Response = Result<Enqueued>;

    fn coalescer(&self) -> &Coalescer<Self> {
        &self.inner.enqueues
    }

    async fn run(&self, _: &(), jobs: Vec<Encoded>) -> Vec<Result<Enqueued>> {
        let sent = self.send(&jobs).await;
        coalesce::answers(jobs.len(), sent, || {
            Error::decode(self.list_key(Priority::Normal), None, "short enqueue reply")
        })
    }

    fn size(job: &Encoded) -> usize {
        job.payload.len()
    }

    /// The enqueue in flight and this job's own batch are each bounded by the response timeout;
    /// the third is slack, so that a batch's own outcome normally arrives first.
    fn max_wait(&self) -> Duration {
        self.inner.redis.config().response_timeout.saturating_mul(3)
    }

    fn timed_out(&self, waited: Duration) -> Result<Enqueued> {
        Err(Error::Timeout {
            operation: "email_queue.enqueue",
            after: waited,
        })
    }

    fn abandoned(&self) -> Result<Enqueued> {
        Err(coalesce::abandoned("email queue enqueue"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay that read a dead entry moves nothing once that entry was replayed by another
    /// call, ran, and was buried again under the same dead id: the new record stays.
    #[cfg(feature = "testkit")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_replay_leaves_a_later_burial_alone() {
        let redis = crate::testkit::redis_for(
            crate::testkit::TestTopology::Standalone,
            "email_queue::stale_replay",
        )
        .await;
        let queue = redis.email_queue().unwrap();
        let mut conn = redis.connection().await.unwrap();
        let record = serde_json::json!({
            "reason": "failed", "error": "first death", "failedAt": 1, "priority": "normal",
            "job": {"id": "twice", "to": ["a@example.com"], "from": "f@example.com",
                "subject": "s", "body": "b", "priority": "normal", "attempts": 3,
                "scheduledAt": 1, "metadata": {}},
        });
        let bury = |record: String| {
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD")
                .arg(queue.dead_key())
                .arg(1)
                .arg("twice")
                .ignore();
            pipe.cmd("HSET")
                .arg(&queue.inner.keys[K_DEAD_JOBS])
                .arg("twice")
                .arg(record)
                .ignore();
            pipe
        };
        let _: () = bury(record.to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        let stale = queue.dead_jobs(10).await.unwrap();
        assert_eq!(stale.len(), 1);
        // Meanwhile another replay moved it, it ran and died again with another error.
        assert!(queue.replay_one("twice").await.unwrap());
        let _: () = redis::cmd("DEL")
            .arg(queue.list_key(Priority::Normal))
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut again = record.clone();
        again["error"] = serde_json::json!("second death");
        let _: () = bury(again.to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(queue.replay_entries(stale).await.unwrap(), 0);
        let dead = queue.dead_jobs(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].error, "second death");
        assert_eq!(queue.stats().await.unwrap().waiting(), 0);
        assert_eq!(queue.replay(10).await.unwrap(), 1, "the new burial replays");
    }

    /// One work call taking `k` jobs leases exactly what `k` calls taking one job each would,
    /// aging included (the flag carried from call to call too), over random queue states.
    #[cfg(feature = "testkit")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_fetch_takes_what_single_fetches_take_with_aging() {
        let redis = crate::testkit::redis_for(
            crate::testkit::TestTopology::Standalone,
            "email_queue::batch_matches_single",
        )
        .await;
        let options = QueueOptions {
            aging: Some(Duration::from_secs(300)),
            ..QueueOptions::default()
        };
        let now = crate::codec::now_millis();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        // The first state is one where a list emptied during the call made an aged head's list
        // the strict one; the rest are random.
        let mut states: Vec<(Vec<Vec<i64>>, bool, usize)> =
            vec![(vec![vec![0], vec![15], vec![10]], true, 3)];
        for _ in 0..150 {
            let lists = (0..3)
                .map(|_| {
                    (0..next(4))
                        .map(|_| [0, 6, 10, 15, 20][next(5) as usize])
                        .collect()
                })
                .collect();
            states.push((lists, next(2) == 1, 1 + next(6) as usize));
        }
        let mut conn = redis.connection().await.unwrap();
        for (trial, (lists, aged_before, k)) in states.iter().enumerate() {
            let mut taken = Vec::new();
            for (side, name) in ["batch", "single"].iter().enumerate() {
                let queue = redis
                    .email_queue_named(&format!("t{trial}{name}"))
                    .unwrap()
                    .with_options(options.clone())
                    .unwrap();
                for (list, minutes) in lists.iter().enumerate() {
                    for (n, age) in minutes.iter().enumerate() {
                        let priority = [Priority::High, Priority::Normal, Priority::Low][list];
                        let json = format!(
                            r#"{{"id":"j{list}-{n}","to":["a@example.com"],"from":"f@example.com","subject":"s","body":"b","priority":"{}","attempts":0,"scheduledAt":{},"metadata":{{}}}}"#,
                            priority.as_str(),
                            now - age * 60_000 - n as i64
                        );
                        let _: () = redis::cmd("LPUSH")
                            .arg(queue.list_key(priority))
                            .arg(json)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    }
                }
                let mut flag = *aged_before;
                let mut ids = Vec::new();
                let calls = if side == 0 { vec![*k] } else { vec![1; *k] };
                for (c, fetch) in calls.into_iter().enumerate() {
                    let worked = queue
                        .work(&format!("w.x.{c}"), fetch, false, &[], &mut flag)
                        .await
                        .unwrap();
                    ids.extend(worked.jobs.into_iter().map(|j| j.id));
                }
                taken.push((ids, flag));
            }
            assert_eq!(taken[0], taken[1], "state {:?}", states[trial]);
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let o = QueueOptions::default();
        assert_eq!(o.backoff(1), Duration::from_secs(2));
        assert_eq!(o.backoff(2), Duration::from_secs(4));
        assert_eq!(o.backoff(3), Duration::from_secs(8));
        assert_eq!(o.backoff(60), Duration::from_secs(3600));
    }

    #[test]
    fn bulk_chunks_cap_count_and_bytes_in_order() {
        let sizes: Vec<usize> = vec![1; 2500];
        let lens: Vec<usize> = bulk_chunks(&sizes, |s| *s)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(lens, [1000, 1000, 500]);
        let mib = 1 << 20;
        let sizes = [3 * mib, 3 * mib, 3 * mib, 20 * mib, 1, 1];
        let chunks = bulk_chunks(&sizes, |s| *s);
        let lens: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(
            lens,
            [2, 1, 1, 2],
            "a heavy item goes alone, the others up to 8 MiB"
        );
        assert_eq!(chunks.concat(), sizes);
        assert!(bulk_chunks::<usize>(&[], |s| *s).is_empty());
    }

    #[test]
    fn options_are_validated() {
        let o = QueueOptions {
            max_attempts: 0,
            ..QueueOptions::default()
        };
        assert!(matches!(
            o.validate(),
            Err(Error::InvalidInput {
                what: "max attempts",
                ..
            })
        ));
        let o = QueueOptions {
            visibility_timeout: Duration::from_millis(1),
            ..QueueOptions::default()
        };
        assert!(o.validate().is_err());
        // A year and a millisecond would overflow nothing yet, but is refused like anything
        // past the bound, so that sums with the clock stay far from 2^63 ms.
        for o in [
            QueueOptions {
                visibility_timeout: Duration::MAX,
                ..QueueOptions::default()
            },
            QueueOptions {
                aging: Some(MAX_OPTION_DURATION + Duration::from_millis(1)),
                ..QueueOptions::default()
            },
            QueueOptions {
                backoff_max: Duration::MAX,
                ..QueueOptions::default()
            },
            QueueOptions {
                dead_retention: Retention::new(10, Duration::MAX),
                ..QueueOptions::default()
            },
        ] {
            assert!(
                matches!(o.validate(), Err(Error::InvalidInput { ref reason, .. }) if reason.contains("at most")),
                "{o:?}"
            );
        }
        let o = QueueOptions {
            visibility_timeout: MAX_OPTION_DURATION,
            ..QueueOptions::default()
        };
        assert!(o.validate().is_ok());
    }
}
