//! Disposable Redis servers for tests — ours and our users'.
//!
//! The shared server of a test binary comes from, in order (override with
//! `AETHER_REDIS_TEST_BACKEND=url|docker|local`):
//! 1. `REDIS_URL`, a server someone else runs (tests never flush it; they use namespaces);
//! 2. Docker through testcontainers, image `redis:7.0`;
//! 3. a `redis-server` binary on `PATH`, spawned on a free loopback port.
//!
//! With none of them every test fails with one message saying how to get one. Each test gets a
//! unique key prefix from [`namespace`], so tests share a server without seeing each other's
//! keys. Fault tests start their own [`LocalServer`] (own port, own data dir, killed on drop,
//! restartable on the same port); topology tests use [`LocalCluster`] and [`LocalSentinel`].
//!
//! Processes and containers started for the shared server outlive no test binary: a watchdog
//! removes them when the binary exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::{Config, Environment, Topology};
use crate::pool::Redis;

/// Why no test server could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TestkitError(String);

type Result<T> = std::result::Result<T, TestkitError>;

fn err(message: impl Into<String>) -> TestkitError {
    TestkitError(message.into())
}

const HOW_TO_GET_ONE: &str = "no Redis for tests: set REDIS_URL to a server you run, start a \
     Docker engine with the image redis:7.0 available (../shared/scripts/local-redis-image builds \
     one), or install redis-server (apt-get install redis-server); \
     AETHER_REDIS_TEST_BACKEND=url|docker|local forces one";

/// Which backend supplied the shared server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `REDIS_URL`.
    Url,
    /// A testcontainers `redis:7.0` container.
    Docker,
    /// A local `redis-server` process.
    Local,
}

/// The server shared by every test of one test binary.
#[derive(Debug)]
pub struct SharedServer {
    /// Where it came from.
    pub backend: Backend,
    /// Its configuration (no key prefix; see [`namespace`]).
    pub config: Config,
    _local: Option<LocalServer>,
}

static SHARED: OnceLock<std::result::Result<SharedServer, TestkitError>> = OnceLock::new();
static SHARED_CLUSTER: OnceLock<std::result::Result<LocalCluster, TestkitError>> = OnceLock::new();

/// The configuration an example or a developer tool should connect with: `config` itself when
/// `REDIS_URL` is set or a server answers at its standalone address; otherwise the shared
/// disposable server's (see [`shared_server`]), keeping `config`'s key prefix and environment.
/// Prints which one it chose. The flag is `true` for the disposable server. Blocks while a
/// server starts: call it from `spawn_blocking` in async code.
pub fn config_or_disposable(config: Config) -> Result<(Config, bool)> {
    let explicit = std::env::var("REDIS_URL").is_ok_and(|u| !u.trim().is_empty());
    let answers = || {
        use std::net::ToSocketAddrs;
        (config.host.as_str(), config.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .is_some_and(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            })
    };
    if explicit || !matches!(config.topology, Topology::Standalone) || answers() {
        println!("using Redis at {}:{}", config.host, config.port);
        return Ok((config, false));
    }
    println!(
        "no Redis configured and none at {}:{}: starting a disposable one",
        config.host, config.port
    );
    let server = shared_server()?;
    println!(
        "disposable Redis ({:?}) at {}:{}",
        server.backend, server.config.host, server.config.port
    );
    let mut disposable = server.config.clone();
    disposable.key_prefix = config.key_prefix;
    disposable.environment = config.environment;
    Ok((disposable, true))
}

