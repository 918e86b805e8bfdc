//! Rate limiting per user and endpoint: named tiers, three algorithms, one round trip per check,
//! decisions on the server's clock, and an explicit policy for when Redis is unavailable.
//!
//! ```no_run
//! # async fn demo(redis: aether_redis::Redis) -> aether_redis::Result<()> {
//! use aether_redis::rate_limit::TierName;
//! let limiter = redis.rate_limiter()?; // tiers from RATE_LIMIT_* / REDIS_RATE_LIMIT_*
//! let decision = limiter.check("u-42", "login", &TierName::Auth).await?;
//! if !decision.is_allowed() {
//!     let headers = decision.headers();
//!     // 429 with headers.retry_after, headers.rate_limit, headers.policy
//! }
//! # Ok(()) }
//! ```
//!
//! # State
//!
//! All state of one `(user, endpoint)` lives in ONE key, `rate-limit:<user>:<endpoint>`, with a
//! TTL, so every check touches one Cluster slot and a user's state is exactly the keys matching
//! `rate-limit:<user>:*`. The layout per algorithm is in `docs/keyspace.md`:
//! - [`Algorithm::FixedWindow`]: a plain integer string, the documented counter that the
//!   TypeScript services `INCR` + `EXPIRE`; checked with `MULTI INCRBY / PEXPIRE NX / PTTL EXEC`,
//!   no scripting needed.
//! - [`Algorithm::Gcra`]: a hash with field `tat` (theoretical arrival time, µs on the server
//!   clock), updated by a script.
//! - [`Algorithm::SlidingWindow`]: a hash with fields `start` (ms), `cur`, `prev`, updated by a
//!   script.
//!
//! Scripts read the time with `TIME` on the server, so client clocks never take part in a
//! decision. No algorithm overwrites another's state: a check that finds the other layout at the
//! key (e.g. a GCRA tier on the TypeScript counter) fails with `WRONGTYPE` ([`Error::Server`])
//! and leaves the key as it was, because that counter may be another service's security limit.
//!
//! # When Redis fails
//!
//! "Denied" is a [`Decision`]; "Redis failed" is an [`Error`]. When Redis is unavailable or
//! times out, the tier's [`FailurePolicy`] applies: [`FailurePolicy::FailOpen`] allows (the
//! decision's [`DecisionSource`] says so), [`FailurePolicy::Local`] decides with an in-process
//! limiter of the same parameters, [`FailurePolicy::FailClosed`] returns the error (answer 503,
//! not 429). "Unavailable" includes a server that refuses the check before running any of it:
//! `READONLY` (a failover), `BUSY`, `OOM`, `MISCONF` and `NOREPLICAS`. A circuit breaker stops
//! calling Redis after consecutive failures, so calls during an outage return at once instead of
//! each paying a timeout.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::Value;

use crate::coalesce::{self, Batch, Coalescer};
use crate::codec;
use crate::config::ConfigError;
use crate::error::{Error, Result};
use crate::keyspace::Keyspace;
use crate::pool::{Connection, Redis};
use crate::script::{LuaScript, ScriptCall};

/// The algorithm a tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// Generic cell rate algorithm: one request every `window / limit`, with up to `burst`
    /// (default `limit`) at once. Over any interval of length `t` from an idle start it admits at
    /// most `burst + ⌊t / period⌋`. Needs scripting.
    #[default]
    Gcra,
    /// The documented counter: at most `limit` hits per window that starts with the first hit.
    /// Denied hits count too (as in the TypeScript services that share the key). No scripting.
    FixedWindow,
    /// Weighted two-window counter: `prev × (unelapsed share of the window) + cur`, smooth at
    /// window edges, without GCRA's burst. Needs scripting.
    SlidingWindow,
}

impl Algorithm {
    fn needs_scripting(self) -> bool {
        !matches!(self, Algorithm::FixedWindow)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Gcra => "gcra",
            Algorithm::FixedWindow => "fixed-window",
            Algorithm::SlidingWindow => "sliding-window",
        })
    }
}

/// What a tier does when Redis is unavailable or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Allow; the decision's source is [`DecisionSource::FailOpen`].
    FailOpen,
    /// Return the error ([`Error::Unavailable`] / [`Error::Timeout`]); never a denial.
    FailClosed,
    /// Decide with an in-process limiter of the same algorithm and parameters; the decision's
    /// source is [`DecisionSource::Local`]. Each process limits on its own while Redis is down.
    Local,
}

/// A tier's name: the six documented tiers, the default tier, or a custom one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TierName {
    /// `RATE_LIMIT_GENERAL` (120,60; fails open).
    General,
    /// `RATE_LIMIT_AUTH` (30,60; fails closed).
    Auth,
    /// `RATE_LIMIT_SENSITIVE` (10,60; fails closed).
    Sensitive,
    /// `RATE_LIMIT_ADMIN` (300,60; fails open).
    Admin,
    /// `RATE_LIMIT_MFA` (5,60; fails closed).
    Mfa,
    /// `RATE_LIMIT_FINANCIAL` (20,60; fails closed).
    Financial,
    /// `REDIS_RATE_LIMIT_MAX` per `REDIS_RATE_LIMIT_WINDOW` (100 per the TTL table's rate-limit
    /// row; fails open).
    Default,
    /// A tier added with [`RateLimiterConfig::tier`].
    Custom(String),
}

impl TierName {
    /// The name used in headers (`"auth"`, `"default"`, the custom name).
    pub fn as_str(&self) -> &str {
        match self {
            TierName::General => "general",
            TierName::Auth => "auth",
            TierName::Sensitive => "sensitive",
            TierName::Admin => "admin",
            TierName::Mfa => "mfa",
            TierName::Financial => "financial",
            TierName::Default => "default",
            TierName::Custom(name) => name,
        }
    }

    /// A custom tier's name. It cannot fail, so it is not checked here: an invalid name (see
    /// [`TierName::try_custom`]) is refused when the limiter is built.
    pub fn custom(name: impl Into<String>) -> Self {
        TierName::Custom(name.into())
    }

    /// A custom tier's name, checked now: 1..=64 characters of `A–Z a–z 0–9 _ . -`, and not a
    /// built-in name (`auth` as a custom tier would silently fail open). The name goes into
    /// `RateLimit` headers, where this set needs no escaping. [`Error::InvalidInput`] otherwise.
    pub fn try_custom(name: impl Into<String>) -> Result<Self> {
        let name = TierName::Custom(name.into());
        name.validate()?;
        Ok(name)
    }

    /// What a tier registered under this name does when Redis is unavailable, unless its
    /// [`Tier::with_failure_policy`] says otherwise: closed for `auth`, `mfa`, `sensitive` and
    /// `financial`, open for the others and for custom names.
    pub fn default_failure_policy(&self) -> FailurePolicy {
        match self {
            TierName::Auth | TierName::Mfa | TierName::Sensitive | TierName::Financial => {
                FailurePolicy::FailClosed
            }
            _ => FailurePolicy::FailOpen,
        }
    }

    fn validate(&self) -> Result<()> {
        let TierName::Custom(name) = self else {
            return Ok(());
        };
        let bad = |reason: &str| {
            Err(Error::invalid(
                "rate-limit tier name",
                format!("{name:?} {reason}"),
            ))
        };
        if name.is_empty() || name.len() > MAX_TIER_NAME {
            return bad("is not 1..=64 characters long");
        }
        if !name.bytes().all(tier_name_byte) {
            return bad("has a character outside A-Z a-z 0-9 _ . -");
        }
        if BUILT_IN
            .iter()
            .any(|b| b.as_str().eq_ignore_ascii_case(name))
        {
            return bad("is a built-in tier's name: use its TierName variant");
        }
        Ok(())
    }
}

/// Longest custom tier name.
const MAX_TIER_NAME: usize = 64;
/// The non-custom variants, whose names a custom name may not take.
const BUILT_IN: [TierName; 7] = [
    TierName::General,
    TierName::Auth,
    TierName::Sensitive,
    TierName::Admin,
    TierName::Mfa,
    TierName::Financial,
    TierName::Default,
];

fn tier_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

impl fmt::Display for TierName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The six documented tiers: name, variable, default limit, default window (s). Their failure
/// policies are [`TierName::default_failure_policy`].
const DOCUMENTED: [(TierName, &str, u64, u64); 6] = [
    (TierName::General, "RATE_LIMIT_GENERAL", 120, 60),
    (TierName::Auth, "RATE_LIMIT_AUTH", 30, 60),
    (TierName::Sensitive, "RATE_LIMIT_SENSITIVE", 10, 60),
    (TierName::Admin, "RATE_LIMIT_ADMIN", 300, 60),
    (TierName::Mfa, "RATE_LIMIT_MFA", 5, 60),
    (TierName::Financial, "RATE_LIMIT_FINANCIAL", 20, 60),
];

