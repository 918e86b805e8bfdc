//! Sessions: one record per session at `session:<id>`, with a sliding idle TTL, an absolute
//! lifetime cap and a self-cleaning per-user index.
//!
//! The layout is the documented wire contract (`docs/keyspace.md`, `## session:*`): a hash with
//! `userId`, `email`, `role`, `createdAt`, `lastAccessAt`, `ipAddress`, `userAgent`,
//! `permissions` (JSON array) and any application-defined fields, or — with
//! [`SessionLayout::Json`] — one JSON object with the same members (this crate's own schema:
//! it does not read JSON sessions of other shapes, such as snake_case members with ISO 8601
//! times). Sessions written by the documented TypeScript service (`HSET` + `EXPIRE 86400`)
//! read back here, and ours read back there; but that service does not write the per-user
//! index, so its sessions are invisible to [`SessionStore::list_user`] and
//! [`SessionStore::destroy_user`] (see there).
//!
//! # Atomicity
//! Reads that slide the TTL (`get`, `touch`, `update`) never recreate a session deleted or
//! expired in between: with scripting they run as one Lua script (one round trip), except
//! `update` in the JSON layout; that one, and all three without scripting (see
//! [`SessionStore::uses_scripts`]), run as an optimistic `WATCH`/`MULTI` transaction on a
//! dedicated connection. No path leaves a session key without a TTL.
//!
//! ```no_run
//! # async fn demo(redis: aether_redis::Redis) -> aether_redis::Result<()> {
//! use aether_redis::session::{NewSession, Role};
//! let sessions = redis.sessions();
//! let session = sessions
//!     .create(NewSession::new("u-42", "ada@example.com", Role::User).ip_address("10.0.0.7"))
//!     .await?;
//! let cookie = session.id.to_string(); // the secret to hand to the browser
//! let id = cookie.parse()?; // validated: hostile ids are rejected here
//! assert!(sessions.get(&id).await?.is_some());
//! sessions.destroy(&id).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::Value;
use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};

use crate::codec::{HashFields, now_millis};
use crate::config::SessionLayout;
use crate::error::{Error, Result};
use crate::keyspace::{Keys, Keyspace, cluster_slot, validate_key_part};
use crate::pool::{DedicatedConnection, Redis};
use crate::script::{LuaScript, ScriptCall};

/// Random bytes in a generated session id (256 bits; 242 bits remain after [`SessionStore::rotate_id`]
/// picks an id in the old id's Cluster slot).
pub const SESSION_ID_BYTES: usize = 32;

/// How often `create`/`rotate_id` draw a new id after a collision before giving up.
const MAX_ID_ATTEMPTS: usize = 8;
/// How often a script-free transaction is retried after a concurrent write aborted it.
const MAX_WATCH_ATTEMPTS: usize = 16;
/// Most application-defined fields one [`SessionUpdate`] sets or removes: the update script
/// passes them to one `HSET` / `HDEL`, and Lua's `unpack` carries at most about 8000 values.
pub const MAX_EXTRA_CHANGES: usize = 1000;
/// Index members younger than this whose session is absent are kept: their session may be in
/// the middle of being created (the index entry is written first).
const DEFAULT_INDEX_GRACE: Duration = Duration::from_secs(60);
/// Index key part that marks the per-user index (`session:by-user:<userId>`).
const INDEX_PART: &str = "by-user";
/// What errors show in place of a session id.
const REDACTED_ID: &str = "<redacted>";
/// Index member `rotating:<newId>` that marks `<newId>` as the target of a rotation in flight,
/// so that no pruning removes the new id between its `ZADD` and the `RENAMENX` (its session is
/// absent then, and its score, the old session's deadline, makes it look old). A session id
/// never contains `:`, so a marker is never taken for a session.
const ROTATING_PREFIX: &str = "rotating:";
/// A marker's score is its write time plus this: a rotation that never finishes (a crashed
/// process) leaves a marker that the regular `ZREMRANGEBYSCORE` cleaning removes after it.
const ROTATION_MARK_LIFETIME: Duration = Duration::from_secs(60);

/// The operation `list_user` names in its errors.
const LIST_USER: &str = "session.list_user";

/// Hash field and JSON member names, as documented.
pub mod fields {
    /// The owning user.
    pub const USER_ID: &str = "userId";
    /// The user's email address.
    pub const EMAIL: &str = "email";
    /// `admin`, `user` or `moderator`.
    pub const ROLE: &str = "role";
    /// Creation time, ms since the Unix epoch.
    pub const CREATED_AT: &str = "createdAt";
    /// Last access time, ms since the Unix epoch.
    pub const LAST_ACCESS_AT: &str = "lastAccessAt";
    /// Client IP address.
    pub const IP_ADDRESS: &str = "ipAddress";
    /// Client user agent.
    pub const USER_AGENT: &str = "userAgent";
    /// JSON array of permission names; missing means none.
    pub const PERMISSIONS: &str = "permissions";
    /// Every documented field; any other field is application-defined.
    pub const ALL: [&str; 8] = [
        USER_ID,
        EMAIL,
        ROLE,
        CREATED_AT,
        LAST_ACCESS_AT,
        IP_ADDRESS,
        USER_AGENT,
        PERMISSIONS,
    ];
}

/// A stored time in ms as the access scripts read it: an optional sign and digits, 17
/// characters at most (a JSON number below 2^53 in the JSON layout). What they refuse, the
/// decoder refuses too, so a session is never read as live while its TTL stops sliding.
fn millis_text(text: &str) -> Option<i64> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if text.len() > 17 || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn stored_millis(key: &str, field: &'static str, text: &str) -> Result<i64> {
    millis_text(text).ok_or_else(|| {
        Error::decode(
            key,
            Some(field),
            "expected milliseconds since the Unix epoch as an integer of at most 17 characters",
        )
    })
}

/// A user's session index is pruned of ended sessions when a create brings it to this many
/// members, and again at each power of two beyond.
const PRUNE_INDEX_FROM: i64 = 64;

