//! The documented keyspace: one enum, one place that builds keys, one validator for the
//! user-supplied parts of a key.
//!
//! Keys are a wire contract shared with services in other languages (see `docs/keyspace.md`).
//! Base keys are the documented names exactly (`session:<id>`, `cache:<endpoint>:<hash>`).
//! A key derived from a base key (a lock, a schedule) is written `{<base>}:<suffix>`, which hashes
//! to the same Cluster slot as `<base>`, so multi-key operations on a record and its derived keys
//! stay in one slot on every topology. Key families used together in one command (the priority
//! lists of a queue) get one shared hash tag in the Cluster layout.

use std::fmt;

use crate::error::{Error, Result};

/// Longest accepted user-supplied key part, in bytes.
pub const MAX_KEY_PART_LEN: usize = 512;

/// Every documented keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Keyspace {
    /// `session:*` — user sessions.
    Session,
    /// `cache:*` — API response cache.
    Cache,
    /// `rate-limit:*` — rate limiter state.
    RateLimit,
    /// `2fa:*` — second-factor codes.
    TwoFactor,
    /// `email-verify:*` — email verification tokens.
    EmailVerify,
    /// `password-reset:*` — password reset tokens.
    PasswordReset,
    /// `notifications:*` — per-user notification lists.
    Notifications,
    /// `metrics:*` — time-bucketed counters.
    Metrics,
    /// `security-events:*` — security event logs.
    SecurityEvents,
    /// `domain-verify:*` — domain verification tokens.
    DomainVerify,
    /// `audit:*` — audit logs.
    Audit,
    /// `email-queue:*` — the email job queue.
    EmailQueue,
    /// `user-prefs:*` — user preferences.
    UserPrefs,
}

impl Keyspace {
    /// Every keyspace, in documentation order.
    pub const ALL: [Keyspace; 13] = [
        Keyspace::Session,
        Keyspace::Cache,
        Keyspace::RateLimit,
        Keyspace::TwoFactor,
        Keyspace::EmailVerify,
        Keyspace::PasswordReset,
        Keyspace::Notifications,
        Keyspace::Metrics,
        Keyspace::SecurityEvents,
        Keyspace::DomainVerify,
        Keyspace::Audit,
        Keyspace::EmailQueue,
        Keyspace::UserPrefs,
    ];

    /// The documented key prefix, without the trailing `:` (e.g. `rate-limit`).
    pub const fn name(self) -> &'static str {
        match self {
            Keyspace::Session => "session",
            Keyspace::Cache => "cache",
            Keyspace::RateLimit => "rate-limit",
            Keyspace::TwoFactor => "2fa",
            Keyspace::EmailVerify => "email-verify",
            Keyspace::PasswordReset => "password-reset",
            Keyspace::Notifications => "notifications",
            Keyspace::Metrics => "metrics",
            Keyspace::SecurityEvents => "security-events",
            Keyspace::DomainVerify => "domain-verify",
            Keyspace::Audit => "audit",
            Keyspace::EmailQueue => "email-queue",
            Keyspace::UserPrefs => "user-prefs",
        }
    }
}

impl fmt::Display for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks one user-supplied key part (an id, an endpoint, a domain).
///
/// Rejected: empty, longer than [`MAX_KEY_PART_LEN`] bytes, `{`/`}` (a hash tag would move the
/// key to another Cluster slot), `:` (the separator: `a:b` + `c` must never alias `a` + `b:c`),
/// glob characters `* ? [ ] \` (they would widen a SCAN pattern), whitespace and control
/// characters.
///
/// ```
/// use aether_redis::keyspace::validate_key_part;
/// assert!(validate_key_part("user id", "u-42").is_ok());
/// assert!(validate_key_part("user id", "u-42}{x").is_err());
/// assert!(validate_key_part("user id", "*").is_err());
/// ```
pub fn validate_key_part<'a>(what: &'static str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if value.len() > MAX_KEY_PART_LEN {
        return Err(Error::invalid(
            what,
            format!(
                "is {} bytes long, the limit is {MAX_KEY_PART_LEN}",
                value.len()
            ),
        ));
    }
    if let Some(bad) = value.chars().find(|c| {
        matches!(c, '{' | '}' | ':' | '*' | '?' | '[' | ']' | '\\')
            || c.is_whitespace()
            || c.is_control()
    }) {
        return Err(Error::invalid(
            what,
            format!("contains the forbidden character {bad:?}"),
        ));
    }
    Ok(value)
}

/// Builds every key the crate writes: the configured prefix, the documented keyspace name and
/// validated parts.
///
/// ```
/// use aether_redis::keyspace::{Keys, Keyspace};
/// let keys = Keys::new("app:", false);
/// assert_eq!(keys.key(Keyspace::Session, &["abc"]).unwrap(), "app:session:abc");
/// assert_eq!(keys.derived("app:cache:users:h", "lock"), "{app:cache:users:h}:lock");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    cluster: bool,
}

impl Keys {
    /// A builder with `prefix` (may be empty) for a Cluster (`cluster = true`) or a
    /// standalone/Sentinel deployment.
    pub fn new(prefix: impl Into<String>, cluster: bool) -> Self {
        Keys {
            prefix: prefix.into(),
            cluster,
        }
    }