/// One tier: `limit` per `window`, an algorithm and a failure policy.
///
/// ```
/// use std::time::Duration;
/// use aether_redis::rate_limit::{Algorithm, FailurePolicy, Tier};
/// let uploads = Tier::new(10, Duration::from_secs(3600))
///     .unwrap()
///     .with_algorithm(Algorithm::SlidingWindow)
///     .with_failure_policy(FailurePolicy::Local);
/// assert_eq!(uploads.limit(), 10);
/// assert!(Tier::new(0, Duration::from_secs(1)).is_err());
/// assert!(Tier::new(5, Duration::from_micros(1500)).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    limit: u64,
    window: Duration,
    burst: Option<u64>,
    algorithm: Algorithm,
    /// `None` until chosen: registration then fills in the name's default, so replacing `auth`
    /// with a plain `Tier::new(..)` keeps it failing closed.
    failure: Option<FailurePolicy>,
}

/// Longest accepted window (one year): keeps every µs computation far inside exact integers.
const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest accepted limit or burst.
const MAX_LIMIT: u64 = 1_000_000_000;

/// Which bound of [`Tier::new`] a tier breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TierBound {
    Limit,
    Window,
    /// `window / limit` under 1 µs.
    Rate,
}

/// [`Tier::new`]'s bounds, shared with the configuration so that the environment and builder
/// refuse the same values, naming their variable.
pub(crate) fn tier_bounds(limit: u64, window: Duration) -> Result<(), (TierBound, String)> {
    if limit == 0 || limit > MAX_LIMIT {
        return Err((
            TierBound::Limit,
            format!("limit {limit} is not within 1..={MAX_LIMIT}"),
        ));
    }
    if window < Duration::from_millis(1) || window > MAX_WINDOW {
        return Err((
            TierBound::Window,
            format!("{window:?} is not within 1 ms..=366 days"),
        ));
    }
    // The window algorithms count in whole milliseconds: 1.5 ms would run as 1 ms and admit
    // half as much again as configured.
    if !window.subsec_nanos().is_multiple_of(1_000_000) {
        return Err((
            TierBound::Window,
            format!("{window:?} is not a whole number of milliseconds"),
        ));
    }
    if window.as_micros() < u128::from(limit) {
        return Err((
            TierBound::Rate,
            format!("{limit} per {window:?} is more than one per microsecond"),
        ));
    }
    Ok(())
}

impl Tier {
    /// `limit` per `window`, GCRA. `limit` must be 1..=10⁹ and `window` 1 ms to one year in
    /// whole milliseconds, and `window / limit` at least 1 µs. Without [`Tier::with_failure_policy`] the tier takes the
    /// default of the name it is registered under ([`TierName::default_failure_policy`]).
    pub fn new(limit: u64, window: Duration) -> Result<Self> {
        tier_bounds(limit, window).map_err(|(bound, reason)| {
            let what = match bound {
                TierBound::Window => "rate limit window",
                TierBound::Limit | TierBound::Rate => "rate limit",
            };
            Error::invalid(what, reason)
        })?;
        Ok(Tier {
            limit,
            window,
            burst: None,
            algorithm: Algorithm::Gcra,
            failure: None,
        })
    }

    /// Chooses the algorithm.
    #[must_use]
    pub fn with_algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Chooses the failure policy, overriding the default of the name it is registered under.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure = Some(policy);
        self
    }

    /// GCRA only: how many requests may arrive at once (default `limit`; clamped to 1..=10⁹).
    #[must_use]
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst.clamp(1, MAX_LIMIT));
        self
    }

    /// Requests per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The failure policy: the one chosen, else (once registered) its name's default. A tier
    /// not yet registered and without a chosen policy reports [`FailurePolicy::FailOpen`], the
    /// default of custom names.
    pub fn failure_policy(&self) -> FailurePolicy {
        self.failure.unwrap_or(FailurePolicy::FailOpen)
    }

    /// GCRA burst (the limit unless set).
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.limit)
    }

    /// GCRA emission interval in µs, rounded up so the steady rate never exceeds the limit.
    fn period_us(&self) -> u64 {
        let window = u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX);
        window.div_ceil(self.limit).max(1)
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Scripts compute in Lua doubles: keep every intermediate an exact integer (< 2^52).
    fn check_exact(&self, name: &TierName) -> Result<()> {
        const EXACT: u128 = 1 << 52;
        let span = match self.algorithm {
            Algorithm::Gcra => u128::from(self.burst()) * u128::from(self.period_us()),
            Algorithm::SlidingWindow => u128::from(self.limit) * u128::from(self.window_ms()),
            Algorithm::FixedWindow => 0,
        };
        if span >= EXACT {
            return Err(Error::invalid(
                "rate-limit tier",
                format!("{name}: limit/burst × window is too large to compute exactly"),
            ));
        }
        Ok(())
    }

    /// The most one check may cost and still be admitted some day.
    fn capacity(&self) -> u64 {
        match self.algorithm {
            Algorithm::Gcra => self.burst(),
            _ => self.limit,
        }
    }
}

/// Parses a `limit,window_secs` tier variable, within [`Tier::new`]'s bounds.
fn parse_tier(variable: &str, value: &str) -> Result<(u64, Duration), ConfigError> {
    let bad = |reason: &str| ConfigError::invalid(variable, value, reason);
    let Some((limit, window)) = value.split_once(',') else {
        return Err(bad("expected `limit,window_secs`, e.g. 30,60"));
    };
    // Digits only: `u64::from_str` would also take a sign (`+5`).
    let number = |part: &str| {
        let part = part.trim();
        (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<u64>().ok())
            .flatten()
    };
    let limit = number(limit).ok_or_else(|| bad("the limit is not a whole number"))?;
    let window =
        number(window).ok_or_else(|| bad("the window is not a whole number of seconds"))?;
    if window == 0 || window > MAX_WINDOW.as_secs() {
        return Err(bad("the window must be within 1..=31622400 seconds"));
    }
    let window = Duration::from_secs(window);
    tier_bounds(limit, window).map_err(|(_, reason)| bad(&reason))?;
    Ok((limit, window))
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerSettings {
    /// Consecutive failed checks that open the breaker (default 3); checks sent together in
    /// one call fail together.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one trial call (default 2 s, at most one hour).
    pub cooldown: Duration,
}

/// Longest breaker cooldown: a breaker must try Redis again some day, and `Instant + cooldown`
/// must not overflow.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

impl BreakerSettings {
    /// Opens after `failure_threshold` consecutive failures (at least 1) for `cooldown` (at most
    /// one hour).
    pub fn new(failure_threshold: u32, cooldown: Duration) -> Self {
        BreakerSettings {
            failure_threshold: failure_threshold.max(1),
            cooldown: cooldown.min(MAX_COOLDOWN),
        }
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 3,
            cooldown: Duration::from_secs(2),
        }
    }
}

/// The tiers and settings of a [`RateLimiter`].
///
/// ```
/// use std::time::Duration;
/// use aether_redis::rate_limit::{RateLimiterConfig, TierName};
/// let vars = [("RATE_LIMIT_AUTH", "50,30")];
/// let config = RateLimiterConfig::from_lookup(|k| {
///     vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
/// })
/// .unwrap();
/// assert_eq!(config.get(&TierName::Auth).unwrap().limit(), 50);
/// assert_eq!(config.get(&TierName::Mfa).unwrap().limit(), 5);
///
/// let err = RateLimiterConfig::from_lookup(|k| (k == "RATE_LIMIT_MFA").then(|| "0,60".into()));
/// assert_eq!(err.unwrap_err().variable(), "RATE_LIMIT_MFA");
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiterConfig {
    tiers: HashMap<TierName, Tier>,
    timeout: Duration,
    breaker: BreakerSettings,
    local_capacity: usize,
    clock_offset_ms: i64,
    default_algorithm: Algorithm,
}

impl Default for RateLimiterConfig {
    /// The documented tiers with their default values (the default tier is added from the
    /// connection's configuration when the limiter is built).
    fn default() -> Self {
        let tiers = DOCUMENTED
            .iter()
            .map(|(name, _, limit, window)| {
                (
                    name.clone(),
                    Tier {
                        limit: *limit,
                        window: Duration::from_secs(*window),
                        burst: None,
                        algorithm: Algorithm::Gcra,
                        failure: Some(name.default_failure_policy()),
                    },
                )
            })
            .collect();
        RateLimiterConfig {
            tiers,
            timeout: Duration::from_millis(500),
            breaker: BreakerSettings::default(),
            local_capacity: 100_000,
            clock_offset_ms: 0,
            default_algorithm: Algorithm::Gcra,
        }
    }
}