/// The Lua scripts behind `get`, `touch` and `update`, public so that services in other
/// languages can run the very same code on the shared data (see `docs/keyspace.md`).
pub mod lua {
    /// Hash layout. `KEYS[1]` = session key. `ARGV` = now (ms), idle TTL (ms), lifetime cap
    /// (ms), mode (`get` | `touch` | `update`), `n`, then `n` field/value pairs to set, then
    /// fields to delete. Returns nil when the session is gone (nothing is written then);
    /// `{1, fields}` for `get`/`update`, `1` for `touch`; `{0, fields}` without writing when
    /// `createdAt` is missing or not an integer (an optional sign and digits, 17 characters at
    /// most: what the crate's decoder reads).
    pub const ACCESS_HASH: &str = r#"
local key = KEYS[1]
local h = redis.call('HGETALL', key)
if #h == 0 then return false end
local now = tonumber(ARGV[1])
local created
for i = 1, #h, 2 do
  -- Only what the crate's decoder reads as an integer: tonumber would also take 1.5e12, 0x..,
  -- nan or inf, and a session that never decodes would be kept alive (or never capped).
  if h[i] == 'createdAt' and #h[i + 1] <= 17 and string.match(h[i + 1], '^[+-]?%d+$') then
    created = tonumber(h[i + 1])
  end
end
if not created then return {0, h} end
local left = math.floor(math.min(tonumber(ARGV[2]), created + tonumber(ARGV[3]) - now))
if left <= 0 then
  redis.call('DEL', key)
  return false
end
local n = tonumber(ARGV[5])
local set = {'lastAccessAt', ARGV[1]}
for i = 6, 5 + 2 * n do set[#set + 1] = ARGV[i] end
redis.call('HSET', key, unpack(set))
if #ARGV > 5 + 2 * n then redis.call('HDEL', key, unpack(ARGV, 6 + 2 * n)) end
redis.call('PEXPIRE', key, left)
local mode = ARGV[4]
if mode == 'touch' then return 1 end
if mode == 'update' then return {1, redis.call('HGETALL', key)} end
local found = false
for i = 1, #h, 2 do
  if h[i] == 'lastAccessAt' then
    h[i + 1] = ARGV[1]
    found = true
  end
end
if not found then
  h[#h + 1] = 'lastAccessAt'
  h[#h + 1] = ARGV[1]
end
return {1, h}
"#;

    /// JSON layout. `KEYS[1]` = session key. `ARGV` = now (ms), idle TTL (ms), lifetime cap
    /// (ms), mode (`get` | `touch`). The document is not re-encoded (Lua's cjson would turn
    /// `[]` into `{}` and round large numbers): the value of the top-level `lastAccessAt`
    /// member, a number or a decimal string, is replaced in the text by the number `now`. Each
    /// textual occurrence of the member is tried in turn and the first rewrite whose decoded
    /// top-level `lastAccessAt` equals `now` is kept, so a nested `lastAccessAt` (e.g. inside
    /// an application member, wherever it appears) is never touched. Without a top-level
    /// member, `"lastAccessAt":<now>` is inserted as the first member. If no rewrite checks out
    /// (a value of another type), the document is kept as it was and only the TTL slides.
    /// Returns nil when the session is gone; `{1, json}` for `get`, `1` for `touch`; `{0, json}`
    /// without writing when the value is not a JSON object with an integral `createdAt` (a
    /// number below 2^53, or a string of an optional sign and digits, 17 characters at most).
    pub const ACCESS_JSON: &str = r#"
local key = KEYS[1]
local v = redis.call('GET', key)
if not v then return false end
local ok, obj = pcall(cjson.decode, v)
if not ok or type(obj) ~= 'table' then return {0, v} end
-- An integer, as a number or a decimal string, as the crate's decoder reads it; nan, inf and
-- fractions would keep alive (or never cap) a session that never decodes.
local c = obj['createdAt']
local created
if type(c) == 'number' and c == math.floor(c) and c > -2^53 and c < 2^53 then
  created = c
elseif type(c) == 'string' and #c <= 17 and string.match(c, '^[+-]?%d+$') then
  created = tonumber(c)
end
if not created then return {0, v} end
local now = tonumber(ARGV[1])
local left = math.floor(math.min(tonumber(ARGV[2]), created + tonumber(ARGV[3]) - now))
if left <= 0 then
  redis.call('DEL', key)
  return false
end
local function stamped(text)
  local ok2, check = pcall(cjson.decode, text)
  return ok2 and type(check) == 'table' and check['lastAccessAt'] == now
end
local stamp = '"lastAccessAt":' .. ARGV[1]
local nv
-- Already stamped this millisecond: nothing to rewrite (and a rewrite of a nested member
-- would pass the check below).
if obj['lastAccessAt'] == now then nv = v end
local from = 1
while not nv do
  local s, e = string.find(v, '"lastAccessAt"%s*:%s*"?[%d%.eE%+%-]*"?', from)
  if not s then break end
  local candidate = string.sub(v, 1, s - 1) .. stamp .. string.sub(v, e + 1)
  if stamped(candidate) then nv = candidate end
  from = e + 1
end
if not nv then
  local candidate = string.gsub(v, '^%s*{', '{' .. stamp .. ',', 1)
  if stamped(candidate) then nv = candidate else nv = v end
end
redis.call('SET', key, nv, 'PX', left)
if ARGV[4] == 'touch' then return 1 end
return {1, nv}
"#;
}

static ACCESS_HASH: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("session_access_hash", lua::ACCESS_HASH));
static ACCESS_JSON: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("session_access_json", lua::ACCESS_JSON));

/// A session id: the secret a client presents. `Display` writes it out (for the cookie);
/// `Debug` never does.
///
/// Generated ids are 32 bytes from the OS CSPRNG, base64url without padding (43 characters).
/// Parsed ids (e.g. from a cookie) are checked like every key part: 1–512 bytes, no `:`, braces,
/// glob characters, whitespace or control characters, so a hostile id cannot address another
/// key.
///
/// ```
/// use aether_redis::session::SessionId;
/// let id = SessionId::generate().unwrap();
/// assert_eq!(id.as_str().len(), 43);
/// assert_eq!(format!("{id:?}"), "SessionId(<redacted>)");
/// assert!("abc:def".parse::<SessionId>().is_err());
/// assert!("*".parse::<SessionId>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A new random id.
    pub fn generate() -> Result<SessionId> {
        crate::random::secret_token(SESSION_ID_BYTES).map(SessionId)
    }

    /// A new random id whose key (`keys`' layout) lies in Cluster slot `slot`. Draws ids until
    /// one fits: about 16,384 candidates (a few milliseconds of CRC16) on average.
    fn generate_in_slot(keys: &Keys, slot: u16) -> Result<SessionId> {
        const BATCH: usize = 128;
        // 2^20 candidates: the chance of finding none is e^-64.
        for _ in 0..(1 << 20) / BATCH {
            let random = crate::random::bytes(BATCH * SESSION_ID_BYTES)?;
            for chunk in random.chunks_exact(SESSION_ID_BYTES) {
                let id = URL_SAFE_NO_PAD.encode(chunk);
                if cluster_slot(&keys.key_unchecked(Keyspace::Session, &[&id])) == slot {
                    return Ok(SessionId(id));
                }
            }
        }
        Err(Error::Unavailable {
            message: "no session id in the required cluster slot was found".into(),
            source: None,
        })
    }

    /// The id as text (a secret: do not log it).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SessionId {
    type Err = Error;

    /// Validates an id received from a client: [`Error::InvalidInput`] naming `session id`.
    fn from_str(s: &str) -> Result<Self> {
        validate_key_part("session id", s).map(|s| SessionId(s.to_owned()))
    }
}

/// A user's role, stored as `admin`, `user` or `moderator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// `admin`
    Admin,
    /// `user`
    User,
    /// `moderator`
    Moderator,
}

impl Role {
    /// The stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Moderator => "moderator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "moderator" => Ok(Role::Moderator),
            other => Err(Error::invalid(
                "role",
                format!("{other:?} is not one of admin, user, moderator"),
            )),
        }
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Session {
    /// Its id (the secret).
    pub id: SessionId,
    /// `userId`.
    pub user_id: String,
    /// `email`.
    pub email: String,
    /// `role`.
    pub role: Role,
    /// `createdAt`, ms since the Unix epoch.
    pub created_at: i64,
    /// `lastAccessAt`, ms since the Unix epoch.
    pub last_access_at: i64,
    /// `ipAddress`.
    pub ip_address: String,
    /// `userAgent`.
    pub user_agent: String,
    /// `permissions` (empty when the field is missing).
    pub permissions: Vec<String>,
    /// Application-defined fields (e.g. `csrfToken`), kept and returned as they are. In the
    /// JSON layout a non-string member is returned as its JSON text (a number beyond 64 bits
    /// as the nearest float; writes keep the stored text of members they do not change).
    pub extra: BTreeMap<String, String>,
}

impl Session {
    /// Whether the session grants `permission`.
    pub fn has_permission(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }

    /// The hash fields, in documented order, then the extra fields.
    fn hash_fields(&self) -> Result<Vec<(String, String)>> {
        let mut out = vec![
            (fields::USER_ID.into(), self.user_id.clone()),
            (fields::EMAIL.into(), self.email.clone()),
            (fields::ROLE.into(), self.role.as_str().into()),
            (fields::CREATED_AT.into(), self.created_at.to_string()),
            (
                fields::LAST_ACCESS_AT.into(),
                self.last_access_at.to_string(),
            ),
            (fields::IP_ADDRESS.into(), self.ip_address.clone()),
            (fields::USER_AGENT.into(), self.user_agent.clone()),
            (
                fields::PERMISSIONS.into(),
                crate::codec::to_json("permissions", &self.permissions)?,
            ),
        ];
        out.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(out)
    }

    /// The JSON object, documented members first.
    fn to_json_object(&self) -> Map<String, Json> {
        let mut m = Map::new();
        m.insert(fields::USER_ID.into(), self.user_id.clone().into());
        m.insert(fields::EMAIL.into(), self.email.clone().into());
        m.insert(fields::ROLE.into(), self.role.as_str().into());
        m.insert(fields::CREATED_AT.into(), self.created_at.into());
        m.insert(fields::LAST_ACCESS_AT.into(), self.last_access_at.into());
        m.insert(fields::IP_ADDRESS.into(), self.ip_address.clone().into());
        m.insert(fields::USER_AGENT.into(), self.user_agent.clone().into());
        m.insert(
            fields::PERMISSIONS.into(),
            Json::Array(
                self.permissions
                    .iter()
                    .map(|p| Json::String(p.clone()))
                    .collect(),
            ),
        );
        for (k, v) in &self.extra {
            m.insert(k.clone(), Json::String(v.clone()));
        }
        m
    }

    /// Consumes the fields: every value moves into the session without a copy.
    fn from_hash(id: SessionId, mut h: HashFields) -> Result<Session> {
        let role = h.required(fields::ROLE)?;
        let role = role.parse::<Role>().map_err(|_| {
            Error::decode(
                h.key(),
                Some(fields::ROLE),
                format!("{role:?} is not one of admin, user, moderator"),
            )
        })?;
        let created_at =
            stored_millis(h.key(), fields::CREATED_AT, h.required(fields::CREATED_AT)?)?;
        let last_access_at = stored_millis(
            h.key(),
            fields::LAST_ACCESS_AT,
            h.required(fields::LAST_ACCESS_AT)?,
        )?;
        let permissions = h.json(fields::PERMISSIONS)?.unwrap_or_default();
        let user_id = h.take_required(fields::USER_ID)?;
        let email = h.take_required(fields::EMAIL)?;
        let ip_address = h.take_required(fields::IP_ADDRESS)?;
        let user_agent = h.take_required(fields::USER_AGENT)?;
        Ok(Session {
            id,
            user_id,
            email,
            role,
            created_at,
            last_access_at,
            ip_address,
            user_agent,
            permissions,
            extra: h
                .into_fields()
                .into_iter()
                .filter(|(k, _)| !fields::ALL.contains(&k.as_str()))
                .collect(),
        })
    }

