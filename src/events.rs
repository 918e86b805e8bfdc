//! Event keyspaces: per-user notifications (`notifications:*`), time-bucketed counters
//! (`metrics:*`), per-user security events (`security-events:*`) and the audit log
//! (`audit:*`).
//!
//! Every write carries its keyspace's TTL in the same `MULTI`. Security events and audit
//! records are append-only streams: the API adds and reads records and never changes one;
//! records older than the keyspace's TTL are trimmed (`XTRIM MINID`) on every append, and the
//! stream key itself expires one TTL after its last append.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use serde::{Deserialize, Serialize};

use crate::clock::time_reply_millis;
use crate::codec;
use crate::error::{Error, Result};
use crate::keyspace::{Keyspace, validate_key_part};
use crate::pool::Redis;
use crate::script::{LuaScript, ScriptCall};

/// Default number of notifications kept per user.
pub const DEFAULT_NOTIFICATION_CAP: usize = 100;
/// Default width of a metrics bucket.
pub const DEFAULT_METRIC_BUCKET: Duration = Duration::from_secs(10);
/// Default number of security events kept per user (within the retention window).
pub const DEFAULT_SECURITY_EVENT_CAP: usize = 10_000;
/// Most buckets one [`Events::metric_window`] call reads.
pub const MAX_WINDOW_BUCKETS: u64 = 10_000;
/// Largest accepted JSON `data` / `details` value, in bytes once encoded.
pub const MAX_DETAILS_BYTES: usize = 64 * 1024;
/// The audit stream's key part: `audit:log`.
const AUDIT_STREAM: &str = "log";

/// A notification to push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NewNotification {
    /// What kind it is (`mail.received`, `security.login`, ...), 1–128 bytes.
    pub kind: String,
    /// Title, at most 1 KiB.
    pub title: String,
    /// Body, at most 16 KiB.
    pub body: String,
    /// Free-form JSON, at most [`MAX_DETAILS_BYTES`] encoded.
    pub data: serde_json::Value,
}

impl NewNotification {
    /// A notification with an empty body and `null` data.
    pub fn new(kind: impl Into<String>, title: impl Into<String>) -> Self {
        NewNotification {
            kind: kind.into(),
            title: title.into(),
            body: String::new(),
            data: serde_json::Value::Null,
        }
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the data.
    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }
}

/// A stored notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Notification {
    /// Random id (URL-safe).
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Data.
    #[serde(default)]
    pub data: serde_json::Value,
    /// When it was pushed (ms since the epoch).
    pub created_at: i64,
    /// Whether it was marked read (kept outside the stored JSON; see `docs/keyspace.md`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read: bool,
}

/// One metrics bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct MetricBucket {
    /// Start of the bucket (ms since the epoch, a multiple of the bucket width).
    pub start: i64,
    /// Count per label; empty when nothing was counted (or the bucket expired).
    pub counts: BTreeMap<String, i64>,
}

/// A security event to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SecurityEvent {
    /// What happened (`login.failed`, `password.changed`, ...), 1–128 bytes.
    pub kind: String,
    /// Client address, if known.
    pub ip: Option<String>,
    /// Client user agent, if known.
    pub user_agent: Option<String>,
    /// Free-form JSON, at most [`MAX_DETAILS_BYTES`] encoded.
    pub details: serde_json::Value,
}

impl SecurityEvent {
    /// An event with no address, agent or details.
    pub fn new(kind: impl Into<String>) -> Self {
        SecurityEvent {
            kind: kind.into(),
            ip: None,
            user_agent: None,
            details: serde_json::Value::Null,
        }
    }

    /// Sets the client address.
    pub fn ip(mut self, ip: impl Into<String>) -> Self {
        self.ip = Some(ip.into());
        self
    }

    /// Sets the user agent.
    pub fn user_agent(mut self, agent: impl Into<String>) -> Self {
        self.user_agent = Some(agent.into());
        self
    }

