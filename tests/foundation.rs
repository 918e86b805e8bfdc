//! Foundation: connection, capabilities, health, scripts, topologies.

use aether_redis::script::{LuaScript, ScriptCall};
use aether_redis::testkit::{self, LocalSentinel, TestTopology};
use aether_redis::{Config, Error, Redis};

aether_redis::contract_tests! {
    async fn health_reports_role_and_version(redis) {
        let health = redis.health().await.unwrap();
        assert_eq!(health.role, "master");
        assert!(health.version.starts_with('7'), "{}", health.version);
        assert!(redis.capabilities().scripting);
    }

    async fn scripts_survive_a_script_flush(redis) {
        let script = LuaScript::new("echo", "return ARGV[1]");
        let key = redis.keys().key(aether_redis::Keyspace::Cache, &["script"]).unwrap();
        let call = ScriptCall::new().key(key).arg("hello");
        let v = redis.eval_script(&script, &call).await.unwrap();
        assert_eq!(v, redis::Value::BulkString(b"hello".to_vec()));
        let mut conn = redis.connection().await.unwrap();
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
        let v = redis.eval_script(&script, &call).await.unwrap();
        assert_eq!(v, redis::Value::BulkString(b"hello".to_vec()));
    }
}

#[tokio::test]
async fn sentinel_connects_and_round_trips() {
    let sentinel = tokio::task::spawn_blocking(LocalSentinel::start)
        .await
        .unwrap()
        .unwrap();
    let redis = Redis::connect(sentinel.config()).await.unwrap();
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("sentinel-k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("sentinel-k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "v");
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

#[test]
fn topology_kind_is_standalone_for_the_shared_server() {
    let config = testkit::config_for(TestTopology::Standalone, "x").unwrap();
    assert!(config.key_prefix.starts_with("t:x:"));
}
