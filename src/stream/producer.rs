//! The typed producer.

use std::marker::PhantomData;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use serde::Serialize;

use super::{
    DEFAULT_IDEMPOTENCY_TTL, DEFAULT_MAX_LEN, FIELD_IDEMPOTENCY_KEY, FIELD_PAYLOAD, StreamKeys,
    millis,
};
use crate::codec::{int, text, to_json};
use crate::error::{Error, Result};
use crate::keyspace::validate_key_part;
use crate::pool::Redis;
use crate::script::{LuaScript, ScriptCall};

// SET NX of the idempotency key and XADD in one step: a retried publish finds the key and gets
// the first attempt's id back instead of adding a second entry.
static PUBLISH_ONCE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "stream_publish_once",
        r#"
-- KEYS[1] stream, KEYS[2] idempotency key; ARGV[1] ttl ms, ARGV[2] max len (0 = none),
-- ARGV[3..] fields
local existing = redis.call('GET', KEYS[2])
if existing then return {0, existing} end
local id
if ARGV[2] == '0' then
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return {1, id}
"#,
    )
});

/// The outcome of [`StreamProducer::publish_idempotent`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// The message's id in the stream.
    pub id: String,
    /// `true` when the key had been used before: nothing was added and `id` is the id of the
    /// first publish.
    pub duplicate: bool,
}

/// Publishes `T` as JSON on one stream. Obtained from [`super::Streams::producer`]; cheap to
/// clone.
///
/// An entry has the fields `payload` (JSON) and, when published with an idempotency key,
/// `idem` (the key).
#[derive(Debug)]
pub struct StreamProducer<T> {
    redis: Redis,
    keys: StreamKeys,
    max_len: u64,
    idempotency_ttl: Duration,
    _payload: PhantomData<fn(&T)>,
}

impl<T> Clone for StreamProducer<T> {
    fn clone(&self) -> Self {
        StreamProducer {
            redis: self.redis.clone(),
            keys: self.keys.clone(),
            max_len: self.max_len,
            idempotency_ttl: self.idempotency_ttl,
            _payload: PhantomData,
        }
    }
}

impl<T: Serialize> StreamProducer<T> {
    pub(crate) fn new(redis: Redis, keys: StreamKeys) -> Self {
        StreamProducer {
            redis,
            keys,
            max_len: DEFAULT_MAX_LEN,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            _payload: PhantomData,
        }
    }

    /// Caps the stream at about `max_len` entries (`MAXLEN ~`); `None` leaves it unbounded.
    pub fn with_max_len(mut self, max_len: Option<u64>) -> Self {
        self.max_len = max_len.unwrap_or(0);
        self
    }

    /// How long an idempotency key is remembered (default 24 h): a retry after that adds a
    /// second entry. At most a year: a longer one makes
    /// [`publish_idempotent`](Self::publish_idempotent) fail with [`Error::InvalidInput`]
    /// before anything is sent (Redis would refuse its `PX` after the `XADD`, and every retry
    /// would add another copy).
    pub fn with_idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// The stream's keys.
    pub fn keys(&self) -> &StreamKeys {
        &self.keys
    }

    fn xadd(&self, payload: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.keys.stream());
        if self.max_len > 0 {
            cmd.arg("MAXLEN").arg("~").arg(self.max_len);
        }
        cmd.arg("*").arg(FIELD_PAYLOAD).arg(payload);
        cmd
    }

    /// Appends `payload`; returns its id. One round trip (`XADD .. MAXLEN ~ n`). Not
    /// idempotent: a retry after a timeout may add it twice (use
    /// [`StreamProducer::publish_idempotent`] when that matters).
    pub async fn publish(&self, payload: &T) -> Result<String> {
        let json = to_json("stream payload", payload)?;
        let v = self.redis.query("XADD", &self.xadd(&json)).await?;
        text(self.keys.stream(), None, v)
    }

    /// Appends every payload in order, in one round trip (a pipeline of `XADD`; not atomic:
    /// on an error some may have been added). Returns the ids.
    pub async fn publish_many(&self, payloads: &[T]) -> Result<Vec<String>> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for payload in payloads {
            pipe.add_command(self.xadd(&to_json("stream payload", payload)?));
        }
        let replies = self
            .redis
            .query_pipe("XADD", &pipe)
            .await?
            .unwrap_or_default();
        replies
            .into_iter()
            .map(|v| text(self.keys.stream(), None, v))
            .collect()
    }

    /// Appends `payload` unless `idempotency_key` was already used on this stream within the
    /// idempotency TTL, in which case nothing is added and the first id is returned. Safe to
    /// retry after a timeout. Atomic (one script: `GET`, `XADD`, `SET .. PX`), one round trip;
    /// the key (`{<stream>}:idem:<key>`) is in the stream's slot. The key is validated like a
    /// key part and travels with the message (`idem` field), so consumers also deduplicate on
    /// it.
    pub async fn publish_idempotent(
        &self,
        payload: &T,
        idempotency_key: &str,
    ) -> Result<Published> {
        validate_key_part("idempotency key", idempotency_key)?;
        crate::codec::at_most_a_year("idempotency TTL", self.idempotency_ttl)?;
        self.redis.require_scripting("idempotent stream publish")?;
        let json = to_json("stream payload", payload)?;
        let idem_key = self.keys.producer_idempotency(idempotency_key);
        let call = ScriptCall::new()
            .key(self.keys.stream())
            .key(&idem_key)
            .arg(millis(self.idempotency_ttl).max(1))
            .arg(self.max_len)
            .arg(FIELD_PAYLOAD)
            .arg(json)
            .arg(FIELD_IDEMPOTENCY_KEY)
            .arg(idempotency_key);
        let reply = self.redis.eval_script(&PUBLISH_ONCE, &call).await?;
        let Value::Array(items) = reply else {
            return Err(Error::decode(
                &idem_key,
                None,
                format!("unexpected reply {reply:?}"),
            ));
        };
        let mut items = items.into_iter();
        let added = int(&idem_key, items.next().unwrap_or(Value::Nil))?;
        let id = text(&idem_key, None, items.next().unwrap_or(Value::Nil))?;
        Ok(Published {
            id,
            duplicate: added == 0,
        })
    }
}
