//! Configuration: from the environment, from a URL, or by builder.
//!
//! Every variable the services this crate replaces read is honoured (see the README's
//! configuration table). A bad value is a [`ConfigError`] naming the variable and the value —
//! never a panic and never a silent default. Passwords never appear in `Debug` or `Display`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::keyspace::Keyspace;
use crate::rate_limit::{TierBound, tier_bounds};
use crate::ttl::TtlTable;

/// A rejected configuration value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A variable (or builder field) holds a value that cannot be used.
    #[error("invalid {variable}={value:?}: {reason}")]
    Invalid {
        /// The environment variable or builder field.
        variable: String,
        /// The offending value (`<redacted>` for secrets).
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A file named by a variable does not exist or cannot be read.
    #[error("{variable} names {path:?}, which cannot be read: {reason}")]
    File {
        /// The environment variable or builder field.
        variable: String,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        variable: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            variable: variable.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The variable or field the error is about.
    pub fn variable(&self) -> &str {
        match self {
            ConfigError::Invalid { variable, .. } | ConfigError::File { variable, .. } => variable,
        }
    }
}

/// Which column of the TTL table applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Environment {
    /// `production` / `prod`.
    Production,
    /// `development` / `dev` (the default).
    #[default]
    Development,
    /// `test`.
    Test,
}

impl FromStr for Environment {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "production" | "prod" => Ok(Environment::Production),
            "development" | "dev" => Ok(Environment::Development),
            "test" => Ok(Environment::Test),
            _ => Err(ConfigError::invalid(
                "environment",
                s,
                "expected production, prod, development, dev or test",
            )),
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Environment::Production => "production",
            Environment::Development => "development",
            Environment::Test => "test",
        })
    }
}

/// A secret string (password, URL with credentials). `Debug`/`Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is sent to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the deployment is laid out. `Debug` redacts credentials in URL-form addresses.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Topology {
    /// One server (`REDIS_URL` or `REDIS_HOST`/`REDIS_PORT`).
    #[default]
    Standalone,
    /// A master found through Sentinel (`REDIS_SENTINEL_MASTER`, `REDIS_SENTINEL_ADDRS`).
    Sentinel {
        /// The monitored master's name.
        master: String,
        /// Sentinel addresses, `host:port`.
        sentinels: Vec<String>,
    },
    /// Redis Cluster (`REDIS_CLUSTER_NODES`): seed nodes, `host:port`.
    Cluster {
        /// Seed nodes, `host:port`.
        nodes: Vec<String>,
    },
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |addrs: &[String]| addrs.iter().map(|a| redact_url(a)).collect::<Vec<_>>();
        match self {
            Topology::Standalone => f.write_str("Standalone"),
            Topology::Sentinel { master, sentinels } => f
                .debug_struct("Sentinel")
                .field("master", master)
                .field("sentinels", &redacted(sentinels))
                .finish(),
            Topology::Cluster { nodes } => f
                .debug_struct("Cluster")
                .field("nodes", &redacted(nodes))
                .finish(),
        }
    }
}

/// TLS settings (`REDIS_TLS`, `rediss://`, `REDIS_TLS_*_FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM file of the CA that signed the server certificate (else the system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    pub key_file: Option<PathBuf>,
}

/// How a session is laid out at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionLayout {
    /// A hash with one field per attribute (the documented layout).
    #[default]
    Hash,
    /// One JSON object at the key with the hash layout's member names (`userId`, `createdAt`
    /// in ms, ...): this crate's own schema. It does not read JSON sessions of other shapes,
    /// such as snake_case members with ISO 8601 times; those are decode errors.
    Json,
}

impl FromStr for SessionLayout {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hash" => Ok(SessionLayout::Hash),
            "json" => Ok(SessionLayout::Json),
            _ => Err(ConfigError::invalid(
                "session layout",
                s,
                "expected hash or json",
            )),
        }
    }
}

/// Everything needed to connect and to lay out data. Build with [`Config::from_env`],
/// [`Config::from_url`] or [`Config::builder`], or deserialize it from a configuration file.
///
/// # From a file
///
/// `Config` implements [`serde::Deserialize`] (any serde format: TOML, YAML, JSON). Every field
/// is optional and defaults as in [`Config::default`]; durations carry their unit in the name;
/// an unknown field is an error (a typo must not silently fall back to a default); the result is
/// validated like the builder's, and a value that fails names its field in the error.
///
/// ```
/// use std::time::Duration;
/// use aether_redis::{Config, Environment, Keyspace};
/// let config: Config = serde_json::from_str(r#"{
///     "url": "redis://:pw@cache.internal:6380/1",
///     "environment": "production",
///     "key_prefix": "mailer:",
///     "response_timeout_ms": 2000,
///     "ttl_secs": { "session": 7200 },
///     "renamed_commands": { "EVAL": "EVAL_b835c3f9a8" }
/// }"#).unwrap();
/// assert_eq!((config.host.as_str(), config.port, config.db), ("cache.internal", 6380, 1));
/// assert_eq!(config.environment, Environment::Production);
/// assert_eq!(config.ttl().get(Keyspace::Session), Duration::from_secs(7200));
///
/// let typo = serde_json::from_str::<Config>(r#"{ "key_prefx": "x:" }"#).unwrap_err();
/// assert!(typo.to_string().contains("key_prefx"));
/// let bad = serde_json::from_str::<Config>(r#"{ "environment": "staging-ish" }"#).unwrap_err();
/// assert!(bad.to_string().contains("environment"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "file::ConfigFile")]
#[non_exhaustive]
pub struct Config {
    /// Standalone, Sentinel or Cluster.
    pub topology: Topology,
    /// Server host (standalone), default `127.0.0.1`.
    pub host: String,
    /// Server port (standalone), default 6379.
    pub port: u16,
    /// ACL user name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// Logical database (standalone and Sentinel only).
    pub db: i64,
    /// TLS, when enabled.
    pub tls: Option<TlsConfig>,
    /// Per-request response timeout (`REDIS_TIMEOUT`, default 5 s).
    pub response_timeout: Duration,
    /// Connect timeout (`REDIS_CONNECT_TIMEOUT`, default 10 s).
    pub connect_timeout: Duration,
    /// Dedicated connections for blocking commands and transactions (`REDIS_POOL_SIZE`, default 16).
    pub pool_size: usize,
    /// How often an idempotent operation is retried after [`crate::Error::Unavailable`] (a
    /// refused, reset or dropped connection; never after a timeout, whose outcome is unknown)
    /// (`REDIS_MAX_RETRIES`, default 3; 0 turns retries off). Retries wait 50 ms × the attempt
    /// number. Exactly these operations retry: [`Redis::health`](crate::Redis::health),
    /// `CacheManager::get`, `get_many` and the first `GET` of `get_or_set`, `UserPrefs::get` and
    /// `get_record`. Every other operation makes one attempt and returns the error; the stream
    /// consumer's acknowledgements and the email queue worker's calls run in background loops
    /// that retry on their own schedule (`docs/operations.md`).
    pub max_retries: u32,
    /// Multiplexed connections that ordinary commands share (default 1; raise it when one
    /// connection's socket becomes the bottleneck).
    pub shared_connections: usize,
    /// Prefix of every key (`REDIS_KEY_PREFIX`), e.g. `vedfolnir:`; empty by default.
    pub key_prefix: String,
    /// Which TTL column applies (`APP_ENV`, else `NODE_ENV`; default development).
    pub environment: Environment,
    /// TTL table rows replaced (`REDIS_SESSION_TTL`, `REDIS_CACHE_TTL`, builder).
    pub ttl_overrides: BTreeMap<Keyspace, Duration>,
    /// The default rate-limit tier's window (`REDIS_RATE_LIMIT_WINDOW`, seconds).
    pub rate_limit_window: Option<Duration>,
    /// The default rate-limit tier's limit (`REDIS_RATE_LIMIT_MAX`).
    pub rate_limit_max: Option<u64>,
    /// Server commands renamed by `rename-command` (`REDIS_RENAMED_COMMANDS=EVAL=EVAL_x,...`);
    /// an empty new name means the command is disabled.
    pub renamed_commands: BTreeMap<String, String>,
    /// Session layout (`REDIS_SESSION_LAYOUT=hash|json`, default hash; see [`SessionLayout`]).
    pub session_layout: SessionLayout,
    /// Absolute session lifetime cap regardless of activity (`REDIS_SESSION_MAX_LIFETIME`,
    /// seconds; default 7 days).
    pub session_max_lifetime: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            topology: Topology::Standalone,
            host: "127.0.0.1".into(),
            port: 6379,
            username: None,
            password: None,
            db: 0,
            tls: None,
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            pool_size: 16,
            max_retries: 3,
            shared_connections: 1,
            key_prefix: String::new(),
            environment: Environment::Development,
            ttl_overrides: BTreeMap::new(),
            rate_limit_window: None,
            rate_limit_max: None,
            renamed_commands: BTreeMap::new(),
            session_layout: SessionLayout::Hash,
            session_max_lifetime: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Longest TTL a table row or the session lifetime cap may be set to: ten years, far past every
/// documented row (the longest is 30 days). A longer one would bring expiries near the range
/// where Redis refuses `PEXPIRE` (and Lua prints the number in exponent form), which would fail
/// a write after its data was stored, leaving a key without a TTL.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Most connections [`Config::pool_size`] and [`Config::shared_connections`] may each ask
/// for: Redis's default `maxclients`. Beyond it the server refuses them anyway, and a size in
/// the billions would only exhaust memory building the pool.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Most retries [`Config::max_retries`] may ask for. Each retry of a call to a silent host can
/// wait a connect timeout, so a count in the billions would make such a call wait for ever.
pub const MAX_RETRIES: u32 = 100;

/// Refuses `value` over `max`, naming `variable`.
fn at_most(variable: &str, value: Duration, max: Duration, shown: &str) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::invalid(
            variable,
            format!("{value:?}"),
            format!("must be at most {shown}"),
        ));
    }
    Ok(())
}

