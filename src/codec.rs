//! Encoding and decoding of application values: hash ↔ fields and JSON.
//!
//! Every decode error is an [`Error::Decode`] naming the key and, where there is one, the field.
//! Replies are decoded here rather than through `FromRedisValue`, whose errors the redis client
//! may classify as retryable.

use std::str::FromStr;

use redis::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The fields of one hash, read with typed accessors whose errors name key and field.
///
/// Kept in reply order in a `Vec`: the hashes read here have a handful of fields, where a linear
/// search beats building a map on every read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HashFields {
    key: String,
    fields: Vec<(String, String)>,
}

impl HashFields {
    /// Decodes an `HGETALL` reply (RESP2 flat array or RESP3 map). An empty hash is `None`.
    pub fn from_reply(key: &str, reply: Value) -> Result<Option<Self>> {
        let capacity = match &reply {
            Value::Map(pairs) => pairs.len(),
            Value::Array(items) => items.len() / 2,
            _ => 0,
        };
        let mut fields = Vec::with_capacity(capacity);
        let mut insert = |k: Value, v: Value| -> Result<()> {
            let name = text(key, None, k)?;
            let value = text(key, Some(&name), v)?;
            fields.push((name, value));
            Ok(())
        };
        match reply {
            Value::Nil => {}
            Value::Map(pairs) => {
                for (k, v) in pairs {
                    insert(k, v)?;
                }
            }
            Value::Array(items) => {
                if items.len() % 2 != 0 {
                    return Err(Error::decode(key, None, "hash reply has an odd length"));
                }
                let mut iter = items.into_iter();
                while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                    insert(k, v)?;
                }
            }
            other => {
                return Err(Error::decode(
                    key,
                    None,
                    format!("expected a hash, got {other:?}"),
                ));
            }
        }
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(HashFields {
            key: key.to_owned(),
            fields,
        }))
    }

    /// The key these fields were read from.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A field's raw text, if present.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, value)| value.as_str())
    }

    /// A field that must be present.
    pub fn required(&self, field: &str) -> Result<&str> {
        self.get(field)
            .ok_or_else(|| Error::decode(&self.key, Some(field), "missing"))
    }

    /// A present field parsed with `FromStr`.
    pub fn parse<T: FromStr>(&self, field: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.required(field)?;
        raw.parse::<T>()
            .map_err(|e| Error::decode(&self.key, Some(field), format!("{raw:?}: {e}")))
    }

    /// An optional field parsed with `FromStr`.
    pub fn parse_opt<T: FromStr>(&self, field: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(field) {
            None => Ok(None),
            Some(_) => self.parse(field).map(Some),
        }
    }

    /// An optional field holding JSON.
    pub fn json<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>> {
        match self.get(field) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw)
                .map(Some)
                .map_err(|e| Error::decode(&self.key, Some(field), e.to_string())),
        }
    }

    /// Takes a field that must be present out of the set, without copying it.
    pub fn take_required(&mut self, field: &str) -> Result<String> {
        match self.fields.iter().position(|(name, _)| name == field) {
            Some(at) => Ok(self.fields.swap_remove(at).1),
            None => Err(Error::decode(&self.key, Some(field), "missing")),
        }
    }

    /// Every field as `(name, value)`, in the order the server sent them.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// Takes the fields out, in the order the server sent them.
    pub fn into_fields(self) -> Vec<(String, String)> {
        self.fields
    }
}

/// A reply that must be text (bulk or simple string); `field` names the hash field if any.
pub fn text(key: &str, field: Option<&str>, value: Value) -> Result<String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|_| Error::decode(key, field, "value is not UTF-8"))
        }
        Value::SimpleString(s) => Ok(s),
        Value::VerbatimString { text, .. } => Ok(text),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(Error::decode(
            key,
            field,
            format!("expected a string, got {other:?}"),
        )),
    }
}

/// A reply that is text or nil.
pub fn opt_text(key: &str, value: Value) -> Result<Option<String>> {
    match value {
        Value::Nil => Ok(None),
        other => text(key, None, other).map(Some),
    }
}

/// A reply that must be an integer (or an integer in text).
pub fn int(key: &str, value: Value) -> Result<i64> {
    match value {
        Value::Int(i) => Ok(i),
        Value::BulkString(ref b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::decode(key, None, format!("expected an integer, got {value:?}"))),
        Value::Okay => Ok(1),
        other => Err(Error::decode(
            key,
            None,
            format!("expected an integer, got {other:?}"),
        )),
    }
}

/// Decodes JSON stored at `key`.
pub fn from_json<T: DeserializeOwned>(key: &str, raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(|e| {
        Error::decode(
            key,
            None,
            format!("not valid JSON of the expected shape: {e}"),
        )
    })
}

/// Encodes a value as JSON; `what` names it in the (rare) error.
pub fn to_json<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::invalid(what, format!("cannot encode as JSON: {e}")))
}

/// Longest duration any option of this crate accepts. Scripts add durations to the server clock
/// in milliseconds (and `Instant` additions panic on overflow), and a sum past 2^63 ms would wrap
/// to a time in the past; a year is far beyond any sensible setting.
pub const MAX_OPTION_DURATION: std::time::Duration =
    std::time::Duration::from_secs(365 * 24 * 3600);

/// Refuses, naming `what`, a stream entry id that is not complete `<ms>-<seq>` (both parts
/// decimal `u64`s, no sign): a bare `<ms>` is a range to `XRANGE` but one entry to `XDEL`.
pub(crate) fn validate_stream_id(what: &'static str, id: &str) -> Result<()> {
    let number = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) && part.parse::<u64>().is_ok()
    };
    if id
        .split_once('-')
        .is_some_and(|(ms, seq)| number(ms) && number(seq))
    {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!("{id:?} is not of the form <ms>-<seq>"),
        ))
    }
}

/// Refuses `value` over [`MAX_OPTION_DURATION`] with [`Error::InvalidInput`] naming `what`.
pub fn at_most_a_year(what: &'static str, value: std::time::Duration) -> Result<()> {
    if value > MAX_OPTION_DURATION {
        return Err(Error::invalid(
            what,
            format!("must be at most {MAX_OPTION_DURATION:?} (1 year), got {value:?}"),
        ));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch by this process's clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn hash_errors_name_key_and_field() {
        let h = HashFields::from_reply("session:x", Value::Array(vec![b("createdAt"), b("soon")]))
            .unwrap()
            .unwrap();
        let err = h.parse::<i64>("createdAt").unwrap_err();
        assert!(
            matches!(err, Error::Decode { ref key, ref field, .. } if key == "session:x" && field.as_deref() == Some("createdAt"))
        );
        assert!(matches!(h.required("userId"), Err(Error::Decode { .. })));
    }

    #[test]
    fn empty_hash_is_none_and_odd_reply_is_an_error() {
        assert_eq!(
            HashFields::from_reply("k", Value::Array(vec![])).unwrap(),
            None
        );
        assert!(HashFields::from_reply("k", Value::Array(vec![b("a")])).is_err());
        assert!(HashFields::from_reply("k", Value::Int(3)).is_err());
    }

    #[test]
    fn json_errors_are_decode_errors() {
        assert!(matches!(
            from_json::<serde_json::Value>("cache:x", b"{nope"),
            Err(Error::Decode { .. })
        ));
    }
}
