//! Redis Streams: a typed producer, consumer groups, and a consumer that reclaims the work of
//! crashed consumers, dead-letters poison messages and skips messages it already handled.
//!
//! - [`Streams`] (`redis.streams()`): groups, metrics (`XINFO`), dead letters and replay.
//! - [`StreamProducer`]: `XADD` with approximate `MAXLEN`, optionally deduplicated by a producer
//!   idempotency key.
//! - [`StreamConsumer`]: `XREADGROUP` on a dedicated connection, N concurrent handlers, ack after
//!   success, `XAUTOCLAIM` of idle entries, dead-letter after `max_retries` deliveries,
//!   idempotency records, graceful shutdown.
//!
//! Delivery is at least once: a message stays in the group's pending entries list (PEL) until
//! a handler succeeded on it (or it went to the dead-letter stream).
//!
//! # Keys
//!
//! A stream's key is `<prefix><name>` (the name is validated like any key part). Every key
//! belonging to a stream is derived from it (`{<prefix><name>}:...`) and so lives in the stream's
//! Cluster slot; see `docs/keyspace.md` (`## Streams`).
//!
//! ```no_run
//! # async fn demo(redis: aether_redis::Redis) -> aether_redis::Result<()> {
//! use aether_redis::stream::{ConsumerOptions, StreamMessage, TASK_EVENTS, TASK_WORKERS};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Task { id: u64 }
//!
//! let producer = redis.streams().producer::<Task>(TASK_EVENTS)?;
//! producer.publish(&Task { id: 7 }).await?;
//!
//! let consumer = redis
//!     .streams()
//!     .consumer::<Task>(TASK_EVENTS, TASK_WORKERS, ConsumerOptions::default())?;
//! let running = consumer.spawn(|msg: StreamMessage<Task>| async move {
//!     println!("task {}", msg.payload.id);
//!     Ok::<_, std::io::Error>(())
//! });
//! // ... later
//! let report = running.shutdown().await?;
//! println!("processed {}", report.processed);
//! # Ok(()) }
//! ```

use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use serde::de::DeserializeOwned;

use crate::codec::{from_json, text};
use crate::error::{Error, Result};
use crate::keyspace::validate_key_part;
use crate::pool::Redis;
use crate::script::{LuaScript, ScriptCall};

mod consumer;
mod producer;
pub(crate) mod reply;

pub use consumer::{
    ConsumerHandle, ConsumerMetrics, ConsumerOptions, DEFAULT_HANDLER_TIMEOUT, HandlerError,
    StreamConsumer, StreamHandler, StreamMessage,
};
pub use producer::{Published, StreamProducer};

/// Stream of incoming webhook events.
pub const WEBHOOK_EVENTS: &str = "webhook_events";
/// Consumer group of [`WEBHOOK_EVENTS`]; created at new messages (`$`).
pub const WEBHOOK_WORKERS: &str = "webhook_workers";
/// Stream of task events.
pub const TASK_EVENTS: &str = "task_events";
/// Consumer group of [`TASK_EVENTS`]; created at the beginning of the stream (`0`).
pub const TASK_WORKERS: &str = "task_workers";
/// Stream of agent messages.
pub const AGENT_MESSAGES: &str = "agent_messages";

/// Default approximate `MAXLEN` of a stream.
pub const DEFAULT_MAX_LEN: u64 = 100_000;
/// Default lifetime of producer idempotency keys and consumer `processed` records.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default retention of dead letters.
pub const DEFAULT_DEAD_LETTER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Entry field holding the JSON payload.
pub const FIELD_PAYLOAD: &str = "payload";
/// Most fields (name-value pairs) of an entry that a script writes with one `XADD`: Lua's
/// `unpack` passes at most about 8000 values to one call. Wider entries are dead-lettered and
/// replayed without a script (`dead_letter_unscripted`, `replay_unscripted`).
const SCRIPT_FIELDS: usize = 3900;
/// Entry field holding the producer idempotency key, when one was given.
pub const FIELD_IDEMPOTENCY_KEY: &str = "idem";
/// Entry field of a replayed message: the id of the message it replays (first generation).
pub const FIELD_REPLAY_OF: &str = "replay_of";
/// Prefix of the metadata fields a dead letter adds to the original fields. Reserved: original
/// fields whose names start with it are not copied into the dead letter (nor back by a replay).
pub const DEAD_FIELD_PREFIX: &str = "dl:";

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// Only messages added after the group was created (`$`).
    New,
    /// Every message still in the stream (`0`).
    Beginning,
}

impl StartFrom {
    fn id(self) -> &'static str {
        match self {
            StartFrom::New => "$",
            StartFrom::Beginning => "0",
        }
    }

    /// The documented start of a known group: [`StartFrom::Beginning`] for [`TASK_WORKERS`],
    /// [`StartFrom::New`] otherwise.
    pub fn default_for(group: &str) -> StartFrom {
        if group == TASK_WORKERS {
            StartFrom::Beginning
        } else {
            StartFrom::New
        }
    }
}