    fn from_json_object(id: SessionId, key: &str, m: &Map<String, Json>) -> Result<Session> {
        let string = |field: &'static str| -> Result<String> {
            match m.get(field) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(other) => Err(Error::decode(
                    key,
                    Some(field),
                    format!("expected a string, got {other}"),
                )),
                None => Err(Error::decode(key, Some(field), "missing")),
            }
        };
        let millis = |field: &'static str| -> Result<i64> {
            match m.get(field) {
                // An integral value written with an exponent or a fraction (`1.7e12`) is the
                // same time, and the access script takes it as one.
                Some(Json::Number(n)) => {
                    n.as_i64()
                        .filter(|i| i.unsigned_abs() < 1 << 53)
                        .or_else(|| {
                            n.as_f64()
                                .filter(|f| f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0)
                                .map(|f| f as i64)
                        })
                }
                Some(Json::String(s)) => millis_text(s),
                None => return Err(Error::decode(key, Some(field), "missing")),
                _ => None,
            }
            .ok_or_else(|| {
                Error::decode(
                    key,
                    Some(field),
                    "expected milliseconds since the Unix epoch as an integer",
                )
            })
        };
        let role = string(fields::ROLE)?;
        let role = role.parse::<Role>().map_err(|_| {
            Error::decode(
                key,
                Some(fields::ROLE),
                format!("{role:?} is not one of admin, user, moderator"),
            )
        })?;
        let permissions = match m.get(fields::PERMISSIONS) {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .map(|p| match p {
                    Json::String(s) => Ok(s.clone()),
                    other => Err(Error::decode(
                        key,
                        Some(fields::PERMISSIONS),
                        format!("expected an array of strings, found {other}"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::decode(
                    key,
                    Some(fields::PERMISSIONS),
                    format!("expected an array of strings, got {other}"),
                ));
            }
        };
        Ok(Session {
            id,
            user_id: string(fields::USER_ID)?,
            email: string(fields::EMAIL)?,
            role,
            created_at: millis(fields::CREATED_AT)?,
            last_access_at: millis(fields::LAST_ACCESS_AT)?,
            ip_address: string(fields::IP_ADDRESS)?,
            user_agent: string(fields::USER_AGENT)?,
            permissions,
            extra: m
                .iter()
                .filter(|(k, _)| !fields::ALL.contains(&k.as_str()))
                .map(|(k, v)| {
                    let text = match v {
                        Json::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), text)
                })
                .collect(),
        })
    }
}

fn validate_extra_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 512 {
        return Err(Error::invalid(
            "session field",
            "a field name must be 1-512 bytes",
        ));
    }
    if fields::ALL.contains(&name) {
        return Err(Error::invalid(
            "session field",
            format!("{name:?} is a documented field; set it through its own method"),
        ));
    }
    Ok(())
}

/// What [`SessionStore::create`] stores.
///
/// ```
/// use aether_redis::session::{NewSession, Role};
/// let new = NewSession::new("u-42", "ada@example.com", Role::Admin)
///     .ip_address("10.0.0.7")
///     .user_agent("Mozilla/5.0")
///     .permissions(["mail:read", "mail:send"])
///     .extra("csrfToken", "t0k3n");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    user_id: String,
    email: String,
    role: Role,
    ip_address: String,
    user_agent: String,
    permissions: Vec<String>,
    extra: BTreeMap<String, String>,
}

impl NewSession {
    /// A session for `user_id` (a key part: 1–512 bytes, no `:`, braces or globs).
    pub fn new(user_id: impl Into<String>, email: impl Into<String>, role: Role) -> Self {
        NewSession {
            user_id: user_id.into(),
            email: email.into(),
            role,
            ip_address: String::new(),
            user_agent: String::new(),
            permissions: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// `ipAddress` (default empty).
    pub fn ip_address(mut self, ip: impl Into<String>) -> Self {
        self.ip_address = ip.into();
        self
    }

    /// `userAgent` (default empty).
    pub fn user_agent(mut self, agent: impl Into<String>) -> Self {
        self.user_agent = agent.into();
        self
    }

    /// `permissions` (default none).
    pub fn permissions<I, S>(mut self, permissions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.permissions = permissions.into_iter().map(Into::into).collect();
        self
    }

    /// An application-defined field (not one of the documented names).
    pub fn extra(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(name.into(), value.into());
        self
    }

    fn validate(&self) -> Result<()> {
        validate_key_part("user id", &self.user_id)?;
        self.extra.keys().try_for_each(|k| validate_extra_name(k))
    }
}

/// A partial change for [`SessionStore::update`]: only what is set is written. `userId` and
/// `createdAt` cannot change (the index and the lifetime cap rest on them).
///
/// ```
/// use aether_redis::session::{Role, SessionUpdate};
/// let change = SessionUpdate::new().role(Role::Moderator).extra("csrfToken", "n3w").remove_extra("draft");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionUpdate {
    email: Option<String>,
    role: Option<Role>,
    ip_address: Option<String>,
    user_agent: Option<String>,
    permissions: Option<Vec<String>>,
    set_extra: BTreeMap<String, String>,
    remove_extra: BTreeSet<String>,
}

impl SessionUpdate {
    /// No change (an update with nothing set still counts as an access).
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets `email`.
    pub fn email(mut self, email: impl Into<String>) -> Self {
        self.email = Some(email.into());
        self
    }
    /// Sets `role`.
    pub fn role(mut self, role: Role) -> Self {
        self.role = Some(role);
        self
    }
    /// Sets `ipAddress`.
    pub fn ip_address(mut self, ip: impl Into<String>) -> Self {
        self.ip_address = Some(ip.into());
        self
    }
    /// Sets `userAgent`.
    pub fn user_agent(mut self, agent: impl Into<String>) -> Self {
        self.user_agent = Some(agent.into());
        self
    }
    /// Replaces `permissions`.
    pub fn permissions<I, S>(mut self, permissions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.permissions = Some(permissions.into_iter().map(Into::into).collect());
        self
    }
    /// Sets an application-defined field.
    pub fn extra(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.remove_extra.remove(&name);
        self.set_extra.insert(name, value.into());
        self
    }
    /// Removes an application-defined field.
    pub fn remove_extra(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.set_extra.remove(&name);
        self.remove_extra.insert(name);
        self
    }

    fn validate(&self) -> Result<()> {
        let changed = self.set_extra.len() + self.remove_extra.len();
        if changed > MAX_EXTRA_CHANGES {
            return Err(Error::invalid(
                "session update extra fields",
                format!("{changed} set or removed; at most {MAX_EXTRA_CHANGES} per update"),
            ));
        }
        self.set_extra
            .keys()
            .chain(self.remove_extra.iter())
            .try_for_each(|k| validate_extra_name(k))
    }

    /// Field/value pairs to set (hash layout).
    fn hash_sets(&self) -> Result<Vec<(&str, String)>> {
        let mut out = Vec::new();
        if let Some(v) = &self.email {
            out.push((fields::EMAIL, v.clone()));
        }
        if let Some(v) = self.role {
            out.push((fields::ROLE, v.as_str().to_owned()));
        }
        if let Some(v) = &self.ip_address {
            out.push((fields::IP_ADDRESS, v.clone()));
        }
        if let Some(v) = &self.user_agent {
            out.push((fields::USER_AGENT, v.clone()));
        }
        if let Some(v) = &self.permissions {
            out.push((
                fields::PERMISSIONS,
                crate::codec::to_json("permissions", v)?,
            ));
        }
        for (k, v) in &self.set_extra {
            out.push((k.as_str(), v.clone()));
        }
        Ok(out)
    }

