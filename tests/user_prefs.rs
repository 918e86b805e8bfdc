//! User preferences (one hash field per preference, defaults, unknown fields preserved,
//! validation, TTL) and user erase/export.

use std::collections::BTreeMap;

use aether_redis::events::{NewNotification, SecurityEvent};
use aether_redis::rate_limit::TierName;
use aether_redis::session::{NewSession, Role};
use aether_redis::tokens::LinkPurpose;
use aether_redis::user_data::scan_keys;
use aether_redis::user_prefs::{Layout, Pref, Theme, UserPreferences};
use aether_redis::{Environment, Error, Keyspace, Redis};
use serde_json::json;

mod support;
use support::{contents, pttl};

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

async fn raw_hash(redis: &Redis, key: &str) -> BTreeMap<String, String> {
    let mut conn = redis.connection().await.unwrap();
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn prefs_key(redis: &Redis, user: &str) -> String {
    redis.keys().key(Keyspace::UserPrefs, &[user]).unwrap()
}

/// Type, contents and whether a TTL is set, for comparing a key before and after.
async fn snapshot(redis: &Redis, key: &str) -> (String, Vec<String>, bool) {
    let (kind, values) = contents(redis, key).await;
    let ttl = pttl(redis, key).await > 0;
    (kind, values, ttl)
}

/// Every key anywhere (all masters) whose name contains `needle`.
async fn keys_containing(redis: &Redis, needle: &str) -> Vec<String> {
    let mut keys = scan_keys(redis, &format!("*{needle}*")).await.unwrap();
    keys.sort();
    keys
}

/// Writes something for `user` in every keyspace that holds per-user data.
async fn populate(redis: &Redis, user: &str) {
    redis
        .user_prefs()
        .update(user, &[Pref::Theme(Theme::Light)])
        .await
        .unwrap();
    let tokens = redis.tokens();
    for purpose in LinkPurpose::ALL {
        tokens
            .issue(purpose, user, &json!({"for": user}))
            .await
            .unwrap();
        tokens
            .issue(purpose, user, &json!({"for": user}))
            .await
            .unwrap();
    }
    tokens.issue_2fa(user).await.unwrap();
    tokens
        .domain_challenge(user, &format!("{user}.example.com"))
        .await
        .unwrap();
    let events = redis.events();
    let n = events
        .push_notification(user, &NewNotification::new("k", "hello"))
        .await
        .unwrap();
    events.mark_read(user, &[&n.id]).await.unwrap();
    events
        .record_security_event(user, &SecurityEvent::new("login.ok"))
        .await
        .unwrap();
    // Rate-limit keys as the TypeScript services write them (`INCR` + `PEXPIRE` on
    // `rate-limit:<user>:<endpoint>`); the limiter's own keys may expire within a second or two,
    // which would make the counts below racy.
    let mut conn = redis.connection().await.unwrap();
    for endpoint in ["login", "send", "search", "api.v1.users"] {
        let key = redis
            .keys()
            .key(Keyspace::RateLimit, &[user, endpoint])
            .unwrap();
        let _: () = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg(&key)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(60_000)
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let sessions = redis.sessions();
    for agent in ["firefox", "curl"] {
        let new =
            NewSession::new(user, format!("{user}@example.com"), Role::User).user_agent(agent);
        sessions.create(new).await.unwrap();
    }
}

aether_redis::contract_tests! {
    async fn defaults_when_nothing_is_stored(redis) {
        let prefs = redis.user_prefs();
        assert_eq!(prefs.get("u-1").await.unwrap(), UserPreferences::default());
        assert_eq!(prefs.get_record("u-1").await.unwrap(), None);
        assert!(raw_hash(&redis, &prefs_key(&redis, "u-1")).await.is_empty(), "a read creates nothing");
        let d = UserPreferences::default();
        assert_eq!((d.theme, d.language.as_str(), d.timezone.as_str()), (Theme::System, "en", "UTC"));
        assert_eq!(d.ui.page_size, 25);
    }

    async fn partial_update_leaves_other_fields_untouched(redis) {
        let prefs = redis.user_prefs();
        let mut full = UserPreferences::default();
        full.theme = Theme::Light;
        full.language = "de".into();
        full.email_settings.signature = "Grüße".into();
        full.ui.page_size = 75;
        prefs.set("u-2", &full).await.unwrap();
        let key = prefs_key(&redis, "u-2");
        let before = raw_hash(&redis, &key).await;
        assert_eq!(before.len(), 12, "one field per preference: {before:?}");
        assert_eq!(before["ui.pageSize"], "75");
        assert_eq!(before["notifications.email"], "true");
        assert_eq!(before["emailSettings.signature"], "Grüße");

        prefs.update("u-2", &[Pref::Theme(Theme::Dark), Pref::SidebarCollapsed(true)]).await.unwrap();
        let after = raw_hash(&redis, &key).await;
        for (field, value) in &before {
            match field.as_str() {
                "theme" => assert_eq!(value_of(&after, field), "dark"),
                "ui.sidebarCollapsed" => assert_eq!(value_of(&after, field), "true"),
                _ => assert_eq!(value_of(&after, field), value, "{field} changed"),
            }
        }
        let got = prefs.get("u-2").await.unwrap();
        assert_eq!(got.theme, Theme::Dark);
        assert!(got.ui.sidebar_collapsed);
        assert_eq!(got.language, "de");
        assert_eq!(got.ui.page_size, 75);
    }

    async fn unknown_and_missing_fields_decode_with_defaults_and_unknown_survives(redis) {
        let key = prefs_key(&redis, "u-3");
        let mut conn = redis.connection().await.unwrap();
        // A record written by a newer service: one unknown field, most known ones missing.
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("theme").arg("dark")
            .arg("ui.density").arg("0.8")
            .arg("ui.pageSize").arg("50")
            .query_async(&mut conn)
            .await
            .unwrap();
        let prefs = redis.user_prefs();
        let got = prefs.get("u-3").await.unwrap();
        let mut expected = UserPreferences::default();
        expected.theme = Theme::Dark;
        expected.ui.page_size = 50;
        assert_eq!(got, expected);
        prefs.update("u-3", &[Pref::Layout(Layout::Compact), Pref::Language("fr".into())]).await.unwrap();
        let raw = raw_hash(&redis, &key).await;
        assert_eq!(raw.get("ui.density").map(String::as_str), Some("0.8"), "unknown field kept");
        let record = prefs.get_record("u-3").await.unwrap().unwrap();
        assert_eq!(record.unknown_fields.get("ui.density").map(String::as_str), Some("0.8"));
        assert_eq!(record.preferences.ui.layout, Layout::Compact);
        assert_eq!(record.preferences.language, "fr");
        assert_eq!(record.preferences.theme, Theme::Dark);
        assert!(pttl(&redis, &key).await > WEEK_MS - 5_000, "the write set the TTL");
    }

    async fn groups_stored_as_json_fields_are_read_where_no_dotted_field_says_otherwise(redis) {
        // Another service wrote the nested document's groups as one JSON field each: a user's
        // email opt-out stored that way must not read as the default (`true`).
        let key = prefs_key(&redis, "u-groups");
        let mut conn = redis.connection().await.unwrap();
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("notifications").arg(r#"{"email":false,"push":true,"security":false,"sound":"ding"}"#)
            .arg("notifications.security").arg("true")
            .arg("ui").arg(r#"{"pageSize":50,"layout":"compact"}"#)
            .query_async(&mut conn)
            .await
            .unwrap();
        let prefs = redis.user_prefs();
        let got = prefs.get("u-groups").await.unwrap();
        let mut expected = UserPreferences::default();
        expected.notifications.email = false;
        expected.notifications.security = true; // the dotted field wins
        expected.ui.page_size = 50;
        expected.ui.layout = Layout::Compact;
        assert_eq!(got, expected);
        for (group, value) in [("ui", "not json"), ("ui", r#"{"pageSize":5000}"#), ("emailSettings", r#"{"autoReply":[true]}"#)] {
            let _: () = redis::cmd("HSET").arg(&key).arg(group).arg(value).query_async(&mut conn).await.unwrap();
            let err = prefs.get("u-groups").await.unwrap_err();
            assert!(matches!(&err, Error::Decode { field: Some(f), .. } if f == group), "{value}: {err:?}");
            let _: () = redis::cmd("HDEL").arg(&key).arg(group).query_async(&mut conn).await.unwrap();
        }
    }

    async fn bad_values_are_rejected_naming_the_field(redis) {
        let prefs = redis.user_prefs();
        for (update, field) in [
            (vec![Pref::PageSize(0)], "ui.pageSize"),
            (vec![Pref::Theme(Theme::Dark), Pref::PageSize(10_000)], "ui.pageSize"),
            (vec![Pref::Language(String::new())], "language"),
            (vec![Pref::Timezone(" ".into())], "timezone"),
            (vec![Pref::Signature("x".repeat(100_000))], "emailSettings.signature"),
        ] {
            match prefs.update("u-4", &update).await {
                Err(Error::InvalidInput { what, .. }) => assert_eq!(what, field),
                other => panic!("{update:?}: {other:?}"),
            }
        }
        assert!(raw_hash(&redis, &prefs_key(&redis, "u-4")).await.is_empty(), "nothing was written");
        assert!(matches!(
            prefs.get("u-4}").await,
            Err(Error::InvalidInput { what: "user id", .. })
        ));
    }

    async fn undecodable_stored_values_are_decode_errors_naming_the_field(redis) {
        let prefs = redis.user_prefs();
        let mut conn = redis.connection().await.unwrap();
        for (user, field, value) in [
            ("u-5", "ui.pageSize", "lots"),
            ("u-6", "notifications.email", "maybe"),
            ("u-7", "theme", "purple"),
            ("u-8", "ui.pageSize", "100000"),
            // Outside the documented encoding (no sign, no padding), though in range.
            ("u-10", "ui.pageSize", "+25"),
            ("u-11", "ui.pageSize", "0025"),
        ] {
            let key = prefs_key(&redis, user);
            let _: () = redis::cmd("HSET").arg(&key).arg(field).arg(value).query_async(&mut conn).await.unwrap();
            match prefs.get(user).await {
                Err(Error::Decode { key: k, field: Some(f), .. }) => {
                    assert_eq!(k, key);
                    assert_eq!(f, field);
                }
                other => panic!("{field}={value}: {other:?}"),
            }
        }
    }

    async fn ttl_is_refreshed_on_read_and_write(redis) {
        // The table's user-prefs row is 7 days in every environment.
        for environment in [Environment::Production, Environment::Development, Environment::Test] {
            let mut config = redis.config().clone();
            config.environment = environment;
            config.key_prefix = format!("{}{environment}:", config.key_prefix);
            let redis = Redis::connect(config).await.unwrap();
            let prefs = redis.user_prefs();
            let key = prefs_key(&redis, "u-9");
            prefs.update("u-9", &[Pref::NotifyPush(false)]).await.unwrap();
            assert!(pttl(&redis, &key).await > WEEK_MS - 5_000, "{environment}");
            let mut conn = redis.connection().await.unwrap();
            let _: () = redis::cmd("PEXPIRE").arg(&key).arg(10_000).query_async(&mut conn).await.unwrap();
            assert!(!prefs.get("u-9").await.unwrap().notifications.push);
            assert!(pttl(&redis, &key).await > WEEK_MS - 5_000, "a read refreshes the TTL");
            let _: () = redis::cmd("PEXPIRE").arg(&key).arg(10_000).query_async(&mut conn).await.unwrap();
            prefs.update("u-9", &[Pref::NotifyPush(true)]).await.unwrap();
            assert!(pttl(&redis, &key).await > WEEK_MS - 5_000, "a write refreshes the TTL");
        }
    }

    async fn multi_field_updates_are_atomic_under_concurrency(redis) {
        // An observer reads both fields and the TTL in one MULTI while updates create fresh
        // records. One MULTI of HSET (both fields) and PEXPIRE means it sees both fields with a
        // TTL or nothing; split into separate round trips, it would see one field, or fields
        // without a TTL (which `volatile-lru` would never evict).
        let prefs = redis.user_prefs();
        let (mut seen, mut partial, mut without_ttl) = (0, 0, 0);
        for round in 0..100 {
            let user = format!("u-10-{round}");
            let key = prefs_key(&redis, &user);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let observer = {
                let (redis, stop, key) = (redis.clone(), stop.clone(), key.clone());
                tokio::spawn(async move {
                    // A socket of its own: on the writers' shared socket nothing could land
                    // between two commands of theirs, transaction or not.
                    let mut conn = redis.dedicated().await.unwrap();
                    let (mut seen, mut partial, mut bare) = (0, 0, 0);
                    loop {
                        let done = stop.load(std::sync::atomic::Ordering::Acquire);
                        let ((theme, layout), ttl): ((Option<String>, Option<String>), i64) = redis::pipe()
                            .atomic()
                            .cmd("HMGET").arg(&key).arg("theme").arg("ui.layout")
                            .cmd("PTTL").arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        if theme.is_some() || layout.is_some() {
                            seen += 1;
                            partial += usize::from(theme.is_none() || layout.is_none());
                            bare += usize::from(ttl <= 0);
                        }
                        if done {
                            return (seen, partial, bare);
                        }
                    }
                })
            };
            tokio::task::yield_now().await;
            let update = if round % 2 == 0 {
                [Pref::Theme(Theme::Dark), Pref::Layout(Layout::Compact)]
            } else {
                [Pref::Theme(Theme::Light), Pref::Layout(Layout::Comfortable)]
            };
            prefs.update(&user, &update).await.unwrap();
            stop.store(true, std::sync::atomic::Ordering::Release);
            let (s, p, b) = observer.await.unwrap();
            (seen, partial, without_ttl) = (seen + s, partial + p, without_ttl + b);
        }
        // The last read of each round follows the update, so every round saw the fields.
        assert!(seen >= 100, "the observer never saw the fields: {seen}");
        assert_eq!(partial, 0, "one field visible without the other");
        assert_eq!(without_ttl, 0, "fields visible without a TTL");
    }

    async fn erase_user_leaves_nothing_of_the_user_and_everything_of_others(redis) {
        let suffix = aether_redis::random::token(6).replace(['-', '_'], "x");
        let victim = format!("victim{suffix}");
        let bystander = format!("bystander{suffix}");
        // A bystander whose id starts with the victim's must not be caught by a pattern.
        let lookalike = format!("{victim}x");
        for user in [&victim, &bystander, &lookalike] {
            populate(&redis, user).await;
        }
        // And one key written by the rate limiter itself (GCRA, whole burst used: the key
        // lives until the bucket refills, 60 s).
        let limiter = redis.rate_limiter().unwrap();
        limiter.check_n(&victim, "mfa", &TierName::Mfa, 5).await.unwrap();
        let victim_keys = keys_containing(&redis, &victim).await;
        assert!(victim_keys.len() >= 12, "populate wrote {victim_keys:?}");
        // Session keys are named by session id, not user id: take them from the index.
        let session_keys = |user: String| {
            let redis = redis.clone();
            async move {
                let sessions = redis.sessions().list_user(&user).await.unwrap();
                sessions
                    .iter()
                    .map(|s| redis.keys().key(Keyspace::Session, &[s.id.as_str()]).unwrap())
                    .collect::<Vec<_>>()
            }
        };
        let victim_sessions = session_keys(victim.clone()).await;
        assert_eq!(victim_sessions.len(), 2);
        let mut others = keys_containing(&redis, &bystander).await;
        others.extend(keys_containing(&redis, &lookalike).await);
        others.extend(session_keys(bystander.clone()).await);
        others.extend(session_keys(lookalike.clone()).await);
        others.sort();
        let mut before = Vec::new();
        for key in &others {
            before.push(snapshot(&redis, key).await);
        }

        assert_eq!(redis.sessions().list_user(&victim).await.unwrap().len(), 2);
        let report = redis.user_data().erase_user(&victim).await.unwrap();
        assert_eq!(report.sessions, 2);
        assert_eq!(report.rate_limit_keys, 5, "{report:?}");
        assert!(report.keys_deleted >= 12, "{report:?}");

        let left: Vec<_> = keys_containing(&redis, &victim)
            .await
            .into_iter()
            .filter(|k| !k.contains(&lookalike))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        for key in &victim_sessions {
            assert_eq!(snapshot(&redis, key).await.0, "none", "{key} survived");
        }
        let mut after_keys = keys_containing(&redis, &bystander).await;
        after_keys.extend(keys_containing(&redis, &lookalike).await);
        after_keys.extend(session_keys(bystander.clone()).await);
        after_keys.extend(session_keys(lookalike.clone()).await);
        after_keys.sort();
        assert_eq!(after_keys, others, "another user's key disappeared");
        for (key, snap) in others.iter().zip(before) {
            assert_eq!(snapshot(&redis, key).await, snap, "{key} changed");
        }
        let audit = redis.events().audit_range(0, i64::MAX, 100).await.unwrap();
        let erased = audit.iter().find(|r| r.id == report.audit_id).unwrap();
        assert_eq!((erased.action.as_str(), erased.target.as_str()), ("user.erased", victim.as_str()));

        assert!(redis.sessions().list_user(&victim).await.unwrap().is_empty());
        assert_eq!(redis.sessions().list_user(&bystander).await.unwrap().len(), 2);

        // Erasing again is harmless and finds nothing.
        let again = redis.user_data().erase_user(&victim).await.unwrap();
        assert_eq!((again.sessions, again.keys_deleted), (0, 0));
        assert!(matches!(
            redis.user_data().erase_user("*").await,
            Err(Error::InvalidInput { what: "user id", .. })
        ));
    }

    async fn export_user_returns_everything_but_secrets(redis) {
        populate(&redis, "u-11").await;
        populate(&redis, "u-12").await;
        let link = redis.tokens().issue(LinkPurpose::EmailVerify, "u-11", &json!({"email": "x@example.com"})).await.unwrap();
        let doc = redis.user_data().export_user("u-11").await.unwrap();
        assert_eq!(doc["userId"], "u-11");
        assert_eq!(doc["preferences"]["preferences"]["theme"], "light");
        assert_eq!(doc["notifications"].as_array().unwrap().len(), 1);
        assert_eq!(doc["notifications"][0]["read"], true);
        assert_eq!(doc["securityEvents"][0]["kind"], "login.ok");
        assert_eq!(doc["tokens"]["emailVerify"].as_array().unwrap().len(), 3);
        assert_eq!(doc["tokens"]["passwordReset"].as_array().unwrap().len(), 2);
        assert_eq!(doc["twoFactor"]["attempts"], 0);
        assert_eq!(doc["domainChallenges"][0]["domain"], "u-11.example.com");
        assert_eq!(doc["rateLimits"].as_array().unwrap().len(), 4);
        assert_eq!(doc["sessions"].as_array().unwrap().len(), 2);
        assert_eq!(doc["sessions"][0]["email"], "u-11@example.com");
        let text = doc.to_string();
        assert!(!text.contains(link.token.expose()), "the export holds a token");
        for session in redis.sessions().list_user("u-11").await.unwrap() {
            assert!(!text.contains(session.id.as_str()), "the export holds a session id");
        }
        assert!(!text.contains("u-12"), "the export holds another user's data");
    }

    async fn export_user_holds_every_security_event_however_many(redis) {
        // Beyond one read's 100,000 (the cap allows a million; other writers may keep more).
        const EVENTS: usize = 100_500;
        let key = redis.keys().key(Keyspace::SecurityEvents, &["u-many"]).unwrap();
        let mut conn = redis.connection().await.unwrap();
        for chunk in 0..EVENTS.div_ceil(10_000) {
            let mut pipe = redis::pipe();
            for i in chunk * 10_000..EVENTS.min((chunk + 1) * 10_000) {
                pipe.cmd("XADD").arg(&key).arg(format!("{}-0", i + 1)).arg("kind").arg("k").arg("details").arg("{}").ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.unwrap();
        }
        let _: () = redis::cmd("EXPIRE").arg(&key).arg(600).query_async(&mut conn).await.unwrap();
        let doc = redis.user_data().export_user("u-many").await.unwrap();
        let events = doc["securityEvents"].as_array().unwrap();
        assert_eq!(events.len(), EVENTS);
        assert_eq!(events[0]["id"], "1-0");
        assert_eq!(events[EVENTS - 1]["id"], format!("{EVENTS}-0"));
        // The pages the export reads: each starts after the last id of the one before.
        let e = redis.events();
        let first = e.security_events_after("u-many", None, 3).await.unwrap();
        let ids: Vec<_> = first.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "2-0", "3-0"]);
        let next = e.security_events_after("u-many", Some("3-0"), 2).await.unwrap();
        assert_eq!(next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["4-0", "5-0"]);
        let last = format!("{EVENTS}-0");
        assert!(e.security_events_after("u-many", Some(&last), 10).await.unwrap().is_empty());
        for bad in ["3", "3-", "x-0", "+3-0"] {
            assert!(matches!(
                e.security_events_after("u-many", Some(bad), 10).await,
                Err(Error::InvalidInput { what: "security event id", .. })
            ), "{bad:?}");
        }
    }
}

fn value_of<'a>(hash: &'a BTreeMap<String, String>, field: &str) -> &'a str {
    hash.get(field).map(String::as_str).unwrap_or("<missing>")
}
