//! Everything stored about one user, erased or exported on request (GDPR right to erasure and
//! to data portability).
//!
//! Sessions are removed and listed through the session store's per-user index
//! ([`SessionStore::destroy_user`](crate::session::SessionStore::destroy_user)). The other keys
//! are found without `KEYS`: by name where the layout allows
//! (`user-prefs:<id>`, `notifications:<id>`, `2fa:<id>`, `security-events:<id>`), through the
//! per-user token indexes (`email-verify:user:<id>`, `password-reset:user:<id>`), and by `SCAN`
//! (on every master in Cluster) for the families keyed `<keyspace>:<id>:*`
//! (`rate-limit:<id>:*`, `domain-verify:<id>:*`). Every pattern is built from a validated id,
//! so no other user's key can match.

use redis::Value;
use serde::Serialize;

use crate::codec;
use crate::error::{Error, Result};
use crate::events::AuditEntry;
use crate::keyspace::{Keyspace, validate_key_part};
use crate::pool::{Connection, Redis};
use crate::tokens::LinkPurpose;

/// Keys per `DEL` when deleting what a `SCAN` found.
const DELETE_BATCH: usize = 500;
/// `SCAN .. COUNT` hint.
const SCAN_COUNT: usize = 1_000;
/// Security events read per round trip by the export.
const EXPORT_PAGE: usize = 10_000;

/// What [`UserData::erase_user`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct ErasureReport {
    /// Sessions destroyed.
    pub sessions: u64,
    /// Keys deleted besides sessions (tokens, preferences, notifications, 2FA, security
    /// events, rate limits, domain challenges).
    pub keys_deleted: u64,
    /// Rate-limit keys among them.
    pub rate_limit_keys: u64,
    /// Entry id of the `user.erased` audit record.
    pub audit_id: String,
}

/// The erase/export repository. Get it with [`Redis::user_data`].
#[derive(Debug, Clone)]
pub struct UserData {
    redis: Redis,
}

impl Redis {
    /// The erase/export repository.
    pub fn user_data(&self) -> UserData {
        UserData {
            redis: self.clone(),
        }
    }
}

/// Every key matching `pattern` (a `MATCH` pattern, e.g. from
/// [`Keys::scan_pattern`](crate::keyspace::Keys::scan_pattern)), found with `SCAN` — on every
/// master in Cluster. Never `KEYS`. Round trips: one per `SCAN` page per node (plus one
/// `CLUSTER SLOTS` in Cluster). Keys written during the scan may or may not be returned (the
/// `SCAN` guarantee); a reshard during the scan may hide keys of the moving slots.
pub async fn scan_keys(redis: &Redis, pattern: &str) -> Result<Vec<String>> {
    let conn = redis.connection().await?;
    match conn {
        Connection::Single(mut c) => scan_node(redis, &mut c, pattern).await,
        #[cfg(feature = "cluster")]
        Connection::Cluster(c) => scan_cluster(redis, c, pattern).await,
    }
}

async fn scan_node(
    redis: &Redis,
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let reply: Value = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await
            .map_err(|e| redis.fail("scan", e))?;
        cursor = scan_page(pattern, reply, &mut keys)?;
        if cursor == "0" {
            return Ok(keys);
        }
    }
}

#[cfg(feature = "cluster")]
async fn scan_cluster(
    redis: &Redis,
    mut conn: redis::cluster_async::ClusterConnection,
    pattern: &str,
) -> Result<Vec<String>> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

    let mut slots_cmd = redis::cmd("CLUSTER");
    slots_cmd.arg("SLOTS");
    let slots = conn
        .route_command(
            slots_cmd,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await
        .map_err(|e| redis.fail("scan", e))?;
    // One slot per master: SCAN is routed by slot so that the cursor stays on one node.
    let mut masters: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = slots else {
        return Err(Error::decode("CLUSTER SLOTS", None, "not an array"));
    };
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(Error::decode(
                "CLUSTER SLOTS",
                None,
                "range is not an array",
            ));
        };
        let mut parts = parts.into_iter();
        let start = codec::int("CLUSTER SLOTS", parts.next().unwrap_or(Value::Nil))?;
        let _end = parts.next();
        let Some(Value::Array(master)) = parts.next() else {
            return Err(Error::decode("CLUSTER SLOTS", None, "range has no master"));
        };
        let mut node = master.into_iter();
        let host = codec::text("CLUSTER SLOTS", None, node.next().unwrap_or(Value::Nil))?;
        let port = codec::int("CLUSTER SLOTS", node.next().unwrap_or(Value::Nil))?;
        let id = format!("{host}:{port}");
        if !masters.iter().any(|(m, _)| *m == id) {
            let slot = u16::try_from(start)
                .map_err(|_| Error::decode("CLUSTER SLOTS", None, "slot out of range"))?;
            masters.push((id, slot));
        }
    }
    let mut keys = Vec::new();
    for (_, slot) in masters {
        let mut cursor = "0".to_owned();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(&cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let reply = conn
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                        slot,
                        SlotAddr::Master,
                    ))),
                )
                .await
                .map_err(|e| redis.fail("scan", e))?;
            cursor = scan_page(pattern, reply, &mut keys)?;
            if cursor == "0" {
                break;
            }
        }
    }
    Ok(keys)
}

