//! The documented `EmailJob` JSON and its validation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The payload version this crate writes (`"version"` in the job JSON). Jobs without the field
/// (written by other producers) are version 1.
pub const PAYLOAD_VERSION: u32 = 1;

/// Most recipients one job may carry.
pub const MAX_RECIPIENTS: usize = 1_000;
/// Longest accepted address, in bytes (RFC 5321 path limit).
pub const MAX_ADDRESS_LEN: usize = 320;
/// Longest accepted subject, in bytes.
pub const MAX_SUBJECT_LEN: usize = 998;
/// Longest accepted body, in bytes (1 MiB: attachments belong in object storage).
pub const MAX_BODY_LEN: usize = 1024 * 1024;
/// Longest accepted job id, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Most bytes `metadata` and the extra members may take together, encoded as JSON (1 MiB).
pub const MAX_METADATA_LEN: usize = 1024 * 1024;
/// Deepest nesting of arrays and objects accepted inside `metadata` or an extra member. The
/// decoder refuses documents nested deeper than 128 levels, and a dead record wraps the job in
/// two more: a job must still decode once it has been buried and replayed.
pub const MAX_METADATA_DEPTH: usize = 32;

/// The members of the documented job JSON, which [`EmailJob::extra`] must not repeat: the
/// encoder would write the name twice and readers disagree on which one counts.
const DOCUMENTED_MEMBERS: [&str; 11] = [
    "id",
    "to",
    "from",
    "subject",
    "body",
    "priority",
    "attempts",
    "scheduledAt",
    "metadata",
    "lastError",
    "version",
];

/// A job's priority: which list it waits in.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// `email-queue:high`, served first.
    High,
    /// `email-queue:normal`.
    #[default]
    Normal,
    /// `email-queue:low`, served last unless it has waited longer than the aging bound.
    Low,
}

impl Priority {
    /// Every priority, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The wire name (`high`, `normal`, `low`), also the list key's last part.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(Error::invalid(
                "priority",
                format!("{other:?} is not high, normal or low"),
            )),
        }
    }
}

/// A job id: 1–256 bytes, no whitespace or control characters. Unique per queue while the job
/// is known (waiting, scheduled, active, or retained as completed or dead).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A validated id.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        validate_id(&id)?;
        Ok(JobId(id))
    }

    /// A fresh random id (128 bits from the OS CSPRNG, base64url).
    pub fn generate() -> Result<Self> {
        Ok(JobId(crate::random::secret_token(16)?))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for JobId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        JobId::new(s)
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid("job id", "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            "job id",
            format!("is {} bytes long, the limit is {MAX_ID_LEN}", id.len()),
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '|' || *c == '#')
    {
        return Err(Error::invalid(
            "job id",
            format!("contains the forbidden character {bad:?}"),
        ));
    }
    Ok(())
}

/// One outgoing email, as documented for `email-queue:{priority}`:
///
/// ```json
/// {"id":"j-1","to":["a@example.com"],"from":"noreply@example.com","subject":"Hi",
///  "body":"Hello","priority":"normal","attempts":0,"scheduledAt":1732233600000,
///  "metadata":{},"version":1}
/// ```
///
/// `attempts` counts failed attempts so far; `scheduledAt` is when the job became (or becomes)
/// due, in ms since the epoch; `lastError` is set after a failed attempt. Members this crate
/// does not know are kept as they are when the job is rewritten (a retry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct EmailJob {
    /// Unique id; idempotency key of [`enqueue`](super::EmailQueue::enqueue).
    pub id: JobId,
    /// Recipients (at least one).
    pub to: Vec<String>,
    /// Sender address.
    pub from: String,
    /// Subject line.
    pub subject: String,
    /// Message body.
    pub body: String,
    /// Which list the job waits in.
    #[serde(default, deserialize_with = "null_as_default")]
    pub priority: Priority,
    /// Failed attempts so far.
    #[serde(default, deserialize_with = "attempts_from_number")]
    pub attempts: u32,
    /// When the job became or becomes due (ms since the Unix epoch); 0 when unknown.
    #[serde(default, deserialize_with = "millis_from_number")]
    pub scheduled_at: i64,
    /// Free-form data for the handler.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The error of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Payload version (absent or `null` means 1).
    #[serde(default = "version_one", deserialize_with = "null_as_version_one")]
    pub version: u32,
    /// Members written by other producers, kept on rewrite.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn version_one() -> u32 {
    1
}

