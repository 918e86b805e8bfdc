//! One-time secrets: email-verification and password-reset links (`email-verify:*`,
//! `password-reset:*`), 2FA codes (`2fa:*`) and domain-verification challenges
//! (`domain-verify:*`).
//!
//! # What a dump of Redis reveals
//! - **Link tokens** are 32 random bytes (256 bits) from the OS CSPRNG, base64url. Redis holds
//!   only `base64url(SHA-256(token))` as the key; the token itself is returned once by
//!   [`OneTimeTokens::issue`] and never stored. A dump yields hashes of 256-bit secrets, which
//!   cannot be inverted.
//! - **2FA codes** are 6 decimal digits, so a hash of one can be brute-forced offline in
//!   microseconds whatever the hash; what protects them is the short TTL and the attempt cap,
//!   not secrecy at rest. Redis still holds only `hex(SHA-256("2fa" 0 userId 0 code))`, so the
//!   live code is never sitting in a dump in plain sight and a precomputed table for one user
//!   does not serve another.
//! - **Domain-verification tokens** are published in DNS by design and must be readable until
//!   confirmed, so they are stored as issued.
//!
//! # Where the 2FA comparison happens
//! Checking a code, counting a wrong attempt and burning the code after the last allowed one
//! must be one atomic step, or concurrent guesses could exceed the cap. So the comparison runs
//! inside a Lua script, on the SHA-256 hex digests: the attacker chooses the code, not the
//! digest, so any timing difference in comparing digests says nothing about the stored code,
//! and the script compares all 64 characters with an XOR accumulator anyway rather than
//! stopping at the first difference. The number of guesses per code is bounded (default 5),
//! which bounds what any side channel could be sampled. Domain tokens, compared outside Lua,
//! use [`subtle`]'s constant-time equality.

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::Value;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::codec::{self, HashFields};
use crate::error::{Error, Result};
use crate::keyspace::{Keyspace, validate_key_part};
use crate::pool::Redis;
use crate::script::{LuaScript, ScriptCall};

/// Bytes of entropy in a link token (256 bits).
pub const LINK_TOKEN_BYTES: usize = 32;
/// Default number of wrong guesses after which a 2FA code is burned.
pub const DEFAULT_MAX_2FA_ATTEMPTS: u32 = 5;

/// The largest 2FA attempt cap: the verify script reads counts of at most nine digits (a longer
/// one is garbled state and burns the code), so a larger cap would burn every code, the right
/// one included.
pub const MAX_2FA_ATTEMPTS: u32 = 999_999_999;

/// A subject's token index is pruned of gone tokens when an issue brings it to this many
/// members, and again at each power of two beyond.
const PRUNE_INDEX_FROM: i64 = 16;
/// Longest accepted token string on redeem, in bytes (ours are 43).
const MAX_PRESENTED_TOKEN_LEN: usize = 512;
/// The key part under which a subject's index of outstanding link tokens lives.
const INDEX_PART: &str = "user";

/// A presented link token is 1 to [`MAX_PRESENTED_TOKEN_LEN`] bytes.
fn check_presented_token(token: &str) -> Result<()> {
    if token.is_empty() || token.len() > MAX_PRESENTED_TOKEN_LEN {
        return Err(Error::invalid(
            "token",
            format!("must be 1..={MAX_PRESENTED_TOKEN_LEN} bytes"),
        ));
    }
    Ok(())
}

/// What a link token is for; each purpose is its own keyspace and TTL row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LinkPurpose {
    /// `email-verify:*`.
    EmailVerify,
    /// `password-reset:*`.
    PasswordReset,
}

impl LinkPurpose {
    /// Both purposes.
    pub const ALL: [LinkPurpose; 2] = [LinkPurpose::EmailVerify, LinkPurpose::PasswordReset];

    /// The keyspace holding tokens of this purpose.
    pub const fn keyspace(self) -> Keyspace {
        match self {
            LinkPurpose::EmailVerify => Keyspace::EmailVerify,
            LinkPurpose::PasswordReset => Keyspace::PasswordReset,
        }
    }
}

/// A secret handed to the caller once. `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, to put in a link or a message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A freshly issued link token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinkToken {
    /// The token (43 base64url characters); not stored anywhere.
    pub token: Secret,
    /// `base64url(SHA-256(token))`, the key part it is stored under.
    pub token_hash: String,
    /// How long it stays redeemable.
    pub expires_in: Duration,
}

