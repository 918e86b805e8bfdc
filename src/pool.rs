//! The topology-agnostic connection layer behind [`Redis`].
//!
//! Ordinary commands share a few long-lived multiplexed connections: the redis client pipelines
//! concurrent requests on one socket, and a pool checkout per command would add deadpool's
//! `UNWATCH` + `PING` recycle round trip (measured at 0.50× throughput at 1 task and 0.20× at
//! 16 tasks). Commands that need a connection of their own — blocking reads, `WATCH`
//! transactions — check one out of a deadpool pool whose connections have no response timeout;
//! their callers bound the wait themselves.

use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisFuture, Value};

use crate::clock::{ServerClock, time_reply_millis};
use crate::config::{Config, Topology};
use crate::error::{Error, Result};
use crate::keyspace::Keys;
use crate::script::Scripts;
use crate::ttl::TtlTable;

/// A connection to whatever topology is configured. Cheap to clone: clones share the socket.
#[derive(Clone)]
pub enum Connection {
    /// Standalone or the current Sentinel master.
    Single(MultiplexedConnection),
    /// Redis Cluster, routing each command by its keys.
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Connection {
    /// Bounds the response time of requests sent through this handle to `limit` (never above
    /// the configured response timeout), where the connection type supports it per handle
    /// (standalone and Sentinel). Returns whether it did: a caller with a deadline of its own
    /// then needs no timer of its own on top of the connection's.
    pub(crate) fn bound_response_time(&mut self, limit: Duration, configured: Duration) -> bool {
        match self {
            Connection::Single(c) => {
                c.set_response_timeout(limit.min(configured));
                true
            }
            #[cfg(feature = "cluster")]
            Connection::Cluster(_) => false,
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens connections for the configured topology.
enum Connector {
    Standalone(redis::Client),
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
    #[cfg(feature = "cluster")]
    Cluster {
        shared: Box<redis::cluster::ClusterClient>,
        blocking: Box<redis::cluster::ClusterClient>,
    },
}

fn redis_settings(config: &Config) -> redis::RedisConnectionInfo {
    let mut settings = redis::RedisConnectionInfo::default().set_db(config.db);
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    settings
}

/// A failed connection attempt. A refusal by the server (wrong password, `NOPERM`, a database
/// out of range) is [`Error::Server`], which retries leave alone (bar `LOADING` and the like):
/// trying again cannot fix a configuration. Everything else means no server answered.
fn connect_failure(message: String, err: redis::RedisError) -> Error {
    match err.kind() {
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::Server(_) => Error::Server(err),
        _ => Error::Unavailable {
            message,
            source: Some(err),
        },
    }
}

fn config_error(variable: &str, err: impl std::fmt::Display) -> Error {
    Error::Config(crate::config::ConfigError::invalid(
        variable,
        "",
        err.to_string(),
    ))
}

#[cfg(feature = "tls")]
fn tls_certificates(tls: &crate::config::TlsConfig) -> Result<redis::TlsCertificates> {
    let read = |variable: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::Config(crate::config::ConfigError::File {
                variable: variable.into(),
                path: path.to_owned(),
                reason: e.to_string(),
            })
        })
    };
    let root_cert = match &tls.ca_file {
        Some(path) => Some(read("REDIS_TLS_CA_FILE", path)?),
        None => None,
    };
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("REDIS_TLS_CERT_FILE", cert)?,
            client_key: read("REDIS_TLS_KEY_FILE", key)?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// The Sentinel addresses as connection addresses: TLS exactly when `config.tls` is on. An
/// address may carry a `redis://` / `rediss://` scheme (and, as before, credentials for the
/// Sentinels in URL form), but a scheme that disagrees with the TLS setting is refused: one of
/// the two connections would otherwise silently run in plaintext, or attempt a handshake the
/// configuration did not ask for.
#[cfg(feature = "sentinel")]
fn sentinel_addrs(
    config: &Config,
    sentinels: &[String],
) -> Result<(
    Vec<redis::ConnectionAddr>,
    Option<redis::RedisConnectionInfo>,
)> {
    const VARIABLE: &str = "REDIS_SENTINEL_ADDRS";
    let tls = config.tls.is_some();
    let mut addrs = Vec::with_capacity(sentinels.len());
    let mut credentials: Option<redis::RedisConnectionInfo> = None;
    for addr in sentinels {
        let (host, port, scheme_tls, settings) = if addr.contains("://") {
            let info = redis::IntoConnectionInfo::into_connection_info(addr.as_str())
                .map_err(|e| config_error(VARIABLE, e))?;
            let (host, port, scheme_tls) = match info.addr() {
                redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port, false),
                redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
                _ => {
                    return Err(config_error(
                        VARIABLE,
                        "a Sentinel address must be host:port, redis:// or rediss://",
                    ));
                }
            };
            (
                host,
                port,
                Some(scheme_tls),
                Some(info.redis_settings().clone()),
            )
        } else {
            let (host, port) = addr
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| config_error(VARIABLE, format!("{addr:?} is not host:port")))?;
            (host, port, None, None)
        };
        if let Some(scheme_tls) = scheme_tls
            && scheme_tls != tls
        {
            return Err(config_error(
                VARIABLE,
                if tls {
                    "a redis:// Sentinel address with REDIS_TLS on; use rediss:// or host:port"
                } else {
                    "a rediss:// Sentinel address with TLS off; set REDIS_TLS=true"
                },
            ));
        }
        if let Some(settings) = settings
            && (settings.username().is_some() || settings.password().is_some())
        {
            let same = |a: &redis::RedisConnectionInfo, b: &redis::RedisConnectionInfo| {
                a.username() == b.username() && a.password() == b.password()
            };
            match &credentials {
                Some(known) if !same(known, &settings) => {
                    return Err(config_error(
                        VARIABLE,
                        "Sentinel addresses carry different credentials; one set is used for all",
                    ));
                }
                Some(_) => {}
                None => credentials = Some(settings),
            }
        }
        addrs.push(if tls {
            redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(host, port)
        });
    }
    Ok((addrs, credentials))
}