    /// Applies the change to a JSON object, leaving untouched members exactly as stored.
    fn apply_json(&self, m: &mut Map<String, Json>) {
        if let Some(v) = &self.email {
            m.insert(fields::EMAIL.into(), v.clone().into());
        }
        if let Some(v) = self.role {
            m.insert(fields::ROLE.into(), v.as_str().into());
        }
        if let Some(v) = &self.ip_address {
            m.insert(fields::IP_ADDRESS.into(), v.clone().into());
        }
        if let Some(v) = &self.user_agent {
            m.insert(fields::USER_AGENT.into(), v.clone().into());
        }
        if let Some(v) = &self.permissions {
            m.insert(
                fields::PERMISSIONS.into(),
                Json::Array(v.iter().map(|p| Json::String(p.clone())).collect()),
            );
        }
        for (k, v) in &self.set_extra {
            m.insert(k.clone(), v.clone().into());
        }
        for k in &self.remove_extra {
            m.shift_remove(k);
        }
    }
}

/// One read of a per-user index.
#[derive(Default)]
struct IndexSnapshot {
    /// Session ids with their absolute deadlines.
    members: Vec<(SessionId, i64)>,
    /// Ids that a rotation in flight is about to rename a session to.
    rotating: std::collections::HashSet<String>,
}

/// What a script-free transaction does to a live session.
enum Change<'a> {
    Get,
    Touch,
    Update(&'a SessionUpdate),
}

/// The session repository, from [`Redis::sessions`].
///
/// Keys: `session:<id>` (hash, or JSON string with [`SessionLayout::Json`]) and the per-user
/// index `session:by-user:<userId>` (sorted set of session ids scored by their absolute
/// deadline). TTL: the `session` row of the TTL table as the idle timeout, slid on every access,
/// never beyond `createdAt + Config::session_max_lifetime`.
#[derive(Debug, Clone)]
pub struct SessionStore {
    redis: Redis,
    layout: SessionLayout,
    idle_ms: i64,
    cap_ms: i64,
    scripts: bool,
    index_grace_ms: i64,
}

fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Redis {
    /// The session repository. It runs on Lua scripts when the server allows them under the
    /// configured command names, else on `WATCH`/`MULTI` (see [`SessionStore::uses_scripts`]).
    pub fn sessions(&self) -> SessionStore {
        SessionStore {
            redis: self.clone(),
            layout: self.config().session_layout,
            idle_ms: millis_i64(self.ttl().get(Keyspace::Session)),
            cap_ms: millis_i64(self.config().session_max_lifetime),
            scripts: self.capabilities().scripting,
            index_grace_ms: millis_i64(DEFAULT_INDEX_GRACE),
        }
    }
}

impl SessionStore {
    /// Forces the script-free mode (for servers where scripting is disabled by ACL or
    /// renaming). `get`, `touch` and `update` then run as optimistic `WATCH`/`MULTI`
    /// transactions on a dedicated connection: two round trips plus the pool checkout, retried
    /// when a concurrent write aborts them. Same guarantees otherwise.
    pub fn without_scripts(mut self) -> Self {
        self.scripts = false;
        self
    }