impl RateLimiterConfig {
    /// Reads `RATE_LIMIT_GENERAL`, `_AUTH`, `_SENSITIVE`, `_ADMIN`, `_MFA`, `_FINANCIAL`
    /// (`limit,window_secs`) from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`RateLimiterConfig::from_env`], reading variables through `lookup`. A malformed
    /// value (`"120"`, `"0,60"`, `"a,b"`) is a [`ConfigError`] naming the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        for (name, variable, ..) in &DOCUMENTED {
            if let Some(value) = lookup(variable).filter(|v| !v.trim().is_empty()) {
                let (limit, window) = parse_tier(variable, &value)?;
                if let Some(tier) = config.tiers.get_mut(name) {
                    tier.limit = limit;
                    tier.window = window;
                }
            }
        }
        Ok(config)
    }

    /// Adds or replaces a tier (custom tiers, or a documented one with another algorithm or
    /// policy). A tier without [`Tier::with_failure_policy`] takes the name's default
    /// ([`TierName::default_failure_policy`]): `auth` stays fail-closed. A custom name is checked
    /// when the limiter is built (see [`TierName::try_custom`]).
    #[must_use]
    pub fn tier(mut self, name: TierName, mut tier: Tier) -> Self {
        tier.failure.get_or_insert(name.default_failure_policy());
        self.tiers.insert(name, tier);
        self
    }

    /// Sets the algorithm of every tier configured so far and of the default tier added at
    /// build time (e.g. [`Algorithm::FixedWindow`] on a server without scripting).
    #[must_use]
    pub fn algorithm_for_all(mut self, algorithm: Algorithm) -> Self {
        self.default_algorithm = algorithm;
        for tier in self.tiers.values_mut() {
            tier.algorithm = algorithm;
        }
        self
    }

    /// A tier, if configured.
    pub fn get(&self, name: &TierName) -> Option<&Tier> {
        self.tiers.get(name)
    }

    /// Deadline of one Redis call of the limiter (default 500 ms, capped at the connection's
    /// response timeout); past it the failure policy applies. A missed deadline does not
    /// condemn the shared connection: other repositories keep using it.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Circuit breaker settings.
    #[must_use]
    pub fn breaker(mut self, breaker: BreakerSettings) -> Self {
        self.breaker = BreakerSettings::new(breaker.failure_threshold, breaker.cooldown);
        self
    }

    /// How many `(user, endpoint)` states the local fallback keeps (default 100 000). When it
    /// is full of live states, new keys are denied locally rather than evicting live ones.
    #[must_use]
    pub fn local_capacity(mut self, capacity: usize) -> Self {
        self.local_capacity = capacity.max(1);
        self
    }

    /// Shifts every clock reading of this client by `offset_ms` (tests simulate skewed clients
    /// with it; decisions made by Redis do not depend on it).
    #[doc(hidden)]
    #[must_use]
    pub fn with_clock_offset(mut self, offset_ms: i64) -> Self {
        self.clock_offset_ms = offset_ms;
        self
    }
}

/// Who made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecisionSource {
    /// Redis, on the server's clock.
    Redis,
    /// The in-process limiter, because Redis was unavailable ([`FailurePolicy::Local`]).
    Local,
    /// Nobody: Redis was unavailable and the tier fails open. Counts are not known; `remaining`
    /// is reported as the full limit.
    FailOpen,
}

/// The answer of a check or a peek.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request is admitted (for a peek: whether a request of cost 1 would be).
    pub allowed: bool,
    /// The tier's limit per window.
    pub limit: u64,
    /// Requests of cost 1 that would still be admitted right now.
    pub remaining: u64,
    /// Until the limiter for this key is back to its full quota.
    pub reset_after: Duration,
    /// When denied: how long until a request of the same cost can be admitted (`None` when
    /// allowed).
    pub retry_after: Option<Duration>,
    /// Who decided.
    pub source: DecisionSource,
    /// The tier's name (for `RateLimit-Policy`).
    pub tier: TierName,
    /// The tier's window.
    pub window: Duration,
    /// GCRA tiers: the requests admitted at once from an idle state (`None` for the window
    /// algorithms).
    pub burst: Option<u64>,
}

/// Header values for an HTTP response, from [`Decision::headers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitHeaders {
    /// `RateLimit-Policy` (IETF draft-ietf-httpapi-ratelimit-headers):
    /// `"<tier>";q=<limit>;w=<secs>`, plus `;aether-burst=<burst>` for GCRA tiers (see
    /// [`Decision::headers`]).
    pub policy: String,
    /// `RateLimit`: `"<tier>";r=<remaining>;t=<secs until reset>`.
    pub rate_limit: String,
    /// `Retry-After` in whole seconds (rounded up), only when denied.
    pub retry_after: Option<String>,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Decision {
    /// True when admitted.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// True when decided without Redis (local fallback or fail-open).
    pub fn is_degraded(&self) -> bool {
        self.source != DecisionSource::Redis
    }

    /// `RateLimit-Policy`, `RateLimit` and (when denied) `Retry-After` values.
    ///
    /// `q` per `w` is the tier's sustained quota. The fixed window admits at most `q` per window
    /// (each window starts with its first hit) and the sliding window at most `q` per window
    /// aligned on multiples of `w` on the server clock. GCRA has no per-window cap: it admits
    /// `burst` at once and one more every `w / q`, so at most `burst + ⌊t × q / w⌋` in any `t`,
    /// up to `burst + q` (2 × `q` with the default burst) in the first window from idle. The
    /// draft mandates no algorithm and defines no burst parameter, but lets an implementation add
    /// its own, vendor-prefixed, which clients that do not know it ignore; so GCRA policies say
    /// `;aether-burst=<burst>` rather than a `q` that would misstate the sustained rate.
    ///
    /// For a denied GCRA check of the `auth` tier (30 per minute, burst 30) whose next token
    /// comes in 1.5 s and whose bucket is full again in 11.2 s, the headers read (seconds
    /// rounded up):
    ///
    /// ```text
    /// RateLimit-Policy: "auth";q=30;w=60;aether-burst=30
    /// RateLimit: "auth";r=0;t=12
    /// Retry-After: 2
    /// ```
    ///
    /// (`headers_follow_the_draft` in this module's tests builds such decisions and checks
    /// every field.)
    pub fn headers(&self) -> RateLimitHeaders {
        // Registered names are validated tokens; filtering keeps a hand-edited `tier` from
        // breaking out of the quoted string.
        let name: String = self
            .tier
            .as_str()
            .chars()
            .filter(|c| c.is_ascii() && tier_name_byte(*c as u8))
            .collect();
        let burst = self
            .burst
            .map(|b| format!(";aether-burst={b}"))
            .unwrap_or_default();
        RateLimitHeaders {
            policy: format!(
                "\"{name}\";q={};w={}{burst}",
                self.limit,
                ceil_secs(self.window).max(1)
            ),
            rate_limit: format!(
                "\"{name}\";r={};t={}",
                self.remaining,
                ceil_secs(self.reset_after)
            ),
            retry_after: self
                .retry_after
                .filter(|_| !self.allowed)
                .map(|d| ceil_secs(d).max(1).to_string()),
        }
    }
}

/// State of the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go to Redis.
    Closed,
    /// Redis is not called; the failure policy applies at once.
    Open,
    /// One trial call is let through; its outcome closes or reopens the breaker.
    HalfOpen,
}

/// Counters of a [`RateLimiter`] (since it was built; shared by its clones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LimiterStats {
    /// Calls sent to Redis (a batch of checks is one call).
    pub redis_calls: u64,
    /// Of those, the ones that failed as unavailable or timed out.
    pub redis_failures: u64,
    /// Checks answered without trying Redis because the breaker was open.
    pub short_circuited: u64,
    /// Decisions made by the local limiter.
    pub local_decisions: u64,
    /// Decisions that failed open.
    pub fail_open_decisions: u64,
    /// Checks sent to Redis in one call with other concurrent checks on the same key and tier.
    pub batched_checks: u64,
}

#[derive(Default)]
struct Counters {
    redis_calls: AtomicU64,
    redis_failures: AtomicU64,
    short_circuited: AtomicU64,
    local_decisions: AtomicU64,
    fail_open_decisions: AtomicU64,
    batched_checks: AtomicU64,
}

struct Breaker {
    settings: BreakerSettings,
    /// True while no failure is counted and the breaker is closed: then a call needs neither the
    /// lock nor the clock, which keeps the breaker off the hot path of a healthy limiter.
    healthy: AtomicBool,
    state: Mutex<BreakerInner>,
}

struct BreakerInner {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

/// Releases a half-open trial when its call ends without a verdict (including cancellation).
struct TrialGuard<'a>(&'a Breaker);

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        self.0.release_trial();
    }
}

/// What the breaker lets a call do.
enum Permit {
    Call,
    Trial,
    Reject,
}