/// How long a connection may carry unacknowledged data, or go unanswered by keepalive probes,
/// before the kernel closes it.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// The TCP options of every connection. A host that dies without closing its sockets (power
/// loss, a dropped NAT or conntrack entry) sends no reset, and a response timeout alone does not
/// replace a shared connection (a slow server times out too): without keepalive probes and
/// `TCP_USER_TIMEOUT` every call on it would time out until the kernel's retransmissions give up,
/// about 15 minutes on Linux. With them the kernel fails the socket within
/// [`DEAD_PEER_TIMEOUT`], the next call sees an I/O error and the connection is replaced. A
/// blocked `XREADGROUP`/`BLMOVE` is not affected: its request was acknowledged, and the idle
/// socket answers probes. `TCP_NODELAY`: each request is written whole, so Nagle's algorithm
/// could only hold a pipelined request back until the previous one is acknowledged.
pub(crate) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new()
        .with_time(DEAD_PEER_TIMEOUT / 2)
        .with_interval(DEAD_PEER_TIMEOUT / 6);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let keepalive = keepalive.with_retries(3);
    let settings = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(DEAD_PEER_TIMEOUT);
    settings
}

/// A Sentinel client whose connections to the Sentinels and to the master both follow
/// `config.tls` (mode and certificates) and whose master connection gets the configured
/// database, user, password and protocol. The Sentinels get credentials only from their own
/// URLs: `REDIS_USERNAME` / `REDIS_PASSWORD` are the master's, and a Sentinel without
/// `requirepass` refuses an `AUTH`.
#[cfg(feature = "sentinel")]
fn sentinel_client(
    config: &Config,
    master: &str,
    sentinels: &[String],
) -> Result<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    const VARIABLE: &str = "REDIS_SENTINEL_ADDRS";
    let (addrs, sentinel_credentials) = sentinel_addrs(config, sentinels)?;
    let node = redis_settings(config);
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(|e| config_error(VARIABLE, e))?
        .set_client_to_redis_db(node.db())
        .set_client_to_redis_protocol(node.protocol())
        .set_client_to_redis_tcp_settings(tcp_settings())
        .set_client_to_sentinel_tcp_settings(tcp_settings());
    if let Some(user) = node.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = node.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(sentinel) = &sentinel_credentials {
        if let Some(user) = sentinel.username() {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = sentinel.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        builder = builder
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_certificates(tls_certificates(tls)?)
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(tls_certificates(tls)?);
    }
    builder.build().map_err(|e| config_error(VARIABLE, e))
}