    /// Sets the details.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// A recorded security event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct SecurityEventRecord {
    /// Stream entry id (`<ms>-<seq>`).
    pub id: String,
    /// When it was recorded (ms since the epoch, server clock).
    pub at: i64,
    /// What happened.
    pub kind: String,
    /// Client address.
    pub ip: Option<String>,
    /// User agent.
    pub user_agent: Option<String>,
    /// Details.
    pub details: serde_json::Value,
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// Who acted (a user id, `system`, a service name), 1–256 bytes.
    pub actor: String,
    /// What was done (`user.erased`, `role.changed`, ...), 1–256 bytes.
    pub action: String,
    /// What it was done to, possibly empty, at most 1 KiB.
    pub target: String,
    /// Free-form JSON, at most [`MAX_DETAILS_BYTES`] encoded.
    pub details: serde_json::Value,
}

impl AuditEntry {
    /// An entry with no target and no details.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Self {
        AuditEntry {
            actor: actor.into(),
            action: action.into(),
            target: String::new(),
            details: serde_json::Value::Null,
        }
    }

    /// Sets the target.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = target.into();
        self
    }

    /// Sets the details.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// An appended audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct AuditRecord {
    /// Stream entry id (`<ms>-<seq>`).
    pub id: String,
    /// When it was appended (ms since the epoch, server clock).
    pub at: i64,
    /// Who acted.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// Details.
    pub details: serde_json::Value,
}

/// Marks notifications read: `KEYS[1]` the list, `KEYS[2]` the read-mark set, `ARGV[1]` the
/// TTL in ms, `ARGV[2..]` ids (none: all). Only ids still in the list are marked, and marks of
/// notifications trimmed off the list are dropped, so the set never outgrows the list.
/// Replies the number of newly marked notifications.
static MARK_READ: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "events.mark_read",
        r#"
local present = {}
local all = {}
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' and type(v.id) == 'string' then
    present[v.id] = true
    all[#all + 1] = v.id
  end
end
for _, mark in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not present[mark] then redis.call('SREM', KEYS[2], mark) end
end
local wanted = all
if #ARGV > 1 then
  wanted = {}
  for i = 2, #ARGV do
    if present[ARGV[i]] then wanted[#wanted + 1] = ARGV[i] end
  end
end
local added = 0
for _, id in ipairs(wanted) do
  added = added + redis.call('SADD', KEYS[2], id)
end
if #wanted > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return added
"#,
    )
});