impl Breaker {
    fn new(settings: BreakerSettings) -> Self {
        Breaker {
            // The fields are public: clamp again.
            settings: BreakerSettings::new(settings.failure_threshold, settings.cooldown),
            healthy: AtomicBool::new(true),
            state: Mutex::new(BreakerInner {
                consecutive_failures: 0,
                open_until: None,
                trial_in_flight: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        // A panic while holding this lock cannot leave it inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn permit(&self) -> Permit {
        if self.healthy.load(Ordering::Acquire) {
            return Permit::Call;
        }
        self.permit_at(Instant::now())
    }

    fn permit_at(&self, now: Instant) -> Permit {
        let mut s = self.lock();
        match s.open_until {
            None => Permit::Call,
            Some(until) if now < until || s.trial_in_flight => Permit::Reject,
            Some(_) => {
                s.trial_in_flight = true;
                Permit::Trial
            }
        }
    }

    fn success(&self) {
        if self.healthy.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        s.consecutive_failures = 0;
        s.open_until = None;
        s.trial_in_flight = false;
        self.healthy.store(true, Ordering::Release);
    }

    /// `checks` consecutive checks failed in one call (a batch fails as its checks would have
    /// one by one, so the threshold counts checks, not calls).
    fn failure(&self, now: Instant, trial: bool, checks: usize) {
        let mut s = self.lock();
        self.healthy.store(false, Ordering::Release);
        let checks = u32::try_from(checks).unwrap_or(u32::MAX);
        s.consecutive_failures = s.consecutive_failures.saturating_add(checks);
        if trial || s.consecutive_failures >= self.settings.failure_threshold {
            // The cooldown is clamped, so this only falls back at the end of `Instant`'s range:
            // then a trial at once beats a breaker that never closes.
            s.open_until = Some(now.checked_add(self.settings.cooldown).unwrap_or(now));
        }
        if trial {
            s.trial_in_flight = false;
        }
    }

    /// A trial call that ended with neither success nor an availability failure, or was
    /// cancelled.
    fn release_trial(&self) {
        self.lock().trial_in_flight = false;
    }

    fn state(&self, now: Instant) -> BreakerState {
        let s = self.lock();
        match s.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

/// The in-process limiter used by [`FailurePolicy::Local`]: the same algorithms on this
/// process's monotonic clock.
struct LocalLimiter {
    states: Mutex<HashMap<String, LocalState>>,
    capacity: usize,
}

#[derive(Clone, Copy)]
enum LocalState {
    /// GCRA: theoretical arrival time, µs on the local clock.
    Gcra { tat: i64 },
    /// Fixed window: hits and the window's end (µs).
    Fixed { count: u64, ends: i64 },
    /// Sliding window: current window start (ms), counts.
    Sliding {
        start: i64,
        cur: u64,
        prev: u64,
        window_ms: i64,
    },
}

impl LocalState {
    /// When the state is back to "no state" (µs).
    fn expires(&self) -> i64 {
        match *self {
            LocalState::Gcra { tat } => tat,
            LocalState::Fixed { ends, .. } => ends,
            LocalState::Sliding {
                start, window_ms, ..
            } => (start + 2 * window_ms) * 1000,
        }
    }
}

/// The outcome of one algorithm step, before it becomes a [`Decision`].
pub(crate) struct Outcome {
    allowed: bool,
    remaining: u64,
    reset_after_us: i64,
    retry_after_us: i64,
}

fn us(d: i64) -> Duration {
    Duration::from_micros(u64::try_from(d).unwrap_or(0))
}

/// GCRA step, shared in meaning with `GCRA_SRC`.
fn gcra_step(
    tat: Option<i64>,
    now: i64,
    period: i64,
    burst: i64,
    cost: i64,
    consume: bool,
) -> (Outcome, i64) {
    let tat = tat.filter(|t| *t > now).unwrap_or(now);
    let tolerance = burst * period;
    let new_tat = tat + cost * period;
    let allow_at = new_tat - tolerance;
    if now < allow_at {
        let remaining = (tolerance - (tat - now)) / period;
        return (
            Outcome {
                allowed: false,
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset_after_us: tat - now,
                retry_after_us: allow_at - now,
            },
            tat,
        );
    }
    let after = if consume { new_tat } else { tat };
    let remaining = (tolerance - (after - now)) / period;
    (
        Outcome {
            allowed: true,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset_after_us: after - now,
            retry_after_us: 0,
        },
        after,
    )
}

/// Sliding-window step on `(start, cur, prev)` rolled to `now_ms`; shared in meaning with
/// `SLIDING_SRC`.
fn sliding_step(
    state: Option<(i64, u64, u64)>,
    now_ms: i64,
    window: i64,
    limit: u64,
    cost: u64,
    consume: bool,
) -> (Outcome, (i64, u64, u64)) {
    let start = now_ms - now_ms.rem_euclid(window);
    let (cur, prev) = match state {
        Some((s, cur, prev)) if s == start => (cur, prev),
        Some((s, cur, _)) if s == start - window => (0, cur),
        _ => (0, 0),
    };
    let elapsed = now_ms - start;
    // estimate = prev * (window - elapsed) / window + cur, compared without rounding:
    // admitted iff prev * (window - elapsed) + (cur + cost) * window <= limit * window.
    let w = window as u128;
    let weighted_prev = u128::from(prev) * (window - elapsed) as u128;
    let fits = |extra: u64| weighted_prev + u128::from(cur + extra) * w <= u128::from(limit) * w;
    let allowed = fits(cost);
    let (cur_after, used) = if allowed && consume {
        (cur + cost, weighted_prev + u128::from(cur + cost) * w)
    } else {
        (cur, weighted_prev + u128::from(cur) * w)
    };
    let capacity = u128::from(limit) * w;
    let remaining = u64::try_from(capacity.saturating_sub(used) / w).unwrap_or(0);
    let reset_ms = if cur_after > 0 {
        start + 2 * window - now_ms
    } else if prev > 0 {
        start + window - now_ms
    } else {
        0
    };
    let retry_ms = if allowed {
        0
    } else if cur + cost <= limit && prev > 0 {
        // Wait until prev's weight has decayed enough in this window.
        let need = u128::from(limit - cur - cost) * w; // prev * (window - t) <= need
        let t = window as u128 - need / u128::from(prev);
        (t as i64 - elapsed).max(1)
    } else if cost <= limit {
        // In the next window cur becomes prev: cur * (window - t) + cost * window <= limit * window.
        let need = u128::from(limit - cost) * w;
        let t = if cur == 0 {
            0
        } else {
            (w - (need / u128::from(cur)).min(w)) as i64
        };
        start + window - now_ms + t
    } else {
        window
    };
    (
        Outcome {
            allowed,
            remaining,
            reset_after_us: reset_ms * 1000,
            retry_after_us: retry_ms * 1000,
        },
        (start, cur_after, prev),
    )
}

impl LocalLimiter {
    fn new(capacity: usize) -> Self {
        LocalLimiter {
            states: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn decide(&self, key: &str, tier: &Tier, cost: u64, consume: bool, now_us: i64) -> Outcome {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let current = states.get(key).copied().filter(|s| s.expires() > now_us);
        if current.is_none() && consume && states.len() >= self.capacity {
            states.retain(|_, s| s.expires() > now_us);
            if states.len() >= self.capacity {
                return Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_after_us: 0,
                    retry_after_us: i64::try_from(tier.window.as_micros()).unwrap_or(i64::MAX),
                };
            }
        }
        let (outcome, next) = match tier.algorithm {
            Algorithm::Gcra => {
                let tat = match current {
                    Some(LocalState::Gcra { tat }) => Some(tat),
                    _ => None,
                };
                let (o, tat) = gcra_step(
                    tat,
                    now_us,
                    tier.period_us() as i64,
                    tier.burst() as i64,
                    cost as i64,
                    consume,
                );
                (o, LocalState::Gcra { tat })
            }
            Algorithm::FixedWindow => {
                let window = i64::try_from(tier.window.as_micros()).unwrap_or(i64::MAX);
                let (count, ends) = match current {
                    Some(LocalState::Fixed { count, ends }) => (count, ends),
                    _ => (0, now_us + window),
                };
                let after = if consume { count + cost } else { count };
                let probe = if consume { after } else { count + cost };
                let allowed = probe <= tier.limit;
                (
                    Outcome {
                        allowed,
                        remaining: tier.limit.saturating_sub(after),
                        reset_after_us: ends - now_us,
                        retry_after_us: if allowed { 0 } else { ends - now_us },
                    },
                    LocalState::Fixed { count: after, ends },
                )
            }
            Algorithm::SlidingWindow => {
                let state = match current {
                    Some(LocalState::Sliding {
                        start, cur, prev, ..
                    }) => Some((start, cur, prev)),
                    _ => None,
                };
                let (o, (start, cur, prev)) = sliding_step(
                    state,
                    now_us.div_euclid(1000),
                    tier.window_ms() as i64,
                    tier.limit,
                    cost,
                    consume,
                );
                (
                    o,
                    LocalState::Sliding {
                        start,
                        cur,
                        prev,
                        window_ms: tier.window_ms() as i64,
                    },
                )
            }
        };
        if consume && (outcome.allowed || tier.algorithm == Algorithm::FixedWindow) {
            states.insert(key.to_owned(), next);
        }
        outcome
    }

    fn forget(&self, key: &str) {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// GCRA on the server clock. KEYS[1] = state hash; ARGV = period µs, burst, consume (1/0), then
/// one cost per request: the requests of a batch are decided in order at one instant. Returns
/// {allowed, remaining, reset_after µs, retry_after µs} per request, flattened.
const GCRA_SRC: &str = r#"
local key = KEYS[1]
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local consume = ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- A plain HMGET: on another algorithm's counter (which other services may share as a security
-- limit) it raises WRONGTYPE and the script stops before writing anything. A sliding-window
-- state (a hash with `start`) is refused too: taking it for "no state" would cut its TTL to
-- one period and reset that tier's count mid-window.
local state = redis.call('HMGET', key, 'tat', 'start')
if state[2] then
  return redis.error_reply('WRONGTYPE rate-limit: the key holds sliding-window state, not GCRA')
end
local tat = tonumber(state[1])
-- Garbled state (not a finite number: Lua's tonumber also takes `inf`, `nan` and hex) is
-- refused, not read as "no state", which would reset the limit.
if state[1] and (tat == nil or tat ~= tat or tat == math.huge or tat == -math.huge) then
  return redis.error_reply('ERR rate-limit: garbled state: tat is not a finite number')
end
-- No tier reaches 2^52 µs (about 142 years) ahead; such a tat would deny for ever, with
-- replies past what the integers carry.
if tat and tat - now > 4503599627370496 then
  return redis.error_reply('ERR rate-limit: garbled state: tat is centuries ahead')
end
if tat == nil or tat < now then tat = now end
local tolerance = burst * period
local out = {}
local admitted = false
for i = 4, #ARGV do
  local new_tat = tat + tonumber(ARGV[i]) * period
  local allow_at = new_tat - tolerance
  local n = #out
  if now < allow_at then
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] =
      0, math.floor((tolerance - (tat - now)) / period), tat - now, allow_at - now
  elseif not consume then
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] =
      1, math.floor((tolerance - (tat - now)) / period), tat - now, 0
  else
    tat = new_tat
    admitted = true
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] =
      1, math.floor((tolerance - (tat - now)) / period), tat - now, 0
  end
end
if admitted then
  redis.call('HSET', key, 'tat', string.format('%.0f', tat))
  redis.call('PEXPIRE', key, math.max(1, math.ceil((tat - now) / 1000)))
end
return out
"#;

/// Weighted two-window counter on the server clock. KEYS[1] = state hash; ARGV = window ms,
/// limit, consume (1/0), then one cost per request, decided in order at one instant. Returns
/// {allowed, remaining, reset_after µs, retry_after µs} per request, flattened.
const SLIDING_SRC: &str = r#"
local key = KEYS[1]
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local consume = ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start = now - (now % window)
local cur, prev = 0, 0
-- A plain HMGET, as in the GCRA script: WRONGTYPE on another algorithm's counter, nothing written.
local s = redis.call('HMGET', key, 'start', 'cur', 'prev', 'tat')
if s[4] then
  return redis.error_reply('WRONGTYPE rate-limit: the key holds GCRA state, not a sliding window')
end
-- Garbled state is refused, as in the GCRA script.
for i, name in ipairs({ 'start', 'cur', 'prev' }) do
  local v = tonumber(s[i])
  if s[i] and (v == nil or v ~= v or v == math.huge or v == -math.huge or v < 0) then
    return redis.error_reply('ERR rate-limit: garbled state: ' .. name
      .. ' is not a finite non-negative number')
  end
end
local s_start = tonumber(s[1])
if s_start == start then
  cur = tonumber(s[2]) or 0
  prev = tonumber(s[3]) or 0
elseif s_start == start - window then
  prev = tonumber(s[2]) or 0
end
local elapsed = now - start
local weighted_prev = prev * (window - elapsed)
local out = {}
local admitted = false
for i = 4, #ARGV do
  local cost = tonumber(ARGV[i])
  local allowed = weighted_prev + (cur + cost) * window <= limit * window
  local cur_after = cur
  if allowed and consume then cur_after = cur + cost end
  local used = weighted_prev + cur_after * window
  local remaining = math.floor(math.max(0, limit * window - used) / window)
  local reset = 0
  if cur_after > 0 then reset = start + 2 * window - now elseif prev > 0 then reset = start + window - now end
  local retry = 0
  if not allowed then
    if cur + cost <= limit and prev > 0 then
      local need = (limit - cur - cost) * window
      retry = math.max(1, window - math.floor(need / prev) - elapsed)
    elseif cur > 0 then
      local need = (limit - cost) * window
      retry = start + window - now + (window - math.min(window, math.floor(need / cur)))
    else
      retry = start + window - now
    end
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] =
    allowed and 1 or 0, remaining, reset * 1000, retry * 1000
  if cur_after ~= cur then
    cur = cur_after
    admitted = true
  end
end
if admitted then
  redis.call('HSET', key, 'start', string.format('%.0f', start), 'cur', cur, 'prev', prev)
  redis.call('PEXPIRE', key, math.max(1, start + 2 * window - now))
end
return out
"#;

static GCRA: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new("rate_limit_gcra", GCRA_SRC));
static SLIDING: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("rate_limit_sliding", SLIDING_SRC));

/// The GCRA script (for benchmarks and services that want to send it themselves).
#[doc(hidden)]
pub fn gcra_script() -> &'static LuaScript {
    &GCRA
}

/// The sliding-window script.
#[doc(hidden)]
pub fn sliding_script() -> &'static LuaScript {
    &SLIDING
}