impl Connector {
    fn new(config: &Config) -> Result<Self> {
        #[cfg(feature = "tls")]
        {
            // rustls needs one process-wide crypto provider; installing it twice is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        #[cfg(not(feature = "tls"))]
        if config.tls.is_some() {
            return Err(Error::Unsupported(
                "TLS is configured but the crate was built without the `tls` feature".into(),
            ));
        }
        match &config.topology {
            Topology::Standalone => {
                let addr = match &config.tls {
                    Some(_) => redis::ConnectionAddr::TcpTls {
                        host: config.host.clone(),
                        port: config.port,
                        insecure: false,
                        tls_params: None,
                    },
                    None => redis::ConnectionAddr::Tcp(config.host.clone(), config.port),
                };
                let info = redis::IntoConnectionInfo::into_connection_info(addr)
                    .map_err(|e| config_error("REDIS_HOST", e))?
                    .set_redis_settings(redis_settings(config))
                    .set_tcp_settings(tcp_settings());
                #[cfg(feature = "tls")]
                if let Some(tls) = &config.tls {
                    let client = redis::Client::build_with_tls(info, tls_certificates(tls)?)
                        .map_err(|e| config_error("REDIS_TLS", e))?;
                    return Ok(Connector::Standalone(client));
                }
                let client =
                    redis::Client::open(info).map_err(|e| config_error("REDIS_HOST", e))?;
                Ok(Connector::Standalone(client))
            }
            #[cfg(feature = "sentinel")]
            Topology::Sentinel { master, sentinels } => Ok(Connector::Sentinel(
                tokio::sync::Mutex::new(sentinel_client(config, master, sentinels)?),
            )),
            #[cfg(not(feature = "sentinel"))]
            Topology::Sentinel { .. } => Err(Error::Unsupported(
                "Sentinel is configured but the crate was built without the `sentinel` feature"
                    .into(),
            )),
            #[cfg(feature = "cluster")]
            Topology::Cluster { nodes } => {
                let scheme = if config.tls.is_some() {
                    "rediss"
                } else {
                    "redis"
                };
                let urls = node_urls(nodes, scheme);
                let build = |response_timeout: Duration| {
                    let mut builder = redis::cluster::ClusterClientBuilder::new(urls.clone())
                        .connection_timeout(config.connect_timeout)
                        .response_timeout(response_timeout)
                        .tcp_settings(tcp_settings());
                    if let Some(user) = &config.username {
                        builder = builder.username(user);
                    }
                    if let Some(password) = &config.password {
                        builder = builder.password(password.expose());
                    }
                    #[cfg(feature = "tls")]
                    if let Some(tls) = &config.tls {
                        builder = builder.certs(tls_certificates(tls)?);
                    }
                    builder
                        .build()
                        .map_err(|e| config_error("REDIS_CLUSTER_NODES", e))
                };
                Ok(Connector::Cluster {
                    shared: Box::new(build(config.response_timeout)?),
                    // Blocking commands bound their own wait; a day is "no response timeout".
                    blocking: Box::new(build(Duration::from_secs(86_400))?),
                })
            }
            #[cfg(not(feature = "cluster"))]
            Topology::Cluster { .. } => Err(Error::Unsupported(
                "Cluster is configured but the crate was built without the `cluster` feature"
                    .into(),
            )),
        }
    }

    /// Opens a connection; `response_timeout: None` is for blocking commands.
    async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Option<Duration>,
    ) -> redis::RedisResult<Connection> {
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(response_timeout);
        match self {
            Connector::Standalone(client) => Ok(Connection::Single(
                client
                    .get_multiplexed_async_connection_with_config(&conn_config)
                    .await?,
            )),
            #[cfg(feature = "sentinel")]
            Connector::Sentinel(client) => {
                let mut client = client.lock().await;
                Ok(Connection::Single(
                    client
                        .get_async_connection_with_config(&conn_config)
                        .await?,
                ))
            }
            #[cfg(feature = "cluster")]
            Connector::Cluster { shared, blocking } => {
                let client = if response_timeout.is_some() {
                    shared
                } else {
                    blocking
                };
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// deadpool manager of dedicated connections (no response timeout).
struct DedicatedManager {
    connector: Arc<Connector>,
    connect_timeout: Duration,
    ping_number: AtomicUsize,
}

impl managed::Manager for DedicatedManager {
    type Type = Connection;
    type Error = redis::RedisError;

    async fn create(&self) -> redis::RedisResult<Connection> {
        self.connector.connect(self.connect_timeout, None).await
    }

    async fn recycle(
        &self,
        conn: &mut Connection,
        _: &Metrics,
    ) -> RecycleResult<redis::RedisError> {
        let ping = self.ping_number.fetch_add(1, Ordering::Relaxed).to_string();
        // A borrower may have left a WATCH behind (its future dropped between WATCH and EXEC).
        // Standalone, UNWATCH rides in the same round trip. A Cluster connection holds one
        // connection per node, and the client sends UNWATCH to every primary: a command of its
        // own, since a pipeline there must stay on one node.
        let mut pipe = redis::pipe();
        if matches!(conn, Connection::Single(_)) {
            pipe.cmd("UNWATCH").ignore();
        } else {
            tokio::time::timeout(
                self.connect_timeout,
                redis::cmd("UNWATCH").query_async::<Value>(conn),
            )
            .await
            .map_err(|_| managed::RecycleError::message("recycle UNWATCH timed out"))??;
        }
        pipe.cmd("PING").arg(&ping);
        let (pong,): (String,) = tokio::time::timeout(self.connect_timeout, pipe.query_async(conn))
            .await
            .map_err(|_| managed::RecycleError::message("recycle PING timed out"))??;
        if pong == ping {
            Ok(())
        } else {
            Err(managed::RecycleError::message("invalid PING response"))
        }
    }
}

/// A connection of its own for blocking commands or `WATCH` transactions, returned to the pool
/// on drop. It has no response timeout: bound every call with a deadline.
pub struct DedicatedConnection(Object<DedicatedManager>);

impl ConnectionLike for DedicatedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }
    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl DedicatedConnection {
    /// Drops the connection instead of returning it to the pool (after a timeout its state is
    /// unknown).
    pub fn discard(self) {
        let _ = Object::take(self.0);
    }
}

/// `host:port` addresses as URLs with `scheme`; addresses that carry a scheme stay as given.
#[cfg(feature = "cluster")]
fn node_urls(addrs: &[String], scheme: &str) -> Vec<String> {
    addrs
        .iter()
        .map(|a| {
            if a.contains("://") {
                a.clone()
            } else {
                format!("{scheme}://{a}")
            }
        })
        .collect()
}

/// One shared multiplexed connection, replaced after the connection breaks.
struct SharedSlot {
    conn: RwLock<Option<Connection>>,
    /// Held by the one caller reconnecting; holds the last failed attempt, so that callers
    /// who waited for it fail with it instead of each trying again in turn (with a silent
    /// host, the k-th waiter would otherwise wait k connect timeouts).
    reconnect: tokio::sync::Mutex<Option<FailedReconnect>>,
}

/// A reconnect attempt that failed.
struct FailedReconnect {
    ended: Instant,
    error: Error,
}

impl SharedSlot {
    fn ready(&self) -> Option<Connection> {
        self.conn.read().ok().and_then(|g| g.clone())
    }
}

/// What the server can do, learned at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Server version as reported by `HELLO` (e.g. `7.0.15`).
    pub version: String,
    /// `(major, minor)` parsed from [`Capabilities::version`].
    pub version_number: (u32, u32),
    /// Whether Lua scripts can run under the configured command names.
    pub scripting: bool,
    /// Why scripting is unusable, when it is.
    pub scripting_error: Option<String>,
}

/// The answer of [`Redis::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Round-trip time of one `PING`.
    pub ping: Duration,
    /// `master` or `replica`.
    pub role: String,
    /// Server version.
    pub version: String,
    /// `standalone`, `sentinel` or `cluster`, as the server reports it.
    pub mode: String,
}

struct Inner {
    config: Config,
    keys: Keys,
    ttl: TtlTable,
    connector: Arc<Connector>,
    shared: Vec<SharedSlot>,
    next_shared: AtomicUsize,
    dedicated: managed::Pool<DedicatedManager>,
    capabilities: Capabilities,
    scripts: Scripts,
    server_clock: ServerClock,
}

/// The handle everything hangs off: configuration, key builder, TTL table, connections and
/// the repositories. Cheap to clone; clones share everything.
///
/// ```no_run
/// # async fn demo() -> aether_redis::Result<()> {
/// let redis = aether_redis::Redis::connect(aether_redis::Config::from_env()?).await?;
/// let health = redis.health().await?;
/// println!("{} {} in {:?}", health.role, health.version, health.ping);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("topology", &self.inner.config.topology)
            .field("host", &self.inner.config.host)
            .field("port", &self.inner.config.port)
            .field("capabilities", &self.inner.capabilities)
            .finish_non_exhaustive()
    }
}

