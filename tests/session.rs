//! SessionStore contract: run against standalone and Cluster.

use std::collections::HashMap;
use std::time::Duration;

use aether_redis::pool::Connection;
use aether_redis::session::{NewSession, Role, Session, SessionId, SessionStore, SessionUpdate};
use aether_redis::{Config, Environment, Error, Redis, SessionLayout};

fn new_session(user: &str) -> NewSession {
    NewSession::new(user, format!("{user}@example.com"), Role::User)
        .ip_address("203.0.113.9")
        .user_agent("Mozilla/5.0 (X11; Linux x86_64)")
        .permissions(["mail:read", "mail:send"])
        .extra("csrfToken", "csrf-1")
}

async fn raw(redis: &Redis) -> Connection {
    redis.connection().await.unwrap()
}

async fn pttl(redis: &Redis, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut raw(redis).await)
        .await
        .unwrap()
}

async fn exists(redis: &Redis, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut raw(redis).await)
        .await
        .unwrap();
    n == 1
}

async fn hgetall(redis: &Redis, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut raw(redis).await)
        .await
        .unwrap()
}

/// The same handle with a modified configuration (same key prefix, same server).
async fn reconnect(redis: &Redis, change: impl FnOnce(&mut aether_redis::Config)) -> Redis {
    let mut config = redis.config().clone();
    change(&mut config);
    Redis::connect(config).await.unwrap()
}

/// Races `get` (or `touch`/`update`) against `destroy` on `rounds` sessions, `batch` at a
/// time, and checks that no destroyed session comes back and no key is left without a TTL.
async fn race_get_and_destroy(store: &SessionStore, redis: &Redis, rounds: usize, batch: usize) {
    let mut done = 0;
    while done < rounds {
        let n = batch.min(rounds - done);
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(store.create(new_session("racer")).await.unwrap().id);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let (s1, s2, id1, id2) = (store.clone(), store.clone(), id.clone(), id.clone());
            tasks.spawn(async move {
                match i % 3 {
                    0 => {
                        s1.get(&id1).await.unwrap();
                    }
                    1 => {
                        s1.touch(&id1).await.unwrap();
                    }
                    _ => {
                        s1.update(&id1, &SessionUpdate::new().extra("k", "v"))
                            .await
                            .unwrap();
                    }
                }
            });
            tasks.spawn(async move {
                assert!(s2.destroy(&id2).await.unwrap());
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        for id in &ids {
            let key = store.key(id);
            assert!(!exists(redis, &key).await, "destroyed session resurrected");
            assert_eq!(pttl(redis, &key).await, -2);
            assert!(store.get(id).await.unwrap().is_none());
        }
        done += n;
    }
    assert!(store.list_user("racer").await.unwrap().is_empty());
}

/// What a decode error names instead of a session key: the id is a bearer secret.
fn redacted_key(redis: &Redis) -> String {
    format!("{}session:<redacted>", redis.keys().prefix())
}

fn assert_no_session_id(err: &Error, id: &SessionId) {
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(
            !shown.contains(id.as_str()),
            "session id in an error: {shown}"
        );
    }
}

fn assert_same_data(a: &Session, b: &Session) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.user_id, b.user_id);
    assert_eq!(a.email, b.email);
    assert_eq!(a.role, b.role);
    assert_eq!(a.created_at, b.created_at);
    assert_eq!(a.ip_address, b.ip_address);
    assert_eq!(a.user_agent, b.user_agent);
    assert_eq!(a.permissions, b.permissions);
    assert_eq!(a.extra, b.extra);
}

