//! API response cache: [`CacheManager`], reached by [`Redis::cache`].
//!
//! One entry is one string key `cache:<endpoint>:<paramsHash>` holding the JSON
//! `{"data":..,"timestamp":<ms>,"statusCode":..,"headers":{..}}` ([`CacheEntry`]), written with its
//! TTL in the same `SET .. PX` command. `paramsHash` is the URL-safe unpadded base64 of the
//! SHA-256 of the canonical JSON of the request parameters ([`canonical_json`], [`params_hash`]),
//! so services in other languages that follow the contract compute the same key. The full
//! contract, with a test vector, is in `docs/keyspace.md`, which also lists how the TypeScript
//! reference `CacheManager` differs (another `paramsHash`, the bare body as the value) and what
//! it must change to share entries.
//!
//! A stored value that is not JSON of that shape is reported as [`Error::Decode`] naming the key;
//! it is never silently dropped or overwritten (another service may share the entry).
//! [`CacheManager::delete`] removes it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{self, now_millis};
use crate::error::{Error, Result};
use crate::keyspace::{Keyspace, cluster_slot, validate_key_part};
use crate::pool::Redis;

/// Default time a `get_or_set` lock is held before Redis expires it (a crashed loader's lock).
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
/// Default time `get_or_set` waits for another process's loader before giving up.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys requested per `SCAN` page by [`CacheManager::invalidate_endpoint`].
const SCAN_COUNT: usize = 500;
/// Longest pause between two polls of a waiting `get_or_set`.
const MAX_POLL: Duration = Duration::from_millis(50);

/// One cached response, stored as the JSON object
/// `{"data":..,"timestamp":<ms>,"statusCode":..,"headers":{..}}`.
///
/// All four members are required when reading; members the crate does not know are ignored.
///
/// ```
/// use aether_redis::cache::CacheEntry;
/// let entry = CacheEntry::new(vec![1, 2, 3]).with_status(201).with_header("etag", "\"v1\"");
/// let json = serde_json::to_string(&entry).unwrap();
/// assert!(json.starts_with(r#"{"data":[1,2,3],"timestamp":"#));
/// assert!(json.ends_with(r#""statusCode":201,"headers":{"etag":"\"v1\""}}"#));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry<T> {
    /// The response body.
    pub data: T,
    /// When the response was produced, in milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The HTTP status code of the response.
    pub status_code: u16,
    /// Response headers to replay.
    pub headers: BTreeMap<String, String>,
}

impl<T> CacheEntry<T> {
    /// An entry for `data`: status 200, no headers, timestamp now.
    pub fn new(data: T) -> Self {
        CacheEntry {
            data,
            timestamp: now_millis(),
            status_code: 200,
            headers: BTreeMap::new(),
        }
    }

    /// Replaces the status code.
    pub fn with_status(mut self, status_code: u16) -> Self {
        self.status_code = status_code;
        self
    }

    /// Adds (or replaces) one header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// How old the entry is by this process's clock (zero if it is from the future).
    pub fn age(&self) -> Duration {
        // `saturating_sub`: the timestamp is stored data and may be any i64.
        Duration::from_millis(
            u64::try_from(now_millis().saturating_sub(self.timestamp)).unwrap_or(0),
        )
    }
}

/// Counters of one [`CacheManager`] and its clones, since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups that found an entry (each entry of a `get_many` counts; a `get_or_set` counts one
    /// hit or one miss, by what its first `GET` found).
    pub hits: u64,
    /// Lookups that found nothing (including `get_or_set` calls that then waited or loaded).
    pub misses: u64,
    /// Loader calls made by `get_or_set`.
    pub loads: u64,
    /// Operations that returned an error (Redis, decode, invalid input, loader).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    loads: AtomicU64,
    errors: AtomicU64,
}

/// The API response cache: typed entries under `cache:<endpoint>:<paramsHash>`.
///
/// Endpoints are used verbatim as one key part: `/api/users` gives
/// `cache:/api/users:<paramsHash>`. They may contain `/`, but not `:`, `{`, `}`, glob characters
/// (`* ? [ ] \`), whitespace or control characters, and are 1–512 bytes; anything else is
/// [`Error::InvalidInput`]. Put query strings in the params, not in the endpoint.
///
/// Counters ([`CacheManager::stats`]) are kept in this process, shared by clones of one manager;
/// keep one manager (e.g. in application state) to count everything.
///
/// ```no_run
/// # async fn demo(redis: aether_redis::Redis) -> aether_redis::Result<()> {
/// use aether_redis::cache::CacheEntry;
/// use serde_json::json;
/// let cache = redis.cache();
/// let params = json!({"page": 2, "role": "admin"});
/// cache.set("/api/users", &params, &CacheEntry::new(json!(["ada", "alan"]))).await?;
/// let hit = cache.get::<serde_json::Value, _>("/api/users", &params).await?;
/// assert_eq!(hit.map(|e| e.status_code), Some(200));
/// let fresh = cache
///     .get_or_set("/api/users", &params, || async {
///         Ok::<_, aether_redis::Error>(CacheEntry::new(json!(["ada"])))
///     })
///     .await?;
/// # let _ = fresh; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CacheManager {
    redis: Redis,
    counters: Arc<Counters>,
    lock_ttl: Duration,
    wait_timeout: Duration,
}