/// The shared standalone server, started on first use.
pub fn shared_server() -> Result<&'static SharedServer> {
    SHARED
        .get_or_init(|| {
            // Started on a thread of its own so that no test's runtime owns the container.
            std::thread::spawn(start_shared)
                .join()
                .map_err(|_| err("starting the shared server panicked"))?
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn start_shared() -> Result<SharedServer> {
    let forced = std::env::var("AETHER_REDIS_TEST_BACKEND").ok();
    let url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    let mut failures = Vec::new();
    let order: Vec<Backend> = match forced.as_deref() {
        Some("url") => vec![Backend::Url],
        Some("docker") => vec![Backend::Docker],
        Some("local") => vec![Backend::Local],
        Some(other) => {
            return Err(err(format!(
                "AETHER_REDIS_TEST_BACKEND={other:?} is not one of url, docker, local"
            )));
        }
        None if url.is_some() => vec![Backend::Url],
        None => vec![Backend::Docker, Backend::Local],
    };
    for backend in order {
        let attempt = match backend {
            Backend::Url => match &url {
                Some(url) => Config::from_url(url)
                    .map(|config| SharedServer {
                        backend,
                        config,
                        _local: None,
                    })
                    .map_err(|e| err(format!("REDIS_URL: {e}"))),
                None => Err(err("REDIS_URL is not set")),
            },
            #[cfg(feature = "testkit")]
            Backend::Docker => start_docker().map(|(host, port)| SharedServer {
                backend,
                config: base_config(&host, port),
                _local: None,
            }),
            Backend::Local => {
                LocalServer::start(LocalOptions::default()).map(|server| SharedServer {
                    backend,
                    config: server.config(),
                    _local: Some(server),
                })
            }
        };
        match attempt {
            Ok(server) => {
                eprintln!(
                    "aether-redis testkit: using {:?} Redis at {}:{}",
                    server.backend, server.config.host, server.config.port
                );
                return Ok(server);
            }
            Err(e) => failures.push(format!("{backend:?}: {e}")),
        }
    }
    Err(err(format!("{HOW_TO_GET_ONE} ({})", failures.join("; "))))
}

fn base_config(host: &str, port: u16) -> Config {
    Config {
        host: host.to_owned(),
        port,
        environment: Environment::Test,
        connect_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

fn start_docker() -> Result<(String, u16)> {
    use testcontainers::ImageExt;
    use testcontainers::runners::AsyncRunner;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("tokio runtime: {e}")))?;
    runtime.block_on(async {
        let container = testcontainers_modules::redis::Redis::default()
            .with_tag("7.0")
            .start()
            .await
            .map_err(|e| err(format!("docker: {e}")))?;
        let host = container
            .get_host()
            .await
            .map_err(|e| err(format!("docker host: {e}")))?
            .to_string();
        let port = container
            .get_host_port_ipv4(6379)
            .await
            .map_err(|e| err(format!("docker port: {e}")))?;
        watchdog(&format!("docker rm -f {} >/dev/null 2>&1", container.id()));
        // The watchdog removes the container when this process exits; dropping it here would
        // stop it while tests still use it.
        std::mem::forget(container);
        let host = if host == "localhost" {
            "127.0.0.1".to_owned()
        } else {
            host
        };
        Ok((host, port))
    })
}

/// Runs `cleanup` in a shell once this process has exited.
fn watchdog(cleanup: &str) {
    let pid = std::process::id();
    let script = format!("while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {cleanup}");
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// A unique key prefix for `test_name` (`t:<name>:<random>:`), so that tests sharing a server
/// never see each other's keys.
pub fn namespace(test_name: &str) -> String {
    let cleaned: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("t:{cleaned}:{}:", crate::random::token(6))
}

/// Topologies a contract test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestTopology {
    /// The shared standalone server.
    Standalone,
    /// The shared 3-master local cluster.
    Cluster,
}

/// A configuration for `test_name` on `topology`: test environment, unique key prefix.
pub fn config_for(topology: TestTopology, test_name: &str) -> Result<Config> {
    let mut config = match topology {
        TestTopology::Standalone => shared_server()?.config.clone(),
        TestTopology::Cluster => shared_cluster()?.config(),
    };
    config.key_prefix = namespace(test_name);
    config.environment = Environment::Test;
    Ok(config)
}

/// A connected handle for `test_name` on `topology`. Panics with the reason when no server can
/// be had (tests fail loudly; they never skip).
#[allow(clippy::panic)] // A test helper: failing the test is its way to report.
pub async fn redis_for(topology: TestTopology, test_name: &str) -> Redis {
    let config = match tokio::task::spawn_blocking({
        let name = test_name.to_owned();
        move || config_for(topology, &name)
    })
    .await
    {
        Ok(Ok(config)) => config,
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => panic!("testkit: {e}"),
    };
    match Redis::connect(config).await {
        Ok(redis) => redis,
        Err(e) => panic!("testkit: cannot connect to the test server: {e}"),
    }
}

/// The shared local cluster (3 masters), started on first use.
pub fn shared_cluster() -> Result<&'static LocalCluster> {
    SHARED_CLUSTER
        .get_or_init(|| LocalCluster::start(3))
        .as_ref()
        .map_err(Clone::clone)
}

/// Writes a contract test once and runs it against the standalone server and the cluster.
///
/// ```ignore
/// aether_redis::contract_tests! {
///     async fn sets_and_gets(redis) {
///         let conn = redis.connection().await.unwrap();
///         // ...
///     }
/// }
/// ```
#[macro_export]
macro_rules! contract_tests {
    ($( $(#[$meta:meta])* async fn $name:ident($redis:ident) $body:block )*) => {
        mod standalone {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $redis = $crate::testkit::redis_for(
                        $crate::testkit::TestTopology::Standalone,
                        stringify!($name),
                    )
                    .await;
                    $body
                }
            )*
        }
        mod cluster {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $redis = $crate::testkit::redis_for(
                        $crate::testkit::TestTopology::Cluster,
                        stringify!($name),
                    )
                    .await;
                    $body
                }
            )*
        }
    };
}

