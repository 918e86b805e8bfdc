//! The TTL table: one row per keyspace, one column per environment, as data.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::Environment;
use crate::keyspace::Keyspace;

const SEC: u64 = 1;
const MIN: u64 = 60;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// `(keyspace, production, development, test)` in seconds: the documented table.
/// For `email-queue` the TTL is per job (how long a job may wait), not per key.
const TABLE: [(Keyspace, u64, u64, u64); 13] = [
    (Keyspace::Session, 24 * HOUR, HOUR, MIN),
    (Keyspace::Cache, HOUR, 5 * MIN, 30 * SEC),
    (Keyspace::RateLimit, 15 * MIN, MIN, 30 * SEC),
    (Keyspace::TwoFactor, 5 * MIN, 2 * MIN, 30 * SEC),
    (Keyspace::EmailVerify, HOUR, 10 * MIN, 30 * SEC),
    (Keyspace::PasswordReset, 30 * MIN, 5 * MIN, MIN),
    (Keyspace::Notifications, 24 * HOUR, HOUR, MIN),
    (Keyspace::Metrics, 5 * MIN, 2 * MIN, 30 * SEC),
    (Keyspace::SecurityEvents, 7 * DAY, 30 * MIN, 2 * MIN),
    (Keyspace::DomainVerify, 24 * HOUR, 30 * MIN, MIN),
    (Keyspace::Audit, 30 * DAY, DAY, 2 * MIN),
    (Keyspace::UserPrefs, 7 * DAY, 7 * DAY, 7 * DAY),
    (Keyspace::EmailQueue, 24 * HOUR, 24 * HOUR, 24 * HOUR),
];

/// The documented TTL of `keyspace` in `environment`, before any override.
pub const fn default_ttl(keyspace: Keyspace, environment: Environment) -> Duration {
    let mut i = 0;
    while i < TABLE.len() {
        let (ks, prod, dev, test) = TABLE[i];
        if ks as u8 == keyspace as u8 {
            let secs = match environment {
                Environment::Production => prod,
                Environment::Development => dev,
                Environment::Test => test,
            };
            return Duration::from_secs(secs);
        }
        i += 1;
    }
    // Unreachable while TABLE has a row per variant (a unit test checks it).
    Duration::from_secs(HOUR)
}

/// The TTLs in force: the documented table for one environment plus overrides.
///
/// ```
/// use std::time::Duration;
/// use aether_redis::{Environment, Keyspace, TtlTable};
/// let ttl = TtlTable::new(Environment::Production)
///     .with_override(Keyspace::Cache, Duration::from_secs(120));
/// assert_eq!(ttl.get(Keyspace::Session), Duration::from_secs(86_400));
/// assert_eq!(ttl.get(Keyspace::Cache), Duration::from_secs(120));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlTable {
    environment: Environment,
    overrides: BTreeMap<Keyspace, Duration>,
}

impl TtlTable {
    /// The documented table for `environment`, without overrides.
    pub fn new(environment: Environment) -> Self {
        TtlTable {
            environment,
            overrides: BTreeMap::new(),
        }
    }

    /// Replaces one row's TTL.
    pub fn with_override(mut self, keyspace: Keyspace, ttl: Duration) -> Self {
        self.overrides.insert(keyspace, ttl);
        self
    }

    /// The environment whose column is used.
    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The TTL for `keyspace`.
    pub fn get(&self, keyspace: Keyspace) -> Duration {
        self.overrides
            .get(&keyspace)
            .copied()
            .unwrap_or_else(|| default_ttl(keyspace, self.environment))
    }

    /// The TTL for `keyspace` in whole milliseconds, as `PX`/`PEXPIRE` take it (at least 1).
    pub fn millis(&self, keyspace: Keyspace) -> u64 {
        u64::try_from(self.get(keyspace).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_keyspace_has_one_row() {
        for ks in Keyspace::ALL {
            assert_eq!(TABLE.iter().filter(|row| row.0 == ks).count(), 1, "{ks}");
        }
    }

    #[test]
    fn table_matches_the_documented_values() {
        use Environment::*;
        let d = |ks, env| default_ttl(ks, env).as_secs();
        assert_eq!(d(Keyspace::Session, Production), 86_400);
        assert_eq!(d(Keyspace::Session, Development), 3_600);
        assert_eq!(d(Keyspace::Session, Test), 60);
        assert_eq!(d(Keyspace::Audit, Production), 30 * 86_400);
        assert_eq!(d(Keyspace::Audit, Development), 86_400);
        assert_eq!(d(Keyspace::SecurityEvents, Development), 1_800);
        assert_eq!(d(Keyspace::UserPrefs, Test), 604_800);
        assert_eq!(d(Keyspace::TwoFactor, Development), 120);
        assert_eq!(d(Keyspace::PasswordReset, Test), 60);
    }
}