/// Operation name in errors and logs of a check or peek.
const CHECK: &str = "rate_limit.check";

struct Inner {
    redis: Redis,
    tiers: HashMap<TierName, Tier>,
    timeout: Duration,
    breaker: Breaker,
    local: LocalLimiter,
    counters: Counters,
    epoch: Instant,
    clock_offset_ms: i64,
    /// Consuming checks waiting behind an in-flight check on the same key and tier.
    batches: Coalescer<RateLimiter>,
}

/// Most checks one call carries: a batch's script call or `MULTI` stays short.
const MAX_BATCH: usize = 128;

/// Per-user, per-endpoint rate limiter. Cheap to clone; clones share tiers, breaker, local
/// fallback and counters.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("tiers", &self.inner.tiers)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A rate limiter with the documented tiers from the environment
    /// ([`RateLimiterConfig::from_env`]) and the default tier from this connection's
    /// configuration. Fails with [`Error::Config`] on a malformed tier variable and with
    /// [`Error::Unsupported`] when a GCRA or sliding-window tier cannot run scripts here.
    ///
    /// Building sends nothing (scripting support was probed at connect). Each check is then one
    /// round trip and atomic on the server, see [`RateLimiter::check_n`].
    pub fn rate_limiter(&self) -> Result<RateLimiter> {
        self.rate_limiter_with(RateLimiterConfig::from_env()?)
    }

    /// A rate limiter with these tiers. The default tier ([`TierName::Default`]) is added from
    /// `REDIS_RATE_LIMIT_MAX` (default 100) per `REDIS_RATE_LIMIT_WINDOW` (default: the TTL
    /// table's rate-limit row) unless `config` sets it. Every tier whose algorithm needs Lua is
    /// checked against the server's scripting capability here, so an unusable tier fails now
    /// with [`Error::Unsupported`] rather than on first use; an invalid custom tier name fails
    /// with [`Error::InvalidInput`]. Sends nothing.
    pub fn rate_limiter_with(&self, config: RateLimiterConfig) -> Result<RateLimiter> {
        let mut tiers = config.tiers;
        if let std::collections::hash_map::Entry::Vacant(slot) = tiers.entry(TierName::Default) {
            let limit = self.config().rate_limit_max.unwrap_or(100);
            let window = self
                .config()
                .rate_limit_window
                .unwrap_or_else(|| self.ttl().get(Keyspace::RateLimit));
            slot.insert(Tier::new(limit, window)?.with_algorithm(config.default_algorithm));
        }
        for (name, tier) in &mut tiers {
            name.validate()?;
            tier.check_exact(name)?;
            tier.failure.get_or_insert(name.default_failure_policy());
        }
        let mut needing: Vec<String> = tiers
            .iter()
            .filter(|(_, t)| t.algorithm.needs_scripting())
            .map(|(n, t)| format!("{n} ({})", t.algorithm))
            .collect();
        if !needing.is_empty() {
            needing.sort();
            self.require_scripting(&format!(
                "rate-limit tiers {} (use Algorithm::FixedWindow for a script-free tier)",
                needing.join(", ")
            ))?;
        }
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                redis: self.clone(),
                tiers,
                timeout: config.timeout,
                breaker: Breaker::new(config.breaker),
                local: LocalLimiter::new(config.local_capacity),
                counters: Counters::default(),
                epoch: Instant::now(),
                clock_offset_ms: config.clock_offset_ms,
                batches: Coalescer::new(MAX_BATCH, usize::MAX),
            }),
        })
    }
}

fn reply_ints(key: &str, reply: Value) -> Result<Vec<i64>> {
    match reply {
        Value::Array(items) => items.into_iter().map(|v| codec::int(key, v)).collect(),
        other => Err(Error::decode(
            key,
            None,
            format!("expected an array from the rate-limit script, got {other:?}"),
        )),
    }
}

