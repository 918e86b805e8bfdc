//! An estimate of the Redis server's clock, for decisions the server makes by its own clock
//! but that a client must compute before sending: the `XTRIM MINID` cutoff of an append.
//!
//! Computing such a cutoff from the client's clock lets a client whose clock runs ahead of the
//! server's by more than the retention trim the record it has just appended. The estimate is
//! instead a lower bound on the server's clock: the last server time seen (`TIME` at connect,
//! then the `TIME` inside every append's transaction, or a lone `TIME` at most once a minute
//! while there is no reading) plus the time elapsed since on the
//! client's monotonic clock. A reading arrives after the server took it, so the bound is behind
//! the server by up to one round trip: a cutoff computed from it trims a little late, not
//! early, except by the clock skew between Cluster nodes (the readings come from whichever node
//! served the last append) or a server clock stepped back since the last reading. Stream entry
//! ids are not readings: `XADD *` gives at least the stream's last id, which may lie ahead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

/// Marks "no server time seen yet".
const UNKNOWN: i64 = i64::MIN;

/// How often a handle without a reading asks the server for one (a refused `TIME` is asked
/// again only this much later).
pub(crate) const PROBE_INTERVAL_MS: i64 = 60_000;

/// The server's clock as last seen, carried forward on the client's monotonic clock.
#[derive(Debug)]
pub(crate) struct ServerClock {
    epoch: Instant,
    /// Server ms minus client monotonic ms since `epoch` at the last reading.
    offset_ms: AtomicI64,
    /// Client monotonic ms since `epoch` of the last probe without a reading.
    probed_at_ms: AtomicI64,
}

impl ServerClock {
    pub(crate) fn new() -> Self {
        ServerClock {
            epoch: Instant::now(),
            offset_ms: AtomicI64::new(UNKNOWN),
            probed_at_ms: AtomicI64::new(UNKNOWN),
        }
    }

    /// Whether a caller without a reading should ask the server for one now: at most once per
    /// [`PROBE_INTERVAL_MS`] across the handle's callers (exactly one caller gets `true`).
    pub(crate) fn probe_due(&self) -> bool {
        let now = self.elapsed_ms();
        let last = self.probed_at_ms.load(Ordering::Relaxed);
        (last == UNKNOWN || now.saturating_sub(last) >= PROBE_INTERVAL_MS)
            && self
                .probed_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Records a server time (ms since the Unix epoch) received just now. The latest reading
    /// wins, so a server clock stepped back by NTP is followed rather than outrun.
    pub(crate) fn observe(&self, server_ms: i64) {
        self.offset_ms.store(
            server_ms.saturating_sub(self.elapsed_ms()),
            Ordering::Relaxed,
        );
    }

    /// A lower bound on the server's clock now (ms since the Unix epoch), or `None` before the
    /// first reading.
    pub(crate) fn now_ms(&self) -> Option<i64> {
        match self.offset_ms.load(Ordering::Relaxed) {
            UNKNOWN => None,
            offset => Some(offset.saturating_add(self.elapsed_ms())),
        }
    }
}

/// Parses a `TIME` reply (`[seconds, microseconds]`) into ms since the Unix epoch.
pub(crate) fn time_reply_millis(reply: &redis::Value) -> Option<i64> {
    let redis::Value::Array(parts) = reply else {
        return None;
    };
    let number = |v: &redis::Value| -> Option<i64> {
        match v {
            redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            redis::Value::Int(n) => Some(*n),
            _ => None,
        }
    };
    match parts.as_slice() {
        [secs, micros] => number(secs)?
            .checked_mul(1000)?
            .checked_add(number(micros)? / 1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unknown_until_a_reading_then_carried_forward() {
        let clock = ServerClock::new();
        assert_eq!(clock.now_ms(), None);
        clock.observe(1_000_000);
        let first = clock.now_ms().unwrap();
        assert!((1_000_000..1_000_050).contains(&first), "{first}");
        std::thread::sleep(Duration::from_millis(30));
        let later = clock.now_ms().unwrap();
        assert!(later >= first + 30, "{first} then {later}");
    }

    #[test]
    fn the_latest_reading_wins_even_when_it_is_earlier() {
        let clock = ServerClock::new();
        clock.observe(5_000_000);
        clock.observe(2_000_000);
        let now = clock.now_ms().unwrap();
        assert!((2_000_000..2_000_050).contains(&now), "{now}");
    }

    #[test]
    fn probes_are_spaced() {
        let clock = ServerClock::new();
        assert!(clock.probe_due());
        assert!(!clock.probe_due(), "a second probe right after the first");
        clock
            .probed_at_ms
            .store(clock.elapsed_ms() - PROBE_INTERVAL_MS, Ordering::Relaxed);
        assert!(clock.probe_due());
    }

    #[test]
    fn time_replies_parse() {
        let b = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let reply = redis::Value::Array(vec![b("1700000000"), b("123456")]);
        assert_eq!(time_reply_millis(&reply), Some(1_700_000_000_123));
        assert_eq!(time_reply_millis(&redis::Value::Int(1)), None);
        assert_eq!(
            time_reply_millis(&redis::Value::Array(vec![b("x"), b("1")])),
            None
        );
    }
}