fn parse_num<T: FromStr>(variable: &str, value: &str, what: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| ConfigError::invalid(variable, value, format!("expected {what}")))
}

fn parse_bool(variable: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::invalid(
            variable,
            value,
            "expected true or false",
        )),
    }
}

fn parse_positive_secs(variable: &str, value: &str) -> Result<Duration, ConfigError> {
    let secs: u64 = parse_num(variable, value, "a whole number of seconds")?;
    if secs == 0 {
        return Err(ConfigError::invalid(variable, value, "must be at least 1"));
    }
    Ok(Duration::from_secs(secs))
}

fn parse_positive_millis(variable: &str, value: &str) -> Result<Duration, ConfigError> {
    let ms: u64 = parse_num(variable, value, "a whole number of milliseconds")?;
    if ms == 0 {
        return Err(ConfigError::invalid(variable, value, "must be at least 1"));
    }
    Ok(Duration::from_millis(ms))
}

fn parse_addr_list(variable: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let addrs: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let owned: Vec<String> = addrs.iter().map(|a| (*a).to_owned()).collect();
    check_addrs(variable, &redact_addrs(&owned), &addrs)
}

/// Checks `host:port` addresses (a `redis://`/`rediss://` scheme allowed); `value` is what the
/// error shows (with credentials already redacted).
fn check_addrs(variable: &str, value: &str, addrs: &[&str]) -> Result<Vec<String>, ConfigError> {
    if addrs.is_empty() {
        return Err(ConfigError::invalid(
            variable,
            value,
            "expected host:port[,host:port...]",
        ));
    }
    for addr in addrs {
        let bare = addr
            .strip_prefix("redis://")
            .or_else(|| addr.strip_prefix("rediss://"))
            .unwrap_or(addr);
        let port_ok = bare
            .rsplit_once(':')
            .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .unwrap_or(false);
        if !port_ok {
            return Err(ConfigError::invalid(
                variable,
                value,
                format!("{:?} is not host:port", redact_url(addr)),
            ));
        }
    }
    Ok(addrs.iter().map(|a| (*a).to_owned()).collect())
}

fn parse_renamed(variable: &str, value: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut map = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((from, to)) = item.split_once('=') else {
            return Err(ConfigError::invalid(
                variable,
                value,
                format!("{item:?} is not COMMAND=NEWNAME"),
            ));
        };
        insert_renamed(&mut map, variable, value, from, to)?;
    }
    Ok(map)
}

/// Adds one `command → new name` pair (command names are case-insensitive, so keyed upper
/// case); `value` is what the error shows.
fn insert_renamed(
    map: &mut BTreeMap<String, String>,
    variable: &str,
    value: &str,
    from: &str,
    to: &str,
) -> Result<(), ConfigError> {
    let (from, to) = (from.trim(), to.trim());
    let bad = |c: char| c.is_whitespace() || c == ',' || c == '=';
    if from.is_empty() || from.contains(bad) || to.contains(bad) {
        return Err(ConfigError::invalid(
            variable,
            value,
            format!("{from:?}={to:?} is not COMMAND=NEWNAME"),
        ));
    }
    map.insert(from.to_ascii_uppercase(), to.to_owned());
    Ok(())
}

fn check_file(variable: &str, path: &PathBuf) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .map_err(|e| ConfigError::File {
            variable: variable.into(),
            path: path.clone(),
            reason: e.to_string(),
        })
}

