//! Event keyspaces: notifications, metrics, security events, audit; TTLs per environment; no
//! key without a TTL after random traffic over every keyspace of this crate's user data.

use std::time::Duration;

use aether_redis::events::{AuditEntry, NewNotification, SecurityEvent};
use aether_redis::tokens::{IssueOptions, LinkPurpose};
use aether_redis::user_prefs::{Pref, Theme};
use aether_redis::{Environment, Error, Keyspace};
use futures::StreamExt;
use futures::future::join_all;
use serde_json::json;

mod support;
use support::{all_keys, assert_ttl, pttl, query, with_environment};

fn now_ms() -> i64 {
    aether_redis::codec::now_millis()
}

/// The server's clock (`TIME`), in ms since the Unix epoch.
async fn server_now_ms(redis: &aether_redis::Redis) -> i64 {
    let time: Vec<String> = query(redis, &redis::cmd("TIME")).await;
    time[0].parse::<i64>().unwrap() * 1000 + time[1].parse::<i64>().unwrap() / 1000
}

/// A tiny xorshift generator: reproducible from its seed, printed on failure.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

aether_redis::contract_tests! {
    async fn read_marks_find_each_notification_by_its_top_level_id(redis) {
        // Ids are read without decoding where that gives the decoder's answer: an `id` inside
        // `data`, or a key spelled with escapes by another service, must not fool it.
        let events = redis.events();
        let nested = events
            .push_notification("u-ids", &NewNotification::new("k", "t").data(json!({"id": "inner", "x": "\"id\""})))
            .await
            .unwrap();
        let list_key = redis.keys().key(Keyspace::Notifications, &["u-ids"]).unwrap();
        let mut conn = redis.connection().await.unwrap();
        let foreign = r#"{"kind":"k","\u0069d":"escaped","title":"t","body":"b","createdAt":1}"#;
        let twice = r#"{"id":"first","kind":"k","title":"t","body":"b","createdAt":1,"id":"second"}"#;
        let _: () = redis::cmd("LPUSH").arg(&list_key).arg(foreign).arg(twice).query_async(&mut conn).await.unwrap();
        assert_eq!(events.mark_read("u-ids", &["inner", "first"]).await.unwrap(), 0);
        assert_eq!(events.mark_read("u-ids", &[&nested.id, "escaped", "second"]).await.unwrap(), 3);
        assert_eq!(events.mark_all_read("u-ids").await.unwrap(), 0);
    }

    async fn notifications_are_newest_first_capped_and_markable(redis) {
        let events = redis.events().with_notification_cap(10).unwrap();
        let mut pushed = Vec::new();
        for i in 0..25 {
            let n = events
                .push_notification("u-1", &NewNotification::new("mail.received", format!("#{i}")).data(json!({"i": i})))
                .await
                .unwrap();
            pushed.push(n);
        }
        let list = events.notifications("u-1", 100).await.unwrap();
        assert_eq!(list.len(), 10, "capped at 10");
        let titles: Vec<_> = list.iter().map(|n| n.title.as_str()).collect();
        assert_eq!(titles.first(), Some(&"#24"), "newest first");
        assert_eq!(titles.last(), Some(&"#15"));
        assert!(list.iter().all(|n| !n.read));
        assert_eq!(list[0].data, json!({"i": 24}));

        assert_eq!(events.mark_read("u-1", &[&pushed[24].id, &pushed[0].id]).await.unwrap(), 1, "#0 was trimmed");
        assert_eq!(events.mark_read("u-1", &[&pushed[24].id]).await.unwrap(), 0, "already read");
        let list = events.notifications("u-1", 2).await.unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].read && !list[1].read);
        assert_eq!(events.mark_all_read("u-1").await.unwrap(), 9);
        assert!(events.notifications("u-1", 100).await.unwrap().iter().all(|n| n.read));

        // Read marks of trimmed notifications are dropped: the mark set never outgrows the list.
        for i in 0..10 {
            events.push_notification("u-1", &NewNotification::new("k", format!("new {i}"))).await.unwrap();
        }
        assert_eq!(events.mark_read("u-1", &[&pushed[24].id]).await.unwrap(), 0);
        let list_key = redis.keys().key(Keyspace::Notifications, &["u-1"]).unwrap();
        let read_key = redis.keys().derived(&list_key, "read");
        let mut conn = redis.connection().await.unwrap();
        let marks: i64 = redis::cmd("SCARD").arg(&read_key).query_async(&mut conn).await.unwrap();
        assert_eq!(marks, 0);

        assert!(events.clear_notifications("u-1").await.unwrap());
        assert!(events.notifications("u-1", 100).await.unwrap().is_empty());
        assert!(matches!(
            events.push_notification("u-1", &NewNotification::new("", "t")).await,
            Err(Error::InvalidInput { what: "notification kind", .. })
        ));
        assert!(matches!(
            events.notifications("a*", 10).await,
            Err(Error::InvalidInput { what: "user id", .. })
        ));
    }

    async fn concurrent_marks_count_each_notification_once_while_pushes_trim(redis) {
        let events = redis.events().with_notification_cap(20).unwrap();
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(events.push_notification("u-marks", &NewNotification::new("k", format!("{i}"))).await.unwrap().id);
        }
        // 8 markers race over the same 20 ids while 10 pushes trim the 10 oldest away: every
        // id still listed when a marker reached it is counted by exactly one marker.
        let markers = (0..8).map(|m| {
            let (events, ids) = (events.clone(), ids.clone());
            tokio::spawn(async move {
                let mut newly = 0;
                for i in 0..ids.len() {
                    let id = &ids[(i + m * 3) % ids.len()];
                    newly += events.mark_read("u-marks", &[id.as_str()]).await.unwrap();
                }
                newly
            })
        });
        let pushes = (0..10).map(|i| {
            let events = events.clone();
            tokio::spawn(async move {
                events.push_notification("u-marks", &NewNotification::new("k", format!("new {i}"))).await.unwrap();
            })
        });
        let (marked, _) = futures::join!(join_all(markers), join_all(pushes));
        let marked: u64 = marked.into_iter().map(|r| r.unwrap()).sum();
        let list = events.notifications("u-marks", 100).await.unwrap();
        let read: Vec<_> = list.iter().filter(|n| n.read).map(|n| n.id.clone()).collect();
        // Every id that survived the trim was marked by someone, exactly once in the counts;
        // the trimmed ones may or may not have been counted before they went.
        assert_eq!(read.len(), 10, "{list:?}");
        assert!(read.iter().all(|id| ids[10..].contains(id)));
        assert!((10..=20).contains(&marked), "{marked} newly marked");
        let list_key = redis.keys().key(Keyspace::Notifications, &["u-marks"]).unwrap();
        let marks: i64 = query(&redis, redis::cmd("SCARD").arg(redis.keys().derived(&list_key, "read"))).await;
        assert!(marks <= 20, "{marks} marks for a list of 20");
        // A second pass counts nothing: every surviving id is marked already.
        let again: u64 = join_all(ids[10..].iter().map(|id| {
            let (events, id) = (events.clone(), id.clone());
            async move { events.mark_read("u-marks", &[id.as_str()]).await.unwrap() }
        })).await.into_iter().sum();
        assert_eq!(again, 0);
    }

    async fn concurrent_pushes_keep_the_cap_exactly(redis) {
        let events = redis.events().with_notification_cap(50).unwrap();
        let key = redis.keys().key(Keyspace::Notifications, &["u-2"]).unwrap();
        // The cap holds at every moment, not only at the end: LPUSH and LTRIM in one MULTI
        // leave no instant with 51 elements, which a reader polling LLEN would catch.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (redis, key, done) = (redis.clone(), key.clone(), done.clone());
            tokio::spawn(async move {
                // A socket of its own: on the writers' shared socket nothing could land between
                // two commands of theirs, transaction or not.
                let mut conn = redis.dedicated().await.unwrap();
                let (mut longest, mut reads) = (0_i64, 0_u64);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let len: i64 = redis::cmd("LLEN").arg(&key).query_async(&mut conn).await.unwrap();
                    longest = longest.max(len);
                    reads += 1;
                }
                (longest, reads)
            })
        };
        for batch in 0..10 {
            let pushes = (0..100).map(|i| {
                let events = events.clone();
                tokio::spawn(async move {
                    events.push_notification("u-2", &NewNotification::new("k", format!("{batch}-{i}"))).await.unwrap()
                })
            });
            join_all(pushes).await.into_iter().for_each(|r| { r.unwrap(); });
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let (longest, reads) = reader.await.unwrap();
        assert!(reads > 10, "the reader hardly ran: {reads} reads");
        assert!(longest <= 50, "the list held {longest} elements at one moment");
        let list = events.notifications("u-2", 1000).await.unwrap();
        assert_eq!(list.len(), 50);
        assert!(pttl(&redis, &key).await > 0);
    }

    async fn metrics_count_in_buckets_and_read_a_window(redis) {
        let events = redis.events().with_metric_bucket(Duration::from_secs(10)).unwrap();
        let base = (now_ms() / 10_000) * 10_000;
        let incrs = (0..100).map(|i| {
            let events = events.clone();
            tokio::spawn(async move { events.incr_at("mail.sent", "ok", 1, base + (i % 3) * 10_000).await.unwrap() })
        });
        join_all(incrs).await.into_iter().for_each(|r| { r.unwrap(); });
        events.incr_at("mail.sent", "failed", 5, base + 1).await.unwrap();
        assert_eq!(events.incr_at("mail.sent", "failed", -2, base + 9_999).await.unwrap(), 3);
        let window = events.metric_window("mail.sent", base, base + 39_999).await.unwrap();
        let starts: Vec<_> = window.iter().map(|b| b.start).collect();
        assert_eq!(starts, vec![base, base + 10_000, base + 20_000, base + 30_000]);
        assert_eq!(window[0].counts.get("ok"), Some(&34));
        assert_eq!(window[0].counts.get("failed"), Some(&3));
        assert_eq!(window[1].counts.get("ok"), Some(&33));
        assert_eq!(window[2].counts.get("ok"), Some(&33));
        assert!(window[3].counts.is_empty());
        assert!(matches!(
            events.metric_window("mail.sent", base, base + 10_000 * 20_000).await,
            Err(Error::InvalidInput { what: "time range", .. })
        ));
    }

    async fn a_bucket_wider_than_the_ttl_lives_until_a_ttl_after_its_end(redis) {
        // The metrics row is 2 min in development; an hour-wide bucket must survive a pause.
        let redis = with_environment(&redis, Environment::Development).await;
        let events = redis.events().with_metric_bucket(Duration::from_secs(3600)).unwrap();
        let now = now_ms();
        let start = now / 3_600_000 * 3_600_000;
        events.incr("wide", "ok", 1).await.unwrap();
        let key = redis.keys().family(Keyspace::Metrics, "wide", &start.to_string());
        let left = start + 3_600_000 - now;
        let ttl = pttl(&redis, &key).await;
        assert!(ttl > 120_000 + left - 5_000 && ttl <= 120_000 + left, "TTL {ttl} ms, bucket left {left} ms");
        // A backfill into a bucket long over gets the plain TTL.
        events.incr_at("wide", "ok", 1, start - 7_200_000).await.unwrap();
        let old = redis.keys().family(Keyspace::Metrics, "wide", &(start - 7_200_000).to_string());
        assert_ttl(pttl(&redis, &old).await, 120, "an ended bucket");
        for at in [-1, i64::MIN] {
            assert!(matches!(
                events.incr_at("wide", "ok", 1, at).await,
                Err(Error::InvalidInput { what: "metric time", .. })
            ));
        }
    }

    async fn security_events_are_per_user_and_queryable_by_time(redis) {
        let events = redis.events();
        let before = now_ms();
        let first = events
            .record_security_event("u-3", &SecurityEvent::new("login.failed").ip("203.0.113.9").details(json!({"n": 1})))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let middle = now_ms();
        tokio::time::sleep(Duration::from_millis(5)).await;
        events
            .record_security_event("u-3", &SecurityEvent::new("password.changed").user_agent("curl/8"))
            .await
            .unwrap();
        events.record_security_event("u-4", &SecurityEvent::new("login.failed")).await.unwrap();
        let all = events.security_events("u-3", before - 1_000, now_ms() + 1_000, 100).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].id, first);
        assert_eq!(all[0].kind, "login.failed");
        assert_eq!(all[0].ip.as_deref(), Some("203.0.113.9"));
        assert_eq!(all[0].details, json!({"n": 1}));
        assert_eq!(all[1].user_agent.as_deref(), Some("curl/8"));
        let early = events.security_events("u-3", before - 1_000, middle, 100).await.unwrap();
        assert_eq!(early.len(), 1);
        let late = events.security_events("u-3", middle, now_ms() + 1_000, 100).await.unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].kind, "password.changed");
        assert_eq!(events.security_events("u-3", 0, i64::MAX, 1).await.unwrap().len(), 1, "limit");

        // The cap keeps the newest.
        let capped = redis.events().with_security_event_cap(3).unwrap();
        for i in 0..6 {
            capped.record_security_event("u-5", &SecurityEvent::new(format!("e{i}"))).await.unwrap();
        }
        let kinds: Vec<_> = capped.security_events("u-5", 0, i64::MAX, 100).await.unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec!["e3", "e4", "e5"]);
    }

    async fn appends_trim_entries_older_than_the_ttl_on_the_server_clock(redis) {
        let events = redis.events();
        let server_ms = server_now_ms(&redis).await;
        for keyspace in [Keyspace::SecurityEvents, Keyspace::Audit] {
            let key = match keyspace {
                Keyspace::Audit => redis.keys().key(keyspace, &["log"]).unwrap(),
                _ => redis.keys().key(keyspace, &["u-old"]).unwrap(),
            };
            let ttl = redis.ttl().millis(keyspace) as i64;
            for (ms, name) in [(server_ms - ttl - 5_000, "expired"), (server_ms - ttl / 2, "kept")] {
                let _: String = query(&redis, redis::cmd("XADD").arg(&key).arg(format!("{ms}-0")).arg("kind").arg(name).arg("actor").arg("a").arg("action").arg(name)).await;
            }
        }
        events.record_security_event("u-old", &SecurityEvent::new("new")).await.unwrap();
        events.audit(&AuditEntry::new("a", "new")).await.unwrap();
        let kinds: Vec<_> = events.security_events("u-old", 0, i64::MAX, 10).await.unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["kept", "new"]);
        let actions: Vec<_> = events.audit_range(0, i64::MAX, 10).await.unwrap().into_iter().map(|r| r.action).collect();
        assert_eq!(actions, ["kept", "new"]);
    }

    async fn a_stream_with_ids_ahead_of_the_clock_never_makes_other_appends_trim(redis) {
        // Another service wrote an id far in the future (microseconds taken for ms): the ids
        // XADD * assigns after it are just as far ahead, and must not be taken for the time.
        let events = redis.events();
        events.audit(&AuditEntry::new("a", "kept")).await.unwrap();
        events.record_security_event("u-other", &SecurityEvent::new("kept")).await.unwrap();
        let key = redis.keys().key(Keyspace::SecurityEvents, &["u-future"]).unwrap();
        let future = server_now_ms(&redis).await * 1000;
        let _: String = query(&redis, redis::cmd("XADD").arg(&key).arg(format!("{future}-0")).arg("kind").arg("future")).await;
        for _ in 0..2 {
            events.record_security_event("u-future", &SecurityEvent::new("after")).await.unwrap();
        }
        events.audit(&AuditEntry::new("a", "new")).await.unwrap();
        events.record_security_event("u-other", &SecurityEvent::new("new")).await.unwrap();
        let actions: Vec<_> = events.audit_range(0, i64::MAX, 10).await.unwrap().into_iter().map(|r| r.action).collect();
        assert_eq!(actions, ["kept", "new"]);
        let kinds: Vec<_> = events.security_events("u-other", 0, i64::MAX, 10).await.unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["kept", "new"]);
        let kinds: Vec<_> = events.security_events("u-future", 0, i64::MAX, 10).await.unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["future", "after", "after"]);
    }

    async fn a_client_whose_clock_runs_ahead_keeps_what_it_appends(redis) {
        // The appends come from a child process whose clock libfaketime sets an hour ahead: an
        // age cutoff taken from that clock would trim the very entries being appended.
        let mut child = support::child_test_process(
            &redis,
            "child_appender_with_its_clock_ahead",
            &["faketime", "-m", "--exclude-monotonic", "-f", "+1h"],
        );
        let output = tokio::task::spawn_blocking(move || child.output())
            .await
            .unwrap()
            .expect("faketime (Debian package faketime) runs the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        let skew: i64 = stdout
            .lines()
            .find_map(|line| line.split_once("SKEW_MS ").map(|(_, skew)| skew))
            .unwrap_or_else(|| panic!("the child reports no clock skew:\n{stdout}"))
            .trim()
            .parse()
            .unwrap();
        assert!(skew > 50 * 60 * 1000, "the child's clock is only {skew} ms ahead");
        let events = redis.events();
        let kinds: Vec<_> = events.security_events("u-skew", 0, i64::MAX, 10).await.unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["first", "second"]);
        let actions: Vec<_> = events.audit_range(0, i64::MAX, 10).await.unwrap().into_iter().map(|r| r.action).collect();
        assert_eq!(actions, ["first", "second"]);
    }

    async fn audit_is_append_only_and_queryable_by_time(redis) {
        let events = redis.events();
        let before = now_ms();
        let appends = (0..20).map(|i| {
            let events = events.clone();
            tokio::spawn(async move {
                events.audit(&AuditEntry::new("admin-1", "role.changed").target(format!("u-{i}")).details(json!({"to": "admin"}))).await.unwrap()
            })
        });
        let ids: Vec<_> = join_all(appends).await.into_iter().map(|r| r.unwrap()).collect();
        let records = events.audit_range(before - 1_000, now_ms() + 1_000, 1_000).await.unwrap();
        assert_eq!(records.len(), 20);
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| {
            let (ms, seq) = id.split_once('-').unwrap();
            (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
        });
        assert_eq!(records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), sorted, "oldest first");
        assert!(records.iter().all(|r| r.actor == "admin-1" && r.action == "role.changed" && r.details == json!({"to": "admin"})));
        assert!(events.audit_range(0, before - 1_000, 10).await.unwrap().is_empty());
        assert!(matches!(events.audit_range(10, 5, 10).await, Err(Error::InvalidInput { .. })));
    }

    async fn event_ttls_equal_the_table_in_every_environment(redis) {
        // (environment, notifications, metrics, security-events, audit) in seconds.
        for (environment, notifications, metrics, security, audit) in [
            (Environment::Production, 86_400, 300, 7 * 86_400, 30 * 86_400),
            (Environment::Development, 3_600, 120, 1_800, 86_400),
            (Environment::Test, 60, 30, 120, 120),
        ] {
            let redis = with_environment(&redis, environment).await;
            let events = redis.events();
            let n = events.push_notification("u-6", &NewNotification::new("k", "t")).await.unwrap();
            events.mark_read("u-6", &[&n.id]).await.unwrap();
            events.incr_at("m", "l", 1, 0).await.unwrap();
            events.record_security_event("u-6", &SecurityEvent::new("k")).await.unwrap();
            events.audit(&AuditEntry::new("a", "b")).await.unwrap();
            let keys = redis.keys();
            let list = keys.key(Keyspace::Notifications, &["u-6"]).unwrap();
            assert_ttl(pttl(&redis, &list).await, notifications, "notifications");
            assert_ttl(pttl(&redis, &keys.derived(&list, "read")).await, notifications, "read marks");
            assert_ttl(pttl(&redis, &keys.family(Keyspace::Metrics, "m", "0")).await, metrics, "metrics");
            assert_ttl(pttl(&redis, &keys.key(Keyspace::SecurityEvents, &["u-6"]).unwrap()).await, security, "security-events");
            assert_ttl(pttl(&redis, &keys.key(Keyspace::Audit, &["log"]).unwrap()).await, audit, "audit");
        }
    }

    async fn no_key_without_ttl_after_10000_random_operations(redis) {
        let seed = u64::from_le_bytes(aether_redis::random::bytes(8).unwrap().try_into().unwrap()) | 1;
        eprintln!("seed {seed}");
        let mut rng = Rng(seed);
        let plan: Vec<(u64, u64, u64)> = (0..10_000).map(|_| (rng.below(16), rng.below(20), rng.below(1_000_000))).collect();
        let ops = futures::stream::iter(plan).map(|(op, user, r)| {
            let redis = redis.clone();
            async move {
                let user = format!("u-{user}");
                let tokens = redis.tokens();
                let events = redis.events().with_notification_cap(5).unwrap();
                let purpose = if r % 2 == 0 { LinkPurpose::EmailVerify } else { LinkPurpose::PasswordReset };
                match op {
                    0 => redis.user_prefs().update(&user, &[Pref::Theme(Theme::Dark), Pref::PageSize(10 + (r % 50) as u32)]).await.map(drop),
                    1 => redis.user_prefs().get(&user).await.map(drop),
                    2 => tokens.issue_with_options(purpose, &user, &json!(r), IssueOptions::new().revoke_previous(r % 3 == 0)).await.map(drop),
                    3 => {
                        let t = tokens.issue(purpose, &user, &json!(r)).await?;
                        tokens.redeem(purpose, t.token.expose()).await.map(drop)
                    }
                    4 => tokens.revoke_all(purpose, &user).await.map(drop),
                    5 => tokens.issue_2fa(&user).await.map(drop),
                    6 => tokens.verify_2fa(&user, &format!("{:06}", r)).await.map(drop),
                    7 => tokens.domain_challenge(&user, &format!("d{}.example.com", r % 4)).await.map(drop),
                    8 => tokens.confirm_domain(&user, &format!("d{}.example.com", r % 4), &[]).await.map(drop),
                    9 => events.push_notification(&user, &NewNotification::new("k", "t")).await.map(drop),
                    10 => events.mark_all_read(&user).await.map(drop),
                    11 => events.clear_notifications(&user).await.map(drop),
                    12 => events.incr(&format!("m{}", r % 5), "l", 1).await.map(drop),
                    13 => events.record_security_event(&user, &SecurityEvent::new("k")).await.map(drop),
                    14 => events.audit(&AuditEntry::new(user.as_str(), "act")).await.map(drop),
                    _ => {
                        let list = events.notifications(&user, 5).await?;
                        match list.first() {
                            Some(n) => events.mark_read(&user, &[&n.id]).await.map(drop),
                            None => Ok(()),
                        }
                    }
                }
            }
        });
        let results: Vec<aether_redis::Result<()>> = ops.buffer_unordered(64).collect().await;
        for r in &results {
            r.as_ref().unwrap();
        }
        let keys = all_keys(&redis).await;
        assert!(keys.len() > 100, "only {} keys", keys.len());
        let mut without_ttl = Vec::new();
        for key in &keys {
            let ttl = pttl(&redis, key).await;
            if ttl == -1 {
                without_ttl.push(key.clone());
            }
        }
        assert!(without_ttl.is_empty(), "keys without TTL (seed {seed}): {without_ttl:?}");
    }
}

