//! Decoding of stream replies (RESP2 and RESP3 shapes) into owned entries.

use redis::Value;

use crate::codec::{int, opt_text, text};
use crate::error::{Error, Result};

/// The fields of a stream entry, in order.
pub(crate) type Fields = Vec<(String, Vec<u8>)>;

/// One raw stream entry: its id and its fields in order. `fields` is `None` for a pending entry
/// whose message was trimmed or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawEntry {
    pub(crate) id: String,
    pub(crate) fields: Option<Fields>,
    /// Why the fields are not exactly what the stream holds, when they are not (a field name
    /// that is not UTF-8, shown escaped; see [`escape_name`]). Such an entry is still an entry:
    /// one bad entry never fails the reply it came in.
    pub(crate) malformed: Option<String>,
    /// `(index in fields, exact bytes)` of each field name that is not UTF-8: what a dead
    /// letter writes, so that it holds (and a replay publishes) the original names.
    pub(crate) raw_names: Vec<(usize, Vec<u8>)>,
}

impl RawEntry {
    pub(crate) fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    pub(crate) fn field_text(&self, name: &str) -> Option<String> {
        self.field(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    }
}

/// A field name that is not UTF-8, as text for display: `<[u8]>::escape_ascii` (printable
/// ASCII kept, `\`, `'`, `"`, tab, CR and LF backslash-escaped, every other byte `\xNN`). Not
/// reversible in general (a UTF-8 name `\xff` of the same entry is shown as it is), so writes
/// use the bytes kept in [`RawEntry::raw_names`], never this.
fn escape_name(name: &[u8]) -> String {
    name.escape_ascii().to_string()
}

/// A field value's bytes. Redis only ever sends strings here; anything else is kept as its debug
/// form, with the reason.
fn bytes(value: Value) -> std::result::Result<Vec<u8>, (Vec<u8>, String)> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => {
            let shown = format!("{other:?}");
            Err((
                shown.clone().into_bytes(),
                format!("a field value is not a string: {shown}"),
            ))
        }
    }
}

/// A field name as text: exact when it is UTF-8, else escaped, with the reason and the bytes.
fn name(position: usize, value: Value) -> std::result::Result<String, (String, String, Vec<u8>)> {
    let raw = match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => return Ok(s),
        Value::VerbatimString { text, .. } => return Ok(text),
        Value::Int(i) => return Ok(i.to_string()),
        other => {
            let shown = format!("{other:?}");
            return Err((
                shown.clone(),
                format!("field name {position} is not a string: {shown}"),
                shown.into_bytes(),
            ));
        }
    };
    String::from_utf8(raw).map_err(|e| {
        let escaped = escape_name(e.as_bytes());
        let reason = format!("field name {position} is not UTF-8 (shown escaped as `{escaped}`)");
        (escaped, reason, e.into_bytes())
    })
}

/// The fields of one entry, decoded as far as they can be: `(fields, problems, raw names)`.
#[allow(clippy::type_complexity)]
fn fields(value: Value) -> (Option<Fields>, Vec<String>, Vec<(usize, Vec<u8>)>) {
    let mut problems = Vec::new();
    let mut raw_names = Vec::new();
    let pairs: Vec<(Value, Value)> = match value {
        Value::Nil => return (None, problems, raw_names),
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                problems
                    .push("the field list has an odd length; the last name has no value".into());
            }
            let mut iter = items.into_iter();
            let mut pairs = Vec::new();
            while let Some(k) = iter.next() {
                pairs.push((k, iter.next().unwrap_or(Value::BulkString(Vec::new()))));
            }
            pairs
        }
        other => {
            problems.push(format!("expected the entry's fields, got {other:?}"));
            Vec::new()
        }
    };
    let mut out = Vec::with_capacity(pairs.len());
    for (position, (k, v)) in pairs.into_iter().enumerate() {
        let k = name(position + 1, k).unwrap_or_else(|(shown, why, exact)| {
            problems.push(why);
            raw_names.push((position, exact));
            shown
        });
        let v = bytes(v).unwrap_or_else(|(shown, why)| {
            problems.push(why);
            shown
        });
        out.push((k, v));
    }
    (Some(out), problems, raw_names)
}