impl Config {
    /// Reads the process environment (see the README for every variable and its default).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`] but reads variables through `lookup`, so configuration can come
    /// from a map, a file or a test without touching the process environment.
    ///
    /// ```
    /// use aether_redis::{Config, Environment};
    /// let vars = [("REDIS_PORT", "6380"), ("APP_ENV", "prod")];
    /// let config = Config::from_lookup(|k| {
    ///     vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    /// })
    /// .unwrap();
    /// assert_eq!(config.port, 6380);
    /// assert_eq!(config.environment, Environment::Production);
    ///
    /// let err = Config::from_lookup(|k| (k == "REDIS_PORT").then(|| "abc".to_string()));
    /// assert_eq!(err.unwrap_err().variable(), "REDIS_PORT");
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut config = match get("REDIS_URL") {
            Some(url) => Self::from_url_named("REDIS_URL", &url)?,
            None => Config::default(),
        };
        // Empty means unset, as for every variable; whitespace only is a value, and `validate`
        // rejects it rather than falling back to the default host.
        if let Some(host) = lookup("REDIS_HOST").filter(|v| !v.is_empty()) {
            config.host = match host.trim() {
                "" => host,
                trimmed => trimmed.to_owned(),
            };
        }
        if let Some(v) = get("REDIS_PORT") {
            let port: u16 = parse_num("REDIS_PORT", &v, "a port number 1-65535")?;
            if port == 0 {
                return Err(ConfigError::invalid("REDIS_PORT", v, "must be 1-65535"));
            }
            config.port = port;
        }
        if let Some(v) = lookup("REDIS_PASSWORD").filter(|v| !v.is_empty()) {
            config.password = Some(Secret(v));
        }
        if let Some(v) = get("REDIS_USERNAME") {
            config.username = Some(v.trim().to_owned());
        }
        if let Some(v) = get("REDIS_DB") {
            let db: i64 = parse_num("REDIS_DB", &v, "a database number 0 or more")?;
            if db < 0 {
                return Err(ConfigError::invalid("REDIS_DB", v, "must be 0 or more"));
            }
            config.db = db;
        }
        let tls_switch = match get("REDIS_TLS") {
            Some(v) => Some((parse_bool("REDIS_TLS", &v)?, v)),
            None => None,
        };
        let mut tls_files = Vec::new();
        for (variable, slot) in [
            ("REDIS_TLS_CA_FILE", 0),
            ("REDIS_TLS_CERT_FILE", 1),
            ("REDIS_TLS_KEY_FILE", 2),
        ] {
            if let Some(v) = get(variable) {
                let path = PathBuf::from(v.trim());
                check_file(variable, &path)?;
                tls_files.push(variable);
                let tls = config.tls.get_or_insert_with(TlsConfig::default);
                match slot {
                    0 => tls.ca_file = Some(path),
                    1 => tls.cert_file = Some(path),
                    _ => tls.key_file = Some(path),
                }
            }
        }
        match tls_switch {
            Some((true, _)) => {
                config.tls.get_or_insert_with(TlsConfig::default);
            }
            // The switch wins over `rediss://` (variables override the URL's parts), but TLS
            // files with TLS off are a contradiction: ignoring them would be a silent default.
            Some((false, v)) => {
                if let Some(file) = tls_files.first() {
                    return Err(ConfigError::invalid(
                        "REDIS_TLS",
                        v,
                        format!("TLS is off but {file} is set; unset one of them"),
                    ));
                }
                config.tls = None;
            }
            None => {}
        }
        if let Some(v) = get("REDIS_TIMEOUT") {
            config.response_timeout = parse_positive_millis("REDIS_TIMEOUT", &v)?;
        }
        if let Some(v) = get("REDIS_CONNECT_TIMEOUT") {
            config.connect_timeout = parse_positive_millis("REDIS_CONNECT_TIMEOUT", &v)?;
        }
        if let Some(v) = get("REDIS_POOL_SIZE") {
            let size: usize = parse_num("REDIS_POOL_SIZE", &v, "a whole number")?;
            if size == 0 {
                return Err(ConfigError::invalid(
                    "REDIS_POOL_SIZE",
                    v,
                    "must be at least 1",
                ));
            }
            config.pool_size = size;
        }
        if let Some(v) = get("REDIS_MAX_RETRIES") {
            config.max_retries = parse_num("REDIS_MAX_RETRIES", &v, "a whole number")?;
        }
        if let Some(v) = lookup("REDIS_KEY_PREFIX") {
            config.key_prefix = v;
        }
        if let Some(v) = get("REDIS_SESSION_TTL") {
            config.ttl_overrides.insert(
                Keyspace::Session,
                parse_positive_secs("REDIS_SESSION_TTL", &v)?,
            );
        }
        if let Some(v) = get("REDIS_CACHE_TTL") {
            config
                .ttl_overrides
                .insert(Keyspace::Cache, parse_positive_secs("REDIS_CACHE_TTL", &v)?);
        }
        if let Some(v) = get("REDIS_RATE_LIMIT_WINDOW") {
            config.rate_limit_window = Some(parse_positive_secs("REDIS_RATE_LIMIT_WINDOW", &v)?);
        }
        if let Some(v) = get("REDIS_RATE_LIMIT_MAX") {
            let max: u64 = parse_num("REDIS_RATE_LIMIT_MAX", &v, "a whole number")?;
            if max == 0 {
                return Err(ConfigError::invalid(
                    "REDIS_RATE_LIMIT_MAX",
                    v,
                    "must be at least 1",
                ));
            }
            config.rate_limit_max = Some(max);
        }
        if let Some(v) = get("REDIS_SESSION_LAYOUT") {
            config.session_layout = v.parse().map_err(|_| {
                ConfigError::invalid("REDIS_SESSION_LAYOUT", &v, "expected hash or json")
            })?;
        }
        if let Some(v) = get("REDIS_SESSION_MAX_LIFETIME") {
            config.session_max_lifetime = parse_positive_secs("REDIS_SESSION_MAX_LIFETIME", &v)?;
        }
        match (get("REDIS_SENTINEL_MASTER"), get("REDIS_SENTINEL_ADDRS")) {
            (Some(master), Some(addrs)) => {
                config.topology = Topology::Sentinel {
                    master: master.trim().to_owned(),
                    sentinels: parse_addr_list("REDIS_SENTINEL_ADDRS", &addrs)?,
                };
            }
            (Some(master), None) => {
                return Err(ConfigError::invalid(
                    "REDIS_SENTINEL_ADDRS",
                    "",
                    format!("required when REDIS_SENTINEL_MASTER={master} is set"),
                ));
            }
            (None, Some(addrs)) => {
                return Err(ConfigError::invalid(
                    "REDIS_SENTINEL_MASTER",
                    "",
                    format!(
                        "required when REDIS_SENTINEL_ADDRS={} is set",
                        redact_list(&addrs)
                    ),
                ));
            }
            (None, None) => {}
        }
        if let Some(nodes) = get("REDIS_CLUSTER_NODES") {
            if matches!(config.topology, Topology::Sentinel { .. }) {
                return Err(ConfigError::invalid(
                    "REDIS_CLUSTER_NODES",
                    redact_list(&nodes),
                    "cannot be combined with REDIS_SENTINEL_MASTER",
                ));
            }
            config.topology = Topology::Cluster {
                nodes: parse_addr_list("REDIS_CLUSTER_NODES", &nodes)?,
            };
        }
        if let Some(v) = get("REDIS_RENAMED_COMMANDS") {
            config.renamed_commands = parse_renamed("REDIS_RENAMED_COMMANDS", &v)?;
        }
        let environment = get("APP_ENV")
            .map(|v| ("APP_ENV", v))
            .or_else(|| get("NODE_ENV").map(|v| ("NODE_ENV", v)));
        if let Some((variable, v)) = environment {
            config.environment = v.parse().map_err(|_| {
                ConfigError::invalid(
                    variable,
                    &v,
                    "expected production, prod, development, dev or test",
                )
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// A standalone configuration from a `redis://` or `rediss://` URL
    /// (`redis://[user][:password@]host[:port][/db]`).
    ///
    /// ```
    /// use aether_redis::Config;
    /// let config = Config::from_url("redis://:hunter2@cache.internal:6380/2").unwrap();
    /// assert_eq!((config.host.as_str(), config.port, config.db), ("cache.internal", 6380, 2));
    /// assert!(!format!("{config:?}").contains("hunter2"));
    /// assert!(Config::from_url("http://nope").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let config = Self::from_url_named("url", url)?;
        config.validate()?;
        Ok(config)
    }

    fn from_url_named(variable: &str, url: &str) -> Result<Self, ConfigError> {
        let shown = redact_url(url);
        let info = redis::IntoConnectionInfo::into_connection_info(url.trim())
            .map_err(|e| ConfigError::invalid(variable, &shown, e.to_string()))?;
        let mut config = Config::default();
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                config.host = host.clone();
                config.port = *port;
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                config.host = host.clone();
                config.port = *port;
                config.tls = Some(TlsConfig::default());
            }
            _ => {
                return Err(ConfigError::invalid(
                    variable,
                    &shown,
                    "expected a redis:// or rediss:// URL",
                ));
            }
        }
        let settings = info.redis_settings();
        config.db = settings.db();
        config.username = settings.username().map(str::to_owned);
        config.password = settings.password().map(|p| Secret(p.to_owned()));
        Ok(config)
    }

