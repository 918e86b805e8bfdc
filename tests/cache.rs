//! CacheManager contract: run against the standalone server and the 3-master cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aether_redis::cache::{CacheEntry, canonical_json, params_hash};
use aether_redis::{Config, Environment, Error, Redis};
use serde_json::{Value, json};

/// The test vector of `docs/keyspace.md` (`## cache:*`).
const VECTOR_PARAMS: &str =
    r#"{"q":"Zoë","page":2,"ids":[3,1],"filter":{"role":"admin","active":true}}"#;
const VECTOR_CANONICAL: &str =
    r#"{"filter":{"active":true,"role":"admin"},"ids":[3,1],"page":2,"q":"Zoë"}"#;
const VECTOR_HASH: &str = "p70EPSlpOsPzrN0nxB3EgoOfMYqVzDiAvRDhjak5RvE";
const VECTOR_KEY: &str = "cache:/api/users:p70EPSlpOsPzrN0nxB3EgoOfMYqVzDiAvRDhjak5RvE";

async fn raw(redis: &Redis, cmd: &redis::Cmd) -> redis::Value {
    let mut conn = redis.connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

async fn pttl(redis: &Redis, key: &str) -> i64 {
    match raw(redis, redis::cmd("PTTL").arg(key)).await {
        redis::Value::Int(ms) => ms,
        other => panic!("PTTL answered {other:?}"),
    }
}

async fn exists(redis: &Redis, key: &str) -> bool {
    raw(redis, redis::cmd("EXISTS").arg(key)).await == redis::Value::Int(1)
}

/// A second handle on the same server with the same key prefix, as another process would have.
async fn same_namespace(redis: &Redis, edit: impl FnOnce(&mut Config)) -> Redis {
    let mut config = redis.config().clone();
    edit(&mut config);
    Redis::connect(config).await.unwrap()
}

fn users(n: usize) -> CacheEntry<Value> {
    CacheEntry::new(json!({"users": (0..n).collect::<Vec<_>>()}))
        .with_header("content-type", "application/json")
}

#[derive(Debug, PartialEq)]
enum AppError {
    Upstream(&'static str),
    Cache(String),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Cache(e.to_string())
    }
}

#[test]
fn documented_test_vector_holds() {
    let params: Value = serde_json::from_str(VECTOR_PARAMS).unwrap();
    assert_eq!(canonical_json(&params).unwrap(), VECTOR_CANONICAL);
    assert_eq!(params_hash(&params).unwrap(), VECTOR_HASH);
    // A struct with the same members in another order hashes the same.
    #[derive(serde::Serialize)]
    struct Filter {
        role: &'static str,
        active: bool,
    }
    #[derive(serde::Serialize)]
    struct Params {
        page: u32,
        q: &'static str,
        filter: Filter,
        ids: [u32; 2],
    }
    let typed = Params {
        page: 2,
        q: "Zoë",
        filter: Filter {
            role: "admin",
            active: true,
        },
        ids: [3, 1],
    };
    assert_eq!(params_hash(&typed).unwrap(), VECTOR_HASH);
}

aether_redis::contract_tests! {
    async fn key_follows_the_documented_layout(redis) {
        let cache = redis.cache();
        let params: Value = serde_json::from_str(VECTOR_PARAMS).unwrap();
        let key = cache.key("/api/users", &params).unwrap();
        assert_eq!(key, format!("{}{VECTOR_KEY}", redis.config().key_prefix));
        cache.set("/api/users", &params, &users(1)).await.unwrap();
        assert!(exists(&redis, &key).await);
    }

    async fn set_get_delete_round_trip(redis) {
        let cache = redis.cache();
        let params = json!({"page": 1, "role": "admin"});
        assert_eq!(cache.get::<Value, _>("/api/users", &params).await.unwrap(), None);
        let entry = users(3).with_status(203);
        cache.set("/api/users", &params, &entry).await.unwrap();
        let got = cache.get::<Value, _>("/api/users", &params).await.unwrap().unwrap();
        assert_eq!(got, entry);
        // Member order of the params does not matter (serde_json keeps insertion order here,
        // so the two objects serialize differently before canonicalisation).
        let reordered = json!({"role": "admin", "page": 1});
        assert_ne!(serde_json::to_string(&params).unwrap(), serde_json::to_string(&reordered).unwrap());
        assert!(cache.get::<Value, _>("/api/users", &reordered).await.unwrap().is_some());
        assert_eq!(cache.get::<Value, _>("/api/users", &json!({"page": 2})).await.unwrap(), None);
        assert!(cache.delete("/api/users", &params).await.unwrap());
        assert!(!cache.delete("/api/users", &params).await.unwrap());
        assert_eq!(cache.get::<Value, _>("/api/users", &params).await.unwrap(), None);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.loads, stats.errors), (2, 3, 0, 0));
    }

    async fn written_json_has_exactly_the_documented_shape(redis) {
        let cache = redis.cache();
        let entry = users(2);
        cache.set("orders", &json!({}), &entry).await.unwrap();
        let key = cache.key("orders", &json!({})).unwrap();
        let stored = match raw(&redis, redis::cmd("GET").arg(&key)).await {
            redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
            other => panic!("{other:?}"),
        };
        let expected = format!(
            r#"{{"data":{{"users":[0,1]}},"timestamp":{},"statusCode":200,"headers":{{"content-type":"application/json"}}}}"#,
            entry.timestamp
        );
        assert_eq!(stored, expected);
    }

    async fn entry_written_by_raw_set_with_the_documented_json_is_read(redis) {
        // What a service in another language does: SET key <CacheEntry JSON> EX 3600.
        let key = format!("{}{VECTOR_KEY}", redis.config().key_prefix);
        let json = r#"{"data":{"users":["ada","alan"]},"timestamp":1700000000000,"statusCode":200,"headers":{"content-type":"application/json","x-extra":"1"}}"#;
        raw(&redis, redis::cmd("SET").arg(&key).arg(json).arg("EX").arg(3600)).await;
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Users {
            users: Vec<String>,
        }
        let params: Value = serde_json::from_str(VECTOR_PARAMS).unwrap();
        let got = redis.cache().get::<Users, _>("/api/users", &params).await.unwrap().unwrap();
        assert_eq!(got.data, Users { users: vec!["ada".into(), "alan".into()] });
        assert_eq!(got.timestamp, 1_700_000_000_000);
        assert_eq!(got.status_code, 200);
        assert_eq!(got.headers.len(), 2);
        assert_eq!(got.headers["content-type"], "application/json");
        assert!(got.age() > Duration::from_secs(86_400), "written in 2023");

        // Any i64 is a timestamp another writer may store: the entry reads, its age does not
        // overflow (from the far past it saturates, from the future it is zero).
        for (timestamp, far_past) in [(i64::MIN, true), (i64::MAX, false)] {
            let json = format!(r#"{{"data":1,"timestamp":{timestamp},"statusCode":200,"headers":{{}}}}"#);
            raw(&redis, redis::cmd("SET").arg(&key).arg(json).arg("EX").arg(3600)).await;
            let got = redis.cache().get::<i64, _>("/api/users", &params).await.unwrap().unwrap();
            assert_eq!(got.timestamp, timestamp);
            assert_eq!(got.age() > Duration::from_secs(86_400 * 365 * 1000), far_past, "{timestamp}");
        }
    }

    async fn ttl_equals_the_table_per_environment(redis) {
        for (environment, table) in [
            (Environment::Production, 3_600_000),
            (Environment::Development, 300_000),
            (Environment::Test, 30_000),
        ] {
            let handle = same_namespace(&redis, |c| c.environment = environment).await;
            let cache = handle.cache();
            assert_eq!(cache.default_ttl().as_millis(), table as u128);
            let endpoint = format!("env-{environment:?}");
            cache.set(&endpoint, &json!({"via": "set"}), &users(1)).await.unwrap();
            cache
                .set_many(&[(endpoint.as_str(), json!({"via": "set_many"}), users(1))])
                .await
                .unwrap();
            cache
                .get_or_set(&endpoint, &json!({"via": "get_or_set"}), || async {
                    Ok::<_, Error>(users(1))
                })
                .await
                .unwrap();
            for via in ["set", "set_many", "get_or_set"] {
                let ttl = pttl(&redis, &cache.key(&endpoint, &json!({"via": via})).unwrap()).await;
                assert!(ttl > table - 5_000 && ttl <= table, "{environment:?} {via}: {ttl}");
            }
        }
    }

    async fn cache_ttl_override_and_per_call_ttl(redis) {
        let from_env = Config::from_lookup(|name| (name == "REDIS_CACHE_TTL").then(|| "7".to_owned()))
            .unwrap();
        let handle = same_namespace(&redis, |c| {
            c.environment = Environment::Production;
            c.ttl_overrides = from_env.ttl_overrides.clone();
        })
        .await;
        let cache = handle.cache();
        cache.set("ttl", &json!({"n": 1}), &users(1)).await.unwrap();
        let ttl = pttl(&redis, &cache.key("ttl", &json!({"n": 1})).unwrap()).await;
        assert!(ttl > 2_000 && ttl <= 7_000, "{ttl}");
        cache
            .set_with_ttl("ttl", &json!({"n": 2}), &users(1), Duration::from_millis(90_500))
            .await
            .unwrap();
        let ttl = pttl(&redis, &cache.key("ttl", &json!({"n": 2})).unwrap()).await;
        assert!(ttl > 85_500 && ttl <= 90_500, "{ttl}");
        let zero = cache.set_with_ttl("ttl", &json!({"n": 3}), &users(1), Duration::ZERO).await;
        assert!(matches!(zero, Err(Error::InvalidInput { what: "cache TTL", .. })), "{zero:?}");
    }

    async fn hostile_endpoints_are_rejected(redis) {
        let cache = redis.cache();
        let long = "e".repeat(513);
        let p = json!({});
        for bad in ["", "a:b", "{tag}", "a}b", "users*", "a?", "[a]", "a\\b", "a b", "a\nb", long.as_str()] {
            let invalid = |r: Result<(), Error>| {
                assert!(
                    matches!(r, Err(Error::InvalidInput { what: "cache endpoint", .. })),
                    "{bad:?}: {r:?}"
                )
            };
            invalid(cache.set(bad, &p, &users(1)).await);
            invalid(cache.get::<Value, _>(bad, &p).await.map(drop));
            invalid(cache.delete(bad, &p).await.map(drop));
            invalid(cache.invalidate_endpoint(bad).await.map(drop));
            invalid(cache.get_many::<Value, _>(&[(bad, &p)]).await.map(drop));
            invalid(cache.set_many(&[("ok", &p, users(1)), (bad, &p, users(1))]).await);
            let loads = AtomicUsize::new(0);
            let r = cache
                .get_or_set(bad, &p, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(users(1))
                })
                .await;
            invalid(r.map(drop));
            assert_eq!(loads.load(Ordering::SeqCst), 0);
        }
        // A rejected batch wrote nothing, not even its valid items.
        assert_eq!(cache.get::<Value, _>("ok", &p).await.unwrap(), None);
        // `/` is accepted as is.
        cache.set("/api/v1/users", &p, &users(1)).await.unwrap();
        assert!(cache.key("/api/v1/users", &p).unwrap().contains(":cache:/api/v1/users:"));
    }

    async fn corrupt_entries_are_decode_errors_never_panics(redis) {
        let cache = redis.cache();
        let cases = [
            "not json",
            "[1,2,3]",
            r#"{"data":1}"#,
            r#"{"data":1,"timestamp":"yesterday","statusCode":200,"headers":{}}"#,
            r#"{"data":1,"timestamp":1,"statusCode":200,"headers":null}"#,
            r#"{"data":"text","timestamp":1,"statusCode":200,"headers":{}}"#,
        ];
        for (i, corrupt) in cases.iter().enumerate() {
            let params = json!({"case": i});
            let key = cache.key("corrupt", &params).unwrap();
            raw(&redis, redis::cmd("SET").arg(&key).arg(*corrupt).arg("EX").arg(60)).await;
            let err = cache.get::<u32, _>("corrupt", &params).await.unwrap_err();
            assert!(matches!(err, Error::Decode { key: ref k, .. } if *k == key), "{corrupt}: {err:?}");
            assert!(!err.is_retryable());
            let err = cache.get_many::<u32, _>(&[("corrupt", &params)]).await.unwrap_err();
            assert!(matches!(err, Error::Decode { .. }), "{err:?}");
            let loads = AtomicUsize::new(0);
            let err = cache
                .get_or_set("corrupt", &params, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(CacheEntry::new(1u32))
                })
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Decode { .. }), "{err:?}");
            assert_eq!(loads.load(Ordering::SeqCst), 0);
            // Never overwritten behind the caller's back; delete removes it.
            assert!(exists(&redis, &key).await);
            assert!(cache.delete("corrupt", &params).await.unwrap());
        }
        assert_eq!(cache.stats().errors, 3 * cases.len() as u64);
        // A key of another type is the server's WRONGTYPE error, not a panic.
        let key = cache.key("corrupt", &json!("hash")).unwrap();
        raw(&redis, redis::cmd("HSET").arg(&key).arg("f").arg("v")).await;
        let err = cache.get::<u32, _>("corrupt", &json!("hash")).await.unwrap_err();
        assert!(matches!(err, Error::Server(_)), "{err:?}");
        // MGET answers nil for it: a miss in a batch read (documented), the hash left alone.
        let many = cache.get_many::<u32, _>(&[("corrupt", json!("hash"))]).await.unwrap();
        assert!(many[0].is_none());
        assert!(exists(&redis, &key).await);
    }

    async fn get_many_and_set_many_round_trip(redis) {
        let cache = redis.cache();
        let items: Vec<(&str, Value, CacheEntry<Value>)> = (0..12)
            .map(|i| (if i % 2 == 0 { "/a" } else { "/b" }, json!({"i": i}), users(i)))
            .collect();
        cache.set_many(&items).await.unwrap();
        let mut requests: Vec<(&str, Value)> =
            items.iter().map(|(e, p, _)| (*e, p.clone())).collect();
        requests.insert(3, ("/a", json!({"i": "missing"})));
        let got = cache.get_many::<Value, _>(&requests).await.unwrap();
        assert_eq!(got.len(), 13);
        assert_eq!(got[3], None);
        let found: Vec<_> = got.into_iter().flatten().collect();
        let expected: Vec<_> = items.iter().map(|(_, _, e)| e.clone()).collect();
        assert_eq!(found, expected);
        for (endpoint, params, _) in &items {
            let ttl = pttl(&redis, &cache.key(endpoint, params).unwrap()).await;
            assert!(ttl > 25_000 && ttl <= 30_000, "{ttl}");
        }
        assert_eq!(cache.get_many::<Value, Value>(&[]).await.unwrap(), vec![]);
        cache.set_many::<Value, Value>(&[]).await.unwrap();
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (12, 1));
    }

    async fn set_many_is_all_or_nothing_for_readers(redis) {
        // Standalone: one MULTI, so a concurrent MGET sees none or all of the batch. Cluster: one
        // MULTI per slot, so a reader of keys in one slot sees none or all of them.
        let cache = redis.cache();
        let cluster = redis.keys().is_cluster();
        // Large enough (~600 KB) that the server reads the batch in many parts: without MULTI,
        // readers would run between them.
        let items: Vec<(&str, Value, CacheEntry<Value>)> =
            (0..3000).map(|i| ("/batch", json!({"i": i}), users(400))).collect();
        let requests: Vec<(&str, Value)> = if cluster {
            // Entries whose keys share a slot: the reader checks per-slot atomicity.
            let slot_of = |p: &Value| {
                aether_redis::keyspace::cluster_slot(&cache.key("/batch", p).unwrap())
            };
            let mut by_slot = std::collections::BTreeMap::<u16, Vec<Value>>::new();
            for i in 0..4000 {
                let p = json!({"i": i});
                by_slot.entry(slot_of(&p)).or_default().push(p);
            }
            let (_, same) = by_slot.into_iter().max_by_key(|(_, v)| v.len()).unwrap();
            assert!(same.len() >= 2);
            same.into_iter().map(|p| ("/batch", p)).collect()
        } else {
            // The first and last entry of the batch: small reads, many of them.
            [&items[0], &items[items.len() - 1]]
                .iter()
                .map(|(e, p, _)| (*e, p.clone()))
                .collect()
        };
        let items: Vec<(&str, Value, CacheEntry<Value>)> = if cluster {
            requests.iter().map(|(e, p)| (*e, p.clone(), users(1))).collect()
        } else {
            items
        };
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..4 {
            // Readers on connections of their own: one connection's commands never interleave.
            let cache = same_namespace(&redis, |_| {}).await.cache();
            let requests = requests.clone();
            let done = done.clone();
            readers.push(tokio::spawn(async move {
                let mut seen_full = false;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let got = cache.get_many::<Value, _>(&requests).await.unwrap();
                    let present = got.iter().filter(|e| e.is_some()).count();
                    assert!(present == 0 || present == got.len(), "saw {present} of {}", got.len());
                    seen_full |= present == got.len();
                    if finished {
                        return seen_full;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        cache.set_many(&items).await.unwrap();
        done.store(true, Ordering::SeqCst);
        for reader in readers {
            assert!(reader.await.unwrap());
        }
    }

    async fn get_or_set_runs_one_loader_for_100_concurrent_callers(redis) {
        // Four handles with their own connections stand in for four processes.
        let mut handles = vec![redis.clone()];
        for _ in 0..3 {
            handles.push(same_namespace(&redis, |_| {}).await);
        }
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..100 {
            let cache = handles[i % handles.len()].cache();
            let loads = loads.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_set("/api/report", &json!({"year": 2024}), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(80)).await;
                        Ok::<_, Error>(CacheEntry::new(json!({"total": 42})))
                    })
                    .await
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap().unwrap());
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|e| e == &results[0]));
        assert_eq!(results[0].data, json!({"total": 42}));
        let cache = redis.cache();
        let key = cache.key("/api/report", &json!({"year": 2024})).unwrap();
        assert!(!exists(&redis, &redis.keys().derived(&key, "lock")).await);
        let ttl = pttl(&redis, &key).await;
        assert!(ttl > 25_000 && ttl <= 30_000, "{ttl}");
        // A later call is a hit and does not load.
        let again = cache
            .get_or_set("/api/report", &json!({"year": 2024}), || async {
                Ok::<_, Error>(CacheEntry::new(json!("reloaded")))
            })
            .await
            .unwrap();
        assert_eq!(again, results[0]);
        assert_eq!((cache.stats().hits, cache.stats().loads), (1, 0));
    }

    async fn get_or_set_loader_error_propagates_and_releases_the_lock(redis) {
        let cache = redis.cache();
        let params = json!({"id": 7});
        let key = cache.key("/flaky", &params).unwrap();
        let err = cache
            .get_or_set::<Value, _, _, _, AppError>("/flaky", &params, || async {
                Err(AppError::Upstream("503 from upstream"))
            })
            .await
            .unwrap_err();
        assert_eq!(err, AppError::Upstream("503 from upstream"));
        assert!(!exists(&redis, &redis.keys().derived(&key, "lock")).await);
        assert!(!exists(&redis, &key).await);
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.errors), (1, 1));
        // The next caller loads at once (no stale lock to wait for).
        let got = cache
            .clone()
            .with_wait_timeout(Duration::from_millis(1))
            .get_or_set::<Value, _, _, _, AppError>("/flaky", &params, || async {
                Ok(CacheEntry::new(json!("ok")))
            })
            .await
            .unwrap();
        assert_eq!(got.data, json!("ok"));
        // Cache errors reach the caller's error type through `From`.
        let err = cache
            .get_or_set::<Value, _, _, _, AppError>("bad:endpoint", &params, || async {
                Ok(CacheEntry::new(json!("never")))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::Cache(ref m) if m.contains("cache endpoint")), "{err:?}");
    }

    async fn get_or_set_waits_a_bounded_time_and_never_loads_twice(redis) {
        let cache = redis.cache().with_wait_timeout(Duration::from_millis(200));
        let params = json!({"slow": true});
        let key = cache.key("/slow", &params).unwrap();
        let lock = redis.keys().derived(&key, "lock");
        // Another process holds the load lock and never finishes in time.
        raw(&redis, redis::cmd("SET").arg(&lock).arg("other-process").arg("PX").arg(10_000)).await;
        let loads = AtomicUsize::new(0);
        let err = cache
            .get_or_set("/slow", &params, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(CacheEntry::new(1))
            })
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert_eq!(loads.load(Ordering::SeqCst), 0);
        // When the other process stores its entry, a waiting caller returns it without loading,
        // also one told to wait as long as it takes.
        let waiter = {
            let cache = cache.clone().with_wait_timeout(Duration::MAX);
            tokio::spawn(async move {
                cache
                    .get_or_set("/slow", &json!({"slow": true}), || async {
                        Ok::<_, Error>(CacheEntry::new(-1))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let theirs = CacheEntry::new(99);
        cache.set("/slow", &params, &theirs).await.unwrap();
        raw(&redis, redis::cmd("DEL").arg(&lock)).await;
        assert_eq!(waiter.await.unwrap().unwrap(), theirs);
    }

    async fn a_lock_ttl_redis_would_refuse_is_invalid_input_before_anything_is_written(redis) {
        let cache = redis.cache().with_lock_ttl(Duration::MAX);
        let params = json!({"lock": "forever"});
        let err = cache
            .get_or_set("/forever", &params, || async { Ok::<_, Error>(CacheEntry::new(1)) })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput { what: "cache lock TTL", .. }), "{err:?}");
        let key = cache.key("/forever", &params).unwrap();
        assert!(!exists(&redis, &redis.keys().derived(&key, "lock")).await);
        let err = redis
            .cache()
            .set_with_ttl("/forever", &params, &CacheEntry::new(1), Duration::from_secs(u64::MAX / 1000))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput { what: "cache TTL", .. }), "{err:?}");
        assert!(!exists(&redis, &key).await);
    }

    async fn releasing_never_deletes_a_lock_another_process_took_over(redis) {
        // The lock expires while the loader runs and another process takes it: the first
        // loader must not delete the second one's lock.
        let cache = redis.cache().with_lock_ttl(Duration::from_millis(50));
        let params = json!({"long": 1});
        let key = cache.key("/long", &params).unwrap();
        let lock = redis.keys().derived(&key, "lock");
        let took_over = {
            let redis = redis.clone();
            let lock = lock.clone();
            move || async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                raw(&redis, redis::cmd("SET").arg(&lock).arg("second").arg("NX").arg("PX").arg(10_000)).await;
                Ok::<_, Error>(CacheEntry::new("first".to_owned()))
            }
        };
        let got = cache.get_or_set("/long", &params, took_over).await.unwrap();
        assert_eq!(got.data, "first");
        assert_eq!(
            raw(&redis, redis::cmd("GET").arg(&lock)).await,
            redis::Value::BulkString(b"second".to_vec())
        );
        // Nor store over what the second loader will store: its load is the fresher one.
        assert!(!exists(&redis, &key).await);
    }

    async fn a_loaded_entry_that_cannot_be_stored_frees_the_lock_at_once(redis) {
        // JSON has no map keys but strings: the entry is returned, not stored, and waiters
        // must not wait out the lock TTL for an entry that never comes.
        let cache = redis.cache();
        let params = json!({"pairs": 1});
        let key = cache.key("/pairs", &params).unwrap();
        let got = cache
            .get_or_set("/pairs", &params, || async {
                Ok::<_, Error>(CacheEntry::new(std::collections::HashMap::from([((1u8, 2u8), 3u8)])))
            })
            .await
            .unwrap();
        assert_eq!(got.data[&(1, 2)], 3);
        assert!(!exists(&redis, &redis.keys().derived(&key, "lock")).await);
        assert!(!exists(&redis, &key).await);
        assert_eq!(cache.stats().errors, 1);
    }

    async fn a_delete_or_invalidation_during_a_load_keeps_its_result_out(redis) {
        // The loader read its data before the delete: storing it afterwards would serve the
        // old data for the whole TTL.
        let cache = redis.cache();
        for invalidate in [false, true] {
            let params = json!({"invalidate": invalidate});
            let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
            let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
            let loading = {
                let cache = cache.clone();
                let params = params.clone();
                tokio::spawn(async move {
                    cache
                        .get_or_set("/profile", &params, || async move {
                            let _ = started_tx.send(());
                            let _ = go_rx.await;
                            Ok::<_, Error>(CacheEntry::new("old".to_owned()))
                        })
                        .await
                        .unwrap()
                })
            };
            started_rx.await.unwrap();
            if invalidate {
                cache.invalidate_endpoint("/profile").await.unwrap();
            } else {
                assert!(!cache.delete("/profile", &params).await.unwrap());
            }
            go_tx.send(()).unwrap();
            assert_eq!(loading.await.unwrap().data, "old", "the caller still gets its load");
            assert!(cache.get::<String, _>("/profile", &params).await.unwrap().is_none(), "invalidate: {invalidate}");
            // The next load stores as usual.
            let fresh = cache.get_or_set("/profile", &params, || async { Ok::<_, Error>(CacheEntry::new("new".to_owned())) }).await.unwrap();
            assert_eq!(fresh.data, "new");
            assert_eq!(cache.get::<String, _>("/profile", &params).await.unwrap().unwrap().data, "new");
        }
    }

    async fn invalidate_endpoint_removes_exactly_that_endpoint(redis) {
        let cache = redis.cache();
        // More entries than one SCAN page, spread over every slot range (and so every master).
        let doomed: Vec<(&str, Value, CacheEntry<Value>)> =
            (0..700).map(|i| ("/api/users", json!({"i": i}), users(0))).collect();
        cache.set_many(&doomed).await.unwrap();
        let neighbours = ["/api/users/1", "/api/user", "/api/usersx", "/api", "users"];
        for endpoint in neighbours {
            cache.set(endpoint, &json!({"i": 1}), &users(0)).await.unwrap();
        }
        // Another namespace's entry of the same endpoint is untouched.
        let other = same_namespace(&redis, |c| c.key_prefix.push_str("other:")).await.cache();
        other.set("/api/users", &json!({"i": 1}), &users(0)).await.unwrap();

        assert_eq!(cache.invalidate_endpoint("/api/users").await.unwrap(), 700);
        let requests: Vec<(&str, Value)> = doomed.iter().map(|(e, p, _)| (*e, p.clone())).collect();
        let left = cache.get_many::<Value, _>(&requests).await.unwrap();
        assert!(left.iter().all(Option::is_none));
        for endpoint in neighbours {
            assert!(cache.get::<Value, _>(endpoint, &json!({"i": 1})).await.unwrap().is_some(), "{endpoint}");
        }
        assert!(other.get::<Value, _>("/api/users", &json!({"i": 1})).await.unwrap().is_some());
        assert_eq!(cache.invalidate_endpoint("/api/users").await.unwrap(), 0);
    }
}