/// `[[id, fields], ...]` as returned by XRANGE, XAUTOCLAIM and per stream by XREADGROUP.
pub(crate) fn entries(key: &str, value: Value) -> Result<Vec<RawEntry>> {
    let items = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => {
            return Err(Error::decode(
                key,
                None,
                format!("expected a list of stream entries, got {other:?}"),
            ));
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::Array(mut pair) if pair.len() == 2 => {
                let f = pair.pop().unwrap_or(Value::Nil);
                // Ids are made by Redis (`<ms>-<seq>`): one that is not text means the reply is
                // not a stream reply at all, unlike field names, which are user data.
                let id = text(key, None, pair.pop().unwrap_or(Value::Nil))?;
                let (fields, problems, raw_names) = fields(f);
                let malformed = (!problems.is_empty())
                    .then(|| format!("entry {id} is malformed: {}", problems.join("; ")));
                out.push(RawEntry {
                    id,
                    fields,
                    malformed,
                    raw_names,
                });
            }
            // RESP2 servers may answer a deleted entry as a bare nil id list.
            Value::Nil => {}
            other => {
                return Err(Error::decode(
                    key,
                    None,
                    format!("expected [id, fields], got {other:?}"),
                ));
            }
        }
    }
    Ok(out)
}

/// An XREADGROUP reply for one stream (RESP2 `[[name, entries]]`, RESP3 `{name: entries}`).
pub(crate) fn read_group(key: &str, value: Value) -> Result<Vec<RawEntry>> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Map(pairs) => {
            let mut out = Vec::new();
            for (_, v) in pairs {
                out.extend(entries(key, v)?);
            }
            Ok(out)
        }
        Value::Array(streams) => {
            let mut out = Vec::new();
            for stream in streams {
                match stream {
                    Value::Array(mut pair) if pair.len() == 2 => {
                        out.extend(entries(key, pair.pop().unwrap_or(Value::Nil))?);
                    }
                    other => {
                        return Err(Error::decode(
                            key,
                            None,
                            format!("expected [stream, entries], got {other:?}"),
                        ));
                    }
                }
            }
            Ok(out)
        }
        other => Err(Error::decode(
            key,
            None,
            format!("unexpected XREADGROUP reply {other:?}"),
        )),
    }
}

/// An XAUTOCLAIM reply: `(next cursor, claimed entries, deleted ids)`.
pub(crate) fn autoclaim(key: &str, value: Value) -> Result<(String, Vec<RawEntry>, Vec<String>)> {
    let Value::Array(items) = value else {
        return Err(Error::decode(
            key,
            None,
            format!("unexpected XAUTOCLAIM reply {value:?}"),
        ));
    };
    let mut iter = items.into_iter();
    let cursor = text(key, None, iter.next().unwrap_or(Value::Nil))?;
    let claimed = entries(key, iter.next().unwrap_or(Value::Nil))?;
    let deleted = match iter.next() {
        None | Some(Value::Nil) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .into_iter()
            .map(|v| text(key, None, v))
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::decode(
                key,
                None,
                format!("expected the deleted ids of XAUTOCLAIM, got {other:?}"),
            ));
        }
    };
    Ok((cursor, claimed, deleted))
}

/// The reply of the touch script: `(lost ids, gone ids, settled ids)`.
#[allow(clippy::type_complexity)]
pub(crate) fn touched(key: &str, value: Value) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let ids = |v: Option<Value>| -> Result<Vec<String>> {
        match v {
            None | Some(Value::Nil) => Ok(Vec::new()),
            Some(Value::Array(ids)) => ids.into_iter().map(|v| text(key, None, v)).collect(),
            Some(other) => Err(Error::decode(
                key,
                None,
                format!("expected a list of ids, got {other:?}"),
            )),
        }
    };
    let Value::Array(items) = value else {
        return Err(Error::decode(
            key,
            None,
            format!("unexpected touch reply {value:?}"),
        ));
    };
    let mut iter = items.into_iter();
    Ok((ids(iter.next())?, ids(iter.next())?, ids(iter.next())?))
}

/// The delivery count from an `XPENDING key group id id 1` reply (`None` when not pending).
pub(crate) fn pending_deliveries(key: &str, value: Value) -> Result<Option<u64>> {
    let Value::Array(rows) = value else {
        return Err(Error::decode(
            key,
            None,
            format!("unexpected XPENDING reply {value:?}"),
        ));
    };
    let Some(Value::Array(row)) = rows.into_iter().next() else {
        return Ok(None);
    };
    let count = row.into_iter().nth(3).unwrap_or(Value::Nil);
    Ok(Some(u64::try_from(int(key, count)?).unwrap_or(0)))
}