    /// A builder starting from the defaults.
    ///
    /// ```
    /// use std::time::Duration;
    /// use aether_redis::{Config, Environment, Keyspace};
    /// let config = Config::builder()
    ///     .host("10.0.0.5")
    ///     .environment(Environment::Production)
    ///     .key_prefix("mailer:")
    ///     .ttl(Keyspace::Cache, Duration::from_secs(60))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(config.ttl().get(Keyspace::Cache), Duration::from_secs(60));
    /// ```
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// A builder starting from this configuration.
    pub fn to_builder(&self) -> ConfigBuilder {
        ConfigBuilder {
            config: self.clone(),
        }
    }

    /// The TTL table in force: the environment's column plus overrides.
    pub fn ttl(&self) -> TtlTable {
        self.ttl_overrides
            .iter()
            .fold(TtlTable::new(self.environment), |t, (ks, d)| {
                t.with_override(*ks, *d)
            })
    }

    /// The name under which the server knows `command` (e.g. `EVAL` → `EVAL_b835c3f9a8`), or
    /// `None` when it was disabled by renaming it to the empty string.
    pub fn command_name<'a>(&'a self, command: &'a str) -> Option<&'a str> {
        match self.renamed_commands.get(command) {
            Some(renamed) if renamed.is_empty() => None,
            Some(renamed) => Some(renamed),
            None => Some(command),
        }
    }

    /// The checks every path (environment, URL, builder, file) goes through, so that no path
    /// accepts what another refuses. Errors name the environment variable of the field.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.host.trim().is_empty() {
            return Err(ConfigError::invalid(
                "REDIS_HOST",
                &self.host,
                "must not be empty",
            ));
        }
        if self.port == 0 {
            return Err(ConfigError::invalid("REDIS_PORT", "0", "must be 1-65535"));
        }
        if self.db < 0 {
            return Err(ConfigError::invalid(
                "REDIS_DB",
                self.db.to_string(),
                "must be 0 or more",
            ));
        }
        // The client sends `AUTH` only with a password: a user name alone would connect as
        // `default`, with that user's rights or none, instead of failing here.
        if let (Some(username), None) = (&self.username, &self.password) {
            return Err(ConfigError::invalid(
                "REDIS_USERNAME",
                username,
                "is set without REDIS_PASSWORD; the client authenticates only with a password",
            ));
        }
        // A brace would make every key a hash tag of the prefix (one Cluster slot for all) or
        // break the derived-key rule `{<base>}:suffix`.
        if self.key_prefix.contains(['{', '}'])
            || self
                .key_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::invalid(
                "REDIS_KEY_PREFIX",
                &self.key_prefix,
                "must not contain braces, whitespace or control characters",
            ));
        }
        if self.session_max_lifetime < Duration::from_millis(1) {
            return Err(ConfigError::invalid(
                "REDIS_SESSION_MAX_LIFETIME",
                format!("{:?}", self.session_max_lifetime),
                "must be at least 1 ms",
            ));
        }
        let (variable, addrs) = match &self.topology {
            Topology::Standalone => ("", &[][..]),
            Topology::Sentinel { master, sentinels } => {
                if master.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        "REDIS_SENTINEL_MASTER",
                        master,
                        "must not be empty",
                    ));
                }
                ("REDIS_SENTINEL_ADDRS", &sentinels[..])
            }
            Topology::Cluster { nodes } => ("REDIS_CLUSTER_NODES", &nodes[..]),
        };
        if !variable.is_empty() {
            let listed: Vec<&str> = addrs.iter().map(String::as_str).collect();
            check_addrs(variable, &redact_addrs(addrs), &listed)?;
            // An explicit scheme that contradicts the TLS setting would open that connection
            // in plaintext (or attempt TLS nobody configured) without a word.
            for addr in addrs {
                let scheme_tls = if addr.starts_with("rediss://") {
                    Some(true)
                } else if addr.starts_with("redis://") {
                    Some(false)
                } else {
                    None
                };
                if scheme_tls.is_some_and(|t| t != self.tls.is_some()) {
                    return Err(ConfigError::invalid(
                        variable,
                        redact_url(addr),
                        if self.tls.is_some() {
                            "a redis:// address with TLS on; write rediss:// or host:port"
                        } else {
                            "a rediss:// address with TLS off; set REDIS_TLS=true"
                        },
                    ));
                }
            }
        }
        for (from, to) in &self.renamed_commands {
            let bad = |c: char| c.is_whitespace() || c == ',' || c == '=';
            // `command_name` looks names up upper case: any other key would never match.
            if from.is_empty()
                || from.contains(bad)
                || to.contains(bad)
                || *from != from.to_ascii_uppercase()
            {
                return Err(ConfigError::invalid(
                    "REDIS_RENAMED_COMMANDS",
                    format!("{from}={to}"),
                    "expected COMMAND=NEWNAME: the command upper case, neither with whitespace, \
                     ',' or '='",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            for (variable, path) in [
                ("REDIS_TLS_CA_FILE", &tls.ca_file),
                ("REDIS_TLS_CERT_FILE", &tls.cert_file),
                ("REDIS_TLS_KEY_FILE", &tls.key_file),
            ] {
                if let Some(path) = path {
                    check_file(variable, path)?;
                }
            }
        }
        if self.response_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "REDIS_TIMEOUT",
                "0",
                "must be at least 1 ms",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "REDIS_CONNECT_TIMEOUT",
                "0",
                "must be at least 1 ms",
            ));
        }
        for (variable, size) in [
            ("REDIS_POOL_SIZE", self.pool_size),
            ("shared_connections", self.shared_connections),
        ] {
            if size == 0 || size > MAX_CONNECTIONS {
                return Err(ConfigError::invalid(
                    variable,
                    size.to_string(),
                    format!("must be 1 to {MAX_CONNECTIONS}"),
                ));
            }
        }
        if self.max_retries > MAX_RETRIES {
            return Err(ConfigError::invalid(
                "REDIS_MAX_RETRIES",
                self.max_retries.to_string(),
                format!("must be at most {MAX_RETRIES}"),
            ));
        }
        at_most(
            "REDIS_TIMEOUT",
            self.response_timeout,
            crate::codec::MAX_OPTION_DURATION,
            "1 year",
        )?;
        at_most(
            "REDIS_CONNECT_TIMEOUT",
            self.connect_timeout,
            crate::codec::MAX_OPTION_DURATION,
            "1 year",
        )?;
        at_most(
            "REDIS_SESSION_MAX_LIFETIME",
            self.session_max_lifetime,
            MAX_TTL,
            "10 years",
        )?;
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err(ConfigError::invalid(
                "REDIS_TLS_CERT_FILE",
                "",
                "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE must be given together",
            ));
        }
        if matches!(self.topology, Topology::Cluster { .. }) && self.db != 0 {
            return Err(ConfigError::invalid(
                "REDIS_DB",
                self.db.to_string(),
                "Redis Cluster has only database 0",
            ));
        }
        for (keyspace, ttl) in &self.ttl_overrides {
            let variable = match keyspace {
                Keyspace::Session => "REDIS_SESSION_TTL".to_owned(),
                Keyspace::Cache => "REDIS_CACHE_TTL".to_owned(),
                other => format!("ttl({other})"),
            };
            if ttl.is_zero() {
                return Err(ConfigError::invalid(variable, "0", "must be positive"));
            }
            at_most(&variable, *ttl, MAX_TTL, "10 years")?;
        }
        self.check_rate_limit("REDIS_RATE_LIMIT_MAX", "REDIS_RATE_LIMIT_WINDOW")
    }

    /// The default rate-limit tier within `Tier::new`'s bounds, so that a bad value fails here,
    /// naming `max_name` or `window_name`, not later in `rate_limiter()` without a name.
    fn check_rate_limit(&self, max_name: &str, window_name: &str) -> Result<(), ConfigError> {
        let limit = self.rate_limit_max.unwrap_or(100);
        let (window, window_name) = match self.rate_limit_window {
            Some(window) => (window, window_name.to_owned()),
            None => (
                self.ttl().get(Keyspace::RateLimit),
                format!("ttl({})", Keyspace::RateLimit),
            ),
        };
        tier_bounds(limit, window).map_err(|(bound, reason)| match bound {
            TierBound::Window => ConfigError::invalid(window_name, format!("{window:?}"), reason),
            TierBound::Limit | TierBound::Rate => {
                ConfigError::invalid(max_name, limit.to_string(), reason)
            }
        })
    }
}