aether_redis::contract_tests! {
    async fn create_then_get_returns_the_session_and_slides_the_ttl(redis) {
        let store = redis.sessions();
        assert!(store.uses_scripts());
        let created = store.create(new_session("u1")).await.unwrap();
        let key = store.key(&created.id);
        assert!(pttl(&redis, &key).await > 55_000);
        // The create transaction's temporary key never outlives it.
        assert!(!exists(&redis, &redis.keys().derived(&key, "create")).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = store.get(&created.id).await.unwrap().unwrap();
        assert_same_data(&created, &got);
        assert!(got.last_access_at > created.last_access_at);
        assert!(got.has_permission("mail:send"));
        assert_eq!(got.extra.get("csrfToken").map(String::as_str), Some("csrf-1"));
        // The stored lastAccessAt moved too, in the same round trip.
        let stored = hgetall(&redis, &key).await;
        assert_eq!(stored["lastAccessAt"], got.last_access_at.to_string());
        let unknown = SessionId::generate().unwrap();
        assert!(store.get(&unknown).await.unwrap().is_none());
        assert!(!exists(&redis, &store.key(&unknown)).await);
        assert!(!store.touch(&unknown).await.unwrap());
        assert!(!exists(&redis, &store.key(&unknown)).await);
    }

    async fn get_racing_destroy_never_resurrects_1000_times(redis) {
        let store = redis.sessions();
        race_get_and_destroy(&store, &redis, 1_000, 100).await;
    }

    async fn script_free_get_racing_destroy_never_resurrects(redis) {
        let store = redis.sessions().without_scripts();
        assert!(!store.uses_scripts());
        race_get_and_destroy(&store, &redis, 300, 50).await;
    }

    async fn ttl_follows_the_table_per_environment(redis) {
        for (env, secs) in [
            (Environment::Production, 86_400_i64),
            (Environment::Development, 3_600),
            (Environment::Test, 60),
        ] {
            let r = reconnect(&redis, |c| c.environment = env).await;
            let store = r.sessions();
            assert_eq!(store.idle_ttl(), Duration::from_secs(secs as u64));
            let s = store.create(new_session("ttl")).await.unwrap();
            let key = store.key(&s.id);
            let ttl = pttl(&r, &key).await;
            assert!(ttl <= secs * 1000 && ttl > secs * 1000 - 5_000, "{env:?}: {ttl}");
            let mut conn = raw(&r).await;
            let _: () = redis::cmd("PEXPIRE").arg(&key).arg(1_000).query_async(&mut conn).await.unwrap();
            store.get(&s.id).await.unwrap().unwrap();
            let ttl = pttl(&r, &key).await;
            assert!(ttl <= secs * 1000 && ttl > secs * 1000 - 5_000, "{env:?} after get: {ttl}");
        }
    }

    async fn hostile_ids_are_rejected(redis) {
        let store = redis.sessions();
        for bad in [
            "", "a:b", "x}{y", "{session:victim}", "*", "a?", "[ab]", "a\\b", "a b", "a\nb",
            "../session:x",
        ] {
            let err = bad.parse::<SessionId>().unwrap_err();
            assert!(matches!(err, Error::InvalidInput { what: "session id", .. }), "{bad:?}: {err:?}");
        }
        assert!("x".repeat(513).parse::<SessionId>().is_err());
        for bad_user in ["", "u:1", "u*", "{u}"] {
            assert!(matches!(
                store.create(new_session(bad_user)).await,
                Err(Error::InvalidInput { what: "user id", .. })
            ));
            assert!(matches!(store.list_user(bad_user).await, Err(Error::InvalidInput { .. })));
            assert!(matches!(store.destroy_user(bad_user).await, Err(Error::InvalidInput { .. })));
        }
        let shadow = NewSession::new("u1", "e@x", Role::User).extra("createdAt", "0");
        assert!(matches!(store.create(shadow).await, Err(Error::InvalidInput { .. })));
        // A well-formed id can only ever address its own key in the session keyspace.
        let id: SessionId = "abc-DEF_123".parse().unwrap();
        assert_eq!(store.key(&id), format!("{}session:abc-DEF_123", redis.keys().prefix()));
    }

    async fn typescript_written_session_reads_back(redis) {
        let store = redis.sessions();
        let id = SessionId::generate().unwrap();
        let key = store.key(&id);
        let now = aether_redis::codec::now_millis();
        let mut conn = raw(&redis).await;
        // Exactly what the documented TypeScript SessionManager.createSession sends.
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("userId").arg("ts-user")
            .arg("email").arg("ts@example.com")
            .arg("role").arg("moderator")
            .arg("createdAt").arg(now.to_string())
            .arg("lastAccessAt").arg(now.to_string())
            .arg("ipAddress").arg("198.51.100.4")
            .arg("userAgent").arg("node-fetch")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("EXPIRE").arg(&key).arg(86_400).query_async(&mut conn).await.unwrap();
        let s = store.get(&id).await.unwrap().unwrap();
        assert_eq!(s.user_id, "ts-user");
        assert_eq!(s.email, "ts@example.com");
        assert_eq!(s.role, Role::Moderator);
        assert_eq!(s.created_at, now);
        assert!(s.last_access_at >= now);
        assert_eq!(s.ip_address, "198.51.100.4");
        assert_eq!(s.user_agent, "node-fetch");
        assert!(s.permissions.is_empty());
        assert!(s.extra.is_empty());
        // Our access slid the TTL to our idle TTL (test environment: 60 s).
        let ttl = pttl(&redis, &key).await;
        assert!(ttl <= 60_000 && ttl > 55_000, "{ttl}");
        // And the TypeScript getSession (HGETALL) still sees a complete record.
        let fields = hgetall(&redis, &key).await;
        assert_eq!(fields["role"], "moderator");
        assert_eq!(fields.len(), 7);
        // Documented limitation: that service writes no index entry and reading the session
        // here adds none, so the per-user operations do not reach it.
        assert!(store.list_user("ts-user").await.unwrap().is_empty());
        assert_eq!(store.destroy_user("ts-user").await.unwrap(), 0);
        assert!(exists(&redis, &key).await);
    }

    async fn our_session_reads_back_as_typescript_does(redis) {
        let store = redis.sessions();
        let s = store.create(new_session("u-ts")).await.unwrap();
        let key = store.key(&s.id);
        // TypeScript: `await client.hgetall(\`session:${sessionId}\`)`.
        let fields = hgetall(&redis, &key).await;
        assert_eq!(fields["userId"], "u-ts");
        assert_eq!(fields["email"], "u-ts@example.com");
        assert_eq!(fields["role"], "user");
        assert_eq!(fields["createdAt"].parse::<i64>().unwrap(), s.created_at);
        assert_eq!(fields["lastAccessAt"].parse::<i64>().unwrap(), s.last_access_at);
        assert_eq!(fields["ipAddress"], "203.0.113.9");
        assert_eq!(fields["userAgent"], "Mozilla/5.0 (X11; Linux x86_64)");
        let perms: Vec<String> = serde_json::from_str(&fields["permissions"]).unwrap();
        assert_eq!(perms, ["mail:read", "mail:send"]);
        assert_eq!(fields["csrfToken"], "csrf-1");
        assert_eq!(fields.len(), 9);
        assert_eq!(key, format!("{}session:{}", redis.keys().prefix(), s.id));
    }

    async fn partial_update_changes_only_what_is_set(redis) {
        let store = redis.sessions();
        let s = store.create(new_session("u-up").extra("draft", "1")).await.unwrap();
        let change = SessionUpdate::new()
            .role(Role::Admin)
            .permissions(["all"])
            .extra("platformConnectionId", "123")
            .remove_extra("draft");
        let up = store.update(&s.id, &change).await.unwrap().unwrap();
        assert_eq!(up.role, Role::Admin);
        assert_eq!(up.permissions, ["all"]);
        assert_eq!(up.email, s.email);
        assert_eq!(up.user_agent, s.user_agent);
        assert_eq!(up.created_at, s.created_at);
        assert_eq!(up.extra.get("platformConnectionId").map(String::as_str), Some("123"));
        assert_eq!(up.extra.get("csrfToken").map(String::as_str), Some("csrf-1"));
        assert!(!up.extra.contains_key("draft"));
        assert_same_data(&up, &store.get(&s.id).await.unwrap().unwrap());
        // Same through the script-free path.
        let free = store.clone().without_scripts();
        let up2 = free.update(&s.id, &SessionUpdate::new().email("new@example.com").remove_extra("csrfToken")).await.unwrap().unwrap();
        assert_eq!(up2.email, "new@example.com");
        assert_eq!(up2.role, Role::Admin);
        assert!(!up2.extra.contains_key("csrfToken"));
        assert_same_data(&up2, &store.get(&s.id).await.unwrap().unwrap());
        // No resurrection.
        assert!(store.destroy(&s.id).await.unwrap());
        assert!(store.update(&s.id, &change).await.unwrap().is_none());
        assert!(free.update(&s.id, &change).await.unwrap().is_none());
        assert!(!exists(&redis, &store.key(&s.id)).await);
        assert!(!store.destroy(&s.id).await.unwrap());
    }

    async fn rotate_id_moves_the_session_atomically(redis) {
        let store = redis.sessions();
        let s = store.create(new_session("u-rot")).await.unwrap();
        let new_id = store.rotate_id(&s.id).await.unwrap().unwrap();
        assert_ne!(new_id, s.id);
        assert!(store.get(&s.id).await.unwrap().is_none());
        assert!(!exists(&redis, &store.key(&s.id)).await);
        let moved = store.get(&new_id).await.unwrap().unwrap();
        assert_eq!(moved.user_id, "u-rot");
        assert_eq!(moved.created_at, s.created_at);
        assert_eq!(moved.extra, s.extra);
        assert!(pttl(&redis, &store.key(&new_id)).await > 0);
        if redis.keys().is_cluster() {
            assert_eq!(
                aether_redis::keyspace::cluster_slot(&store.key(&new_id)),
                aether_redis::keyspace::cluster_slot(&store.key(&s.id))
            );
        }
        let listed: Vec<SessionId> = store.list_user("u-rot").await.unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0], new_id);
        assert!(store.rotate_id(&s.id).await.unwrap().is_none());
        // Concurrent rotations of one session: exactly one wins.
        let (a, b) = tokio::join!(store.rotate_id(&new_id), store.rotate_id(&new_id));
        let winners: Vec<SessionId> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
        assert_eq!(winners.len(), 1);
        assert_eq!(store.list_user("u-rot").await.unwrap().len(), 1);
    }

    async fn rotate_id_racing_list_user_keeps_the_new_id_indexed(redis) {
        // Grace zero: an absent member is pruned as soon as it looks old, which the new id of a
        // rotation does (its score is the old session's deadline) until the rename lands.
        let store = redis.sessions().with_index_grace(Duration::ZERO);
        let index = store.index_key("u-rot-list").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listers: Vec<_> = (0..2)
            .map(|_| {
                let (store, stop) = (store.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        store.list_user("u-rot-list").await.unwrap();
                    }
                })
            })
            .collect();
        let mut lost = 0;
        for _ in 0..100 {
            let mut id = store.create(new_session("u-rot-list")).await.unwrap().id;
            for _ in 0..3 {
                id = store.rotate_id(&id).await.unwrap().unwrap();
                let score: Option<f64> = redis::cmd("ZSCORE").arg(&index).arg(id.as_str()).query_async(&mut raw(&redis).await).await.unwrap();
                if score.is_none() {
                    lost += 1;
                }
            }
            assert!(store.destroy(&id).await.unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for l in listers {
            l.await.unwrap();
        }
        assert_eq!(lost, 0, "rotated sessions missing from the index");
        // No rotation marker outlives its rotation.
        let left: Vec<String> = redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1).query_async(&mut raw(&redis).await).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    async fn rotate_id_racing_destroy_user_leaves_no_session_behind(redis) {
        let store = redis.sessions().with_index_grace(Duration::ZERO);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let destroyer = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    store.destroy_user("u-rot-out").await.unwrap();
                }
            })
        };
        let mut ids = Vec::new();
        for _ in 0..150 {
            let mut id = store.create(new_session("u-rot-out")).await.unwrap().id;
            ids.push(id.clone());
            for _ in 0..2 {
                match store.rotate_id(&id).await.unwrap() {
                    Some(new_id) => {
                        ids.push(new_id.clone());
                        id = new_id;
                    }
                    None => break,
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        destroyer.await.unwrap();
        // Log out everywhere, once more with nothing racing: it must reach every session.
        store.destroy_user("u-rot-out").await.unwrap();
        let mut survivors = 0;
        for id in &ids {
            if exists(&redis, &store.key(id)).await {
                survivors += 1;
            }
        }
        assert_eq!(survivors, 0, "sessions outside the index survived log-out-everywhere");
    }

    async fn json_access_stamps_the_top_level_last_access_only(redis) {
        let r = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await;
        let mut conn = raw(&r).await;
        let now = aether_redis::codec::now_millis();
        let old = now - 10_000;
        let documents = [
            // lastAccessAt as a decimal string (accepted on read).
            format!(r#"{{"userId":"u-j","email":"e","role":"user","createdAt":{now},"lastAccessAt":"{old}","ipAddress":"","userAgent":""}}"#),
            // A nested lastAccessAt before the top-level one.
            format!(r#"{{"meta":{{"lastAccessAt":7}},"userId":"u-j","email":"e","role":"user","createdAt":{now},"lastAccessAt":{old},"ipAddress":"","userAgent":""}}"#),
            // Both, and the nested one a string.
            format!(r#"{{"userId":"u-j","meta":{{"lastAccessAt":"7"}},"email":"e","role":"user","createdAt":"{now}","lastAccessAt":"{old}","ipAddress":"","userAgent":""}}"#),
        ];
        for (i, doc) in documents.iter().enumerate() {
            for store in [r.sessions(), r.sessions().without_scripts()] {
                let id = SessionId::generate().unwrap();
                let key = store.key(&id);
                let _: () = redis::cmd("SET").arg(&key).arg(doc).arg("PX").arg(60_000).query_async(&mut conn).await.unwrap();
                let got = store.get(&id).await.unwrap().unwrap();
                assert!(got.last_access_at >= now, "#{i} ({}): {}", store.uses_scripts(), got.last_access_at);
                let stored: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
                let v: serde_json::Value = serde_json::from_str(&stored).unwrap();
                assert_eq!(v["lastAccessAt"], got.last_access_at, "#{i} ({}): {stored}", store.uses_scripts());
                if doc.contains("meta") {
                    let before: serde_json::Value = serde_json::from_str(doc).unwrap();
                    assert_eq!(v["meta"], before["meta"], "#{i}: nested member changed: {stored}");
                }
                let ttl = pttl(&r, &key).await;
                assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
            }
        }
    }

    async fn lifetime_cap_bounds_the_ttl(redis) {
        let r = reconnect(&redis, |c| c.session_max_lifetime = Duration::from_secs(2)).await;
        let store = r.sessions();
        let s = store.create(new_session("u-cap")).await.unwrap();
        let key = store.key(&s.id);
        let ttl = pttl(&r, &key).await;
        assert!(ttl <= 2_000 && ttl > 0, "{ttl}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        store.get(&s.id).await.unwrap().unwrap();
        // Sliding never extends past createdAt + cap.
        let ttl = pttl(&r, &key).await;
        assert!(ttl <= 1_000 && ttl > 0, "{ttl}");
        assert!(store.touch(&s.id).await.unwrap());
        let ttl = pttl(&r, &key).await;
        assert!(ttl <= 1_000 && ttl > 0, "{ttl}");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert!(store.get(&s.id).await.unwrap().is_none());
        assert!(!exists(&r, &key).await);
        // The index forgets it by its deadline.
        assert!(store.list_user("u-cap").await.unwrap().is_empty());
        assert!(!exists(&r, &store.index_key("u-cap").unwrap()).await);
    }

    async fn user_index_lists_prunes_and_destroys(redis) {
        let store = redis.sessions().with_index_grace(Duration::ZERO);
        let a = store.create(new_session("alice")).await.unwrap();
        let b = store.create(new_session("alice")).await.unwrap();
        let c = store.create(new_session("alice")).await.unwrap();
        let other = store.create(new_session("bob")).await.unwrap();
        let index = store.index_key("alice").unwrap();
        assert_eq!(index, format!("{}session:by-user:alice", redis.keys().prefix()));
        let ttl = pttl(&redis, &index).await;
        assert!(ttl > 0, "index without TTL: {ttl}");
        let mut listed: Vec<SessionId> = store.list_user("alice").await.unwrap().into_iter().map(|s| s.id).collect();
        listed.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        let mut expected = vec![a.id.clone(), b.id.clone(), c.id.clone()];
        expected.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        assert_eq!(listed, expected);
        // destroy removes the member; an expired session (simulated: key gone behind our back)
        // is pruned on the next listing.
        assert!(store.destroy(&a.id).await.unwrap());
        let mut conn = raw(&redis).await;
        let _: () = redis::cmd("DEL").arg(store.key(&b.id)).query_async(&mut conn).await.unwrap();
        let listed = store.list_user("alice").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, c.id);
        let card: i64 = redis::cmd("ZCARD").arg(&index).query_async(&mut conn).await.unwrap();
        assert_eq!(card, 1);
        // Log out everywhere.
        let d = store.create(new_session("alice")).await.unwrap();
        assert_eq!(store.destroy_user("alice").await.unwrap(), 2);
        assert!(store.get(&c.id).await.unwrap().is_none());
        assert!(store.get(&d.id).await.unwrap().is_none());
        assert!(store.list_user("alice").await.unwrap().is_empty());
        assert!(!exists(&redis, &index).await);
        assert_eq!(store.destroy_user("alice").await.unwrap(), 0);
        // Bob is untouched.
        assert_eq!(store.list_user("bob").await.unwrap().len(), 1);
        assert!(store.get(&other.id).await.unwrap().is_some());
    }

    async fn listing_and_logout_reach_sessions_stored_in_either_layout(redis) {
        // A deployment that switched REDIS_SESSION_LAYOUT still has live sessions of the old
        // one: listing (and the export built on it) and "log out everywhere" must reach them
        // too, not fail on their type.
        let json = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await;
        for (destroyer, other) in [(redis.sessions(), json.sessions()), (json.sessions(), redis.sessions())] {
            let own = destroyer.create(new_session("u-mixed")).await.unwrap();
            let foreign = other.create(new_session("u-mixed")).await.unwrap();
            let bystander = other.create(new_session("u-bystander")).await.unwrap();
            let listed = destroyer.list_user("u-mixed").await.unwrap();
            let mut ids: Vec<_> = listed.iter().map(|s| s.id.clone()).collect();
            ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            let mut expected = vec![own.id.clone(), foreign.id.clone()];
            expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            assert_eq!(ids, expected);
            let read_back = listed.iter().find(|s| s.id == foreign.id).unwrap();
            assert_same_data(&foreign, read_back);
            let export = redis.user_data().export_user("u-mixed").await.unwrap();
            assert_eq!(export["sessions"].as_array().unwrap().len(), 2, "{export}");
            assert_eq!(destroyer.destroy_user("u-mixed").await.unwrap(), 2);
            let mut conn = raw(&redis).await;
            for (id, alive) in [(&own.id, false), (&foreign.id, false), (&bystander.id, true)] {
                let exists: bool = redis::cmd("EXISTS").arg(destroyer.key(id)).query_async(&mut conn).await.unwrap();
                assert_eq!(exists, alive);
            }
            other.destroy_user("u-bystander").await.unwrap();
        }
    }

    async fn json_layout_has_the_same_semantics(redis) {
        let r = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await;
        for store in [r.sessions(), r.sessions().without_scripts()] {
            let s = store.create(new_session("u-json").permissions(Vec::<String>::new())).await.unwrap();
            let key = store.key(&s.id);
            let mut conn = raw(&r).await;
            let doc: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
            assert_eq!(v["userId"], "u-json");
            assert_eq!(v["createdAt"], s.created_at);
            assert_eq!(v["permissions"], serde_json::json!([]));
            assert!(pttl(&r, &key).await > 55_000);
            tokio::time::sleep(Duration::from_millis(5)).await;
            let got = store.get(&s.id).await.unwrap().unwrap();
            assert_same_data(&s, &got);
            assert!(got.last_access_at > s.last_access_at);
            let doc: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
            assert_eq!(v["lastAccessAt"], got.last_access_at);
            assert_eq!(v["permissions"], serde_json::json!([]), "{doc}");
            // A member of another type written by another service survives an update.
            let mut obj = v.as_object().unwrap().clone();
            obj.insert("platformConnectionId".into(), serde_json::json!(12345678901234567_i64));
            let _: () = redis::cmd("SET").arg(&key).arg(serde_json::to_string(&obj).unwrap()).arg("KEEPTTL").query_async(&mut conn).await.unwrap();
            let up = store.update(&s.id, &SessionUpdate::new().role(Role::Moderator)).await.unwrap().unwrap();
            assert_eq!(up.role, Role::Moderator);
            assert_eq!(up.extra["platformConnectionId"], "12345678901234567");
            assert!(store.touch(&s.id).await.unwrap());
            let doc: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            assert!(doc.contains("\"platformConnectionId\":12345678901234567"), "{doc}");
            // Members an update does not change keep their stored text, even where a decode
            // and encode would round them: an integer beyond 64 bits, a trailing zero.
            let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&doc).unwrap();
            obj.remove("platformConnectionId");
            let doc = serde_json::to_string(&obj).unwrap();
            let doc = format!("{},\"wide\":123456789012345678901234567890,\"nested\":{{\"ratio\":1.10}}}}", &doc[..doc.len() - 1]);
            let _: () = redis::cmd("SET").arg(&key).arg(&doc).arg("KEEPTTL").query_async(&mut conn).await.unwrap();
            store.update(&s.id, &SessionUpdate::new().role(Role::Admin)).await.unwrap().unwrap();
            let doc: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            assert!(doc.contains("\"wide\":123456789012345678901234567890,\"nested\":{\"ratio\":1.10}"), "{doc}");
            assert!(doc.contains("\"role\":\"admin\""), "{doc}");
            assert!(pttl(&r, &key).await > 55_000);
            let rotated = store.rotate_id(&s.id).await.unwrap().unwrap();
            assert_eq!(store.list_user("u-json").await.unwrap().len(), 1);
            assert!(store.destroy(&rotated).await.unwrap());
            assert!(store.get(&rotated).await.unwrap().is_none());
            assert!(store.update(&rotated, &SessionUpdate::new()).await.unwrap().is_none());
            assert!(!exists(&r, &store.key(&rotated)).await);
            store.create(new_session("u-json")).await.unwrap();
            assert_eq!(store.destroy_user("u-json").await.unwrap(), 1);
        }
        let store = r.sessions();
        race_get_and_destroy(&store, &r, 200, 100).await;
    }

    async fn malformed_stored_session_is_a_decode_error(redis) {
        let store = redis.sessions();
        let mut conn = raw(&redis).await;
        for (field, value) in [("createdAt", "soon"), ("role", "root"), ("permissions", "not json")] {
            let id = SessionId::generate().unwrap();
            let key = store.key(&id);
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&key);
            for (f, v) in [
                ("userId", "u"), ("email", "e"), ("role", "user"), ("createdAt", "1"),
                ("lastAccessAt", "1"), ("ipAddress", "i"), ("userAgent", "a"),
            ] {
                cmd.arg(f).arg(if f == field { value } else { v });
            }
            cmd.arg("createdAt").arg(if field == "createdAt" { value.to_owned() } else { aether_redis::codec::now_millis().to_string() });
            if field == "permissions" {
                cmd.arg("permissions").arg(value);
            }
            let _: () = cmd.query_async(&mut conn).await.unwrap();
            let _: () = redis::cmd("EXPIRE").arg(&key).arg(60).query_async(&mut conn).await.unwrap();
            for free in [false, true] {
                let s = if free { store.clone().without_scripts() } else { store.clone() };
                match s.get(&id).await {
                    Err(err @ Error::Decode { .. }) => {
                        assert_no_session_id(&err, &id);
                        let Error::Decode { key: k, field: Some(f), .. } = err else {
                            panic!("{field}: no field in {err:?}");
                        };
                        assert_eq!(k, redacted_key(&redis));
                        assert_eq!(f, field);
                    }
                    other => panic!("{field}: expected a decode error, got {other:?}"),
                }
            }
            assert!(pttl(&redis, &key).await > 0);
        }
        // A missing documented field names it too.
        let id = SessionId::generate().unwrap();
        let key = store.key(&id);
        let _: () = redis::cmd("HSET").arg(&key).arg("userId").arg("u").arg("createdAt").arg(aether_redis::codec::now_millis()).query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("EXPIRE").arg(&key).arg(60).query_async(&mut conn).await.unwrap();
        assert!(matches!(store.get(&id).await, Err(Error::Decode { field: Some(_), .. })));
        // A JSON session that is not JSON.
        let r = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await;
        let js = r.sessions();
        let id = SessionId::generate().unwrap();
        let key = js.key(&id);
        let _: () = redis::cmd("SET").arg(&key).arg("{nope").arg("EX").arg(60).query_async(&mut conn).await.unwrap();
        for s in [js.clone(), js.clone().without_scripts()] {
            let err = s.get(&id).await.unwrap_err();
            assert!(matches!(err, Error::Decode { key: ref k, .. } if *k == redacted_key(&r)), "{err:?}");
            assert_no_session_id(&err, &id);
        }
        // Every other path that decodes a stored session redacts its id too.
        let _: () = redis::cmd("ZADD").arg(js.index_key("u-bad").unwrap()).arg(aether_redis::codec::now_millis() + 60_000).arg(id.as_str()).query_async(&mut conn).await.unwrap();
        let err = js.rotate_id(&id).await.unwrap_err();
        assert_no_session_id(&err, &id);
        let err = js.list_user("u-bad").await.unwrap_err();
        assert_no_session_id(&err, &id);
    }

    async fn sessions_that_idled_out_do_not_pile_up_in_the_user_index(redis) {
        // A client that logs in on every launch and never logs out: each session ends by its
        // idle timeout long before its deadline. The index must not keep every one of them.
        let short = reconnect(&redis, |c| {
            c.ttl_overrides.insert(aether_redis::Keyspace::Session, Duration::from_millis(600));
        })
        .await;
        let store = short.sessions().with_index_grace(Duration::ZERO);
        let index = store.index_key("u-churn").unwrap();
        for _ in 0..64 {
            store.create(new_session("u-churn")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut live = Vec::new();
        for _ in 0..64 {
            live.push(store.create(new_session("u-churn")).await.unwrap().id);
        }
        let mut conn = raw(&redis).await;
        let size: u64 = redis::cmd("ZCARD").arg(&index).query_async(&mut conn).await.unwrap();
        assert!(size <= 64, "{size} index members for at most 64 live sessions");
        // Nothing live was dropped: every session still alive is listed.
        let listed = store.list_user("u-churn").await.unwrap();
        for s in &listed {
            assert!(live.contains(&s.id));
        }
        assert!(!listed.is_empty());
    }

    async fn index_prunes_under_concurrent_creates_never_drop_a_live_session(redis) {
        // 150 creates at once cross the prune points 64 and 128 while other creates have
        // indexed their session but not yet written it: with the default grace, a prune drops
        // none of them, so "log out everywhere" still reaches every session. (The session
        // layout is the hash one: the test writes the slow create's session by hand.)
        let store = redis.sessions();
        // One more create caught between its two steps for the whole race: indexed, not yet
        // written.
        let slow = SessionId::generate().unwrap();
        let index = store.index_key("u-crowd").unwrap();
        let mut conn = raw(&redis).await;
        let now = aether_redis::codec::now_millis();
        let _: () = redis::cmd("ZADD").arg(&index).arg(now + 7 * 86_400_000).arg(slow.as_str())
            .query_async(&mut conn).await.unwrap();
        let creates = (0..150).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.create(new_session("u-crowd")).await.unwrap().id })
        });
        let mut created: Vec<String> =
            futures::future::join_all(creates).await.into_iter().map(|r| r.unwrap().as_str().to_owned()).collect();
        let _: () = redis::cmd("HSET").arg(store.key(&slow))
            .arg("userId").arg("u-crowd").arg("email").arg("e").arg("role").arg("user")
            .arg("createdAt").arg(now).arg("lastAccessAt").arg(now)
            .arg("ipAddress").arg("i").arg("userAgent").arg("a")
            .query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("EXPIRE").arg(store.key(&slow)).arg(60).query_async(&mut conn).await.unwrap();
        created.push(slow.as_str().to_owned());
        created.sort();
        let mut listed: Vec<String> = store
            .list_user("u-crowd")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id.as_str().to_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, created);
        assert_eq!(store.destroy_user("u-crowd").await.unwrap(), 151);
    }

    async fn a_created_at_the_decoder_refuses_is_never_slid_or_stamped(redis) {
        let mut conn = raw(&redis).await;
        let hash = redis.sessions();
        let now = aether_redis::codec::now_millis();
        for created in ["1.7e12", "1700000000000.5", "nan", "inf", "0x10", " 17", "99999999999999999999", "100000000000000000", "+"] {
            let id = SessionId::generate().unwrap();
            let key = hash.key(&id);
            let _: () = redis::cmd("HSET").arg(&key)
                .arg("userId").arg("u").arg("email").arg("e").arg("role").arg("user")
                .arg("createdAt").arg(created).arg("lastAccessAt").arg("1")
                .arg("ipAddress").arg("i").arg("userAgent").arg("a")
                .query_async(&mut conn).await.unwrap();
            let _: () = redis::cmd("EXPIRE").arg(&key).arg(30).query_async(&mut conn).await.unwrap();
            for store in [hash.clone(), hash.clone().without_scripts()] {
                let err = store.get(&id).await.unwrap_err();
                assert!(matches!(&err, Error::Decode { field: Some(f), .. } if f == "createdAt"), "{created}: {err:?}");
                let touched = store.touch(&id).await;
                assert!(matches!(&touched, Err(Error::Decode { field: Some(f), .. }) if f == "createdAt"), "{created}: {touched:?}");
            }
            assert!(pttl(&redis, &key).await <= 30_000, "{created}: TTL slid");
            assert_eq!(hgetall(&redis, &key).await["lastAccessAt"], "1", "{created}: stamped");
        }
        // JSON: an integral time written with an exponent is read as that time, by the script
        // and the decoder alike; a fraction is refused without a write.
        let json = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await.sessions();
        let doc = |created: &str| format!(
            r#"{{"userId":"u","email":"e","role":"user","createdAt":{created},"lastAccessAt":1,"ipAddress":"i","userAgent":"a"}}"#
        );
        let id = SessionId::generate().unwrap();
        let key = json.key(&id);
        let _: () = redis::cmd("SET").arg(&key).arg(doc(&format!("{}e3", now / 1000))).arg("EX").arg(30).query_async(&mut conn).await.unwrap();
        let got = json.get(&id).await.unwrap().unwrap();
        assert_eq!(got.created_at, now / 1000 * 1000);
        assert!(pttl(&redis, &key).await > 30_000, "an accepted session's TTL slides");
        for created in ["1700000000000.5", "\"1.7e12\"", "9007199254740993", "\"100000000000000000\""] {
            let id = SessionId::generate().unwrap();
            let key = json.key(&id);
            let _: () = redis::cmd("SET").arg(&key).arg(doc(created)).arg("EX").arg(30).query_async(&mut conn).await.unwrap();
            let err = json.get(&id).await.unwrap_err();
            assert!(matches!(&err, Error::Decode { field: Some(f), .. } if f == "createdAt"), "{created}: {err:?}");
            assert!(pttl(&redis, &key).await <= 30_000, "{created}: TTL slid");
            let stored: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            assert_eq!(stored, doc(created));
        }
    }

    async fn a_foreign_json_session_string_is_refused_and_left_untouched(redis) {
        // The Zenith NextAuth adapter's `SETEX session:<token> 86400 <its own JSON>`.
        let mut conn = raw(&redis).await;
        let hash = redis.sessions();
        let id = SessionId::generate().unwrap();
        let key = hash.key(&id);
        let foreign = r#"{"sessionToken":"t","userId":"u","expires":"2026-12-05T00:00:00.000Z"}"#;
        let _: () = redis::cmd("SET").arg(&key).arg(foreign).arg("EX").arg(86_400).query_async(&mut conn).await.unwrap();
        let json = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await;
        for store in [hash.clone(), hash.clone().without_scripts()] {
            let err = store.get(&id).await.unwrap_err();
            assert!(matches!(&err, Error::Server(_)) && err.to_string().contains("WRONGTYPE"), "{err:?}");
            assert_no_session_id(&err, &id);
            let err = store.touch(&id).await.unwrap_err();
            assert!(matches!(&err, Error::Server(_)) && err.to_string().contains("WRONGTYPE"), "{err:?}");
        }
        for store in [json.sessions(), json.sessions().without_scripts()] {
            let err = store.get(&id).await.unwrap_err();
            assert!(matches!(&err, Error::Decode { .. }), "{err:?}");
            assert_no_session_id(&err, &id);
        }
        let stored: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(stored, foreign);
        assert!(pttl(&redis, &key).await > 86_000_000);
        // Logging out reaches it whatever layout this store is configured for.
        assert!(hash.destroy(&id).await.unwrap());
        assert!(!exists(&redis, &key).await);
        assert!(!hash.destroy(&id).await.unwrap());
    }

    async fn destroy_reaches_a_session_of_the_other_layout_and_its_index_entry(redis) {
        let hash = redis.sessions();
        let json = reconnect(&redis, |c| c.session_layout = SessionLayout::Json).await.sessions();
        for (writer, destroyer) in [(&json, &hash), (&hash, &json)] {
            let user = "cross-layout";
            let created = writer.create(new_session(user)).await.unwrap();
            assert_eq!(writer.list_user(user).await.unwrap().len(), 1);
            assert!(destroyer.destroy(&created.id).await.unwrap());
            assert!(!exists(&redis, &writer.key(&created.id)).await);
            let index: Vec<String> = redis::cmd("ZRANGE")
                .arg(writer.index_key(user).unwrap())
                .arg(0)
                .arg(-1)
                .query_async(&mut raw(&redis).await)
                .await
                .unwrap();
            assert!(index.is_empty(), "{index:?}");
            assert!(!destroyer.destroy(&created.id).await.unwrap());
        }
    }
}

