//! Helpers shared by the contract tests: key listings, raw TTL reads, TTL-table checks.
// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use aether_redis::user_data::scan_keys;
use aether_redis::{Environment, Redis};
use redis::Value;

/// Every key of this test's namespace, base and derived (`{<prefix>...}:suffix`).
pub async fn all_keys(redis: &Redis) -> Vec<String> {
    let prefix = redis.keys().prefix().to_owned();
    let mut keys = scan_keys(redis, &format!("{prefix}*")).await.unwrap();
    keys.extend(scan_keys(redis, &format!("{{{prefix}*")).await.unwrap());
    keys
}

/// The key's remaining TTL in milliseconds, as `PTTL` reports it (-1 none, -2 missing).
pub async fn pttl(redis: &Redis, key: &str) -> i64 {
    query(redis, redis::cmd("PTTL").arg(key)).await
}

/// Sends one raw command on the handle's shared connection (to inspect what a repository wrote).
pub async fn query<T: redis::FromRedisValue>(redis: &Redis, cmd: &redis::Cmd) -> T {
    let mut conn = redis.connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// A handle on the same server for `environment`, in a namespace of its own.
pub async fn with_environment(redis: &Redis, environment: Environment) -> Redis {
    let mut config = redis.config().clone();
    config.environment = environment;
    config.key_prefix = format!("{}{environment}:", config.key_prefix);
    Redis::connect(config).await.unwrap()
}

/// Asserts a freshly written key's PTTL matches the table's `expected_secs` (within 5 s).
pub fn assert_ttl(actual_ms: i64, expected_secs: u64, what: &str) {
    let expected = i64::try_from(expected_secs * 1000).unwrap();
    assert!(
        actual_ms <= expected && actual_ms > expected - 5_000,
        "{what}: PTTL {actual_ms} ms, table says {expected} ms"
    );
}

/// Every string in a reply, depth first (values, fields, members, stream entries).
pub fn flatten(value: Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(b) => out.push(String::from_utf8_lossy(&b).into_owned()),
        Value::SimpleString(s) => out.push(s),
        Value::Int(i) => out.push(i.to_string()),
        Value::Array(items) | Value::Set(items) => items.into_iter().for_each(|v| flatten(v, out)),
        Value::Map(pairs) => pairs.into_iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        _ => {}
    }
}

/// The production hardening of the documented server configs: scripting renamed, dangerous
/// commands removed.
pub const RENAMED_COMMANDS: &[&str] = &[
    "rename-command EVAL EVAL_b835c3f9a8",
    "rename-command SCRIPT SCRIPT_b835c3f9a8",
    "rename-command CONFIG \"\"",
    "rename-command KEYS \"\"",
    "rename-command FLUSHDB \"\"",
    "rename-command FLUSHALL \"\"",
    "rename-command DEBUG \"\"",
];

/// [`RENAMED_COMMANDS`] plus an application user `app`/`pw` that may run nothing `@dangerous`
/// (no `INFO` either); `default` stays an operator account.
pub fn hardened_config_lines() -> Vec<String> {
    RENAMED_COMMANDS
        .iter()
        .chain(&[
            "user default on nopass ~* &* +@all",
            "user app on >pw ~* &* +@all -@dangerous",
        ])
        .map(|line| line.to_string())
        .collect()
}

/// A key's type and every string stored in it (values, fields, members with scores, stream
/// ids and fields), hash and set contents sorted so that two reads compare equal.
pub async fn contents(redis: &Redis, key: &str) -> (String, Vec<String>) {
    let kind: String = query(redis, redis::cmd("TYPE").arg(key)).await;
    let mut cmd = match kind.as_str() {
        "string" => redis::cmd("GET"),
        "hash" => redis::cmd("HGETALL"),
        "set" => redis::cmd("SMEMBERS"),
        "list" => redis::cmd("LRANGE"),
        "stream" => redis::cmd("XRANGE"),
        "zset" => redis::cmd("ZRANGE"),
        "none" => return (kind, Vec::new()),
        other => panic!("unexpected type {other} of {key}"),
    };
    cmd.arg(key);
    match kind.as_str() {
        "list" => {
            cmd.arg(0).arg(-1);
        }
        "zset" => {
            cmd.arg(0).arg(-1).arg("WITHSCORES");
        }
        "stream" => {
            cmd.arg("-").arg("+");
        }
        _ => {}
    }
    let value: Value = query(redis, &cmd).await;
    let mut out = Vec::new();
    flatten(value, &mut out);
    if kind == "hash" || kind == "set" {
        out.sort();
    }
    (kind, out)
}