    /// How long an index member whose session is absent is kept before it is pruned (default
    /// 60 s: a session being created is indexed just before it is written).
    pub fn with_index_grace(mut self, grace: Duration) -> Self {
        self.index_grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// Whether `get`/`touch`/`update` run as Lua scripts (one round trip) rather than
    /// `WATCH`/`MULTI` transactions.
    pub fn uses_scripts(&self) -> bool {
        self.scripts
    }

    /// The idle TTL (the `session` row of the TTL table in force).
    pub fn idle_ttl(&self) -> Duration {
        Duration::from_millis(self.idle_ms.unsigned_abs())
    }

    /// The absolute lifetime cap.
    pub fn max_lifetime(&self) -> Duration {
        Duration::from_millis(self.cap_ms.unsigned_abs())
    }

    /// The key of session `id` (with the configured prefix).
    pub fn key(&self, id: &SessionId) -> String {
        self.redis
            .keys()
            .key_unchecked(Keyspace::Session, &[id.as_str()])
    }

    /// The key of a session as errors show it, `<prefix>session:<redacted>`: the id is a bearer
    /// secret and error messages end up in logs.
    fn shown_key(&self) -> String {
        self.redis
            .keys()
            .key_unchecked(Keyspace::Session, &[REDACTED_ID])
    }

    /// The per-user index key, `session:by-user:<userId>`.
    pub fn index_key(&self, user_id: &str) -> Result<String> {
        validate_key_part("user id", user_id)?;
        Ok(self
            .redis
            .keys()
            .key_unchecked(Keyspace::Session, &[INDEX_PART, user_id]))
    }

    /// TTL (ms) left for a session created at `created_at`, accessed `now`: the idle TTL, cut
    /// at the lifetime cap.
    fn remaining(&self, created_at: i64, now: i64) -> i64 {
        self.idle_ms
            .min(created_at.saturating_add(self.cap_ms).saturating_sub(now))
    }

    /// Creates a session with a fresh id. Never overwrites an existing key: on an id collision
    /// a new id is drawn.
    ///
    /// Round trips: two. First the user index entry (`ZADD` + `PEXPIRE` in one `MULTI`), then the
    /// session itself, atomically with its TTL: hash layout as one `MULTI` (`HSET` into a
    /// temporary key in the same slot, `PEXPIRE`, `RENAMENX` onto the session key, `DEL` of the
    /// temporary key when the name was taken); JSON layout as `SET .. NX PX`. The TTL is the
    /// idle TTL, cut at the lifetime cap. When the index reaches 64, 128, 256, .. members,
    /// three more round trips drop members whose session has ended (`EXISTS` of each), so a
    /// user who logs in often without logging out keeps an index about the size of their live
    /// sessions.
    #[tracing::instrument(name = "session.create", skip_all)]
    pub async fn create(&self, new: NewSession) -> Result<Session> {
        new.validate()?;
        let index = self.index_key(&new.user_id)?;
        let now = now_millis();
        let ttl = self.remaining(now, now);
        let NewSession {
            user_id,
            email,
            role,
            ip_address,
            user_agent,
            permissions,
            extra,
        } = new;
        let mut session = Session {
            id: SessionId::generate()?,
            user_id,
            email,
            role,
            created_at: now,
            last_access_at: now,
            ip_address,
            user_agent,
            permissions,
            extra,
        };
        for _ in 0..MAX_ID_ATTEMPTS {
            let indexed = self
                .index_add(
                    &index,
                    &session.id,
                    now.saturating_add(self.cap_ms),
                    now,
                    None,
                )
                .await?;
            let key = self.key(&session.id);
            let created = match self.layout {
                SessionLayout::Hash => {
                    let tmp = self.redis.keys().derived(&key, "create");
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    pipe.cmd("DEL").arg(&tmp).ignore();
                    let hset = pipe.cmd("HSET").arg(&tmp);
                    for (k, v) in session.hash_fields()? {
                        hset.arg(k).arg(v);
                    }
                    hset.ignore();
                    pipe.cmd("PEXPIRE").arg(&tmp).arg(ttl).ignore();
                    pipe.cmd("RENAMENX").arg(&tmp).arg(&key);
                    pipe.cmd("DEL").arg(&tmp).ignore();
                    let reply = self.redis.query_pipe("session.create", &pipe).await?;
                    matches!(reply.as_deref(), Some([Value::Int(1)]))
                }
                SessionLayout::Json => {
                    let doc = crate::codec::to_json("session", &session.to_json_object())?;
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(&key).arg(doc).arg("NX").arg("PX").arg(ttl);
                    !matches!(self.redis.query("session.create", &cmd).await?, Value::Nil)
                }
            };
            if created {
                // Sessions that end by idle timeout stay indexed until their deadline: pruned
                // at each power of two, the index holds at most about twice the live sessions
                // at a constant cost per create. The session exists either way.
                if indexed >= PRUNE_INDEX_FROM
                    && indexed.count_ones() == 1
                    && let Err(e) = self.prune_ended(&index).await
                {
                    tracing::warn!(error = %e, "session: pruning the user index failed");
                }
                return Ok(session);
            }
            // The id is taken by another session; its index entry is ours and stays harmless
            // (ownership is checked before anything is read or deleted through the index).
            session.id = SessionId::generate()?;
        }
        Err(Error::Unavailable {
            message: "no free session id found".into(),
            source: None,
        })
    }

    /// Returns the session and records the access: `lastAccessAt` = now and the idle TTL slid
    /// (never beyond the lifetime cap). `None` when the session does not exist, expired, or
    /// passed its lifetime cap (it is then deleted).
    ///
    /// Round trips: one (`EVALSHA` of [`lua::ACCESS_HASH`] / [`lua::ACCESS_JSON`]), atomic: a
    /// session deleted or expired concurrently is never recreated. Script-free mode: a `WATCH`
    /// transaction (two round trips plus the pool checkout), same guarantee.
    #[tracing::instrument(name = "session.get", skip_all)]
    pub async fn get(&self, id: &SessionId) -> Result<Option<Session>> {
        if !self.scripts {
            // Boxed so that the script path's future stays small.
            return Box::pin(self.transact(id, Change::Get)).await;
        }
        let key = self.key(id);
        let now = now_millis();
        let reply = self.access_script(&key, now, "get", None).await?;
        self.decode_access(id.clone(), &self.shown_key(), reply)
    }

    /// Records an access without reading the session: `lastAccessAt` = now, idle TTL slid.
    /// `false` when the session is gone (nothing is written then).
    ///
    /// Round trips: one script call, atomic (script-free: a `WATCH` transaction).
    #[tracing::instrument(name = "session.touch", skip_all)]
    pub async fn touch(&self, id: &SessionId) -> Result<bool> {
        if !self.scripts {
            return Ok(Box::pin(self.transact(id, Change::Touch)).await?.is_some());
        }
        let key = self.key(id);
        let reply = self
            .access_script(&key, now_millis(), "touch", None)
            .await?;
        match reply {
            Value::Nil => Ok(false),
            Value::Int(1) => Ok(true),
            other => self
                .decode_access(id.clone(), &self.shown_key(), other)
                .map(|s| s.is_some()),
        }
    }

    /// Changes some fields of a live session (and records the access). `None` when the session
    /// is gone: an update never recreates a deleted or expired session.
    ///
    /// Round trips: hash layout with scripting, one script call (atomic). JSON layout, or
    /// without scripting: a `WATCH` read-modify-write transaction (two round trips plus the pool
    /// checkout, retried on conflict) that rewrites only the changed members. A change that
    /// sets or removes more than [`MAX_EXTRA_CHANGES`] application-defined fields is
    /// [`Error::InvalidInput`] (nothing sent).
    #[tracing::instrument(name = "session.update", skip_all)]
    pub async fn update(&self, id: &SessionId, change: &SessionUpdate) -> Result<Option<Session>> {
        change.validate()?;
        if !self.scripts || self.layout == SessionLayout::Json {
            return Box::pin(self.transact(id, Change::Update(change))).await;
        }
        let key = self.key(id);
        let reply = self
            .access_script(&key, now_millis(), "update", Some(change))
            .await?;
        self.decode_access(id.clone(), &self.shown_key(), reply)
    }

    /// Deletes a session and its index entry. `false` when there was none.
    ///
    /// Whatever the configured layout, a session stored in the other one (a hash or a JSON
    /// string) is deleted too, as [`destroy_user`](Self::destroy_user) does: logging out must
    /// not depend on which service wrote the session.
    ///
    /// Round trips: one atomic read-and-delete (`MULTI HGET userId, GET, DEL`: the read of the
    /// other layout's type fails with `WRONGTYPE` inside the transaction and is ignored), then
    /// `ZREM` on the owner's index when a session was deleted.
    #[tracing::instrument(name = "session.destroy", skip_all)]
    pub async fn destroy(&self, id: &SessionId) -> Result<bool> {
        let key = self.key(id);
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        pipe.cmd("HGET").arg(&key).arg(fields::USER_ID);
        pipe.cmd("GET").arg(&key);
        pipe.cmd("DEL").arg(&key);
        let reply = self
            .redis
            .query_pipe("session.destroy", &pipe)
            .await?
            .unwrap_or_default();
        let owner = match <[Value; 3]>::try_from(reply) {
            Ok([_, _, Value::Int(0)]) => return Ok(false),
            Ok([Value::ServerError(_), json, _]) => self.owner_of(SessionLayout::Json, json),
            Ok([hash_owner, _, _]) => self.owner_of(SessionLayout::Hash, hash_owner),
            Err(reply) => {
                return Err(Error::decode(
                    self.shown_key(),
                    None,
                    format!("{} replies to a 3-command destroy transaction", reply.len()),
                ));
            }
        };
        // An owner that is not a valid key part cannot have an index entry.
        if let Some(index) = owner.and_then(|u| self.index_key(&u).ok()) {
            self.redis
                .query(
                    "session.destroy",
                    redis::cmd("ZREM").arg(&index).arg(id.as_str()),
                )
                .await?;
        }
        Ok(true)
    }

    /// Replaces the session's id with a fresh one (session fixation defence) and returns it;
    /// the old id stops working at once. Data, TTL and `createdAt` (so the lifetime cap) carry
    /// over. `None` when the session is gone.
    ///
    /// Atomic: one `RENAMENX old new`, which never overwrites a key (a collision draws another
    /// id) and fails when the old session is gone. In Cluster the new id is drawn so that its
    /// key hashes to the old key's slot (about 16,384 CRC16 candidates, a few ms), so the rename
    /// is a single-slot command on every topology and the key names stay the documented ones.
    ///
    /// Round trips: four. Read the owner; one `MULTI` on the owner's index adding the new id
    /// and the marker `rotating:<newId>`; `RENAMENX`; one `ZREM` of the old id and the marker.
    /// The index gains the new id before the rename, so it always lists every live session,
    /// and the marker keeps a concurrent [`SessionStore::list_user`] or
    /// [`SessionStore::destroy_user`] from pruning the new id while its key does not exist yet.
    /// Once the rename has succeeded the new id is returned even if that last `ZREM` fails
    /// (the index then holds the old id and the marker until its pruning removes them).
    #[tracing::instrument(name = "session.rotate_id", skip_all)]
    pub async fn rotate_id(&self, id: &SessionId) -> Result<Option<SessionId>> {
        let old_key = self.key(id);
        let Some((owner, created_at)) = self.owner_and_created(&old_key).await? else {
            return Ok(None);
        };
        let index = self.index_key(&owner).ok();
        for _ in 0..MAX_ID_ATTEMPTS {
            let new_id = if self.redis.keys().is_cluster() {
                let keys = self.redis.keys().clone();
                let slot = cluster_slot(&old_key);
                tokio::task::spawn_blocking(move || SessionId::generate_in_slot(&keys, slot))
                    .await
                    .map_err(|e| Error::Unavailable {
                        message: format!("session id search failed: {e}"),
                        source: None,
                    })??
            } else {
                SessionId::generate()?
            };
            let now = now_millis();
            let marker = format!("{ROTATING_PREFIX}{new_id}");
            if let Some(index) = &index {
                let mark = (
                    marker.as_str(),
                    now.saturating_add(millis_i64(ROTATION_MARK_LIFETIME)),
                );
                self.index_add(
                    index,
                    &new_id,
                    created_at.saturating_add(self.cap_ms),
                    now,
                    Some(mark),
                )
                .await?;
            }
            let new_key = self.key(&new_id);
            let renamed = self
                .redis
                .query(
                    "session.rotate_id",
                    redis::cmd("RENAMENX").arg(&old_key).arg(&new_key),
                )
                .await;
            let outcome = match renamed {
                Ok(Value::Int(1)) => Some(true),
                Ok(_) => None, // the new id is taken: draw another
                Err(Error::Server(e)) if e.detail().is_some_and(|d| d.contains("no such key")) => {
                    Some(false)
                }
                Err(e) => return Err(e),
            };
            if let Some(index) = &index {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(index).arg(&marker);
                match outcome {
                    Some(true) => zrem.arg(id.as_str()),
                    Some(false) => zrem.arg(new_id.as_str()),
                    // The taken id may be a session of this very user: its member stays.
                    None => &mut zrem,
                };
                match self.redis.query("session.rotate_id", &zrem).await {
                    Ok(_) => {}
                    // The session lives on under the new id, which only this reply can tell
                    // the caller: an error now would log the user out. The stale members go
                    // with the index's regular pruning (the old id's key is gone, the marker's
                    // score passes).
                    Err(e) if outcome == Some(true) => {
                        tracing::warn!(error = %e, "session.rotate_id: index clean-up failed");
                    }
                    Err(e) => return Err(e),
                }
            }
            match outcome {
                None => continue,
                Some(done) => return Ok(done.then_some(new_id)),
            }
        }
        Err(Error::Unavailable {
            message: "no free session id found".into(),
            source: None,
        })
    }

    /// The live sessions of `user_id`, oldest first, read without recording an access.
    ///
    /// Prunes the index on the way: members past their absolute deadline
    /// (`ZREMRANGEBYSCORE`), and members whose session is gone or belongs to someone else
    /// (after the index grace). Round trips: one `MULTI` on the index, one pipeline of reads
    /// (in Cluster: concurrent single-key reads), one `ZREM` when something is pruned. A
    /// listed session whose stored data does not decode fails the call with [`Error::Decode`]
    /// naming its field (the key is shown as `session:<redacted>`; `destroy_user` still
    /// erases it).
    ///
    /// Only sessions in the index `session:by-user:<userId>` are found: those created (or
    /// rotated) through this crate. A session written by another service that does not add it
    /// to the index (the documented TypeScript `SessionManager.createSession`, `HSET` +
    /// `EXPIRE` only) is not listed, even after this crate has read or touched it.
    ///
    /// A session stored in the other layout (see `REDIS_SESSION_LAYOUT`) is listed too, at the
    /// cost of two more round trips (the `TYPE` of each key, then the read its type takes).
    #[tracing::instrument(name = "session.list_user", skip_all)]
    pub async fn list_user(&self, user_id: &str) -> Result<Vec<Session>> {
        let index = self.index_key(user_id)?;
        let now = now_millis();
        let snapshot = self.index_members(&index, now, true).await?;
        let members = &snapshot.members;
        let cmds = members
            .iter()
            .map(|(id, _)| session_read(self.layout, &self.key(id)))
            .collect();
        let stored: Vec<(Option<SessionLayout>, Value)> =
            match self.redis.query_per_key(LIST_USER, cmds).await {
                Ok(replies) => replies
                    .into_iter()
                    .map(|r| (Some(self.layout), r))
                    .collect(),
                // A session of the user stored in the other layout (see `destroy_user`) is
                // listed too: each key is read by its type instead.
                Err(Error::Server(e)) if is_wrong_type(&e) => {
                    self.read_by_type(LIST_USER, members, session_read).await?
                }
                Err(e) => return Err(e),
            };
        let mut sessions = Vec::new();
        let mut prune = Vec::new();
        for ((id, deadline), (layout, reply)) in members.iter().zip(stored) {
            let session = match layout {
                Some(layout) => self.decode_in(layout, id.clone(), &self.shown_key(), reply)?,
                None => None,
            };
            match session {
                Some(s) if s.user_id == user_id => sessions.push(s),
                _ => {
                    if self.prunable(&snapshot, id, *deadline, now) {
                        prune.push(id.clone());
                    }
                }
            }
        }
        self.index_remove(&index, &prune).await?;
        sessions.sort_by_key(|s| (s.created_at, s.id.0.clone()));
        Ok(sessions)
    }

    /// Destroys every session of `user_id` ("log out everywhere", erasure) and returns how many
    /// were destroyed. Sessions are deleted only when their `userId` is `user_id`; stored data
    /// that does not decode is deleted too when its owner field says so.
    ///
    /// Round trips: one to read the index, one to read the owners, one to delete (in Cluster
    /// the per-session steps are concurrent single-key commands), one `ZREM`; two more when a
    /// session of the user is stored in the other layout (see `REDIS_SESSION_LAYOUT`), whose
    /// owner is then read by the key's type. A session created
    /// or rotated concurrently with this call may survive it (it is then still listed in the
    /// index, so the next call reaches it).
    ///
    /// Only sessions in the index are reached (see [`SessionStore::list_user`]): a session
    /// written by a service that does not index it, such as the documented TypeScript
    /// `SessionManager.createSession`, survives this call until its own TTL ends. Such a
    /// service must add `ZADD session:by-user:<userId> <createdAt + cap> <sessionId>` (and the
    /// index TTL, see `docs/keyspace.md`) for its sessions to be logged out and erased.
    #[tracing::instrument(name = "session.destroy_user", skip_all)]
    pub async fn destroy_user(&self, user_id: &str) -> Result<u64> {
        let index = self.index_key(user_id)?;
        let now = now_millis();
        let snapshot = self.index_members(&index, now, false).await?;
        let members = &snapshot.members;
        let owner_cmds = members
            .iter()
            .map(|(id, _)| owner_read(self.layout, &self.key(id)))
            .collect();
        let owners = match self
            .redis
            .query_per_key("session.destroy_user", owner_cmds)
            .await
        {
            Ok(replies) => replies
                .into_iter()
                .map(|reply| self.owner_of(self.layout, reply))
                .collect(),
            // A session stored in the other layout (written before `REDIS_SESSION_LAYOUT`
            // changed, or by a service configured otherwise) must not keep the user's other
            // sessions alive: read each key by its type instead.
            Err(Error::Server(e)) if is_wrong_type(&e) => self.owners_by_type(members).await?,
            Err(e) => return Err(e),
        };
        let mut doomed = Vec::new();
        let mut prune = Vec::new();
        for ((id, deadline), owner) in members.iter().zip(owners) {
            if owner.as_deref() == Some(user_id) {
                doomed.push(id.clone());
            } else if self.prunable(&snapshot, id, *deadline, now) {
                prune.push(id.clone());
            }
        }
        let del_cmds = doomed
            .iter()
            .map(|id| {
                let mut c = redis::cmd("DEL");
                c.arg(self.key(id));
                c
            })
            .collect();
        let deleted = self
            .redis
            .query_per_key("session.destroy_user", del_cmds)
            .await?;
        let count = deleted
            .iter()
            .filter(|v| matches!(v, Value::Int(1)))
            .count() as u64;
        prune.extend(doomed);
        self.index_remove(&index, &prune).await?;
        Ok(count)
    }

    // ---- internals -------------------------------------------------------------------------

    /// The `userId` in a reply to `HGET <key> userId` (hash layout) or `GET <key>`
    /// (JSON); `None` when there is none or the stored data does not say.
    fn owner_of(&self, layout: SessionLayout, reply: Value) -> Option<String> {
        let text = crate::codec::opt_text(&self.shown_key(), reply).unwrap_or(None)?;
        match layout {
            SessionLayout::Hash => Some(text),
            SessionLayout::Json => serde_json::from_str::<Map<String, Json>>(&text)
                .ok()?
                .get(fields::USER_ID)
                .and_then(Json::as_str)
                .map(str::to_owned),
        }
    }

    /// Each of `members`' sessions read by `read` in the layout its key's `TYPE` shows, with
    /// that layout: two round trips. A key that is gone or holds no session is `None`, with the
    /// reply of an `EXISTS` in place of a read (a type that changed again between the two
    /// steps is refused, and the caller may try again).
    async fn read_by_type(
        &self,
        operation: &'static str,
        members: &[(SessionId, i64)],
        read: fn(SessionLayout, &str) -> redis::Cmd,
    ) -> Result<Vec<(Option<SessionLayout>, Value)>> {
        let type_cmds = members
            .iter()
            .map(|(id, _)| {
                let mut c = redis::cmd("TYPE");
                c.arg(self.key(id));
                c
            })
            .collect();
        let types = self.redis.query_per_key(operation, type_cmds).await?;
        let layouts: Vec<Option<SessionLayout>> = types
            .into_iter()
            .map(|t| match crate::codec::opt_text(&self.shown_key(), t) {
                Ok(Some(t)) if t == "hash" => Some(SessionLayout::Hash),
                Ok(Some(t)) if t == "string" => Some(SessionLayout::Json),
                _ => None,
            })
            .collect();
        let read_cmds = members
            .iter()
            .zip(&layouts)
            .map(|((id, _), layout)| match layout {
                Some(layout) => read(*layout, &self.key(id)),
                None => exists(&self.key(id)),
            })
            .collect();
        let replies = self.redis.query_per_key(operation, read_cmds).await?;
        Ok(layouts.into_iter().zip(replies).collect())
    }

    /// The owners of `members`' sessions whatever layout each is stored in: two round trips.
    async fn owners_by_type(&self, members: &[(SessionId, i64)]) -> Result<Vec<Option<String>>> {
        Ok(self
            .read_by_type("session.destroy_user", members, owner_read)
            .await?
            .into_iter()
            .map(|(layout, reply)| layout.and_then(|l| self.owner_of(l, reply)))
            .collect())
    }

    /// An absent or foreign member may go once it is older than the grace (its deadline tells
    /// its creation time) or past its deadline, unless a rotation to it is in flight: its
    /// session is absent only because `RENAMENX` has not moved it into place yet.
    fn prunable(&self, snapshot: &IndexSnapshot, id: &SessionId, deadline: i64, now: i64) -> bool {
        if snapshot.rotating.contains(id.as_str()) {
            return false;
        }
        let created = deadline.saturating_sub(self.cap_ms);
        deadline <= now || created.saturating_add(self.index_grace_ms) <= now
    }

    /// `ZADD` + TTL of the index in one `MULTI`; the index lives as long as its longest-lived
    /// member (`PEXPIRE NX` sets a first TTL, `PEXPIRE GT` only ever extends it). `mark` adds a
    /// rotation marker `(member, score)` in the same `ZADD`.
    async fn index_add(
        &self,
        index: &str,
        id: &SessionId,
        deadline: i64,
        now: i64,
        mark: Option<(&str, i64)>,
    ) -> Result<i64> {
        let ttl = deadline.saturating_sub(now).max(1);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(index)
            .arg("-inf")
            .arg(now)
            .ignore();
        let zadd = pipe.cmd("ZADD").arg(index).arg(deadline).arg(id.as_str());
        if let Some((marker, score)) = mark {
            zadd.arg(score).arg(marker);
        }
        zadd.ignore();
        pipe.cmd("PEXPIRE").arg(index).arg(ttl).arg("NX").ignore();
        pipe.cmd("PEXPIRE").arg(index).arg(ttl).arg("GT").ignore();
        pipe.cmd("ZCARD").arg(index);
        let reply = self
            .redis
            .query_pipe("session.index", &pipe)
            .await?
            .unwrap_or_default();
        crate::codec::int(index, reply.into_iter().next().unwrap_or(Value::Nil))
    }

    /// Drops index members whose session has ended (idle timeout, a delete by another service)
    /// before their deadline, under the same grace and rotation rules as `list_user`. Three
    /// round trips: the members, an `EXISTS` per session (pipelined; concurrent in Cluster),
    /// one `ZREM`.
    async fn prune_ended(&self, index: &str) -> Result<()> {
        let now = now_millis();
        let snapshot = self.index_members(index, now, false).await?;
        let keys: Vec<String> = snapshot
            .members
            .iter()
            .map(|(id, _)| self.key(id))
            .collect();
        let replies = self
            .redis
            .query_each("session.index", "EXISTS", &keys)
            .await?;
        let ended: Vec<SessionId> = snapshot
            .members
            .iter()
            .zip(&replies)
            .filter(|((id, deadline), exists)| {
                **exists == Value::Int(0) && self.prunable(&snapshot, id, *deadline, now)
            })
            .map(|((id, _), _)| id.clone())
            .collect();
        self.index_remove(index, &ended).await
    }

    /// The index members with their deadlines, and the targets of rotations in flight;
    /// `prune_expired` first drops members past their deadline (same `MULTI`).
    async fn index_members(
        &self,
        index: &str,
        now: i64,
        prune_expired: bool,
    ) -> Result<IndexSnapshot> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if prune_expired {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(index)
                .arg("-inf")
                .arg(now)
                .ignore();
        }
        pipe.cmd("ZRANGE")
            .arg(index)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let reply = self
            .redis
            .query_pipe("session.index", &pipe)
            .await?
            .unwrap_or_default();
        let flat: Vec<Value> = match reply.into_iter().next() {
            Some(Value::Array(items)) => items,
            Some(Value::Nil) | None => Vec::new(),
            Some(other) => {
                return Err(Error::decode(
                    index,
                    None,
                    format!("expected a sorted set, got {other:?}"),
                ));
            }
        };
        let mut snapshot = IndexSnapshot::default();
        let mut push = |member: Value, score: Value| -> Result<()> {
            let member = crate::codec::text(index, None, member)?;
            let score = match score {
                Value::Double(d) => d,
                other => crate::codec::text(index, None, other)?
                    .parse::<f64>()
                    .map_err(|e| Error::decode(index, None, format!("bad score: {e}")))?,
            };
            if let Some(target) = member.strip_prefix(ROTATING_PREFIX) {
                snapshot.rotating.insert(target.to_owned());
            } else if let Ok(id) = member.parse::<SessionId>() {
                // Members are written by this module only; a malformed one is skipped, not fatal.
                snapshot.members.push((id, score as i64));
            }
            Ok(())
        };
        let mut iter = flat.into_iter();
        while let Some(item) = iter.next() {
            match item {
                // RESP3: [member, score] pairs.
                Value::Array(pair) => {
                    let mut p = pair.into_iter();
                    if let (Some(m), Some(s)) = (p.next(), p.next()) {
                        push(m, s)?;
                    }
                }
                member => {
                    if let Some(score) = iter.next() {
                        push(member, score)?;
                    }
                }
            }
        }
        Ok(snapshot)
    }