/// An XINFO row (RESP2 flat `[name, value, ...]` or RESP3 map) as `(field, value)` pairs.
pub(crate) fn info_row(key: &str, value: Value) -> Result<Vec<(String, Value)>> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut iter = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        other => {
            return Err(Error::decode(
                key,
                None,
                format!("unexpected XINFO row {other:?}"),
            ));
        }
    };
    pairs
        .into_iter()
        .map(|(k, v)| Ok((text(key, None, k)?, v)))
        .collect()
}

/// A list of XINFO rows.
pub(crate) fn info_rows(key: &str, value: Value) -> Result<Vec<Vec<(String, Value)>>> {
    match value {
        Value::Array(rows) => rows.into_iter().map(|r| info_row(key, r)).collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::decode(
            key,
            None,
            format!("unexpected XINFO reply {other:?}"),
        )),
    }
}

/// A field of an XINFO row as an integer (`None` when absent or nil).
pub(crate) fn row_int(key: &str, row: &[(String, Value)], field: &str) -> Result<Option<i64>> {
    match row.iter().find(|(k, _)| k == field) {
        None | Some((_, Value::Nil)) => Ok(None),
        Some((_, v)) => int(key, v.clone())
            .map(Some)
            .map_err(|_| Error::decode(key, Some(field), format!("not an integer: {v:?}"))),
    }
}

/// A field of an XINFO row as text (`None` when absent or nil).
pub(crate) fn row_text(key: &str, row: &[(String, Value)], field: &str) -> Result<Option<String>> {
    match row.iter().find(|(k, _)| k == field) {
        None => Ok(None),
        Some((_, v)) => opt_text(key, v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn resp2_and_resp3_read_replies_decode_alike() {
        let entry = Value::Array(vec![b("1-0"), Value::Array(vec![b("payload"), b("{}")])]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            b("s"),
            Value::Array(vec![entry.clone()]),
        ])]);
        let resp3 = Value::Map(vec![(b("s"), Value::Array(vec![entry]))]);
        let a = read_group("s", resp2).unwrap();
        assert_eq!(a, read_group("s", resp3).unwrap());
        assert_eq!(a[0].id, "1-0");
        assert_eq!(a[0].field("payload"), Some(&b"{}"[..]));
    }

    #[test]
    fn deleted_entries_have_no_fields() {
        let reply = Value::Array(vec![Value::Array(vec![b("1-0"), Value::Nil])]);
        let e = entries("s", reply).unwrap();
        assert_eq!(e[0].fields, None);
    }

    #[test]
    fn autoclaim_reply_with_deleted_ids() {
        let reply = Value::Array(vec![
            b("0-0"),
            Value::Array(vec![]),
            Value::Array(vec![b("1-0"), b("2-0")]),
        ]);
        let (cursor, claimed, deleted) = autoclaim("s", reply).unwrap();
        assert_eq!(cursor, "0-0");
        assert!(claimed.is_empty());
        assert_eq!(deleted, vec!["1-0", "2-0"]);
    }

    #[test]
    fn a_bad_field_name_marks_its_entry_only() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                b("1-0"),
                Value::Array(vec![
                    Value::BulkString(b"caf\xe9\\".to_vec()),
                    b("v"),
                    b("payload"),
                    b("{}"),
                ]),
            ]),
            Value::Array(vec![b("2-0"), Value::Array(vec![b("payload"), b("{}")])]),
        ]);
        let e = entries("s", reply).unwrap();
        assert_eq!(e.len(), 2);
        let reason = e[0].malformed.as_deref().unwrap();
        assert!(
            reason.contains("1-0") && reason.contains("field name 1 is not UTF-8"),
            "{reason}"
        );
        assert_eq!(e[0].fields.as_ref().unwrap()[0].0, "caf\\xe9\\\\");
        assert_eq!(e[0].raw_names, vec![(0, b"caf\xe9\\".to_vec())]);
        assert!(e[1].raw_names.is_empty());
        assert_eq!(e[0].field("payload"), Some(&b"{}"[..]));
        assert_eq!(
            (e[1].malformed.as_deref(), e[1].field("payload")),
            (None, Some(&b"{}"[..]))
        );
    }

    #[test]
    fn malformed_replies_are_decode_errors() {
        assert!(matches!(
            entries("s", Value::Int(1)),
            Err(Error::Decode { .. })
        ));
        assert!(matches!(
            read_group("s", Value::Array(vec![Value::Int(1)])),
            Err(Error::Decode { .. })
        ));
    }
}