/// `addrs` joined with `,`, credentials redacted, for an error message.
fn redact_addrs(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| redact_url(a))
        .collect::<Vec<_>>()
        .join(",")
}

/// A comma-separated address list as given, credentials redacted.
fn redact_list(value: &str) -> String {
    value
        .split(',')
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}<redacted>{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Builds a [`Config`]; every setter overrides one field, [`ConfigBuilder::build`] validates.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    config: Config,
}

impl ConfigBuilder {
    /// Server host (standalone).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = host.into();
        self
    }
    /// Server port (standalone).
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }
    /// ACL user name.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.config.username = Some(username.into());
        self
    }
    /// Password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.config.password = Some(Secret(password.into()));
        self
    }
    /// Logical database.
    pub fn db(mut self, db: i64) -> Self {
        self.config.db = db;
        self
    }
    /// Enables TLS with these settings.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }
    /// Standalone, Sentinel or Cluster.
    pub fn topology(mut self, topology: Topology) -> Self {
        self.config.topology = topology;
        self
    }
    /// Per-request response timeout.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.config.response_timeout = timeout;
        self
    }
    /// Connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }
    /// Dedicated connection pool size.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.config.pool_size = size;
        self
    }
    /// Retries after a connection error of the idempotent operations listed at
    /// [`Config::max_retries`].
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.config.max_retries = retries;
        self
    }
    /// Number of shared multiplexed connections.
    pub fn shared_connections(mut self, count: usize) -> Self {
        self.config.shared_connections = count;
        self
    }
    /// Prefix of every key.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }
    /// TTL column.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.config.environment = environment;
        self
    }
    /// Replaces one TTL table row.
    pub fn ttl(mut self, keyspace: Keyspace, ttl: Duration) -> Self {
        self.config.ttl_overrides.insert(keyspace, ttl);
        self
    }
    /// Declares a server command renamed by `rename-command` (empty `to`: disabled).
    pub fn renamed_command(mut self, command: &str, to: impl Into<String>) -> Self {
        self.config
            .renamed_commands
            .insert(command.to_ascii_uppercase(), to.into());
        self
    }
    /// Session layout.
    pub fn session_layout(mut self, layout: SessionLayout) -> Self {
        self.config.session_layout = layout;
        self
    }
    /// Absolute session lifetime cap.
    pub fn session_max_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.session_max_lifetime = lifetime;
        self
    }
    /// The default rate-limit tier (`limit` per `window`).
    pub fn rate_limit_default(mut self, limit: u64, window: Duration) -> Self {
        self.config.rate_limit_max = Some(limit);
        self.config.rate_limit_window = Some(window);
        self
    }
    /// Validates and returns the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// The serde shape of [`Config`]: plain values with units in the field names, converted and
/// validated into a `Config`.
mod file {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::{
        Config, ConfigError, Secret, TlsConfig, Topology, check_addrs, check_file, insert_renamed,
        redact_addrs,
    };
    use crate::keyspace::Keyspace;