const MIN_VERSION: (u32, u32) = (7, 0);

fn parse_version(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Reads a field of a `HELLO` reply (a map in RESP3, a flat array in RESP2).
fn hello_field(reply: &Value, name: &str) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    match reply {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .and_then(|(_, v)| text(v)),
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.first().and_then(text).as_deref() == Some(name))
            .and_then(|pair| pair.get(1).and_then(text)),
        _ => None,
    }
}

impl Redis {
    /// Connects, checks the server (version ≥ 7.0, scripting under the configured names) and
    /// returns the handle. Fails fast with [`Error::Unavailable`] when no server answers,
    /// [`Error::Server`] when one refuses the login (wrong password, database out of range),
    /// [`Error::Unsupported`] when the server is too old and [`Error::Config`] when `config`
    /// breaks a rule its builder enforces (its fields are public, so it may have been changed
    /// after it was built).
    pub async fn connect(config: Config) -> Result<Redis> {
        config.validate()?;
        let connector = Arc::new(Connector::new(&config)?);
        let first = tokio::time::timeout(
            config.connect_timeout,
            connector.connect(config.connect_timeout, Some(config.response_timeout)),
        )
        .await
        .map_err(|_| Error::Unavailable {
            message: format!("connect timed out after {:?}", config.connect_timeout),
            source: None,
        })?
        .map_err(|e| connect_failure(format!("cannot connect: {e}"), e))?;

        let mut probe = first.clone();
        let hello: Value = redis::cmd("HELLO")
            .query_async(&mut probe)
            .await
            .map_err(|e| Error::from_redis_within("HELLO", config.response_timeout, e))?;
        let version = hello_field(&hello, "version").unwrap_or_default();
        let version_number = parse_version(&version);
        if version_number < MIN_VERSION {
            return Err(Error::Unsupported(format!(
                "server version {version} is older than the required {}.{}",
                MIN_VERSION.0, MIN_VERSION.1
            )));
        }
        let scripts = Scripts::new(&config);
        // A probe that cannot tell (the server busy, loading or paused for a failover, the
        // reply late) fails the connect, to be retried: it must not disable scripting for the
        // handle's lifetime with advice to rename commands.
        let scripting_error = scripts
            .probe(&mut probe)
            .await
            .map_err(|e| Error::from_redis_within("probing scripting", config.response_timeout, e))?
            .err();
        // Seeds the estimate that append cutoffs use; without it appends skip their age trim
        // until a lone `TIME` (tried at most once a minute) succeeds, so a refused `TIME` is
        // not an error.
        let server_clock = ServerClock::new();
        if let Ok(time) = redis::cmd("TIME").query_async::<Value>(&mut probe).await
            && let Some(ms) = time_reply_millis(&time)
        {
            server_clock.observe(ms);
        }
        let capabilities = Capabilities {
            version,
            version_number,
            scripting: scripting_error.is_none(),
            scripting_error,
        };

        let manager = DedicatedManager {
            connector: connector.clone(),
            connect_timeout: config.connect_timeout,
            ping_number: AtomicUsize::new(0),
        };
        let timeouts = managed::Timeouts {
            wait: Some(config.connect_timeout),
            create: Some(config.connect_timeout),
            recycle: Some(config.response_timeout),
        };
        let dedicated = managed::Pool::builder(manager)
            .max_size(config.pool_size)
            .timeouts(timeouts)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| config_error("REDIS_POOL_SIZE", e))?;