/// `null` as the member's default: producers in other languages write absent optional members
/// as `null` (Go's nil map, Python's `None`), and the documented defaults apply to both.
fn null_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A JSON number as an integer in `min..=max`, a fraction dropped (rounded down): producers in
/// other languages write times as floats (`time.time() * 1000` gives `1732233600000.25`, and
/// some encoders write `1.7e12`). `null` or absent is 0.
fn whole_number<'de, D>(deserializer: D, min: i64, max: i64) -> std::result::Result<i64, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    let Some(n) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(0);
    };
    let whole = match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Some(i),
        // `as` saturates; the range check below refuses what saturated.
        (None, Some(f)) if f.is_finite() && f >= i64::MIN as f64 && f < i64::MAX as f64 => {
            Some(f.floor() as i64)
        }
        _ => None,
    };
    whole
        .filter(|w| (min..=max).contains(w))
        .ok_or_else(|| D::Error::custom(format!("{n} is not a number in {min}..={max}")))
}

fn attempts_from_number<'de, D>(deserializer: D) -> std::result::Result<u32, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let n = whole_number(deserializer, 0, i64::from(u32::MAX))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

fn millis_from_number<'de, D>(deserializer: D) -> std::result::Result<i64, D::Error>
where
    D: serde::Deserializer<'de>,
{
    whole_number(deserializer, i64::MIN, i64::MAX)
}

fn null_as_version_one<'de, D>(deserializer: D) -> std::result::Result<u32, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<u32>::deserialize(deserializer)?.unwrap_or(1))
}

impl EmailJob {
    /// A normal-priority job with a fresh random id.
    pub fn new(
        to: impl IntoIterator<Item = impl Into<String>>,
        from: impl Into<String>,
        subject: impl Into<String>,
        body: impl Into<String>,
    ) -> Result<Self> {
        Ok(EmailJob {
            id: JobId::generate()?,
            to: to.into_iter().map(Into::into).collect(),
            from: from.into(),
            subject: subject.into(),
            body: body.into(),
            priority: Priority::Normal,
            attempts: 0,
            scheduled_at: 0,
            metadata: serde_json::Map::new(),
            last_error: None,
            version: PAYLOAD_VERSION,
            extra: serde_json::Map::new(),
        })
    }