impl Redis {
    /// The cache repository (see [`CacheManager`]).
    pub fn cache(&self) -> CacheManager {
        CacheManager {
            redis: self.clone(),
            counters: Arc::new(Counters::default()),
            lock_ttl: DEFAULT_LOCK_TTL,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }
}

/// The canonical JSON of `params`: object members sorted by key (Unicode code point order, which
/// is UTF-8 byte order) at every depth, no whitespace, strings and numbers as `serde_json` prints
/// them (UTF-8, non-ASCII unescaped; integers in decimal). `NaN` and infinities become `null`.
///
/// ```
/// use serde_json::json;
/// let canonical = aether_redis::cache::canonical_json(&json!({"b": [2, {"d": 1, "c": "é"}], "a": null}));
/// assert_eq!(canonical.unwrap(), r#"{"a":null,"b":[2,{"c":"é","d":1}]}"#);
/// ```
pub fn canonical_json<P: Serialize + ?Sized>(params: &P) -> Result<String> {
    let bytes = canonical_bytes(params)?;
    String::from_utf8(bytes).map_err(|e| Error::invalid("cache params", e.to_string()))
}

fn canonical_bytes<P: Serialize + ?Sized>(params: &P) -> Result<Vec<u8>> {
    let value = serde_json::to_value(params)
        .map_err(|e| Error::invalid("cache params", format!("cannot encode as JSON: {e}")))?;
    let mut out = Vec::with_capacity(64);
    write_canonical(&value, &mut out)
        .map_err(|e| Error::invalid("cache params", format!("cannot encode as JSON: {e}")))?;
    Ok(out)
}

fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            out.push(b'{');
            // Maps keep insertion order; structs usually arrive sorted already, so sorting (and
            // its allocation) is only paid when needed.
            if map.keys().is_sorted() {
                write_members(map.iter(), out)?;
            } else {
                let mut members: Vec<_> = map.iter().collect();
                members.sort_unstable_by(|a, b| a.0.cmp(b.0));
                write_members(members.into_iter(), out)?;
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        serde_json::Value::String(text) => write_string(text, out)?,
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

fn write_members<'a>(
    members: impl Iterator<Item = (&'a String, &'a serde_json::Value)>,
    out: &mut Vec<u8>,
) -> serde_json::Result<()> {
    for (i, (name, member)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(name, out)?;
        out.push(b':');
        write_canonical(member, out)?;
    }
    Ok(())
}

fn write_string(text: &str, out: &mut Vec<u8>) -> serde_json::Result<()> {
    if text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return serde_json::to_writer(&mut *out, text);
    }
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
    Ok(())
}

/// `paramsHash`: URL-safe base64 without padding of the SHA-256 of [`canonical_json`] (43
/// characters).
///
/// ```
/// use serde_json::json;
/// use aether_redis::cache::params_hash;
/// // Member order never changes the hash.
/// assert_eq!(
///     params_hash(&json!({"a": 1, "b": 2})).unwrap(),
///     params_hash(&json!({"b": 2, "a": 1})).unwrap(),
/// );
/// ```
pub fn params_hash<P: Serialize + ?Sized>(params: &P) -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical_bytes(params)?)))
}

/// `ttl` in ms for `PX`, named `what` in errors: at least 1 ms and at most
/// [`MAX_TTL`](crate::config::MAX_TTL), past which Redis would refuse the expiry.
fn ttl_millis(what: &'static str, ttl: Duration) -> Result<u64> {
    if ttl > crate::config::MAX_TTL {
        return Err(Error::invalid(
            what,
            format!("must be at most 10 years, got {ttl:?}"),
        ));
    }
    match u64::try_from(ttl.as_millis()) {
        Ok(0) => Err(Error::invalid(what, "must be at least 1 ms")),
        Ok(ms) => Ok(ms),
        Err(_) => Err(Error::invalid(what, "is too large")),
    }
}