/// The keys of one stream. Every key is in the stream's Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    name: String,
    stream: String,
    dead: String,
    keys: crate::keyspace::Keys,
}

impl StreamKeys {
    /// The stream's name (without prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<prefix><name>`: the stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// `{<prefix><name>}:dead`: the dead-letter stream.
    pub fn dead(&self) -> &str {
        &self.dead
    }

    /// `{<prefix><name>}:idem:<key>`: a producer idempotency key (holds the message id).
    pub fn producer_idempotency(&self, key: &str) -> String {
        self.keys.derived(&self.stream, &format!("idem:{key}"))
    }

    /// `{<prefix><name>}:processed:<group>:key:<idem>` or `...:id:<message id>`: the record that
    /// `group` handled a message (keyed by its producer idempotency key when it has one).
    pub fn processed(&self, group: &str, idempotency_key: Option<&str>, id: &str) -> String {
        let suffix = match idempotency_key {
            Some(key) => format!("processed:{group}:key:{key}"),
            None => format!("processed:{group}:id:{id}"),
        };
        self.keys.derived(&self.stream, &suffix)
    }
}

/// Counters of one consumer group, from `XINFO GROUPS` (one round trip).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Consumers known to the group.
    pub consumers: u64,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Id of the last entry delivered to the group.
    pub last_delivered_id: String,
    /// Entries in the stream not yet delivered to the group; `None` when Redis cannot tell
    /// (after deletions in the middle of the stream).
    pub lag: Option<u64>,
}

/// One consumer of a group, from `XINFO CONSUMERS`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The consumer's name.
    pub name: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// Time since its last interaction with the group.
    pub idle: Duration,
}

/// A message in the dead-letter stream.
///
/// An entry of the dead-letter stream that this crate did not write as documented (a metadata
/// field missing or not a number), or one whose field name is not UTF-8 (a consumer copies
/// names byte for byte), is still listed, with [`DeadLetter::problem`] saying what is wrong and
/// the metadata it lacks left empty (zero).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Id of the entry in the dead-letter stream (what [`Streams::replay_dead_letter`] takes).
    pub id: String,
    /// Id the message had in the source stream.
    pub original_id: String,
    /// Deliveries when it was dead-lettered.
    pub delivery_count: u64,
    /// The last handler (or decode) error.
    pub error: String,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// When it was dead-lettered (ms since the Unix epoch, on the server's clock).
    pub failed_at: i64,
    /// The original fields of the message, in order, except any whose name starts with `dl:`
    /// (that prefix is reserved for the metadata above; see `docs/keyspace.md`). A field name
    /// that is not UTF-8 is shown escaped (`<[u8]>::escape_ascii`; the stored bytes are the
    /// original ones) and sets [`DeadLetter::problem`].
    pub fields: Vec<(String, Vec<u8>)>,
    /// Why this entry is not a well-formed dead letter (or cannot be shown exactly: a field name
    /// that is not UTF-8), when it is not; `None` for every other dead letter a consumer wrote.
    /// [`Streams::replay_dead_letters`] skips such entries; [`Streams::replay_dead_letter`]
    /// replays them, byte for byte, when asked by id.
    pub problem: Option<String>,
    key: String,
}

impl DeadLetter {
    /// The original payload decoded as `T` (a decode error names the dead-letter key).
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T> {
        let raw = self
            .fields
            .iter()
            .find(|(k, _)| k == FIELD_PAYLOAD)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::decode(&self.key, Some(FIELD_PAYLOAD), "missing"))?;
        from_json(&self.key, raw)
    }
}

/// Streams, consumer groups, metrics and dead letters. Obtained from [`Redis::streams`].
#[derive(Debug, Clone)]
pub struct Streams {
    redis: Redis,
}

impl Redis {
    /// Streams: producers, consumers, groups and dead letters.
    pub fn streams(&self) -> Streams {
        Streams {
            redis: self.clone(),
        }
    }
}

// Acks a message (if still pending for this consumer) and adds it to the dead-letter stream,
// trimmed by age. A message another consumer claimed meanwhile is left to it (0); one deleted
// from the stream is only cleared from the pending list (1). XADD comes before XACK so that a
// failed XADD changes nothing. The time (`dl:failed_at`, the
// retention cutoff) is the server's, like the entry ids it is compared with: a consumer whose
// clock is off would otherwise trim dead letters early or keep them too long.
static DEAD_LETTER: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_dead_letter",
        r#"
-- KEYS[1] source stream, KEYS[2] dead-letter stream
-- ARGV[1] group, ARGV[2] id, ARGV[3] retention ms, ARGV[4] consumer, ARGV[5..] fields
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[4])
if #pending == 0 then return 0 end
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {unpack(ARGV, 5)}
fields[#fields + 1] = 'dl:failed_at'
fields[#fields + 1] = string.format('%.0f', now)
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local cutoff = math.max(0, now - tonumber(ARGV[3]))
redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%.0f', cutoff) .. '-0')
return id
"#,
    )
});