impl RateLimiter {
    /// A tier's settings.
    pub fn tier(&self, name: &TierName) -> Option<&Tier> {
        self.inner.tiers.get(name)
    }

    /// Counters since the limiter was built.
    pub fn stats(&self) -> LimiterStats {
        let c = &self.inner.counters;
        LimiterStats {
            redis_calls: c.redis_calls.load(Ordering::Relaxed),
            redis_failures: c.redis_failures.load(Ordering::Relaxed),
            short_circuited: c.short_circuited.load(Ordering::Relaxed),
            local_decisions: c.local_decisions.load(Ordering::Relaxed),
            fail_open_decisions: c.fail_open_decisions.load(Ordering::Relaxed),
            batched_checks: c.batched_checks.load(Ordering::Relaxed),
        }
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state(Instant::now())
    }

    /// The key of `(user, endpoint)`: `rate-limit:<user>:<endpoint>` (plus the prefix).
    pub fn key(&self, user: &str, endpoint: &str) -> Result<String> {
        self.inner
            .redis
            .keys()
            .key(Keyspace::RateLimit, &[user, endpoint])
    }

    /// Checks one request of `user` on `endpoint` under `tier`: [`RateLimiter::check_n`] with
    /// cost 1, so one round trip, atomic on the server (a second round trip only after a script
    /// cache flush, or when it queues behind a concurrent check on the same key).
    pub async fn check(&self, user: &str, endpoint: &str, tier: &TierName) -> Result<Decision> {
        self.check_n(user, endpoint, tier, 1).await
    }

    /// Checks a request costing `cost` units (1..=the tier's limit, or burst for GCRA).
    ///
    /// One round trip, atomic: GCRA and sliding window run one script (`EVALSHA`; a second
    /// round trip only after a script cache flush); fixed window sends
    /// `MULTI INCRBY / PEXPIRE NX / PTTL EXEC`. Concurrent checks on one key never admit more
    /// than the algorithm allows. A denied GCRA or sliding check consumes nothing; a denied
    /// fixed-window hit counts (the documented counter semantics).
    ///
    /// Concurrent checks through this limiter (or its clones) on the same key and tier share
    /// calls: a check that arrives while another is in flight waits for it and goes in the next
    /// batch, one call for up to 128 checks, decided in arrival order at one server instant with
    /// the same result each would have had alone; the server runs one command per batch. Such a
    /// check usually takes two round trips (more when over 128 queue at once) and waits at most
    /// three times the limiter's timeout, past which the failure policy applies. A check whose
    /// caller gives up while it is queued is not sent.
    ///
    /// Errors: [`Error::InvalidInput`] for a bad user/endpoint, unknown tier or cost (nothing
    /// sent); [`Error::Unavailable`] / [`Error::Timeout`] only under
    /// [`FailurePolicy::FailClosed`] (a `READONLY` reply, from a node demoted by a failover,
    /// and a `BUSY`, `OOM`, `MISCONF` or `NOREPLICAS` refusal count as unavailable: the server
    /// ran nothing); [`Error::Server`] for a server-side error, e.g. `WRONGTYPE` when
    /// the key holds another algorithm's state (a fixed-window tier meeting a hash, a GCRA or
    /// sliding tier meeting the counter): that state is left as it was.
    pub async fn check_n(
        &self,
        user: &str,
        endpoint: &str,
        tier_name: &TierName,
        cost: u64,
    ) -> Result<Decision> {
        let tier = self.lookup(tier_name)?;
        if cost == 0 || cost > tier.capacity() {
            return Err(Error::invalid(
                "rate-limit cost",
                format!(
                    "{cost} is not within 1..={} for tier {tier_name}",
                    tier.capacity()
                ),
            ));
        }
        let key = self.key(user, endpoint)?;
        self.decide(&key, tier_name, tier, cost, true).await
    }

    /// The status of `(user, endpoint)` under `tier` without consuming anything: whether a
    /// request of cost 1 would be admitted now, what remains, when it resets (the documented
    /// `getRateLimitStatus`). One round trip: the algorithm's script in read-only mode, or
    /// `MULTI GET / PTTL EXEC` for fixed window. Errors as [`RateLimiter::check_n`], including
    /// `WRONGTYPE` on another algorithm's state.
    pub async fn peek(&self, user: &str, endpoint: &str, tier: &TierName) -> Result<Decision> {
        let t = self.lookup(tier)?;
        let key = self.key(user, endpoint)?;
        self.decide(&key, tier, t, 1, false).await
    }

    /// Forgets the state of `(user, endpoint)` (an administrator lifting a limit): `DEL`, one
    /// round trip, and the local fallback's state. Returns whether Redis held any. Not subject
    /// to the failure policy: a failure is an error.
    pub async fn reset(&self, user: &str, endpoint: &str) -> Result<bool> {
        let key = self.key(user, endpoint)?;
        self.inner.local.forget(&key);
        let removed: i64 = self
            .inner
            .redis
            .query_as("rate_limit.reset", &key, redis::cmd("DEL").arg(&key))
            .await?;
        Ok(removed > 0)
    }