        let shared = (0..config.shared_connections)
            .map(|i| SharedSlot {
                conn: RwLock::new((i == 0).then(|| first.clone())),
                reconnect: tokio::sync::Mutex::new(None),
            })
            .collect();
        let keys = Keys::new(
            config.key_prefix.clone(),
            matches!(config.topology, Topology::Cluster { .. }),
        );
        let ttl = config.ttl();
        Ok(Redis {
            inner: Arc::new(Inner {
                config,
                keys,
                ttl,
                connector,
                shared,
                next_shared: AtomicUsize::new(0),
                dedicated,
                capabilities,
                scripts,
                server_clock,
            }),
        })
    }

    /// [`Config::from_env`] then [`Redis::connect`].
    pub async fn from_env() -> Result<Redis> {
        Self::connect(Config::from_env()?).await
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The key builder (prefix and topology layout applied).
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The TTL table in force.
    pub fn ttl(&self) -> &TtlTable {
        &self.inner.ttl
    }

    /// What the server supports, as found at connect.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    pub(crate) fn scripts(&self) -> &Scripts {
        &self.inner.scripts
    }

    pub(crate) fn server_clock(&self) -> &ServerClock {
        &self.inner.server_clock
    }

    /// `PING` round-trip time, role and version. Uses `HELLO`, so it answers for ACL users who
    /// may not run `INFO`. Two round trips, read-only; retried from the start on a connection
    /// error up to [`Config::max_retries`] times, 50 ms × the attempt number apart.
    pub async fn health(&self) -> Result<Health> {
        self.retry_idempotent(|| self.health_once()).await
    }

    async fn health_once(&self) -> Result<Health> {
        let mut conn = self.connection().await?;
        let started = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.fail("PING", e))?;
        let ping = started.elapsed();
        let hello: Value = redis::cmd("HELLO")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.fail("HELLO", e))?;
        Ok(Health {
            ping,
            role: hello_field(&hello, "role").unwrap_or_else(|| "unknown".into()),
            version: hello_field(&hello, "version").unwrap_or_default(),
            mode: hello_field(&hello, "mode").unwrap_or_else(|| "unknown".into()),
        })
    }

    /// A clone of a shared connection when one is up; `None` when the next call must reconnect.
    /// Never waits.
    pub(crate) fn ready_connection(&self) -> Option<Connection> {
        self.shared_slot().ready()
    }

    /// The shared connection slot the next call uses (round robin when there are several).
    fn shared_slot(&self) -> &SharedSlot {
        let shared = &self.inner.shared;
        let index = if shared.len() == 1 {
            0
        } else {
            self.inner.next_shared.fetch_add(1, Ordering::Relaxed) % shared.len()
        };
        &shared[index]
    }

    /// Classifies an error from a call bounded by its own `deadline` (shorter than the
    /// connection's response timeout): a timeout there says nothing about the connection, so
    /// unlike [`Redis::fail`] it leaves the shared connections in place.
    pub(crate) fn fail_within(
        &self,
        operation: &'static str,
        deadline: Duration,
        err: redis::RedisError,
    ) -> Error {
        if err.is_timeout() {
            Error::Timeout {
                operation,
                after: deadline,
            }
        } else {
            self.fail(operation, err)
        }
    }

    /// A clone of a shared multiplexed connection (no pool checkout), reconnecting if the last
    /// one broke. Prefer the repositories; this is for commands they do not cover.
    pub async fn connection(&self) -> Result<Connection> {
        let slot = self.shared_slot();
        if let Some(conn) = slot.ready() {
            return Ok(conn);
        }
        // Boxed: the reconnect's futures are large, and every operation's future embeds this
        // one, so inline they would make each call move kilobytes for a path it rarely takes.
        Box::pin(self.reconnect(slot)).await
    }

    async fn reconnect(&self, slot: &SharedSlot) -> Result<Connection> {
        let inner = &self.inner;
        let asked = Instant::now();
        let config = &inner.config;
        // A holder that is polled ends its attempt within one connect timeout; one that is not
        // (its future parked by a caller, unpolled) would hold every later caller for ever.
        let Ok(mut last_failure) =
            tokio::time::timeout(config.connect_timeout, slot.reconnect.lock()).await
        else {
            return Err(Error::Unavailable {
                message: format!(
                    "a reconnect in progress did not finish within {:?}",
                    config.connect_timeout
                ),
                source: None,
            });
        };
        if let Some(conn) = slot.ready() {
            return Ok(conn);
        }
        if let Some(failed) = last_failure.as_ref()
            && failed.ended >= asked
        {
            return Err(match &failed.error {
                Error::Unavailable { message, .. } => Error::Unavailable {
                    message: format!("{message} (the attempt this call waited for)"),
                    source: None,
                },
                refused => refused.clone(),
            });
        }
        let attempt = tokio::time::timeout(
            config.connect_timeout,
            inner
                .connector
                .connect(config.connect_timeout, Some(config.response_timeout)),
        )
        .await;
        let conn = match attempt {
            Ok(Ok(conn)) => conn,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => connect_failure(format!("cannot reconnect: {e}"), e),
                    _ => Error::Unavailable {
                        message: format!("reconnect timed out after {:?}", config.connect_timeout),
                        source: None,
                    },
                };
                *last_failure = Some(FailedReconnect {
                    ended: Instant::now(),
                    error: error.clone(),
                });
                return Err(error);
            }
        };
        *last_failure = None;
        if let Ok(mut guard) = slot.conn.write() {
            *guard = Some(conn.clone());
        }
        Ok(conn)
    }

    /// A dedicated connection from the pool, for blocking commands and `WATCH` transactions.
    pub async fn dedicated(&self) -> Result<DedicatedConnection> {
        self.inner
            .dedicated
            .get()
            .await
            .map(DedicatedConnection)
            .map_err(|e| match e {
                managed::PoolError::Backend(e) => {
                    connect_failure(format!("cannot open a dedicated connection: {e}"), e)
                }
                other => Error::Unavailable {
                    message: format!("dedicated connection pool: {other}"),
                    source: None,
                },
            })
    }

    /// Classifies an error from `operation` and, when the connection itself broke, drops the
    /// shared connections so that the next call reconnects.
    pub(crate) fn fail(&self, operation: &'static str, err: redis::RedisError) -> Error {
        // A response timeout is an I/O error too (`TimedOut`), but the connection is fine: the
        // server is slow, and replacing every shared connection on each timeout would add a
        // storm of reconnects to that load. A host that vanished is found by keepalive and
        // `TCP_USER_TIMEOUT`: the kernel's `ETIMEDOUT` reads as a timeout here as well (so the
        // call in flight reports `Error::Timeout`, rightly: its outcome is unknown), but it
        // ends the client's connection, and the next call finds it closed and reconnects.
        let broken = !err.is_timeout()
            && !crate::error::is_unexpected_reply(&err)
            && (err.is_connection_dropped()
                || err.is_io_error()
                || err.is_connection_refusal()
                || err.is_unrecoverable_error());
        if broken {
            for slot in &self.inner.shared {
                if let Ok(mut guard) = slot.conn.write() {
                    *guard = None;
                }
            }
        }
        Error::from_redis_within(operation, self.inner.config.response_timeout, err)
    }

    /// Sends one command on a shared connection and returns the raw reply.
    pub(crate) async fn query(&self, operation: &'static str, cmd: &Cmd) -> Result<Value> {
        let mut conn = self.connection().await?;
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| self.fail(operation, e))
    }

    /// Single-key commands on many keys, one reply each in order: one pipeline standalone,
    /// concurrent commands on the shared connection in Cluster. A Cluster pipeline must stay in
    /// one slot, and a multi-key command that the client splits across slots can report success
    /// while a node is down (a `DEL` of two keys on two nodes, one of them down, answered `0`),
    /// so on a Cluster every key gets a command of its own and every failure is an error.
    pub(crate) async fn query_per_key(
        &self,
        operation: &'static str,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if !self.keys().is_cluster() {
            let mut pipe = redis::pipe();
            for c in cmds {
                pipe.add_command(c);
            }
            return Ok(self.query_pipe(operation, &pipe).await?.unwrap_or_default());
        }
        let mut set = tokio::task::JoinSet::new();
        let n = cmds.len();
        for (i, c) in cmds.into_iter().enumerate() {
            let redis = self.clone();
            set.spawn(async move { (i, redis.query(operation, &c).await) });
        }
        let mut out = vec![Value::Nil; n];
        while let Some(joined) = set.join_next().await {
            let (i, reply) = joined.map_err(|e| Error::Unavailable {
                message: format!("{operation}: {e}"),
                source: None,
            })?;
            if let Some(slot) = out.get_mut(i) {
                *slot = reply?;
            }
        }
        Ok(out)
    }

    /// `command key` (`GET`, `EXISTS`, `DEL`, ..) for each of `keys`, as
    /// [`query_per_key`](Self::query_per_key) sends them; one reply per key, in order.
    pub(crate) async fn query_each<K: AsRef<str>>(
        &self,
        operation: &'static str,
        command: &str,
        keys: &[K],
    ) -> Result<Vec<Value>> {
        let cmds = keys
            .iter()
            .map(|key| {
                let mut cmd = redis::cmd(command);
                cmd.arg(key.as_ref());
                cmd
            })
            .collect();
        self.query_per_key(operation, cmds).await
    }

    /// `command` (`DEL`, `UNLINK`) of each of `keys`, as [`query_each`](Self::query_each)
    /// sends them; returns how many keys it removed.
    pub(crate) async fn delete_each(
        &self,
        operation: &'static str,
        command: &str,
        keys: &[String],
    ) -> Result<u64> {
        let replies = self.query_each(operation, command, keys).await?;
        Ok(replies.iter().filter(|r| **r == Value::Int(1)).count() as u64)
    }

    /// Sends a pipeline (or `MULTI`/`EXEC` when built with `.atomic()`) in one round trip and
    /// returns one raw reply per non-ignored command. A `MULTI` aborted by `WATCH` returns
    /// `None`.
    pub(crate) async fn query_pipe(
        &self,
        operation: &'static str,
        pipe: &Pipeline,
    ) -> Result<Option<Vec<Value>>> {
        let mut conn = self.connection().await?;
        pipe.query_async::<Option<Vec<Value>>>(&mut conn)
            .await
            .map_err(|e| self.fail(operation, e))
    }

    /// Like [`Redis::query`] for replies whose shape is fixed by Redis (counts, flags, OK): a
    /// reply of another type is a decode error naming `key`.
    pub(crate) async fn query_as<T: FromRedisValue>(
        &self,
        operation: &'static str,
        key: &str,
        cmd: &Cmd,
    ) -> Result<T> {
        let value = self.query(operation, cmd).await?;
        T::from_redis_value(value).map_err(|e| Error::decode(key, None, e.to_string()))
    }

    /// Retries `attempt` on connection-level failures ([`Error::Unavailable`]; never on
    /// timeouts, whose outcome is unknown) up to [`Config::max_retries`] times, pausing 50 ms ×
    /// the attempt number before each retry. Only for idempotent operations: an `Unavailable`
    /// from a connection that broke mid-request may follow a request the server did apply.
    pub(crate) async fn retry_idempotent<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut tries = 0;
        loop {
            match attempt().await {
                Err(e) if e.is_unavailable() && tries < self.inner.config.max_retries => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(tries))).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_fields_resp2_and_resp3() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let resp2 = Value::Array(vec![
            b("server"),
            b("redis"),
            b("version"),
            b("7.0.15"),
            b("role"),
            b("master"),
        ]);
        assert_eq!(hello_field(&resp2, "version").as_deref(), Some("7.0.15"));
        assert_eq!(hello_field(&resp2, "role").as_deref(), Some("master"));
        let resp3 = Value::Map(vec![
            (b("version"), b("7.2.1")),
            (b("proto"), Value::Int(3)),
        ]);
        assert_eq!(hello_field(&resp3, "version").as_deref(), Some("7.2.1"));
        assert_eq!(hello_field(&resp3, "proto").as_deref(), Some("3"));
        assert_eq!(hello_field(&resp3, "mode"), None);
    }

    #[test]
    fn versions_compare() {
        assert!(parse_version("6.2.14") < MIN_VERSION);
        assert!(parse_version("7.0.15") >= MIN_VERSION);
        assert!(parse_version("garbage") < MIN_VERSION);
    }
}