// Exact trim of the dead-letter stream by age, on the server's clock (see DEAD_LETTER).
static TRIM_DEAD: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_trim_dead",
        r#"
-- KEYS[1] dead-letter stream; ARGV[1] retention ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = math.max(0, now - tonumber(ARGV[1]))
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f', cutoff) .. '-0')
"#,
    )
});

// Moves one dead letter back onto its source stream under a new id. No MAXLEN: the replay adds
// one entry, and trimming the source would drop messages its producers never asked to cap.
static REPLAY: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("stream_replay", REPLAY_SOURCE));

// An entry of more than `SCRIPT_FIELDS` fields answers 0: `replay_unscripted` moves it.
const REPLAY_SOURCE: &str = r#"
-- KEYS[1] source stream, KEYS[2] dead-letter stream; ARGV[1] dead-letter id
local found = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #found == 0 then return false end
local f = found[1][2]
if #f > 7800 then return 0 end
local out = {}
local original = nil
local lineage = nil
for i = 1, #f, 2 do
  local k = f[i]
  if k == 'dl:original_id' then original = f[i + 1] end
  if k == 'replay_of' then lineage = f[i + 1] end
  if string.sub(k, 1, 3) ~= 'dl:' and k ~= 'replay_of' then
    out[#out + 1] = k
    out[#out + 1] = f[i + 1]
  end
end
out[#out + 1] = 'replay_of'
out[#out + 1] = lineage or original or ARGV[1]
local id = redis.call('XADD', KEYS[1], '*', unpack(out))
redis.call('XDEL', KEYS[2], ARGV[1])
return id
"#;

// Deletes a consumer only if it still has no pending entries and is still idle: a consumer
// deleted with pending entries would lose them.
static REMOVE_IDLE_CONSUMERS: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_remove_idle_consumers",
        r#"
-- KEYS[1] stream; ARGV[1] group, ARGV[2] min idle ms, ARGV[3] consumer to keep
local removed = {}
local rows = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, row in ipairs(rows) do
  local c = {}
  for i = 1, #row, 2 do c[row[i]] = row[i + 1] end
  if c['pending'] == 0 and c['idle'] >= tonumber(ARGV[2]) and c['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    removed[#removed + 1] = c['name']
  end
end
return removed
"#,
    )
});

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn is_server_code(err: &Error, code: &str) -> bool {
    matches!(err, Error::Server(e) if e.code() == Some(code))
}

impl Streams {
    /// The keys of stream `name` (validated: non-empty, no `:`, braces, globs or whitespace).
    pub fn keys(&self, name: &str) -> Result<StreamKeys> {
        validate_key_part("stream name", name)?;
        let stream = format!("{}{name}", self.redis.keys().prefix());
        let dead = self.redis.keys().derived(&stream, "dead");
        Ok(StreamKeys {
            name: name.to_owned(),
            stream,
            dead,
            keys: self.redis.keys().clone(),
        })
    }

    /// A producer of `T` (JSON) on stream `name`, with `MAXLEN ~ 100000` and 24 h idempotency
    /// keys by default.
    pub fn producer<T: serde::Serialize>(&self, name: &str) -> Result<StreamProducer<T>> {
        Ok(StreamProducer::new(self.redis.clone(), self.keys(name)?))
    }

    /// A consumer of `T` in `group` of stream `name`. Needs Lua scripting (dead letters,
    /// idempotency records); fails with [`Error::Unsupported`] otherwise.
    pub fn consumer<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<StreamConsumer<T>> {
        validate_key_part("consumer group", group)?;
        StreamConsumer::new(
            self.redis.clone(),
            self.keys(name)?,
            group.to_owned(),
            options,
        )
    }

    /// Creates `group` on stream `name` (creating the stream too: `MKSTREAM`), starting at
    /// `start`. Returns `false` when the group already existed (`BUSYGROUP`), which is not an
    /// error. One round trip.
    pub async fn create_group(&self, name: &str, group: &str, start: StartFrom) -> Result<bool> {
        let keys = self.keys(name)?;
        validate_key_part("consumer group", group)?;
        create_group(&self.redis, &keys, group, start).await
    }

    /// Creates the documented groups: `webhook_workers` on `webhook_events` (new messages) and
    /// `task_workers` on `task_events` (from the beginning). Two round trips.
    pub async fn ensure_default_groups(&self) -> Result<()> {
        self.create_group(WEBHOOK_EVENTS, WEBHOOK_WORKERS, StartFrom::New)
            .await?;
        self.create_group(TASK_EVENTS, TASK_WORKERS, StartFrom::Beginning)
            .await?;
        Ok(())
    }

    /// Entries in stream `name` (`XLEN`). One round trip.
    pub async fn len(&self, name: &str) -> Result<u64> {
        let keys = self.keys(name)?;
        let v = self
            .redis
            .query("XLEN", redis::cmd("XLEN").arg(keys.stream()))
            .await?;
        Ok(u64::try_from(crate::codec::int(keys.stream(), v)?).unwrap_or(0))
    }

    /// Lag, pending count and consumers of `group` (`XINFO GROUPS`); `None` when the group (or
    /// the stream) does not exist. One round trip.
    pub async fn group_info(&self, name: &str, group: &str) -> Result<Option<GroupInfo>> {
        let keys = self.keys(name)?;
        group_info(&self.redis, &keys, group).await
    }

    /// The consumers of `group` (`XINFO CONSUMERS`). One round trip.
    pub async fn consumers(&self, name: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
        let keys = self.keys(name)?;
        validate_key_part("consumer group", group)?;
        let key = keys.stream();
        let reply = self
            .redis
            .query(
                "XINFO CONSUMERS",
                redis::cmd("XINFO").arg("CONSUMERS").arg(key).arg(group),
            )
            .await?;
        reply::info_rows(key, reply)?
            .into_iter()
            .map(|row| {
                Ok(ConsumerInfo {
                    name: reply::row_text(key, &row, "name")?.unwrap_or_default(),
                    pending: reply::row_int(key, &row, "pending")?
                        .and_then(|v| u64::try_from(v).ok())
                        .unwrap_or(0),
                    idle: Duration::from_millis(
                        reply::row_int(key, &row, "idle")?
                            .and_then(|v| u64::try_from(v).ok())
                            .unwrap_or(0),
                    ),
                })
            })
            .collect()
    }

    /// Deletes the consumers of `group` idle for at least `min_idle` whose pending list is
    /// empty, and returns their names. Atomic (one script, one round trip): a consumer that
    /// received entries meanwhile is kept, so no pending entry is ever dropped. Needs Lua
    /// scripting ([`Error::Unsupported`] otherwise, before anything is sent).
    pub async fn remove_idle_consumers(
        &self,
        name: &str,
        group: &str,
        min_idle: Duration,
    ) -> Result<Vec<String>> {
        let keys = self.keys(name)?;
        validate_key_part("consumer group", group)?;
        self.redis
            .require_scripting("idle-consumer removal (check and delete in one step)")?;
        remove_idle_consumers(&self.redis, &keys, group, min_idle, "").await
    }

    /// Up to `count` dead letters of stream `name`, oldest first (`XRANGE`). One round trip,
    /// read-only. Each entry is decoded on its own: one that is not a well-formed dead letter is
    /// listed with [`DeadLetter::problem`] set, and never fails the others.
    pub async fn dead_letters(&self, name: &str, count: usize) -> Result<Vec<DeadLetter>> {
        let keys = self.keys(name)?;
        self.dead_page(&keys, "-", count.max(1)).await
    }

    /// Up to `count` entries of the dead-letter stream from `start` (an `XRANGE` bound).
    async fn dead_page(
        &self,
        keys: &StreamKeys,
        start: &str,
        count: usize,
    ) -> Result<Vec<DeadLetter>> {
        let key = keys.dead();
        let reply = self
            .redis
            .query(
                "XRANGE",
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(reply::entries(key, reply)?
            .into_iter()
            .map(|e| dead_letter(key, e))
            .collect())
    }

    /// Puts dead letter `dead_id` back onto its source stream (new id, with the field
    /// `replay_of` = its first original id) and removes it from the dead-letter stream.
    /// Atomic (one script, one round trip; an entry of 3,900 fields or more, too wide for a
    /// script, takes a `WATCH` transaction of two more round trips, still moved once by
    /// concurrent replays). Without Lua scripting every replay takes that transaction. Returns
    /// the new id, or `None` when there is no such dead letter (already replayed or trimmed).
    ///
    /// The source stream is not trimmed (no `MAXLEN`): a replay adds one entry and never drops
    /// messages that its producers' cap would have kept. The entry's fields whose names start
    /// with `dl:` (the metadata) and its `replay_of` are not copied; a new `replay_of` is added.
    /// An entry with a [`DeadLetter::problem`] is replayed as it is (its `replay_of` is then its
    /// own `replay_of`, else its `dl:original_id`, else its dead-letter id).
    ///
    /// Every group of the stream receives the replayed message; a group that already handled
    /// the original (its `processed` record still exists) acks it without running its handler.
    pub async fn replay_dead_letter(&self, name: &str, dead_id: &str) -> Result<Option<String>> {
        let keys = self.keys(name)?;
        validate_entry_id(dead_id)?;
        replay(&self.redis, &keys, dead_id).await
    }

    /// Replays up to `count` well-formed dead letters, oldest first, as
    /// [`Streams::replay_dead_letter`] does (no trim of the source stream); returns the new ids.
    /// Entries with a [`DeadLetter::problem`] are left where they are (and logged): reading goes
    /// on past them, so they never stop the replay of the dead letters behind them. Round trips:
    /// one `XRANGE` per page of at least 100 entries, one script per replayed dead letter (each
    /// atomic on its own; a dead letter replayed meanwhile by someone else is skipped), or
    /// without Lua scripting one `WATCH` transaction per dead letter, as for wide entries.
    pub async fn replay_dead_letters(&self, name: &str, count: usize) -> Result<Vec<String>> {
        let keys = self.keys(name)?;
        let page = count.clamp(100, 1000);
        let mut ids = Vec::new();
        let mut start = "-".to_owned();
        while ids.len() < count {
            let dead = self.dead_page(&keys, &start, page).await?;
            let Some(last) = dead.last() else { break };
            // Exclusive: the next page starts after the last entry seen.
            start = format!("({}", last.id);
            let full = dead.len() == page;
            for letter in dead {
                if ids.len() == count {
                    break;
                }
                if let Some(problem) = &letter.problem {
                    tracing::warn!(
                        stream = keys.stream(),
                        id = letter.id,
                        problem,
                        "dead-letter entry skipped by replay: not a well-formed dead letter"
                    );
                    continue;
                }
                if let Some(id) = replay(&self.redis, &keys, &letter.id).await? {
                    ids.push(id);
                }
            }
            if !full {
                break;
            }
        }
        Ok(ids)
    }

    /// Removes dead letters older than `retention` (`XTRIM MINID`, exact) on the server's
    /// clock; returns how many. Consumers also trim (approximately) every time they add a dead
    /// letter. One round trip (a script: `TIME`, `XTRIM`); needs Lua scripting
    /// ([`Error::Unsupported`] otherwise), as the consumers that write dead letters do.
    pub async fn trim_dead_letters(&self, name: &str, retention: Duration) -> Result<u64> {
        let keys = self.keys(name)?;
        self.redis
            .require_scripting("dead-letter trim (on the server's clock)")?;
        let v = self
            .redis
            .eval_script(
                &TRIM_DEAD,
                &ScriptCall::new().key(keys.dead()).arg(millis(retention)),
            )
            .await?;
        Ok(u64::try_from(crate::codec::int(keys.dead(), v)?).unwrap_or(0))
    }
}

/// A complete entry id `<ms>-<seq>`. A bare `<ms>` is refused: `XRANGE` reads it as every
/// entry of that millisecond while `XDEL` deletes only `<ms>-0`, so a replay could republish
/// one entry and delete another (or none).
fn validate_entry_id(id: &str) -> Result<()> {
    crate::codec::validate_stream_id("stream entry id", id)
}

/// See [`Streams::group_info`].
pub(crate) async fn group_info(
    redis: &Redis,
    keys: &StreamKeys,
    group: &str,
) -> Result<Option<GroupInfo>> {
    let key = keys.stream();
    let reply = match redis
        .query("XINFO GROUPS", redis::cmd("XINFO").arg("GROUPS").arg(key))
        .await
    {
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        other => other?,
    };
    for row in reply::info_rows(key, reply)? {
        if reply::row_text(key, &row, "name")?.as_deref() != Some(group) {
            continue;
        }
        let count = |field: &str| -> Result<u64> {
            Ok(reply::row_int(key, &row, field)?
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0))
        };
        return Ok(Some(GroupInfo {
            name: group.to_owned(),
            consumers: count("consumers")?,
            pending: count("pending")?,
            last_delivered_id: reply::row_text(key, &row, "last-delivered-id")?.unwrap_or_default(),
            lag: reply::row_int(key, &row, "lag")?.and_then(|v| u64::try_from(v).ok()),
        }));
    }
    Ok(None)
}

pub(crate) async fn create_group(
    redis: &Redis,
    keys: &StreamKeys,
    group: &str,
    start: StartFrom,
) -> Result<bool> {
    create_group_at(redis, keys, group, start.id()).await
}

/// Creates `group` with `last` as its last delivered id (`XGROUP CREATE <s> <group> <last>
/// MKSTREAM`): the group is delivered every entry after `last` (`0`: every entry). Returns
/// `false` when the group already existed (`BUSYGROUP`). One round trip.
pub(crate) async fn create_group_at(
    redis: &Redis,
    keys: &StreamKeys,
    group: &str,
    last: &str,
) -> Result<bool> {
    let result = redis
        .query(
            "XGROUP CREATE",
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(keys.stream())
                .arg(group)
                .arg(last)
                .arg("MKSTREAM"),
        )
        .await;
    match result {
        Ok(_) => Ok(true),
        Err(e) if is_server_code(&e, "BUSYGROUP") => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) async fn remove_idle_consumers(
    redis: &Redis,
    keys: &StreamKeys,
    group: &str,
    min_idle: Duration,
    keep: &str,
) -> Result<Vec<String>> {
    let reply = redis
        .eval_script(
            &REMOVE_IDLE_CONSUMERS,
            &ScriptCall::new()
                .key(keys.stream())
                .arg(group)
                .arg(millis(min_idle))
                .arg(keep),
        )
        .await?;
    match reply {
        Value::Array(names) => names
            .into_iter()
            .map(|n| text(keys.stream(), None, n))
            .collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::decode(
            keys.stream(),
            None,
            format!("unexpected reply {other:?}"),
        )),
    }
}

/// What a consumer records about a message it gives up on.
pub(crate) struct DeadLetterCall<'a> {
    pub(crate) group: &'a str,
    pub(crate) consumer: &'a str,
    pub(crate) id: &'a str,
    pub(crate) fields: &'a [(String, Vec<u8>)],
    /// Exact bytes of the field names that are not UTF-8, by index in `fields`.
    pub(crate) raw_names: &'a [(usize, Vec<u8>)],
    pub(crate) delivery_count: u64,
    pub(crate) error: &'a str,
    pub(crate) retention: Duration,
}

/// What [`dead_letter_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLettered {
    /// Moved to the dead-letter stream and acked.
    Yes,
    /// Not pending for this consumer any more (acked, dead-lettered or claimed by another):
    /// left alone.
    NotOwned,
    /// Its entry was deleted from the stream: only cleared from the pending list.
    Gone,
}