fn decode_entry<T: DeserializeOwned>(key: &str, reply: Value) -> Result<Option<CacheEntry<T>>> {
    match reply {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => codec::from_json(key, &bytes).map(Some),
        other => codec::text(key, None, other).and_then(|t| codec::from_json(key, t.as_bytes())),
    }
}

/// What `get_or_set` found before calling the loader.
enum Lookup<T> {
    Found(CacheEntry<T>),
    /// This caller holds the load lock.
    Load {
        key: String,
        lock: String,
        token: String,
        ttl: u64,
    },
}

fn is_ok_reply(value: &Value) -> bool {
    match value {
        Value::Okay => true,
        Value::SimpleString(s) => s == "OK",
        _ => false,
    }
}

impl CacheManager {
    /// A manager whose `get_or_set` lock expires after `lock_ttl` (default 10 s). A loader that
    /// runs longer than this may see a second loader start elsewhere, and its entry is returned
    /// to its caller but not stored (the lock may be the second loader's by then, whose entry
    /// is the newer): set it above the slowest load. More than ten years
    /// makes `get_or_set` fail with [`Error::InvalidInput`] before it writes anything.
    pub fn with_lock_ttl(mut self, lock_ttl: Duration) -> Self {
        self.lock_ttl = lock_ttl;
        self
    }

    /// A manager whose `get_or_set` waits at most `wait_timeout` (default 5 s) for another
    /// process's loader before failing with [`Error::Timeout`]; `Duration::MAX` waits without
    /// a deadline.
    pub fn with_wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.wait_timeout = wait_timeout;
        self
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// The TTL of entries written without an explicit one: the `cache` row of the TTL table for
    /// the configured environment, or `REDIS_CACHE_TTL`.
    pub fn default_ttl(&self) -> Duration {
        self.redis.ttl().get(Keyspace::Cache)
    }

    /// The key of `endpoint` + `params`: `<prefix>cache:<endpoint>:<paramsHash>`. No round trip.
    pub fn key<P: Serialize + ?Sized>(&self, endpoint: &str, params: &P) -> Result<String> {
        validate_key_part("cache endpoint", endpoint)?;
        let hash = params_hash(params)?;
        Ok(self
            .redis
            .keys()
            .key_unchecked(Keyspace::Cache, &[endpoint, &hash]))
    }