    /// The configured prefix (e.g. `vedfolnir:`), possibly empty.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether keys are laid out for Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// `<prefix><keyspace>:<part>:<part>...`, every part validated with [`validate_key_part`].
    pub fn key(&self, keyspace: Keyspace, parts: &[&str]) -> Result<String> {
        for part in parts {
            validate_key_part(keyspace.name(), part)?;
        }
        Ok(self.key_unchecked(keyspace, parts))
    }

    /// Like [`Keys::key`] for parts the crate itself produced (generated ids, fixed words).
    pub(crate) fn key_unchecked(&self, keyspace: Keyspace, parts: &[&str]) -> String {
        let len = self.prefix.len()
            + keyspace.name().len()
            + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.prefix);
        key.push_str(keyspace.name());
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// A key derived from `base`: `{<base>}:<suffix>`, in `base`'s Cluster slot.
    /// `base` must come from this builder (it then holds no braces).
    pub fn derived(&self, base: &str, suffix: &str) -> String {
        format!("{{{base}}}:{suffix}")
    }

    /// A member of a key family that is used together in one command: the documented
    /// `<prefix><keyspace>:<family>:<member>` standalone, `<prefix><keyspace>:{<family>}:<member>`
    /// in Cluster so that the whole family shares one slot. `family` must be validated.
    pub fn family(&self, keyspace: Keyspace, family: &str, member: &str) -> String {
        if self.cluster {
            format!("{}{}:{{{family}}}:{member}", self.prefix, keyspace.name())
        } else {
            format!("{}{}:{family}:{member}", self.prefix, keyspace.name())
        }
    }

    /// A SCAN `MATCH` pattern for every key under `<prefix><keyspace>:<parts>:`. Parts are
    /// validated, so no caller-supplied glob character reaches the pattern; glob characters in
    /// the configured prefix are escaped.
    pub fn scan_pattern(&self, keyspace: Keyspace, parts: &[&str]) -> Result<String> {
        let base = self.key(keyspace, parts)?;
        let mut pattern = String::with_capacity(base.len() + 2);
        for c in base.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str(":*");
        Ok(pattern)
    }
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag or whole key, mod 16384).
pub fn cluster_slot(key: &str) -> u16 {
    const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        bytes[open + 1..]
            .iter()
            .position(|&b| b == b'}')
            .filter(|&len| len > 0)
            .map(|len| &bytes[open + 1..open + 1 + len])
    });
    CRC16.checksum(tagged.unwrap_or(bytes)) % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_spec() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(cluster_slot("foo"), 12182);
        assert_eq!(cluster_slot("123456789"), 12739);
        assert_eq!(
            cluster_slot("{user1000}.following"),
            cluster_slot("user1000")
        );
        // An empty first tag means no tag: the whole key is hashed, not `bar`.
        assert_eq!(cluster_slot("foo{}{bar}"), CRC_WHOLE("foo{}{bar}"));
        assert_ne!(cluster_slot("foo{}{bar}"), cluster_slot("bar"));
        // The tag ends at the first `}` after the first `{`.
        assert_eq!(cluster_slot("foo{{bar}}zap"), CRC_WHOLE("{bar"));
        assert_eq!(cluster_slot("foo{bar}{zap}"), cluster_slot("bar"));
        assert_eq!(cluster_slot("{}x"), CRC_WHOLE("{}x"));
    }

    #[allow(non_snake_case)]
    fn CRC_WHOLE(key: &str) -> u16 {
        crc::Crc::<u16>::new(&crc::CRC_16_XMODEM).checksum(key.as_bytes()) % 16384
    }

    #[test]
    fn derived_keys_share_the_base_slot() {
        let keys = Keys::new("p:", true);
        let base = keys.key(Keyspace::Cache, &["users", "abc"]).unwrap();
        assert_eq!(
            cluster_slot(&keys.derived(&base, "lock")),
            cluster_slot(&base)
        );
    }

    #[test]
    fn hostile_parts_are_rejected() {
        let keys = Keys::new("", false);
        for bad in [
            "", "a{b", "a}b", "a:b", "*", "a?", "[a]", "a\\b", "a b", "a\nb",
        ] {
            assert!(
                matches!(
                    keys.key(Keyspace::Session, &[bad]),
                    Err(Error::InvalidInput { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let long = "x".repeat(MAX_KEY_PART_LEN + 1);
        assert!(keys.key(Keyspace::Session, &[&long]).is_err());
        assert!(keys.key(Keyspace::Session, &[&long[1..]]).is_ok());
    }

    #[test]
    fn family_layout_depends_on_topology() {
        assert_eq!(
            Keys::new("", false).family(Keyspace::EmailQueue, "mail", "high"),
            "email-queue:mail:high"
        );
        assert_eq!(
            Keys::new("", true).family(Keyspace::EmailQueue, "mail", "high"),
            "email-queue:{mail}:high"
        );
    }

    #[test]
    fn scan_patterns_escape_the_prefix() {
        let keys = Keys::new("a*:", false);
        assert_eq!(
            keys.scan_pattern(Keyspace::Cache, &["users"]).unwrap(),
            "a\\*:cache:users:*"
        );
    }
}