/// Dead-letters one message pending for `call.consumer`. Atomic: one script, one round trip
/// (a message too wide for a script: [`dead_letter_unscripted`]). The original fields named `dl:*` are left out: the metadata appended after them would
/// otherwise be ambiguous. Field names are written as their exact bytes.
pub(crate) async fn dead_letter_message(
    redis: &Redis,
    keys: &StreamKeys,
    call: DeadLetterCall<'_>,
) -> Result<DeadLettered> {
    let delivery_count = call.delivery_count.to_string();
    let mut fields: Vec<(&[u8], &[u8])> = Vec::with_capacity(call.fields.len() + 5);
    for (i, (k, v)) in call.fields.iter().enumerate() {
        let name = call
            .raw_names
            .iter()
            .find(|(at, _)| *at == i)
            .map_or(k.as_bytes(), |(_, exact)| exact.as_slice());
        if !name.starts_with(DEAD_FIELD_PREFIX.as_bytes()) {
            fields.push((name, v.as_slice()));
        }
    }
    fields.extend([
        (&b"dl:original_id"[..], call.id.as_bytes()),
        (b"dl:delivery_count", delivery_count.as_bytes()),
        (b"dl:error", call.error.as_bytes()),
        (b"dl:group", call.group.as_bytes()),
        (b"dl:consumer", call.consumer.as_bytes()),
    ]);
    // `dl:failed_at` is one more.
    if fields.len() >= SCRIPT_FIELDS {
        return dead_letter_unscripted(redis, keys, &call, &fields).await;
    }
    let mut script = ScriptCall::new()
        .key(keys.stream())
        .key(keys.dead())
        .arg(call.group)
        .arg(call.id)
        .arg(millis(call.retention))
        .arg(call.consumer);
    for (name, value) in &fields {
        script = script.arg(*name).arg(*value);
    }
    match redis.eval_script(&DEAD_LETTER, &script).await? {
        Value::Int(0) => Ok(DeadLettered::NotOwned),
        Value::Int(1) => Ok(DeadLettered::Gone),
        Value::BulkString(_) | Value::SimpleString(_) => Ok(DeadLettered::Yes),
        other => Err(Error::decode(
            keys.dead(),
            None,
            format!("unexpected dead-letter reply {other:?}"),
        )),
    }
}