    fn lookup(&self, name: &TierName) -> Result<&Tier> {
        self.inner.tiers.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.inner.tiers.keys().map(TierName::as_str).collect();
            known.sort_unstable();
            Error::invalid(
                "rate-limit tier",
                format!("{name} is not configured (known: {})", known.join(", ")),
            )
        })
    }

    /// This client's clock in µs since the limiter was built (monotonic, plus the test offset).
    fn local_now_us(&self) -> i64 {
        let elapsed = i64::try_from(self.inner.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        elapsed.saturating_add(self.inner.clock_offset_ms.saturating_mul(1000))
    }

    async fn decide(
        &self,
        key: &str,
        name: &TierName,
        tier: &Tier,
        cost: u64,
        consume: bool,
    ) -> Result<Decision> {
        let outcome = if consume {
            coalesce::submit(self, (key.to_owned(), name.clone()), cost).await
        } else {
            self.call(key, tier, &[cost], false)
                .await
                .and_then(|mut outcomes| outcomes.pop().ok_or_else(|| short_reply(key)))
        };
        match outcome {
            Ok(outcome) => Ok(self.decision(name, tier, outcome, DecisionSource::Redis)),
            Err(err) if err.is_retryable() => self.degrade(key, name, tier, cost, consume, err),
            Err(err) => Err(err),
        }
    }

    /// One call to Redis deciding `costs` in order, through the breaker and under the
    /// limiter's deadline. A retryable error means the failure policy applies.
    async fn call(
        &self,
        key: &str,
        tier: &Tier,
        costs: &[u64],
        consume: bool,
    ) -> Result<Vec<Outcome>> {
        let inner = &self.inner;
        let trial = match inner.breaker.permit() {
            Permit::Reject => {
                inner
                    .counters
                    .short_circuited
                    .fetch_add(costs.len() as u64, Ordering::Relaxed);
                return Err(Error::Unavailable {
                    message: "rate limiter circuit breaker is open after repeated Redis failures"
                        .into(),
                    source: None,
                });
            }
            Permit::Trial => true,
            Permit::Call => false,
        };
        // A caller may drop this future mid-call: the trial must not stay "in flight" forever.
        let _trial_guard = trial.then_some(TrialGuard(&inner.breaker));
        inner.counters.redis_calls.fetch_add(1, Ordering::Relaxed);
        if costs.len() > 1 {
            inner
                .counters
                .batched_checks
                .fetch_add(costs.len() as u64, Ordering::Relaxed);
        }
        let configured = inner.redis.config().response_timeout;
        // The common case: the connection enforces the limiter's deadline itself, which saves
        // registering a second timer per check.
        let bounded = inner.redis.ready_connection().and_then(|mut conn| {
            conn.bound_response_time(inner.timeout, configured)
                .then_some(conn)
        });
        let result = match bounded {
            Some(mut conn) => self.ask_redis(&mut conn, key, tier, costs, consume).await,
            // Reconnecting, or a Cluster connection: the whole call under one timer.
            _ => {
                let call = async {
                    let mut conn = inner.redis.connection().await?;
                    self.ask_redis(&mut conn, key, tier, costs, consume).await
                };
                match tokio::time::timeout(inner.timeout, call).await {
                    Ok(result) => result,
                    Err(_) => Err(Error::Timeout {
                        operation: CHECK,
                        after: inner.timeout,
                    }),
                }
            }
        };
        // A demoted master during a failover, or a server refusing commands before running them
        // (BUSY, OOM, ...): nothing was written, so it is an outage to the failure policy and the
        // breaker, not a server error to pass on.
        let result = result.map_err(refusal_as_unavailable);
        match &result {
            Ok(_) => inner.breaker.success(),
            Err(err) if err.is_retryable() => {
                inner
                    .counters
                    .redis_failures
                    .fetch_add(1, Ordering::Relaxed);
                inner.breaker.failure(Instant::now(), trial, costs.len());
                tracing::warn!(algorithm = %tier.algorithm, checks = costs.len(), error = %err,
                    "rate limiter: Redis failed; applying the failure policy");
            }
            Err(_) => {}
        }
        result
    }

    fn degrade(
        &self,
        key: &str,
        name: &TierName,
        tier: &Tier,
        cost: u64,
        consume: bool,
        err: Error,
    ) -> Result<Decision> {
        let counters = &self.inner.counters;
        match tier.failure_policy() {
            FailurePolicy::FailClosed => Err(err),
            FailurePolicy::FailOpen => {
                counters.fail_open_decisions.fetch_add(1, Ordering::Relaxed);
                Ok(self.decision(
                    name,
                    tier,
                    Outcome {
                        allowed: true,
                        remaining: tier.limit,
                        reset_after_us: 0,
                        retry_after_us: 0,
                    },
                    DecisionSource::FailOpen,
                ))
            }
            FailurePolicy::Local => {
                counters.local_decisions.fetch_add(1, Ordering::Relaxed);
                let now = self.local_now_us();
                let outcome = self.inner.local.decide(key, tier, cost, consume, now);
                Ok(self.decision(name, tier, outcome, DecisionSource::Local))
            }
        }
    }

    fn decision(
        &self,
        name: &TierName,
        tier: &Tier,
        o: Outcome,
        source: DecisionSource,
    ) -> Decision {
        Decision {
            allowed: o.allowed,
            limit: tier.limit,
            remaining: o.remaining,
            reset_after: us(o.reset_after_us),
            retry_after: (!o.allowed).then(|| us(o.retry_after_us)),
            source,
            tier: name.clone(),
            window: tier.window,
            burst: (tier.algorithm == Algorithm::Gcra).then(|| tier.burst()),
        }
    }

    async fn ask_redis(
        &self,
        conn: &mut Connection,
        key: &str,
        tier: &Tier,
        costs: &[u64],
        consume: bool,
    ) -> Result<Vec<Outcome>> {
        let redis = &self.inner.redis;
        let fail = |e| redis.fail_within(CHECK, self.inner.timeout, e);
        match tier.algorithm {
            Algorithm::Gcra | Algorithm::SlidingWindow => {
                let (script, first) = if tier.algorithm == Algorithm::Gcra {
                    (&*GCRA, tier.period_us())
                } else {
                    (&*SLIDING, tier.window_ms())
                };
                let second = if tier.algorithm == Algorithm::Gcra {
                    tier.burst()
                } else {
                    tier.limit
                };
                let mut call = ScriptCall::new()
                    .key(key)
                    .arg(first)
                    .arg(second)
                    .arg(if consume { "1" } else { "0" });
                for cost in costs {
                    call = call.arg(*cost);
                }
                let reply = redis
                    .scripts()
                    .run_on(conn, script, &call)
                    .await
                    .map_err(fail)?;
                let ints = reply_ints(key, reply)?;
                if ints.len() != 4 * costs.len() {
                    return Err(Error::decode(
                        key,
                        None,
                        format!(
                            "expected {} integers from the rate-limit script, got {ints:?}",
                            4 * costs.len()
                        ),
                    ));
                }
                Ok(ints
                    .chunks_exact(4)
                    .map(|decided| Outcome {
                        allowed: decided[0] == 1,
                        remaining: u64::try_from(decided[1]).unwrap_or(0),
                        reset_after_us: decided[2],
                        retry_after_us: decided[3],
                    })
                    .collect())
            }
            Algorithm::FixedWindow => {
                let window = tier.window_ms();
                let mut pipe = redis::pipe();
                pipe.atomic();
                if consume {
                    // INCRBY creates the counter; PEXPIRE NX gives it the window TTL in the same
                    // transaction, and also repairs a counter a crashed INCR+EXPIRE client left
                    // without one. A batch adds its costs at once: the counts the requests would
                    // have seen one by one are the running total's steps.
                    pipe.cmd("INCRBY").arg(key).arg(costs.iter().sum::<u64>());
                    pipe.cmd("PEXPIRE").arg(key).arg(window).arg("NX").ignore();
                } else {
                    pipe.cmd("GET").arg(key);
                }
                pipe.cmd("PTTL").arg(key);
                let replies = pipe
                    .query_async::<Option<Vec<Value>>>(conn)
                    .await
                    .map_err(fail)?
                    .ok_or_else(|| Error::decode(key, None, "transaction aborted"))?;
                let mut replies = replies.into_iter();
                let (Some(count), Some(pttl)) = (replies.next(), replies.next()) else {
                    return Err(Error::decode(key, None, "short transaction reply"));
                };
                let count = match count {
                    Value::Nil => 0,
                    other => codec::int(key, other)?,
                };
                let count = u64::try_from(count)
                    .map_err(|_| Error::decode(key, None, format!("negative counter {count}")))?;
                let pttl = codec::int(key, pttl)?;
                let ttl_us = if pttl > 0 {
                    pttl.saturating_mul(1000)
                } else {
                    0
                };
                let fixed = |used: u64, allowed: bool| Outcome {
                    allowed,
                    remaining: tier.limit.saturating_sub(used),
                    reset_after_us: ttl_us,
                    retry_after_us: if allowed { 0 } else { ttl_us.max(1000) },
                };
                if !consume {
                    return Ok(costs
                        .iter()
                        .map(|cost| fixed(count, count + cost <= tier.limit))
                        .collect());
                }
                // `count` is the total after the whole batch; walk back to each request's own.
                let mut before = count.saturating_sub(costs.iter().sum::<u64>());
                Ok(costs
                    .iter()
                    .map(|cost| {
                        before += cost;
                        fixed(before, before <= tier.limit)
                    })
                    .collect())
            }
        }
    }
}

/// Replies with which a server refuses a command before running any of it because it cannot
/// serve now, not because the command is wrong: another client's script runs past
/// `busy-reply-threshold` (`BUSY`), the server is over `maxmemory` (`OOM`), its last save
/// failed with `stop-writes-on-bgsave-error` (`MISCONF`), or `min-replicas-to-write` is not met
/// (`NOREPLICAS`).
const REFUSAL_CODES: [&str; 4] = ["BUSY", "OOM", "MISCONF", "NOREPLICAS"];

/// `READONLY` and the [`REFUSAL_CODES`] (alone, from inside a script, or aborting a `MULTI`)
/// become [`Error::Unavailable`], so that the failure policy applies and the breaker counts
/// them. Every other error is returned as it was.
fn refusal_as_unavailable(err: Error) -> Error {
    match err.read_only_as_unavailable(CHECK) {
        Error::Server(e) => match refusal_code(&e) {
            Some(code) => Error::Unavailable {
                message: format!("{CHECK}: the server refused the check with {code}: {e}"),
                source: Some(e),
            },
            None => Error::Server(e),
        },
        other => other,
    }
}

fn refusal_code(err: &redis::RedisError) -> Option<&'static str> {
    let known = |code: &str| REFUSAL_CODES.iter().copied().find(|c| *c == code);
    if let Some(code) = err.code().and_then(known) {
        return Some(code);
    }
    // A command refused while queued in `MULTI` makes `EXEC` fail with `EXECABORT`; the
    // refusal itself is among the queued replies.
    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort) {
        return err
            .clone()
            .into_server_errors()?
            .iter()
            .find_map(|(_, e)| known(e.code()));
    }
    None
}

fn short_reply(key: &str) -> Error {
    Error::decode(
        key,
        None,
        "the rate-limit reply has fewer decisions than requests",
    )
}

/// Consuming checks on one key and tier that arrive while one is in flight go to Redis
/// together: one script call or `MULTI` decides them in arrival order at one instant, exactly as
/// the same checks sent one by one at that instant.
impl Batch for RateLimiter {
    type Key = (String, TierName);
    type Request = u64;
    type Response = Result<Outcome>;

    fn coalescer(&self) -> &Coalescer<Self> {
        &self.inner.batches
    }

    async fn run(&self, (key, name): &(String, TierName), costs: Vec<u64>) -> Vec<Result<Outcome>> {
        let decided = match self.lookup(name) {
            Ok(tier) => self.call(key, tier, &costs, true).await,
            Err(err) => Err(err),
        };
        coalesce::answers(costs.len(), decided, || short_reply(key))
    }

    /// The call in flight and the check's own batch are each bounded by the limiter's deadline;
    /// the third is slack, so that a batch's own outcome normally arrives first.
    fn max_wait(&self) -> Duration {
        self.inner.timeout.saturating_mul(3)
    }

    fn timed_out(&self, waited: Duration) -> Result<Outcome> {
        Err(Error::Timeout {
            operation: CHECK,
            after: waited,
        })
    }