    // No `Debug`: the password must not be printable from here either.
    #[derive(serde::Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct ConfigFile {
        url: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        username: Option<String>,
        password: Option<String>,
        db: Option<i64>,
        tls: Option<TlsFile>,
        response_timeout_ms: Option<u64>,
        connect_timeout_ms: Option<u64>,
        pool_size: Option<usize>,
        max_retries: Option<u32>,
        shared_connections: Option<usize>,
        key_prefix: Option<String>,
        environment: Option<String>,
        ttl_secs: BTreeMap<String, u64>,
        rate_limit_window_secs: Option<u64>,
        rate_limit_max: Option<u64>,
        renamed_commands: BTreeMap<String, String>,
        session_layout: Option<String>,
        session_max_lifetime_secs: Option<u64>,
        sentinel: Option<SentinelFile>,
        cluster_nodes: Option<Vec<String>>,
    }

    #[derive(serde::Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct TlsFile {
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SentinelFile {
        master: String,
        addrs: Vec<String>,
    }

    fn addr_list(field: &str, addrs: &[String]) -> Result<Vec<String>, ConfigError> {
        let trimmed: Vec<&str> = addrs.iter().map(|a| a.trim()).collect();
        check_addrs(field, &redact_addrs(addrs), &trimmed)
    }

    fn positive(
        field: &str,
        value: u64,
        unit: fn(u64) -> Duration,
    ) -> Result<Duration, ConfigError> {
        if value == 0 {
            return Err(ConfigError::invalid(field, "0", "must be at least 1"));
        }
        Ok(unit(value))
    }

    impl TryFrom<ConfigFile> for Config {
        type Error = ConfigError;

        fn try_from(f: ConfigFile) -> Result<Self, ConfigError> {
            let mut c = match &f.url {
                Some(url) => Config::from_url_named("url", url)?,
                None => Config::default(),
            };
            if let Some(host) = f.host {
                c.host = host;
            }
            if let Some(port) = f.port {
                if port == 0 {
                    return Err(ConfigError::invalid("port", "0", "must be 1-65535"));
                }
                c.port = port;
            }
            if let Some(username) = f.username {
                c.username = Some(username);
            }
            if let Some(password) = f.password {
                c.password = Some(Secret(password));
            }
            if let Some(db) = f.db {
                if db < 0 {
                    return Err(ConfigError::invalid(
                        "db",
                        db.to_string(),
                        "must be 0 or more",
                    ));
                }
                c.db = db;
            }
            if let Some(tls) = f.tls {
                for (field, path) in [
                    ("tls.ca_file", &tls.ca_file),
                    ("tls.cert_file", &tls.cert_file),
                    ("tls.key_file", &tls.key_file),
                ] {
                    if let Some(path) = path {
                        check_file(field, path)?;
                    }
                }
                c.tls = Some(TlsConfig {
                    ca_file: tls.ca_file,
                    cert_file: tls.cert_file,
                    key_file: tls.key_file,
                });
            }
            if let Some(ms) = f.response_timeout_ms {
                c.response_timeout = positive("response_timeout_ms", ms, Duration::from_millis)?;
            }
            if let Some(ms) = f.connect_timeout_ms {
                c.connect_timeout = positive("connect_timeout_ms", ms, Duration::from_millis)?;
            }
            if let Some(size) = f.pool_size {
                c.pool_size = size;
            }
            if let Some(retries) = f.max_retries {
                c.max_retries = retries;
            }
            if let Some(count) = f.shared_connections {
                c.shared_connections = count;
            }
            if let Some(prefix) = f.key_prefix {
                c.key_prefix = prefix;
            }
            if let Some(env) = f.environment {
                c.environment = env.parse().map_err(|_| {
                    ConfigError::invalid(
                        "environment",
                        &env,
                        "expected production, prod, development, dev or test",
                    )
                })?;
            }
            for (name, secs) in f.ttl_secs {
                let field = format!("ttl_secs.{name}");
                let keyspace = Keyspace::ALL
                    .into_iter()
                    .find(|k| k.name() == name)
                    .ok_or_else(|| {
                        ConfigError::invalid(&field, &name, "not a documented keyspace")
                    })?;
                c.ttl_overrides
                    .insert(keyspace, positive(&field, secs, Duration::from_secs)?);
            }
            if let Some(secs) = f.rate_limit_window_secs {
                c.rate_limit_window = Some(positive(
                    "rate_limit_window_secs",
                    secs,
                    Duration::from_secs,
                )?);
            }
            if let Some(max) = f.rate_limit_max {
                c.rate_limit_max = Some(max);
            }
            c.check_rate_limit("rate_limit_max", "rate_limit_window_secs")?;
            if !f.renamed_commands.is_empty() {
                let mut renamed = BTreeMap::new();
                for (from, to) in &f.renamed_commands {
                    let field = format!("renamed_commands.{from}");
                    insert_renamed(&mut renamed, &field, to, from, to)?;
                }
                c.renamed_commands = renamed;
            }
            if let Some(layout) = f.session_layout {
                c.session_layout = layout.parse().map_err(|_| {
                    ConfigError::invalid("session_layout", &layout, "expected hash or json")
                })?;
            }
            if let Some(secs) = f.session_max_lifetime_secs {
                c.session_max_lifetime =
                    positive("session_max_lifetime_secs", secs, Duration::from_secs)?;
            }
            match (f.sentinel, f.cluster_nodes) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        "sentinel",
                        "",
                        "sentinel and cluster_nodes exclude each other",
                    ));
                }
                (Some(sentinel), None) => {
                    if sentinel.master.trim().is_empty() {
                        return Err(ConfigError::invalid(
                            "sentinel.master",
                            "",
                            "must not be empty",
                        ));
                    }
                    c.topology = Topology::Sentinel {
                        master: sentinel.master,
                        sentinels: addr_list("sentinel.addrs", &sentinel.addrs)?,
                    };
                }
                (None, Some(nodes)) => {
                    c.topology = Topology::Cluster {
                        nodes: addr_list("cluster_nodes", &nodes)?,
                    };
                }
                (None, None) => {}
            }
            c.validate()?;
            Ok(c)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_without_variables() {
        let c = from(&[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.environment, Environment::Development);
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        for (var, value) in [
            ("REDIS_PORT", "abc"),
            ("REDIS_PORT", "0"),
            ("REDIS_DB", "-1"),
            ("APP_ENV", "staging-ish"),
            ("NODE_ENV", "qa"),
            ("REDIS_TIMEOUT", "5s"),
            ("REDIS_POOL_SIZE", "0"),
            ("REDIS_TLS", "maybe"),
            ("REDIS_SESSION_TTL", "-3"),
            ("REDIS_CLUSTER_NODES", "nohost"),
            ("REDIS_RENAMED_COMMANDS", "EVAL"),
            ("REDIS_URL", "http://x"),
            ("REDIS_RATE_LIMIT_MAX", "0"),
            ("REDIS_RATE_LIMIT_MAX", "1000000001"),
            // 10⁸ per the development TTL row (60 s) is more than one per µs.
            ("REDIS_RATE_LIMIT_MAX", "100000000"),
            ("REDIS_RATE_LIMIT_WINDOW", "0"),
            ("REDIS_RATE_LIMIT_WINDOW", "31622401"),
        ] {
            let err = from(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable(), var, "{err}");
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn default_rate_limit_tier_has_tier_bounds() {
        let err = from(&[
            ("REDIS_RATE_LIMIT_MAX", "1000000000"),
            ("REDIS_RATE_LIMIT_WINDOW", "1"),
        ])
        .unwrap_err();
        assert_eq!(err.variable(), "REDIS_RATE_LIMIT_MAX", "{err}");
        assert!(err.to_string().contains("microsecond"), "{err}");
        let ok = from(&[
            ("REDIS_RATE_LIMIT_MAX", "1000000"),
            ("REDIS_RATE_LIMIT_WINDOW", "1"),
        ])
        .unwrap();
        assert_eq!(ok.rate_limit_max, Some(1_000_000));
        for (limit, window, variable) in [
            (0, Duration::from_secs(60), "REDIS_RATE_LIMIT_MAX"),
            (10, Duration::from_micros(500), "REDIS_RATE_LIMIT_WINDOW"),
            (
                10,
                Duration::from_secs(400 * 86_400),
                "REDIS_RATE_LIMIT_WINDOW",
            ),
        ] {
            let err = Config::builder()
                .rate_limit_default(limit, window)
                .build()
                .unwrap_err();
            assert_eq!(err.variable(), variable, "{err}");
        }
        // A TTL-table window the default tier cannot use names the TTL row.
        let err = Config::builder()
            .ttl(Keyspace::RateLimit, Duration::from_secs(400 * 86_400))
            .rate_limit_default(10, Duration::from_secs(60))
            .build();
        assert!(
            err.is_ok(),
            "an explicit window does not depend on the TTL row"
        );
        let mut config = Config::default();
        config
            .ttl_overrides
            .insert(Keyspace::RateLimit, Duration::from_secs(400 * 86_400));
        config.rate_limit_max = Some(10);
        assert_eq!(config.validate().unwrap_err().variable(), "ttl(rate-limit)");
        // Also with nothing set for the default tier: its window is that TTL row.
        let err = Config::builder()
            .ttl(Keyspace::RateLimit, Duration::from_secs(400 * 86_400))
            .build()
            .unwrap_err();
        assert_eq!(err.variable(), "ttl(rate-limit)", "{err}");
    }

    /// Sizes and durations that would panic building the pool or make a write's `PEXPIRE`
    /// fail after its data was stored are refused, naming where they came from.
    #[test]
    fn oversized_pools_timeouts_and_ttls_are_refused() {
        let huge = u64::MAX.to_string();
        for (variable, value) in [
            ("REDIS_POOL_SIZE", huge.as_str()),
            ("REDIS_POOL_SIZE", "10001"),
            ("REDIS_SESSION_TTL", "10000000000000000"),
            ("REDIS_CACHE_TTL", huge.as_str()),
            ("REDIS_SESSION_MAX_LIFETIME", "315360001"),
            ("REDIS_TIMEOUT", huge.as_str()),
            ("REDIS_CONNECT_TIMEOUT", "31536000001"),
            ("REDIS_MAX_RETRIES", "4294967295"),
        ] {
            let err = Config::from_lookup(|k| (k == variable).then(|| value.to_owned()))
                .expect_err(variable);
            assert_eq!(err.variable(), variable, "{err}");
        }
        assert_eq!(
            Config::from_lookup(|k| (k == "REDIS_POOL_SIZE").then(|| "10000".to_owned()))
                .unwrap()
                .pool_size,
            MAX_CONNECTIONS
        );
        let ten_years = Config::builder()
            .ttl(Keyspace::TwoFactor, MAX_TTL)
            .session_max_lifetime(MAX_TTL)
            .build();
        assert!(ten_years.is_ok(), "{ten_years:?}");
        for (builder, variable) in [
            (
                Config::builder().ttl(Keyspace::TwoFactor, MAX_TTL + Duration::from_secs(1)),
                "ttl(2fa)",
            ),
            (
                Config::builder().ttl(Keyspace::Session, Duration::MAX),
                "REDIS_SESSION_TTL",
            ),
            (
                Config::builder().shared_connections(MAX_CONNECTIONS + 1),
                "shared_connections",
            ),
            (
                Config::builder().response_timeout(Duration::MAX),
                "REDIS_TIMEOUT",
            ),
        ] {
            let err = builder.build().unwrap_err();
            assert_eq!(err.variable(), variable, "{err}");
        }
        for (json, variable) in [
            (r#"{"ttl_secs": {"2fa": 18446744073709551615}}"#, "ttl(2fa)"),
            (r#"{"pool_size": 1000000000000}"#, "REDIS_POOL_SIZE"),
            (r#"{"shared_connections": 20000}"#, "shared_connections"),
        ] {
            let err = serde_json::from_str::<Config>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(variable), "{json}: {err}");
        }
    }

    /// What `from_env` refuses, the builder and the file refuse too, naming the same variable.
    #[test]
    fn builder_and_file_apply_the_environment_checks() {
        let builder_errors = [
            (Config::builder().key_prefix("app{1}:"), "REDIS_KEY_PREFIX"),
            (Config::builder().key_prefix("app 1:"), "REDIS_KEY_PREFIX"),
            (
                Config::builder().session_max_lifetime(Duration::ZERO),
                "REDIS_SESSION_MAX_LIFETIME",
            ),
            (Config::builder().host("   "), "REDIS_HOST"),
            (Config::builder().port(0), "REDIS_PORT"),
            (Config::builder().db(-1), "REDIS_DB"),
            (
                Config::builder().topology(Topology::Sentinel {
                    master: " ".into(),
                    sentinels: vec!["h:26379".into()],
                }),
                "REDIS_SENTINEL_MASTER",
            ),
            (
                Config::builder().topology(Topology::Sentinel {
                    master: "m".into(),
                    sentinels: Vec::new(),
                }),
                "REDIS_SENTINEL_ADDRS",
            ),
            (
                Config::builder().topology(Topology::Cluster {
                    nodes: vec!["nohost".into()],
                }),
                "REDIS_CLUSTER_NODES",
            ),
            (
                Config::builder().renamed_command("EVAL", "EVAL_a,EVAL_b"),
                "REDIS_RENAMED_COMMANDS",
            ),
        ];
        for (builder, variable) in builder_errors {
            let err = builder.build().unwrap_err();
            assert_eq!(err.variable(), variable, "{err}");
        }
        let tls = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        let err = Config::builder().tls(tls).build().unwrap_err();
        assert!(
            matches!(err, ConfigError::File { ref variable, .. } if variable == "REDIS_TLS_CA_FILE"),
            "{err}"
        );

        for (json, variable) in [
            (r#"{"key_prefix": "app{1}:"}"#, "REDIS_KEY_PREFIX"),
            (r#"{"host": "  "}"#, "REDIS_HOST"),
            (r#"{"url": "redis://h:1", "host": " "}"#, "REDIS_HOST"),
        ] {
            let err = serde_json::from_str::<Config>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(variable), "{json}: {err}");
        }
        assert_eq!(
            from(&[("REDIS_KEY_PREFIX", "app{1}:")])
                .unwrap_err()
                .variable(),
            "REDIS_KEY_PREFIX"
        );
    }

    #[test]
    fn node_schemes_must_agree_with_the_tls_setting() {
        for (vars, variable) in [
            (
                vec![
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_SENTINEL_ADDRS", "h1:26379,redis://h2:26379"),
                    ("REDIS_TLS", "true"),
                ],
                "REDIS_SENTINEL_ADDRS",
            ),
            (
                vec![
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_SENTINEL_ADDRS", "rediss://h1:26379"),
                ],
                "REDIS_SENTINEL_ADDRS",
            ),
            (
                vec![
                    ("REDIS_CLUSTER_NODES", "redis://a:7000"),
                    ("REDIS_TLS", "true"),
                ],
                "REDIS_CLUSTER_NODES",
            ),
        ] {
            let err = from(&vars).unwrap_err();
            assert_eq!(err.variable(), variable, "{err}");
        }
        let ok = from(&[
            ("REDIS_SENTINEL_MASTER", "m"),
            ("REDIS_SENTINEL_ADDRS", "h1:26379,rediss://h2:26379"),
            ("REDIS_TLS", "true"),
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        // The errors never show a password given in an address.
        for nodes in ["redis://:node-pw@a:7000", "redis://:node-pw@a:nope"] {
            let err = from(&[("REDIS_CLUSTER_NODES", nodes), ("REDIS_TLS", "true")]).unwrap_err();
            assert_eq!(err.variable(), "REDIS_CLUSTER_NODES", "{err}");
            assert!(!err.to_string().contains("node-pw"), "{err}");
        }
        let err = serde_json::from_str::<Config>(r#"{"cluster_nodes": ["redis://:node-pw@a:x"]}"#)
            .unwrap_err();
        assert!(!err.to_string().contains("node-pw"), "{err}");
    }

    #[test]
    fn whitespace_only_host_is_an_error_and_empty_means_unset() {
        let err = from(&[("REDIS_HOST", "   ")]).unwrap_err();
        assert_eq!(err.variable(), "REDIS_HOST", "{err}");
        assert_eq!(from(&[("REDIS_HOST", "")]).unwrap().host, "127.0.0.1");
        assert_eq!(
            from(&[("REDIS_HOST", " h.internal ")]).unwrap().host,
            "h.internal"
        );
    }

    #[test]
    fn redis_tls_false_turns_tls_off_or_names_the_contradiction() {
        let url = ("REDIS_URL", "rediss://cache.internal:6380");
        assert!(from(&[url]).unwrap().tls.is_some());
        let off = from(&[url, ("REDIS_TLS", "false")]).unwrap();
        assert_eq!(off.tls, None, "REDIS_TLS=false overrides rediss://");
        assert_eq!((off.host.as_str(), off.port), ("cache.internal", 6380));
        assert!(from(&[("REDIS_TLS", "true")]).unwrap().tls.is_some());

        let ca = std::env::temp_dir().join(format!("aether-redis-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "not checked here").unwrap();
        let ca_var = ("REDIS_TLS_CA_FILE", ca.to_str().unwrap());
        assert!(from(&[ca_var]).unwrap().tls.is_some());
        let err = from(&[ca_var, ("REDIS_TLS", "off")]).unwrap_err();
        assert_eq!(err.variable(), "REDIS_TLS", "{err}");
        assert!(err.to_string().contains("REDIS_TLS_CA_FILE"), "{err}");
        let _ = std::fs::remove_file(ca);
    }

    #[test]
    fn missing_tls_file_is_an_error() {
        let err = from(&[("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
        assert!(
            matches!(err, ConfigError::File { ref variable, .. } if variable == "REDIS_TLS_CA_FILE")
        );
    }

    #[test]
    fn deserializes_every_field_and_names_bad_ones() {
        let c: Config = serde_json::from_str(
            r#"{
                "host": "10.0.0.9", "port": 7000, "username": "app", "password": "pw-in-file",
                "response_timeout_ms": 1500, "connect_timeout_ms": 900, "pool_size": 4,
                "max_retries": 1, "shared_connections": 2, "key_prefix": "svc:",
                "environment": "test", "ttl_secs": { "cache": 12, "rate-limit": 30 },
                "rate_limit_window_secs": 60, "rate_limit_max": 10,
                "renamed_commands": { "eval": "EVAL_x", "KEYS": "" },
                "session_layout": "json", "session_max_lifetime_secs": 3600,
                "cluster_nodes": ["a:7000", "b:7001"]
            }"#,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("10.0.0.9", 7000));
        assert_eq!(c.response_timeout, Duration::from_millis(1500));
        assert_eq!(c.connect_timeout, Duration::from_millis(900));
        assert_eq!(
            (c.pool_size, c.max_retries, c.shared_connections),
            (4, 1, 2)
        );
        assert_eq!(c.environment, Environment::Test);
        assert_eq!(c.ttl().get(Keyspace::Cache), Duration::from_secs(12));
        assert_eq!(c.ttl().get(Keyspace::RateLimit), Duration::from_secs(30));
        assert_eq!(c.rate_limit_max, Some(10));
        assert_eq!(c.command_name("EVAL"), Some("EVAL_x"));
        assert_eq!(c.command_name("KEYS"), None);
        assert_eq!(c.session_layout, SessionLayout::Json);
        assert_eq!(c.session_max_lifetime, Duration::from_secs(3600));
        assert!(matches!(c.topology, Topology::Cluster { ref nodes } if nodes.len() == 2));
        assert!(!format!("{c:?}").contains("pw-in-file"));
        assert_eq!(
            serde_json::from_str::<Config>("{}").unwrap(),
            Config::default()
        );

        for (json, field) in [
            (r#"{"port": 0}"#, "port"),
            (r#"{"db": -1}"#, "db"),
            (r#"{"environment": "staging-ish"}"#, "environment"),
            (r#"{"response_timeout_ms": 0}"#, "response_timeout_ms"),
            (r#"{"ttl_secs": {"sessions": 5}}"#, "ttl_secs.sessions"),
            (r#"{"ttl_secs": {"session": 0}}"#, "ttl_secs.session"),
            (r#"{"session_layout": "xml"}"#, "session_layout"),
            (r#"{"cluster_nodes": ["nohost"]}"#, "cluster_nodes"),
            (
                r#"{"tls": {"ca_file": "/nonexistent/ca.pem"}}"#,
                "tls.ca_file",
            ),
            (r#"{"url": "http://x"}"#, "url"),
            (r#"{"pool_size": 0}"#, "REDIS_POOL_SIZE"),
            (r#"{"pool_sise": 3}"#, "pool_sise"),
            (
                r#"{"renamed_commands": {"EVAL": "a,b"}}"#,
                "renamed_commands.EVAL",
            ),
            (r#"{"cluster_nodes": []}"#, "cluster_nodes"),
            (r#"{"rate_limit_max": 0}"#, "rate_limit_max"),
            (
                r#"{"rate_limit_window_secs": 31622401}"#,
                "rate_limit_window_secs",
            ),
            (
                r#"{"rate_limit_max": 1000000000, "rate_limit_window_secs": 1}"#,
                "rate_limit_max",
            ),
        ] {
            let err = serde_json::from_str::<Config>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{json}: {err}");
        }
    }

    #[test]
    fn app_env_wins_over_node_env() {
        let c = from(&[("APP_ENV", "test"), ("NODE_ENV", "production")]).unwrap();
        assert_eq!(c.environment, Environment::Test);
        let c = from(&[("NODE_ENV", "prod")]).unwrap();
        assert_eq!(c.environment, Environment::Production);
    }

    #[test]
    fn ttl_overrides_apply() {
        let c = from(&[
            ("REDIS_SESSION_TTL", "100"),
            ("REDIS_CACHE_TTL", "7"),
            ("APP_ENV", "production"),
        ])
        .unwrap();
        assert_eq!(c.ttl().get(Keyspace::Session), Duration::from_secs(100));
        assert_eq!(c.ttl().get(Keyspace::Cache), Duration::from_secs(7));
        assert_eq!(c.ttl().get(Keyspace::RateLimit), Duration::from_secs(900));
    }

    #[test]
    fn renamed_commands_parse() {
        let c = from(&[(
            "REDIS_RENAMED_COMMANDS",
            "EVAL=EVAL_b835c3f9a8, script=SCRIPT_b835c3f9a8,KEYS=",
        )])
        .unwrap();
        assert_eq!(c.command_name("EVAL"), Some("EVAL_b835c3f9a8"));
        assert_eq!(c.command_name("SCRIPT"), Some("SCRIPT_b835c3f9a8"));
        assert_eq!(c.command_name("KEYS"), None);
        assert_eq!(c.command_name("EVALSHA"), Some("EVALSHA"));
    }

    #[test]
    fn passwords_never_print() {
        let c = from(&[
            ("REDIS_PASSWORD", "s3cr3t-pw"),
            ("REDIS_URL", "redis://u:other-pw@h:1/0"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t-pw") && !shown.contains("other-pw"),
            "{shown}"
        );
        let err = from(&[("REDIS_URL", "redis://u:pw-in-url@h:notaport")]).unwrap_err();
        assert!(!err.to_string().contains("pw-in-url"), "{err}");
        // Sentinel and Cluster addresses may carry credentials of their own.
        let c = from(&[
            ("REDIS_SENTINEL_MASTER", "m"),
            (
                "REDIS_SENTINEL_ADDRS",
                "redis://:sentinel-pw@s1:26379,s2:26379",
            ),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("sentinel-pw") && shown.contains("s1:26379"),
            "{shown}"
        );
        let c = from(&[("REDIS_CLUSTER_NODES", "redis://:node-pw@n1:7000")]).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("node-pw") && shown.contains("n1:7000"),
            "{shown}"
        );
        for vars in [
            &[("REDIS_SENTINEL_ADDRS", "redis://:sentinel-pw@s1:26379")][..],
            &[
                ("REDIS_SENTINEL_MASTER", "m"),
                ("REDIS_SENTINEL_ADDRS", "s1:26379"),
                (
                    "REDIS_CLUSTER_NODES",
                    "redis://:node-pw@n1:7000,redis://:node-pw@n2:7000",
                ),
            ],
        ] {
            let err = from(vars).unwrap_err().to_string();
            assert!(
                !err.contains("sentinel-pw") && !err.contains("node-pw"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_user_name_needs_a_password() {
        // Without a password the client never sends AUTH and would connect as `default`.
        let err = from(&[("REDIS_USERNAME", "app")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_USERNAME"), "{err}");
        assert!(Config::builder().username("app").build().is_err());
        let c = from(&[("REDIS_USERNAME", "app"), ("REDIS_PASSWORD", "pw")]).unwrap();
        assert_eq!(c.username.as_deref(), Some("app"));
    }

    #[test]
    fn topologies() {
        let c = from(&[
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            ("REDIS_SENTINEL_ADDRS", "10.0.0.1:26379,10.0.0.2:26379"),
        ])
        .unwrap();
        assert!(
            matches!(c.topology, Topology::Sentinel { ref sentinels, .. } if sentinels.len() == 2)
        );
        let c = from(&[("REDIS_CLUSTER_NODES", "a:7000,b:7001")]).unwrap();
        assert!(matches!(c.topology, Topology::Cluster { ref nodes } if nodes.len() == 2));
        assert!(from(&[("REDIS_SENTINEL_MASTER", "m")]).is_err());
    }
}