/// Options of [`OneTimeTokens::issue_with_options`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IssueOptions {
    /// Revoke every outstanding token of the same purpose and subject.
    pub revoke_previous: bool,
}

impl IssueOptions {
    /// Defaults: previous tokens stay valid.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revoke the subject's outstanding tokens of the same purpose (e.g. a new password-reset
    /// link invalidates the old one).
    pub fn revoke_previous(mut self, revoke: bool) -> Self {
        self.revoke_previous = revoke;
        self
    }
}

/// What a redeemed link token carried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Redeemed {
    /// The subject (user id) it was issued for.
    pub subject: String,
    /// The payload given at issue.
    pub payload: serde_json::Value,
    /// When it was issued (ms since the epoch).
    pub issued_at: i64,
}

/// An outstanding link token as [`OneTimeTokens::pending`] describes it (never the token).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PendingToken {
    /// Its purpose.
    pub purpose: LinkPurpose,
    /// `base64url(SHA-256(token))`.
    pub token_hash: String,
    /// The payload given at issue.
    pub payload: serde_json::Value,
    /// When it was issued (ms since the epoch).
    pub issued_at: i64,
}

/// A freshly issued 2FA code.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TwoFactorCode {
    /// Six decimal digits.
    pub code: Secret,
    /// How long it stays valid.
    pub expires_in: Duration,
    /// How many wrong guesses burn it.
    pub max_attempts: u32,
}

/// The outcome of [`OneTimeTokens::verify_2fa`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TwoFactorOutcome {
    /// The code matched; it is consumed.
    Valid,
    /// Wrong code; this many guesses remain.
    Wrong {
        /// Guesses left before the code is burned.
        attempts_left: u32,
    },
    /// Wrong code, and it was the last allowed guess: the code is deleted.
    Burned,
    /// No code is pending (never issued, expired, consumed or burned).
    Missing,
}

/// The 2FA state of a user, without the code (for export).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct TwoFactorState {
    /// Wrong guesses so far.
    pub attempts: u32,
    /// Guesses allowed.
    pub max_attempts: u32,
    /// When the code was issued (ms since the epoch); `None` when the hash does not say (written
    /// by another service).
    pub issued_at: Option<i64>,
}

/// A domain-verification challenge: publish [`DomainChallenge::txt_value`] as a TXT record at
/// [`DomainChallenge::txt_name`], then call [`OneTimeTokens::confirm_domain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct DomainChallenge {
    /// The domain, lowercase, without a trailing dot.
    pub domain: String,
    /// Who asked to verify it.
    pub owner: String,
    /// The random token (public by design: it goes into DNS).
    pub token: String,
    /// When it was issued (ms since the epoch).
    pub issued_at: i64,
}

impl DomainChallenge {
    /// The TXT record name: `_aether-verify.<domain>`.
    pub fn txt_name(&self) -> String {
        format!("_aether-verify.{}", self.domain)
    }

    /// The TXT record value: `aether-verify=<token>`.
    pub fn txt_value(&self) -> String {
        format!("aether-verify={}", self.token)
    }
}

/// The outcome of [`OneTimeTokens::confirm_domain`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DomainOutcome {
    /// A TXT value matched: the challenge is removed and the domain is verified.
    Verified(DomainChallenge),
    /// No TXT value matched; the challenge stays readable.
    NotFound,
    /// No challenge is pending (never issued, expired or already confirmed).
    Missing,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredLink {
    subject: String,
    payload: serde_json::Value,
    issued_at: i64,
}