#[test]
fn session_debug_never_shows_the_id() {
    let id = SessionId::generate().unwrap();
    assert!(!format!("{id:?}").contains(id.as_str()));
}

/// A rename that succeeded is reported even when the index clean-up after it fails: the caller
/// must learn the new id, or the user is logged out. The clean-up's `ZREM` is refused here by
/// an ACL user that may run everything else.
#[tokio::test]
async fn rotate_id_returns_the_new_id_when_only_the_index_clean_up_fails() {
    use aether_redis::testkit::{LocalOptions, LocalServer};
    let server = tokio::task::spawn_blocking(|| {
        LocalServer::start(LocalOptions {
            config_lines: vec!["user rotator on >pw ~* &* +@all -zrem".into()],
            ..LocalOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let connect = |user: Option<&str>| {
        let mut builder = Config::builder().port(server.port()).key_prefix("rotate:");
        if let Some(user) = user {
            builder = builder.username(user).password("pw");
        }
        Redis::connect(builder.build().unwrap())
    };
    let owner = connect(None).await.unwrap();
    let rotator = connect(Some("rotator")).await.unwrap();
    let created = owner.sessions().create(new_session("u-rot")).await.unwrap();
    let rotated = rotator
        .sessions()
        .rotate_id(&created.id)
        .await
        .unwrap()
        .expect("the session existed");
    assert_ne!(rotated, created.id);
    let store = owner.sessions();
    assert!(store.get(&created.id).await.unwrap().is_none());
    assert_eq!(store.get(&rotated).await.unwrap().unwrap().user_id, "u-rot");
    // The listing still finds exactly the live session (the stale old id is pruned).
    let listed = store.list_user("u-rot").await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        [rotated]
    );
}