    async fn index_remove(&self, index: &str, ids: &[SessionId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(index);
        for id in ids {
            cmd.arg(id.as_str());
        }
        self.redis.query("session.index", &cmd).await?;
        Ok(())
    }

    async fn owner_and_created(&self, key: &str) -> Result<Option<(String, i64)>> {
        let id = SessionId(String::new());
        let reply = self
            .redis
            .query("session.read", &session_read(self.layout, key))
            .await?;
        Ok(self
            .decode_stored(id, &self.shown_key(), reply)?
            .map(|s| (s.user_id, s.created_at)))
    }

    async fn access_script(
        &self,
        key: &str,
        now: i64,
        mode: &str,
        change: Option<&SessionUpdate>,
    ) -> Result<Value> {
        let mut call = ScriptCall::new()
            .key(key)
            .arg(now)
            .arg(self.idle_ms)
            .arg(self.cap_ms)
            .arg(mode);
        let script = match self.layout {
            SessionLayout::Hash => {
                let sets = match change {
                    Some(c) => c.hash_sets()?,
                    None => Vec::new(),
                };
                call = call.arg(sets.len());
                for (k, v) in sets {
                    call = call.arg(k).arg(v);
                }
                if let Some(c) = change {
                    for k in &c.remove_extra {
                        call = call.arg(k.as_str());
                    }
                }
                &*ACCESS_HASH
            }
            SessionLayout::Json => &*ACCESS_JSON,
        };
        self.redis.eval_script(script, &call).await
    }

    /// Decodes `nil` | `{status, stored}` from an access script; errors name `key` (the
    /// redacted [`SessionStore::shown_key`]).
    fn decode_access(&self, id: SessionId, key: &str, reply: Value) -> Result<Option<Session>> {
        match reply {
            Value::Nil => Ok(None),
            Value::Array(mut items) if items.len() == 2 => {
                let stored = items.pop().unwrap_or(Value::Nil);
                if items.first() == Some(&Value::Int(0)) {
                    // The script wrote nothing: it cannot read `createdAt` (the decoder agrees,
                    // but a reply must never pass for an access that slid the TTL).
                    self.decode_stored(id, key, stored)?;
                    return Err(Error::decode(
                        key,
                        Some(fields::CREATED_AT),
                        "missing or not an integer of at most 17 characters",
                    ));
                }
                match self.decode_stored(id, key, stored)? {
                    Some(s) => Ok(Some(s)),
                    None => Err(Error::decode(key, None, "empty session record")),
                }
            }
            other => Err(Error::decode(
                key,
                None,
                format!("unexpected script reply {other:?}"),
            )),
        }
    }

    /// Decodes an `HGETALL` / `GET` reply in the configured layout; errors name `key` (the
    /// redacted [`SessionStore::shown_key`]).
    fn decode_stored(&self, id: SessionId, key: &str, stored: Value) -> Result<Option<Session>> {
        self.decode_in(self.layout, id, key, stored)
    }

    /// [`Self::decode_stored`] of a session stored in `layout`.
    fn decode_in(
        &self,
        layout: SessionLayout,
        id: SessionId,
        key: &str,
        stored: Value,
    ) -> Result<Option<Session>> {
        match layout {
            SessionLayout::Hash => match HashFields::from_reply(key, stored)? {
                None => Ok(None),
                Some(h) => Session::from_hash(id, h).map(Some),
            },
            SessionLayout::Json => match crate::codec::opt_text(key, stored)? {
                None => Ok(None),
                Some(doc) => {
                    let m: Map<String, Json> = crate::codec::from_json(key, doc.as_bytes())?;
                    Session::from_json_object(id, key, &m).map(Some)
                }
            },
        }
    }

    /// The script-free path: `WATCH key`, read, decide, `MULTI` write, `EXEC`; retried when a
    /// concurrent write aborts the `EXEC`. On a dedicated connection, bounded by twice the
    /// response timeout.
    async fn transact(&self, id: &SessionId, change: Change<'_>) -> Result<Option<Session>> {
        let mut conn = self.redis.dedicated().await?;
        let limit = self.redis.config().response_timeout.saturating_mul(2);
        let outcome = tokio::time::timeout(limit, self.transact_on(&mut conn, id, &change)).await;
        match outcome {
            Ok(result) => {
                if result.is_err() {
                    let _: redis::RedisResult<()> =
                        redis::cmd("UNWATCH").query_async(&mut conn).await;
                }
                result
            }
            Err(_) => {
                conn.discard();
                Err(Error::Timeout {
                    operation: "session transaction",
                    after: limit,
                })
            }
        }
    }

    async fn transact_on(
        &self,
        conn: &mut DedicatedConnection,
        id: &SessionId,
        change: &Change<'_>,
    ) -> Result<Option<Session>> {
        let key = self.key(id);
        let shown = self.shown_key();
        let op = "session transaction";
        for _ in 0..MAX_WATCH_ATTEMPTS {
            let mut read = redis::pipe();
            read.cmd("WATCH").arg(&key).ignore();
            read.add_command(session_read(self.layout, &key));
            let stored: Vec<Value> = read
                .query_async(conn)
                .await
                .map_err(|e| self.redis.fail(op, e))?;
            let stored = stored.into_iter().next().unwrap_or(Value::Nil);
            let now = now_millis();
            let mut write = redis::pipe();
            write.atomic();
            let session = match self.layout {
                SessionLayout::Hash => {
                    let Some(h) = HashFields::from_reply(&shown, stored)? else {
                        let _: () = redis::cmd("UNWATCH")
                            .query_async(conn)
                            .await
                            .map_err(|e| self.redis.fail(op, e))?;
                        return Ok(None);
                    };
                    let mut session = Session::from_hash(id.clone(), h)?;
                    let left = self.remaining(session.created_at, now);
                    if left <= 0 {
                        write.cmd("DEL").arg(&key).ignore();
                    } else {
                        session.last_access_at = now;
                        let hset = write.cmd("HSET").arg(&key);
                        hset.arg(fields::LAST_ACCESS_AT).arg(now);
                        if let Change::Update(c) = change {
                            for (k, v) in c.hash_sets()? {
                                hset.arg(k).arg(v);
                            }
                        }
                        hset.ignore();
                        if let Change::Update(c) = change
                            && !c.remove_extra.is_empty()
                        {
                            write
                                .cmd("HDEL")
                                .arg(&key)
                                .arg(c.remove_extra.iter().collect::<Vec<_>>())
                                .ignore();
                        }
                        write.cmd("PEXPIRE").arg(&key).arg(left).ignore();
                    }
                    (left > 0).then_some(session)
                }
                SessionLayout::Json => {
                    let Some(doc) = crate::codec::opt_text(&shown, stored)? else {
                        let _: () = redis::cmd("UNWATCH")
                            .query_async(conn)
                            .await
                            .map_err(|e| self.redis.fail(op, e))?;
                        return Ok(None);
                    };
                    let mut m: Map<String, Json> = crate::codec::from_json(&shown, doc.as_bytes())?;
                    let stored_members = m.clone();
                    let verbatim: HashMap<String, Box<RawValue>> =
                        crate::codec::from_json(&shown, doc.as_bytes())?;
                    let created = Session::from_json_object(id.clone(), &shown, &m)?.created_at;
                    let left = self.remaining(created, now);
                    if left <= 0 {
                        write.cmd("DEL").arg(&key).ignore();
                        None
                    } else {
                        m.insert(fields::LAST_ACCESS_AT.into(), now.into());
                        if let Change::Update(c) = change {
                            c.apply_json(&mut m);
                        }
                        let doc = encode_keeping_verbatim(&m, &stored_members, &verbatim)?;
                        write
                            .cmd("SET")
                            .arg(&key)
                            .arg(doc)
                            .arg("PX")
                            .arg(left)
                            .ignore();
                        Some(Session::from_json_object(id.clone(), &shown, &m)?)
                    }
                }
            };
            let done: Option<Vec<Value>> = write
                .query_async(conn)
                .await
                .map_err(|e| self.redis.fail(op, e))?;
            if done.is_some() {
                return match (session, change) {
                    (Some(mut s), Change::Update(c)) if self.layout == SessionLayout::Hash => {
                        apply_to_session(&mut s, c);
                        Ok(Some(s))
                    }
                    (s, _) => Ok(s),
                };
            }
        }
        Err(Error::Unavailable {
            message: "session transaction kept conflicting with concurrent writes".into(),
            source: None,
        })
    }
}

fn apply_to_session(s: &mut Session, c: &SessionUpdate) {
    if let Some(v) = &c.email {
        s.email = v.clone();
    }
    if let Some(v) = c.role {
        s.role = v;
    }
    if let Some(v) = &c.ip_address {
        s.ip_address = v.clone();
    }
    if let Some(v) = &c.user_agent {
        s.user_agent = v.clone();
    }
    if let Some(v) = &c.permissions {
        s.permissions = v.clone();
    }
    for (k, v) in &c.set_extra {
        s.extra.insert(k.clone(), v.clone());
    }
    for k in &c.remove_extra {
        s.extra.remove(k);
    }
}

/// The read whose reply [`SessionStore::owner_of`] decodes: `HGET <key> userId` or `GET <key>`.
fn owner_read(layout: SessionLayout, key: &str) -> redis::Cmd {
    match layout {
        SessionLayout::Hash => {
            let mut c = redis::cmd("HGET");
            c.arg(key).arg(fields::USER_ID);
            c
        }
        SessionLayout::Json => {
            let mut c = redis::cmd("GET");
            c.arg(key);
            c
        }
    }
}

/// `members` as a JSON object, each member that is unchanged from `stored` written as its
/// `verbatim` text: decoding and encoding again would turn an integer beyond 64 bits that
/// another service wrote into a rounded float (`1.2345678901234568e29`), and rewrite `1.10`
/// as `1.1`.
fn encode_keeping_verbatim(
    members: &Map<String, Json>,
    stored: &Map<String, Json>,
    verbatim: &HashMap<String, Box<RawValue>>,
) -> Result<String> {
    let mut doc = String::from("{");
    for (n, (name, value)) in members.iter().enumerate() {
        if n > 0 {
            doc.push(',');
        }
        doc.push_str(&crate::codec::to_json("session member name", name)?);
        doc.push(':');
        match verbatim.get(name) {
            Some(raw) if stored.get(name) == Some(value) => doc.push_str(raw.get()),
            _ => doc.push_str(&crate::codec::to_json("session", value)?),
        }
    }
    doc.push('}');
    Ok(doc)
}

/// The whole-session read of `layout`: `HGETALL <key>` or `GET <key>`.
fn session_read(layout: SessionLayout, key: &str) -> redis::Cmd {
    let mut c = redis::cmd(match layout {
        SessionLayout::Hash => "HGETALL",
        SessionLayout::Json => "GET",
    });
    c.arg(key);
    c
}

/// `EXISTS <key>`: the placeholder read of a key that holds no session.
fn exists(key: &str) -> redis::Cmd {
    let mut c = redis::cmd("EXISTS");
    c.arg(key);
    c
}

/// A `WRONGTYPE` reply, alone or inside a failed pipeline.
fn is_wrong_type(err: &redis::RedisError) -> bool {
    err.code() == Some("WRONGTYPE")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "WRONGTYPE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_long_url_safe_and_redacted() {
        let a = SessionId::generate().unwrap();
        let b = SessionId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 43);
        assert!(
            a.as_str()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(!format!("{a:?}").contains(a.as_str()));
        assert_eq!(a.to_string().parse::<SessionId>().unwrap(), a);
    }