/// [`dead_letter_message`] for an entry too wide for a script: the same checks and writes in
/// two round trips, a pipeline of `XPENDING`, `XRANGE` and `TIME`, then `MULTI XADD XACK XTRIM
/// EXEC`. Between the two, another consumer could claim the message and dead-letter it too,
/// which needs the message idle for the claim's minimum while this consumer holds it, and its
/// heartbeat keeps that from happening.
async fn dead_letter_unscripted(
    redis: &Redis,
    keys: &StreamKeys,
    call: &DeadLetterCall<'_>,
    fields: &[(&[u8], &[u8])],
) -> Result<DeadLettered> {
    const OP: &str = "stream.dead_letter";
    let (stream, dead) = (keys.stream(), keys.dead());
    let mut check = redis::pipe();
    check
        .cmd("XPENDING")
        .arg(stream)
        .arg(call.group)
        .arg(call.id)
        .arg(call.id)
        .arg(1)
        .arg(call.consumer)
        .cmd("XRANGE")
        .arg(stream)
        .arg(call.id)
        .arg(call.id)
        .cmd("TIME");
    let replies = redis.query_pipe(OP, &check).await?.unwrap_or_default();
    let [pending, entry, time] = <[Value; 3]>::try_from(replies)
        .map_err(|r| Error::decode(stream, None, format!("expected 3 replies, got {r:?}")))?;
    let is_empty = |v: &Value| matches!(v, Value::Array(items) if items.is_empty());
    if is_empty(&pending) {
        return Ok(DeadLettered::NotOwned);
    }
    if is_empty(&entry) {
        redis
            .query(
                OP,
                redis::cmd("XACK").arg(stream).arg(call.group).arg(call.id),
            )
            .await?;
        return Ok(DeadLettered::Gone);
    }
    let now = crate::clock::time_reply_millis(&time)
        .ok_or_else(|| Error::decode(stream, None, format!("bad TIME reply {time:?}")))?;
    let cutoff = now.saturating_sub(i64::try_from(millis(call.retention)).unwrap_or(i64::MAX));
    let mut tx = redis::pipe();
    tx.atomic();
    let xadd = tx.cmd("XADD").arg(dead).arg("*");
    for (name, value) in fields {
        xadd.arg(*name).arg(*value);
    }
    xadd.arg("dl:failed_at").arg(now);
    tx.cmd("XACK")
        .arg(stream)
        .arg(call.group)
        .arg(call.id)
        .ignore()
        .cmd("XTRIM")
        .arg(dead)
        .arg("MINID")
        .arg("~")
        .arg(format!("{}-0", cutoff.max(0)))
        .ignore();
    redis.query_pipe(OP, &tx).await?;
    Ok(DeadLettered::Yes)
}