/// The appender that `a_client_whose_clock_runs_ahead_keeps_what_it_appends` starts under
/// `faketime`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process started by a_client_whose_clock_runs_ahead_keeps_what_it_appends"]
async fn child_appender_with_its_clock_ahead() {
    let redis = aether_redis::Redis::connect(support::child_config())
        .await
        .unwrap();
    let server_ms = server_now_ms(&redis).await;
    println!("SKEW_MS {}", now_ms() - server_ms);
    let events = redis.events();
    for kind in ["first", "second"] {
        events
            .record_security_event("u-skew", &SecurityEvent::new(kind))
            .await
            .unwrap();
        events
            .audit(&AuditEntry::new("skewed-client", kind))
            .await
            .unwrap();
    }
}

/// A user whose ACL refuses `TIME`: appends still succeed (without the age trim), and the lone
/// `TIME` that asks for a reading is tried once, not before every append; once `TIME` is
/// allowed, the next probe restores the age trim.
#[tokio::test]
async fn appends_without_time_succeed_and_the_age_trim_returns_with_it() {
    let server = tokio::task::spawn_blocking(|| {
        aether_redis::testkit::LocalServer::start(aether_redis::testkit::LocalOptions {
            config_lines: vec!["user app on >pw ~* &* +@all -time".into()],
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let config = aether_redis::Config::builder()
        .port(server.port())
        .username("app")
        .password("pw")
        .build()
        .unwrap();
    let refused = aether_redis::Redis::connect(config.clone()).await.unwrap();
    let later = aether_redis::Redis::connect(config).await.unwrap();
    let events = refused.events();
    for i in 0..10 {
        events
            .audit(&AuditEntry::new("a", format!("a{i}")))
            .await
            .unwrap();
        events
            .record_security_event("u", &SecurityEvent::new("k"))
            .await
            .unwrap();
    }
    assert_eq!(
        events.audit_range(0, i64::MAX, 100).await.unwrap().len(),
        10
    );
    let mut admin = redis::Client::open(format!("redis://127.0.0.1:{}", server.port()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let rejected = support::command_stat(&mut admin, "time", "rejected_calls").await;
    assert_eq!(rejected, 3, "TIME at two connects and one probe");
    // TIME allowed now: the other handle's first append reads the clock and trims by age.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("app")
        .arg("+time")
        .query_async(&mut admin)
        .await
        .unwrap();
    let time: Vec<String> = redis::cmd("TIME").query_async(&mut admin).await.unwrap();
    let server_ms = time[0].parse::<i64>().unwrap() * 1000;
    let key = later
        .keys()
        .key(Keyspace::SecurityEvents, &["u-old"])
        .unwrap();
    let ttl = later.ttl().millis(Keyspace::SecurityEvents) as i64;
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg(format!("{}-0", server_ms - ttl - 5_000))
        .arg("kind")
        .arg("expired")
        .query_async(&mut admin)
        .await
        .unwrap();
    later
        .events()
        .record_security_event("u-old", &SecurityEvent::new("new"))
        .await
        .unwrap();
    let kinds: Vec<_> = later
        .events()
        .security_events("u-old", 0, i64::MAX, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["new"]);
}