    #[test]
    fn slot_search_finds_an_id_in_the_slot() {
        let keys = Keys::new("p:", true);
        let old = SessionId::generate().unwrap();
        let slot = cluster_slot(&keys.key_unchecked(Keyspace::Session, &[old.as_str()]));
        let new = SessionId::generate_in_slot(&keys, slot).unwrap();
        assert_ne!(old, new);
        assert_eq!(
            cluster_slot(&keys.key_unchecked(Keyspace::Session, &[new.as_str()])),
            slot
        );
    }

    #[test]
    fn a_vedfolnir_session_is_a_decode_error_naming_user_id() {
        // The sample of the Vedfolnir session document, in its own shape (docs/keyspace.md).
        let sample = serde_json::json!({
            "user_id": 1, "username": "admin", "role": "admin",
            "platform_connection_id": 123, "platform_name": "My Platform",
            "csrf_token": "abc123", "created_at": "2025-01-01T12:00:00Z",
            "last_activity": "2025-01-01T12:30:00Z"
        });
        let serde_json::Value::Object(m) = sample else {
            unreachable!()
        };
        let id = SessionId::generate().unwrap();
        match Session::from_json_object(id, "session:<redacted>", &m) {
            Err(Error::Decode { field, .. }) => assert_eq!(field.as_deref(), Some("userId")),
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    #[test]
    fn an_update_of_too_many_extra_fields_is_invalid_input() {
        let wide = (0..=MAX_EXTRA_CHANGES).fold(SessionUpdate::new(), |u, i| {
            if i % 2 == 0 {
                u.extra(format!("x{i}"), "v")
            } else {
                u.remove_extra(format!("x{i}"))
            }
        });
        assert!(matches!(
            wide.validate(),
            Err(Error::InvalidInput {
                what: "session update extra fields",
                ..
            })
        ));
        let most = (1..=MAX_EXTRA_CHANGES)
            .fold(SessionUpdate::new(), |u, i| u.extra(format!("x{i}"), "v"));
        assert!(most.validate().is_ok());
    }

    #[test]
    fn extra_names_may_not_shadow_documented_fields() {
        let new = NewSession::new("u1", "e", Role::User).extra("userId", "x");
        assert!(matches!(new.validate(), Err(Error::InvalidInput { .. })));
        assert!(NewSession::new("u:1", "e", Role::User).validate().is_err());
        assert!(
            SessionUpdate::new()
                .extra("role", "admin")
                .validate()
                .is_err()
        );
    }
}