async fn replay(redis: &Redis, keys: &StreamKeys, dead_id: &str) -> Result<Option<String>> {
    // The same moves and result, one `WATCH` transaction instead of a script.
    if !redis.capabilities().scripting {
        return replay_unscripted(redis, keys, dead_id).await;
    }
    let reply = redis
        .eval_script(
            &REPLAY,
            &ScriptCall::new()
                .key(keys.stream())
                .key(keys.dead())
                .arg(dead_id),
        )
        .await?;
    if reply == Value::Int(0) {
        return replay_unscripted(redis, keys, dead_id).await;
    }
    crate::codec::opt_text(keys.dead(), reply)
}

/// The `REPLAY` script's moves for an entry too wide for it, as one `WATCH` transaction on a
/// dedicated connection: `WATCH <dead>`, `XRANGE`, then `MULTI XADD XDEL EXEC`, tried again
/// (up to 16 times) when a write to the dead-letter stream aborts it, so concurrent replays
/// still move the entry once.
async fn replay_unscripted(
    redis: &Redis,
    keys: &StreamKeys,
    dead_id: &str,
) -> Result<Option<String>> {
    const OP: &str = "stream.replay_dead_letter";
    const ATTEMPTS: usize = 16;
    let (stream, dead) = (keys.stream(), keys.dead());
    let mut conn = redis.dedicated().await?;
    let limit = redis.config().response_timeout;
    let outcome = tokio::time::timeout(limit.saturating_mul(ATTEMPTS as u32), async {
        for _ in 0..ATTEMPTS {
            let mut read = redis::pipe();
            read.cmd("WATCH")
                .arg(dead)
                .ignore()
                .cmd("XRANGE")
                .arg(dead)
                .arg(dead_id)
                .arg(dead_id);
            let (found,): (Value,) = read.query_async(&mut conn).await?;
            let Some(fields) = replayed_fields(found, dead_id) else {
                let _: () = redis::cmd("UNWATCH").query_async(&mut conn).await?;
                return Ok(Some(None));
            };
            let mut tx = redis::pipe();
            tx.atomic();
            let xadd = tx.cmd("XADD").arg(stream).arg("*");
            for field in &fields {
                xadd.arg(field.as_slice());
            }
            tx.cmd("XDEL").arg(dead).arg(dead_id).ignore();
            let applied: Option<(String,)> = tx.query_async(&mut conn).await?;
            if let Some((id,)) = applied {
                return Ok(Some(Some(id)));
            }
        }
        Ok(None)
    })
    .await;
    match outcome {
        Ok(Ok(Some(id))) => Ok(id),
        Ok(Ok(None)) => Err(Error::Unavailable {
            message: "dead-letter replay kept conflicting with concurrent writes".into(),
            source: None,
        }),
        Ok(Err(e)) => {
            conn.discard();
            Err(redis.fail(OP, e))
        }
        Err(_) => {
            conn.discard();
            Err(Error::Timeout {
                operation: OP,
                after: limit.saturating_mul(ATTEMPTS as u32),
            })
        }
    }
}