    /// Replaces the id (the idempotency key).
    pub fn with_id(mut self, id: JobId) -> Self {
        self.id = id;
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Adds a metadata member.
    pub fn with_metadata(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Checks what enqueue requires: a valid id, 1–[`MAX_RECIPIENTS`] recipients, non-empty
    /// addresses of at most [`MAX_ADDRESS_LEN`] bytes, subject and body within
    /// [`MAX_SUBJECT_LEN`] / [`MAX_BODY_LEN`] bytes, `metadata` and [`extra`](Self::extra)
    /// within [`MAX_METADATA_LEN`] bytes and [`MAX_METADATA_DEPTH`] levels, no extra member
    /// named like a documented one, a known payload version.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id.0)?;
        if self.to.is_empty() {
            return Err(Error::invalid("to", "at least one recipient is required"));
        }
        if self.to.len() > MAX_RECIPIENTS {
            return Err(Error::invalid(
                "to",
                format!(
                    "{} recipients, the limit is {MAX_RECIPIENTS}",
                    self.to.len()
                ),
            ));
        }
        for address in &self.to {
            check_address("to", address)?;
        }
        check_address("from", &self.from)?;
        if self.subject.len() > MAX_SUBJECT_LEN {
            return Err(Error::invalid(
                "subject",
                format!(
                    "is {} bytes long, the limit is {MAX_SUBJECT_LEN}",
                    self.subject.len()
                ),
            ));
        }
        if self.subject.contains(['\r', '\n']) {
            return Err(Error::invalid("subject", "must not contain line breaks"));
        }
        if self.body.len() > MAX_BODY_LEN {
            return Err(Error::invalid(
                "body",
                format!(
                    "is {} bytes long, the limit is {MAX_BODY_LEN}",
                    self.body.len()
                ),
            ));
        }
        if let Some(name) = self
            .extra
            .keys()
            .find(|k| DOCUMENTED_MEMBERS.contains(&k.as_str()))
        {
            return Err(Error::invalid(
                "extra",
                format!("member {name:?} repeats a documented field of the job"),
            ));
        }
        // The member's own level counts: `{"a":[[1]]}` in metadata is nested 2 levels.
        let mut free_form = self.metadata.values().chain(self.extra.values());
        if free_form.any(|v| depth(v) > MAX_METADATA_DEPTH) {
            return Err(Error::invalid(
                "metadata",
                format!("nested deeper than {MAX_METADATA_DEPTH} levels"),
            ));
        }
        let mut size = ByteCount(0);
        // The encoder cannot fail on a `Value`; the count only grows until it passes the limit.
        let _ = serde_json::to_writer(&mut size, &self.metadata);
        let _ = serde_json::to_writer(&mut size, &self.extra);
        if size.0 > MAX_METADATA_LEN {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "metadata and extra members take {} bytes as JSON, the limit is \
                     {MAX_METADATA_LEN}",
                    size.0
                ),
            ));
        }
        if self.version == 0 || self.version > PAYLOAD_VERSION {
            return Err(Error::invalid(
                "version",
                format!(
                    "payload version {} is not supported (1..={PAYLOAD_VERSION})",
                    self.version
                ),
            ));
        }
        Ok(())
    }
}