/// Appends one `SCAN` page's keys to `keys`; returns the next cursor.
fn scan_page(pattern: &str, reply: Value, keys: &mut Vec<String>) -> Result<String> {
    let Value::Array(parts) = reply else {
        return Err(Error::decode(pattern, None, "SCAN reply is not an array"));
    };
    let mut parts = parts.into_iter();
    let cursor = codec::text(pattern, None, parts.next().unwrap_or(Value::Nil))?;
    match parts.next() {
        Some(Value::Array(found)) => {
            for key in found {
                keys.push(codec::text(pattern, None, key)?);
            }
        }
        Some(Value::Nil) | None => {}
        Some(_) => return Err(Error::decode(pattern, None, "SCAN keys are not an array")),
    }
    Ok(cursor)
}

impl UserData {
    /// Keys under `<keyspace>:<userId>:*`, found by [`scan_keys`].
    async fn scan_user(&self, keyspace: Keyspace, user_id: &str) -> Result<Vec<String>> {
        let pattern = self.redis.keys().scan_pattern(keyspace, &[user_id])?;
        let mut keys = scan_keys(&self.redis, &pattern).await?;
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn delete_keys(&self, keys: &[String]) -> Result<u64> {
        let mut deleted = 0;
        for batch in keys.chunks(DELETE_BATCH) {
            // A `DEL` per key: the client's split of a multi-key `DEL` over Cluster nodes can
            // answer as if done with a node down, and an erasure must fail instead.
            deleted += self
                .redis
                .delete_each("user_data.erase", "DEL", batch)
                .await?;
        }
        Ok(deleted)
    }

    /// Erases everything stored about `user_id` — its sessions (through the session index),
    /// preferences, notifications, link tokens, 2FA state, security events, domain challenges
    /// and rate-limit keys — and appends a
    /// `user.erased` record (actor `system`, target the user id, details the counts) to the
    /// audit log, which is retained by design. Keys of other users are never touched.
    /// Sessions written by a service that does not add them to `session:by-user:<userId>` (the
    /// TypeScript `SessionManager.createSession`) are not reached; they end with their TTL.
    ///
    /// Not atomic (the keys live in many Cluster slots): each step deletes by key, so running it
    /// again finishes an interrupted erasure. Data the user creates while the erasure runs may
    /// survive it. Round trips: about fifteen, plus the `SCAN` pages and their deletes.
    #[tracing::instrument(name = "user_data.erase_user", skip_all)]
    pub async fn erase_user(&self, user_id: &str) -> Result<ErasureReport> {
        validate_key_part("user id", user_id)?;
        let tokens = self.redis.tokens();
        let events = self.redis.events();
        // Sessions first: an erased user must not stay logged in while the rest goes.
        let sessions = self.redis.sessions().destroy_user(user_id).await?;
        let mut keys_deleted = 0;
        for purpose in LinkPurpose::ALL {
            keys_deleted += tokens.revoke_all(purpose, user_id).await?;
        }
        keys_deleted += u64::from(tokens.cancel_2fa(user_id).await?);
        keys_deleted += u64::from(self.redis.user_prefs().delete(user_id).await?);
        keys_deleted += u64::from(events.clear_notifications(user_id).await?);
        keys_deleted += u64::from(events.delete_security_events(user_id).await?);
        let domains = self.scan_user(Keyspace::DomainVerify, user_id).await?;
        keys_deleted += self.delete_keys(&domains).await?;
        let rate_limits = self.scan_user(Keyspace::RateLimit, user_id).await?;
        let rate_limit_keys = self.delete_keys(&rate_limits).await?;
        keys_deleted += rate_limit_keys;
        let audit_id = events
            .audit(
                &AuditEntry::new("system", "user.erased")
                    .target(user_id)
                    .details(serde_json::json!({
                        "sessions": sessions,
                        "keysDeleted": keys_deleted,
                        "rateLimitKeys": rate_limit_keys,
                    })),
            )
            .await?;
        Ok(ErasureReport {
            sessions,
            keys_deleted,
            rate_limit_keys,
            audit_id,
        })
    }

    /// Everything stored about `user_id`, as one JSON document:
    /// `{userId, exportedAt, sessions, preferences, notifications, securityEvents, tokens,
    /// twoFactor, domainChallenges, rateLimits}`. Secrets are never included: sessions are
    /// listed without their ids (bearer credentials) and with the names, not the values, of
    /// their application-defined fields (which hold e.g. CSRF tokens); link tokens appear as
    /// hashes with their payloads and issue times; 2FA state without the code. Appends a
    /// `user.exported` audit record.
    ///
    /// Changes no data apart from the audit record, with two kinds of housekeeping that every
    /// read does: listing the sessions prunes index entries of sessions that have ended (as
    /// [`SessionStore::list_user`](crate::SessionStore::list_user) does), and reading the
    /// preferences refreshes their TTL. Not a snapshot (about fifteen round trips plus the
    /// `SCAN` pages, one pipeline for the domain challenges and one for the rate-limit keys, and
    /// one per 10,000 security events: all of them are exported, however many).
    #[tracing::instrument(name = "user_data.export_user", skip_all)]
    pub async fn export_user(&self, user_id: &str) -> Result<serde_json::Value> {
        validate_key_part("user id", user_id)?;
        let tokens = self.redis.tokens();
        let events = self.redis.events();
        let sessions: Vec<serde_json::Value> = self
            .redis
            .sessions()
            .list_user(user_id)
            .await?
            .into_iter()
            .map(|s| {
                serde_json::json!({
                    "userId": s.user_id,
                    "email": s.email,
                    "role": s.role.as_str(),
                    "createdAt": s.created_at,
                    "lastAccessAt": s.last_access_at,
                    "ipAddress": s.ip_address,
                    "userAgent": s.user_agent,
                    "permissions": s.permissions,
                    "extraFields": s.extra.keys().collect::<Vec<_>>(),
                })
            })
            .collect();
        let preferences = self.redis.user_prefs().get_record(user_id).await?;
        let notifications = events.notifications(user_id, 100_000).await?;
        // Paged: a stream of any length (the cap allows a million, other writers more) is
        // exported whole without one reply holding the server for long.
        let mut security_events = Vec::new();
        loop {
            let after = security_events
                .last()
                .map(|e: &crate::events::SecurityEventRecord| e.id.clone());
            let page = events
                .security_events_after(user_id, after.as_deref(), EXPORT_PAGE)
                .await?;
            let full = page.len() == EXPORT_PAGE;
            security_events.extend(page);
            if !full {
                break;
            }
        }
        let email_verify = tokens.pending(LinkPurpose::EmailVerify, user_id).await?;
        let password_reset = tokens.pending(LinkPurpose::PasswordReset, user_id).await?;
        let two_factor = tokens.two_factor_state(user_id).await?;

        // One pipeline (concurrent commands on Cluster) per kind of key, not a round trip each:
        // a user may have hundreds of rate-limited endpoints.
        let mut domain_challenges = Vec::new();
        let challenge_keys = self.scan_user(Keyspace::DomainVerify, user_id).await?;
        let values = self
            .redis
            .query_each("user_data.export", "GET", &challenge_keys)
            .await?;
        for (key, raw) in challenge_keys.iter().zip(values) {
            if let Some(raw) = codec::opt_text(key, raw)? {
                domain_challenges.push(codec::from_json::<serde_json::Value>(key, raw.as_bytes())?);
            }
        }

        let mut rate_limits = Vec::new();
        let prefix = self.redis.keys().prefix().to_owned();
        let limit_keys = self.scan_user(Keyspace::RateLimit, user_id).await?;
        let reads = limit_keys
            .iter()
            .flat_map(|key| {
                let mut kind = redis::cmd("TYPE");
                kind.arg(key);
                let mut ttl = redis::cmd("PTTL");
                ttl.arg(key);
                [kind, ttl]
            })
            .collect();
        let mut replies = self
            .redis
            .query_per_key("user_data.export", reads)
            .await?
            .into_iter();
        for key in &limit_keys {
            let kind = codec::text(key, None, replies.next().unwrap_or(Value::Nil))?;
            let ttl = codec::int(key, replies.next().unwrap_or(Value::Nil))?;
            if kind == "none" {
                continue;
            }
            rate_limits.push(serde_json::json!({
                "key": key.strip_prefix(&prefix).unwrap_or(key),
                "type": kind,
                "ttlMs": ttl,
            }));
        }

        let document = serde_json::json!({
            "userId": user_id,
            "exportedAt": codec::now_millis(),
            "sessions": sessions,
            "preferences": preferences,
            "notifications": notifications,
            "securityEvents": security_events,
            "tokens": {
                "emailVerify": email_verify,
                "passwordReset": password_reset,
            },
            "twoFactor": two_factor,
            "domainChallenges": domain_challenges,
            "rateLimits": rate_limits,
        });
        events
            .audit(&AuditEntry::new("system", "user.exported").target(user_id))
            .await?;
        Ok(document)
    }
}