/// `base64url(SHA-256(token))`: the key part a link token is stored under.
pub fn link_token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// `hex(SHA-256("2fa" 0 userId 0 code))`: what Redis holds of a 2FA code.
fn code_hash(user_id: &str, code: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"2fa\0");
    h.update(user_id.as_bytes());
    h.update(b"\0");
    h.update(code.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A uniformly distributed 6-digit code: rejection sampling over `u32`, so no residue is more
/// likely than another (a plain `% 1_000_000` would favour the low 967,296 values).
fn six_digit_code() -> Result<String> {
    const RANGE: u32 = 1_000_000;
    // The largest multiple of RANGE that fits in u32; draws at or above it are retried.
    const LIMIT: u32 = (u32::MAX / RANGE) * RANGE;
    loop {
        let bytes = crate::random::bytes(4)?;
        let mut word = [0u8; 4];
        word.copy_from_slice(&bytes);
        let n = u32::from_le_bytes(word);
        if n < LIMIT {
            return Ok(format!("{:06}", n % RANGE));
        }
    }
}

/// Lowercases, strips one trailing dot and checks `domain` is a host name.
fn normalize_domain(domain: &str) -> Result<String> {
    let d = domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase();
    validate_key_part("domain", &d)?;
    if d.len() > 253 {
        return Err(Error::invalid("domain", "is longer than 253 bytes"));
    }
    let labels_ok = d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !labels_ok {
        return Err(Error::invalid(
            "domain",
            "is not a host name (dot-separated labels of letters, digits and '-')",
        ));
    }
    Ok(d)
}

/// Compares `KEYS[1]`'s code digest with `ARGV[1]`, counts wrong guesses and burns the code at
/// the cap, in one atomic step. Replies `{status, attempts_left}`: 0 missing, 1 valid,
/// 2 burned (also when `attempts` or `maxAttempts` is not a decimal count), 3 wrong.
static VERIFY_2FA: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "tokens.verify_2fa",
        r#"
local h = redis.call('HMGET', KEYS[1], 'codeHash', 'attempts', 'maxAttempts')
local stored = h[1]
if not stored then return {0, 0} end
-- A count as a decimal string; false for anything else (`1.5`, `nan`, `1e9`, text), which
-- HINCRBY would refuse (leaving guesses uncounted) or tonumber would misread (nan never
-- reaches a cap): the code is then burned rather than guessed at without limit.
local function count(v)
  if not v then return nil end
  if #v <= 9 and string.match(v, '^%d+$') then return tonumber(v) end
  return false
end
local attempts, max = count(h[2]), count(h[3])
if attempts == false or max == false then
  redis.call('DEL', KEYS[1])
  return {2, 0}
end
local given = ARGV[1]
-- Examine every character whatever the first difference (see the module docs).
local diff = 0
if #stored ~= #given then diff = 1 end
for i = 1, #given do
  diff = bit.bor(diff, bit.bxor(string.byte(stored, i) or 0, string.byte(given, i)))
end
if diff == 0 then
  redis.call('DEL', KEYS[1])
  return {1, 0}
end
attempts = (attempts or 0) + 1
max = max or tonumber(ARGV[2])
if attempts >= max then
  redis.call('DEL', KEYS[1])
  return {2, 0}
end
redis.call('HSET', KEYS[1], 'attempts', attempts)
return {3, max - attempts}
"#,
    )
});

/// Deletes `KEYS[1]` only if it still holds `ARGV[1]`; replies 1 if it did.
static DELETE_IF_EQUAL: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "tokens.delete_if_equal",
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// The one-time token repository. Get it with [`Redis::tokens`].
#[derive(Debug, Clone)]
pub struct OneTimeTokens {
    redis: Redis,
    max_2fa_attempts: u32,
}

impl Redis {
    /// The one-time token repository (links, 2FA codes, domain challenges).
    pub fn tokens(&self) -> OneTimeTokens {
        OneTimeTokens {
            redis: self.clone(),
            max_2fa_attempts: DEFAULT_MAX_2FA_ATTEMPTS,
        }
    }
}

impl OneTimeTokens {
    /// Sets how many wrong guesses burn a 2FA code issued from now on (1 to
    /// [`MAX_2FA_ATTEMPTS`]).
    pub fn with_max_2fa_attempts(mut self, attempts: u32) -> Result<Self> {
        if attempts == 0 {
            return Err(Error::invalid("max 2FA attempts", "must be at least 1"));
        }
        if attempts > MAX_2FA_ATTEMPTS {
            return Err(Error::invalid(
                "max 2FA attempts",
                format!("must be at most {MAX_2FA_ATTEMPTS}"),
            ));
        }
        self.max_2fa_attempts = attempts;
        Ok(self)
    }

    fn link_key(&self, purpose: LinkPurpose, token_hash: &str) -> String {
        self.redis
            .keys()
            .key_unchecked(purpose.keyspace(), &[token_hash])
    }

    fn index_key(&self, purpose: LinkPurpose, subject: &str) -> Result<String> {
        validate_key_part("subject", subject)?;
        self.redis
            .keys()
            .key(purpose.keyspace(), &[INDEX_PART, subject])
    }

