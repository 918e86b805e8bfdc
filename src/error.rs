//! The crate's error type: one variant per failure site, with answers to "may I retry?".

use std::time::Duration;

use crate::config::ConfigError;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to Redis through this crate.
///
/// Stored data that does not decode is a [`Error::Decode`], never a connection error, so a retry
/// loop never spins on bad data. Secrets never appear in the messages. Cloning keeps the kind
/// and the source, so one failure can answer every caller of a batched call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected before anything was sent.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// No connection to Redis could be had, or it broke (refused, reset, closed, pool exhausted,
    /// failover in progress). When the connection could not be opened nothing was applied; when
    /// it broke while a request was in flight, the request may have been applied, as after a
    /// [`Error::Timeout`]: retry only idempotent operations (the crate's own retries are
    /// limited to those, see [`Config::max_retries`](crate::Config::max_retries)).
    #[error("redis unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying client error, when there is one.
        #[source]
        source: Option<redis::RedisError>,
    },

    /// A request was sent but no answer arrived in time: the outcome is unknown.
    #[error("redis timed out{} during {operation}; the outcome is unknown", shown_deadline(*after))]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// The deadline that elapsed; zero when it is not known (a client error converted with
        /// `From<redis::RedisError>` carries no deadline), and the message then names none.
        after: Duration,
    },

    /// A caller-supplied value was rejected before anything was sent.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which argument or field (e.g. `session id`, `ui.pageSize`).
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// A value stored in Redis does not have the documented layout.
    #[error("cannot decode {key}{}: {reason}", field.as_deref().map(|f| format!(" field `{f}`")).unwrap_or_default())]
    Decode {
        /// The Redis key holding the value; for a session, `<prefix>session:<redacted>`, since
        /// its id is a bearer secret.
        key: String,
        /// The hash field or JSON member, when the problem is in one.
        field: Option<String>,
        /// What was wrong.
        reason: String,
    },

    /// The server lacks a feature this operation needs (version, scripting disabled, ...).
    #[error("unsupported by this server: {0}")]
    Unsupported(String),

    /// The server answered with an error of its own (WRONGTYPE, NOPERM, OOM, ...).
    #[error("redis error: {0}")]
    Server(#[source] redis::RedisError),
}