/// A loopback port that was free a moment ago (and whose cluster bus port, +10000, too).
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| err(format!("bind: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| err(format!("local_addr: {e}")))?
            .port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err(err("no free loopback port"))
}

fn redis_server_binary() -> Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = Path::new(dir).join("redis-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    for fixed in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if Path::new(fixed).is_file() {
            return Ok(PathBuf::from(fixed));
        }
    }
    Err(err("redis-server is not on PATH"))
}

/// Options of a [`LocalServer`].
#[derive(Debug, Clone, Default)]
pub struct LocalOptions {
    /// Extra `redis.conf` lines (e.g. `rename-command EVAL EVAL_x`, `appendonly yes`).
    pub config_lines: Vec<String>,
    /// A fixed port instead of a free one.
    pub port: Option<u16>,
    /// Run as a Sentinel (`--sentinel`).
    pub sentinel: bool,
}

/// A `redis-server` process of the test's own: random port, own data dir, killed on drop,
/// restartable on the same port.
#[derive(Debug)]
pub struct LocalServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    options: LocalOptions,
}

impl LocalServer {
    /// Starts a server and waits until it answers `PING`.
    pub fn start(options: LocalOptions) -> Result<LocalServer> {
        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        let dir = std::env::temp_dir().join(format!(
            "aether-redis-{}-{port}-{}",
            std::process::id(),
            crate::random::token(4)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        let mut server = LocalServer {
            port,
            dir,
            child: None,
            options,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let conf = self.dir.join("redis.conf");
        let mut text = format!(
            "port {}\nbind 127.0.0.1\ndir {}\nprotected-mode no\nlogfile {}\n{}",
            self.port,
            self.dir.display(),
            self.dir.join("redis.log").display(),
            if self.options.sentinel {
                ""
            } else {
                "save \"\"\nappendonly no\n"
            }
        );
        for line in &self.options.config_lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&conf, text).map_err(|e| err(format!("{}: {e}", conf.display())))?;
        let binary = redis_server_binary()?;
        // The shell keeps the server from outliving this process even if it is never dropped
        // (a static shared server) or the test binary is killed.
        let pid = std::process::id();
        let script = format!(
            "{} {}{} & r=$!; trap 'kill -9 $r 2>/dev/null; exit 0' TERM; \
             while kill -0 {pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.3; done; \
             kill -9 $r 2>/dev/null",
            binary.display(),
            conf.display(),
            if self.options.sentinel {
                " --sentinel"
            } else {
                ""
            }
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("spawning redis-server: {e}")))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
                && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
            {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query(&mut conn);
                match pong {
                    Ok(_) => return Ok(()),
                    // NOAUTH / NOPERM still prove the server is up.
                    Err(e) if e.code().is_some() => return Ok(()),
                    Err(_) => {}
                }
            }
            if started.elapsed() > limit {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                return Err(err(format!(
                    "redis-server on port {} did not start: {}",
                    self.port,
                    log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A standalone test configuration pointing at it.
    pub fn config(&self) -> Config {
        base_config("127.0.0.1", self.port)
    }

    /// Kills the server with SIGKILL (no shutdown save) and waits for the port to close.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Killing the watcher shell's child: SIGTERM to the shell runs its trap (kill -9).
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && started.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port and data dir (AOF/RDB files are kept).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of local `redis-server` processes, one master per node, no replicas.
#[derive(Debug)]
pub struct LocalCluster {
    nodes: Vec<LocalServer>,
}

impl LocalCluster {
    /// Starts `masters` nodes (1 to 16384), assigns the 16384 slots evenly and waits for
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<LocalCluster> {
        Self::start_with(masters, &[])
    }

    /// [`start`](Self::start) with `config_lines` added to every node's configuration (e.g.
    /// `appendonly yes`).
    pub fn start_with(masters: usize, config_lines: &[&str]) -> Result<LocalCluster> {
        if !(1..=16_384).contains(&masters) {
            return Err(err(format!(
                "a cluster needs 1 to 16384 masters, got {masters}"
            )));
        }
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let mut lines: Vec<String> = vec![
                "cluster-enabled yes".into(),
                "cluster-config-file nodes.conf".into(),
                "cluster-node-timeout 5000".into(),
            ];
            lines.extend(config_lines.iter().map(|l| (*l).to_owned()));
            nodes.push(LocalServer::start(LocalOptions {
                config_lines: lines,
                port: None,
                sentinel: false,
            })?);
        }
        let sync = |port: u16| {
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                .map_err(|e| err(format!("cluster node {port}: {e}")))
        };
        let per = 16_384 / masters;
        for (i, node) in nodes.iter().enumerate() {
            let mut conn = sync(node.port)?;
            let first = i * per;
            let last = if i + 1 == masters {
                16_383
            } else {
                first + per - 1
            };
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query::<()>(&mut conn)
                .map_err(|e| err(format!("ADDSLOTSRANGE: {e}")))?;
        }
        let mut first = sync(nodes[0].port)?;
        for node in &nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .query::<()>(&mut first)
                .map_err(|e| err(format!("CLUSTER MEET: {e}")))?;
        }
        let started = Instant::now();
        loop {
            let mut ok = true;
            for node in &nodes {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut sync(node.port)?)
                    .map_err(|e| err(format!("CLUSTER INFO: {e}")))?;
                let known = info
                    .lines()
                    .find_map(|l| l.strip_prefix("cluster_known_nodes:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                ok &= info.contains("cluster_state:ok") && known == masters;
            }
            if ok {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(err("cluster did not reach cluster_state:ok in 30 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(LocalCluster { nodes })
    }

    /// A test configuration with every node as a seed.
    pub fn config(&self) -> Config {
        let mut config = base_config("127.0.0.1", self.nodes[0].port);
        config.topology = Topology::Cluster {
            nodes: self
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port))
                .collect(),
        };
        config
    }

    /// The nodes.
    pub fn nodes(&self) -> &[LocalServer] {
        &self.nodes
    }

    /// The nodes, to kill and restart them (each keeps its port, data and `nodes.conf`).
    pub fn nodes_mut(&mut self) -> &mut [LocalServer] {
        &mut self.nodes
    }

    /// Which of [`nodes`](Self::nodes) serves `slot` (slots are assigned in even ranges).
    pub fn node_for_slot(&self, slot: u16) -> usize {
        let per = 16_384 / self.nodes.len().max(1);
        (usize::from(slot) / per).min(self.nodes.len().saturating_sub(1))
    }
}

/// A master plus one Sentinel monitoring it as `mymaster`.
#[derive(Debug)]
pub struct LocalSentinel {
    master: LocalServer,
    sentinel: LocalServer,
}

impl LocalSentinel {
    /// The monitored master's name.
    pub const MASTER_NAME: &'static str = "mymaster";

    /// Starts the master and a Sentinel (quorum 1) and waits until the Sentinel knows it.
    pub fn start() -> Result<LocalSentinel> {
        let master = LocalServer::start(LocalOptions::default())?;
        let sentinel = LocalServer::start(LocalOptions {
            config_lines: vec![
                format!(
                    "sentinel monitor {} 127.0.0.1 {} 1",
                    Self::MASTER_NAME,
                    master.port
                ),
                format!(
                    "sentinel down-after-milliseconds {} 5000",
                    Self::MASTER_NAME
                ),
            ],
            port: None,
            sentinel: true,
        })?;
        Ok(LocalSentinel { master, sentinel })
    }

    /// A test configuration that finds the master through the Sentinel.
    pub fn config(&self) -> Config {
        let mut config = base_config("127.0.0.1", self.master.port);
        config.topology = Topology::Sentinel {
            master: Self::MASTER_NAME.into(),
            sentinels: vec![format!("127.0.0.1:{}", self.sentinel.port)],
        };
        config
    }

    /// The master server.
    pub fn master(&self) -> &LocalServer {
        &self.master
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_without_masters_is_an_error_not_a_panic() {
        let e = LocalCluster::start(0).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("1 to 16384")));
    }
}