/// Pauses every client of the server for `millis` (`CLIENT PAUSE .. ALL`) through a dedicated
/// connection: the server is stalled, not stopped.
pub async fn pause_all(redis: &Redis, millis: u64) {
    let mut admin = redis.dedicated().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(millis)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
}

/// Starts this test binary again, running only the ignored test `entry`, connected to the
/// same server and key namespace as `redis` (read back by [`child_config`]). `wrapper` runs
/// it under another program first (e.g. `faketime`).
pub fn child_test_process(redis: &Redis, entry: &str, wrapper: &[&str]) -> std::process::Command {
    let config = redis.config();
    let (topology, nodes) = match &config.topology {
        aether_redis::Topology::Cluster { nodes } => ("cluster", nodes.join(",")),
        _ => ("standalone", format!("{}:{}", config.host, config.port)),
    };
    let exe = std::env::current_exe().unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    command
        .args([
            "--exact",
            entry,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AETHER_CHILD_TOPOLOGY", topology)
        .env("AETHER_CHILD_NODES", nodes)
        .env("AETHER_CHILD_PREFIX", &config.key_prefix);
    command
}

/// The configuration a process started by [`child_test_process`] connects with.
pub fn child_config() -> aether_redis::Config {
    let prefix = std::env::var("AETHER_CHILD_PREFIX").expect("started by child_test_process");
    let nodes = std::env::var("AETHER_CHILD_NODES").unwrap();
    let mut config = aether_redis::Config::default();
    config.environment = Environment::Test;
    config.key_prefix = prefix;
    if std::env::var("AETHER_CHILD_TOPOLOGY").unwrap() == "cluster" {
        config.topology = aether_redis::Topology::Cluster {
            nodes: nodes.split(',').map(str::to_owned).collect(),
        };
    } else {
        let (host, port) = nodes.rsplit_once(':').unwrap();
        config.host = host.to_owned();
        config.port = port.parse().unwrap();
    }
    config
}

/// A server of the test's own whose operator disabled scripting (`EVAL` and `EVALSHA`
/// renamed to nothing).
pub async fn server_without_scripting() -> aether_redis::testkit::LocalServer {
    tokio::task::spawn_blocking(|| {
        aether_redis::testkit::LocalServer::start(aether_redis::testkit::LocalOptions {
            config_lines: vec![
                "rename-command EVAL \"\"".into(),
                "rename-command EVALSHA \"\"".into(),
            ],
            ..aether_redis::testkit::LocalOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap()
}

/// [`server_without_scripting`] and a handle on it configured as its operator would tell the
/// application (`EVAL`/`EVALSHA` disabled), which never tries a script.
pub async fn redis_without_scripting() -> (aether_redis::testkit::LocalServer, aether_redis::Redis)
{
    let server = server_without_scripting().await;
    let config = server
        .config()
        .to_builder()
        .renamed_command("EVAL", "")
        .renamed_command("EVALSHA", "")
        .build()
        .unwrap();
    let redis = aether_redis::Redis::connect(config).await.unwrap();
    assert!(!redis.capabilities().scripting);
    (server, redis)
}

/// One counter (`calls`, `rejected_calls`, ..) of `command` (lower case, subcommands as
/// `cluster|slots`) from `INFO commandstats` of the server behind `conn`; 0 when the command
/// never ran. Scripts' inner calls count too.
pub async fn command_stat<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    command: &str,
    field: &str,
) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:");
    let value = format!("{field}=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|f| f.strip_prefix(value.as_str()))
        })
        .map_or(0, |n| n.parse().unwrap())
}