    fn count<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn count_lookup<T>(&self, entry: &Option<T>) {
        let counter = if entry.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The entry for `endpoint` + `params`, if any. One round trip (`GET`), read-only; retried
    /// on a connection error up to [`Config::max_retries`](crate::Config::max_retries) times.
    ///
    /// A stored value that is not a [`CacheEntry`] of `T` is [`Error::Decode`] naming the key.
    pub async fn get<T, P>(&self, endpoint: &str, params: &P) -> Result<Option<CacheEntry<T>>>
    where
        T: DeserializeOwned,
        P: Serialize + ?Sized,
    {
        let result = async {
            let key = self.key(endpoint, params)?;
            self.fetch(&key).await
        }
        .await;
        self.count(result)
    }

    async fn fetch<T: DeserializeOwned>(&self, key: &str) -> Result<Option<CacheEntry<T>>> {
        let mut get = redis::cmd("GET");
        get.arg(key);
        let reply = self
            .redis
            .retry_idempotent(|| self.redis.query("cache.get", &get))
            .await?;
        let entry = decode_entry(key, reply)?;
        self.count_lookup(&entry);
        Ok(entry)
    }

    /// Stores `entry` with the default TTL ([`CacheManager::default_ttl`]). One round trip
    /// (`SET key json PX ttl`: value and TTL are written atomically).
    pub async fn set<T, P>(&self, endpoint: &str, params: &P, entry: &CacheEntry<T>) -> Result<()>
    where
        T: Serialize,
        P: Serialize + ?Sized,
    {
        self.set_with_ttl(endpoint, params, entry, self.default_ttl())
            .await
    }

    /// Stores `entry` for `ttl` (at least 1 ms). One round trip (`SET key json PX ttl`).
    pub async fn set_with_ttl<T, P>(
        &self,
        endpoint: &str,
        params: &P,
        entry: &CacheEntry<T>,
        ttl: Duration,
    ) -> Result<()>
    where
        T: Serialize,
        P: Serialize + ?Sized,
    {
        let result = async {
            let key = self.key(endpoint, params)?;
            let ttl = ttl_millis("cache TTL", ttl)?;
            self.store(&key, entry, ttl).await
        }
        .await;
        self.count(result)
    }

    async fn store<T: Serialize>(&self, key: &str, entry: &CacheEntry<T>, ttl: u64) -> Result<()> {
        let json = codec::to_json("cache entry", entry)?;
        self.redis
            .query(
                "cache.set",
                redis::cmd("SET").arg(key).arg(json).arg("PX").arg(ttl),
            )
            .await?;
        Ok(())
    }

    /// Deletes the entry; true if there was one. One round trip (`DEL` of the entry and of its
    /// load lock, same slot): a [`get_or_set`](Self::get_or_set) load in flight then does not
    /// store what it loaded from before the delete.
    pub async fn delete<P: Serialize + ?Sized>(&self, endpoint: &str, params: &P) -> Result<bool> {
        let result = async {
            let key = self.key(endpoint, params)?;
            let lock = self.redis.keys().derived(&key, "lock");
            // The lock first: a load settling between the two finds its lock gone and stores
            // nothing, while one settling before them has its entry deleted.
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(&lock).ignore().cmd("DEL").arg(&key);
            let reply = self
                .redis
                .query_pipe("cache.delete", &pipe)
                .await?
                .unwrap_or_default();
            Ok(codec::int(&key, reply.into_iter().next().unwrap_or(Value::Nil))? > 0)
        }
        .await;
        self.count(result)
    }

    /// The entries for many `(endpoint, params)` requests, in request order. One `MGET`: one
    /// round trip on a single server; in Cluster the client splits it by slot and sends the parts
    /// to their nodes concurrently. Reads of different keys are not one atomic snapshot in
    /// Cluster. Read-only; retried on a connection error up to
    /// [`Config::max_retries`](crate::Config::max_retries) times. A corrupt entry fails the whole
    /// call with [`Error::Decode`] naming its key. A key that holds another type (not written
    /// by a cache) reads as a miss, because `MGET` answers nil for it, where
    /// [`CacheManager::get`] fails with `WRONGTYPE`; telling the two apart would cost a `TYPE`
    /// per miss.
    pub async fn get_many<T, P>(&self, requests: &[(&str, P)]) -> Result<Vec<Option<CacheEntry<T>>>>
    where
        T: DeserializeOwned,
        P: Serialize,
    {
        let result = async {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            let keys = requests
                .iter()
                .map(|(endpoint, params)| self.key(endpoint, params))
                .collect::<Result<Vec<_>>>()?;
            let mut mget = redis::cmd("MGET");
            mget.arg(&keys);
            let reply = self
                .redis
                .retry_idempotent(|| self.redis.query("cache.get_many", &mget))
                .await?;
            let values = match reply {
                Value::Array(values) if values.len() == keys.len() => values,
                other => {
                    return Err(Error::decode(
                        &keys[0],
                        None,
                        format!("MGET of {} keys answered {other:?}", keys.len()),
                    ));
                }
            };
            let entries = keys
                .iter()
                .zip(values)
                .map(|(key, value)| decode_entry(key, value))
                .collect::<Result<Vec<_>>>()?;
            for entry in &entries {
                self.count_lookup(entry);
            }
            Ok(entries)
        }
        .await;
        self.count(result)
    }

    /// Stores many `(endpoint, params, entry)` items with the default TTL. See
    /// [`CacheManager::set_many_with_ttl`].
    pub async fn set_many<T, P>(&self, items: &[(&str, P, CacheEntry<T>)]) -> Result<()>
    where
        T: Serialize,
        P: Serialize,
    {
        self.set_many_with_ttl(items, self.default_ttl()).await
    }

    /// Stores many `(endpoint, params, entry)` items, each with `ttl`, every `SET .. PX` in
    /// `MULTI`/`EXEC`.
    ///
    /// Standalone and Sentinel: one round trip, all-or-nothing (no reader sees part of the batch).
    /// Cluster: keys span slots, so one `MULTI`/`EXEC` per slot, all sent concurrently (one round
    /// trip of latency); each slot's writes are atomic, the batch as a whole is not, and on an
    /// error some slots may have been written.
    pub async fn set_many_with_ttl<T, P>(
        &self,
        items: &[(&str, P, CacheEntry<T>)],
        ttl: Duration,
    ) -> Result<()>
    where
        T: Serialize,
        P: Serialize,
    {
        let result = async {
            let ttl = ttl_millis("cache TTL", ttl)?;
            let mut writes = Vec::with_capacity(items.len());
            for (endpoint, params, entry) in items {
                let key = self.key(endpoint, params)?;
                let json = codec::to_json("cache entry", entry)?;
                writes.push((key, json));
            }
            if writes.is_empty() {
                return Ok(());
            }
            if !self.redis.keys().is_cluster() {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for (key, json) in &writes {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(json)
                        .arg("PX")
                        .arg(ttl)
                        .ignore();
                }
                self.redis.query_pipe("cache.set_many", &pipe).await?;
                return Ok(());
            }
            let mut by_slot: BTreeMap<u16, redis::Pipeline> = BTreeMap::new();
            for (key, json) in &writes {
                by_slot
                    .entry(cluster_slot(key))
                    .or_insert_with(|| {
                        let mut pipe = redis::pipe();
                        pipe.atomic();
                        pipe
                    })
                    .cmd("SET")
                    .arg(key)
                    .arg(json)
                    .arg("PX")
                    .arg(ttl)
                    .ignore();
            }
            let mut tasks = tokio::task::JoinSet::new();
            for pipe in by_slot.into_values() {
                let redis = self.redis.clone();
                tasks.spawn(async move { redis.query_pipe("cache.set_many", &pipe).await });
            }
            let mut first_error = None;
            while let Some(joined) = tasks.join_next().await {
                let outcome = joined.map_err(|e| Error::Unavailable {
                    message: format!("cache.set_many: a slot's write did not complete: {e}"),
                    source: None,
                });
                if let Err(e) = outcome.and_then(|r| r) {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        }
        .await;
        self.count(result)
    }

    /// The entry for `endpoint` + `params`, loading and storing it (default TTL) on a miss, with
    /// one loader across all processes. See [`CacheManager::get_or_set_with_ttl`].
    pub async fn get_or_set<T, P, F, Fut, E>(
        &self,
        endpoint: &str,
        params: &P,
        loader: F,
    ) -> std::result::Result<CacheEntry<T>, E>
    where
        T: Serialize + DeserializeOwned,
        P: Serialize + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<CacheEntry<T>, E>>,
        E: From<Error>,
    {
        self.get_or_set_with_ttl(endpoint, params, self.default_ttl(), loader)
            .await
    }

    /// The entry for `endpoint` + `params`; on a miss exactly one caller across all processes
    /// runs `loader` and stores its entry for `ttl`, while the others wait for that entry.
    ///
    /// - Hit: one round trip (`GET`, retried on a connection error like [`CacheManager::get`]).
    /// - Miss: one round trip per attempt sends `SET {key}:lock <token> NX PX <lock ttl>` and
    ///   `GET key` together (same slot, in this order), so a caller that wins the lock after the
    ///   previous loader released it also sees that loader's entry and does not load again (it
    ///   then releases the lock as a loader does, token checked).
    ///   The winner runs `loader`, then writes the entry and releases the lock in one
    ///   transaction only while the lock still holds its token (`WATCH`+`GET`, then
    ///   `MULTI SET DEL EXEC`, no script needed) on a dedicated connection: two round trips plus
    ///   the pool checkout, which costs one more round trip (the pool's `UNWATCH` + `PING`
    ///   recycle check of an idle connection) or, when no connection is idle, a new
    ///   connection's connect and handshake. So a load costs `GET`, lock pipeline, checkout,
    ///   `WATCH`+`GET`, `MULTI`/`EXEC`: four round trips plus the checkout. A
    ///   [`delete`](Self::delete) or [`invalidate_endpoint`](Self::invalidate_endpoint) since
    ///   the load began removes the lock, and a lock that expired during the load may be a newer
    ///   loader's: then the loaded entry is returned but not stored. The others poll (5 ms doubling to 50 ms) for at most the wait timeout
    ///   ([`CacheManager::with_wait_timeout`]), then fail with [`Error::Timeout`] rather than
    ///   start a second loader.
    /// - Loader error: the lock is released and the loader's error is returned unchanged; a
    ///   waiting caller may then take the lock and run its own loader.
    /// - The loaded entry is returned even if storing it fails (the failure is counted in
    ///   [`CacheStats::errors`] and logged).
    /// - If this future is dropped while the loader runs, the lock expires after the lock TTL.
    pub async fn get_or_set_with_ttl<T, P, F, Fut, E>(
        &self,
        endpoint: &str,
        params: &P,
        ttl: Duration,
        loader: F,
    ) -> std::result::Result<CacheEntry<T>, E>
    where
        T: Serialize + DeserializeOwned,
        P: Serialize + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<CacheEntry<T>, E>>,
        E: From<Error>,
    {
        let prepared = async {
            let key = self.key(endpoint, params)?;
            let ttl = ttl_millis("cache TTL", ttl)?;
            let lock_ttl = ttl_millis("cache lock TTL", self.lock_ttl)?;
            if let Some(entry) = self.fetch(&key).await? {
                return Ok(Lookup::Found(entry));
            }
            let lock = self.redis.keys().derived(&key, "lock");
            let token = crate::random::secret_token(16)?;
            Ok(
                match self.acquire_or_wait(&key, &lock, &token, lock_ttl).await? {
                    Some(entry) => Lookup::Found(entry),
                    None => Lookup::Load {
                        key,
                        lock,
                        token,
                        ttl,
                    },
                },
            )
        }
        .await;
        let (key, lock, token, ttl) = match self.count(prepared)? {
            Lookup::Found(entry) => return Ok(entry),
            Lookup::Load {
                key,
                lock,
                token,
                ttl,
            } => (key, lock, token, ttl),
        };

        self.counters.loads.fetch_add(1, Ordering::Relaxed);
        let loaded = loader().await;
        match loaded {
            Ok(entry) => {
                match self
                    .store_under_lock(&key, &lock, &token, &entry, ttl)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => tracing::info!(key = %key,
                        "cache: the load lock was deleted or expired while loading; the loaded \
                         entry is returned but not stored"),
                    Err(e) => {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key = %key, error = %e, "cache: storing a loaded entry failed");
                    }
                }
                Ok(entry)
            }
            Err(e) => {
                let released = self.release_lock(&lock, &token).await;
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                if let Err(release_error) = released {
                    tracing::warn!(key = %key, error = %release_error, "cache: releasing the load lock failed; it expires by itself");
                }
                Err(e)
            }
        }
    }

    /// Takes the load lock (`Ok(None)`: the caller loads) or returns the entry another loader
    /// stored meanwhile. Bounded by the wait timeout.
    async fn acquire_or_wait<T: DeserializeOwned>(
        &self,
        key: &str,
        lock: &str,
        token: &str,
        lock_ttl: u64,
    ) -> Result<Option<CacheEntry<T>>> {
        // A wait too long for an `Instant` (`Duration::MAX`: "wait as long as it takes") has
        // no deadline.
        let deadline = Instant::now().checked_add(self.wait_timeout);
        let mut pause = Duration::from_millis(5);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(lock)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(lock_ttl)
            .cmd("GET")
            .arg(key);
        loop {
            let replies = self
                .redis
                .query_pipe("cache.get_or_set", &pipe)
                .await?
                .unwrap_or_default();
            let mut replies = replies.into_iter();
            let (Some(locked), Some(value)) = (replies.next(), replies.next()) else {
                return Err(Error::decode(
                    lock,
                    None,
                    "lock pipeline answered too little",
                ));
            };
            let acquired = is_ok_reply(&locked);
            let entry = decode_entry::<T>(key, value);
            if acquired && !matches!(entry, Ok(None)) {
                // Taken a moment ago, but with a lock TTL shorter than a round trip it may
                // already be another loader's: released only if it still holds our token.
                if let Err(e) = self.release_lock(lock, token).await {
                    tracing::warn!(key = %key, error = %e,
                        "cache: releasing an unneeded load lock failed; it expires by itself");
                }
            }
            match entry? {
                Some(entry) => return Ok(Some(entry)),
                None if acquired => return Ok(None),
                None => {}
            }
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => pause,
            };
            if left.is_zero() {
                return Err(Error::Timeout {
                    operation: "cache.get_or_set waiting for another loader",
                    after: self.wait_timeout,
                });
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Stores a loaded entry and releases the lock in one transaction, only while the lock
    /// still holds `token`: a `delete` or `invalidate_endpoint` since the load began deleted the
    /// lock, and a lock that expired may be another loader's, whose fresher entry must stand.
    /// `Ok(false)`: not stored. See [`Self::settle_lock`].
    async fn store_under_lock<T: Serialize>(
        &self,
        key: &str,
        lock: &str,
        token: &str,
        entry: &CacheEntry<T>,
        ttl: u64,
    ) -> Result<bool> {
        let json = match codec::to_json("cache entry", entry) {
            Ok(json) => json,
            Err(e) => {
                // Not storable: the lock goes at once rather than hold every waiter until it
                // expires.
                self.release_lock(lock, token).await?;
                return Err(e);
            }
        };
        self.settle_lock(lock, token, Some((key, &json, ttl))).await
    }

    /// Releases the lock if it still holds `token` (a failed load). See [`Self::settle_lock`].
    async fn release_lock(&self, lock: &str, token: &str) -> Result<()> {
        self.settle_lock(lock, token, None).await.map(drop)
    }

    /// `WATCH lock; GET lock`, then, if the lock holds `token`, `MULTI; [SET key json PX ttl;]
    /// DEL lock; EXEC`, else `MULTI; EXISTS lock; EXEC` (which only ends the `WATCH`), on a
    /// dedicated connection. A keyed command inside `MULTI` keeps `EXEC` on the lock's node in
    /// Cluster; an aborted `EXEC` means the lock changed hands. Returns whether the
    /// transaction applied with the lock still ours.
    async fn settle_lock(
        &self,
        lock: &str,
        token: &str,
        store: Option<(&str, &str, u64)>,
    ) -> Result<bool> {
        let mut conn = self.redis.dedicated().await?;
        let limit = self.redis.config().response_timeout;
        let outcome = tokio::time::timeout(limit, async {
            let mut watch = redis::pipe();
            watch.cmd("WATCH").arg(lock).ignore().cmd("GET").arg(lock);
            let (current,): (Option<Vec<u8>>,) = watch.query_async(&mut conn).await?;
            let ours = current.as_deref() == Some(token.as_bytes());
            let mut exec = redis::pipe();
            exec.atomic();
            if ours {
                if let Some((key, json, ttl)) = store {
                    exec.cmd("SET")
                        .arg(key)
                        .arg(json)
                        .arg("PX")
                        .arg(ttl)
                        .ignore();
                }
                exec.cmd("DEL").arg(lock).ignore();
            } else {
                exec.cmd("EXISTS").arg(lock).ignore();
            }
            let applied: Option<Value> = exec.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(ours && applied.is_some())
        })
        .await;
        match outcome {
            Ok(Ok(settled)) => Ok(settled),
            Ok(Err(e)) => {
                conn.discard();
                Err(self.redis.fail("cache.release_lock", e))
            }
            Err(_) => {
                conn.discard();
                Err(Error::Timeout {
                    operation: "cache.release_lock",
                    after: limit,
                })
            }
        }
    }

    /// Deletes every entry of `endpoint` (any params) and returns how many were deleted.
    ///
    /// Walks the keyspace with `SCAN MATCH <prefix>cache:<endpoint>:* COUNT 500` (never `KEYS`)
    /// and `UNLINK`s each page: about one round trip per page plus one per page with matches;
    /// before that, the same for the entries' load locks (`{<prefix>cache:<endpoint>:*}:lock`),
    /// so that a [`get_or_set`](Self::get_or_set) load in flight does not store its entry
    /// afterwards.
    /// In Cluster the scan runs on every master (the first page is sent to all masters at once,
    /// then each master's cursor is followed on that master) and each key gets an `UNLINK` of
    /// its own (concurrent), so that a node down is an error.
    /// Not atomic: entries written while the scan runs may survive, and a slot migrating during
    /// the scan may be missed. Keys of other endpoints, including `/api/users/1` next to
    /// `/api/users`, are never matched.
    pub async fn invalidate_endpoint(&self, endpoint: &str) -> Result<u64> {
        let result = async {
            validate_key_part("cache endpoint", endpoint)?;
            let pattern = self
                .redis
                .keys()
                .scan_pattern(Keyspace::Cache, &[endpoint])?;
            // The load locks of the endpoint's entries go too (`{<entry key>}:lock`): a load in
            // flight, whose entry may not exist yet, then does not store what it loaded from
            // before the invalidation. Locks go first: a load that settles before its lock is
            // removed has stored its entry by then, which the entries' pass then deletes.
            let lock_pattern = format!("{{{pattern}}}:lock");
            #[cfg(feature = "cluster")]
            if self.redis.keys().is_cluster()
                && let crate::pool::Connection::Cluster(mut cluster) =
                    self.redis.connection().await?
            {
                self.invalidate_cluster(&mut cluster, &lock_pattern).await?;
                return self.invalidate_cluster(&mut cluster, &pattern).await;
            }
            let mut deleted = 0;
            for (pattern, counted) in [(&lock_pattern, false), (&pattern, true)] {
                let mut cursor = 0u64;
                loop {
                    let reply = self
                        .redis
                        .query("cache.invalidate_endpoint", &scan_cmd(cursor, pattern))
                        .await?;
                    let (next, keys) = parse_scan(pattern, reply)?;
                    let removed = self.unlink(&keys).await?;
                    if counted {
                        deleted += removed;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Ok(deleted)
        }
        .await;
        self.count(result)
    }

    #[cfg(feature = "cluster")]
    async fn invalidate_cluster(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
        pattern: &str,
    ) -> Result<u64> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
        const OP: &str = "cache.invalidate_endpoint";
        // No response policy: the reply is a map from each master's address to its page.
        let first = conn
            .route_command(
                scan_cmd(0, pattern),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await
            .map_err(|e| self.redis.fail(OP, e))?;
        let Value::Map(pages) = first else {
            return Err(Error::decode(
                pattern,
                None,
                format!("SCAN on all masters answered {first:?}"),
            ));
        };
        let mut deleted = 0;
        for (address, page) in pages {
            let address = codec::text(pattern, None, address)?;
            let (host, port) = address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| {
                    Error::decode(pattern, None, format!("bad node address {address:?}"))
                })?;
            let mut page = page.extract_error().map_err(|e| self.redis.fail(OP, e))?;
            loop {
                let (next, keys) = parse_scan(pattern, page)?;
                deleted += self.unlink(&keys).await?;
                if next == 0 {
                    break;
                }
                page = conn
                    .route_command(
                        scan_cmd(next, pattern),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        }),
                    )
                    .await
                    .map_err(|e| self.redis.fail(OP, e))?;
            }
        }
        Ok(deleted)
    }

    async fn unlink(&self, keys: &[String]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        // An `UNLINK` per key: the client's split of a multi-key command over Cluster nodes can
        // answer as if done with a node down, and an invalidation must fail instead.
        self.redis
            .delete_each("cache.invalidate_endpoint", "UNLINK", keys)
            .await
    }
}

fn scan_cmd(cursor: u64, pattern: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT);
    cmd
}

/// A `SCAN` reply: `[cursor, [key, ...]]`.
fn parse_scan(pattern: &str, reply: Value) -> Result<(u64, Vec<String>)> {
    let bad = |what: String| Error::decode(pattern, None, what);
    let Value::Array(parts) = reply else {
        return Err(bad(format!("SCAN answered {reply:?}")));
    };
    let mut parts = parts.into_iter();
    let (Some(cursor), Some(Value::Array(keys)), None) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("SCAN answered an unexpected shape".into()));
    };
    let cursor = codec::text(pattern, None, cursor)?
        .parse::<u64>()
        .map_err(|e| bad(format!("SCAN cursor: {e}")))?;
    let keys = keys
        .into_iter()
        .map(|k| codec::text(pattern, None, k))
        .collect::<Result<Vec<_>>>()?;
    Ok((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_members_at_every_depth() {
        let a = json!({"z": {"b": 1, "a": [{"y": 2, "x": 1}]}, "a": "é/\"\n"});
        assert_eq!(
            canonical_json(&a).unwrap(),
            r#"{"a":"é/\"\n","z":{"a":[{"x":1,"y":2}],"b":1}}"#
        );
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":"é/\"\n","z":{"b":1,"a":[{"x":1,"y":2}]}}"#).unwrap();
        assert_eq!(params_hash(&a).unwrap(), params_hash(&b).unwrap());
        assert_eq!(params_hash(&a).unwrap().len(), 43);
    }

    #[test]
    fn canonical_scalars_are_pinned() {
        // Documented in docs/keyspace.md: the forms other languages must reproduce.
        let v = json!({"s": "\u{1}\u{8}\u{c}\n\r\t\"\\/é😀", "f": [1.5, 1.0, 1e21, -0.0], "i": [0, -7, u64::MAX], "n": null, "b": [true, false]});
        assert_eq!(
            canonical_json(&v).unwrap(),
            "{\"b\":[true,false],\"f\":[1.5,1.0,1e+21,-0.0],\"i\":[0,-7,18446744073709551615],\"n\":null,\"s\":\"\\u0001\\b\\f\\n\\r\\t\\\"\\\\/é😀\"}"
        );
        assert_eq!(canonical_json(&f64::NAN).unwrap(), "null");
    }

    #[test]
    fn ttl_must_be_a_positive_number_of_millis() {
        assert!(ttl_millis("cache TTL", Duration::ZERO).is_err());
        assert!(ttl_millis("cache TTL", Duration::from_micros(999)).is_err());
        assert_eq!(
            ttl_millis("cache TTL", Duration::from_secs(2)).unwrap(),
            2000
        );
        let max = crate::config::MAX_TTL;
        assert!(ttl_millis("cache TTL", max).is_ok());
        for ttl in [max + Duration::from_millis(1), Duration::MAX] {
            let err = ttl_millis("cache lock TTL", ttl).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput { what, .. } if *what == "cache lock TTL"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn scan_replies_parse() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![b("17"), Value::Array(vec![b("cache:x:1")])]);
        assert_eq!(
            parse_scan("p", reply).unwrap(),
            (17, vec!["cache:x:1".to_owned()])
        );
        assert!(parse_scan("p", Value::Int(1)).is_err());
    }
}