fn check_text(what: &'static str, value: &str, min: usize, max: usize) -> Result<()> {
    if value.len() < min || value.len() > max {
        return Err(Error::invalid(
            what,
            format!("is {} bytes long; allowed {min}..={max}", value.len()),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(Error::invalid(what, "contains control characters"));
    }
    Ok(())
}

fn encode_details(what: &'static str, value: &serde_json::Value) -> Result<String> {
    let raw = codec::to_json(what, value)?;
    if raw.len() > MAX_DETAILS_BYTES {
        return Err(Error::invalid(
            what,
            format!(
                "encodes to {} bytes; the limit is {MAX_DETAILS_BYTES}",
                raw.len()
            ),
        ));
    }
    Ok(raw)
}

/// One stream entry: id and fields.
type Entry = (String, BTreeMap<String, String>);

/// Decodes an `XRANGE`/`XREVRANGE` reply with the stream decoder, fields as text.
fn stream_entries(key: &str, reply: Value) -> Result<Vec<Entry>> {
    crate::stream::reply::entries(key, reply)?
        .into_iter()
        .map(|entry| {
            let mut fields = BTreeMap::new();
            for (name, value) in entry.fields.unwrap_or_default() {
                let text = String::from_utf8(value)
                    .map_err(|_| Error::decode(key, Some(&name), "value is not UTF-8"))?;
                fields.insert(name, text);
            }
            Ok((entry.id, fields))
        })
        .collect()
}

fn entry_millis(key: &str, id: &str) -> Result<i64> {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .ok_or_else(|| Error::decode(key, None, format!("bad stream id {id:?}")))
}

fn details_field(
    key: &str,
    fields: &BTreeMap<String, String>,
    name: &str,
) -> Result<serde_json::Value> {
    match fields.get(name) {
        None => Ok(serde_json::Value::Null),
        Some(raw) => serde_json::from_str(raw)
            .map_err(|e| Error::decode(key, Some(name), format!("not JSON: {e}"))),
    }
}

fn required(key: &str, fields: &mut BTreeMap<String, String>, name: &str) -> Result<String> {
    fields
        .remove(name)
        .ok_or_else(|| Error::decode(key, Some(name), "missing"))
}

/// `from..=to` as `XRANGE` bounds (ms), rejecting an inverted range.
fn range_bounds(from_ms: i64, to_ms: i64) -> Result<(String, String)> {
    if from_ms > to_ms || from_ms < 0 {
        return Err(Error::invalid(
            "time range",
            format!("{from_ms}..={to_ms} is empty or negative"),
        ));
    }
    Ok((from_ms.to_string(), to_ms.to_string()))
}

fn security_records(key: &str, entries: Vec<Entry>) -> Result<Vec<SecurityEventRecord>> {
    entries
        .into_iter()
        .map(|(id, mut fields)| {
            Ok(SecurityEventRecord {
                at: entry_millis(key, &id)?,
                details: details_field(key, &fields, "details")?,
                kind: required(key, &mut fields, "kind")?,
                ip: fields.remove("ip"),
                user_agent: fields.remove("userAgent"),
                id,
            })
        })
        .collect()
}

fn check_limit(limit: usize) -> Result<()> {
    if limit == 0 || limit > 100_000 {
        return Err(Error::invalid("limit", "must be 1..=100000"));
    }
    Ok(())
}

/// The event repository. Get it with [`Redis::events`].
#[derive(Debug, Clone)]
pub struct Events {
    redis: Redis,
    notification_cap: usize,
    metric_bucket_ms: i64,
    security_event_cap: usize,
}

impl Redis {
    /// The event repository (notifications, metrics, security events, audit).
    pub fn events(&self) -> Events {
        Events {
            redis: self.clone(),
            notification_cap: DEFAULT_NOTIFICATION_CAP,
            metric_bucket_ms: DEFAULT_METRIC_BUCKET.as_millis() as i64,
            security_event_cap: DEFAULT_SECURITY_EVENT_CAP,
        }
    }
}

impl Events {
    /// Keeps the newest `cap` notifications per user (1..=10,000).
    pub fn with_notification_cap(mut self, cap: usize) -> Result<Self> {
        if cap == 0 || cap > 10_000 {
            return Err(Error::invalid("notification cap", "must be 1..=10000"));
        }
        self.notification_cap = cap;
        Ok(self)
    }

    /// Sets the metrics bucket width (a whole number of milliseconds, 1 ms..=1 day). Every
    /// writer and reader of one metric must use the same width.
    pub fn with_metric_bucket(mut self, width: Duration) -> Result<Self> {
        let ms = width.as_millis();
        if ms == 0 || ms > 86_400_000 || !width.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(Error::invalid(
                "metric bucket",
                "must be whole milliseconds in 1 ms..=1 day",
            ));
        }
        self.metric_bucket_ms = ms as i64;
        Ok(self)
    }

    /// Keeps at most `cap` security events per user (1..=1,000,000), besides the time-based
    /// retention.
    pub fn with_security_event_cap(mut self, cap: usize) -> Result<Self> {
        if cap == 0 || cap > 1_000_000 {
            return Err(Error::invalid("security event cap", "must be 1..=1000000"));
        }
        self.security_event_cap = cap;
        Ok(self)
    }

    fn notification_keys(&self, user_id: &str) -> Result<(String, String)> {
        validate_key_part("user id", user_id)?;
        let list = self.redis.keys().key(Keyspace::Notifications, &[user_id])?;
        let read = self.redis.keys().derived(&list, "read");
        Ok((list, read))
    }

    /// Pushes a notification to the front of `notifications:<userId>`, drops the oldest beyond
    /// the cap and resets the TTL of the list and its read marks.
    ///
    /// One round trip, atomic: `MULTI LPUSH LTRIM PEXPIRE PEXPIRE EXEC`.
    #[tracing::instrument(name = "events.push_notification", skip_all)]
    pub async fn push_notification(
        &self,
        user_id: &str,
        notification: &NewNotification,
    ) -> Result<Notification> {
        let (list, read) = self.notification_keys(user_id)?;
        check_text("notification kind", &notification.kind, 1, 128)?;
        check_text("notification title", &notification.title, 0, 1024)?;
        check_text("notification body", &notification.body, 0, 16 * 1024)?;
        encode_details("notification data", &notification.data)?;
        let stored = Notification {
            id: crate::random::secret_token(12)?,
            kind: notification.kind.clone(),
            title: notification.title.clone(),
            body: notification.body.clone(),
            data: notification.data.clone(),
            created_at: codec::now_millis(),
            read: false,
        };
        let raw = codec::to_json("notification", &stored)?;
        let ttl = self.redis.ttl().millis(Keyspace::Notifications);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(&list)
            .arg(&raw)
            .ignore()
            .cmd("LTRIM")
            .arg(&list)
            .arg(0)
            .arg(self.notification_cap as i64 - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&list)
            .arg(ttl)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&read)
            .arg(ttl)
            .ignore();
        self.redis
            .query_pipe("events.push_notification", &pipe)
            .await?;
        Ok(stored)
    }

    /// The newest `limit` notifications, newest first, with their read flags.
    /// One round trip: `MULTI LRANGE SMEMBERS EXEC` (a consistent snapshot). Read-only.
    #[tracing::instrument(name = "events.notifications", skip_all)]
    pub async fn notifications(&self, user_id: &str, limit: usize) -> Result<Vec<Notification>> {
        let (list, read) = self.notification_keys(user_id)?;
        check_limit(limit)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LRANGE")
            .arg(&list)
            .arg(0)
            .arg(limit as i64 - 1)
            .cmd("SMEMBERS")
            .arg(&read);
        let reply = self
            .redis
            .query_pipe("events.notifications", &pipe)
            .await?
            .unwrap_or_default();
        let mut reply = reply.into_iter();
        let items = reply.next().unwrap_or(Value::Nil);
        let marks = reply.next().unwrap_or(Value::Nil);
        let marks: std::collections::BTreeSet<String> = match marks {
            Value::Array(v) | Value::Set(v) => v
                .into_iter()
                .map(|m| codec::text(&read, None, m))
                .collect::<Result<_>>()?,
            _ => Default::default(),
        };
        let Value::Array(items) = items else {
            return Ok(Vec::new());
        };
        items
            .into_iter()
            .map(|item| {
                let raw = codec::text(&list, None, item)?;
                let mut n: Notification = codec::from_json(&list, raw.as_bytes())?;
                n.read = marks.contains(&n.id);
                Ok(n)
            })
            .collect()
    }

    /// Marks the given notifications read (ids not in the list are ignored); returns how many
    /// were newly marked. One round trip, atomic (a Lua script on the list and its read-mark
    /// set, which share a Cluster slot); needs Lua scripting ([`Error::Unsupported`] without
    /// it). The script reads the whole list, so its server time grows with the list's bytes:
    /// about 0.55 ms per MB here (0.55 s for 1000 notifications of the largest size, which a
    /// cap near 10,000 allows; the server answers nobody else meanwhile). Keep the cap to what
    /// a user reads.
    #[tracing::instrument(name = "events.mark_read", skip_all)]
    pub async fn mark_read(&self, user_id: &str, ids: &[&str]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        for id in ids {
            check_text("notification id", id, 1, 128)?;
        }
        self.run_mark_read(user_id, ids).await
    }

    /// Marks every notification in the list read. Same as [`Events::mark_read`].
    #[tracing::instrument(name = "events.mark_all_read", skip_all)]
    pub async fn mark_all_read(&self, user_id: &str) -> Result<u64> {
        self.run_mark_read(user_id, &[]).await
    }

    async fn run_mark_read(&self, user_id: &str, ids: &[&str]) -> Result<u64> {
        let (list, read) = self.notification_keys(user_id)?;
        self.redis.require_scripting("marking notifications read")?;
        let mut call = ScriptCall::new()
            .key(&list)
            .key(&read)
            .arg(self.redis.ttl().millis(Keyspace::Notifications));
        for id in ids {
            call = call.arg(*id);
        }
        let n = self.redis.eval_script(&MARK_READ, &call).await?;
        Ok(u64::try_from(codec::int(&list, n)?).unwrap_or(0))
    }

    /// Deletes the user's notifications and read marks. One round trip (`DEL` of two keys in
    /// one slot, atomic); `true` if there were any.
    #[tracing::instrument(name = "events.clear_notifications", skip_all)]
    pub async fn clear_notifications(&self, user_id: &str) -> Result<bool> {
        let (list, read) = self.notification_keys(user_id)?;
        let n: i64 = self
            .redis
            .query_as(
                "events.clear_notifications",
                &list,
                redis::cmd("DEL").arg(&list).arg(&read),
            )
            .await?;
        Ok(n > 0)
    }

    fn metric_key(&self, metric: &str, bucket_start: i64) -> Result<String> {
        validate_key_part("metric", metric)?;
        Ok(self
            .redis
            .keys()
            .family(Keyspace::Metrics, metric, &bucket_start.to_string()))
    }

    fn bucket_of(&self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.metric_bucket_ms) * self.metric_bucket_ms
    }

    /// The TTL an increment of the bucket starting at `bucket_start` sets, at `now_ms`: the
    /// table's, plus what is left of the bucket (at most its width), so that a bucket wider
    /// than the TTL is not lost in a pause within it.
    fn bucket_ttl_ms(&self, bucket_start: i64, now_ms: i64) -> u64 {
        let ttl = self.redis.ttl().millis(Keyspace::Metrics);
        let left = bucket_start
            .saturating_add(self.metric_bucket_ms)
            .saturating_sub(now_ms)
            .clamp(0, self.metric_bucket_ms);
        ttl.saturating_add(left.unsigned_abs())
    }

    /// Adds `by` to `label` of `metric` in the current bucket; returns the bucket's new count.
    /// The bucket is the hash `metrics:<metric>:<bucketStart>` (`metrics:{<metric>}:..` in
    /// Cluster), whose TTL every increment sets to the table's plus what is left of the bucket
    /// (so a bucket lives one TTL after its last increment and after its end).
    ///
    /// One round trip, atomic: `MULTI HINCRBY PEXPIRE EXEC`.
    #[tracing::instrument(name = "events.incr", skip_all)]
    pub async fn incr(&self, metric: &str, label: &str, by: i64) -> Result<i64> {
        self.incr_at(metric, label, by, codec::now_millis()).await
    }

    /// [`Events::incr`] in the bucket holding `at_ms` (for backfills and tests; ms since the
    /// epoch, not negative).
    #[tracing::instrument(name = "events.incr_at", skip_all)]
    pub async fn incr_at(&self, metric: &str, label: &str, by: i64, at_ms: i64) -> Result<i64> {
        check_text("metric label", label, 1, 256)?;
        if at_ms < 0 {
            return Err(Error::invalid(
                "metric time",
                format!("{at_ms} is before the epoch"),
            ));
        }
        let bucket_start = self.bucket_of(at_ms);
        let key = self.metric_key(metric, bucket_start)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HINCRBY")
            .arg(&key)
            .arg(label)
            .arg(by)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.bucket_ttl_ms(bucket_start, codec::now_millis()))
            .ignore();
        let reply = self.redis.query_pipe("events.incr", &pipe).await?;
        let value = reply
            .and_then(|v| v.into_iter().next())
            .ok_or_else(|| Error::decode(&key, None, "empty transaction reply"))?;
        codec::int(&key, value)
    }

    /// Every bucket of `metric` from the one holding `from_ms` to the one holding `to_ms`,
    /// oldest first (at most [`MAX_WINDOW_BUCKETS`]). One round trip: a pipeline of `HGETALL`s
    /// (one Cluster slot per metric), read-only.
    #[tracing::instrument(name = "events.metric_window", skip_all)]
    pub async fn metric_window(
        &self,
        metric: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MetricBucket>> {
        range_bounds(from_ms, to_ms)?;
        let first = self.bucket_of(from_ms);
        let last = self.bucket_of(to_ms);
        let count = ((last - first) / self.metric_bucket_ms) as u64 + 1;
        if count > MAX_WINDOW_BUCKETS {
            return Err(Error::invalid(
                "time range",
                format!("spans {count} buckets; the limit is {MAX_WINDOW_BUCKETS}"),
            ));
        }
        let starts: Vec<i64> = (0..count as i64)
            .map(|i| first + i * self.metric_bucket_ms)
            .collect();
        let keys = starts
            .iter()
            .map(|s| self.metric_key(metric, *s))
            .collect::<Result<Vec<_>>>()?;
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("HGETALL").arg(key);
        }
        let replies = self
            .redis
            .query_pipe("events.metric_window", &pipe)
            .await?
            .unwrap_or_default();
        if replies.len() != keys.len() {
            return Err(Error::decode(metric, None, "short pipeline reply"));
        }
        starts
            .into_iter()
            .zip(keys)
            .zip(replies)
            .map(|((start, key), reply)| {
                let mut counts = BTreeMap::new();
                if let Some(fields) = codec::HashFields::from_reply(&key, reply)? {
                    for (label, _) in fields.fields() {
                        counts.insert(label.clone(), fields.parse::<i64>(label)?);
                    }
                }
                Ok(MetricBucket { start, counts })
            })
            .collect()
    }

    fn security_key(&self, user_id: &str) -> Result<String> {
        validate_key_part("user id", user_id)?;
        self.redis.keys().key(Keyspace::SecurityEvents, &[user_id])
    }

    /// Appends a security event to the stream `security-events:<userId>`; returns its entry id.
    /// Entries older than the keyspace TTL are trimmed, at most the configured cap are kept,
    /// and the stream expires one TTL after its last append.
    ///
    /// One round trip, atomic: `MULTI TIME XADD XTRIM MINID XTRIM MAXLEN PEXPIRE EXEC` (a lone
    /// `TIME` first, at most once a minute, while the handle has no reading of the server
    /// clock).
    #[tracing::instrument(name = "events.record_security_event", skip_all)]
    pub async fn record_security_event(
        &self,
        user_id: &str,
        event: &SecurityEvent,
    ) -> Result<String> {
        let key = self.security_key(user_id)?;
        check_text("security event kind", &event.kind, 1, 128)?;
        if let Some(ip) = &event.ip {
            check_text("security event ip", ip, 1, 64)?;
        }
        if let Some(agent) = &event.user_agent {
            check_text("security event user agent", agent, 0, 1024)?;
        }
        let details = encode_details("security event details", &event.details)?;
        let mut fields: Vec<(&str, &str)> = vec![("kind", &event.kind)];
        if let Some(ip) = &event.ip {
            fields.push(("ip", ip));
        }
        if let Some(agent) = &event.user_agent {
            fields.push(("userAgent", agent));
        }
        fields.push(("details", &details));
        self.append(
            "events.record_security_event",
            &key,
            Keyspace::SecurityEvents,
            Some(self.security_event_cap),
            &fields,
        )
        .await
    }

    async fn append(
        &self,
        operation: &'static str,
        key: &str,
        keyspace: Keyspace,
        cap: Option<usize>,
        fields: &[(&str, &str)],
    ) -> Result<String> {
        let ttl = self.redis.ttl().millis(keyspace);
        let clock = self.redis.server_clock();
        let mut server_now = clock.now_ms();
        // No reading yet (`TIME` failed at connect): a lone `TIME`, at most once a minute so
        // that an ACL refusing it costs nearly nothing (the append that sends it waits for its
        // answer, up to the response timeout on a stalled server). Inside the transaction a
        // refusal would abort the append itself.
        if server_now.is_none()
            && clock.probe_due()
            && let Ok(reply) = self.redis.query(operation, &redis::cmd("TIME")).await
            && let Some(ms) = time_reply_millis(&reply)
        {
            clock.observe(ms);
            server_now = clock.now_ms();
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        // The transaction's own `TIME` keeps the estimate fresh for the next append. The ids
        // `XADD *` returns are no reading of the clock: an id is at least the stream's last
        // id, which another writer may have set far ahead, and taking it for the time would
        // make later cutoffs trim every stream of this handle.
        if server_now.is_some() {
            pipe.cmd("TIME");
        }
        let xadd = pipe.cmd("XADD").arg(key).arg("*");
        for (name, value) in fields {
            xadd.arg(*name).arg(*value);
        }
        // The cutoff is on the server's clock, which assigns the ids it is compared with; the
        // client's clock running ahead would trim the entry being added. Without a server time
        // (`TIME` refused) there is no age trim.
        if let Some(server_now) = server_now {
            pipe.cmd("XTRIM")
                .arg(key)
                .arg("MINID")
                .arg("=")
                .arg(server_now.saturating_sub(ttl as i64).max(0))
                .ignore();
        }
        if let Some(cap) = cap {
            pipe.cmd("XTRIM")
                .arg(key)
                .arg("MAXLEN")
                .arg("=")
                .arg(cap)
                .ignore();
        }
        pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
        let reply = self.redis.query_pipe(operation, &pipe).await?;
        let mut replies = reply.unwrap_or_default().into_iter();
        if server_now.is_some()
            && let Some(ms) = replies.next().as_ref().and_then(time_reply_millis)
        {
            clock.observe(ms);
        }
        let id = replies
            .next()
            .ok_or_else(|| Error::decode(key, None, "empty transaction reply"))?;
        let id = codec::text(key, None, id)?;
        entry_millis(key, &id)?;
        Ok(id)
    }

    /// Entries of the stream at `key` in `from_ms..=to_ms`, oldest first, at most `limit`: the
    /// one `XRANGE .. COUNT` round trip behind every range query.
    async fn stream_range(
        &self,
        operation: &'static str,
        key: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let (from, to) = range_bounds(from_ms, to_ms)?;
        self.stream_range_by_id(operation, key, &from, &to, limit)
            .await
    }

    /// `XRANGE key <from> <to> COUNT <limit>` with the bounds as given (ids, `(` exclusive
    /// ids, `-`, `+`).
    async fn stream_range_by_id(
        &self,
        operation: &'static str,
        key: &str,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        check_limit(limit)?;
        let reply = self
            .redis
            .query(
                operation,
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(from)
                    .arg(to)
                    .arg("COUNT")
                    .arg(limit),
            )
            .await?;
        stream_entries(key, reply)
    }

    /// The user's security events recorded in `from_ms..=to_ms` (server clock), oldest first,
    /// at most `limit`. One round trip (`XRANGE .. COUNT`), read-only.
    #[tracing::instrument(name = "events.security_events", skip_all)]
    pub async fn security_events(
        &self,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<SecurityEventRecord>> {
        let key = self.security_key(user_id)?;
        let entries = self
            .stream_range("events.security_events", &key, from_ms, to_ms, limit)
            .await?;
        security_records(&key, entries)
    }

    /// The user's security events after the one with id `after` (from the oldest when `None`),
    /// oldest first, at most `limit`: pages through the whole stream, whatever its length, by
    /// passing the last id of a page as the next `after`. One round trip
    /// (`XRANGE <key> (<after> + COUNT <limit>`), read-only.
    #[tracing::instrument(name = "events.security_events_after", skip_all)]
    pub async fn security_events_after(
        &self,
        user_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecurityEventRecord>> {
        let key = self.security_key(user_id)?;
        let from = match after {
            None => "-".to_owned(),
            Some(id) => {
                codec::validate_stream_id("security event id", id)?;
                format!("({id}")
            }
        };
        let entries = self
            .stream_range_by_id("events.security_events_after", &key, &from, "+", limit)
            .await?;
        security_records(&key, entries)
    }

    /// Deletes the user's security-event stream (for erasure). One round trip (`DEL`).
    #[tracing::instrument(name = "events.delete_security_events", skip_all)]
    pub async fn delete_security_events(&self, user_id: &str) -> Result<bool> {
        let key = self.security_key(user_id)?;
        let n: i64 = self
            .redis
            .query_as(
                "events.delete_security_events",
                &key,
                redis::cmd("DEL").arg(&key),
            )
            .await?;
        Ok(n > 0)
    }

    fn audit_key(&self) -> String {
        self.redis
            .keys()
            .key_unchecked(Keyspace::Audit, &[AUDIT_STREAM])
    }

    /// Appends a record to the audit stream `audit:log`; returns its entry id. Records older
    /// than the keyspace TTL (30 days in production) are trimmed on every append; nothing else
    /// ever removes or changes one.
    ///
    /// One round trip, atomic: `MULTI TIME XADD XTRIM MINID PEXPIRE EXEC` (a lone `TIME` first,
    /// at most once a minute, while the handle has no reading of the server clock).
    #[tracing::instrument(name = "events.audit", skip_all)]
    pub async fn audit(&self, entry: &AuditEntry) -> Result<String> {
        check_text("audit actor", &entry.actor, 1, 256)?;
        check_text("audit action", &entry.action, 1, 256)?;
        check_text("audit target", &entry.target, 0, 1024)?;
        let details = encode_details("audit details", &entry.details)?;
        let key = self.audit_key();
        self.append(
            "events.audit",
            &key,
            Keyspace::Audit,
            None,
            &[
                ("actor", &entry.actor),
                ("action", &entry.action),
                ("target", &entry.target),
                ("details", &details),
            ],
        )
        .await
    }

    /// Audit records appended in `from_ms..=to_ms` (server clock), oldest first, at most
    /// `limit`. One round trip (`XRANGE .. COUNT`), read-only.
    #[tracing::instrument(name = "events.audit_range", skip_all)]
    pub async fn audit_range(
        &self,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>> {
        let key = self.audit_key();
        self.stream_range("events.audit_range", &key, from_ms, to_ms, limit)
            .await?
            .into_iter()
            .map(|(id, mut fields)| {
                Ok(AuditRecord {
                    at: entry_millis(&key, &id)?,
                    details: details_field(&key, &fields, "details")?,
                    actor: required(&key, &mut fields, "actor")?,
                    action: required(&key, &mut fields, "action")?,
                    target: fields.remove("target").unwrap_or_default(),
                    id,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn stream_replies_decode() {
        let reply = Value::Array(vec![Value::Array(vec![
            b("1700000000123-4"),
            Value::Array(vec![b("kind"), b("login"), b("details"), b("{\"a\":1}")]),
        ])]);
        let entries = stream_entries("k", reply).unwrap();
        assert_eq!(entries[0].0, "1700000000123-4");
        assert_eq!(entry_millis("k", &entries[0].0).unwrap(), 1_700_000_000_123);
        assert_eq!(entries[0].1["kind"], "login");
        assert!(stream_entries("k", Value::Int(1)).is_err());
    }

    #[test]
    fn inputs_are_checked() {
        assert!(range_bounds(5, 4).is_err());
        assert!(check_limit(0).is_err());
        assert!(check_text("x", "", 1, 10).is_err());
        assert!(check_text("x", "a\u{0}", 0, 10).is_err());
        let big = serde_json::Value::String("x".repeat(MAX_DETAILS_BYTES));
        assert!(encode_details("d", &big).is_err());
    }
}
