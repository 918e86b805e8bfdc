#![doc = include_str!("../README.md")]
//!
//! # Layout
//!
//! - [`config`] — [`Config`] from the environment, a URL or a builder; [`ConfigError`].
//! - [`keyspace`] — the documented keyspaces ([`Keyspace`]) and the one key builder ([`Keys`]).
//! - [`ttl`] — the per-environment TTL table as data ([`TtlTable`]).
//! - [`pool`] — the [`Redis`] handle: shared multiplexed connections, a pool of dedicated ones,
//!   capabilities, health.
//! - [`codec`] — hash and JSON decoding whose errors name key and field.
//! - [`script`] — Lua scripts by SHA under the configured (renamed) command names.
//! - [`error`] — [`Error`], with `is_retryable()` / `is_timeout()`.
//! - [`session`] — [`SessionStore`]: sessions with sliding expiry and user-wide logout.
//! - [`cache`] — [`CacheManager`]: JSON response cache with stampede protection.
//! - [`rate_limit`] — [`RateLimiter`]: tiers, GCRA / fixed / sliding windows, failure policies.
//! - [`email_queue`] — [`EmailQueue`]: priority job queue with leases, retries and a dead set.
//! - [`stream`] — [`Streams`]: producers and consumer groups with claim, dead letters and
//!   idempotency.
//! - [`user_prefs`] — [`UserPrefs`]: typed, partially updatable preferences.
//! - [`tokens`] — [`OneTimeTokens`]: 2FA codes, email verification, password reset and domain
//!   verification tokens.
//! - [`events`] — [`Events`]: notifications, metrics, security events, audit logs.
//! - [`user_data`] — erase and export everything stored about one user.
//! - `testkit` (feature `testkit`) — disposable Redis servers for tests.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod cache;
mod clock;
mod coalesce;
pub mod codec;
pub mod config;
pub mod email_queue;
pub mod error;
pub mod events;
pub mod keyspace;
pub mod pool;
pub mod random;
pub mod rate_limit;
pub mod script;
pub mod session;
pub mod stream;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tokens;
pub mod ttl;
pub mod user_data;
pub mod user_prefs;

pub use cache::{CacheEntry, CacheManager};
pub use config::{Config, ConfigBuilder, ConfigError, Environment, SessionLayout, Topology};
pub use email_queue::{EmailJob, EmailQueue};
pub use error::{Error, Result};
pub use events::Events;
pub use keyspace::{Keys, Keyspace};
pub use pool::{Health, Redis};
pub use rate_limit::{
    Algorithm, Decision, FailurePolicy, RateLimiter, RateLimiterConfig, Tier, TierName,
};
pub use session::{NewSession, Role, Session, SessionId, SessionStore, SessionUpdate};
pub use stream::{
    ConsumerOptions, StreamConsumer, StreamHandler, StreamMessage, StreamProducer, Streams,
};
pub use tokens::OneTimeTokens;
pub use ttl::TtlTable;
pub use user_prefs::{UserPreferences, UserPrefs};
