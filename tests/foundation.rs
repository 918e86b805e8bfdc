//! Foundation: connection, capabilities, health, scripts, topologies.

use std::time::{Duration, Instant};

use aether_redis::script::{LuaScript, ScriptCall};
use aether_redis::testkit::{self, LocalSentinel, TestTopology};
use aether_redis::{Config, Error, Redis};

mod support;

/// Writes `value` at `key` and reads it back over the handle's shared connection.
async fn set_then_get(redis: &Redis, key: &str, value: &str) -> String {
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

aether_redis::contract_tests! {
    async fn health_reports_role_and_version(redis) {
        let health = redis.health().await.unwrap();
        assert_eq!(health.role, "master");
        assert!(health.version.starts_with('7'), "{}", health.version);
        assert!(redis.capabilities().scripting);
    }
}

/// A fault test: the flush would hit every test sharing the server.
#[tokio::test]
async fn scripts_survive_a_script_flush() {
    let server = start_local(Vec::new()).await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let script = LuaScript::new("echo", "return ARGV[1]");
    let key = redis
        .keys()
        .key(aether_redis::Keyspace::Cache, &["script"])
        .unwrap();
    let call = ScriptCall::new().key(key).arg("hello");
    let v = redis.eval_script(&script, &call).await.unwrap();
    assert_eq!(v, redis::Value::BulkString(b"hello".to_vec()));
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let v = redis.eval_script(&script, &call).await.unwrap();
    assert_eq!(v, redis::Value::BulkString(b"hello".to_vec()));
}

#[tokio::test]
async fn sentinel_connects_and_round_trips() {
    let sentinel = tokio::task::spawn_blocking(LocalSentinel::start)
        .await
        .unwrap()
        .unwrap();
    let redis = Redis::connect(sentinel.config()).await.unwrap();
    assert_eq!(set_then_get(&redis, "sentinel-k", "v").await, "v");
    assert_eq!(redis.health().await.unwrap().role, "master");
}

#[tokio::test]
async fn unreachable_server_is_unavailable_not_a_panic() {
    let port = testkit::free_port().unwrap();
    let config = Config::builder()
        .port(port)
        .connect_timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    let err = Redis::connect(config).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn connect_refuses_a_config_changed_into_an_invalid_one() {
    // Config's fields are public: a config edited after it was built is checked again at
    // connect, so a zero connection count cannot panic on the first command.
    let server = start_local(Vec::new()).await;
    let mut config = Config::builder().port(server.port()).build().unwrap();
    config.shared_connections = 0;
    match Redis::connect(config).await {
        Err(Error::Config(e)) => assert_eq!(e.variable(), "shared_connections"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let mut config = Config::builder().port(server.port()).build().unwrap();
    config.key_prefix = "app{1}:".into();
    assert!(matches!(
        Redis::connect(config).await,
        Err(Error::Config(_))
    ));
}

#[test]
fn topology_kind_is_standalone_for_the_shared_server() {
    let config = testkit::config_for(TestTopology::Standalone, "x").unwrap();
    assert!(config.key_prefix.starts_with("t:x:"));
    assert!(
        matches!(config.topology, aether_redis::Topology::Standalone),
        "{:?}",
        config.topology
    );
}

/// A CA of the test's own and a server certificate it signed for 127.0.0.1 / localhost, as
/// PEM files in a fresh directory: `(dir, ca.pem, server.pem, server.key)`.
#[cfg(feature = "tls")]
fn tls_material(
    name: &str,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
    let dir = std::env::temp_dir().join(format!("aether-redis-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert, server_cert.pem()).unwrap();
    std::fs::write(&key, server_key.serialize_pem()).unwrap();
    (dir, ca, cert, key)
}

/// `redis.conf` lines for a TLS port with these files (clients need no certificate).
#[cfg(feature = "tls")]
fn tls_lines(
    tls_port: u16,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Vec<String> {
    vec![
        format!("tls-port {tls_port}"),
        format!("tls-cert-file {}", cert.display()),
        format!("tls-key-file {}", key.display()),
        format!("tls-ca-cert-file {}", ca.display()),
        "tls-auth-clients no".into(),
    ]
}

/// A TLS-only port with a CA of the test's own; the client trusts that CA through
/// `TlsConfig::ca_file`, as `REDIS_TLS_CA_FILE` would configure it.
#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_connects_and_round_trips() {
    use aether_redis::config::TlsConfig;
    use aether_redis::testkit::{LocalOptions, LocalServer};

    let (dir, ca, cert, key) = tls_material("tls");
    let tls_port = testkit::free_port().unwrap();
    let options = LocalOptions {
        config_lines: tls_lines(tls_port, &ca, &cert, &key),
        ..LocalOptions::default()
    };
    let server = tokio::task::spawn_blocking(move || LocalServer::start(options))
        .await
        .unwrap()
        .unwrap();

    let mut tls = TlsConfig::default();
    tls.ca_file = Some(ca.clone());
    let config = Config::builder()
        .host("127.0.0.1")
        .port(tls_port)
        .tls(tls)
        .build()
        .unwrap();
    let redis = Redis::connect(config).await.unwrap();
    assert_eq!(set_then_get(&redis, "tls-k", "over-tls").await, "over-tls");

    // Without trusting the CA the handshake must fail: TLS is really verified.
    let untrusted = Config::builder()
        .host("127.0.0.1")
        .port(tls_port)
        .tls(TlsConfig::default())
        .connect_timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap();
    assert!(Redis::connect(untrusted).await.is_err());
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// Sentinel with TLS: the Sentinel and the master listen for TLS on ports of their own (their
/// plain ports only serve the testkit's readiness check), and the Sentinel knows the master by
/// its TLS port, so a round trip proves both connections ran over TLS with the configured CA.
#[cfg(feature = "tls")]
#[tokio::test]
async fn sentinel_over_tls_connects_and_round_trips() {
    use aether_redis::config::{TlsConfig, Topology};
    use aether_redis::testkit::{LocalOptions, LocalServer};

    let (dir, ca, cert, key) = tls_material("sentinel-tls");
    let master_tls = testkit::free_port().unwrap();
    let master_options = LocalOptions {
        config_lines: tls_lines(master_tls, &ca, &cert, &key),
        ..LocalOptions::default()
    };
    let master = tokio::task::spawn_blocking(move || LocalServer::start(master_options))
        .await
        .unwrap()
        .unwrap();
    let sentinel_tls = testkit::free_port().unwrap();
    let mut sentinel_lines = tls_lines(sentinel_tls, &ca, &cert, &key);
    sentinel_lines.extend([
        // The Sentinel's own links to the master use TLS too.
        "tls-replication yes".to_owned(),
        format!("sentinel monitor mymaster 127.0.0.1 {master_tls} 1"),
        "sentinel down-after-milliseconds mymaster 5000".to_owned(),
    ]);
    let sentinel_options = LocalOptions {
        config_lines: sentinel_lines,
        sentinel: true,
        ..LocalOptions::default()
    };
    let sentinel = tokio::task::spawn_blocking(move || LocalServer::start(sentinel_options))
        .await
        .unwrap()
        .unwrap();

    let topology = Topology::Sentinel {
        master: "mymaster".into(),
        sentinels: vec![format!("127.0.0.1:{sentinel_tls}")],
    };
    let mut tls = TlsConfig::default();
    tls.ca_file = Some(ca.clone());
    let config = Config::builder()
        .topology(topology.clone())
        .tls(tls)
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let redis = Redis::connect(config.clone()).await.unwrap();
    assert_eq!(
        set_then_get(&redis, "sentinel-tls-k", "over-tls").await,
        "over-tls"
    );
    assert_eq!(redis.health().await.unwrap().role, "master");
    // The dedicated pool goes through the Sentinel the same way.
    let mut dedicated = redis.dedicated().await.unwrap();
    let pong: String = redis::cmd("PING")
        .query_async(&mut dedicated)
        .await
        .unwrap();
    assert_eq!(pong, "PONG");

    // Same addresses without TLS: the handshake is refused, nothing falls back to plaintext.
    let plain = Config::builder()
        .topology(topology.clone())
        .connect_timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap();
    assert!(Redis::connect(plain).await.is_err());
    // A scheme that contradicts the TLS setting is refused before anything is sent: by the
    // builder, and by `connect` for a configuration changed after it was built.
    let plain_scheme = Topology::Sentinel {
        master: "mymaster".into(),
        sentinels: vec![format!("redis://127.0.0.1:{sentinel_tls}")],
    };
    let err = config
        .to_builder()
        .topology(plain_scheme.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.variable(), "REDIS_SENTINEL_ADDRS", "{err}");
    let mut mixed = config.clone();
    mixed.topology = plain_scheme;
    let err = Redis::connect(mixed).await.unwrap_err();
    assert!(
        matches!(err, Error::Config(ref e) if e.variable() == "REDIS_SENTINEL_ADDRS"),
        "{err:?}"
    );
    drop((sentinel, master));
    let _ = std::fs::remove_dir_all(dir);
}

/// The timer column (`tr` of `/proc/net/tcp`: 2 is keepalive) of every established socket
/// whose remote port is `port`, IPv4 and IPv6.
#[cfg(target_os = "linux")]
fn client_socket_timers(port: u16) -> Vec<String> {
    let mut timers = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = cols
                .get(2)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port) && cols.get(3) == Some(&"01") {
                timers.push(cols[5].split(':').next().unwrap_or_default().to_owned());
            }
        }
    }
    timers
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn connections_probe_a_silent_peer_with_keepalive() {
    // Without keepalive, a shared connection to a host that vanished without a reset would
    // time out call after call for about 15 minutes: nothing replaces it on a timeout alone.
    let server = start_local(Vec::new()).await;
    let redis = Redis::connect(Config::builder().port(server.port()).build().unwrap())
        .await
        .unwrap();
    redis.health().await.unwrap();
    let timers = client_socket_timers(server.port());
    assert!(
        !timers.is_empty(),
        "no connection to port {} found",
        server.port()
    );
    assert!(
        timers.iter().all(|t| t == "02"),
        "sockets without a keepalive timer: {timers:?}"
    );
}

async fn start_local(config_lines: Vec<String>) -> aether_redis::testkit::LocalServer {
    tokio::task::spawn_blocking(move || {
        aether_redis::testkit::LocalServer::start(aether_redis::testkit::LocalOptions {
            config_lines,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap()
}

fn app_user(server: &aether_redis::testkit::LocalServer) -> aether_redis::ConfigBuilder {
    Config::builder()
        .port(server.port())
        .username("app")
        .password("pw")
}

#[tokio::test]
async fn hardened_server_scripting_follows_the_configured_names() {
    let server = start_local(support::hardened_config_lines()).await;
    let renamed = app_user(&server)
        .renamed_command("EVAL", "EVAL_b835c3f9a8")
        .renamed_command("SCRIPT", "SCRIPT_b835c3f9a8")
        .build()
        .unwrap();
    let redis = Redis::connect(renamed).await.unwrap();
    assert!(redis.capabilities().scripting, "{:?}", redis.capabilities());
    let script = LuaScript::new("hardened-echo", "return ARGV[1]");
    let call = ScriptCall::new().key("k").arg("x");
    // First call loads the script through the renamed EVAL.
    assert_eq!(
        redis.eval_script(&script, &call).await.unwrap(),
        redis::Value::BulkString(b"x".to_vec())
    );
    // INFO is @dangerous for this user: health must still answer.
    let health = redis.health().await.unwrap();
    assert_eq!(health.role, "master");
    assert!(health.version.starts_with("7."));

    // Without the names, scripting is detected as unusable at connect, not mid-request.
    let unaware = Redis::connect(app_user(&server).build().unwrap())
        .await
        .unwrap();
    assert!(!unaware.capabilities().scripting);
    let err = unaware.require_scripting("a limiter").unwrap_err();
    assert!(
        matches!(err, Error::Unsupported(ref m) if m.contains("a limiter")),
        "{err}"
    );
}

#[tokio::test]
async fn shared_connection_recovers_after_a_server_restart() {
    let mut server = start_local(Vec::new()).await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let ping = || async {
        let mut conn = redis.connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(aether_redis::Error::from)
    };
    assert_eq!(ping().await.unwrap(), "PONG");
    let mut server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    let err = redis.health().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    // The broken connection was dropped; the next call reconnects.
    let mut recovered = false;
    for _ in 0..20 {
        if redis.health().await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "no reconnect after restart");
    drop(server);
}

/// `REDIS_MAX_RETRIES` covers exactly the idempotent reads documented at
/// `Config::max_retries`: each of them, sent on a connection the server dropped, succeeds once
/// the server is back; with retries off the same call fails.
#[tokio::test]
async fn idempotent_reads_retry_connection_errors_up_to_max_retries() {
    let mut server = start_local(Vec::new()).await;
    let no_retries = Redis::connect(server.config().to_builder().max_retries(0).build().unwrap())
        .await
        .unwrap();
    let retrying = Redis::connect(
        server
            .config()
            .to_builder()
            .max_retries(40)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let params = serde_json::json!({"page": 1});
    type Read = for<'a> fn(
        &'a Redis,
        &'a serde_json::Value,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = aether_redis::Result<()>> + Send + 'a>,
    >;
    let reads: [(&str, Read); 4] = [
        ("cache.get", |r, p| {
            Box::pin(async move { r.cache().get::<u32, _>("/r", p).await.map(drop) })
        }),
        ("cache.get_many", |r, p| {
            Box::pin(async move { r.cache().get_many::<u32, _>(&[("/r", p)]).await.map(drop) })
        }),
        ("user_prefs.get", |r, _| {
            Box::pin(async move { r.user_prefs().get("u-retry").await.map(drop) })
        }),
        ("health", |r, _| {
            Box::pin(async move { r.health().await.map(drop) })
        }),
    ];
    for (name, read) in reads {
        read(&no_retries, &params).await.unwrap();
        read(&retrying, &params).await.unwrap();
        server = tokio::task::spawn_blocking(move || {
            server.kill();
            server
        })
        .await
        .unwrap();
        let err = read(&no_retries, &params).await.unwrap_err();
        assert!(err.is_unavailable(), "{name}: {err:?}");
        // The restart runs while the retrying call waits between attempts.
        let restart = tokio::task::spawn_blocking(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            server.restart().unwrap();
            server
        });
        read(&retrying, &params)
            .await
            .unwrap_or_else(|e| panic!("{name} was not retried: {e:?}"));
        server = restart.await.unwrap();
    }
}

#[tokio::test]
async fn a_stalled_server_is_a_timeout_with_unknown_outcome() {
    let server = start_local(Vec::new()).await;
    let config = Config::builder()
        .port(server.port())
        .response_timeout(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let redis = Redis::connect(config).await.unwrap();
    support::pause_all(&redis, 1500).await;
    let err = redis.health().await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(err.to_string().contains("outcome is unknown"), "{err}");
    // The deadline that elapsed is the configured one, never a made-up zero.
    assert!(err.to_string().contains("after 200ms"), "{err}");
}

#[tokio::test]
async fn blocking_commands_use_dedicated_connections_without_response_timeout() {
    let server = start_local(Vec::new()).await;
    let config = Config::builder()
        .port(server.port())
        .response_timeout(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let redis = Redis::connect(config).await.unwrap();
    let mut blocking = redis.dedicated().await.unwrap();
    let started = std::time::Instant::now();
    let popped: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("nothing-here")
        .arg(1)
        .query_async(&mut blocking)
        .await
        .unwrap();
    assert_eq!(popped, None);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    // Meanwhile the shared connection keeps its short timeout and still works.
    assert!(redis.health().await.is_ok());
}

#[test]
fn config_or_disposable_keeps_an_answering_server_and_replaces_a_silent_one() {
    let shared = testkit::shared_server().unwrap();
    let mut answering = shared.config.clone();
    answering.key_prefix = "mine:".into();
    let (config, disposable) = testkit::config_or_disposable(answering.clone()).unwrap();
    assert_eq!((config, disposable), (answering, false));

    // Nothing listens on a port just found free.
    let silent = Config::builder()
        .port(testkit::free_port().unwrap())
        .key_prefix("mine:")
        .environment(aether_redis::Environment::Test)
        .build()
        .unwrap();
    let (config, disposable) = testkit::config_or_disposable(silent.clone()).unwrap();
    if std::env::var("REDIS_URL").is_ok_and(|u| !u.trim().is_empty()) {
        // REDIS_URL says "use what is configured"; the choice is then the caller's.
        assert_eq!((config, disposable), (silent, false));
    } else {
        assert!(disposable);
        assert_eq!(config.port, shared.config.port);
        assert_eq!(config.key_prefix, "mine:");
        assert_eq!(config.environment, aether_redis::Environment::Test);
    }
}

/// A handle on the local server at `port` that never retries, with these timeouts.
async fn without_retries(port: u16, connect: Duration, response: Duration) -> Redis {
    let config = Config::builder()
        .port(port)
        .connect_timeout(connect)
        .response_timeout(response)
        .max_retries(0)
        .build()
        .unwrap();
    Redis::connect(config).await.unwrap()
}

/// `total_connections_received` of the server behind `conn`.
async fn connections_received(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_timeout_keeps_the_shared_connection() {
    // A slow server is not a broken connection: replacing the shared connections on every
    // timeout would add reconnects to the load that caused it.
    let server = start_local(Vec::new()).await;
    let redis = without_retries(
        server.port(),
        Duration::from_secs(10),
        Duration::from_millis(200),
    )
    .await;
    let cache = redis.cache();
    cache.get::<u32, _>("/slow", &"p").await.unwrap();
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", server.port())).unwrap();
    let mut observer = client.get_multiplexed_async_connection().await.unwrap();
    let mut busy = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .unwrap();
    let before = connections_received(&mut observer).await;
    let script = tokio::spawn(async move {
        let _: () = redis::cmd("EVAL")
            .arg(
                "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') \
                 until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 800000",
            )
            .arg(0)
            .query_async(&mut busy)
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = cache.get::<u32, _>("/slow", &"p").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    script.await.unwrap();
    cache.get::<u32, _>("/slow", &"p").await.unwrap();
    assert_eq!(connections_received(&mut observer).await, before);
}

/// A handle (no retries, this connect timeout) whose server answered once and is then gone,
/// its port held by a listener that never answers (a silent host), the shared connection
/// already dropped by a failed call. Keep the listener alive while it must stay silent.
async fn gone_silent(
    connect: Duration,
) -> (Redis, aether_redis::CacheManager, std::net::TcpListener) {
    let mut server = start_local(Vec::new()).await;
    let port = server.port();
    let redis = without_retries(port, connect, Duration::from_millis(500)).await;
    let cache = redis.cache();
    cache.get::<u32, _>("/gone", &"p").await.unwrap();
    tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    let silent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    // The first call finds the connection closed and drops it.
    assert!(cache.get::<u32, _>("/gone", &"p").await.is_err());
    (redis, cache, silent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_for_a_reconnect_share_its_failure() {
    // The server is gone and its port answers nothing (a silent host): each reconnect attempt
    // lasts the connect timeout. Callers queued behind one attempt fail with it instead of
    // each trying in turn, which would make the last of 12 wait 12 connect timeouts.
    let (_redis, cache, _silent) = gone_silent(Duration::from_secs(1)).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let result = cache.get::<u32, _>("/gone", &"p").await;
                (result.is_err(), started.elapsed())
            })
        })
        .collect();
    for call in calls {
        let (failed, waited) = call.await.unwrap();
        assert!(failed);
        assert!(
            waited < Duration::from_secs(5),
            "a caller waited {waited:?} with a 1 s connect timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_whose_caller_stopped_polling_does_not_hold_the_others() {
    // A caller polls a reconnect once (it takes the slot's lock and starts connecting to a
    // silent host), then parks its future. Later callers must still get an answer.
    let (redis, _cache, _silent) = gone_silent(Duration::from_millis(500)).await;
    let mut parked = Box::pin(redis.connection());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut parked)
            .await
            .is_err(),
        "the parked reconnect finished at once"
    );
    let next = tokio::time::timeout(Duration::from_secs(5), redis.connection())
        .await
        .expect("a caller waited for a reconnect nobody polls");
    assert!(
        matches!(next, Err(Error::Unavailable { .. })),
        "{:?}",
        next.map(|_| ())
    );
    drop(parked);
}

#[tokio::test]
async fn a_server_that_refuses_the_login_is_not_retryable() {
    // A wrong password or a database out of range stays wrong however often one retries.
    let server = start_local(support::hardened_config_lines()).await;
    let wrong_password = Config::builder()
        .port(server.port())
        .username("app")
        .password("not-the-password")
        .build()
        .unwrap();
    let err = Redis::connect(wrong_password).await.unwrap_err();
    assert!(
        matches!(err, Error::Server(_)) && !err.is_retryable(),
        "{err:?}"
    );
    let no_such_db = app_user(&server).db(99).build().unwrap();
    let err = Redis::connect(no_such_db).await.unwrap_err();
    assert!(
        matches!(err, Error::Server(_)) && !err.is_retryable(),
        "{err:?}"
    );
    let redis = Redis::connect(app_user(&server).build().unwrap())
        .await
        .unwrap();
    assert_eq!(set_then_get(&redis, "refused:ok", "1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_fails_the_connect_instead_of_disabling_scripting() {
    // A primary pauses writes during a failover; the scripting probe then gets no answer in
    // time. That says nothing about scripting: the connect fails, to be retried, rather than
    // handing out a handle that refuses every script-backed repository for good.
    let server = start_local(Vec::new()).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", server.port())).unwrap();
    let mut side = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut side)
        .await
        .unwrap();
    let config = Config::builder()
        .port(server.port())
        .response_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = Redis::connect(config.clone()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let redis = Redis::connect(config).await.unwrap();
    assert!(redis.capabilities().scripting, "{:?}", redis.capabilities());
    redis.require_scripting("the email queue").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_left_on_a_dedicated_cluster_connection_is_cleared_before_reuse() {
    // A borrower cancelled between WATCH and EXEC returns its connection with the WATCH still
    // set; the next borrower's transaction must not abort because of it.
    let mut config = testkit::config_for(TestTopology::Cluster, "watch_left").unwrap();
    config.pool_size = 1;
    let redis = Redis::connect(config).await.unwrap();
    let watched = format!("{}{{w}}a", redis.keys().prefix());
    let other = format!("{}{{w}}b", redis.keys().prefix());
    {
        let mut conn = redis.dedicated().await.unwrap();
        let _: () = redis::cmd("WATCH")
            .arg(&watched)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg(&watched)
        .arg("changed")
        .query_async(&mut redis.connection().await.unwrap())
        .await
        .unwrap();
    let mut conn = redis.dedicated().await.unwrap();
    let applied: Option<(String,)> = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(&other)
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        applied.is_some(),
        "EXEC aborted by a WATCH of an earlier borrower"
    );
}