    fn abandoned(&self) -> Result<Outcome> {
        Err(coalesce::abandoned("rate limiter check"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &[u8]) -> Error {
        let value = redis::parse_redis_value(reply).unwrap();
        let Value::ServerError(err) = value else {
            panic!("not an error reply: {value:?}");
        };
        Error::from_redis("test", err.into())
    }

    #[test]
    fn refusals_are_unavailable_other_server_errors_stay() {
        for reply in [
            &b"-BUSY Redis is busy running a script.\r\n"[..],
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            b"-MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.\r\n",
            b"-NOREPLICAS Not enough good replicas to write.\r\n",
            b"-READONLY You can't write against a read only replica.\r\n",
        ] {
            let err = refusal_as_unavailable(server_error(reply));
            assert!(err.is_unavailable() && err.is_retryable(), "{err:?}");
        }
        for reply in [
            &b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"[..],
            b"-NOPERM this user has no permissions\r\n",
            b"-ERR unknown command\r\n",
            b"-BUSYGROUP Consumer Group name already exists\r\n",
        ] {
            let err = refusal_as_unavailable(server_error(reply));
            assert!(matches!(err, Error::Server(_)), "{err:?}");
        }
    }

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn documented_defaults() {
        let c = RateLimiterConfig::from_lookup(lookup(&[])).unwrap();
        let l = |n: TierName| {
            let t = c.get(&n).unwrap();
            (t.limit(), t.window().as_secs(), t.failure_policy())
        };
        assert_eq!(l(TierName::General), (120, 60, FailurePolicy::FailOpen));
        assert_eq!(l(TierName::Auth), (30, 60, FailurePolicy::FailClosed));
        assert_eq!(l(TierName::Sensitive), (10, 60, FailurePolicy::FailClosed));
        assert_eq!(l(TierName::Admin), (300, 60, FailurePolicy::FailOpen));
        assert_eq!(l(TierName::Mfa), (5, 60, FailurePolicy::FailClosed));
        assert_eq!(l(TierName::Financial), (20, 60, FailurePolicy::FailClosed));
        assert!(c.get(&TierName::Default).is_none());
    }

    #[test]
    fn malformed_tiers_name_the_variable() {
        for (var, value) in [
            ("RATE_LIMIT_GENERAL", "120"),
            ("RATE_LIMIT_AUTH", "0,60"),
            ("RATE_LIMIT_MFA", "a,b"),
            ("RATE_LIMIT_ADMIN", "10,0"),
            ("RATE_LIMIT_SENSITIVE", "-1,60"),
            ("RATE_LIMIT_FINANCIAL", "10,60,5"),
            ("RATE_LIMIT_GENERAL", "+5,60"),
            ("RATE_LIMIT_AUTH", "5,+60"),
            ("RATE_LIMIT_MFA", "1000000000,1"),
            ("RATE_LIMIT_ADMIN", "1000000001,31622400"),
            ("RATE_LIMIT_SENSITIVE", "10,31622401"),
        ] {
            let err = RateLimiterConfig::from_lookup(lookup(&[(var, value)])).unwrap_err();
            assert_eq!(err.variable(), var, "{err}");
            assert!(err.to_string().contains(value), "{err}");
        }
        let ok = RateLimiterConfig::from_lookup(lookup(&[("RATE_LIMIT_MFA", " 3 , 30 ")])).unwrap();
        assert_eq!(ok.get(&TierName::Mfa).unwrap().limit(), 3);
        assert_eq!(ok.get(&TierName::Mfa).unwrap().window().as_secs(), 30);
    }

    #[test]
    fn replaced_tiers_keep_their_names_failure_default() {
        let plain = || Tier::new(50, Duration::from_secs(60)).unwrap();
        let config = RateLimiterConfig::default()
            .tier(TierName::Auth, plain())
            .tier(
                TierName::Mfa,
                plain().with_algorithm(Algorithm::SlidingWindow),
            )
            .tier(
                TierName::Sensitive,
                plain().with_failure_policy(FailurePolicy::FailOpen),
            )
            .tier(TierName::General, plain())
            .tier(TierName::Default, plain())
            .tier(TierName::custom("uploads"), plain());
        let policy = |n: TierName| config.get(&n).unwrap().failure_policy();
        assert_eq!(policy(TierName::Auth), FailurePolicy::FailClosed);
        assert_eq!(policy(TierName::Mfa), FailurePolicy::FailClosed);
        assert_eq!(policy(TierName::Financial), FailurePolicy::FailClosed);
        assert_eq!(
            policy(TierName::Sensitive),
            FailurePolicy::FailOpen,
            "explicit wins"
        );
        assert_eq!(policy(TierName::General), FailurePolicy::FailOpen);
        assert_eq!(policy(TierName::Default), FailurePolicy::FailOpen);
        assert_eq!(policy(TierName::custom("uploads")), FailurePolicy::FailOpen);
        // A tier read back from the config keeps its resolved policy wherever it goes next.
        let closed = config.get(&TierName::Auth).unwrap().clone();
        let moved = RateLimiterConfig::default().tier(TierName::custom("x"), closed);
        assert_eq!(
            moved.get(&TierName::custom("x")).unwrap().failure_policy(),
            FailurePolicy::FailClosed
        );
    }

    #[test]
    fn custom_tier_names_are_short_tokens() {
        for good in ["t", "uploads.v2", "A-b_9", &"x".repeat(64)] {
            assert!(TierName::try_custom(good).is_ok(), "{good}");
            assert!(TierName::custom(good).validate().is_ok(), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "two words",
            "quo\"te",
            "back\\slash",
            "line\nbreak",
            "semi;q=1",
            "é",
            "auth",
            "MFA",
            "default",
        ] {
            let err = TierName::try_custom(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidInput {
                        what: "rate-limit tier name",
                        ..
                    }
                ),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn breaker_cooldown_is_bounded() {
        let b = Breaker::new(BreakerSettings {
            failure_threshold: 1,
            cooldown: Duration::MAX,
        });
        let t0 = Instant::now();
        b.failure(t0, false, 1);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.state(t0 + MAX_COOLDOWN), BreakerState::HalfOpen);
        let clamped = RateLimiterConfig::default().breaker(BreakerSettings::new(0, Duration::MAX));
        assert_eq!(clamped.breaker.cooldown, MAX_COOLDOWN);
        assert_eq!(clamped.breaker.failure_threshold, 1);
    }

    #[test]
    fn gcra_step_admits_burst_then_one_per_period() {
        let (period, burst) = (1_000, 3);
        let mut tat = None;
        let mut admitted = 0;
        for _ in 0..10 {
            let (o, next) = gcra_step(tat, 0, period, burst, 1, true);
            if o.allowed {
                admitted += 1;
                tat = Some(next);
            }
        }
        assert_eq!(admitted, 3);
        let (o, _) = gcra_step(tat, 0, period, burst, 1, true);
        assert_eq!(o.retry_after_us, 1_000);
        let (o, _) = gcra_step(tat, 1_000, period, burst, 1, false);
        assert!(o.allowed);
        assert_eq!(o.remaining, 1);
    }

    #[test]
    fn sliding_step_weights_the_previous_window() {
        // 10 per 1000 ms; 10 used in window [0, 1000).
        let state = Some((0, 10, 0));
        let (o, _) = sliding_step(state, 999, 1000, 10, 1, true);
        assert!(!o.allowed);
        // At 1500 the previous window weighs half: 5 used, 5 remain.
        let (o, s) = sliding_step(state, 1500, 1000, 10, 5, true);
        assert!(o.allowed, "{}", o.remaining);
        assert_eq!(s, (1000, 5, 10));
        let (o, _) = sliding_step(Some(s), 1500, 1000, 10, 1, true);
        assert!(!o.allowed);
        assert!(o.retry_after_us > 0);
    }

    #[test]
    fn headers_follow_the_draft() {
        let d = Decision {
            allowed: false,
            limit: 30,
            remaining: 0,
            reset_after: Duration::from_millis(11_200),
            retry_after: Some(Duration::from_millis(1_500)),
            source: DecisionSource::Redis,
            tier: TierName::Auth,
            window: Duration::from_secs(60),
            burst: Some(30),
        };
        let h = d.headers();
        assert_eq!(h.policy, "\"auth\";q=30;w=60;aether-burst=30");
        assert_eq!(h.rate_limit, "\"auth\";r=0;t=12");
        assert_eq!(h.retry_after.as_deref(), Some("2"));
        let window_algorithm = Decision {
            burst: None,
            tier: TierName::Custom("a\"b\r\nc".into()),
            ..d
        };
        assert_eq!(window_algorithm.headers().policy, "\"abc\";q=30;w=60");
    }

    #[test]
    fn breaker_opens_and_lets_one_trial_through() {
        let b = Breaker::new(BreakerSettings {
            failure_threshold: 2,
            cooldown: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        assert!(matches!(b.permit_at(t0), Permit::Call));
        b.failure(t0, false, 1);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0, false, 1);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(matches!(b.permit_at(t0), Permit::Reject));
        let later = t0 + Duration::from_secs(2);
        assert!(matches!(b.permit_at(later), Permit::Trial));
        assert!(matches!(b.permit_at(later), Permit::Reject));
        b.success();
        assert_eq!(b.state(later), BreakerState::Closed);
    }
}