/// The `XADD` arguments that replay the entry an `XRANGE <id> <id>` found, as the `REPLAY`
/// script builds them: its fields without the `dl:*` ones and `replay_of`, then a new
/// `replay_of` (its own, else `dl:original_id`, else the dead-letter id). `None` when nothing
/// was found.
fn replayed_fields(found: Value, dead_id: &str) -> Option<Vec<Vec<u8>>> {
    let Value::Array(mut entries) = found else {
        return None;
    };
    let Value::Array(mut entry) = entries.pop()? else {
        return None;
    };
    let Value::Array(flat) = entry.pop()? else {
        return None;
    };
    let bytes = |v: Value| match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        _ => Vec::new(),
    };
    let mut out = Vec::with_capacity(flat.len() + 2);
    let (mut original, mut lineage) = (None, None);
    let mut flat = flat.into_iter();
    while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
        let (name, value) = (bytes(name), bytes(value));
        if name == b"dl:original_id" {
            original = Some(value.clone());
        }
        if name == b"replay_of" {
            lineage = Some(value.clone());
        }
        if !name.starts_with(b"dl:") && name != b"replay_of" {
            out.push(name);
            out.push(value);
        }
    }
    out.push(b"replay_of".to_vec());
    out.push(
        lineage
            .or(original)
            .unwrap_or_else(|| dead_id.as_bytes().to_vec()),
    );
    Some(out)
}