    /// Issues a link token for `subject` (a user id) carrying `payload`; previous tokens of the
    /// subject stay valid. See [`OneTimeTokens::issue_with_options`].
    #[tracing::instrument(name = "tokens.issue", skip_all)]
    pub async fn issue(
        &self,
        purpose: LinkPurpose,
        subject: &str,
        payload: &serde_json::Value,
    ) -> Result<LinkToken> {
        self.issue_with_options(purpose, subject, payload, IssueOptions::new())
            .await
    }

    /// Issues a 256-bit link token for `subject` carrying `payload`, valid for the purpose's
    /// TTL. Redis stores `<purpose>:<base64url(sha256(token))>` (JSON subject, payload,
    /// issuedAt) and adds the hash to the subject's index `<purpose>:user:<subject>` (a set
    /// whose TTL is reset to the full token TTL, so it outlives every member).
    ///
    /// Two round trips: `SET .. NX PX`, then `MULTI SADD PEXPIRE SCARD EXEC` on the index (with
    /// `revoke_previous`: `MULTI SMEMBERS SADD PEXPIRE SCARD EXEC`, then a `DEL` per previous
    /// token (pipelined) and one `SREM` of their hashes, four in all). When the index reaches
    /// 16, 32, 64, .. members, three more drop the hashes of tokens already gone (`SMEMBERS`,
    /// an `EXISTS` per token, `SREM`), so redeemed tokens do not pile up in it. The token key and the index live
    /// in different Cluster slots, so the steps are not one transaction; the token is written
    /// first, so every token is indexed by the time `issue` returns, and under concurrent revoking
    /// issues for one subject exactly the token indexed last survives. A previous token leaves the
    /// index only once it is deleted: if `issue` fails half way, a retry, or
    /// [`revoke_all`](Self::revoke_all), still finds it.
    #[tracing::instrument(name = "tokens.issue_with_options", skip_all)]
    pub async fn issue_with_options(
        &self,
        purpose: LinkPurpose,
        subject: &str,
        payload: &serde_json::Value,
        options: IssueOptions,
    ) -> Result<LinkToken> {
        let index = self.index_key(purpose, subject)?;
        let stored = codec::to_json(
            "payload",
            &StoredLink {
                subject: subject.to_owned(),
                payload: payload.clone(),
                issued_at: codec::now_millis(),
            },
        )?;
        let ttl = self.redis.ttl().millis(purpose.keyspace());
        let token = crate::random::secret_token(LINK_TOKEN_BYTES)?;
        let token_hash = link_token_hash(&token);
        let key = self.link_key(purpose, &token_hash);
        let set: Value = self
            .redis
            .query(
                "tokens.issue",
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&stored)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl),
            )
            .await?;
        if set == Value::Nil {
            // 2^-256: the CSPRNG repeated itself. Refuse rather than overwrite.
            return Err(Error::Unavailable {
                message: "a freshly generated token already exists; the random source is broken"
                    .into(),
                source: None,
            });
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        if options.revoke_previous {
            pipe.cmd("SMEMBERS").arg(&index);
        }
        pipe.cmd("SADD").arg(&index).arg(&token_hash).ignore();
        pipe.cmd("PEXPIRE").arg(&index).arg(ttl).ignore();
        pipe.cmd("SCARD").arg(&index);
        let reply = self.redis.query_pipe("tokens.issue", &pipe).await?;
        let mut replies = reply
            .ok_or_else(|| Error::decode(&index, None, "empty transaction reply"))?
            .into_iter();
        if options.revoke_previous {
            let members = replies
                .next()
                .ok_or_else(|| Error::decode(&index, None, "empty transaction reply"))?;
            let mut previous = text_list(&index, members)?;
            previous.retain(|h| *h != token_hash);
            self.delete_then_unindex(purpose, &index, &previous).await?;
        } else {
            let size = codec::int(&index, replies.next().unwrap_or(Value::Nil))?;
            // Redeemed and expired tokens stay in the index (`redeem` and `revoke` do not know
            // the subject's index, or it lives in another slot); pruning at each power of two
            // keeps the set within twice the live tokens at a constant cost per issue.
            // The token is issued either way: a failed prune is retried at the next power.
            if size >= PRUNE_INDEX_FROM
                && size.count_ones() == 1
                && let Err(e) = self.prune_index(purpose, &index).await
            {
                tracing::warn!(error = %e, "tokens: pruning the subject's index failed");
            }
        }
        Ok(LinkToken {
            token: Secret(token),
            token_hash,
            expires_in: self.redis.ttl().get(purpose.keyspace()),
        })
    }

    /// Redeems a link token: atomic and single-use (`GETDEL`, one round trip), so of any
    /// number of concurrent redemptions exactly one gets the payload. `None` when the token is
    /// unknown, expired, revoked or already redeemed. The subject's index keeps the stale hash
    /// until it expires or a later issue prunes it; it is never used to find a token.
    #[tracing::instrument(name = "tokens.redeem", skip_all)]
    pub async fn redeem(&self, purpose: LinkPurpose, token: &str) -> Result<Option<Redeemed>> {
        check_presented_token(token)?;
        let key = self.link_key(purpose, &link_token_hash(token));
        let value = self
            .redis
            .query("tokens.redeem", redis::cmd("GETDEL").arg(&key))
            .await?;
        match value {
            Value::Nil => Ok(None),
            other => {
                let raw = codec::text(&key, None, other)?;
                let stored: StoredLink = codec::from_json(&key, raw.as_bytes())?;
                Ok(Some(Redeemed {
                    subject: stored.subject,
                    payload: stored.payload,
                    issued_at: stored.issued_at,
                }))
            }
        }
    }

    /// Revokes one token without redeeming it. One round trip (`DEL`); `true` if it existed.
    /// An empty or oversized token is [`Error::InvalidInput`], as for
    /// [`redeem`](Self::redeem).
    #[tracing::instrument(name = "tokens.revoke", skip_all)]
    pub async fn revoke(&self, purpose: LinkPurpose, token: &str) -> Result<bool> {
        check_presented_token(token)?;
        let key = self.link_key(purpose, &link_token_hash(token));
        let n: i64 = self
            .redis
            .query_as("tokens.revoke", &key, redis::cmd("DEL").arg(&key))
            .await?;
        Ok(n > 0)
    }

    /// Revokes every outstanding token of `purpose` for `subject`; returns how many existed. Three
    /// round trips: `SMEMBERS` of the index, a `DEL` per token (pipelined), then one `SREM` of
    /// their hashes (one round trip when the index is empty). The tokens live in other Cluster
    /// slots than the index, so this is not one transaction: a hash leaves the index only after its
    /// token is deleted, so a call that fails half way can be run again and finishes the
    /// revocation. A token issued while it runs may survive it.
    #[tracing::instrument(name = "tokens.revoke_all", skip_all)]
    pub async fn revoke_all(&self, purpose: LinkPurpose, subject: &str) -> Result<u64> {
        let index = self.index_key(purpose, subject)?;
        let members = self
            .redis
            .query("tokens.revoke_all", redis::cmd("SMEMBERS").arg(&index))
            .await?;
        let hashes = text_list(&index, members)?;
        self.delete_then_unindex(purpose, &index, &hashes).await
    }

    /// Drops from `index` the hashes whose tokens are gone (redeemed, revoked, expired). A
    /// token is written before it is indexed, so a member being issued is never dropped.
    /// Three round trips: `SMEMBERS`, `EXISTS` per token (pipelined), `SREM`.
    async fn prune_index(&self, purpose: LinkPurpose, index: &str) -> Result<()> {
        let members = self
            .redis
            .query("tokens.prune", redis::cmd("SMEMBERS").arg(index))
            .await?;
        let hashes = text_list(index, members)?;
        let keys: Vec<String> = hashes.iter().map(|h| self.link_key(purpose, h)).collect();
        let replies = self
            .redis
            .query_each("tokens.prune", "EXISTS", &keys)
            .await?;
        let gone: Vec<&String> = hashes
            .iter()
            .zip(&replies)
            .filter(|(_, r)| **r == Value::Int(0))
            .map(|(h, _)| h)
            .collect();
        if !gone.is_empty() {
            self.redis
                .query("tokens.prune", redis::cmd("SREM").arg(index).arg(&gone))
                .await?;
        }
        Ok(())
    }

    /// Deletes the tokens of `hashes`, then removes exactly those hashes from `index`; returns how
    /// many tokens existed. Two round trips (none for no hashes): a pipeline of one `DEL` per token
    /// (concurrent commands on a Cluster, where the tokens live in many slots), then the `SREM`. A
    /// hash stays indexed until its token is gone, so an interrupted revocation is found again by
    /// the next one; a hash left behind by a failed `SREM` names a deleted token, which the index
    /// tolerates anyway.
    async fn delete_then_unindex(
        &self,
        purpose: LinkPurpose,
        index: &str,
        hashes: &[String],
    ) -> Result<u64> {
        if hashes.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = hashes.iter().map(|h| self.link_key(purpose, h)).collect();
        let deleted = self
            .redis
            .delete_each("tokens.revoke", "DEL", &keys)
            .await?;
        self.redis
            .query("tokens.revoke", redis::cmd("SREM").arg(index).arg(hashes))
            .await?;
        Ok(deleted)
    }

    /// The subject's outstanding tokens of `purpose` (hashes and payloads, never tokens).
    /// Two round trips: `SMEMBERS`, `MGET`. Read-only.
    #[tracing::instrument(name = "tokens.pending", skip_all)]
    pub async fn pending(&self, purpose: LinkPurpose, subject: &str) -> Result<Vec<PendingToken>> {
        let index = self.index_key(purpose, subject)?;
        let members = self
            .redis
            .query("tokens.pending", redis::cmd("SMEMBERS").arg(&index))
            .await?;
        let mut hashes = text_list(&index, members)?;
        hashes.sort();
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = hashes.iter().map(|h| self.link_key(purpose, h)).collect();
        let values = self
            .redis
            .query("tokens.pending", redis::cmd("MGET").arg(&keys))
            .await?;
        let Value::Array(values) = values else {
            return Err(Error::decode(&index, None, "MGET did not reply an array"));
        };
        let mut out = Vec::new();
        for ((hash, key), value) in hashes.into_iter().zip(&keys).zip(values) {
            if let Some(raw) = codec::opt_text(key, value)? {
                let stored: StoredLink = codec::from_json(key, raw.as_bytes())?;
                out.push(PendingToken {
                    purpose,
                    token_hash: hash,
                    payload: stored.payload,
                    issued_at: stored.issued_at,
                });
            }
        }
        Ok(out)
    }

    fn two_factor_key(&self, user_id: &str) -> Result<String> {
        validate_key_part("user id", user_id)?;
        self.redis.keys().key(Keyspace::TwoFactor, &[user_id])
    }

    /// Issues a 6-digit code for `user_id`, replacing any pending one (and its attempt count).
    /// Stored at `2fa:<userId>` as a hash of the code's digest, attempts and cap.
    ///
    /// One round trip, atomic: `MULTI DEL HSET PEXPIRE EXEC`.
    #[tracing::instrument(name = "tokens.issue_2fa", skip_all)]
    pub async fn issue_2fa(&self, user_id: &str) -> Result<TwoFactorCode> {
        let key = self.two_factor_key(user_id)?;
        let code = six_digit_code()?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .cmd("HSET")
            .arg(&key)
            .arg("codeHash")
            .arg(code_hash(user_id, &code))
            .arg("attempts")
            .arg(0)
            .arg("maxAttempts")
            .arg(self.max_2fa_attempts)
            .arg("issuedAt")
            .arg(codec::now_millis())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.redis.ttl().millis(Keyspace::TwoFactor))
            .ignore();
        self.redis.query_pipe("tokens.issue_2fa", &pipe).await?;
        Ok(TwoFactorCode {
            code: Secret(code),
            expires_in: self.redis.ttl().get(Keyspace::TwoFactor),
            max_attempts: self.max_2fa_attempts,
        })
    }

    /// Checks a code (needs Lua scripting: [`Error::Unsupported`] without it). One round
    /// trip, atomic (a Lua script): compare, consume on success,
    /// count a wrong guess, burn the code at the cap — so however many guesses race, at most
    /// `max_attempts` are ever compared against one code. A code that is not six ASCII digits
    /// is an [`Error::InvalidInput`] and costs no attempt.
    #[tracing::instrument(name = "tokens.verify_2fa", skip_all)]
    pub async fn verify_2fa(&self, user_id: &str, code: &str) -> Result<TwoFactorOutcome> {
        let key = self.two_factor_key(user_id)?;
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid("2FA code", "must be six digits"));
        }
        self.redis.require_scripting("2FA verification")?;
        let reply = self
            .redis
            .eval_script(
                &VERIFY_2FA,
                &ScriptCall::new()
                    .key(&key)
                    .arg(code_hash(user_id, code))
                    .arg(self.max_2fa_attempts),
            )
            .await?;
        let Value::Array(items) = reply else {
            return Err(Error::decode(&key, None, "unexpected 2FA script reply"));
        };
        let mut items = items.into_iter();
        let status = codec::int(&key, items.next().unwrap_or(Value::Nil))?;
        let left = codec::int(&key, items.next().unwrap_or(Value::Nil))?;
        Ok(match status {
            0 => TwoFactorOutcome::Missing,
            1 => TwoFactorOutcome::Valid,
            2 => TwoFactorOutcome::Burned,
            _ => TwoFactorOutcome::Wrong {
                attempts_left: u32::try_from(left).unwrap_or(0),
            },
        })
    }

    /// The pending 2FA state of `user_id` (never the code), or `None`. One round trip
    /// (`HGETALL`), read-only. Read as the verifier reads it: a missing `attempts` is 0 and a
    /// missing `maxAttempts` this repository's cap; a missing `issuedAt` is `None`.
    #[tracing::instrument(name = "tokens.two_factor_state", skip_all)]
    pub async fn two_factor_state(&self, user_id: &str) -> Result<Option<TwoFactorState>> {
        let key = self.two_factor_key(user_id)?;
        let reply = self
            .redis
            .query("tokens.2fa_state", redis::cmd("HGETALL").arg(&key))
            .await?;
        let Some(fields) = HashFields::from_reply(&key, reply)? else {
            return Ok(None);
        };
        Ok(Some(TwoFactorState {
            attempts: fields.parse_opt("attempts")?.unwrap_or(0),
            max_attempts: fields
                .parse_opt("maxAttempts")?
                .unwrap_or(self.max_2fa_attempts),
            issued_at: fields.parse_opt("issuedAt")?,
        }))
    }

    /// Cancels a pending 2FA code. One round trip (`DEL`); `true` if one was pending.
    #[tracing::instrument(name = "tokens.cancel_2fa", skip_all)]
    pub async fn cancel_2fa(&self, user_id: &str) -> Result<bool> {
        let key = self.two_factor_key(user_id)?;
        let n: i64 = self
            .redis
            .query_as("tokens.cancel_2fa", &key, redis::cmd("DEL").arg(&key))
            .await?;
        Ok(n > 0)
    }

    fn domain_key(&self, owner: &str, domain: &str) -> Result<String> {
        validate_key_part("owner", owner)?;
        self.redis
            .keys()
            .key(Keyspace::DomainVerify, &[owner, domain])
    }

    /// The pending challenge of `owner` for `domain`, creating one if there is none.
    /// Stored at `domain-verify:<owner>:<domain>` (JSON), TTL from the table; asking again
    /// returns the same token until it expires or is confirmed. Each owner gets a token of its
    /// own, so nobody can confirm a domain with a record someone else published.
    ///
    /// One round trip, atomic: `SET .. NX GET PX` (creates, or returns the existing one).
    #[tracing::instrument(name = "tokens.domain_challenge", skip_all)]
    pub async fn domain_challenge(&self, owner: &str, domain: &str) -> Result<DomainChallenge> {
        let domain = normalize_domain(domain)?;
        let key = self.domain_key(owner, &domain)?;
        let fresh = DomainChallenge {
            domain,
            owner: owner.to_owned(),
            token: crate::random::secret_token(LINK_TOKEN_BYTES)?,
            issued_at: codec::now_millis(),
        };
        let raw = codec::to_json("domain challenge", &fresh)?;
        let previous = self
            .redis
            .query(
                "tokens.domain_challenge",
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&raw)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(self.redis.ttl().millis(Keyspace::DomainVerify)),
            )
            .await?;
        match codec::opt_text(&key, previous)? {
            None => Ok(fresh),
            Some(existing) => codec::from_json(&key, existing.as_bytes()),
        }
    }

    /// The pending challenge, if any. One round trip (`GET`), read-only.
    #[tracing::instrument(name = "tokens.get_domain_challenge", skip_all)]
    pub async fn get_domain_challenge(
        &self,
        owner: &str,
        domain: &str,
    ) -> Result<Option<DomainChallenge>> {
        let domain = normalize_domain(domain)?;
        let key = self.domain_key(owner, &domain)?;
        let raw = self
            .redis
            .query("tokens.get_domain_challenge", redis::cmd("GET").arg(&key))
            .await?;
        match codec::opt_text(&key, raw)? {
            None => Ok(None),
            Some(raw) => codec::from_json(&key, raw.as_bytes()).map(Some),
        }
    }

    /// Confirms a domain with the TXT values found at [`DomainChallenge::txt_name`] (the
    /// caller does the DNS lookup). Each value is compared in constant time with the expected
    /// one; on a match the challenge is removed and returned.
    ///
    /// Two round trips: `GET`, then a compare-and-delete script, so of concurrent
    /// confirmations exactly one gets [`DomainOutcome::Verified`]. Needs Lua scripting
    /// ([`Error::Unsupported`] without it).
    #[tracing::instrument(name = "tokens.confirm_domain", skip_all)]
    pub async fn confirm_domain(
        &self,
        owner: &str,
        domain: &str,
        txt_values: &[String],
    ) -> Result<DomainOutcome> {
        let domain = normalize_domain(domain)?;
        let key = self.domain_key(owner, &domain)?;
        let raw = self
            .redis
            .query("tokens.confirm_domain", redis::cmd("GET").arg(&key))
            .await?;
        let Some(raw) = codec::opt_text(&key, raw)? else {
            return Ok(DomainOutcome::Missing);
        };
        self.redis.require_scripting("domain confirmation")?;
        let challenge: DomainChallenge = codec::from_json(&key, raw.as_bytes())?;
        let expected = challenge.txt_value();
        let matched = txt_values.iter().fold(subtle::Choice::from(0u8), |acc, v| {
            acc | v.trim().as_bytes().ct_eq(expected.as_bytes())
        });
        if !bool::from(matched) {
            return Ok(DomainOutcome::NotFound);
        }
        let deleted = self
            .redis
            .eval_script(&DELETE_IF_EQUAL, &ScriptCall::new().key(&key).arg(&raw))
            .await?;
        if codec::int(&key, deleted)? == 1 {
            Ok(DomainOutcome::Verified(challenge))
        } else {
            Ok(DomainOutcome::Missing)
        }
    }

    /// Removes a pending challenge. One round trip (`DEL`); `true` if there was one.
    #[tracing::instrument(name = "tokens.cancel_domain_challenge", skip_all)]
    pub async fn cancel_domain_challenge(&self, owner: &str, domain: &str) -> Result<bool> {
        let domain = normalize_domain(domain)?;
        let key = self.domain_key(owner, &domain)?;
        let n: i64 = self
            .redis
            .query_as("tokens.cancel_domain", &key, redis::cmd("DEL").arg(&key))
            .await?;
        Ok(n > 0)
    }
}