/// Levels of arrays and objects in `value` (0 for a scalar). Iterative: the value may be deeper
/// than the stack allows recursion.
pub(crate) fn depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(items) => Box::new(items.iter()),
            serde_json::Value::Object(members) => Box::new(members.values()),
            _ => continue,
        };
        deepest = deepest.max(level + 1);
        stack.extend(children.map(|c| (c, level + 1)));
    }
    deepest
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn check_address(what: &'static str, address: &str) -> Result<()> {
    if address.trim().is_empty() {
        return Err(Error::invalid(what, "an address is empty"));
    }
    if address.len() > MAX_ADDRESS_LEN {
        return Err(Error::invalid(
            what,
            format!("an address is longer than {MAX_ADDRESS_LEN} bytes"),
        ));
    }
    if address.contains(['\r', '\n']) {
        return Err(Error::invalid(what, "an address contains a line break"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_may_nest_exactly_the_documented_depth() {
        let nested = |levels: usize| {
            (0..levels).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
        };
        let job = |levels| {
            EmailJob::new(["a@example.com"], "b@example.com", "s", "b")
                .unwrap()
                .with_metadata("x", nested(levels))
        };
        job(MAX_METADATA_DEPTH).validate().unwrap();
        assert!(matches!(
            job(MAX_METADATA_DEPTH + 1).validate(),
            Err(Error::InvalidInput {
                what: "metadata",
                ..
            })
        ));
        // Buried and listed again, the deepest accepted job still decodes.
        let record = serde_json::json!({ "job": job(MAX_METADATA_DEPTH) }).to_string();
        serde_json::from_str::<serde_json::Value>(&record).unwrap();
    }

    #[test]
    fn encoding_suits_the_fetch_scripts_scan() {
        // queue.lua reads `id` and `scheduledAt` without decoding only from payloads that start
        // with `{"id":"` and carry `scheduledAt` before any nested object.
        let mut job = EmailJob::new(["a@x.io", "b@x.io"], "n@x.io", "s", "b")
            .unwrap()
            .with_id(JobId::new("j1").unwrap());
        job.metadata
            .insert("tenant".into(), serde_json::json!({"region": "eu"}));
        let json = serde_json::to_string(&job).unwrap();
        assert!(json.starts_with(r#"{"id":"j1","#), "{json}");
        let at = json.find(r#""scheduledAt":"#).unwrap();
        assert!(!json[1..at].contains('{'), "{json}");
        assert_eq!(json.matches(r#""id":"#).count(), 1, "{json}");
    }

    #[test]
    fn documented_json_without_version_decodes() {
        let raw = r#"{"id":"j1","to":["a@x.io"],"from":"n@x.io","subject":"s","body":"b",
            "priority":"low","attempts":0,"scheduledAt":1732233600000,"metadata":{"k":[]},
            "tenant":"t9"}"#;
        let job: EmailJob = serde_json::from_str(raw).unwrap();
        assert_eq!(job.priority, Priority::Low);
        assert_eq!(job.version, 1);
        assert_eq!(job.scheduled_at, 1_732_233_600_000);
        assert_eq!(job.extra["tenant"], "t9");
        let back = serde_json::to_string(&job).unwrap();
        assert!(back.contains(r#""tenant":"t9""#), "{back}");
        assert!(back.contains(r#""scheduledAt":1732233600000"#), "{back}");
        assert!(back.contains(r#""metadata":{"k":[]}"#), "{back}");
    }

    #[test]
    fn null_optional_members_take_their_defaults() {
        let raw = r#"{"id":"j1","to":["a@x.io"],"from":"n@x.io","subject":"s","body":"b",
            "priority":null,"attempts":null,"scheduledAt":null,"metadata":null,"version":null,
            "lastError":null}"#;
        let job: EmailJob = serde_json::from_str(raw).unwrap();
        assert_eq!(
            (job.priority, job.attempts, job.scheduled_at, job.version),
            (Priority::Normal, 0, 0, 1)
        );
        assert!(job.metadata.is_empty() && job.last_error.is_none() && job.extra.is_empty());
        // A wrong type is still an error, not a default.
        let wrong = raw.replace(r#""attempts":null"#, r#""attempts":"two""#);
        assert!(serde_json::from_str::<EmailJob>(&wrong).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let job = EmailJob::new(Vec::<String>::new(), "f@x.io", "s", "b").unwrap();
        assert!(matches!(
            job.validate(),
            Err(Error::InvalidInput { what: "to", .. })
        ));
        let job = EmailJob::new(["a@x.io", " "], "f@x.io", "s", "b").unwrap();
        assert!(matches!(
            job.validate(),
            Err(Error::InvalidInput { what: "to", .. })
        ));
        let job = EmailJob::new(["a@x.io"], "", "s", "b").unwrap();
        assert!(matches!(
            job.validate(),
            Err(Error::InvalidInput { what: "from", .. })
        ));
        let job = EmailJob::new(["a@x.io"], "f@x.io", "s".repeat(999), "b").unwrap();
        assert!(matches!(
            job.validate(),
            Err(Error::InvalidInput {
                what: "subject",
                ..
            })
        ));
        let job = EmailJob::new(["a@x.io"], "f@x.io", "s", "b".repeat(MAX_BODY_LEN + 1)).unwrap();
        assert!(matches!(
            job.validate(),
            Err(Error::InvalidInput { what: "body", .. })
        ));
        assert!(JobId::new("a b").is_err());
        assert!(JobId::new("").is_err());
        assert!(JobId::new("x".repeat(257)).is_err());
        assert!(
            EmailJob::new(["a@x.io"], "f@x.io", "s", "b")
                .unwrap()
                .validate()
                .is_ok()
        );
    }
}