/// Decodes one dead-letter entry; what is missing or malformed is named in `problem`.
fn dead_letter(key: &str, entry: reply::RawEntry) -> DeadLetter {
    let mut problems: Vec<String> = entry.malformed.iter().cloned().collect();
    let mut meta = |name: &str| -> String {
        entry.field_text(name).unwrap_or_else(|| {
            problems.push(format!("field `{name}` is missing"));
            String::new()
        })
    };
    let original_id = meta("dl:original_id");
    let delivery_count = meta("dl:delivery_count");
    let error = meta("dl:error");
    let group = meta("dl:group");
    let consumer = meta("dl:consumer");
    let failed_at = meta("dl:failed_at");
    let mut number = |name: &str, raw: &str| -> i64 {
        if raw.is_empty() {
            return 0;
        }
        raw.parse().unwrap_or_else(|_| {
            problems.push(format!("field `{name}` is not a number: {raw:?}"));
            0
        })
    };
    let delivery_count = u64::try_from(number("dl:delivery_count", &delivery_count)).unwrap_or(0);
    let failed_at = number("dl:failed_at", &failed_at);
    DeadLetter {
        original_id,
        delivery_count,
        error,
        group,
        consumer,
        failed_at,
        fields: entry
            .fields
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.starts_with(DEAD_FIELD_PREFIX))
            .collect(),
        problem: (!problems.is_empty()).then(|| {
            format!(
                "entry {} of {key} is not a dead letter as documented: {}",
                entry.id,
                problems.join("; ")
            )
        }),
        id: entry.id,
        key: key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_script_hands_wide_entries_over_at_the_same_width() {
        assert!(REPLAY_SOURCE.contains(&format!("if #f > {} then return 0", 2 * SCRIPT_FIELDS)));
    }

    #[test]
    fn unscripted_replays_build_the_fields_the_script_does() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let found = |fields: Vec<Value>| {
            Value::Array(vec![Value::Array(vec![b("1-0"), Value::Array(fields)])])
        };
        let strings = |v: Vec<Vec<u8>>| -> Vec<String> {
            v.into_iter()
                .map(|f| String::from_utf8(f).unwrap())
                .collect()
        };
        let dead = found(vec![
            b("payload"),
            b("{}"),
            b("dl:original_id"),
            b("5-0"),
            b("dl:error"),
            b("x"),
        ]);
        assert_eq!(
            strings(replayed_fields(dead, "9-0").unwrap()),
            ["payload", "{}", "replay_of", "5-0"]
        );
        let again = found(vec![
            b("replay_of"),
            b("3-0"),
            b("a"),
            b("1"),
            b("dl:original_id"),
            b("5-0"),
        ]);
        assert_eq!(
            strings(replayed_fields(again, "9-0").unwrap()),
            ["a", "1", "replay_of", "3-0"]
        );
        let bare = found(vec![b("a"), b("1")]);
        assert_eq!(
            strings(replayed_fields(bare, "9-0").unwrap()),
            ["a", "1", "replay_of", "9-0"]
        );
        assert_eq!(replayed_fields(Value::Array(vec![]), "9-0"), None);
    }

    #[test]
    fn entry_ids_are_validated() {
        assert!(validate_entry_id("1700000000000-0").is_ok());
        assert!(validate_entry_id("17").is_err());
        assert!(validate_entry_id("+17-0").is_err());
        assert!(validate_entry_id("17-18446744073709551616").is_err());
        assert!(validate_entry_id("18446744073709551615-18446744073709551615").is_ok());
        assert!(validate_entry_id("1-x").is_err());
        assert!(validate_entry_id("-").is_err());
        assert!(validate_entry_id("").is_err());
    }

    #[test]
    fn derived_stream_keys_share_the_stream_slot() {
        use crate::keyspace::cluster_slot;
        let builder = crate::keyspace::Keys::new("p:", true);
        let keys = StreamKeys {
            name: "task_events".into(),
            stream: "p:task_events".into(),
            dead: builder.derived("p:task_events", "dead"),
            keys: builder,
        };
        let slot = cluster_slot(keys.stream());
        assert_eq!(cluster_slot(keys.dead()), slot);
        assert_eq!(cluster_slot(&keys.producer_idempotency("k")), slot);
        assert_eq!(cluster_slot(&keys.processed("g", None, "1-0")), slot);
        assert_eq!(cluster_slot(&keys.processed("g", Some("k"), "1-0")), slot);
        assert_eq!(keys.dead(), "{p:task_events}:dead");
        assert_eq!(
            keys.processed("g", Some("k"), "1-0"),
            "{p:task_events}:processed:g:key:k"
        );
    }
}