/// A reply that must be an array (or set) of strings.
fn text_list(key: &str, value: Value) -> Result<Vec<String>> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(items) | Value::Set(items) => items
            .into_iter()
            .map(|v| codec::text(key, None, v))
            .collect(),
        other => Err(Error::decode(
            key,
            None,
            format!("expected a list of strings, got {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits() {
        for _ in 0..1000 {
            let c = six_digit_code().unwrap();
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn codes_are_roughly_uniform() {
        // A sanity check that every leading digit occurs (absence of modulo bias holds by
        // construction, the rejection above): 20,000 draws, each of 10 buckets expects 2,000;
        // ±300 is about 7 standard deviations.
        let mut buckets = [0u32; 10];
        for _ in 0..20_000 {
            let c = six_digit_code().unwrap();
            buckets[usize::from(c.as_bytes()[0] - b'0')] += 1;
        }
        for (digit, n) in buckets.iter().enumerate() {
            assert!((1_700..=2_300).contains(n), "digit {digit}: {n}");
        }
    }

    #[test]
    fn hashes_hide_the_secret() {
        let token = "abc";
        let h = link_token_hash(token);
        assert_eq!(h.len(), 43);
        assert!(!h.contains(token));
        assert_ne!(code_hash("u1", "123456"), code_hash("u2", "123456"));
        assert_eq!(code_hash("u1", "123456").len(), 64);
    }

    #[test]
    fn domains_are_normalized_and_checked() {
        assert_eq!(normalize_domain("Example.COM.").unwrap(), "example.com");
        for bad in ["", "a..b", "-a.com", "a b.com", "a:b", "x*.com", "a.com/x"] {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