impl Error {
    /// True when the same call may succeed if tried again later (connection loss, timeouts,
    /// failover, loading). Note that a timeout's outcome is unknown: retry only idempotent
    /// operations.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } => true,
            Error::Server(e) => matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::Moved
                        | redis::ServerErrorKind::Ask
                )
            ),
            _ => false,
        }
    }

    /// True when a request was sent and its outcome is unknown.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True when Redis could not be reached or the connection broke (see
    /// [`Error::Unavailable`]: a request in flight on a broken connection may have been
    /// applied).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// A `READONLY` reply (alone, inside a script, or aborting a `MULTI`) becomes
    /// [`Error::Unavailable`]: the node was demoted to a replica by a failover and nothing was
    /// written. Only for callers that treat "unavailable" as "apply a fallback" (the rate
    /// limiter); elsewhere it stays a server error, which retry loops leave alone, since a retry
    /// on the same connection would meet the same replica.
    pub(crate) fn read_only_as_unavailable(self, operation: &'static str) -> Self {
        match self {
            Error::Server(err) if is_read_only(&err) => Error::Unavailable {
                message: format!("{operation}: the server is a read-only replica (failover?)"),
                source: Some(err),
            },
            other => other,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn decode(
        key: impl Into<String>,
        field: Option<&str>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Decode {
            key: key.into(),
            field: field.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// Classifies a client error raised during `operation`. A timeout gets no deadline (zero):
    /// callers that know the one in force use [`Error::from_redis_within`].
    pub(crate) fn from_redis(operation: &'static str, err: redis::RedisError) -> Self {
        Self::from_redis_within(operation, Duration::ZERO, err)
    }

    /// [`Error::from_redis`] for a request bounded by `deadline` (the response timeout of the
    /// connection it was sent on, or the caller's own bound).
    pub(crate) fn from_redis_within(
        operation: &'static str,
        deadline: Duration,
        err: redis::RedisError,
    ) -> Self {
        if err.is_timeout() {
            return Error::Timeout {
                operation,
                after: deadline,
            };
        }
        if is_unexpected_reply(&err) {
            return Error::Decode {
                key: format!("the reply to {operation}"),
                field: None,
                reason: err.to_string(),
            };
        }
        if err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_io_error()
            || err.is_unrecoverable_error()
        {
            return Error::Unavailable {
                message: format!("{operation}: {err}"),
                source: Some(err),
            };
        }
        Error::Server(err)
    }
}

/// ` after <deadline>` for the timeout message, or nothing when the deadline is unknown: a
/// made-up "after 0ns" would send whoever reads the log after the wrong cause.
fn shown_deadline(after: Duration) -> String {
    if after.is_zero() {
        String::new()
    } else {
        format!(" after {after:?}")
    }
}

/// A reply the client could not convert to the type asked for. The client marks these
/// "reconnect" (`is_unrecoverable_error`) like a broken connection, but they say nothing about
/// the connection: classed as unavailable, bad data would be retried and would drop every shared
/// connection.
pub(crate) fn is_unexpected_reply(err: &redis::RedisError) -> bool {
    matches!(
        err.kind(),
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
    )
}

fn is_read_only(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => true,
        // A write queued in `MULTI` on a replica is refused with READONLY, then EXEC aborts.
        ErrorKind::Server(ServerErrorKind::ExecAbort) => {
            err.clone().into_server_errors().is_some_and(|errors| {
                errors
                    .iter()
                    .any(|(_, e)| e.kind() == Some(ServerErrorKind::ReadOnly))
            })
        }
        _ => err.code() == Some("READONLY"),
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        Error::from_redis("request", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &[u8]) -> Error {
        let value = redis::parse_redis_value(reply).unwrap();
        let redis::Value::ServerError(err) = value else {
            panic!("not an error reply: {value:?}");
        };
        Error::from_redis("test", err.into())
    }

    fn timed_out() -> redis::RedisError {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out").into()
    }

    #[test]
    fn a_reply_of_the_wrong_type_is_a_decode_error() {
        use redis::FromRedisValue;
        let parsing = i64::from_redis_value(redis::Value::BulkString(b"x".to_vec())).unwrap_err();
        let err = Error::from_redis("test", parsing.into());
        assert!(matches!(err, Error::Decode { .. }), "{err:?}");
        assert!(!err.is_retryable(), "{err:?}");
    }

    #[test]
    fn timeouts_name_a_deadline_only_when_one_is_known() {
        let unknown = Error::from(timed_out());
        assert!(unknown.is_timeout(), "{unknown:?}");
        let shown = unknown.to_string();
        assert_eq!(
            shown,
            "redis timed out during request; the outcome is unknown"
        );
        let known = Error::from_redis_within("GET", Duration::from_millis(250), timed_out());
        assert_eq!(
            known.to_string(),
            "redis timed out after 250ms during GET; the outcome is unknown"
        );
    }

    #[test]
    fn read_only_is_unavailable_to_the_limiter_only() {
        let read_only = server_error(b"-READONLY You can't write against a read only replica.\r\n");
        assert!(matches!(read_only, Error::Server(_)), "{read_only:?}");
        assert!(
            !read_only.is_retryable(),
            "other repositories keep READONLY a server error"
        );
        let mapped = read_only.read_only_as_unavailable("rate_limit.check");
        assert!(
            mapped.is_unavailable() && mapped.is_retryable(),
            "{mapped:?}"
        );
        assert!(mapped.to_string().contains("read-only replica"), "{mapped}");

        for other in [
            &b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"[..],
            b"-NOPERM this user has no permissions\r\n",
            b"-ERR unknown command\r\n",
        ] {
            let err = server_error(other).read_only_as_unavailable("rate_limit.check");
            assert!(matches!(err, Error::Server(_)), "{err:?}");
        }
    }
}
